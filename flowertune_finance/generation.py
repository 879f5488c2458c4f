"""The evaluated model and its batched generation, as the leaderboard's finance script runs them.

Protocol mode is that script's computation: `torch.manual_seed(2024)` before loading, base +
adapter, a `[PAD]` token (and resized embeddings) when the tokenizer has none or pads with EOS,
then per chunk of prompts `tokenizer(chunk, padding=True, max_length=512)` with the tokenizer's
own padding side and `generate(max_length=512, eos_token_id=eos)` with the model's own
generation config. `max_length` counts the chunk's padded prompt, so an answer's budget depends
on the longest prompt of its chunk: results depend on the batch size, as they do there.
Fast mode is ours: left padding, greedy, a few tokens per answer, stop at a newline.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from peft.utils.constants import WEIGHTS_NAME

from flowertune_finance.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from flowertune_finance.leaderboard import MAX_LENGTH, SEED
from flowertune_finance.models import quantization_config, use_cuda

FAST_MAX_NEW_TOKENS = 8  # enough for "moderately positive" in Mistral's vocabulary
MODES = ("protocol", "fast")
ADAPTER_FILES = (ADAPTER_WEIGHTS, WEIGHTS_NAME)  # PEFT's file names: safetensors, or the older pickle
# The leaderboard's dtype per quantization (4-bit computes in fp32 there); 0 is ours (no quantization).
DTYPES = {4: torch.float32, 8: torch.float16, 0: torch.float32}
# What two base models must share for an adapter of one to be scored on the other.
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                      "intermediate_size")


class EvalError(ValueError):
    """Bad evaluation input: dataset, data folder, model, adapter, output folder or options."""


def first_line(error: BaseException) -> str:
    """An exception as one line (hub and loader errors run over several)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_local(name: str) -> bool:
    """A model name counts as a local folder when it looks like a path or exists (as `model.name` does)."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def is_hub_id(name: str) -> bool:
    """`owner/name` and not a local path: the only form two recorded names can be compared in."""
    parts = name.split("/")
    return not is_local(name) and len(parts) == 2 and all(parts)


def check_base_model(base_model: str) -> None:
    """A base model given as a path must be a model folder (hub ids are checked when loaded)."""
    if is_local(base_model):
        folder = Path(base_model).expanduser()
        if not folder.is_dir():
            raise EvalError(f"--base-model-name-path {base_model!r}: no such folder (give a model folder or a hub id)")
        if not (folder / "config.json").is_file():
            raise EvalError(f"--base-model-name-path {base_model!r}: no config.json there (not a model folder)")


def config_fingerprint(model_folder: str | Path) -> dict[str, object]:
    """The architecture fields of a local model's config.json (text config of multimodal models)."""
    path = Path(model_folder).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
        text = config.get("text_config") or {}
    except (ValueError, AttributeError) as error:
        raise EvalError(f"{str(path)!r} is not a model config (JSON object): {first_line(error)}") from None
    return {field: config.get(field, text.get(field)) for field in FINGERPRINT_FIELDS}


def adapter_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in an adapter file, read without loading the model."""
    from safetensors import SafetensorError, safe_open

    try:
        if weights.suffix == ".safetensors":
            with safe_open(str(weights), framework="pt") as tensors:
                names = tensors.keys()  # a safe_open handle is not iterable
                return {key: tuple(tensors.get_slice(key).get_shape()) for key in names}
        return {key: tuple(value.shape) for key, value in
                torch.load(weights, map_location="cpu", weights_only=True).items()}
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as error:
        raise EvalError(f"adapter file {str(weights)!r} cannot be read (truncated or not an adapter file): "
                        f"{first_line(error)}") from None


def check_adapter(base_model: str, peft_path: str | Path) -> Path:
    """Fail before loading anything heavy if the adapter cannot belong to `base_model`; return its weights file.

    Shapes are checked against the base model actually given (its architecture built on the meta
    device, no weights read), not against the name the adapter recorded. That name is compared
    only when both are hub ids; when both are local folders that exist, their configs'
    architecture fields (FINGERPRINT_FIELDS) must agree. A recorded local folder is never
    compared with a hub id by name: the same model may live in both places.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(peft_path).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise EvalError(f"--peft-path {str(peft_path)!r}: no PEFT checkpoint there (expected {ADAPTER_CONFIG})")
    try:
        saved_base = str(json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "")
    except (ValueError, AttributeError) as error:
        raise EvalError(f"{str(folder / ADAPTER_CONFIG)!r} is not a JSON object: {first_line(error)}") from None
    if saved_base and is_hub_id(saved_base) and is_hub_id(base_model) and saved_base != base_model:
        raise EvalError(
            f"adapter {str(folder)!r} was trained on {saved_base!r}, not on --base-model-name-path {base_model!r}"
        )
    weights = next((folder / name for name in ADAPTER_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise EvalError(f"--peft-path {str(peft_path)!r}: no adapter weights ({' or '.join(ADAPTER_FILES)})")
    shapes = adapter_tensor_shapes(weights)
    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as error:
        raise EvalError(f"--base-model-name-path {base_model!r}: cannot read its config: {first_line(error)}") from None
    with torch.device("meta"):
        modules = dict(AutoModelForCausalLM.from_config(config).named_modules())
    for key, shape in shapes.items():
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
    if saved_base and is_local(saved_base) and is_local(base_model):
        recorded, given = Path(saved_base).expanduser(), Path(base_model).expanduser()
        if (recorded / "config.json").is_file() and (given / "config.json").is_file():
            theirs, ours = config_fingerprint(recorded), config_fingerprint(given)
            differing = [f"{field} {theirs[field]!r} vs {ours[field]!r}" for field in FINGERPRINT_FIELDS
                         if theirs[field] != ours[field]]
            if differing:
                raise EvalError(f"adapter {str(folder)!r} was trained on {saved_base!r}, whose config differs from "
                                f"--base-model-name-path {base_model!r}: {', '.join(differing)}")
    return weights


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes: names the exact adapter a result belongs to."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(base_model: str):
    """The base model's tokenizer as saved (its own padding side); one-line error if it cannot load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as error:
        raise EvalError(f"--base-model-name-path {base_model!r}: cannot load its tokenizer: "
                        f"{first_line(error)}") from None


def load_model(base_model: str, peft_path: str | Path | None, quantization: int = 4, check: bool = True):
    """Base model (+ adapter) and tokenizer, in the leaderboard's order: seed, model, adapter, tokenizer, [PAD].

    `check=False` skips `check_adapter` for a caller that has just run it.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if quantization not in DTYPES:
        raise EvalError(f"--quantization {quantization!r} is not supported; allowed: 4, 8, 0 (no quantization)")
    if peft_path is not None and check:
        check_adapter(base_model, peft_path)
    torch.manual_seed(SEED)
    quantization_settings = quantization_config(quantization)
    if quantization == 4:
        quantization_settings.bnb_4bit_compute_dtype = torch.float32  # BitsAndBytesConfig(load_in_4bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        base_model,
        quantization_config=quantization_settings,
        dtype=DTYPES[quantization],
        device_map={"": 0} if use_cuda() else None,
    )
    if peft_path is not None:
        model = PeftModel.from_pretrained(model, str(Path(peft_path).expanduser()), torch_dtype=DTYPES[quantization])
    tokenizer = load_tokenizer(base_model)
    add_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def add_pad_token(model, tokenizer) -> None:
    """The leaderboard's pad handling: a new `[PAD]` token when there is none or it is EOS."""
    if not tokenizer.pad_token or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        model.resize_token_embeddings(len(tokenizer))


def fast_budget(prompt_length: int) -> int:
    """New tokens a fast-mode answer may have: a few, and never past MAX_LENGTH in total."""
    return min(max(MAX_LENGTH - prompt_length, 1), FAST_MAX_NEW_TOKENS)


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
def protocol_batch(model, tokenizer, prompts: Sequence[str]) -> list[str]:
    """One chunk exactly as the leaderboard's script generates it; each row decoded whole."""
    tokens = tokenizer(list(prompts), return_tensors="pt", padding=True, max_length=MAX_LENGTH,
                       return_token_type_ids=False).to(model.device)
    output = model.generate(**tokens, max_length=MAX_LENGTH, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in output]


@torch.inference_mode()
def fast_batch(model, tokenizer, prompts: Sequence[str]) -> list[str]:
    """Greedy, left-padded, each prompt's own short budget, stop at a newline: independent of batching."""
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left",
                      return_token_type_ids=False).to(model.device)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    budgets = [fast_budget(length) for length in lengths]
    output = model.generate(
        **batch,
        max_new_tokens=max(budgets),
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=[StopAtNewline(newline_token_ids(tokenizer))],
    )
    padded_length = batch["input_ids"].shape[1]
    texts = []
    for row, length, budget in zip(range(len(prompts)), lengths, budgets):
        prompt_ids = batch["input_ids"][row, padded_length - length:]
        answer_ids = output[row, padded_length:padded_length + budget]
        texts.append(tokenizer.decode(torch.cat([prompt_ids, answer_ids]), skip_special_tokens=True))
    return texts


def generate_batch(model, tokenizer, prompts: Sequence[str], mode: str = "protocol") -> list[str]:
    """Decoded prompt + answer of each prompt (special tokens skipped, as the leaderboard decodes)."""
    if mode not in MODES:
        raise EvalError(f"mode {mode!r} is not supported; allowed: {', '.join(MODES)}")
    return (protocol_batch if mode == "protocol" else fast_batch)(model, tokenizer, prompts)
