"""Servers we launch (a SuperLink, a SuperNode), and the ports they listen on, without a port race.

A port is never picked by binding, closing and handing the number on: another process can take it
in between. A server is started on a candidate port instead and, when it fails to bind because
another process holds that port, started again on the next candidate (`Server.start`,
`Server.wait_ready`); it counts as up only once it owns the listening socket (`owns_listener`), not
merely when something answers there. Candidates lie below Linux's ephemeral range, so no outgoing
connection holds one, and derive from a folder's path, so different folders rarely try the same.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flowertune_finance.dev.processes import stop_group

# Below Linux's ephemeral range (32768+), so no outgoing connection holds a port we derive.
PORT_RANGE = (21000, 32000)
PORT_CANDIDATES = 25
PORT_TAKEN = "already in use"  # uvicorn ("address already in use") and Flower's gRPC servers say so on a lost bind


def port_candidates(seed: str, count: int = PORT_CANDIDATES) -> list[int]:
    """`count` distinct ports in PORT_RANGE, stable per seed (a folder's path): the same seed always
    yields the same sequence, and different folders rarely share one."""
    low, high = PORT_RANGE
    ports: list[int] = []
    attempt = 0
    while len(ports) < count:
        digest = hashlib.sha256(f"{seed}#{attempt}".encode()).digest()
        port = low + int.from_bytes(digest[:4], "big") % (high - low)
        if port not in ports:
            ports.append(port)
        attempt += 1
    return ports


def port_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:port right now (SO_REUSEADDR as uvicorn sets it, so only a listener
    blocks). Only a filter before a start: the start itself tells whether the port was won."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on `port` (from /proc/net/tcp*); None where /proc cannot tell."""
    inodes: set[str] = set()
    found_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes if found_table else None


def owns_listener(pid: int, port: int) -> bool:
    """Whether the listener on `port` is `pid`'s own socket (a foreign server may answer there too)."""
    inodes = listening_inodes(port)
    if inodes is None:
        return True  # no /proc: liveness and the server's own answer must do
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


class StartFailed(RuntimeError):
    """A server exited for another reason than a taken port, found no free port, or was not ready in time."""


@dataclass
class Server:
    """A server process we launch: `command(port)` in its own process group, with `env`, its output
    appended to `log_path`, on the first of `ports` it manages to bind."""

    name: str
    command: Callable[[int], list[str]]
    env: Mapping[str, str]
    cwd: Path | None
    log_path: Path
    ports: list[int]
    popen: subprocess.Popen | None = None
    port: int = 0
    tried: list[int] = field(default_factory=list)
    offset: int = 0  # where this start's output begins in the log
    on_start: Callable[[Server], None] | None = None  # sees every start (a lost port means another one)

    def start(self) -> Server:
        """Start on the next candidate nobody listens on; StartFailed when none is left."""
        untried = [port for port in self.ports if port not in self.tried]
        port = next((port for port in untried if port_free(port)), None)
        if port is None:
            tried = ", ".join(map(str, self.tried)) or "none free"
            raise StartFailed(f"no free port for {self.name} (tried {tried}); see {self.log_path}")
        self.port = port
        self.tried.append(port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_handle:
            self.popen = subprocess.Popen(
                self.command(port), env=dict(self.env), cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if self.on_start is not None:
            self.on_start(self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output(self) -> str:
        """What this start wrote to the log."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.offset)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def lost_port(self) -> bool:
        """It exited because another process took its port between our check and its bind."""
        return self.popen.poll() is not None and (PORT_TAKEN in self.output().lower() or not port_free(self.port))

    def wait_ready(self, ready: Callable[[Server], bool], timeout: float) -> None:
        """Block until `ready(self)`; on a lost port start again on the next candidate. Raises StartFailed
        (after stopping it) when it exits for another reason or is not ready within `timeout` seconds."""
        deadline = time.time() + timeout
        try:
            while not ready(self):
                if self.popen.poll() is not None:
                    if not self.lost_port():
                        raise StartFailed(f"{self.name} exited with code {self.popen.returncode}; "
                                          f"log {self.log_path}:\n{self.output()[-3000:]}")
                    self.start()
                elif time.time() > deadline:
                    raise StartFailed(f"{self.name} was not ready on port {self.port} within {timeout:.0f} s; "
                                      f"log {self.log_path}")
                time.sleep(0.2)
        except BaseException:  # also Ctrl-C: leave nothing half-started behind
            self.stop(grace=5.0)
            raise

    def stop(self, grace: float, sig: int = signal.SIGTERM) -> None:
        """`sig` to its whole process group (what it started too), SIGKILL after `grace` seconds; reaps it."""
        if self.popen is None:
            return
        stop_group(self.popen.pid, grace, sig)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
