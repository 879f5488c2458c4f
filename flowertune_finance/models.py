"""The base model (quantized or not) with its LoRA adapter, the per-worker cache, the LR schedule.

Loading and quantizing a 7B model takes tens of seconds, about as long as a client's ten
training steps, so a worker process builds the base model + LoRA wrapper once and every
later client call only swaps in the adapter weights it received (`cached_peft_model`).
The server never needs the base weights: `initial_adapter` builds the adapter from the
model's config on the meta device; the same construction checks `model.lora.target-modules`
against the model's modules and derives FFA-LoRA's frozen A matrices on every client.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_finance.config import ALL_LINEAR, ConfigError, ModelConfig, target_module_names

ADAPTER_NAME = "default"
# The seed of the initial adapter. With `model.lora.freeze-a` the A matrices stay at this
# initialisation for the whole run, so every client derives them from the seed and the config.
LORA_INIT_SEED = 0
FROZEN_A_CHECKSUM_KEY = "lora-a-sha256"  # in the round's ConfigRecord when `model.lora.freeze-a` is on


def cosine_annealing(current_round: int, total_round: int, lrate_max: float, lrate_min: float) -> float:
    """Learning rate of a round: cosine from `lrate_max` (round 0) to `lrate_min` (last round)."""
    cos_inner = math.pi * current_round / total_round
    return lrate_min + 0.5 * (lrate_max - lrate_min) * (1 + math.cos(cos_inner))


def use_cuda() -> bool:
    """Train on the GPU when there is one, else on the CPU."""
    return torch.cuda.is_available()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=DTYPES[compute_dtype])
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
    return torch.bfloat16 if model_config.quantization else DTYPES[model_config.compute_dtype]


def load_base_model(model_config: ModelConfig):
    """The base causal LM, quantized as configured, on the GPU if there is one."""
    from transformers import AutoModelForCausalLM

    cuda = use_cuda()
    return AutoModelForCausalLM.from_pretrained(
        model_config.name,
        quantization_config=quantization_config(model_config.quantization, model_config.compute_dtype),
        dtype=load_dtype(model_config),
        device_map={"": 0} if cuda else None,
    )


def build_peft_model(model_config: ModelConfig) -> PeftModel:
    """Base model prepared for (k-bit) training and wrapped with a fresh LoRA adapter."""
    from peft import prepare_model_for_kbit_training

    global BASE_MODEL_LOADS
    model = load_base_model(model_config)
    BASE_MODEL_LOADS += 1
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


# Per-worker cache, keyed by everything that changes the model (the ModelConfig is frozen
# and hashable). Each call overwrites the adapter weights, so nothing trained by one client
# call survives into the next. `BASE_MODEL_LOADS` counts base-model loads in this process
# (cached or not) for tests and benchmarks.
_PEFT_MODELS: OrderedDict[ModelConfig, PeftModel] = OrderedDict()
BASE_MODEL_LOADS = 0


def cached_peft_model(model_config: ModelConfig) -> PeftModel:
    """The worker's PEFT model for this config, built on first use (one kept at a time)."""
    if model_config not in _PEFT_MODELS:
        _PEFT_MODELS.clear()  # a different config replaces the old model rather than doubling memory
        _PEFT_MODELS[model_config] = build_peft_model(model_config)
    return _PEFT_MODELS[model_config]


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


def clear_model_cache() -> None:
    """Drop the cached model (tests use this to emulate a fresh worker)."""
    _PEFT_MODELS.clear()


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


def adapter_shapes(model_config: ModelConfig, hf_config: Any = None) -> OrderedDict[str, tuple[int, ...]]:
    """Key and shape of every adapter array, keyed as PEFT saves them (no weights materialised)."""
    state = get_peft_model_state_dict(meta_peft_model(model_config, hf_config), adapter_name=ADAPTER_NAME)
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

    peft_model = meta_peft_model(model_config)
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
    frozen = OrderedDict((key, value) for key, value in adapter.items() if is_lora_a(key))
    trained = OrderedDict((key, value) for key, value in adapter.items() if not is_lora_a(key))
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


# Per-worker cache of the frozen A matrices (derived once per model config).
_FROZEN_A: dict[ModelConfig, OrderedDict[str, torch.Tensor]] = {}


def frozen_lora_a(model_config: ModelConfig) -> OrderedDict[str, torch.Tensor]:
    """FFA-LoRA's fixed A matrices, derived here exactly as the server does (`initial_adapter`
    from the shared seed), so they never travel."""
    if model_config not in _FROZEN_A:
        _FROZEN_A.clear()
        _FROZEN_A[model_config] = split_frozen(initial_adapter(model_config)[0])[0]
    return _FROZEN_A[model_config]


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
