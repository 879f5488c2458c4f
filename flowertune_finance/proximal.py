"""FedProx on the client: SFTTrainer with the proximal term added to its training loss.

Flower's FedProx strategy averages like FedAvg and sends `proximal-mu` to the clients;
the client must add mu/2 * ||w - w_global||^2 to its loss, which keeps a client's
adapter from drifting far from the global one on its own small partition. Only the
trainable (LoRA) weights count: the frozen base weights never move.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the weights being trained (for a PEFT model, the LoRA matrices)."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def proximal_term(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """Squared L2 distance between the model's trainable weights and `reference`."""
    total = None
    for name, param in model.named_parameters():
        if name in reference:
            distance = (param - reference[name].to(param.device, param.dtype)).pow(2).sum()
            total = distance if total is None else total + distance
    if total is None:
        raise ValueError("no trainable weight of the model matches the reference weights")
    return total


class ProximalSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss includes FedProx's proximal term.

    The global weights are captured when training starts, that is after the client loaded
    the received adapter into the built trainer's model.
    """

    def __init__(self, *args, proximal_mu: float, **kwargs) -> None:
        if proximal_mu < 0:
            raise ValueError(f"proximal-mu = {proximal_mu!r} is not allowed; allowed: a number >= 0")
        super().__init__(*args, **kwargs)
        self.proximal_mu = proximal_mu
        self.global_weights: dict[str, torch.Tensor] = {}

    def capture_global_weights(self) -> None:
        """Remember the weights local training starts from (the received global adapter)."""
        self.global_weights = trainable_weights(self.model)

    def train(self, *args, **kwargs):
        if self.proximal_mu:
            self.capture_global_weights()
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.proximal_mu == 0 or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # With gradient accumulation, a loss already normalised over all micro-batches is
        # summed by the Trainer, so each micro-batch carries its share of the term.
        share = self.current_gradient_accumulation_steps if self._loss_is_scaled(num_items_in_batch) else 1
        loss = loss + self.proximal_mu / 2 * proximal_term(model, self.global_weights) / share
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves gradient accumulation to the loss (its own rule)."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        normalised_by_model = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        return bool(normalised_by_model) or self.compute_loss_func is not None
