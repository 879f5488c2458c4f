"""Leaderboard evaluation: loaders, prompt, parsing, batching, files, CLI, errors, server-side eval.

All offline: the data sets are small `save_to_disk` folders in the hub schemas written by
`synthetic.write_eval_sets`, whose labels follow from each sentence's phrase, so a loader
that used the wrong label map or split would disagree with the text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
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

from flowertune_finance import cli
from flowertune_finance.dev import synthetic
from flowertune_finance.dev.tiny import build_tiny_model
from flowertune_finance.generation import EvalError, check_adapter, load_model
from flowertune_finance.leaderboard import fiqa_label, parse_label
from flowertune_finance.metrics import ReplyMetric, read_metrics
from flowertune_finance.prompts import format_prompt
from flowertune_finance.scoring import answer_text, generate_answers, load_eval_set
from flowertune_finance.server_app import RoundRecorder, start_run
from flowertune_finance.server_eval import ServerEvaluator
from flowertune_finance.strategy import RoundStats, build_strategy
from flowertune_finance.tools import evaluate
from flowertune_finance.tools.evaluate import evaluate_adapter

ROWS = 24  # per set: FPB and FiQA test splits get 6 rows, TFNS validation 24
NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Generation of a tiny model: one thread is as fast as two alone, and ~25x faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_eval_sets(tmp_path_factory.mktemp("eval-data"), rows_per_set=ROWS)


@pytest.fixture(scope="module")
def long_eval_data(eval_data, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same sets with each text repeated to ~440 tokens (prompts of ~470-505 tokens), so that
    protocol answers (512 tokens minus the chunk's longest prompt) stay a few tokens long on a CPU."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    folder = tmp_path_factory.mktemp("long-eval-data")
    for name, column in (("fpb", "sentence"), ("fiqa", "sentence"), ("tfns", "text")):
        def lengthen(row: dict, column: str = column) -> dict:
            repeats = 440 // len(tokenizer(row[column])["input_ids"])
            while len(tokenizer(" ".join([row[column]] * repeats))["input_ids"]) > 440:
                repeats -= 1  # joined copies can tokenize longer than apart
            return {column: " ".join([row[column]] * repeats)}

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


def official_script_answers(model_dir: Path, contexts: list[str], batch_size: int) -> tuple[list[str], list[int]]:
    """The leaderboard's finance eval.py + benchmarks.inference, written out plainly (quantization aside).

    Returns each example's out_text and each chunk's generated length (prompt + answer tokens).
    """
    torch.manual_seed(2024)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.pad_token or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        model.resize_token_embeddings(len(tokenizer))
    model = model.eval()
    last_batch = len(contexts) % batch_size
    total_steps = len(contexts) // batch_size + 1
    out_text_list, chunk_lengths = [], []
    with torch.no_grad():
        for i in range(total_steps):
            idx_s = i * batch_size
            tmp_context = (contexts[idx_s:idx_s + last_batch] if i == total_steps - 1
                           else contexts[idx_s:idx_s + batch_size])
            if tmp_context:
                tokens = tokenizer(tmp_context, return_tensors="pt", padding=True, max_length=512,
                                   return_token_type_ids=False)
                res = model.generate(**tokens, max_length=512, eos_token_id=tokenizer.eos_token_id)
                chunk_lengths.append(res.shape[1])
                res_sentences = [tokenizer.decode(row, skip_special_tokens=True) for row in res]
                out_text_list += [o.split("Answer: ")[1] if len(o.split("Answer: ")) > 1 else "None"
                                  for o in res_sentences]
    return out_text_list, chunk_lengths


def change_target(x: str) -> str:
    """The leaderboard's label rule, restated."""
    if "positive" in x or "Positive" in x:
        return "positive"
    if "negative" in x or "Negative" in x:
        return "negative"
    return "neutral"


@pytest.fixture(scope="module")
def varied_eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TFNS-schema set of 15 tweets, 1 to 25 sentences long: within each chunk of 7 the prompts
    differ by up to ~300 tokens, so the chunk's longest prompt decides how long its answers run."""
    sentences = [text for text, _ in synthetic.sentences(60, seed=5)]
    texts = [" ".join(sentences[i:i + 1 + (i * 7) % 25]) for i in range(15)]
    split = datasets.Dataset.from_dict({"text": texts, "label": [i % 3 for i in range(15)]})
    folder = tmp_path_factory.mktemp("varied-eval-data")
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(folder / "tfns"))
    return folder


def test_protocol_mode_is_the_official_computation_at_batch_size_7(tiny_model, varied_eval_data, tmp_path):
    rows = datasets.load_from_disk(str(varied_eval_data / "tfns"))["validation"]
    contexts = [f"Instruction: {TWEET}\nInput: {text}\nAnswer: " for text in rows["text"]]
    official, chunk_lengths = official_script_answers(tiny_model, contexts, batch_size=7)
    # the random model keeps talking: answers run into the 512-token limit of their chunk
    assert len(official) == 15 and chunk_lengths == [512, 512, 512]
    assert sum(len(text) for text in official) / 15 > 200

    out = tmp_path / "out"
    summary = evaluate_adapter(str(tiny_model), None, ["tfns"], data_dir=str(varied_eval_data), batch_size=7,
                               quantization=0, output_dir=str(out), run_name="b7")
    answers = [json.loads(line) for line in (out / "answers_tfns_b7.jsonl").read_text().splitlines()]
    assert [a["out_text"] for a in answers] == official
    assert [a["context"] for a in answers] == contexts
    records = [json.loads(line) for line in (out / "generation_tfns_b7.jsonl").read_text().splitlines()]
    assert all(list(r) == ["context", "new_target", "new_out"] for r in records)
    assert [r["new_out"] for r in records] == [change_target(text) for text in official]
    gold = [change_target({0: "negative", 1: "positive", 2: "neutral"}[label]) for label in rows["label"]]
    accuracy = sum(g == change_target(text) for g, text in zip(gold, official)) / 15
    assert (out / "acc_tfns_b7.txt").read_text() == f"Accuracy: {accuracy}. "
    assert summary["tfns"] == accuracy
    assert {key: summary[key] for key in ("mode", "quantization", "batch_size", "peft_path", "adapter_sha256")} == {
        "mode": "protocol", "quantization": 0, "batch_size": 7, "peft_path": None, "adapter_sha256": None}
    assert summary["base_model"] == str(tiny_model)

    # the order matters: chunks cut from the prompts sorted by length give other answers
    order = sorted(range(15), key=lambda i: len(contexts[i]), reverse=True)
    by_length, _ = official_script_answers(tiny_model, [contexts[i] for i in order], batch_size=7)
    assert [by_length[order.index(i)] for i in range(15)] != official


def long_prompt(tokenizer, min_tokens: int) -> str:
    """A tweet prompt of at least `min_tokens` tokens: near 512, generation stays short."""
    sentences = [text for text, _ in synthetic.sentences(200, seed=3)]
    for count in range(1, len(sentences)):
        prompt = format_prompt(TWEET, " ".join(sentences[:count]), "answer")
        if len(tokenizer(prompt)["input_ids"]) >= min_tokens:
            return prompt
    raise AssertionError("not enough text")


def test_fast_mode_does_not_depend_on_batching(loaded_tiny, eval_data):
    """In float64: padding changes the float32 rounding of a random model's logits, whose top two are often
    within that rounding, so exact equality would test the rounding; float64 leaves only fast mode's logic."""
    model, tokenizer = loaded_tiny
    model = copy.deepcopy(model).double()
    prompts = load_eval_set("fiqa", eval_data).prompts[:3] + load_eval_set("tfns", eval_data).prompts[:4]
    fast = generate_answers(model, tokenizer, prompts, batch_size=1, mode="fast")
    assert fast == generate_answers(model, tokenizer, prompts, batch_size=7, mode="fast")
    assert all(text.startswith(prompt.rstrip()) and len(text) > len(prompt) for text, prompt in zip(fast, prompts))
    # alone (no padding), protocol decoding of the tiny model is greedy too: fast mode stops it early
    prompt = long_prompt(tokenizer, 485)
    full = generate_answers(model, tokenizer, [prompt], batch_size=1, mode="protocol")[0]
    early = generate_answers(model, tokenizer, [prompt], batch_size=1, mode="fast")[0]
    assert full.startswith(early.rstrip("\ufffd")) and len(full) > len(early)


def test_eval_cli_end_to_end_on_the_smoke_checkpoint(smoke_run, long_eval_data, tmp_path):
    _, smoke_dir = smoke_run
    tiny_model = json.loads((smoke_dir / "run_config.json").read_text())["model.name"]  # the smoke's base model
    run_dir = tmp_path / "run"  # a copy: the shared smoke run stays untouched; results go to run_dir/eval
    shutil.copytree(smoke_dir / "peft_3", run_dir / "peft_3")
    command = Path(sys.executable).with_name("flowertune-finance")
    result = subprocess.run(
        [str(command), "eval", "--base-model-name-path", str(tiny_model), "--peft-path", str(run_dir / "peft_3"),
         "--run-name", "smoke", "--batch-size", "32", "--quantization", "0", "--datasets", "fpb,fiqa,tfns",
         "--data-dir", str(long_eval_data)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "eval"
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
        answers = [json.loads(line) for line in (out / f"answers_{name}_smoke.jsonl").read_text().splitlines()]
        assert [a["context"] for a in answers] == [r["context"] for r in records]
        assert [parse_label(a["out_text"]) for a in answers] == [r["new_out"] for r in records]
        assert [parse_label(a["target"]) for a in answers] == [r["new_target"] for r in records]
    assert summary["average"] == pytest.approx(sum(summary[n] for n in ("fpb", "fiqa", "tfns")) / 3)
    weights = (run_dir / "peft_3" / "adapter_model.safetensors").read_bytes()
    assert {key: summary[key] for key in ("mode", "quantization", "batch_size", "peft_path", "base_model",
                                          "adapter_sha256")} == {
        "mode": "protocol", "quantization": 0, "batch_size": 32, "peft_path": str((run_dir / "peft_3").resolve()),
        "base_model": str(tiny_model), "adapter_sha256": hashlib.sha256(weights).hexdigest()}
    assert "average" in result.stdout and str(out.resolve()) in result.stdout


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one `error:` line on stderr."""
    capsys.readouterr()  # drop what came before
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_fail_before_any_model_loads(tiny_model, eval_data, tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # loading it would fail differently: checks come first
    with pytest.raises(EvalError, match=r"unknown dataset\(s\) fpbb; allowed: fpb, fiqa, tfns"):
        evaluate_adapter(missing_model, None, ["fpbb"], data_dir=str(eval_data))
    with pytest.raises(EvalError, match="--peft-path .*no such folder"):
        evaluate_adapter(missing_model, str(tmp_path / "missing"), data_dir=str(eval_data))
    with pytest.raises(EvalError, match="--mode 'slow'"):
        evaluate_adapter(missing_model, None, data_dir=str(eval_data), mode="slow")
    for bad_name in ("", " ", "a/b", "../x", "a\\b"):
        with pytest.raises(EvalError, match="--run-name .* is not allowed"):
            evaluate_adapter(missing_model, None, data_dir=str(eval_data), run_name=bad_name)

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

    # each of these is one line from the command, no traceback
    out = ["--output-dir", str(tmp_path / "cli-out")]
    offline = ["--quantization", "0", "--datasets", "fpb", "--data-dir", str(eval_data), *out]
    assert "--run-name 'a/b' is not allowed" in one_line_error(
        capsys, ["eval", "--base-model-name-path", str(tiny_model), "--run-name", "a/b", *offline])
    assert f"--base-model-name-path {missing_model!r}: no such folder" in one_line_error(
        capsys, ["eval", "--base-model-name-path", missing_model, *offline])
    (tmp_path / "empty" / "fpb").mkdir(parents=True)
    assert "is not a datasets.save_to_disk folder for fpb" in one_line_error(
        capsys, ["eval", "--base-model-name-path", str(tiny_model), "--quantization", "0", "--datasets", "fpb",
                 "--data-dir", str(tmp_path / "empty"), *out])
    adapter = tmp_path / "truncated"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, task_type="CAUSAL_LM")
                   ).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    assert "cannot be read (truncated or not an adapter file)" in one_line_error(
        capsys, ["eval", "--base-model-name-path", str(tiny_model), "--peft-path", str(adapter), *offline])
    assert not (tmp_path / "cli-out").exists()  # nothing was created for runs that could not start


def test_output_folder_is_ready_before_the_model_loads(tiny_model, eval_data, tmp_path, monkeypatch):
    seen = []

    def stop(*args, **kwargs):
        seen.append(sorted(p.name for p in output.iterdir()))
        raise RuntimeError("model load reached")

    monkeypatch.setattr(evaluate, "load_model", stop)
    output = tmp_path / "new" / "nested"
    with pytest.raises(RuntimeError, match="model load reached"):
        evaluate_adapter(str(tiny_model), None, ["fpb"], data_dir=str(eval_data), quantization=0,
                         output_dir=str(output))
    assert seen == [[]]  # created and written to (the probe file is gone again)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(EvalError, match="--output-dir .*a-file.* is not a writable folder"):
        evaluate_adapter(str(tiny_model), None, ["fpb"], data_dir=str(eval_data), quantization=0,
                         output_dir=str(blocker))
    assert seen == [[]]


def test_each_set_is_written_as_soon_as_it_is_scored(tiny_model, eval_data, tmp_path, monkeypatch):
    real_score_set = evaluate.score_set

    def fail_on_fiqa(model, tokenizer, eval_set, *args):
        if eval_set.name == "fiqa":
            raise RuntimeError("interrupted")
        return real_score_set(model, tokenizer, eval_set, *args)

    monkeypatch.setattr(evaluate, "score_set", fail_on_fiqa)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_adapter(str(tiny_model), None, ["fpb", "fiqa"], data_dir=str(eval_data), mode="fast",
                         quantization=0, output_dir=str(tmp_path), run_name="r", limit=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "acc_fpb_r.txt", "answers_fpb_r.jsonl", "generation_fpb_r.jsonl"]
    monkeypatch.setattr(evaluate, "score_set", real_score_set)
    summary = evaluate_adapter(str(tiny_model), None, ["fiqa"], data_dir=str(eval_data), mode="fast",
                               quantization=0, output_dir=str(tmp_path), run_name="r", limit=3)
    assert list(summary["counts"]) == ["fiqa"] and (tmp_path / "acc_fiqa_r.txt").is_file()
    assert (tmp_path / "summary_r.json").is_file()


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


def tiny_adapter(tiny_model: Path, folder: Path, recorded_base: str) -> Path:
    """A LoRA adapter of the tiny model whose adapter_config.json names `recorded_base` as its base."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = recorded_base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


CHECK_BY_HUB_ID = """
import json, sys
from flowertune_finance.generation import EvalError, check_adapter
outcomes = []
for adapter in sys.argv[1:]:
    try:
        outcomes.append(check_adapter("testorg/tiny-mistral", adapter).name)
    except EvalError as error:
        outcomes.append(f"EvalError: {error}")
print(json.dumps(outcomes))
"""


def test_adapter_trained_from_a_local_folder_is_checked_against_the_hub_id_given(tiny_model, tmp_path):
    # The tiny model as the hub cache holds a downloaded model: offline, "testorg/tiny-mistral" resolves to it.
    repo = tmp_path / "hub" / "models--testorg--tiny-mistral"
    commit = "0" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # trained on another machine from a local copy of the same model: that folder does not exist here
    same = tiny_adapter(tiny_model, tmp_path / "same", "/srv/models/tiny-mistral")
    other = build_tiny_model(tmp_path / "other", hidden_size=32)
    different = tmp_path / "different"
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=4, task_type="CAUSAL_LM")).save_pretrained(
        different)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK_BY_HUB_ID, str(same), str(different)],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    fits, refused = json.loads(result.stdout.strip().splitlines()[-1])
    assert fits == "adapter_model.safetensors"
    assert re.match(r"EvalError: adapter .* does not fit base model 'testorg/tiny-mistral': tensor .*lora_A", refused)


def test_local_base_models_must_share_the_config_fingerprint(tiny_model, tmp_path):
    # a variant whose LoRA target shapes (q_proj, v_proj) are the same: only the fingerprint can tell
    variant = tmp_path / "variant"
    shutil.copytree(tiny_model, variant)
    config = json.loads((variant / "config.json").read_text())
    assert (config["intermediate_size"], config["vocab_size"]) == (128, 1024)
    config.update(intermediate_size=256, vocab_size=1088)
    (variant / "config.json").write_text(json.dumps(config))
    adapter = tiny_adapter(tiny_model, tmp_path / "adapter", str(variant))
    assert check_adapter(str(variant), adapter).name == "adapter_model.safetensors"
    with pytest.raises(EvalError, match=r"trained on .*variant.*, whose config differs from --base-model-name-path "
                                        r".*: vocab_size 1088 vs 1024, intermediate_size 256 vs 128$"):
        check_adapter(str(tiny_model), adapter)
    tiny_adapter(tiny_model, adapter, str(tmp_path / "gone"))  # recorded folder absent: shapes alone decide
    assert check_adapter(str(tiny_model), adapter).name == "adapter_model.safetensors"


def test_write_eval_sets_reports_what_it_wrote(tmp_path, capsys):
    bars_disabled_before = datasets.utils.are_progress_bars_disabled()  # earlier tests may have changed it
    synthetic.write_eval_sets(tmp_path, rows_per_set=10, datasets=("fpb", "tfns"))
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"wrote {tmp_path / 'fpb'}: 3 test examples under the protocol's split",
        f"wrote {tmp_path / 'tfns'}: 10 test examples under the protocol's split",
    ]
    assert "Saving the dataset" not in captured.err
    assert [len(load_eval_set(name, tmp_path).prompts) for name in ("fpb", "tfns")] == [3, 10]
    assert datasets.utils.are_progress_bars_disabled() == bars_disabled_before  # the caller's setting is restored


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
        strategy.rounds[server_round] = RoundStats(round=server_round, started=time.time(), sampled=5, replied=5,
                                                   train_metrics=MetricRecord({ReplyMetric.TRAIN_LOSS: 1.0}))
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
