"""The defaults compute what the reference template computes: fp32 LoRA weights, its precision,
its alpaca examples token for token, its dynamic data seed, its local epochs."""

from __future__ import annotations

import pytest
import torch

from flowertune_finance import adapters, models, training
from flowertune_finance.config import ConfigError, ModelConfig, parse_run_config
from flowertune_finance.dataset import load_tokenizer
from flowertune_finance.dev import synthetic
from flowertune_finance.dev.launch import SAMPLE_DATA, SMOKE_RUN_CONFIG
from flowertune_finance.dev.tiny import build_tiny_model
from flowertune_finance.prompts import PROMPT_FORMATS
from flowertune_finance.training_arguments import sft_arguments


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), architecture="llama")


def _config(model_dir, **overrides):
    return parse_run_config({
        **SMOKE_RUN_CONFIG, "model.name": str(model_dir), "dataset.path": str(SAMPLE_DATA),
        "num-server-rounds": 3, **overrides,
    })


def test_lora_weights_stay_fp32_under_4bit_and_lose_no_tiny_update(tiny_llama):
    """TRL casts a quantized model's LoRA weights to bf16; the app undoes it, so at LR 1e-7 the
    received adapter comes back unrounded and A still moves in round 2 (in bf16 it cannot)."""
    config = _config(tiny_llama, **{
        "model.quantization": 4, "train.learning-rate-max": 1e-7, "train.learning-rate-min": 1e-7,
    })
    received, _ = adapters.initial_adapter(config.model)
    round_1, _ = training.train_adapter(config, received, 2, 50, server_round=1)
    a_keys = [key for key in received if "lora_A" in key]
    b_keys = [key for key in received if "lora_B" in key]
    assert all(round_1[key].dtype == torch.float32 for key in round_1)
    # two Adam steps at LR 1e-7 move a weight by ~1e-7; bf16 rounding of |A| ~ 0.1 would be ~1e-4
    assert max((round_1[key] - received[key]).abs().max().item() for key in a_keys + b_keys) < 1e-6
    assert any(round_1[key].abs().max() > 0 for key in b_keys)

    round_2, _ = training.train_adapter(config, round_1, 2, 50, server_round=2)
    moved = [(round_2[key] - round_1[key]).abs().max().item() for key in a_keys]
    assert max(moved) > 0, "A did not move: its update was lost to rounding"
    assert max(moved) < 1e-5, "A moved by more than Adam's ~lr steps: it was rounded"
    cached = models.cached_peft_model(config.model)
    assert all(p.dtype == torch.float32 for p in cached.parameters() if p.requires_grad)


def test_4bit_defaults_are_the_references_precision(tiny_model):
    default = ModelConfig(name=str(tiny_model))
    settings = models.quantization_config(4, default.compute_dtype)
    assert default.compute_dtype == "float32" and settings.bnb_4bit_compute_dtype == torch.float32
    assert settings.bnb_4bit_quant_type == "fp4" and settings.load_in_4bit  # BitsAndBytesConfig(load_in_4bit=True)
    assert models.load_dtype(default) == torch.bfloat16  # then prepare_model_for_kbit_training -> fp32
    fast = models.quantization_config(4, "bfloat16")
    assert fast.bnb_4bit_compute_dtype == torch.bfloat16
    model = models.build_peft_model(ModelConfig(name=str(tiny_model), quantization=4))
    assert model.config.use_cache is False  # gradient checkpointing, as the reference
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.dtype.is_floating_point and p.ndim == 1)


def test_precision_flags_reach_the_trainer_exactly_as_configured(tiny_model):
    default = sft_arguments(_config(tiny_model).train, 1e-4, "out", cuda=True)
    assert default["bf16"] is False and default["fp16"] is False  # absent = off, as the reference
    chosen = sft_arguments(_config(tiny_model, **{"train.training-arguments.bf16": True}).train, 1e-4, "out", cuda=True)
    assert chosen["bf16"] is True
    with pytest.raises(ConfigError, match="'model.compute-dtype' = 'float16' is not allowed; allowed: float32 or bfloat16"):
        _config(tiny_model, **{"model.compute-dtype": "float16"})


def reference_alpaca_ids(tokenizer, row, seq_length):
    """The reference's example, derived independently: `formatting_prompts_func` text, tokenized
    whole by trl 0.8 (special tokens on, truncated), labels from DataCollatorForCompletionOnlyLM
    (`encode("\\n### Response:")[2:]`, the last match, everything up to its end masked)."""
    header = ("Below is an instruction that describes a task. "
              "Write a response that appropriately completes the request.")
    text = f"{header}\n### Instruction:\n{row['instruction'] + ' ' + row['input']}\n### Response: {row['output']}"
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=seq_length)["input_ids"]
    template = tokenizer.encode("\n### Response:", add_special_tokens=False)[2:]
    start = None
    for index in range(len(ids)):
        if ids[index:index + len(template)] == template:
            start = index
    labels = [-100] * len(ids) if start is None else [-100] * (start + len(template)) + ids[start + len(template):]
    return ids, labels


@pytest.mark.parametrize("seq_length", [512, 40])
def test_alpaca_examples_are_the_references_token_for_token(tiny_model, seq_length):
    tokenizer = load_tokenizer(str(tiny_model))
    for row in synthetic.fingpt_rows(20, seed=9):
        example = PROMPT_FORMATS["alpaca"].tokenize(tokenizer, row, seq_length)
        ids, labels = reference_alpaca_ids(tokenizer, row, seq_length)
        assert example["input_ids"] == ids
        assert [t if m else -100 for t, m in zip(example["input_ids"], example["completion_mask"])] == labels
        assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids  # BOS, no EOS
        if seq_length == 512:
            assert tokenizer.decode([t for t in labels if t != -100]).strip() == row["output"]


def test_alpaca_ids_are_pinned_for_the_tiny_tokenizer(tiny_model):
    """The exact ids of one example, so a tokenizer or formatting change cannot pass unnoticed."""
    tokenizer = load_tokenizer(str(tiny_model))
    row = {"instruction": "What is the sentiment?", "input": "Profit rose.", "output": "positive"}
    example = PROMPT_FORMATS["alpaca"].tokenize(tokenizer, row, 512)
    text = tokenizer.decode(example["input_ids"], skip_special_tokens=False)
    assert text.startswith("<s>") and text.endswith("### Response: positive")
    label_ids = [t for t, m in zip(example["input_ids"], example["completion_mask"]) if m]
    assert label_ids == tokenizer(" positive", add_special_tokens=False)["input_ids"]


def test_answer_format_closes_the_label_with_eos(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    example = PROMPT_FORMATS["answer"].tokenize(tokenizer, {"instruction": "i", "input": "x", "output": "positive"}, 512)
    assert example["input_ids"][-1] == tokenizer.eos_token_id and example["completion_mask"][-1] == 1


@pytest.mark.parametrize(
    ("overrides", "seeds"),
    [
        ({}, [None, None, None]),  # off: the trainer's seed shuffles the same way every round
        ({"train.dynamic-data-seed": True}, [42, 43, 44]),
        ({"train.dynamic-data-seed": True, "train.training-arguments.seed": 7}, [7, 8, 9]),
    ],
)
def test_dynamic_data_seed_reshuffles_each_round_as_the_reference(tiny_model, overrides, seeds):
    config = _config(tiny_model, **overrides)
    assert [sft_arguments(config.train, 1e-4, "o", False, r).get("data_seed") for r in (1, 2, 3)] == seeds


def _first_batch(config, server_round):
    from flowertune_finance.proximal import ProximalSFTTrainer

    examples, tokenizer = training.tokenized_partition(config, 4, 50)
    trainer = ProximalSFTTrainer(
        model=models.cached_peft_model(config.model), args=training.sft_config(config, 1e-4, "unused", server_round),
        train_dataset=examples, processing_class=tokenizer, proximal_mu=0.0,
    )
    return next(iter(trainer.get_train_dataloader()))["input_ids"].tolist()


def test_the_trainer_samples_the_partition_by_the_rounds_data_seed(tiny_model):
    fixed = _config(tiny_model)
    assert _first_batch(fixed, 1) == _first_batch(fixed, 2)
    dynamic = _config(tiny_model, **{"train.dynamic-data-seed": True})
    assert _first_batch(dynamic, 1) == _first_batch(fixed, 1)  # round 1: seed + 0
    assert _first_batch(dynamic, 2) != _first_batch(dynamic, 1)


def test_local_epochs_train_the_whole_partition(tiny_model):
    config = _config(tiny_model, **{
        "train.training-arguments.max-steps": -1, "train.training-arguments.num-train-epochs": 2,
    })
    adapter, _ = adapters.initial_adapter(config.model)
    _, metrics = training.train_adapter(config, adapter, 1, 250, server_round=1)  # a 10-row partition
    assert metrics["num-examples"] == 10 and metrics["train-steps"] == 2 * 3  # ceil(10 / batch 4) per epoch
    with pytest.raises(ConfigError, match="max-steps' = 0 is out of range"):
        _config(tiny_model, **{"train.training-arguments.max-steps": 0})
