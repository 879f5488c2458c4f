"""The README's promise: the smoke federation runs end to end through the real `flwr run`."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flowertune_finance.checkpoint import ADAPTER_WEIGHTS
from flowertune_finance.metrics import read_metrics

MB = 1024**2


def _load_checkpoint(tiny_model, checkpoint):
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    return PeftModel.from_pretrained(base, checkpoint)


def test_smoke_run_50_supernodes_writes_loadable_peft_3(smoke_run):
    result, run_dir = smoke_run
    assert result.status == "finished:completed"
    checkpoint = run_dir / "peft_3"
    assert (checkpoint / "adapter_config.json").is_file()
    model = _load_checkpoint(json.loads((run_dir / "run_config.json").read_text())["model.name"], checkpoint)
    saved = load_file(checkpoint / ADAPTER_WEIGHTS)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(saved) == set(loaded)
    for key, tensor in saved.items():
        assert torch.equal(tensor, loaded[key])
    assert any(tensor.abs().sum() > 0 for key, tensor in saved.items() if "lora_B" in key), "adapter never trained"

    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    payload_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    wire_bytes = ArrayRecord(saved).count_bytes()  # payload + NumPy headers + key names
    assert payload_bytes < wire_bytes < payload_bytes * 1.05
    for record in records:
        assert record["clients_sampled"] == 5  # 10% of 50 SuperNodes
        # every sampled client gets the adapter and returns one of the same size
        assert record["mb_sent"] == pytest.approx(wire_bytes * 5 / MB)
        assert record["mb_received"] == pytest.approx(wire_bytes * 5 / MB)
    state = json.loads((checkpoint / "run_state.json").read_text())
    assert state["communication_mb"] == pytest.approx(sum(r["mb_sent"] + r["mb_received"] for r in records))


def test_smoke_run_in_4bit_on_cpu(quantized_frozen_a_fp16_run, tiny_model):
    result, run_dir = quantized_frozen_a_fp16_run  # shared with the resume, fp16 and frozen-A tests (conftest.py)
    assert result.status == "finished:completed"
    assert json.loads((run_dir / "run_config.json").read_text())["model.quantization"] == 4
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    model = _load_checkpoint(tiny_model, run_dir / "peft_4")
    assert any("lora_A" in name for name, _ in model.named_parameters())
