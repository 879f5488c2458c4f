"""The model side: LR schedule, model-free adapter init, checkpoints, other architectures, devices."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from flowertune_finance import adapters, models
from flowertune_finance.checkpoint import CheckpointError, load_adapter, read_checkpoint, save_checkpoint
from flowertune_finance.config import AppConfig, ModelConfig, parse_run_config
from flowertune_finance.dev.launch import SAMPLE_DATA, SMOKE_RUN_CONFIG
from flowertune_finance.dev.tiny import build_tiny_model
from flowertune_finance.metrics import ReplyMetric
from flowertune_finance.training import train_adapter
from flowertune_finance.training_arguments import sft_arguments


def test_cosine_schedule_runs_from_max_to_min_over_the_rounds():
    assert models.cosine_annealing(0, 200, 5e-5, 1e-6) == pytest.approx(5e-5)
    assert models.cosine_annealing(100, 200, 5e-5, 1e-6) == pytest.approx((5e-5 + 1e-6) / 2)
    assert models.cosine_annealing(200, 200, 5e-5, 1e-6) == pytest.approx(1e-6)
    assert models.cosine_annealing(50, 200, 5e-5, 1e-6) == pytest.approx(1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi / 4)))
    rates = [models.cosine_annealing(r, 200, 5e-5, 1e-6) for r in range(1, 201)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("quantization", [0, 4])
def test_model_free_adapter_matches_the_trained_models_adapter(tiny_model, quantization):
    config = ModelConfig(name=str(tiny_model), quantization=quantization)
    adapter, lora = adapters.initial_adapter(config)
    trained = adapters.get_adapter_state(models.build_peft_model(config))
    assert list(adapter) == list(trained)
    assert all(adapter[k].shape == trained[k].shape and adapter[k].dtype == torch.float32 for k in adapter)
    assert all(adapter[k].abs().sum() == 0 for k in adapter if "lora_B" in k)  # PEFT's init: B = 0
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_A" in k)
    assert sorted(lora.target_modules) == ["q_proj", "v_proj"] and lora.r == 32 and lora.lora_alpha == 64
    again, _ = adapters.initial_adapter(config)
    assert all(torch.equal(adapter[k], again[k]) for k in adapter)  # deterministic


def test_checkpoint_round_trip_loads_with_peft_and_equals_the_arrays(tiny_model, tmp_path):
    config = ModelConfig(name=str(tiny_model), quantization=0)
    adapter, lora = adapters.initial_adapter(config)
    adapter = {k: v + 0.01 * torch.randn_like(v) for k, v in adapter.items()}
    path = save_checkpoint(tmp_path, 5, adapter, lora, {"communication_mb": 1.0})
    assert read_checkpoint(path).round == 5
    saved = load_adapter(path)
    assert all(torch.equal(saved[k], adapter[k]) for k in adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path)
    loaded = adapters.get_adapter_state(model)
    assert all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    with pytest.raises(CheckpointError, match="already exists; refusing to overwrite"):
        save_checkpoint(tmp_path, 5, adapter, lora, {})
    assert all(torch.equal(load_adapter(path)[k], adapter[k]) for k in adapter)


def _smoke_app_config(model_dir) -> AppConfig:
    return parse_run_config({
        **SMOKE_RUN_CONFIG, "model.name": str(model_dir), "dataset.path": str(SAMPLE_DATA),
        "num-server-rounds": 3, "train.prompt-format": "answer",
    })


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_any_local_causal_lm_folder_trains(tmp_path, architecture):
    model_dir = build_tiny_model(tmp_path / architecture, architecture=architecture)
    config = _smoke_app_config(model_dir)
    adapter, _ = adapters.initial_adapter(config.model)
    new_adapter, metrics = train_adapter(config, adapter, partition_id=3, num_partitions=50, server_round=1)
    assert math.isfinite(metrics[ReplyMetric.TRAIN_LOSS]) and metrics["num-examples"] == 50
    assert set(new_adapter) == set(adapter)
    assert any(not torch.equal(new_adapter[k], adapter[k]) for k in adapter)


def test_cpu_training_ignores_gpu_precision_flags(tiny_model):
    config = parse_run_config({
        **SMOKE_RUN_CONFIG, "model.name": str(tiny_model),
        "train.training-arguments.bf16": True, "train.training-arguments.tf32": True,
    })
    on_cpu = sft_arguments(config.train, 1e-4, "out", cuda=False)
    assert on_cpu["use_cpu"] is True and on_cpu["bf16"] is False and "tf32" not in on_cpu
    on_gpu = sft_arguments(config.train, 1e-4, "out", cuda=True)
    assert on_gpu["use_cpu"] is False and on_gpu["bf16"] is True and on_gpu["tf32"] is True
    assert on_gpu["learning_rate"] == 1e-4 and on_gpu["max_steps"] == 2 and on_gpu["completion_only_loss"] is True
