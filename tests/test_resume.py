"""Resume after a crash: a run killed with SIGKILL and resumed with `resume.from` ends where an
uninterrupted run ends, with the same rounds, checkpoints and (to float tolerance) adapter.

The runs use the communication-saving recipe in 4 bits (conftest.RECIPE_RUN_CONFIG), so the uninterrupted
reference is the session's shared `quantized_frozen_a_fp16_run`. The tiny setup is deterministic: 5
SuperNodes and fraction-train 1.0, so every partition trains in every round whatever node ids the
simulation draws (they are random per run; the partition-id in each node's config is what picks its
data), dynamic-data-seed on so the data window depends on the round number, and TRL seeds each client's
trainer.

The crashed run is tests/fault_app.py with every client hanging in round 4: the run is killed
after metrics.jsonl records round 3 and while round 4 waits for replies, so peft_2 is its newest
checkpoint however slow the machine is. The resumed run is the plain app.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import RECIPE_RUN_CONFIG, RECIPE_RUN_SUPERNODES, REPO_ROOT, run_dirs, smoke_config
from flwr.app import ArrayRecord
from test_faults import fault_app_dir

from flowertune_finance import checkpoint
from flowertune_finance.checkpoint import load_adapter, restart_metrics, staged_folder
from flowertune_finance.dev import control, launch, processes
from flowertune_finance.metrics import METRICS_FILE, append_metrics, read_metrics
from flowertune_finance.server_app import RoundRecorder, start_run
from flowertune_finance.strategy import build_strategy

NUM_SUPERNODES = RECIPE_RUN_SUPERNODES
CONFIG = RECIPE_RUN_CONFIG
SAVE_EVERY = CONFIG["train.save-every-round"]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (collected before killing: orphans get re-parented)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def simulation_pids(flwr_home: str) -> list[int]:
    """The `flwr-simulation` processes (ServerApp + Ray) started under this FLWR_HOME."""
    pids = []
    for pid in processes.processes_with_env("FLWR_HOME", flwr_home):
        try:
            if "flwr-simulation" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def running_run_ids(env: dict[str, str]) -> list[int]:
    return [record.run_id for record in control.runs(processes.flwr_env(env)) if record.status == "running"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reached(run_dir_parent: Path, server_round: int) -> bool:
    """Whether the run's metrics.jsonl records `server_round` (a line still being written counts as not yet)."""
    dirs = run_dirs(run_dir_parent)
    try:
        return bool(dirs) and any(record["round"] >= server_round for record in read_metrics(dirs[-1]))
    except ValueError:
        return False


def checkpoint_digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the run's checkpoints, by path within the run folder."""
    return {path.relative_to(run_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run_dir.glob("peft_*/*"))}


def crash_after_round(
    round_to_reach: int, run_dir_parent: Path, env: dict[str, str], config: dict, timeout: float, app_dir: Path
) -> tuple[Path, dict[str, str]]:
    """Start the run (every client of the fault app hangs in round `round_to_reach + 1`), SIGKILL its
    ServerApp process tree once metrics.jsonl records `round_to_reach`, then tell the SuperLink the
    run is over (it still thinks it runs). Returns the run folder and its checkpoints' digests just
    before the kill."""
    hang = {round_to_reach + 1: {partition: "hang" for partition in range(NUM_SUPERNODES)}}
    (app_dir / "faults.json").write_text(json.dumps(hang))
    outcome: dict[str, object] = {}

    def submit() -> None:
        try:
            outcome["result"] = launch.run_app(
                app_dir, config, num_supernodes=NUM_SUPERNODES, env=env, timeout=timeout
            )
        except launch.RunFailed as error:
            outcome["error"] = error

    runner = threading.Thread(target=submit)
    runner.start()
    deadline = time.time() + timeout
    while time.time() < deadline and runner.is_alive() and not reached(run_dir_parent, round_to_reach):
        time.sleep(0.05)
    saved = checkpoint_digests(run_dirs(run_dir_parent)[-1]) if run_dirs(run_dir_parent) else {}
    victims = [pid for simulation in simulation_pids(env["FLWR_HOME"]) for pid in process_tree(simulation)]
    assert victims, f"no simulation process to kill (the run: {outcome})"
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for run_id in running_run_ids(env):
        control.stop(run_id, processes.flwr_env(env))
    runner.join(120)
    assert not runner.is_alive() and "result" not in outcome, "the killed run was reported as completed"
    gone_by = time.time() + 30  # SIGKILL is delivered, not waited for: a process may still be exiting
    while any(alive(pid) for pid in victims) and time.time() < gone_by:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in victims), "processes of the killed run are still alive"
    return run_dirs(run_dir_parent)[-1], saved


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two `flwr run`s in a row (three with the reference); the default 600 s is one run's
def test_killed_run_resumes_to_the_same_rounds_and_adapter(
    tiny_model, flwr_env, quantized_frozen_a_fp16_run, tmp_path
):
    crashed_dir, saved_before_the_kill = crash_after_round(
        3, tmp_path / "crashed", flwr_env, smoke_config(tiny_model, tmp_path / "crashed", **CONFIG), timeout=400,
        app_dir=fault_app_dir(tmp_path),
    )
    assert sorted(p.name for p in crashed_dir.glob("peft_*")) == ["peft_2"], "the kill came too late or too early"
    rounds_before_kill = [r["round"] for r in read_metrics(crashed_dir)]
    assert rounds_before_kill == [1, 2, 3]  # metrics ran ahead of the newest checkpoint

    resumed = launch.run_app(
        REPO_ROOT, smoke_config(tiny_model, tmp_path / "crashed", **CONFIG, **{"resume.from": str(crashed_dir)}),
        num_supernodes=NUM_SUPERNODES, env=flwr_env, timeout=400,
    )
    assert resumed.status == "finished:completed"
    assert run_dirs(tmp_path / "crashed") == [crashed_dir], "the resumed run must write into the same folder"
    # what was saved before the crash is untouched by it and by the resumed run
    assert saved_before_the_kill and {path: digest for path, digest in checkpoint_digests(crashed_dir).items()
                                      if path.startswith("peft_2/")} == saved_before_the_kill

    reference, reference_dir = quantized_frozen_a_fp16_run
    assert reference.status == "finished:completed"

    # same rounds, same numbering in checkpoints and metrics
    assert sorted(p.name for p in crashed_dir.glob("peft_*")) == sorted(p.name for p in reference_dir.glob("peft_*"))
    assert sorted(p.name for p in crashed_dir.glob("peft_*")) == ["peft_2", "peft_4"]
    resumed_records, reference_records = read_metrics(crashed_dir), read_metrics(reference_dir)
    assert [r["round"] for r in resumed_records] == [r["round"] for r in reference_records] == [1, 2, 3, 4]
    (before_resume,) = crashed_dir.glob("metrics.before-resume-*.jsonl")
    redone = [r for r in rounds_before_kill if r > 2]
    assert 1 <= len(redone) <= SAVE_EVERY
    assert [json.loads(line)["round"] for line in before_resume.read_text().splitlines()] == rounds_before_kill
    # same schedule, data and communication total as the uninterrupted run
    for resumed_record, reference_record in zip(resumed_records, reference_records):
        assert resumed_record["learning_rate"] == reference_record["learning_rate"]
        assert resumed_record["cumulative_mb"] == pytest.approx(reference_record["cumulative_mb"])
        assert resumed_record["train_loss"] == pytest.approx(reference_record["train_loss"], rel=1e-4)
    state = json.loads((crashed_dir / "peft_4" / "run_state.json").read_text())
    assert state["communication_mb"] == pytest.approx(reference_records[-1]["cumulative_mb"])

    # the final adapter equals the uninterrupted run's
    for name in ("peft_2", "peft_4"):
        ours, theirs = load_adapter(crashed_dir / name), load_adapter(reference_dir / name)
        assert set(ours) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, msg=f"{name}:{key}")
    assert any(t.abs().sum() > 0 for k, t in load_adapter(crashed_dir / "peft_4").items() if "lora_B" in k)
    deadline = time.time() + 60  # a finished run's simulation process takes a moment to exit
    while simulation_pids(flwr_env["FLWR_HOME"]) and time.time() < deadline:
        time.sleep(0.5)
    assert not simulation_pids(flwr_env["FLWR_HOME"]), "a simulation is still running after its run finished"


def test_resume_restarts_metrics_from_the_checkpoint_and_keeps_the_lines_ahead(tiny_model, tmp_path):
    """In-process: the newest checkpoint is complete but metrics.jsonl is a round ahead of it."""
    run_config = smoke_config(tiny_model, tmp_path / "results", **CONFIG)
    config, run, _ = start_run(run_config)
    recorder = RoundRecorder(config, run, build_strategy(config.strategy))
    for server_round in (1, 2, 3):
        record = {"round": server_round, "train_loss": 1.0 / server_round}
        append_metrics(run.run_dir, record)
        run.history.append(record)
        if server_round == 2:
            recorder.save(2, ArrayRecord(run.adapter))
    ahead = (run.run_dir / "metrics.jsonl").read_text()

    _, resumed, _ = start_run({**run_config, "resume.from": str(run.run_dir)})
    assert resumed.run_dir == run.run_dir and resumed.start_round == 2
    assert resumed.run_uid == run.run_uid
    assert [r["round"] for r in read_metrics(run.run_dir)] == [1, 2]
    (kept,) = run.run_dir.glob("metrics.before-resume-*.jsonl")
    assert kept.read_text() == ahead
    assert all(torch.equal(resumed.adapter[k], run.adapter[k].float()) for k in run.adapter)


class _OneSecond(datetime):
    """A clock stuck in one second: every name stamped with it collides."""

    @classmethod
    def now(cls, tz=None):
        return cls(2025, 1, 2, 3, 4, 5)


def test_two_resumes_within_one_second_keep_both_crashed_metrics_files(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "datetime", _OneSecond)
    for attempt in ("first", "second"):
        (tmp_path / METRICS_FILE).write_text(json.dumps({"round": attempt}) + "\n")
        restart_metrics(tmp_path, [{"round": 1}])
    kept = {p.name: p.read_text() for p in tmp_path.glob("metrics.before-resume-*.jsonl")}
    assert kept == {"metrics.before-resume-2025-01-02_03-04-05.jsonl": '{"round": "first"}\n',
                    "metrics.before-resume-2025-01-02_03-04-05-1.jsonl": '{"round": "second"}\n'}
    assert read_metrics(tmp_path) == [{"round": 1}]


def test_a_staged_folder_appears_whole_or_not_at_all_and_never_replaces_one(tmp_path):
    target = tmp_path / "peft_1"
    with pytest.raises(RuntimeError, match="crash while writing"), staged_folder(target) as folder:
        (folder / "adapter_model.safetensors").write_text("half")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError, match="peft_1 already exists; refusing to overwrite it"):
        with staged_folder(target) as folder:
            (folder / "adapter_model.safetensors").write_text("whole")
            target.mkdir()  # another writer takes the name meanwhile: an empty folder a rename would replace
    assert list(tmp_path.iterdir()) == [target] and not any(target.iterdir())
