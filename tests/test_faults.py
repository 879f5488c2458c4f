"""Robust aggregation and the failure policy through the real app path: failing and NaN-sending clients.

The ClientApp here is tests/fault_app.py (the production train handler plus injected
faults), run by `flwr run` from a small app folder that differs from the repository's only
in its clientapp component. One run of 5 SuperNodes, every one trains every round, at most
2 rounds in a row without an accepted reply (`strategy.max-skipped-rounds`):
round 1: partition 0 raises, partition 1 replies with a NaN weight -> 3 replies averaged;
round 2: all five fail or send NaN -> the global adapter is kept (and saved as scheduled);
round 3: no faults -> training goes on from the kept adapter;
rounds 4 and 5: all five fail or send NaN -> the second of them stops the run (`finished:failed`)
and the last good checkpoint stays the newest.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_dirs, smoke_config
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from flowertune_finance.checkpoint import load_adapter
from flowertune_finance.config import StrategyConfig
from flowertune_finance.dev import launch
from flowertune_finance.metrics import ReplyMetric, read_metrics
from flowertune_finance.strategy import RoundStats, build_strategy, content_problem

NUM_SUPERNODES = 5


def fault_app_dir(tmp_path: Path) -> Path:
    """A copy of the app whose clientapp is the fault-injecting wrapper."""
    app_dir = tmp_path / "fault-app"
    app_dir.mkdir()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    production = 'clientapp = "flowertune_finance.client_app:app"'
    assert production in pyproject
    pyproject = pyproject.replace(production, 'clientapp = "fault_app:app"')
    # the repository's FAB file patterns name its own folders; this folder ships all it holds
    pyproject = re.sub(r"(?ms)^fab-(include|exclude) = \[.*?\]$", "", pyproject)
    (app_dir / "pyproject.toml").write_text(pyproject)
    (app_dir / "README.md").write_text("Fault-injection test app.\n")
    shutil.copy(Path(__file__).with_name("fault_app.py"), app_dir / "fault_app.py")
    return app_dir


# server round -> partition -> fault; rounds 4 and 5: the odd partitions raise, the even ones send NaN
FAULT_SCHEDULE = {
    1: {0: "raise", 1: "nan"},
    2: {0: "raise", 1: "raise", 2: "raise", 3: "nan", 4: "nan"},
    **{r: {p: "raise" if p % 2 else "nan" for p in range(NUM_SUPERNODES)} for r in (4, 5)},
}


def run_with_faults(tiny_model, flwr_env, tmp_path, faults: dict, **overrides) -> Path:
    """Run the fault app with `faults` (see tests/fault_app.py), expect `finished:failed`; return the run folder."""
    app_dir = fault_app_dir(tmp_path)
    (app_dir / "faults.json").write_text(json.dumps(faults))
    results = tmp_path / "results"
    config = smoke_config(tiny_model, results, **{
        "strategy.fraction-train": 1.0, "train.save-every-round": 1, **overrides,
    })
    with pytest.raises(launch.RunFailed, match="finished:failed") as failed:
        launch.run_app(app_dir, config, num_supernodes=NUM_SUPERNODES, env=flwr_env, timeout=400)
    assert failed.value.status == "finished:failed" and f"run {failed.value.run_id} ended" in str(failed.value)
    (run_dir,) = run_dirs(results)
    return run_dir


def test_bad_replies_are_excluded_all_bad_rounds_keep_the_adapter_and_too_many_in_a_row_fail_the_run(
    tiny_model, flwr_env, tmp_path, capfd
):
    run_dir = run_with_faults(tiny_model, flwr_env, tmp_path, FAULT_SCHEDULE, **{
        "num-server-rounds": 6, "strategy.max-skipped-rounds": 2,
    })
    log = capfd.readouterr().out

    records = {record["round"]: record for record in read_metrics(run_dir)}
    assert sorted(records) == [1, 2, 3, 4, 5]  # round 5 stopped the run: round 6 never started
    counts = {r: (x["clients_sampled"], x["clients_failed"], x["clients_rejected"], x["clients_accepted"])
              for r, x in records.items()}
    assert counts == {1: (5, 1, 1, 3), 2: (5, 3, 2, 0), 3: (5, 0, 0, 5), 4: (5, 2, 3, 0), 5: (5, 2, 3, 0)}
    assert [records[r]["round_skipped"] for r in (1, 2, 3, 4, 5)] == [False, True, False, True, True]
    assert records[2]["train_loss"] is None and records[3]["train_loss"] is not None
    assert "non-finite values" in log and "Round 2 skipped: no valid reply" in log

    # round 2 alone was within the allowance; rounds 4 and 5 in a row were not, and only they are summarised
    assert "Stopping the run: 2 rounds in a row (strategy.max-skipped-rounds = 2) accepted no client reply" in log
    assert re.search(r"6 x reply rejected: .* has non-finite values", log)  # 3 per round, rounds 4 and 5
    assert "2 x RuntimeError: injected client failure in round 5" in log
    assert "2 x RuntimeError: injected client failure in round 4" in log

    # skipped rounds within the allowance are saved as scheduled (the kept adapter); the stopping round is not
    assert sorted(p.name for p in run_dir.glob("peft_*")) == ["peft_1", "peft_2", "peft_3", "peft_4"]
    adapters = {r: load_adapter(run_dir / f"peft_{r}") for r in (1, 2, 3, 4)}
    for adapter in adapters.values():
        assert all(torch.isfinite(tensor).all() for tensor in adapter.values())
    trained = [tensor for key, tensor in adapters[1].items() if "lora_B" in key]
    assert any(tensor.abs().sum() > 0 for tensor in trained), "round 1 trained nothing"
    assert all(torch.equal(adapters[2][key], adapters[1][key]) for key in adapters[1]), "round 2 changed the adapter"
    assert any(not torch.equal(adapters[3][key], adapters[2][key]) for key in adapters[2]), "round 3 did not train"
    assert all(torch.equal(adapters[4][key], adapters[3][key]) for key in adapters[3]), "round 4 changed the adapter"


def reply(arrays: dict, metrics: dict, node_id: int = 7, extra_arrays: dict | None = None) -> Message:
    """A client's reply as the ServerApp receives it."""
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    if extra_arrays is not None:
        content["more"] = ArrayRecord(extra_arrays)
    metadata = Metadata(run_id=1, message_id=str(node_id), src_node_id=node_id, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="train")
    return Message(content=content, metadata=metadata)


GLOBAL = {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
GOOD_METRICS = {ReplyMetric.NUM_EXAMPLES: 10, ReplyMetric.TRAIN_LOSS: 1.0}


@pytest.mark.parametrize(
    ("arrays", "metrics", "extra", "problem"),
    [
        ({"a.lora_A.weight": torch.ones(2, 3)}, GOOD_METRICS, None, "missing 1 array"),
        ({**GLOBAL, "b.weight": torch.ones(1)}, GOOD_METRICS, None, "unexpected array"),
        ({**GLOBAL, "a.lora_A.weight": torch.ones(3, 2)}, GOOD_METRICS, None, "has shape (3, 2), expected (2, 3)"),
        ({**GLOBAL, "a.lora_A.weight": torch.ones(2, 3, dtype=torch.int64)}, GOOD_METRICS, None, "has dtype int64"),
        ({**GLOBAL, "a.lora_B.weight": torch.full((3, 2), float("inf"))}, GOOD_METRICS, None, "non-finite"),
        (GLOBAL, {ReplyMetric.TRAIN_LOSS: 1.0}, None, "metric 'num-examples' is None"),
        (GLOBAL, {"num-examples": 0}, None, "metric 'num-examples' is 0"),
        (GLOBAL, GOOD_METRICS, {"x": torch.ones(1)}, "expected one ArrayRecord 'arrays'"),
    ],
)
def test_reply_checks_name_the_problem(arrays, metrics, extra, problem):
    message = reply(arrays, metrics, extra_arrays=extra)
    assert problem in content_problem(message.content, ArrayRecord(GLOBAL), "arrays", "num-examples")


def test_round_averages_only_valid_replies_and_counts_the_rest(caplog):
    """In-process: replies FedAvg would crash on (extra record, other metric names) or average in (NaN)."""
    strategy = build_strategy(StrategyConfig(fraction_train=1.0))
    strategy.rounds[1] = RoundStats(round=1, started=time.time(), sampled=5)
    strategy._sent = ArrayRecord(GLOBAL)
    ones = {key: torch.ones_like(value) for key, value in GLOBAL.items()}
    threes = {key: torch.full_like(value, 3.0) for key, value in GLOBAL.items()}
    replies = [
        reply(ones, GOOD_METRICS, node_id=1),
        reply(threes, GOOD_METRICS, node_id=2),
        reply({**ones, "a.lora_A.weight": torch.full((2, 3), float("nan"))}, GOOD_METRICS, node_id=3),
        reply(ones, GOOD_METRICS, node_id=4, extra_arrays={"x": torch.ones(1)}),
        reply(ones, {**GOOD_METRICS, "other": 1.0}, node_id=5),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    stats = strategy.rounds[1]
    assert (stats.replied, stats.rejected, stats.accepted) == (5, 3, 2)
    assert all(torch.equal(tensor, torch.full_like(tensor, 2.0)) for tensor in arrays.to_torch_state_dict().values())
    rejected = [m for m in caplog.messages if "rejected the reply of node" in m]
    assert [re.search(r"node (\d+)", m).group(1) for m in rejected] == ["3", "4", "5"]
    assert "non-finite" in rejected[0] and "ArrayRecord" in rejected[1] and "metric names differ" in rejected[2]
