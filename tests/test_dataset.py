"""Partitions, prompt/completion formatting, and a loss that covers only the completion."""

from __future__ import annotations

import json

import pytest

from flowertune_finance.dataset import (
    DataError,
    column_values,
    load_partition,
    load_tokenizer,
    tokenize_partition,
    validate_data_file,
)
from flowertune_finance.dev import synthetic
from flowertune_finance.dev.launch import SAMPLE_DATA
from flowertune_finance.prompts import format_prompt, tokenize_prompt_then_label

INSTRUCTION = synthetic.INSTRUCTION_NEWS
TEXT = "Alder Corp posted strong sales."


def test_alpaca_prompt_is_the_upstream_template():
    assert format_prompt(INSTRUCTION, TEXT, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n### Instruction:\n{INSTRUCTION} {TEXT}\n### Response:"
    )


def test_answer_prompt_is_the_evaluation_prompt():
    assert format_prompt(INSTRUCTION, TEXT, "answer") == f"Instruction: {INSTRUCTION}\nInput: {TEXT}\nAnswer: "


def test_answer_prompt_tokens_are_exactly_what_an_evaluator_feeds(tiny_model):
    """(alpaca's tokens are the reference's, whole-text: tests/test_reference_parity.py)"""
    tokenizer = load_tokenizer(str(tiny_model))
    prompt = format_prompt(INSTRUCTION, TEXT, "answer")
    example = tokenize_prompt_then_label(tokenizer, prompt, "positive", 512)
    prompt_ids = tokenizer(prompt)["input_ids"]
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids
    assert example["completion_mask"] == [0] * n + [1] * (len(example["input_ids"]) - n)
    completion_ids = example["input_ids"][n:]
    assert completion_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(completion_ids[:-1]).strip() == "positive"


def test_sft_trainer_computes_loss_only_on_completion_tokens(tiny_model):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from flowertune_finance.config import ModelConfig
    from flowertune_finance.models import build_peft_model

    tokenizer = load_tokenizer(str(tiny_model))
    rows = synthetic.fingpt_rows(6, seed=1)

    examples = tokenize_partition(Dataset.from_list(rows), tokenizer, "answer", seq_length=128)
    model = build_peft_model(ModelConfig(name=str(tiny_model), quantization=0, gradient_checkpointing=False))
    args = SFTConfig(output_dir="unused", per_device_train_batch_size=6, use_cpu=True, bf16=False, report_to="none",
                     completion_only_loss=True, max_length=128)
    trainer = SFTTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trained_texts = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [token for token, label in zip(ids, labels) if label != -100]
        assert trained[-1] == tokenizer.eos_token_id
        trained_texts.append(tokenizer.decode(trained[:-1]))
    # the loss sees each example's label and EOS, and nothing of its prompt
    assert sorted(trained_texts) == sorted(row["output"] for row in rows)


def test_iid_partitions_of_the_full_dataset_size(tmp_path):
    rows = 76_772  # rows of flwrlabs/fingpt-sentiment-train
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"instruction": "i", "input": str(i), "output": "o"}) + "\n" for i in range(rows)))
    sizes, seen = [], set()
    for partition_id in range(50):
        partition = load_partition(partition_id, 50, "unused", str(path))
        sizes.append(len(partition))
        seen.update(*column_values(partition, "input"))
    assert sum(sizes) == rows and set(sizes) == {1535, 1536}
    assert len(seen) == rows  # disjoint and complete


def test_sample_data_partitions_for_50_supernodes():
    assert len(validate_data_file(SAMPLE_DATA)) == 2500
    partition = load_partition(7, 50, "unused", str(SAMPLE_DATA))
    assert len(partition) == 50 and partition.column_names == ["instruction", "input", "output"]


def test_partition_id_out_of_range_is_an_error():
    with pytest.raises(DataError, match="partition-id 50 is out of range for num-partitions 50"):
        load_partition(50, 50, "unused", str(SAMPLE_DATA))


def test_data_file_without_a_required_column_is_named(tmp_path):
    path = tmp_path / "no-output.jsonl"
    path.write_text(json.dumps({"instruction": "i", "input": "x", "label": "positive"}) + "\n")
    with pytest.raises(DataError, match=r"no-output.jsonl.*lacks column\(s\) output"):
        validate_data_file(path)


def test_data_file_with_a_blank_output_names_the_row(tmp_path):
    rows = synthetic.fingpt_rows(5, seed=3)
    rows[3]["output"] = " "
    path = synthetic.write_jsonl(rows, tmp_path / "blank.jsonl")
    with pytest.raises(DataError, match="first at row 3"):
        validate_data_file(path)


def test_data_file_with_an_unsupported_suffix_is_named(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\n")
    with pytest.raises(DataError, match=r"suffix '.csv'; allowed: .json, .jsonl, .parquet"):
        validate_data_file(path)
