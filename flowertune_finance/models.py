"""The base model (quantized or not) with its LoRA wrapper, built for the clients and on the meta device.

Loading and quantizing a 7B model takes tens of seconds, about as long as a client's ten
training steps, so a worker process builds the base model + LoRA wrapper once
(`cached_peft_model`, kept in `worker_cache.WORKER_CACHE`) and every later client call only
swaps in the adapter weights it received. The server never needs the base weights: the same
construction on the meta device (`meta_peft_model`) gives the adapter's names and shapes and
checks `model.lora.target-modules` against the model's modules. The adapter's weights
themselves (state in and out, the seeded initial adapter, FFA-LoRA's frozen A) are in `adapters`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from flowertune_finance.config import ALL_LINEAR, ConfigError, ModelConfig, target_module_names
from flowertune_finance.worker_cache import WORKER_CACHE


def cosine_annealing(current_round: int, total_round: int, lrate_max: float, lrate_min: float) -> float:
    """Learning rate of a round: cosine from `lrate_max` (round 0) to `lrate_min` (last round)."""
    cos_inner = math.pi * current_round / total_round
    return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))


def use_cuda() -> bool:
    """Train on the GPU when there is one, else on the CPU."""
    return torch.cuda.is_available()


def target_modules(model_config: ModelConfig) -> str | list[str] | None:
    """`model.lora.target-modules` as PEFT takes it: None (its default for the architecture, as
    upstream), "all-linear" (every linear layer but the output head), or a list of names."""
    value = model_config.lora_target_modules
    if value == "":
        return None
    if value == ALL_LINEAR:
        return ALL_LINEAR
    return target_module_names(value)


def lora_config(model_config: ModelConfig) -> LoraConfig:
    """LoRA with the configured rank, alpha, dropout and target modules."""
    return LoraConfig(
        r=model_config.lora_r,
        lora_alpha=model_config.lora_alpha,
        lora_dropout=model_config.lora_dropout,
        target_modules=target_modules(model_config),
        task_type="CAUSAL_LM",
    )


def is_lora_a(name: str) -> bool:
    """Whether a parameter or adapter key is a LoRA A matrix of a linear layer (what freeze-a fixes)."""
    return ".lora_A." in name


def freeze_lora_a(model: PeftModel) -> None:
    """FFA-LoRA: take every A matrix out of training (no gradient, no optimizer state, no weight
    decay) and keep it fp32, so the shared initialisation loaded into it is never rounded."""
    for name, param in model.named_parameters():
        if is_lora_a(name):
            param.requires_grad_(False)
            if param.dtype != torch.float32:
                param.data = param.data.float()


def quantization_config(bits: int, compute_dtype: str = "float32"):
    """bitsandbytes settings: `load_in_4bit=True` (fp4, the reference's) with the configured
    compute dtype (float32 is bitsandbytes' default and the reference's), or 8-bit; None for 0."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits == 0:
        return None
    raise ValueError(f"model.quantization = {bits!r} is not supported; allowed: 0, 4, 8")


def load_dtype(model_config: ModelConfig) -> torch.dtype:
    """The dtype the base weights are loaded in.

    A quantized model loads in bf16 as the reference does (`prepare_model_for_kbit_training`
    then casts every non-quantized weight to fp32); an unquantized one in its compute dtype.
    """
    return torch.bfloat16 if model_config.quantization else getattr(torch, model_config.compute_dtype)


def load_base_model(model_config: ModelConfig):
    """The base causal LM, quantized as configured, on the GPU if there is one; counted in
    `WORKER_CACHE.base_model_loads`."""
    from transformers import AutoModelForCausalLM

    cuda = use_cuda()
    model = AutoModelForCausalLM.from_pretrained(
        model_config.name,
        quantization_config=quantization_config(model_config.quantization, model_config.compute_dtype),
        dtype=load_dtype(model_config),
        device_map={"": 0} if cuda else None,
    )
    WORKER_CACHE.count_base_model_load()
    return model


def build_peft_model(model_config: ModelConfig) -> PeftModel:
    """Base model prepared for (k-bit) training and wrapped with a fresh LoRA adapter."""
    from peft import prepare_model_for_kbit_training

    model = load_base_model(model_config)
    if model_config.quantization:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=model_config.gradient_checkpointing
        )
    elif model_config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if model_config.gradient_checkpointing:
        model.config.use_cache = False  # as the reference: no KV cache while checkpointing activations
    peft_model = get_peft_model(model, lora_config(model_config))
    if model_config.lora_freeze_a:
        freeze_lora_a(peft_model)
    return peft_model


def keep_adapter_fp32(model: PeftModel) -> None:
    """Undo TRL's cast of the trainable LoRA weights to bf16.

    `SFTTrainer.__init__` converts every trainable weight of a quantized model to bf16 (QLoRA's
    recipe). The reference (trl 0.8, peft 0.6) trains LoRA in fp32, and a bf16 weight rounds
    the received global adapter and loses every Adam step below its half-ulp (~4e-5 at |w|
    ~0.01). Called after the trainer is built and before the optimizer exists, so the master
    weights and the optimizer state stay fp32; a bf16 `compute-dtype` or `bf16` training
    argument still computes in bf16 (mixed precision).
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def cached_peft_model(model_config: ModelConfig) -> PeftModel:
    """The worker's PEFT model for this config, built on first use; a new config replaces it.

    Each client call overwrites the adapter weights, so nothing trained by one call survives
    into the next.
    """
    return WORKER_CACHE.peft_model(model_config, build_peft_model)


@contextmanager
def trainer_call(model: PeftModel) -> Iterator[PeftModel]:
    """Remove the forward hooks a Trainer adds to a model it trains, so a cached model starts
    every call like a freshly built one.

    Each TRL/Transformers trainer registers new input-grad hooks for gradient checkpointing
    (one set per trainer, never removed); on a cached model they would pile up over hundreds
    of rounds. Nothing else needs undoing: the adapter is overwritten each call, every trainer
    makes a new optimizer and reseeds, and accelerate marks the model as prepared, so its
    mixed-precision wrapper is applied once, as for a fresh model.
    """
    hooks_before = {name: set(module._forward_hooks) for name, module in model.named_modules()}
    try:
        yield model
    finally:
        for name, module in model.named_modules():
            for hook_id in set(module._forward_hooks) - hooks_before.get(name, set()):
                for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs,
                              module._forward_hooks_always_called):
                    hooks.pop(hook_id, None)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct names (last path component) of the model's linear layers: what
    `model.lora.target-modules` may list."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def check_target_modules(model_config: ModelConfig, base: torch.nn.Module) -> None:
    """Every listed name must match a linear layer (PEFT's rule: the module's name or its last
    components). PEFT itself would skip a name that matches nothing when another one matches,
    training fewer layers than asked for without a word."""
    value = model_config.lora_target_modules
    if value in ("", ALL_LINEAR):
        return
    linear = [name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)]
    unmatched = [name for name in target_module_names(value)
                 if not any(full == name or full.endswith("." + name) for full in linear)]
    if unmatched:
        raise ConfigError(
            f"run config 'model.lora.target-modules' = {value!r}: {', '.join(repr(n) for n in unmatched)} "
            f"matches no linear module of {model_config.name!r}; its linear modules are "
            f"{', '.join(linear_module_names(base))} (or use \"all-linear\", or empty for PEFT's default)"
        )


def meta_peft_model(model_config: ModelConfig, hf_config: Any = None) -> PeftModel:
    """The model with its LoRA adapter, on the meta device: shapes and names, no weights.

    Built from `hf_config` (a transformers config) or the model's own config file; checks
    `model.lora.target-modules` against the model's modules. The global RNG is left as it was.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = hf_config if hf_config is not None else AutoConfig.from_pretrained(model_config.name)
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config)
        check_target_modules(model_config, base)
        try:
            return get_peft_model(base, lora_config(model_config))
        except ValueError as error:  # e.g. no PEFT default for this architecture
            raise ConfigError(
                f"run config 'model.lora.target-modules' = {model_config.lora_target_modules!r}: LoRA cannot be "
                f"applied to {model_config.name!r}: {error}; its linear modules are "
                f"{', '.join(linear_module_names(base))}"
            ) from error
