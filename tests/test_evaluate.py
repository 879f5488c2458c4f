"""Leaderboard evaluation: loaders, prompt, parsing, batching, files, CLI, errors, server-side eval.

All offline: the data sets are small `save_to_disk` folders in the hub schemas written by
`synthetic.write_eval_sets`, whose labels follow from each sentence's phrase, so a loader
that used the wrong label map or split would disagree with the text.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import smoke_config
from flwr.app import ArrayRecord, MetricRecord
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from flowertune_finance import cli, synthetic
from flowertune_finance.dataset import format_prompt
from flowertune_finance.evaluate import (
    EvalError,
    answer_text,
    evaluate_adapter,
    fiqa_label,
    generate_answers,
    load_eval_set,
    parse_label,
)
from flowertune_finance.generation import check_adapter, load_model
from flowertune_finance.metrics import read_metrics
from flowertune_finance.server_app import RoundRecorder, start_run
from flowertune_finance.server_eval import ServerEvaluator
from flowertune_finance.strategy import RoundStats, build_strategy
from flowertune_finance.tiny import build_tiny_model

ROWS = 24  # per set: FPB and FiQA test splits get 6 rows, TFNS validation 24
NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_eval_sets(tmp_path_factory.mktemp("eval-data"), rows_per_set=ROWS)


@pytest.fixture(scope="module")
def long_eval_data(eval_data, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same sets with each text repeated to ~490 prompt tokens, so that protocol answers
    (512 tokens minus the prompt) stay a few tokens long on a CPU."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    folder = tmp_path_factory.mktemp("long-eval-data")
    for name, column in (("fpb", "sentence"), ("fiqa", "sentence"), ("tfns", "text")):
        def lengthen(row: dict) -> dict:
            return {column: " ".join([row[column]] * (465 // len(tokenizer(row[column])["input_ids"])))}

        datasets.load_from_disk(str(eval_data / name)).map(lengthen).save_to_disk(str(folder / name))
    return folder


@pytest.fixture(scope="module")
def loaded_tiny(tiny_model):
    return load_model(str(tiny_model), None, quantization=0)


def phrase_label(sentence: str) -> str:
    """The label the synthetic sentence's phrase stands for."""
    return next(label for label, phrases in synthetic.PHRASES.items() if any(p in sentence for p in phrases))


def test_loaders_build_the_protocol_splits_prompts_and_labels(eval_data):
    fpb_raw = datasets.load_from_disk(str(eval_data / "fpb"))["train"]
    fpb = load_eval_set("fpb", eval_data)
    expected = fpb_raw.train_test_split(0.25, seed=42)["test"]["sentence"]
    assert len(fpb.prompts) == 6 and expected != fpb_raw["sentence"][:6]
    assert fpb.prompts == [f"Instruction: {NEWS}\nInput: {s}\nAnswer: " for s in expected]
    assert fpb.prompts == [format_prompt(NEWS, s, "answer") for s in expected]  # the training prompt, exactly
    assert fpb.targets == [phrase_label(s) for s in expected]

    fiqa_raw = datasets.load_from_disk(str(eval_data / "fiqa"))
    all_rows = datasets.concatenate_datasets([fiqa_raw["train"], fiqa_raw["validation"], fiqa_raw["test"]])
    test_rows = all_rows.train_test_split(0.25, seed=42)["test"]
    fiqa = load_eval_set("fiqa", eval_data)
    assert len(fiqa.prompts) == 6
    for prompt, target, row in zip(fiqa.prompts, fiqa.targets, test_rows):
        assert prompt == format_prompt(TWEET if row["format"] == "post" else NEWS, row["sentence"], "answer")
        assert target == phrase_label(row["sentence"])
    assert {row["format"] for row in test_rows} == {"post", "headline"}
    assert [fiqa_label(s) for s in (-0.1001, -0.1, 0.0999, 0.1)] == ["negative", "neutral", "neutral", "positive"]

    tfns_raw = datasets.load_from_disk(str(eval_data / "tfns"))["validation"]
    tfns = load_eval_set("tfns", eval_data)
    assert tfns.prompts == [format_prompt(TWEET, text, "answer") for text in tfns_raw["text"]]
    assert tfns.targets == [phrase_label(text) for text in tfns_raw["text"]]
    assert {0: "negative", 1: "positive", 2: "neutral"} == dict(zip(tfns_raw["label"], tfns.targets))
    assert load_eval_set("tfns", eval_data, limit=5).prompts == tfns.prompts[:5]


@pytest.mark.parametrize(
    ("generated", "answer", "label"),
    [
        ("Instruction: i\nInput: t\nAnswer: positive", "positive", "positive"),
        ("Instruction: i\nInput: t\nAnswer: Negative.", "Negative.", "negative"),
        ("Instruction: i\nInput: t\nAnswer: moderately negative", "moderately negative", "negative"),
        ("Instruction: i\nInput: t\nAnswer: negative, not positive", "negative, not positive", "positive"),
        ("Instruction: i\nInput: t\nAnswer: NEGATIVE", "NEGATIVE", "neutral"),
        ("Instruction: i\nInput: t\nAnswer: ", "", "neutral"),
        ("Instruction: i\nInput: t\nAnswer:positive", "None", "neutral"),
        ("the model rewrote everything, positive", "None", "neutral"),
        ("Instruction: i\nAnswer: neutral\nInput: x\nAnswer: positive", "neutral\nInput: x\n", "neutral"),
    ],
)
def test_parsing_follows_the_leaderboard_rule(generated, answer, label):
    assert answer_text(generated) == answer
    assert parse_label(answer_text(generated)) == label


def long_prompt(tokenizer, min_tokens: int) -> str:
    """A tweet prompt of at least `min_tokens` tokens: near 512, protocol answers are short."""
    sentences = [text for text, _ in synthetic.sentences(200, seed=3)]
    for count in range(1, len(sentences)):
        prompt = format_prompt(TWEET, " ".join(sentences[:count]), "answer")
        if len(tokenizer(prompt)["input_ids"]) >= min_tokens:
            return prompt
    raise AssertionError("not enough text")


def test_batch_size_does_not_change_generations(loaded_tiny, eval_data):
    model, tokenizer = loaded_tiny
    # Protocol: prompts of different lengths near the 512-token limit (answer budgets of ~25
    # tokens down to 1 for a prompt already past 512) keep the full-length decoding cheap.
    long_prompts = [long_prompt(tokenizer, n) for n in (485, 497, 506, 530)]
    assert len({len(tokenizer(p)["input_ids"]) for p in long_prompts}) == 4
    one = generate_answers(model, tokenizer, long_prompts, batch_size=1, mode="protocol")
    assert one == generate_answers(model, tokenizer, long_prompts, batch_size=7, mode="protocol")
    assert all(text.startswith(prompt.rstrip()) and len(text) > len(prompt) for text, prompt in zip(one, long_prompts))

    prompts = load_eval_set("fiqa", eval_data).prompts[:3] + load_eval_set("tfns", eval_data).prompts[:4]
    fast = generate_answers(model, tokenizer, prompts, batch_size=1, mode="fast")
    assert fast == generate_answers(model, tokenizer, prompts, batch_size=7, mode="fast")
    # fast mode stops the same greedy decoding early: its answer starts the protocol answer
    early = generate_answers(model, tokenizer, long_prompts[:1], batch_size=1, mode="fast")[0]
    assert one[0].startswith(early.rstrip("\ufffd")) and len(one[0]) > len(early)


def test_eval_cli_end_to_end_on_the_smoke_checkpoint(smoke_run, tiny_model, long_eval_data, tmp_path):
    _, run_dir = smoke_run
    command = Path(sys.executable).with_name("flowertune-finance")
    out = tmp_path / "benchmarks"
    result = subprocess.run(
        [str(command), "eval", "--base-model-name-path", str(tiny_model), "--peft-path", str(run_dir / "peft_3"),
         "--run-name", "smoke", "--batch-size", "32", "--quantization", "0", "--datasets", "fpb,fiqa,tfns",
         "--data-dir", str(long_eval_data), "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary_smoke.json").read_text())
    for name, count in {"fpb": 6, "fiqa": 6, "tfns": ROWS}.items():
        acc_text = (out / f"acc_{name}_smoke.txt").read_text()
        match = re.fullmatch(r"Accuracy: (\S+)\. ", acc_text)
        assert match, acc_text
        lines = (out / f"generation_{name}_smoke.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == count and all(list(r) == ["context", "new_target", "new_out"] for r in records)
        assert [r["context"] for r in records] == load_eval_set(name, long_eval_data).prompts
        recomputed = sum(r["new_target"] == r["new_out"] for r in records) / count
        assert float(match.group(1)) == recomputed == summary[name]
        assert summary["counts"][name] == count
    assert summary["average"] == pytest.approx(sum(summary[n] for n in ("fpb", "fiqa", "tfns")) / 3)
    assert "average" in result.stdout


def test_bad_inputs_fail_before_any_model_loads(tiny_model, eval_data, tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # loading it would fail differently: checks come first
    with pytest.raises(EvalError, match=r"unknown dataset\(s\) fpbb; allowed: fpb, fiqa, tfns"):
        evaluate_adapter(missing_model, None, ["fpbb"], data_dir=str(eval_data))
    with pytest.raises(EvalError, match="--peft-path .*no such folder"):
        evaluate_adapter(missing_model, str(tmp_path / "missing"), data_dir=str(eval_data))
    with pytest.raises(EvalError, match="--mode 'slow'"):
        evaluate_adapter(missing_model, None, data_dir=str(eval_data), mode="slow")

    broken = tmp_path / "broken"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"], "label": [0]})}).save_to_disk(
        str(broken / "tfns"))
    with pytest.raises(EvalError, match="lacks split 'validation'"):
        evaluate_adapter(missing_model, None, ["tfns"], data_dir=str(broken))
    fiqa = datasets.load_from_disk(str(eval_data / "fiqa"))
    datasets.DatasetDict({k: v.remove_columns("format") for k, v in fiqa.items()}).save_to_disk(str(broken / "fiqa"))
    with pytest.raises(EvalError, match="lacks column\\(s\\) format"):
        evaluate_adapter(missing_model, None, ["fiqa"], data_dir=str(broken))
    with pytest.raises(EvalError, match="no folder .*fpb"):
        evaluate_adapter(missing_model, None, ["fpb"], data_dir=str(broken))

    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / "acc_fpb_fl.txt").write_text("Accuracy: 0.5. ")
    with pytest.raises(EvalError, match="not overwriting earlier results .*acc_fpb_fl.txt"):
        evaluate_adapter(missing_model, None, ["fpb"], data_dir=str(eval_data), output_dir=str(earlier), run_name="fl")
    assert (earlier / "acc_fpb_fl.txt").read_text() == "Accuracy: 0.5. "

    assert cli.main(["eval", "--base-model-name-path", missing_model, "--datasets", "fpb,xyz"]) == 2
    assert "unknown dataset(s) xyz" in capsys.readouterr().err


def test_adapter_for_another_base_model_is_refused(tiny_model, tmp_path):
    other = build_tiny_model(tmp_path / "other", hidden_size=32)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=4, task_type="CAUSAL_LM")).save_pretrained(
        adapter)
    with pytest.raises(EvalError, match="does not fit base model .*lora_A.weight has shape \\[4, 32\\]"):
        check_adapter(str(tiny_model), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EvalError, match="trained on 'mistralai/Mistral-7B-v0.1', not on .*Mistral-7B-v0.3"):
        check_adapter("mistralai/Mistral-7B-v0.3", adapter)
    with pytest.raises(EvalError, match="no PEFT checkpoint"):
        check_adapter(str(tiny_model), tmp_path)


def test_server_side_fast_eval_adds_eval_metrics_to_the_round_record(tiny_model, eval_data, tmp_path):
    overrides = {"eval.every-rounds": 2, "eval.num-examples": 3, "eval.data-dir": str(eval_data),
                 "num-server-rounds": 4}
    config, run, evaluator = start_run(smoke_config(tiny_model, tmp_path / "results", **overrides))
    assert isinstance(evaluator, ServerEvaluator)
    assert [evaluator.due(r) for r in (1, 2, 3, 4)] == [False, True, False, True]
    assert [len(s.prompts) for s in evaluator.sets] == [3, 3, 3]
    strategy = build_strategy(config.strategy)
    recorder = RoundRecorder(config, run, strategy, evaluator)
    for server_round in (1, 2):
        strategy.rounds[server_round] = RoundStats(round=server_round, started=time.time(),
                                                   train_metrics=MetricRecord({"train_loss": 1.0}))
        recorder(server_round, ArrayRecord(run.adapter))
    first, second = read_metrics(run.run_dir)
    assert not any(key.startswith("eval_") for key in first)
    accuracies = {k: v for k, v in second.items() if k.endswith("_accuracy")}
    assert set(accuracies) == {"eval_fpb_accuracy", "eval_fiqa_accuracy", "eval_tfns_accuracy", "eval_average_accuracy"}
    per_set = [accuracies[f"eval_{name}_accuracy"] for name in ("fpb", "fiqa", "tfns")]
    assert all(value * 3 == pytest.approx(round(value * 3)) and 0 <= value <= 1 for value in per_set)
    assert accuracies["eval_average_accuracy"] == pytest.approx(sum(per_set) / 3)
    evaluated = get_peft_model_state_dict(evaluator.model, save_embedding_layers=False)  # what got scored
    assert set(evaluated) == set(run.adapter) and all(torch.equal(evaluated[k], run.adapter[k]) for k in evaluated)
