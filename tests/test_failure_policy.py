"""A run that trains nothing fails: a first round without an accepted reply stops the run
(`finished:failed`) with the clients' errors summarised, and leaves no checkpoint. Through the real
`flwr run`, with tests/fault_app.py. `strategy.max-skipped-rounds` rounds in a row without one, and the
last good checkpoint staying the newest, are checked in test_faults.py's run; a run the ServerApp refuses
at start (a bad run-config value) is in test_smoke_isolation.py."""

from __future__ import annotations

from test_faults import NUM_SUPERNODES, run_with_faults

from flowertune_finance.metrics import read_metrics


def test_every_client_failing_in_round_1_fails_the_run(tiny_model, flwr_env, tmp_path, capfd):
    all_raise = {1: {p: "raise" for p in range(NUM_SUPERNODES)}}
    run_dir = run_with_faults(tiny_model, flwr_env, tmp_path, all_raise, **{"num-server-rounds": 3})
    log = capfd.readouterr().out
    assert "Stopping the run: round 1, the first of this run, accepted no client reply" in log
    assert "5 x RuntimeError: injected client failure in round 1" in log
    assert not list(run_dir.glob("peft_*")), "a checkpoint claims a run that trained nothing"
    assert [record["round_skipped"] for record in read_metrics(run_dir)] == [True]
