"""Process control for everything the harness launches: Flower's environment, finding and stopping processes.

The environment variables for `flwr` and the servers are set in one place (`flwr_env`,
`private_flwr_env`). What we start is found again by a marker in its environment (a process
group does not hold everything: Flower's SuperExec detaches into its own session), and
`terminate` is the one way anything is stopped: SIGTERM, a grace period, SIGKILL. How servers are
started on a port without racing another process for it: `servers.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def console_script(name: str) -> str:
    """A console script of this environment (`flwr` starts `flower-superlink` by name from PATH, which
    `flwr_env` puts this environment first on)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def flwr_executable() -> str:
    """The `flwr` next to this Python."""
    return console_script("flwr")


def private_flwr_env(home: str | Path) -> dict[str, str]:
    """The Flower variables of a private FLWR_HOME: its own config and state, no runtime dependency
    installs, no update check, and Flower's own `:local:` SuperLink start disabled (port 0 is refused):
    no `flwr` command under it can start a SuperLink on Flower's shared default ports, or on a port picked
    in advance that another process may take first (`launch.run_app` starts the home's own). Every process
    under it carries FLWR_HOME, so `kill_processes_with_env("FLWR_HOME", home)` stops them all."""
    return {
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "0",
        "FLWR_LOCAL_CONTROL_API_PORT": "0",
    }


def flwr_env(extra: Mapping[str, str] | None = None, home: str | Path | None = None) -> dict[str, str]:
    """The full environment for `flwr` and the servers: this venv's scripts first on PATH, the current
    env reused for the app, `private_flwr_env(home)` when a home is given, then `extra`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.update(private_flwr_env(home) if home is not None else {})
    env.update(extra or {})
    return env


@contextmanager
def isolated_flwr() -> Iterator[dict[str, str]]:
    """A private FLWR_HOME for the duration of the block (`run_app` starts its SuperLink on first use);
    every process started under it (SuperLink, SuperExec, simulation, Ray workers) is killed on exit."""
    with tempfile.TemporaryDirectory(prefix="flwr-home-", ignore_cleanup_errors=True) as home:
        try:
            yield private_flwr_env(home)
        finally:
            kill_processes_with_env("FLWR_HOME", home)


# --- Finding and stopping processes -----------------------------------------------------------------

def process_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs whose environment holds `name=value` (how we find what a server spawned; a zombie has none)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"


def started_at(pid: int) -> int | None:
    """When the process started (clock ticks after boot): with its PID, what tells it from a later one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(roots: Iterable[int]) -> dict[int, int | None]:
    """Every process below `roots` (children, their children, ...), with its start time. Ray's agents
    rename themselves, which wipes the marker from their environment: while their parents live, the
    process tree still ties them to what started them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (ppid := parent(int(entry.name))) is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, int | None] = {}
    todo = [child for root in roots for child in children.get(root, [])]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = started_at(pid)
            todo += children.get(pid, [])
    return found


def still_running(snapshot: Mapping[int, int | None]) -> list[int]:
    """The processes of a snapshot (PID: start time) that are alive and are still the same processes."""
    return [pid for pid, start in snapshot.items() if start is not None and alive(pid) and started_at(pid) == start]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until none of `pids` is alive (at most `timeout` seconds); whether they all are gone."""
    pending = list(pids)
    deadline = time.time() + timeout
    while (pending := [pid for pid in pending if alive(pid)]) and time.time() < deadline:
        time.sleep(0.1)
    return not pending


def terminate(pids: Iterable[int], grace: float) -> list[int]:
    """SIGTERM `pids`, SIGKILL whichever is still alive after `grace` seconds; returns the PIDs signalled."""
    pids = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        if wait_gone(pids, grace):
            break
    return pids


def kill_processes_with_env(name: str, value: str, grace: float = 3.0) -> list[int]:
    """`terminate` every process carrying `name=value`, then those started while the first ones were stopping."""
    stopped: list[int] = []
    for _ in range(2):
        pids = [pid for pid in processes_with_env(name, value) if pid not in stopped]
        if not pids:
            break
        stopped += terminate(pids, grace)
    return stopped


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group, ignoring one that is already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(leader: int, grace: float, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to the process group `leader` leads; SIGKILL the group if the leader outlives `grace`."""
    signal_group(leader, sig)
    if not wait_gone([leader], grace):
        signal_group(leader, signal.SIGKILL)
        wait_gone([leader], grace)


@contextmanager
def signals_ignored(signals: tuple[int, ...] = (signal.SIGINT,)) -> Iterator[None]:
    """Ignore `signals` for the block, so that stopping what we started always finishes (a second Ctrl-C,
    or `timeout` signalling its whole group); only the main thread may change handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
