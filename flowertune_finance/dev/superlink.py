"""SuperLinks we start ourselves, never Flower's shared one: the smoke's per checkout, and one per private FLWR_HOME.

Flower's default local SuperLink is shared by port: a `flwr run` from any checkout or environment
joins whatever SuperLink listens on 39091 and runs there, with that SuperLink's Python. So the smoke
runs on a private SuperLink per checkout (`PrivateSuperLink`: FLWR_HOME `<app>/.smoke/flwr-home`, a
port derived from the app folder's path), and a private FLWR_HOME of the tests and benchmarks gets
its own (`launch.ensure_home_superlink`). Both start `flower-superlink` the way Flower's `:local:`
start does, on the first candidate port it manages to bind (`servers.Server`), and count it as up
only when it answers `/health` from its own socket.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from flowertune_finance.dev import control
from flowertune_finance.dev.processes import (
    alive,
    command_line,
    console_script,
    descendants,
    flwr_env,
    kill_processes_with_env,
    parent,
    process_environ,
    processes_with_env,
    started_at,
    still_running,
    terminate,
)
from flowertune_finance.dev.servers import Server, StartFailed, owns_listener, port_candidates

SMOKE_DIR = ".smoke"
SMOKE_CONNECTION = "smoke"  # the only connection in the private FLWR_HOME's config.toml
SUPERLINK_RECORD = "superlink.json"
SUPERLINK_MARKER = "FLOWERTUNE_SMOKE_SUPERLINK"  # env var = app folder, carried by every process it starts
SUPERLINK_STARTUP_TIMEOUT = 60.0
STOP_GRACE_S = 5.0
SIMULATION_EXIT_S = 30.0  # how long a stopped run's simulation process gets to exit before its strays are taken


class SuperLinkError(RuntimeError):
    """The private SuperLink could not be started."""


def healthy(port: int) -> bool:
    """A SuperLink's HTTP API answers `/health` on the port (what Flower's CLI probes), bypassing any proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


def ours_and_up(pid: int, port: int) -> bool:
    """The SuperLink `pid` answers on `port` from its own socket (a foreign SuperLink also answers /health)."""
    return alive(pid) and healthy(port) and owns_listener(pid, port)


def start_superlink(
    home: Path, env: Mapping[str, str], cwd: Path | None, ports: list[int], on_start: Callable[[Server], None]
) -> Server:
    """`flower-superlink` as Flower's own `:local:` start runs it, state in `home`; returns once it is up
    on the first port it could bind. `on_start` sees every start (a lost port means another one)."""
    log_file = home / "local-superlink" / "superlink.log"
    server = Server(
        name="flower-superlink", env=env, cwd=cwd, log_path=log_file, ports=ports, on_start=on_start,
        command=lambda port: [
            console_script("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "local-superlink" / "state.db"),
        ],
    )
    try:
        server.start().wait_ready(lambda started: ours_and_up(started.popen.pid, started.port), SUPERLINK_STARTUP_TIMEOUT)
    except StartFailed as error:
        raise SuperLinkError(str(error)) from error
    return server


def write_connection(home: Path, name: str, port: int) -> None:
    """The FLWR_HOME's config.toml: one connection to this port and nothing else, so no `flwr` command
    using it can start or reach another SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": name, name: {"address": f"127.0.0.1:{port}", "insecure": True}}}
    (home / "config.toml").write_text(tomli_w.dumps(config))


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """One caller at a time decides about a SuperLink (no two start one each)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- The smoke's SuperLink, one per checkout -----------------------------------------------------------

@dataclass(frozen=True)
class SuperLinkRecord:
    """What `.smoke/superlink.json` says about a checkout's private SuperLink."""

    app_dir: str
    flwr_home: str
    port: int
    pid: int
    python: str  # the interpreter that started it, as invoked (for people)
    environment: str  # which environment that is (for the reuse decision): see `current_environment`
    log_file: str
    started_at: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def current_python() -> str:
    return os.path.abspath(sys.executable)


def current_environment() -> str:
    """The environment this Python runs in: its prefix (two venvs of one base Python differ) and the
    resolved interpreter (`python` and `python3` of one venv are the same)."""
    return f"{sys.prefix}|{os.path.realpath(sys.executable)}"


class PrivateSuperLink:
    """The smoke's SuperLink for one checkout: FLWR_HOME `<app>/.smoke/flwr-home`, a port derived from the
    app folder's path (the next candidate, recorded, if another process holds it), the Python that
    started it recorded. Reused by later smokes of the same checkout and Python, never by anyone else:
    `flwr` commands reach it only through the private FLWR_HOME's `smoke` connection.
    """

    def __init__(self, app_dir: str | Path) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.folder = self.app_dir / SMOKE_DIR
        self.flwr_home = self.folder / "flwr-home"
        self.record_path = self.folder / SUPERLINK_RECORD
        self.log_file = self.flwr_home / "local-superlink" / "superlink.log"

    def candidate_ports(self) -> list[int]:
        """Stable per checkout: the same path always yields the same sequence."""
        return port_candidates(str(self.app_dir))

    def cli_env(self) -> dict[str, str]:
        """Environment for `flwr` commands against this SuperLink."""
        env = flwr_env(home=self.flwr_home)
        env.pop(SUPERLINK_MARKER, None)  # only the SuperLink's own processes carry the marker
        return env

    def read_record(self) -> SuperLinkRecord | None:
        try:
            return SuperLinkRecord(**json.loads(self.record_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> SuperLinkRecord | None:
        """The recorded SuperLink if its process is alive and is this checkout's."""
        record = self.read_record()
        return record if record is not None and self._is_ours(record.pid) else None

    def _is_ours(self, pid: int) -> bool:
        return process_environ(pid).get(SUPERLINK_MARKER) == str(self.app_dir)

    def _ours(self) -> list[int]:
        return processes_with_env(SUPERLINK_MARKER, str(self.app_dir))

    def ensure(self) -> tuple[SuperLinkRecord, str]:
        """Reuse this checkout's SuperLink, or start one; returns it and a note saying which happened."""
        with locked(self.folder / "superlink.lock"):
            record = self.read_record()
            note = "started"
            if record is not None and self._is_ours(record.pid):
                if record.environment != current_environment():
                    self._stop()
                    note = f"restarted (the previous one ran {record.python}, not {current_python()})"
                elif ours_and_up(record.pid, record.port):
                    write_connection(self.flwr_home, SMOKE_CONNECTION, record.port)
                    return record, "reused"
                else:
                    self._stop()
                    note = "restarted (the previous one did not answer)"
            else:
                self._stop()  # what a dead one left behind
            preferred = [record.port] if record is not None else []
            env = {**self.cli_env(), SUPERLINK_MARKER: str(self.app_dir)}
            ports = list(dict.fromkeys(preferred + self.candidate_ports()))
            try:  # the record is written at each start, so `smoke --stop` finds it even if start-up is interrupted
                server = start_superlink(self.flwr_home, env, self.app_dir, ports, self._write_record)
            except BaseException:
                self._stop()
                raise
            write_connection(self.flwr_home, SMOKE_CONNECTION, server.port)
            return self.read_record(), note

    def _write_record(self, server: Server) -> None:
        record = SuperLinkRecord(
            app_dir=str(self.app_dir), flwr_home=str(self.flwr_home), port=server.port, pid=server.popen.pid,
            python=current_python(), environment=current_environment(), log_file=str(self.log_file),
            started_at=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.record_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(asdict(record), indent=2) + "\n")
        temporary.replace(self.record_path)

    def _stop(self) -> None:
        """Every process carrying this checkout's marker (the SuperLink, and the SuperExec it detaches into
        its own session) and everything below them, Ray's renamed agents included."""
        ours = self._ours()
        terminate(still_running({**{pid: started_at(pid) for pid in ours}, **descendants(ours)}), STOP_GRACE_S)
        kill_processes_with_env(SUPERLINK_MARKER, str(self.app_dir), STOP_GRACE_S)  # any started meanwhile

    def run_processes(self) -> dict[int, int | None]:
        """The runs' simulation processes and everything below them (Ray's raylet, agents, workers), with
        their start times; only while a simulation lives does the process tree tie Ray's agents to it."""
        simulations = self._simulations()
        return {**{pid: started_at(pid) for pid in simulations}, **descendants(simulations)}

    def release_orphans(self, known: Mapping[int, int | None] | None = None, wait: float = SIMULATION_EXIT_S) -> list[int]:
        """Once no run is active here, stop what stopped runs left behind; returns their PIDs.

        `flwr stop` ends a run, but its simulation process takes a while to exit, and only then are its
        Ray daemons (~200 MB) orphaned. They cannot be found by the marker afterwards (Ray's agents rename
        themselves, which wipes it from their environment), so this follows the simulation processes'
        tree (from `known`, a `run_processes()` taken before the run was stopped, and while it waits) for
        up to `wait` seconds until the simulations have exited, stops whatever of that tree is still
        running, then every orphan carrying the marker (a process whose parent is neither the SuperLink
        nor another of its processes), and again for those that stopping orphaned in turn.
        """
        record = self.running()
        if record is None or _active_runs(self.cli_env()) != 0:
            return []
        tree = dict(known or {})
        deadline = time.time() + wait
        while (current := self.run_processes()) and time.time() < deadline:
            tree.update(current)
            time.sleep(0.2)
        tree.update(current)
        released = terminate(still_running(tree), STOP_GRACE_S)
        for _ in range(5):  # stopping an orphan orphans its own children (a raylet's agents)
            orphans = [pid for pid in self._orphans(record.pid) if pid not in released]
            if not orphans:
                break
            released += terminate(orphans, STOP_GRACE_S)
        return released

    def _simulations(self) -> list[int]:
        return [pid for pid in self._ours() if "flwr-simulation" in command_line(pid)]

    def _orphans(self, superlink_pid: int) -> list[int]:
        ours = set(self._ours())
        return sorted(pid for pid in ours if pid != superlink_pid and parent(pid) not in ours)

    def stop(self) -> SuperLinkRecord | None:
        """Stop this checkout's SuperLink and everything it started; returns what was running, if anything."""
        with locked(self.folder / "superlink.lock"):
            running = self.running()
            strays = self._ours()
            self._stop()
            self.record_path.unlink(missing_ok=True)
            if running is None and strays:  # no (valid) record, but processes of this checkout were left
                return SuperLinkRecord(str(self.app_dir), str(self.flwr_home), 0, strays[0], "", "", "", "")
            return running


def _active_runs(env: Mapping[str, str]) -> int | None:
    """How many runs the SuperLink has not finished (None if it cannot tell)."""
    try:
        listed = control.runs(env, [SMOKE_CONNECTION])
    except control.ControlError:
        return None
    return sum(not record.status.startswith("finished") for record in listed)
