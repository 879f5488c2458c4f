"""Performance without side effects: the cached base model gives the replies fresh builds give,
the server never builds the base model, checkpoints come straight from the arrays, and fp16
transport halves the traffic while the server keeps fp32."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flowertune_finance import adapters, models, training
from flowertune_finance.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_checkpoint
from flowertune_finance.communication import MB
from flowertune_finance.config import StrategyConfig, parse_run_config
from flowertune_finance.dataset import load_partition, tokenize_partition
from flowertune_finance.dev.launch import SAMPLE_DATA, SMOKE_RUN_CONFIG
from flowertune_finance.metrics import ReplyMetric, read_metrics
from flowertune_finance.strategy import build_strategy, with_dtype
from flowertune_finance.worker_cache import WORKER_CACHE

# (partition, round, seed of the received adapter): different data, weights and learning rates
CALLS = [(0, 1, 1), (17, 2, 2), (42, 3, 3)]


def _config(tiny_model, quantization: int, **overrides):
    return parse_run_config({
        **SMOKE_RUN_CONFIG, "model.name": str(tiny_model), "model.quantization": quantization,
        "dataset.path": str(SAMPLE_DATA), **overrides,
    })


def _received_adapter(config, seed: int) -> dict[str, torch.Tensor]:
    """A global adapter as a client would receive it mid-run (B no longer zero)."""
    adapter, _ = adapters.initial_adapter(config.model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in adapter.items()}


def _fresh_worker() -> None:
    """Forget every per-worker cache, as a new worker process would start."""
    WORKER_CACHE.clear()


def _hooks(model) -> dict[str, int]:
    return {name: len(module._forward_hooks) for name, module in model.named_modules() if module._forward_hooks}


@pytest.mark.parametrize("quantization", [0, 4])
def test_cached_model_replies_like_fresh_builds_and_keeps_no_state(tiny_model, quantization):
    config = _config(tiny_model, quantization)
    _fresh_worker()
    fresh = []
    for partition, server_round, seed in CALLS:
        _fresh_worker()
        fresh.append(training.train_adapter(config, _received_adapter(config, seed), partition, 50, server_round))
    assert [metrics["base-model-loads"] for _, metrics in fresh] == [1, 1, 1]

    _fresh_worker()
    loads_before = WORKER_CACHE.base_model_loads
    model = models.cached_peft_model(config.model)
    built = {"hooks": _hooks(model), "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
             "checkpointing": model.is_gradient_checkpointing}
    cached = []
    for partition, server_round, seed in CALLS:
        cached.append(training.train_adapter(config, _received_adapter(config, seed), partition, 50, server_round))
        assert models.cached_peft_model(config.model) is model
        # nothing a trainer set up survives the call: hooks, gradients, trainable set, flags
        assert _hooks(model) == built["hooks"]
        assert all(p.grad is None for p in model.parameters())
        assert [n for n, p in model.named_parameters() if p.requires_grad] == built["trainable"]
        assert model.is_gradient_checkpointing == built["checkpointing"] is True
    assert WORKER_CACHE.base_model_loads - loads_before == 1
    assert [metrics["base-model-loads"] for _, metrics in cached] == [0, 0, 0]  # built before the first call

    for (fresh_adapter, fresh_metrics), (cached_adapter, cached_metrics) in zip(fresh, cached):
        assert list(cached_adapter) == list(fresh_adapter)
        for key in fresh_adapter:
            torch.testing.assert_close(cached_adapter[key], fresh_adapter[key], rtol=1e-6, atol=1e-7)
        assert cached_metrics[ReplyMetric.TRAIN_LOSS] == pytest.approx(fresh_metrics[ReplyMetric.TRAIN_LOSS], rel=1e-6)
    # the calls really differ (else equality would prove nothing)
    assert len({round(metrics[ReplyMetric.TRAIN_LOSS], 6) for _, metrics in cached}) == 3


def test_cache_off_rebuilds_every_call_with_the_same_result(tiny_model):
    _fresh_worker()
    on = _config(tiny_model, 0)
    off = _config(tiny_model, 0, **{"train.cache-base-model": False})
    adapter = _received_adapter(on, seed=5)
    models.cached_peft_model(on.model)  # a warm cache must not be used when it is off
    cached, metrics_on = training.train_adapter(on, adapter, 3, 50, 2)
    rebuilt = [training.train_adapter(off, adapter, 3, 50, 2) for _ in range(2)]
    assert metrics_on["base-model-loads"] == 0 and [m["base-model-loads"] for _, m in rebuilt] == [1, 1]
    assert all(torch.equal(cached[k], reply[k]) for reply, _ in rebuilt for k in cached)


def test_labels_built_once_equal_what_trl_prepares_each_call(tiny_model):
    from trl import SFTConfig, SFTTrainer

    config = _config(tiny_model, 0, **{"train.seq-length": 70})  # short: 17 of 50 rows lose their completion
    examples, tokenizer = training.tokenized_partition(config, 8, 50)
    raw = tokenize_partition(load_partition(8, 50, config.dataset_name, config.dataset_path), tokenizer, "alpaca", 70)
    args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none", completion_only_loss=True,
                     max_length=70)
    model = models.build_peft_model(config.model)
    prepared = SFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tokenizer).train_dataset
    # rows whose label truncation cut off train nothing: the app leaves them out, as TRL does
    assert 0 < len(examples) == len(prepared) < len(raw)
    assert examples["input_ids"] == prepared["input_ids"] and examples["labels"] == prepared["labels"]


def test_server_side_never_loads_base_weights(tiny_model, tmp_path, monkeypatch):
    from flowertune_finance import server_app

    def refuse(*args, **kwargs):
        raise AssertionError("the server loaded base-model weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(models, "load_base_model", refuse)
    config = _config(tiny_model, 4, **{"output.dir": str(tmp_path)})
    loads_before = WORKER_CACHE.base_model_loads
    run = server_app.prepare_run(config, {})
    assert run.adapter and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in run.adapter.values())
    path = save_checkpoint(run.run_dir, 1, run.adapter, run.lora, {"history": []})
    assert (path / ADAPTER_WEIGHTS).is_file() and WORKER_CACHE.base_model_loads == loads_before


def test_model_free_checkpoint_equals_what_peft_saves(tiny_model, tmp_path):
    config = _config(tiny_model, 0)
    adapter = _received_adapter(config, seed=9)
    _, lora = adapters.initial_adapter(config.model)
    ours = save_checkpoint(tmp_path, 1, adapter, lora, {})
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), models.lora_config(config.model))
    adapters.set_adapter_state(peft_model, adapter)
    peft_model.save_pretrained(tmp_path / "by-peft")
    theirs = load_file(tmp_path / "by-peft" / ADAPTER_WEIGHTS)
    saved = load_file(ours / ADAPTER_WEIGHTS)
    assert list(saved) == list(theirs) and all(torch.equal(saved[k], theirs[k]) for k in saved)
    assert all(torch.equal(saved[k], adapter[k]) for k in adapter)
    ours_config = json.loads((ours / ADAPTER_CONFIG).read_text())
    peft_config = json.loads((tmp_path / "by-peft" / ADAPTER_CONFIG).read_text())
    for saved_config in (ours_config, peft_config):  # a set in PEFT: its order varies between processes
        saved_config["target_modules"] = sorted(saved_config["target_modules"])
    assert ours_config == peft_config
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), ours)
    assert all(torch.equal(v, adapter[k]) for k, v in adapters.get_adapter_state(loaded).items())


class _Grid:
    def get_node_ids(self):
        return list(range(1, 11))


def test_fp16_transport_sends_and_receives_half_and_averages_in_fp32(monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)  # Flower needs an identity to create messages
    generator = torch.Generator().manual_seed(0)
    global_adapter = OrderedDict((f"layer{i}.lora_A.weight", torch.randn(32, 64, generator=generator)) for i in range(4))
    received = {}
    for dtype in ("float32", "float16"):
        strategy = build_strategy(StrategyConfig(fraction_train=0.5), transport_dtype=dtype)
        messages = list(strategy.configure_train(1, ArrayRecord(global_adapter), ConfigRecord({}), _Grid()))
        assert {m.content["arrays"]["layer0.lora_A.weight"].dtype for m in messages} == {dtype}
        updates = [OrderedDict((k, v + 0.001 * (i + 1)) for k, v in global_adapter.items()) for i in range(len(messages))]
        replies = [
            Message(RecordDict({"arrays": with_dtype(ArrayRecord(u), dtype),
                                "metrics": MetricRecord({ReplyMetric.NUM_EXAMPLES: 10 * (i + 1), ReplyMetric.TRAIN_LOSS: 1.0})}), reply_to=m)
            for i, (u, m) in enumerate(zip(updates, messages))
        ]
        arrays, _ = strategy.aggregate_train(1, replies)
        stats = strategy.rounds[1]
        received[dtype] = (stats.mb_sent, stats.mb_received, arrays)
        assert all(array.dtype == "float32" for array in arrays.values())
        weights = torch.tensor([10.0 * (i + 1) for i in range(len(updates))])
        for key in global_adapter:
            sent = torch.stack([torch.from_numpy(r.content["arrays"][key].numpy()).float() for r in replies])
            expected = (sent * (weights / weights.sum())[:, None, None]).sum(0)  # the fp32 mean of what arrived
            torch.testing.assert_close(torch.from_numpy(arrays[key].numpy()), expected, rtol=1e-6, atol=1e-7)
    for index in (0, 1):  # sent, received
        assert 0.5 < received["float16"][index] / received["float32"][index] < 0.51


def test_fp16_transport_through_the_app_halves_traffic_and_keeps_fp32_checkpoints(quantized_frozen_a_fp16_run):
    # 5 SuperNodes that all train, 4 rounds, the base in 4 bits, A frozen (conftest.RECIPE_RUN_CONFIG): B alone travels
    result, run_dir = quantized_frozen_a_fp16_run
    assert result.status == "finished:completed"
    checkpoint = load_file(run_dir / "peft_4" / ADAPTER_WEIGHTS)
    assert {t.dtype for t in checkpoint.values()} == {torch.float32}
    travelling = OrderedDict((k, v) for k, v in checkpoint.items() if ".lora_B." in k)
    assert travelling and len(travelling) == len(checkpoint) / 2
    fp32_bytes = ArrayRecord(travelling).count_bytes()
    fp16_bytes = ArrayRecord(OrderedDict((k, v.half()) for k, v in travelling.items())).count_bytes()
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for record in records:
        clients = record["clients_sampled"]
        assert clients == 5 and record["clients_accepted"] == 5
        assert record["mb_sent"] == pytest.approx(fp16_bytes * clients / MB)
        assert record["mb_received"] == pytest.approx(fp16_bytes * clients / MB)
        assert record["mb_sent"] < 0.52 * fp32_bytes * clients / MB  # half + names/headers (3% on this tiny B)
        assert math.isfinite(record["train_loss"])
        assert record["server_base_model_loads"] == 0
        assert set(record["client_time_s"]) == {"model", "data", "setup", "train", "steps", "serialize"}
    # each simulation worker (one per 2 CPUs; one on the 2-core CI) loads the base model once per run
    assert 1 <= sum(r["client_base_model_loads"] for r in records) <= max(1, (os.cpu_count() or 2) // 2)
