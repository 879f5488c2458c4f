"""`flowertune-finance smoke` as a newcomer meets it: a private SuperLink per checkout, quiet output
with the next commands filled in, Ctrl-C that stops the run, and `--stop`.

Two copies of the app (two checkouts, see conftest.py) each run the smoke through the real `flwr run`.
Checkout A holds only the files the Hub stores, and its smoke is the README's (50 SuperNodes, 3 rounds),
shared with the tests that inspect a finished run (`smoke_run`). Checkout B's one smoke fails on purpose,
so that it also shows how a failed run is reported; the other runs are kept short (4 SuperNodes). Every
process a checkout's SuperLink started is stopped at the end, and the fixture checks that none is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from conftest import smoke_cli, submitted, value_after

from flowertune_finance.dev import launch, processes, servers
from flowertune_finance.dev.processes import processes_with_env
from flowertune_finance.dev.superlink import (
    SMOKE_CONNECTION,
    SUPERLINK_MARKER,
    PrivateSuperLink,
    current_environment,
    current_python,
    healthy,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SUPERNODES = "4"
MAX_OUTPUT_LINES = 40


def run_ids(app: Path) -> list[int]:
    """Every run the checkout's own SuperLink knows (`flwr ls` through its private FLWR_HOME)."""
    superlink = PrivateSuperLink(app)
    listed = subprocess.run(
        [processes.flwr_executable(), "ls", SMOKE_CONNECTION, "--format", "json"],
        env=superlink.cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    return sorted(int(run["run-id"]) for run in json.loads(listed.stdout)["runs"])


def simulation_pids(app: Path) -> list[int]:
    """Live `flwr-simulation` processes (a run's ServerApp) of the checkout's SuperLink."""
    pids = []
    for pid in processes_with_env(SUPERLINK_MARKER, str(app)):
        try:
            if b"flwr-simulation" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def run_tree(app: Path) -> dict[int, int | None]:
    """The checkout's simulation processes and everything below them (Ray's raylet, agents, workers),
    as PID: start time: what outlives a stopped run unless the smoke stops it."""
    simulations = simulation_pids(app)
    return {**{pid: processes.started_at(pid) for pid in simulations}, **processes.descendants(simulations)}


def agents(tree: dict[int, int | None]) -> list[int]:
    return [pid for pid in processes.still_running(tree) if processes.command_line(pid).startswith("ray::")]


# `flowertune-finance ARGS` as started from a terminal, where Ctrl-C raises KeyboardInterrupt. A suite started in the
# background by a script (`pytest ... &`) ignores SIGINT, and a child inherits that: Python then installs no handler.
FROM_A_TERMINAL = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('flowertune_finance.cli', run_name='__main__', alter_sys=True)"
)


def handles_sigint(pid: int) -> bool:
    """Whether the process has a handler for SIGINT (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & 1 << (signal.SIGINT - 1))


def strays(app: Path, superlink_pid: int) -> list[int]:
    """Processes of the checkout's SuperLink that are neither it nor a child of one of its processes."""
    ours = set(processes_with_env(SUPERLINK_MARKER, str(app)))
    return sorted(pid for pid in ours if pid != superlink_pid and processes.parent(pid) not in ours)


def test_smoke_output_is_short_and_ends_with_the_next_commands(checkouts, smoke_a):
    app = checkouts[0]
    result = smoke_a[0]
    output = result.stdout
    assert result.returncode == 0, output
    lines = output.splitlines()
    assert len(lines) <= MAX_OUTPUT_LINES, output
    assert [line.strip().split(" · ")[0] for line in lines if line.strip().startswith("round ")] == [
        "round 1/3", "round 2/3", "round 3/3"]
    assert "Traceback" not in output and "WARNING" not in output
    assert "Private SuperLink of this checkout started on 127.0.0.1:" in lines[0] and "--stop" in lines[0]
    run_id, log_file = submitted(output)
    assert f"Run {run_id} submitted (50 SuperNodes)" in output and smoke_a[1].status == "finished:completed"

    run_dir = Path(value_after(output, "Run folder:"))
    checkpoint = Path(value_after(output, "Final checkpoint:"))
    assert run_dir.parent == app / "results" and run_dir.is_dir()
    assert checkpoint == run_dir / "peft_3" and (checkpoint / "adapter_config.json").is_file()
    tiny_model = app / ".smoke" / "tiny-model"
    assert (f"flowertune-finance eval --base-model-name-path {tiny_model} --peft-path {checkpoint} "
            "--quantization 0") in output
    assert f"flowertune-finance plot {run_dir}" in output
    assert f"flowertune-finance submit {run_dir} --app-dir {app}" in output
    assert lines[-1].strip().startswith(f"flowertune-finance smoke --stop {app}")
    assert log_file.is_file() and len(log_file.read_text().splitlines()) > len(lines)  # the full log is kept


def test_two_checkouts_never_share_a_superlink_and_a_failed_run_says_why(checkouts, smoke_a):
    """Checkout B's smoke runs next to A's SuperLink and fails on purpose, so one run shows both.

    `flwr run --stream` exits 0 when a run fails; the smoke must not. B's pyproject.toml holds a value
    only trl.SFTConfig rejects: the ServerApp checks it at start, before round 1 and before a run folder
    exists."""
    app_a, app_b = checkouts
    assert smoke_a[0].returncode == 0, smoke_a[0].stdout
    (app_b / "venv-in-app").mkdir()
    (app_b / "venv-in-app" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    pyproject = app_b / "pyproject.toml"
    setting = 'train.training-arguments.lr-scheduler-type = "constant"'
    assert pyproject.read_text().count(setting) == 1
    pyproject.write_text(pyproject.read_text().replace(setting, setting.replace("constant", "bogus")))
    result = smoke_cli("smoke", str(app_b), "--num-supernodes", SUPERNODES, "--rounds", "1")
    output = result.stdout
    assert result.returncode == 1, output
    lines = output.splitlines()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "venv-in-app" in warnings[0] and "outside the app folder" in warnings[0]
    # along the way, nothing but the warning, the SuperLink's line and the submission is printed
    error_at = next((i for i, line in enumerate(lines) if line.startswith("error: ")), len(lines))
    assert [line.split(" ")[0] for line in lines[:error_at]] == ["warning:", "Private", "Run"], output
    run_b, log_file = submitted(output)
    message = "\n".join(lines[error_at:])
    assert f"run {run_b} ended with status 'finished:failed'" in message
    assert "'train.training-arguments.lr-scheduler-type' = 'bogus' is not accepted by trl.SFTConfig" in message
    assert lines[-1] == f"Full log: {log_file}" and log_file.is_file()
    assert "is not accepted by trl.SFTConfig" in log_file.read_text() and "[ROUND 1" not in log_file.read_text()
    results = app_b / "results"
    assert (list(results.iterdir()) if results.is_dir() else []) == []  # no run folder was created

    record_a, record_b = PrivateSuperLink(app_a).running(), PrivateSuperLink(app_b).running()
    assert record_a is not None and record_b is not None
    assert record_a.port != record_b.port and record_a.pid != record_b.pid
    assert (record_a.flwr_home, record_b.flwr_home) == (str(app_a / ".smoke/flwr-home"), str(app_b / ".smoke/flwr-home"))
    assert record_a.python == record_b.python == current_python()
    for record in (record_a, record_b):
        assert servers.owns_listener(record.pid, record.port)  # each port is held by that checkout's SuperLink
        assert record.port not in (39091, 39093)  # never Flower's shared default ports
    # each run is known only to its own checkout's SuperLink
    run_a = submitted(smoke_a[0].stdout)[0]
    assert run_ids(app_a) == [run_a]
    assert run_ids(app_b) == [run_b]
    for app in (app_a, app_b):  # each run's app bundle was installed into its own checkout's Flower home
        assert any((app / ".smoke" / "flwr-home" / "apps").iterdir())


def test_ctrl_c_stops_the_run_it_started(checkouts, smoke_a):
    app = checkouts[0]
    before = PrivateSuperLink(app).running()
    assert before is not None
    smoke = subprocess.Popen(
        [sys.executable, "-c", FROM_A_TERMINAL, "smoke", str(app), "--num-supernodes", SUPERNODES, "--rounds", "20"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    try:
        for line in smoke.stdout:
            seen.append(line)
            if line.startswith("Run folder:"):  # the ServerApp is running the run
                break
        deadline = time.time() + 120  # Ctrl-C once the run's Ray agents run: those are what could be left over
        while not agents(run_tree(app)) and smoke.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        tree = run_tree(app)  # Ray's agents lose the marker when they rename themselves: follow the tree
        assert agents(tree), "the run started no Ray agents before the deadline"
        assert handles_sigint(smoke.pid), "the smoke does not handle SIGINT: Ctrl-C could not reach it"
        smoke.send_signal(signal.SIGINT)
        after = smoke.stdout.read().splitlines()
        smoke.wait(timeout=120)
    finally:
        if smoke.poll() is None:
            smoke.kill()
    output = "".join(seen)
    assert "reused on 127.0.0.1" in seen[0], output  # the second smoke of a checkout reuses its SuperLink
    assert PrivateSuperLink(app).running().pid == before.pid
    run_id, _ = submitted(output)
    # the whole output as the message (a tuple would be cut short by pytest's repr)
    transcript = f"{output}--- after Ctrl-C ---\n" + "\n".join(after)
    assert smoke.returncode == 130, transcript
    assert len(after) == 1 and after[0].startswith(f"Interrupted: run {run_id} stopped (status finished:stopped)"), transcript

    superlink = PrivateSuperLink(app)
    assert launch.run_status(run_id, superlink.cli_env(), [SMOKE_CONNECTION]) == "finished:stopped"
    # the smoke returned only after the run's simulation process exited (its Ray daemons are orphaned
    # only then); with it gone, nothing can complete the run later
    assert simulation_pids(app) == [], "the stopped run's simulation process is still running"
    assert launch.run_status(run_id, superlink.cli_env(), [SMOKE_CONNECTION]) == "finished:stopped"
    run_dir = Path(value_after(output, "Run folder:"))
    assert not (run_dir / "peft_20").exists()
    # nothing of the stopped run is left behind: every process is the SuperLink or a child of one of its
    # processes (left to themselves, the run's orphaned Ray agents outlive it by minutes)
    deadline = time.time() + 30
    while (strays(app, before.pid) or processes.still_running(tree)) and time.time() < deadline:
        time.sleep(0.5)
    assert strays(app, before.pid) == [], [processes.command_line(pid) for pid in strays(app, before.pid)]
    assert processes.still_running(tree) == [], [processes.command_line(pid) for pid in processes.still_running(tree)]
    assert before.pid in processes_with_env(SUPERLINK_MARKER, str(app))


def test_stop_stops_only_that_checkouts_superlink(checkouts, smoke_a):
    app_a, app_b = checkouts
    record_a = PrivateSuperLink(app_a).running()
    assert record_a is not None
    result = smoke_cli("smoke", str(app_a), "--stop", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"Stopped the private SuperLink of {app_a} (pid {record_a.pid})."
    assert processes_with_env(SUPERLINK_MARKER, str(app_a)) == []
    assert not (app_a / ".smoke" / "superlink.json").exists()
    record_b = PrivateSuperLink(app_b).running()
    if record_b is not None:  # B's own test ran: its SuperLink is untouched
        assert healthy(record_b.port)
    assert smoke_cli("smoke", str(app_a), "--stop", timeout=120).stdout.strip() == (
        f"No private SuperLink is running for {app_a}.")


def test_port_conflict_and_another_python_start_a_fresh_superlink(tmp_path):
    superlink = PrivateSuperLink(tmp_path / "app")
    first, second = superlink.candidate_ports()[:2]
    assert PrivateSuperLink(tmp_path / "app").candidate_ports()[:2] == [first, second]  # stable per path
    assert PrivateSuperLink(tmp_path / "other").candidate_ports()[0] != first
    try:
        with socket.socket() as squatter:  # a foreign listener on the checkout's first port
            squatter.bind(("127.0.0.1", first))
            squatter.listen()
            record, note = superlink.ensure()
        assert note == "started" and record.port != first
        assert json.loads(superlink.record_path.read_text())["port"] == record.port
        assert servers.owns_listener(record.pid, record.port)

        again, note = superlink.ensure()  # the recorded port stays, the SuperLink is reused
        assert (note, again.pid, again.port) == ("reused", record.pid, record.port)

        stored = json.loads(superlink.record_path.read_text())
        stored.update(python="/elsewhere/bin/python", environment="/elsewhere|/elsewhere/bin/python3.11")
        superlink.record_path.write_text(json.dumps(stored))
        fresh, note = superlink.ensure()
        assert note.startswith("restarted (the previous one ran /elsewhere/bin/python")
        assert fresh.pid != record.pid and not superlink._is_ours(record.pid)
        assert fresh.environment == current_environment()
    finally:
        superlink.stop()
    assert processes_with_env(SUPERLINK_MARKER, str(superlink.app_dir)) == []


def test_a_foreign_listener_answering_health_is_not_taken_for_ours():
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert healthy(port) and not servers.port_free(port)
        assert servers.owns_listener(os.getpid(), port)
        assert not servers.owns_listener(os.getppid(), port)
    finally:
        server.shutdown()
        server.server_close()
