"""Bad input is refused before any training, with a message naming the culprit, and nothing
already saved is changed.

Most cases call `server_app.start_run` in-process: it is exactly what the ServerApp does
before its first round (config, paths, data file, new or resumed run folder). Every case
runs next to a saved run (a checkpoint at round 2 of 4) and hashes the whole results folder
before and after. That a refused value fails a real `flwr run` before round 1, with the message
in its log, is shown in test_smoke_isolation.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import smoke_config
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from flowertune_finance import client_app
from flowertune_finance.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_STATE, CheckpointError
from flowertune_finance.config import ConfigError
from flowertune_finance.dataset import DataError
from flowertune_finance.server_app import RoundRecorder, start_run
from flowertune_finance.strategy import build_strategy
from flowertune_finance.worker_cache import WORKER_CACHE

REFUSALS = (ConfigError, DataError, CheckpointError)
ROUNDS = 4


def tree_hash(folder: Path) -> str:
    """Names and contents of everything under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def saved_once(tiny_model, tmp_path_factory):
    """A run saved at round 2 of 4, built once per module: `saved` hands each test its own copy."""
    results = tmp_path_factory.mktemp("saved") / "results"
    run_config = smoke_config(tiny_model, results, **{"num-server-rounds": ROUNDS, "train.save-every-round": 2})
    config, run, _ = start_run(run_config)
    for server_round in (1, 2):
        run.history.append({"round": server_round, "train_loss": 1.0})
    RoundRecorder(config, run, build_strategy(config.strategy)).save(2, ArrayRecord(run.adapter))
    return run_config, results, run.run_dir


@pytest.fixture
def saved(saved_once, tmp_path):
    """(run config, results folder, run folder) of a run saved at round 2 of 4, copied for this test
    (which may damage it)."""
    run_config, results, run_dir = saved_once
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    return {**run_config, "output.dir": str(copy)}, copy, copy / run_dir.name


def assert_refused(run_config: dict, match: str, results: Path) -> str:
    """start_run raises a refusal matching `match` and leaves `results` exactly as it was."""
    before = tree_hash(results)
    with pytest.raises(REFUSALS, match=match) as refused:
        start_run(run_config, num_partitions=50)
    assert tree_hash(results) == before, "a refused run changed what was saved"
    return str(refused.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.quantization", 3, r"'model\.quantization' = 3 .*0, 4 or 8"),
        ("model.quantization", True, r"'model\.quantization' = True has type bool; expected int"),
        ("model.lora.peft-lora-r", 0, r"'model\.lora\.peft-lora-r' = 0 .*> 0"),
        ("model.lora.peft-lora-r", "8", r"'model\.lora\.peft-lora-r' = '8' has type str; expected int"),
        ("model.lora.peft-lora-alpha", -16, r"'model\.lora\.peft-lora-alpha' = -16 .*> 0"),
        ("strategy.fraction-train", 0.0, r"'strategy\.fraction-train' = 0\.0 .*0 < fraction <= 1"),
        ("strategy.fraction-train", 1.5, r"'strategy\.fraction-train' = 1\.5 .*0 < fraction <= 1"),
        ("num-server-rounds", 0, r"'num-server-rounds' = 0 .*>= 1"),
        ("train.seq-length", -1, r"'train\.seq-length' = -1 .*> 0"),
        ("train.save-every-round", 0, r"'train\.save-every-round' = 0 .*>= 1"),
        ("train.dynamic-data-seed", "yes", r"'train\.dynamic-data-seed' = 'yes' has type str; expected bool"),
        ("train.training-arguments.per-device-train-batch-size", 0, r"per-device-train-batch-size' = 0 .*>= 1"),
        ("train.training-arguments.max-steps", 0, r"'train\.training-arguments\.max-steps' = 0 .*>= 1"),
        ("model.lora.peft-lora-rank", 8, r"unknown run config key 'model\.lora\.peft-lora-rank'"),
        ("train.training-arguments.no-such-argument", 1,
         r"'train\.training-arguments\.no-such-argument' is not a training argument"),
    ],
)
def test_bad_config_value_is_refused_by_name(saved, key, value, message):
    run_config, results, _ = saved
    assert_refused({**run_config, key: value}, message, results)


def test_learning_rate_min_above_max_names_both_keys(saved):
    run_config, results, _ = saved
    text = assert_refused({**run_config, "train.learning-rate-min": 1e-3, "train.learning-rate-max": 1e-4},
                          r"'train\.learning-rate-min' = 0\.001 exceeds", results)
    assert "'train.learning-rate-max' = 0.0001" in text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.name", "/no/such/model", r"'model\.name' = '/no/such/model': no such local model folder"),
        ("dataset.path", "/no/such/data.jsonl", r"'dataset\.path' = '/no/such/data\.jsonl': no such file"),
        ("eval.data-dir", "/no/such/eval", r"'eval\.data-dir' = '/no/such/eval': no such folder"),
    ],
)
def test_missing_local_path_is_refused_by_name(saved, key, value, message):
    run_config, results, _ = saved
    assert_refused({**run_config, key: value}, message, results)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD_ROW = {"instruction": "What is the sentiment?", "input": "Shares rose.", "output": "positive"}


@pytest.mark.parametrize(
    ("name", "rows", "message"),
    [
        ("data.csv", [GOOD_ROW], r"data\.csv' has suffix '\.csv'; allowed: \.json, \.jsonl, \.parquet"),
        ("no-output.jsonl", [{"instruction": "x", "input": "y"}], r"no-output\.jsonl' lacks column\(s\) output"),
        ("blank.jsonl", [GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "output": "  "}],
         r"blank\.jsonl' has 1 row\(s\) that cannot be trained on, first at row 2 \(0-based\): an empty output"),
        ("null.jsonl", [GOOD_ROW, {**GOOD_ROW, "instruction": None}],
         r"null\.jsonl' has 1 row\(s\) .* first at row 1 \(0-based\): an empty instruction"),
        ("number.jsonl", [GOOD_ROW, {**GOOD_ROW, "output": 1}], r"first at row 1 \(0-based\): output = 1 is not text"),
        ("list.jsonl", [{**GOOD_ROW, "output": ["positive"]}], r"output = \['positive'\] is not text"),
        ("few.jsonl", [GOOD_ROW] * 3, r"few\.jsonl' has 3 row\(s\) for 50 partitions"),
    ],
)
def test_bad_data_file_is_refused_by_file_and_row(saved, tmp_path, name, rows, message):
    run_config, results, _ = saved
    data = write_rows(tmp_path / name, rows)
    assert_refused({**run_config, "dataset.path": str(data)}, message, results)


def test_unparsable_data_file_is_refused(saved, tmp_path):
    run_config, results, _ = saved
    data = tmp_path / "garbage.json"
    data.write_text("{this is not json")
    assert_refused({**run_config, "dataset.path": str(data)}, r"garbage\.json' is not valid JSON/JSON Lines", results)


def test_resume_from_missing_or_empty_folder(saved, tmp_path):
    run_config, results, _ = saved
    missing = {**run_config, "resume.from": str(tmp_path / "nope")}
    assert_refused(missing, r"resume\.from = '.*nope': no such run folder", results)
    empty = results / "empty-run"
    empty.mkdir()
    assert_refused({**run_config, "resume.from": str(empty)}, r"empty-run' has no complete checkpoint", results)


def truncate_weights(checkpoint: Path) -> None:
    weights = checkpoint / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])


def drop_adapter_config(checkpoint: Path) -> None:
    (checkpoint / ADAPTER_CONFIG).unlink()


def break_run_state(checkpoint: Path) -> None:
    text = (checkpoint / RUN_STATE).read_text()
    (checkpoint / RUN_STATE).write_text(text[: len(text) // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncate_weights, r"peft_2 is corrupt"),
        (drop_adapter_config, r"peft_2 is incomplete: adapter_config\.json is missing"),
        (break_run_state, r"peft_2 is corrupt"),
    ],
)
def test_half_written_only_checkpoint_is_refused(saved, damage, message):
    run_config, results, run_dir = saved
    damage(run_dir / "peft_2")
    text = assert_refused({**run_config, "resume.from": str(run_dir)}, message, results)
    assert "no older checkpoint" in text


def test_broken_newest_checkpoint_is_refused_not_skipped(saved):
    """Resuming from peft_2 past a broken peft_4 would fail hours later when round 4 finds the name taken."""
    run_config, results, run_dir = saved
    newest = run_dir / "peft_4"
    shutil.copytree(run_dir / "peft_2", newest)
    truncate_weights(newest)
    assert_refused({**run_config, "resume.from": str(run_dir), "num-server-rounds": ROUNDS},
                   r"peft_4 is corrupt.*move it out of the run folder to resume from peft_2", results)


def test_checkpoint_of_another_run_is_refused(saved, tiny_model, tmp_path):
    run_config, results, run_dir = saved
    other_config, other_run, _ = start_run({**run_config, "output.dir": str(tmp_path / "other")})
    other_run.history.append({"round": 3})
    recorder = RoundRecorder(other_config, other_run, build_strategy(other_config.strategy))
    recorder.save(3, ArrayRecord(other_run.adapter))
    shutil.copytree(other_run.run_dir / "peft_3", run_dir / "peft_3")
    assert_refused({**run_config, "resume.from": str(run_dir)},
                   r"peft_3 belongs to run '\w+' but peft_2 to run '\w+'", results)


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"model.lora.peft-lora-r": 8}, "model"),
        ({"num-server-rounds": ROUNDS + 2}, "num_server_rounds"),
        ({"train.prompt-format": "answer"}, "prompt_format"),
    ],
)
def test_resume_with_different_defining_settings_is_refused(saved, change, culprit):
    run_config, results, run_dir = saved
    text = assert_refused({**run_config, **change, "resume.from": str(run_dir)},
                          r"settings that define the run differ", results)
    assert f"({culprit})" in text


def test_resume_with_a_different_dataset_is_refused(saved, tmp_path):
    run_config, results, run_dir = saved
    other = tmp_path / "other.jsonl"
    shutil.copy(run_config["dataset.path"], other)
    text = assert_refused({**run_config, "dataset.path": str(other), "resume.from": str(run_dir)},
                          r"settings that define the run differ from the checkpoint.s \(dataset_path\)", results)
    assert str(other) in text


def test_resume_of_a_completed_run_is_refused(saved, tiny_model, tmp_path):
    run_config, _, _ = saved
    done_config = {**run_config, "num-server-rounds": 2, "output.dir": str(tmp_path / "done")}
    config, run, _ = start_run(done_config)
    RoundRecorder(config, run, build_strategy(config.strategy)).save(2, ArrayRecord(run.adapter))
    assert_refused({**done_config, "resume.from": str(run.run_dir)},
                   r"newest checkpoint is round 2 of 2, the run is already complete", tmp_path / "done")


def test_client_refuses_a_missing_model_folder_before_loading_anything(saved):
    run_config, _, _ = saved
    loads = WORKER_CACHE.base_model_loads
    message = Message(
        content=RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}), "config": ConfigRecord({"server-round": 1})}),
        metadata=Metadata(run_id=1, message_id="1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                          group_id="", created_at=time.time(), ttl=60.0, message_type="train"),
    )
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 5}, state=RecordDict(),
                      run_config={**run_config, "model.name": "/no/such/model"})
    with pytest.raises(ConfigError, match=r"'model\.name' = '/no/such/model': no such local model folder"):
        client_app.train(message, context)
    assert WORKER_CACHE.base_model_loads == loads


def test_non_utf8_data_file_names_the_file_and_line(saved, tmp_path):
    run_config, results, _ = saved
    data = tmp_path / "latin1.jsonl"
    data.write_bytes((json.dumps(GOOD_ROW) + "\n").encode() + b'{"instruction": "x", "input": "Soci\xe9t\xe9", "output": "positive"}\n')
    assert_refused({**run_config, "dataset.path": str(data)}, r"latin1\.jsonl' is not UTF-8 text: byte 0xe9 on line 2",
                   results)


def test_null_input_is_an_empty_input(tmp_path):
    from flowertune_finance.dataset import validate_data_file
    from flowertune_finance.prompts import format_prompt

    data = write_rows(tmp_path / "null-input.jsonl", [GOOD_ROW, {**GOOD_ROW, "input": None}])
    assert len(validate_data_file(data)) == 2
    assert format_prompt("What?", None, "answer") == format_prompt("What?", "", "answer")


def test_labels_are_reported_and_typos_warned(saved, tmp_path, caplog):
    run_config, _, _ = saved
    rows = [GOOD_ROW] * 60 + [{**GOOD_ROW, "output": "postive"}, {**GOOD_ROW, "output": "moderately negative"}]
    data = write_rows(tmp_path / "typo.jsonl", rows)
    start_run({**run_config, "dataset.path": str(data), "output.dir": str(tmp_path / "out")}, num_partitions=50)
    assert "positive 60, postive 1, moderately negative 1" in caplog.text
    assert "Labels outside the sentiment vocabulary" in caplog.text and "'postive'" in caplog.text


def test_model_folder_without_weights_is_refused(saved, tiny_model, tmp_path):
    run_config, results, _ = saved
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert_refused({**run_config, "model.name": str(folder)}, r"no-weights': the folder lacks weights", results)


def test_model_folder_without_tokenizer_is_refused(saved, tiny_model, tmp_path):
    run_config, results, _ = saved
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert_refused({**run_config, "model.name": str(folder)}, r"no-tokenizer': the folder lacks tokenizer files", results)


def test_seq_length_that_cuts_the_labels_off_is_refused_with_the_value_that_fits(saved):
    run_config, results, _ = saved
    text = assert_refused({**run_config, "train.seq-length": 8}, r"'train\.seq-length' = 8 cuts the label off", results)
    fits = int(re.search(r"set train\.seq-length >= (\d+)", text).group(1))
    assert fits > 8
    start_run({**run_config, "train.seq-length": fits, "output.dir": str(results / "fits")}, num_partitions=50)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.training-arguments.lr-scheduler-type", "bogus",
         r"'train\.training-arguments\.lr-scheduler-type' = 'bogus' is not accepted by trl\.SFTConfig"),
        ("train.training-arguments.optim", "sgdx", r"'train\.training-arguments\.optim' = 'sgdx' is not accepted"),
        ("train.training-arguments.lr-sheduler-type", "cosine",
         r"did you mean 'train\.training-arguments\.lr-scheduler-type'"),
    ],
)
def test_bad_training_argument_is_refused_at_start_by_name(saved, key, value, message):
    run_config, results, _ = saved
    assert_refused({**run_config, key: value}, message, results)


def test_trailing_slash_in_model_name_is_the_same_model_on_resume(saved):
    run_config, results, run_dir = saved
    config, run, _ = start_run({**run_config, "model.name": run_config["model.name"] + "/", "resume.from": str(run_dir)})
    assert run.start_round == 2 and config.model.name == run_config["model.name"]


def test_resume_from_a_checkpoint_folder_asks_for_the_run_folder(saved):
    run_config, results, run_dir = saved
    assert_refused({**run_config, "resume.from": str(run_dir / "peft_2")},
                   r"peft_2' is a checkpoint folder; pass the run folder that holds it", results)


def test_client_with_an_empty_training_window_says_what_to_do(saved):
    from flowertune_finance import training
    from flowertune_finance.config import parse_run_config

    run_config, _, _ = saved
    config = parse_run_config({**run_config, "train.seq-length": 8})
    with pytest.raises(DataError, match=r"no example keeps a label token within train\.seq-length = 8; examples here are ~\d\d+ tokens .*raise"):
        training.tokenized_partition(config, 0, 50)
