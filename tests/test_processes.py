"""Process control of the harness: servers started on a port without racing another process for it,
stopping by marker with one grace period, and a private FLWR_HOME that never falls back to Flower's own
local SuperLink. Fast: small Python processes only, no Flower run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowertune_finance.dev import control
from flowertune_finance.dev.processes import (
    alive,
    descendants,
    flwr_env,
    flwr_executable,
    isolated_flwr,
    kill_processes_with_env,
    processes_with_env,
    still_running,
    terminate,
)
from flowertune_finance.dev.servers import Server, StartFailed, owns_listener, port_candidates, port_free

# A server that binds its port and listens; on a failed bind it prints the error (as uvicorn does) and exits 1.
LISTENER = """
import socket, sys, time
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    sock.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as error:
    print(f"error while attempting to bind: {error}", flush=True)
    sys.exit(1)
sock.listen()
print("listening", flush=True)
time.sleep(300)
"""
MARKER = "FLOWERTUNE_TEST_PROCESSES"


def listener(tmp_path: Path, ports: list[int], on_start=None) -> Server:
    return Server("listener", lambda port: [sys.executable, "-c", LISTENER, str(port)], flwr_env({MARKER: str(tmp_path)}),
                  tmp_path, tmp_path / "listener.log", ports, on_start=on_start)


def test_a_port_taken_between_the_check_and_the_bind_moves_the_server_to_the_next_candidate(tmp_path):
    ports = [port for port in port_candidates(str(tmp_path), 10) if port_free(port)][:3]
    squatters: list[socket.socket] = []

    def take_the_first_port(server: Server) -> None:  # another process binds it before the server does
        if not squatters:
            squatter = socket.socket()
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            squatters.append(squatter)

    server = listener(tmp_path, ports, take_the_first_port).start()
    try:
        server.wait_ready(lambda started: owns_listener(started.popen.pid, started.port), timeout=60)
        assert server.tried == ports[:2] and server.port == ports[1]
        assert "already in use" in server.log().lower() and "listening" in server.output()
        assert owns_listener(server.popen.pid, ports[1]) and not owns_listener(server.popen.pid, ports[0])
    finally:
        server.stop(grace=5)
        for squatter in squatters:
            squatter.close()
    assert not alive(server.popen.pid)


def test_a_server_failing_for_another_reason_is_reported_not_retried(tmp_path):
    server = Server("broken", lambda port: [sys.executable, "-c", "print('bad flag'); raise SystemExit(3)"],
                    flwr_env(), tmp_path, tmp_path / "broken.log", port_candidates(str(tmp_path), 3)).start()
    with pytest.raises(StartFailed, match=r"broken exited with code 3; log .*broken.log:\nbad flag"):
        server.wait_ready(lambda started: False, timeout=60)
    assert len(server.tried) == 1


def test_terminate_kills_what_ignores_sigterm_after_the_grace_period(tmp_path):
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ready', flush=True); time.sleep(300)"],
        env=flwr_env({MARKER: str(tmp_path)}), stdout=subprocess.PIPE, text=True,
    )
    assert stubborn.stdout.readline().strip() == "ready"  # its SIGTERM handler is in place
    started = time.time()
    assert terminate([stubborn.pid], grace=1.0) == [stubborn.pid]
    assert stubborn.wait(timeout=10) == -9 and time.time() - started >= 1.0
    stubborn.stdout.close()


def test_kill_processes_with_env_stops_a_marked_process_and_its_children(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"],
        env=flwr_env({MARKER: str(tmp_path)}),
    )
    deadline = time.time() + 30
    while len(processes_with_env(MARKER, str(tmp_path))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    marked = processes_with_env(MARKER, str(tmp_path))
    assert len(marked) == 2
    tree = descendants([parent.pid])  # the process tree finds the child even without looking at its environment
    assert sorted(tree) == sorted(set(marked) - {parent.pid}) and still_running(tree) == list(tree)
    assert sorted(kill_processes_with_env(MARKER, str(tmp_path), grace=5)) == sorted(marked)
    parent.wait(timeout=10)
    assert processes_with_env(MARKER, str(tmp_path)) == [] and still_running(tree) == []


def test_a_private_flwr_home_never_starts_flowers_own_local_superlink():
    """Before its SuperLink runs, a private home has no connection; Flower's lazy `:local:` start would
    then pick its shared default port. Under `private_flwr_env` it fails at once instead."""
    with isolated_flwr() as env:
        listed = subprocess.run([flwr_executable(), "ls", "--format", "json"], env=flwr_env(env),
                                capture_output=True, text=True, timeout=120, check=False)
        answer = json.loads(listed.stdout)
        assert answer["success"] is False and "local SuperLink on 127.0.0.1:0" in answer["error-message"], answer
        assert processes_with_env("FLWR_HOME", env["FLWR_HOME"]) == []


def test_control_api_questions_from_this_process_never_start_flowers_own_local_superlink():
    """The in-process Control API client (what `launch` and the smoke ask through) refuses the same, and
    leaves this process's FLWR_HOME as it found it."""
    with isolated_flwr() as env:
        before = os.environ.get("FLWR_HOME")
        with pytest.raises(control.ControlError, match=":local:"):
            control.runs(flwr_env(env))
        assert os.environ.get("FLWR_HOME") == before
        assert processes_with_env("FLWR_HOME", env["FLWR_HOME"]) == []
