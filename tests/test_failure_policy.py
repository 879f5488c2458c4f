"""A run that trains nothing fails: a first round without an accepted reply stops the run with the
clients' errors summarised, and leaves no checkpoint; for a resumed run, its own first round counts.

In-process: the ServerApp's `main` itself, with a Grid on which every client raises, replied to as
Flower's simulation replies for a ClientApp that raised (an error message). That this policy's stop ends a
real `flwr run` as `finished:failed`, with real clients' errors summarised, is shown by test_faults.py's run
(the policy's other rule, `strategy.max-skipped-rounds`); a run the ServerApp refuses at start (a bad
run-config value) is in test_smoke_isolation.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable

import pytest
from conftest import run_dirs, smoke_config
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flowertune_finance import server_app
from flowertune_finance.metrics import read_metrics
from flowertune_finance.strategy import build_strategy

NUM_SUPERNODES = 5


class EveryClientRaises(Grid):
    """SuperNodes whose ClientApp raises on every message, reported as Flower's simulation reports it."""

    def __init__(self, num_nodes: int) -> None:
        self.node_ids = list(range(1, num_nodes + 1))
        self.sent_rounds: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return self.node_ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            server_round = int(message.content["config"]["server-round"])
            self.sent_rounds.append(server_round)
            failure = RuntimeError(f"injected client failure in round {server_round}")
            reason = f"{type(failure)}:<'{failure}'>"  # as flwr's simulation engine words a raised exception
            replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message))
        return replies

    def _unused(self, *args, **kwargs):
        raise AssertionError("the ServerApp does not call this")

    run = property(_unused)
    set_run = create_message = push_messages = pull_messages = _unused


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """What Flower's runtime sets in a ServerApp process before `main` (messages are stamped with it)."""
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": SUPERLINK_NODE_ID}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


def run_main(grid: Grid, run_config: dict) -> server_app.NoClientTrained:
    """The ServerApp's `main` on `grid`: it must stop with NoClientTrained, which is returned."""
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(server_app.NoClientTrained) as stopped:
        server_app.main(grid, context)
    return stopped.value


def test_every_client_failing_in_round_1_fails_the_run(tiny_model, tmp_path, caplog):
    results = tmp_path / "results"
    grid = EveryClientRaises(NUM_SUPERNODES)
    run_config = smoke_config(tiny_model, results, **{
        "num-server-rounds": 3, "strategy.fraction-train": 1.0, "train.save-every-round": 1,
    })
    message = str(run_main(grid, run_config))
    assert message.startswith("Stopping the run: round 1, the first of this run, accepted no client reply")
    assert "5 x RuntimeError: injected client failure in round 1" in message
    assert message in caplog.text  # the run's log says it too
    assert grid.sent_rounds == [1] * NUM_SUPERNODES  # round 2 never started
    (run_dir,) = run_dirs(results)
    assert not list(run_dir.glob("peft_*")), "a checkpoint claims a run that trained nothing"
    assert [record["round_skipped"] for record in read_metrics(run_dir)] == [True]


def test_a_resumed_run_whose_first_round_trains_nothing_fails_and_keeps_its_checkpoint(tiny_model, tmp_path):
    results = tmp_path / "results"
    run_config = smoke_config(tiny_model, results, **{
        "num-server-rounds": 4, "strategy.fraction-train": 1.0, "train.save-every-round": 2,
    })
    config, run, _ = server_app.start_run(run_config)  # a run saved at round 2, as a crash would leave it
    run.history.extend({"round": r, "train_loss": 1.0} for r in (1, 2))
    server_app.RoundRecorder(config, run, build_strategy(config.strategy)).save(2, ArrayRecord(run.adapter))
    saved = shutil.copytree(run.run_dir / "peft_2", tmp_path / "peft_2-before")

    grid = EveryClientRaises(NUM_SUPERNODES)
    message = str(run_main(grid, {**run_config, "resume.from": str(run.run_dir)}))
    assert message.startswith("Stopping the run: round 3, the first of this run, accepted no client reply")
    assert "5 x RuntimeError: injected client failure in round 3" in message
    assert grid.sent_rounds == [3] * NUM_SUPERNODES
    assert sorted(p.name for p in run.run_dir.glob("peft_*")) == ["peft_2"]
    assert all((saved / f.name).read_bytes() == f.read_bytes() for f in (run.run_dir / "peft_2").iterdir())
