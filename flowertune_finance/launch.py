"""Start the app with the real `flwr run`, wait for it, and tell success from failure.

`flwr run --stream` exits 0 even when the run failed, so this module submits the run,
streams its log, then asks the SuperLink for the run's final status (`flwr ls`).
Used by the CPU smoke command and by the end-to-end tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from flowertune_finance import tiny

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA = PACKAGE_DIR / "data" / "fingpt_sentiment_sample.jsonl"
NUM_SUPERNODES = 50  # fixed by the leaderboard rules

# The CPU smoke: same app, same code path, only the run config differs from the real run.
SMOKE_RUN_CONFIG: dict[str, Any] = {
    "model.quantization": 0,
    "num-server-rounds": 3,
    "train.seq-length": 128,
    "train.save-every-round": 5,
    "train.training-arguments.per-device-train-batch-size": 4,
    "train.training-arguments.max-steps": 2,
    "train.training-arguments.logging-steps": 1,
}


class RunFailed(RuntimeError):
    """`flwr run` could not start the run, or the run did not finish successfully."""


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str
    wall_time_s: float


def flwr_executable() -> str:
    """The `flwr` next to this Python (it starts `flower-superlink` by name, so that must be on PATH too)."""
    candidate = Path(sys.executable).parent / "flwr"
    return str(candidate) if candidate.exists() else (shutil.which("flwr") or "flwr")


def flwr_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for `flwr`: this venv's scripts first on PATH, the current env reused for the app."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port nobody listens on right now (for a private SuperLink)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs whose environment holds `name=value` (how we find what a private SuperLink spawned)."""
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


def kill_processes_with_env(name: str, value: str, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, every process carrying `name=value`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_with_env(name, value)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while pids and time.time() < deadline and processes_with_env(name, value):
            time.sleep(0.1)


def private_flwr_env(home: str | Path) -> dict[str, str]:
    """Environment for `flwr` with its own FLWR_HOME and free ports, so it neither reuses nor
    disturbs another SuperLink; stop what it started with `kill_processes_with_env("FLWR_HOME", home)`."""
    return {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


@contextmanager
def isolated_flwr() -> Iterator[dict[str, str]]:
    """A private FLWR_HOME + ports for the duration of the block; every process started under
    it (SuperLink, SuperExec, simulation, Ray workers) is killed on exit."""
    with tempfile.TemporaryDirectory(prefix="flwr-home-", ignore_cleanup_errors=True) as home:
        try:
            yield private_flwr_env(home)
        finally:
            kill_processes_with_env("FLWR_HOME", home)


def write_run_config(run_config: Mapping[str, Any], path: Path) -> Path:
    """A TOML file for `flwr run --run-config FILE` (dotted keys quoted, as flwr expects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(run_config)))
    return path


def run_app(
    app_dir: str | Path,
    run_config: Mapping[str, Any],
    num_supernodes: int = NUM_SUPERNODES,
    env: Mapping[str, str] | None = None,
    timeout: float = 900,
    stream: bool = True,
    connection: str | None = None,
    client_resources: Mapping[str, float] | None = None,
) -> RunResult:
    """Submit the app with `flwr run`, stream its log, and return its final status.

    `client_resources` (simulation only), e.g. `{"num-cpus": 4, "num-gpus": 1}`: what each
    ClientApp gets; Ray hides the GPU from clients that ask for none.
    Raises RunFailed when the run cannot be submitted, fails, or exceeds `timeout` seconds.
    """
    app_dir = Path(app_dir).resolve()
    env = flwr_env(env)
    flwr = flwr_executable()
    config_file = write_run_config(run_config, app_dir / ".smoke" / f"run-config-{os.getpid()}-{time.time_ns()}.toml")
    command = [flwr, "run", str(app_dir)] + ([connection] if connection else [])
    command += ["--run-config", str(config_file), "--format", "json"]
    if connection is None:
        resources = [f"client-resources-{name}={value}" for name, value in (client_resources or {}).items()]
        command += ["--federation-config", " ".join([f"num-supernodes={num_supernodes}", *resources])]
    started = time.time()
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    config_file.unlink(missing_ok=True)
    run_id = _run_id(submitted.stdout)
    if submitted.returncode != 0 or run_id is None:
        raise RunFailed(f"`flwr run` did not start the run:\n{submitted.stdout}\n{submitted.stderr}")
    where = [connection] if connection else []
    if stream:
        try:
            subprocess.run([flwr, "log", str(run_id), *where, "--stream"], env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    status = wait_for_run(run_id, env, deadline=started + timeout, where=where)
    result = RunResult(run_id=run_id, status=status, wall_time_s=time.time() - started)
    if status != "finished:completed":
        raise RunFailed(f"run {run_id} ended with status {status!r}; see `flwr log {run_id} --show`")
    return result


def _run_id(stdout: str) -> int | None:
    try:
        payload = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    run_id = payload.get("run-id") if isinstance(payload, dict) else None
    return int(run_id) if run_id is not None else None


def run_status(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> str:
    """The SuperLink's status of a run, such as `running` or `finished:completed`."""
    listed = subprocess.run(
        [flwr_executable(), "ls", *(where or []), "--run-id", str(run_id), "--format", "json"],
        env=dict(env), capture_output=True, text=True, timeout=60,
    )
    try:
        runs = json.loads(listed.stdout).get("runs", [])
    except json.JSONDecodeError as error:
        raise RunFailed(f"`flwr ls` gave no JSON: {listed.stdout}\n{listed.stderr}") from error
    return str(runs[0]["status"]) if runs else "unknown"


def wait_for_run(run_id: int, env: Mapping[str, str], deadline: float, where: list[str] | None = None) -> str:
    """Poll until the run has finished (or the deadline passes); return its status."""
    while True:
        status = run_status(run_id, env, where)
        if status.startswith("finished") or time.time() > deadline:
            return status
        time.sleep(1.0)


def ensure_tiny_model(folder: Path, architecture: str = "mistral") -> Path:
    """Build the tiny model into `folder` unless it is already there."""
    if not (folder / "config.json").is_file():
        tiny.build_tiny_model(folder, architecture=architecture)
    return folder


def smoke_run_config(app_dir: Path, model_dir: Path, quantization: int = 0, rounds: int = 3) -> dict[str, Any]:
    """The CPU smoke's run config: tiny model, bundled sample data, results under the app folder."""
    return {
        **SMOKE_RUN_CONFIG,
        "model.name": str(model_dir),
        "model.quantization": quantization,
        "num-server-rounds": rounds,
        "dataset.path": str(SAMPLE_DATA),
        "output.dir": str(app_dir / "results"),
    }
