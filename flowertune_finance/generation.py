"""The evaluated model and its batched greedy generation, as the leaderboard's script runs them.

The leaderboard loads base + adapter, adds a `[PAD]` token when the tokenizer has none (or
pads with EOS), and calls `generate(max_length=512, eos_token_id=eos)` per batch. There,
`max_length` counts the left padding, so an example's answer length depends on the other
prompts in its batch. Here every example gets the budget it would get alone (512 minus its
own prompt length, at least one token), so results do not depend on batch size or order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from flowertune_finance.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from flowertune_finance.models import quantization_config, use_cuda

MAX_LENGTH = 512  # prompt + answer tokens, the leaderboard's generate(max_length=...)
SEED = 2024  # the leaderboard's torch.manual_seed, set before loading (the [PAD] embedding is sampled)
FAST_MAX_NEW_TOKENS = 8  # enough for "moderately positive" in Mistral's vocabulary
MODES = ("protocol", "fast")
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_model.bin")
# The leaderboard's dtype per quantization (4-bit computes in fp32 there).
DTYPES = {4: torch.float32, 8: torch.float16, 0: torch.float32}


class EvalError(ValueError):
    """Bad evaluation input: dataset, data folder, adapter, or options."""


def check_adapter(base_model: str, peft_path: str | Path) -> None:
    """Fail before loading anything heavy if the adapter cannot belong to `base_model`.

    Shapes are checked against the base model's architecture built on the meta device (no
    weights read); a differing `base_model_name_or_path` is an error when both are hub ids.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(peft_path).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise EvalError(f"--peft-path {str(peft_path)!r}: no PEFT checkpoint there (expected {ADAPTER_CONFIG})")
    saved_base = str(json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "")
    both_hub_ids = not Path(base_model).expanduser().exists() and not Path(saved_base).expanduser().exists()
    if saved_base and both_hub_ids and saved_base != base_model:
        raise EvalError(
            f"adapter {str(folder)!r} was trained on {saved_base!r}, not on --base-model-name-path {base_model!r}"
        )
    weights = next((folder / name for name in ADAPTER_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise EvalError(f"--peft-path {str(peft_path)!r}: no adapter weights ({' or '.join(ADAPTER_FILES)})")
    if weights.suffix != ".safetensors":
        return
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    modules = dict(base.named_modules())
    with safe_open(str(weights), framework="pt") as tensors:
        for key in tensors.keys():
            shape = tuple(tensors.get_slice(key).get_shape())
            module_name, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            module = modules.get(module_name)
            expected = {
                "A.weight": (shape[0], getattr(module, "in_features", None)),
                "B.weight": (getattr(module, "out_features", None), shape[-1]),
            }.get(kind, shape)
            if module is None or shape != expected:
                needs = f"has no module {module_name}" if module is None else f"needs {list(expected)}"
                raise EvalError(
                    f"adapter {str(folder)!r} does not fit base model {base_model!r}: tensor {key} has shape "
                    f"{list(shape)}, the base model {needs} (adapter trained on {saved_base or 'an unknown model'!r})"
                )


def load_model(base_model: str, peft_path: str | Path | None, quantization: int = 4):
    """Base model (+ adapter) and tokenizer, loaded in the leaderboard's order and dtypes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in DTYPES:
        raise EvalError(f"--quantization {quantization!r} is not supported; allowed: 4, 8, 0 (no quantization)")
    if peft_path is not None:
        check_adapter(base_model, peft_path)
    torch.manual_seed(SEED)
    quantization_settings = quantization_config(quantization)
    if quantization == 4:
        quantization_settings.bnb_4bit_compute_dtype = torch.float32
    cuda = use_cuda()
    model = AutoModelForCausalLM.from_pretrained(
        base_model,
        quantization_config=quantization_settings,
        dtype=DTYPES[quantization],
        device_map={"": 0} if cuda else None,
    )
    if peft_path is not None:
        model = PeftModel.from_pretrained(model, str(Path(peft_path).expanduser()))
    tokenizer = AutoTokenizer.from_pretrained(base_model, padding_side="left")
    add_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def add_pad_token(model, tokenizer) -> None:
    """The leaderboard's pad handling: a new `[PAD]` token when there is none or it is EOS."""
    if not tokenizer.pad_token or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        model.resize_token_embeddings(len(tokenizer))
    tokenizer.padding_side = "left"


def answer_budget(prompt_length: int, mode: str) -> int:
    """New tokens an example may generate: up to MAX_LENGTH in total (protocol), or a few (fast)."""
    budget = max(MAX_LENGTH - prompt_length, 1)
    return budget if mode == "protocol" else min(budget, FAST_MAX_NEW_TOKENS)


@lru_cache(maxsize=4)
def newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens whose text holds a newline (scanned once per tokenizer)."""
    return torch.tensor([i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])], dtype=torch.long)


class StopAtNewline:
    """Per-sequence stop once a sequence's newest token holds a newline (fast mode)."""

    def __init__(self, token_ids: torch.Tensor) -> None:
        self.token_ids = token_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.token_ids.to(input_ids.device))


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[str], mode: str = "protocol") -> list[str]:
    """Decoded prompt + answer of each prompt (special tokens skipped, as the leaderboard decodes).

    Fast mode also stops a sequence at its first newline; protocol mode only at EOS or budget.
    """
    if mode not in MODES:
        raise EvalError(f"mode {mode!r} is not supported; allowed: {', '.join(MODES)}")
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, return_token_type_ids=False)
    batch = batch.to(model.device)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    budgets = [answer_budget(length, mode) for length in lengths]
    extra = {"stopping_criteria": [StopAtNewline(newline_token_ids(tokenizer))]} if mode == "fast" else {}
    output = model.generate(
        **batch,
        max_new_tokens=max(budgets),
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    padded_length = batch["input_ids"].shape[1]
    texts = []
    for row, length, budget in zip(range(len(prompts)), lengths, budgets):
        prompt_ids = batch["input_ids"][row, padded_length - length:]
        answer_ids = output[row, padded_length:padded_length + budget]
        texts.append(tokenizer.decode(torch.cat([prompt_ids, answer_ids]), skip_special_tokens=True))
    return texts
