"""The LoRA adapter's weights: out of and into a model, the seeded initial adapter, FFA-LoRA's frozen A.

The server starts the run from `initial_adapter` (built on the meta device, no base weights);
clients read and write the adapter of their model with `get_adapter_state`/`set_adapter_state`.
With `model.lora.freeze-a` the A matrices keep their seeded initialisation for the whole run:
every client derives them itself (`frozen_lora_a`), checks them against the server's checksum
(`check_frozen_a`) and only B travels (`split_frozen`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_finance import models
from flowertune_finance.config import ModelConfig
from flowertune_finance.worker_cache import WORKER_CACHE

ADAPTER_NAME = "default"
# The seed of the initial adapter. With `model.lora.freeze-a` the A matrices stay at this
# initialisation for the whole run, so every client derives them from the seed and the config.
LORA_INIT_SEED = 0
FROZEN_A_CHECKSUM_KEY = "lora-a-sha256"  # in the round's ConfigRecord when `model.lora.freeze-a` is on


def get_adapter_state(model: PeftModel, dtype: torch.dtype = torch.float32) -> OrderedDict[str, torch.Tensor]:
    """The adapter weights as CPU tensors of `dtype`, keyed as PEFT saves them.

    Converting here also undoes the bf16 cast SFTTrainer applies to LoRA weights of a
    quantized model (Flower's ArrayRecord rejects bf16). Always copies: a cached model's
    weights are overwritten by the next client call.
    """
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return OrderedDict((key, value.detach().to("cpu", dtype, copy=True)) for key, value in state.items())


def set_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights; every key the model expects must be present."""
    expected = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter weights do not match the model: {len(missing)} missing (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]}); check model.name and the LoRA settings"
        )
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)


def adapter_shapes(model_config: ModelConfig, hf_config: Any = None) -> OrderedDict[str, tuple[int, ...]]:
    """Key and shape of every adapter array, keyed as PEFT saves them (no weights materialised)."""
    state = get_peft_model_state_dict(models.meta_peft_model(model_config, hf_config), adapter_name=ADAPTER_NAME)
    return OrderedDict((key, tuple(value.shape)) for key, value in state.items())


def initial_adapter(
    model_config: ModelConfig, seed: int = LORA_INIT_SEED
) -> tuple[OrderedDict[str, torch.Tensor], LoraConfig]:
    """Fresh LoRA weights and the resolved LoraConfig, without loading the base weights.

    The base model is instantiated from its config on the meta device (no memory, no
    download of weights); only the LoRA matrices are materialised and initialised by PEFT
    itself (A: Kaiming-uniform, B: zeros) from `seed`, so the same config and seed give the
    same weights in any process (FFA-LoRA's clients rely on it). The keys and shapes equal
    those of the quantized model the clients train, since LoRA wraps the same linear layers.
    """
    from peft.tuners.lora import LoraLayer

    peft_model = models.meta_peft_model(model_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                module.lora_A.to_empty(device="cpu")
                module.lora_B.to_empty(device="cpu")
                module.reset_lora_parameters(ADAPTER_NAME, init_lora_weights=True)
    resolved = peft_model.peft_config[ADAPTER_NAME]
    resolved.base_model_name_or_path = model_config.name
    return get_adapter_state(peft_model), resolved


def split_frozen(adapter: Mapping[str, Any]) -> tuple[OrderedDict[str, Any], OrderedDict[str, Any]]:
    """(A matrices, everything else) of an adapter or of its shapes, each in the adapter's order."""
    frozen = OrderedDict((key, value) for key, value in adapter.items() if models.is_lora_a(key))
    trained = OrderedDict((key, value) for key, value in adapter.items() if not models.is_lora_a(key))
    return frozen, trained


def adapter_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes, in name order: equal only for identical weights."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class FrozenAdapterMismatch(RuntimeError):
    """The frozen A matrices a client derives differ from the server's: training would use another A."""


def derive_frozen_a(model_config: ModelConfig) -> OrderedDict[str, torch.Tensor]:
    """FFA-LoRA's fixed A matrices, derived exactly as the server does (`initial_adapter` from
    the shared seed), so they never travel."""
    return split_frozen(initial_adapter(model_config)[0])[0]


def frozen_lora_a(model_config: ModelConfig) -> OrderedDict[str, torch.Tensor]:
    """This process's frozen A matrices for the config, derived once (kept in the worker cache)."""
    return WORKER_CACHE.frozen_lora_a(model_config, derive_frozen_a)


def check_frozen_a(frozen: Mapping[str, torch.Tensor], expected_sha256: str | None) -> None:
    """Refuse to train when the server's checksum of A is missing or differs from ours."""
    if not expected_sha256:
        raise FrozenAdapterMismatch(
            f"model.lora.freeze-a is true but the round's config carries no '{FROZEN_A_CHECKSUM_KEY}' "
            "(the server's checksum of the frozen A matrices): the server and this node run different app versions"
        )
    derived = adapter_checksum(frozen)
    if derived != expected_sha256:
        raise FrozenAdapterMismatch(
            f"the frozen LoRA A matrices derived on this node (sha256 {derived[:16]}...) differ from the server's "
            f"(sha256 {expected_sha256[:16]}...): model.name, the model.lora.* settings and the torch version must "
            "be the same on the server and every SuperNode; refusing to train on a different A"
        )
