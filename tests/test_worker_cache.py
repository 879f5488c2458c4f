"""The worker cache: one bounded object for what a process keeps between client calls, and a
base-model load counter that sees every load in the process, the server's evaluator included."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch
from conftest import smoke_config
from flwr.app import ArrayRecord, MetricRecord

from flowertune_finance import models, worker_cache
from flowertune_finance.config import ModelConfig
from flowertune_finance.dev import synthetic
from flowertune_finance.metrics import ReplyMetric, read_metrics
from flowertune_finance.server_app import RoundRecorder, start_run
from flowertune_finance.strategy import RoundStats, build_strategy
from flowertune_finance.worker_cache import SIZES, WORKER_CACHE, WorkerCache

PACKAGE = Path(__file__).resolve().parents[1] / "flowertune_finance"


class Builds:
    """A builder that records what it built and can be told to fail."""

    def __init__(self) -> None:
        self.built: list[object] = []
        self.fail = False

    def __call__(self, key: object) -> tuple[str, object]:
        if self.fail:
            raise RuntimeError(f"cannot build {key!r}")
        self.built.append(key)
        return ("built", key)


def test_one_model_at_a_time_and_the_old_one_is_released_before_the_new_one_builds():
    cache, builds = WorkerCache(), Builds()
    first, second = ModelConfig(name="a"), ModelConfig(name="b")
    model = cache.peft_model(first, builds)
    assert cache.peft_model(first, builds) is model and builds.built == [first]
    seen_while_building = []

    def build_second(config: ModelConfig) -> object:
        seen_while_building.append(cache.held("model"))
        return builds(config)

    cache.peft_model(second, build_second)
    assert seen_while_building == [0] and cache.held("model") == 1
    assert cache.peft_model(first, builds) == ("built", first) and builds.built == [first, second, first]


def test_a_failed_build_is_not_kept_and_is_tried_again():
    cache, builds = WorkerCache(), Builds()
    builds.fail = True
    with pytest.raises(RuntimeError, match="cannot build 'tok'"):
        cache.tokenizer("tok", builds)
    assert cache.held("tokenizer") == 0
    builds.fail = False
    assert cache.tokenizer("tok", builds) == ("built", "tok") and cache.tokenizer("tok", builds) == ("built", "tok")
    assert builds.built == ["tok"]


def test_each_kind_evicts_its_least_recently_used_entry_past_its_bound():
    cache, builds = WorkerCache(), Builds()
    for name in ("a", "b", "a", "c"):  # "a" used again, so "b" is the least recent when "c" arrives
        cache.federated_dataset((name, "", 50), lambda name=name: builds(name))
    assert SIZES["federated-dataset"] == 2 and cache.held("federated-dataset") == 2
    cache.federated_dataset(("a", "", 50), lambda: builds("a"))
    cache.federated_dataset(("b", "", 50), lambda: builds("b"))
    assert builds.built == ["a", "b", "c", "b"]


def test_a_worker_keeps_every_partition_it_served_of_up_to_two_sources():
    cache, builds = WorkerCache(), Builds()
    for partition_id in range(50):  # a simulation worker may serve any of the 50 SuperNodes
        cache.tokenized_partition("source-1", partition_id, lambda p=partition_id: builds(p))
    for partition_id in range(50):
        assert cache.tokenized_partition("source-1", partition_id, lambda: builds("again")) == ("built", partition_id)
    assert len(builds.built) == 50 and cache.held("tokenized-source") == 1
    cache.tokenized_partition("source-2", 0, lambda: builds("2/0"))
    cache.tokenized_partition("source-3", 0, lambda: builds("3/0"))  # evicts source-1, the least recent
    cache.tokenized_partition("source-1", 7, lambda: builds("1/7 rebuilt"))
    assert builds.built[50:] == ["2/0", "3/0", "1/7 rebuilt"] and cache.held("tokenized-source") == 2


def test_checks_run_once_per_key_and_a_failing_check_is_not_remembered():
    cache, calls = WorkerCache(), []

    def check(ok: bool) -> list[int]:
        calls.append(ok)
        if not ok:
            raise ValueError("bad file")
        return [1, 2, 3]  # what a validation returns (the data) is not kept

    with pytest.raises(ValueError, match="bad file"):
        cache.validate_data_file_once(("/data/mine.jsonl", 10, 1), lambda: check(False))
    cache.validate_data_file_once(("/data/mine.jsonl", 10, 1), lambda: check(True))
    cache.validate_data_file_once(("/data/mine.jsonl", 10, 1), lambda: check(True))
    cache.validate_data_file_once(("/data/mine.jsonl", 11, 2), lambda: check(True))  # the file changed
    cache.check_training_arguments_once(("args", 128), lambda: check(True))
    cache.check_training_arguments_once(("args", 128), lambda: check(True))
    assert calls == [False, True, True, True]


def test_clear_empties_every_kind_but_keeps_the_load_count():
    cache, builds = WorkerCache(), Builds()
    cache.peft_model(ModelConfig(name="a"), builds)
    cache.frozen_lora_a(ModelConfig(name="a"), builds)
    cache.tokenizer("a", builds)
    cache.tokenized_partition("source", 0, lambda: builds(0))
    cache.federated_dataset(("a", "", 1), lambda: builds("data"))
    cache.validate_data_file_once(("f", 1, 1), lambda: None)
    cache.check_training_arguments_once(("args",), lambda: None)
    cache.count_base_model_load()
    assert all(cache.held(kind) == 1 for kind in SIZES)
    cache.clear()
    assert all(cache.held(kind) == 0 for kind in SIZES) and cache.base_model_loads == 1
    with pytest.raises(KeyError, match="cache kind 'models' is unknown; allowed: model, frozen-a"):
        cache.held("models")
    with pytest.raises(KeyError, match="'tokenizers' unknown; allowed: model, frozen-a"):
        WorkerCache({"tokenizers": 3})
    with pytest.raises(ValueError, match="a cache bound of 0 is not allowed"):
        WorkerCache({"model": 0})


def test_freeze_happens_once_per_process(monkeypatch):
    frozen = []
    monkeypatch.setattr(worker_cache.gc, "freeze", lambda: frozen.append(True))
    cache = WorkerCache()
    assert [cache.freeze_once(), cache.freeze_once(), cache.freeze_once()] == [True, False, False]
    assert frozen == [True]


def test_every_base_model_build_is_counted_cached_or_not(tiny_model):
    config = ModelConfig(name=str(tiny_model), quantization=0)
    WORKER_CACHE.clear()
    before = WORKER_CACHE.base_model_loads
    model = models.cached_peft_model(config)
    assert models.cached_peft_model(config) is model and WORKER_CACHE.base_model_loads == before + 1
    models.build_peft_model(config)
    assert WORKER_CACHE.base_model_loads == before + 2


def test_no_app_module_keeps_state_in_a_global_of_its_own():
    """State that outlives a call lives in WORKER_CACHE: no function rebinds a module global."""
    rebinding = [f"{path.name}: global {', '.join(node.names)}" for path in sorted(PACKAGE.glob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Global)]
    assert not rebinding, rebinding


@pytest.fixture
def one_torch_thread():
    """Generation of a tiny model: one thread is as fast as two alone, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_server_base_model_loads_counts_the_server_evaluators_load(tiny_model, tmp_path, one_torch_thread):
    eval_data = synthetic.write_eval_sets(tmp_path / "eval-data", rows_per_set=24)
    overrides = {"eval.every-rounds": 1, "eval.num-examples": 2, "eval.data-dir": str(eval_data),
                 "num-server-rounds": 3}
    config, run, evaluator = start_run(smoke_config(tiny_model, tmp_path / "results", **overrides))
    strategy = build_strategy(config.strategy)
    recorder = RoundRecorder(config, run, strategy, evaluator)
    before = WORKER_CACHE.base_model_loads
    for server_round in (1, 2):
        strategy.rounds[server_round] = RoundStats(round=server_round, started=time.time(), sampled=5, replied=5,
                                                   train_metrics=MetricRecord({ReplyMetric.TRAIN_LOSS: 1.0}))
        recorder(server_round, ArrayRecord(run.adapter))
    records = read_metrics(run.run_dir)
    assert all("eval_average_accuracy" in record for record in records)
    # loaded in round 1's evaluation and reported in that round's record; reused in round 2
    assert [record["server_base_model_loads"] - before for record in records] == [1, 1]
    assert WORKER_CACHE.base_model_loads == before + 1
