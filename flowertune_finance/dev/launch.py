"""Start the app with the real `flwr run`, wait for it, and tell success from failure.

`flwr run --stream` exits 0 even when the run failed, so `run_app` submits the run, streams its
log, then asks the SuperLink for the run's final status (what `flwr ls` shows; see `control`). Used by the end-to-end tests,
the benchmarks, the learning proof and the local deployment; the CPU smoke command builds on it
(`smoke.py`). A run without a named connection goes to the SuperLink of the env's private FLWR_HOME
(`ensure_home_superlink`), never to Flower's shared local one.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowertune_finance.dev import control, tiny
from flowertune_finance.dev.processes import flwr_env, flwr_executable
from flowertune_finance.dev.servers import port_candidates
from flowertune_finance.dev.superlink import (
    SUPERLINK_RECORD,
    SuperLinkError,
    locked,
    ours_and_up,
    start_superlink,
    write_connection,
)
from flowertune_finance.leaderboard import NUM_SUPERNODES
from flowertune_finance.tools.run_config_check import write_run_config

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_DATA = PACKAGE_DIR / "data" / "fingpt_sentiment_sample.jsonl"

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
HOME_CONNECTION = "local"  # the only connection in a private FLWR_HOME's config.toml once its SuperLink runs


class RunFailed(RuntimeError):
    """`flwr run` could not start the run, or the run did not finish successfully; for a submitted run,
    `run_id` and `status`, the SuperLink's last status of it (`running` when the deadline came first)."""

    def __init__(self, message: str, status: str | None = None, run_id: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.run_id = run_id


@dataclass(frozen=True)
class RunResult:
    run_id: int
    status: str
    wall_time_s: float


def ensure_home_superlink(env: Mapping[str, str]) -> int:
    """The SuperLink of the private FLWR_HOME in `env` (a full environment, see `processes.flwr_env`),
    started with `env` on first use, so that the variables it carries (RAY_ADDRESS, say) reach the runs,
    as with Flower's own lazy start; reused while it lives; returns its port. Its config.toml then holds
    one connection, `local`, to it: `flwr` commands under that FLWR_HOME reach this SuperLink only."""
    home = Path(env["FLWR_HOME"])
    record = home / "local-superlink" / SUPERLINK_RECORD
    with locked(home / "superlink.lock"):
        try:
            known = json.loads(record.read_text())
            pid, port = int(known["pid"]), int(known["port"])
        except (OSError, ValueError, KeyError, TypeError):
            pid, port = 0, 0
        if not (pid and ours_and_up(pid, port)):
            server = start_superlink(home, env, None, port_candidates(str(home)), lambda started: None)
            pid, port = server.popen.pid, server.port
            record.write_text(json.dumps({"pid": pid, "port": port}) + "\n")
        write_connection(home, HOME_CONNECTION, port)
        return port


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
    """Submit the app with `flwr run`, follow its log (shown when `stream`), and return its final status.

    `client_resources` (simulation only), e.g. `{"num-cpus": 4, "num-gpus": 1}`: what each
    ClientApp gets; Ray hides the GPU from clients that ask for none. Without a `connection`, `env`
    must name a private FLWR_HOME (`processes.private_flwr_env`, `processes.isolated_flwr`): the run
    goes to that home's own SuperLink, started on first use with this `env`.
    Raises RunFailed when the run cannot be submitted, fails, or exceeds `timeout` seconds.
    """
    app_dir = Path(app_dir).resolve()
    if connection is None and not (env or {}).get("FLWR_HOME"):
        raise RunFailed("run_app needs a connection, or an env with a private FLWR_HOME (see isolated_flwr): "
                        "Flower's default local SuperLink is shared by every checkout on this machine")
    env = flwr_env(env)
    started = time.time()
    if connection is None:
        try:
            ensure_home_superlink(env)
        except SuperLinkError as error:
            raise RunFailed(f"the SuperLink of {env['FLWR_HOME']} did not start: {error}") from error
    flwr = flwr_executable()
    config_file = write_run_config(run_config, app_dir / ".smoke" / f"run-config-{os.getpid()}-{time.time_ns()}.toml")
    command = [flwr, "run", str(app_dir)] + ([connection] if connection else [])
    command += ["--run-config", str(config_file), "--format", "json"]
    if connection is None:
        resources = [f"client-resources-{name}={value}" for name, value in (client_resources or {}).items()]
        command += ["--federation-config", " ".join([f"num-supernodes={num_supernodes}", *resources])]
    submitted = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    config_file.unlink(missing_ok=True)
    run_id = run_id_of(submitted.stdout)
    if submitted.returncode != 0 or run_id is None:
        raise RunFailed(f"`flwr run` did not start the run:\n{submitted.stdout}\n{submitted.stderr}")
    where = [connection] if connection else []
    if stream:
        follow_log(run_id, env, deadline=started + timeout, where=where, show=True)
    status = wait_for_run(run_id, env, deadline=started + timeout, where=where, follow=not stream)
    result = RunResult(run_id=run_id, status=status, wall_time_s=time.time() - started)
    if status != "finished:completed":
        raise RunFailed(f"run {run_id} ended with status {status!r}; see `flwr log {run_id} --show`", status, run_id)
    return result


def run_id_of(stdout: str) -> int | None:
    try:
        payload = json.loads(stdout)
    except json.JSONDecodeError:
        return None
    run_id = payload.get("run-id") if isinstance(payload, dict) else None
    return int(run_id) if run_id is not None else None


def run_record(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> control.RunRecord | None:
    """The SuperLink's record of a run (what `flwr ls --run-id` shows), or None if it cannot tell."""
    try:
        return control.run_record(run_id, env, where)
    except control.ControlError:
        return None


def run_status(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> str:
    """The SuperLink's status of a run, such as `running` or `finished:completed`."""
    record = run_record(run_id, env, where)
    return record.status if record else "unknown"


def follow_log(
    run_id: int, env: Mapping[str, str], deadline: float, where: list[str] | None = None, show: bool = False
) -> None:
    """Block on the run's log stream (`flwr log RUN_ID --stream`, read in this process, see `control`)
    until the SuperLink closes it (it does once the run is finished) or the deadline passes; the log goes to
    stdout when `show`, else nowhere."""
    for line in control.log_lines(run_id, env, deadline, where):
        if show:
            print(line, end="", flush=True)


def wait_for_run(
    run_id: int, env: Mapping[str, str], deadline: float, where: list[str] | None = None, follow: bool = True
) -> str:
    """Wait until the run has finished (or the deadline passes); return its status.

    With `follow`, first sits on the run's log stream (`follow_log`, silent) until it ends; pass
    `follow=False` when the caller has already followed it. Then asks the SuperLink for the status,
    at most once a second, until it reads finished: a stream cut short (a lost connection) ends the
    wait no sooner than polling would."""
    if follow:
        follow_log(run_id, env, deadline, where)
    while True:
        status = run_status(run_id, env, where)
        if status.startswith("finished") or time.time() > deadline:
            return status
        time.sleep(1.0)


def stop_run(run_id: int, env: Mapping[str, str], where: list[str], wait: float = 30.0) -> str:
    """Stop the run (`flwr stop RUN_ID`), then wait until the SuperLink reports it finished; returns its status."""
    try:
        control.stop(run_id, env, where)
    except control.ControlError:
        pass  # the status below says whether the run ended anyway
    deadline = time.time() + wait
    status = run_status(run_id, env, where)
    while not status.startswith("finished") and time.time() < deadline:
        time.sleep(0.5)
        status = run_status(run_id, env, where)
    return status


def run_details(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> str:
    """The SuperLink's `status-details` of a run (why it failed), or '' if it has none."""
    record = run_record(run_id, env, where)
    return record.details if record else ""


def ensure_tiny_model(folder: Path, architecture: str = "mistral") -> Path:
    """Build the tiny model into `folder` unless it is already there (without a progress bar for its
    one weights file: the smoke's output stays one line per step)."""
    if not (folder / "config.json").is_file():
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            tiny.build_tiny_model(folder, architecture=architecture)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
    return folder


def sample_data(app_dir: str | Path) -> Path:
    """The sample data of the app folder (a checkout, an app unpacked from the Hub) when it holds them,
    else this package's: a smoke reads the files of the app it runs."""
    own = Path(app_dir) / SAMPLE_DATA.relative_to(PACKAGE_DIR.parents[1])
    return own if own.is_file() else SAMPLE_DATA


def smoke_run_config(app_dir: Path, model_dir: Path, quantization: int = 0, rounds: int = 3) -> dict[str, Any]:
    """The CPU smoke's run config: tiny model, the app folder's sample data, results under the app folder."""
    return {
        **SMOKE_RUN_CONFIG,
        "model.name": str(model_dir),
        "model.quantization": quantization,
        "num-server-rounds": rounds,
        "dataset.path": str(sample_data(app_dir)),
        "output.dir": str(app_dir / "results"),
    }
