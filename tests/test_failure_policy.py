"""A run that trains nothing fails: the first round, or `strategy.max-skipped-rounds` rounds in a row,
without an accepted reply stop the run (`finished:failed`) with the clients' errors summarised,
and the last good checkpoint stays the newest. Through the real `flwr run`, with tests/fault_app.py.
A run the ServerApp refuses at start (a bad run-config value) is in test_smoke_isolation.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_dirs, smoke_config
from test_faults import NUM_SUPERNODES, fault_app_dir

from flowertune_finance.checkpoint import load_adapter
from flowertune_finance.dev import launch
from flowertune_finance.metrics import read_metrics


def run_with_faults(tiny_model, flwr_env, tmp_path, faults: dict, **overrides):
    app_dir = fault_app_dir(tmp_path)
    (app_dir / "faults.json").write_text(json.dumps(faults))
    results = tmp_path / "results"
    config = smoke_config(tiny_model, results, **{
        "strategy.fraction-train": 1.0, "train.save-every-round": 1, **overrides,
    })
    with pytest.raises(launch.RunFailed, match="finished:failed"):
        launch.run_app(app_dir, config, num_supernodes=NUM_SUPERNODES, env=flwr_env, timeout=400)
    (run_dir,) = run_dirs(results)
    return run_dir


def test_every_client_failing_in_round_1_fails_the_run(tiny_model, flwr_env, tmp_path, capfd):
    all_raise = {1: {p: "raise" for p in range(NUM_SUPERNODES)}}
    run_dir = run_with_faults(tiny_model, flwr_env, tmp_path, all_raise, **{"num-server-rounds": 3})
    log = capfd.readouterr().out
    assert "Stopping the run: round 1, the first of this run, accepted no client reply" in log
    assert "5 x RuntimeError: injected client failure in round 1" in log
    assert not list(run_dir.glob("peft_*")), "a checkpoint claims a run that trained nothing"
    assert [record["round_skipped"] for record in read_metrics(run_dir)] == [True]


def test_too_many_skipped_rounds_in_a_row_fail_the_run_and_keep_the_last_good_checkpoint(
    tiny_model, flwr_env, tmp_path, capfd
):
    faults = {r: {p: "raise" if p % 2 else "nan" for p in range(NUM_SUPERNODES)} for r in (2, 3)}
    run_dir = run_with_faults(tiny_model, flwr_env, tmp_path, faults, **{
        "num-server-rounds": 5, "strategy.max-skipped-rounds": 2,
    })
    log = capfd.readouterr().out
    assert "Stopping the run: 2 rounds in a row (strategy.max-skipped-rounds = 2) accepted no client reply" in log
    assert re.search(r"6 x reply rejected: .* has non-finite values", log)  # 3 per round, both rounds
    assert "2 x RuntimeError: injected client failure in round 3" in log
    # round 2 was within the allowance and saved as scheduled (the adapter of round 1); round 3 stopped the run
    assert sorted(p.name for p in run_dir.glob("peft_*")) == ["peft_1", "peft_2"]
    first, second = load_adapter(run_dir / "peft_1"), load_adapter(run_dir / "peft_2")
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert [record["round"] for record in read_metrics(run_dir)] == [1, 2, 3]
