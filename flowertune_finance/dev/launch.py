"""Start the app with the real `flwr run`, wait for it, and tell success from failure.

`flwr run --stream` exits 0 even when the run failed, so this module submits the run,
streams its log, then asks the SuperLink for the run's final status (`flwr ls`).
Used by the CPU smoke command and by the end-to-end tests.

The smoke command runs on a private SuperLink per checkout (`PrivateSuperLink`): its own
FLWR_HOME under `<app>/.smoke/flwr-home` and its own port, because Flower's default local
SuperLink is shared by port — a `flwr run` from any checkout or environment would otherwise
join whatever SuperLink listens on 39091 and run there with that SuperLink's Python.
"""

from __future__ import annotations

import datetime
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomli_w

from flowertune_finance.dev import tiny
from flowertune_finance.leaderboard import NUM_SUPERNODES

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
    submitted = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)
    config_file.unlink(missing_ok=True)
    run_id = _run_id(submitted.stdout)
    if submitted.returncode != 0 or run_id is None:
        raise RunFailed(f"`flwr run` did not start the run:\n{submitted.stdout}\n{submitted.stderr}")
    where = [connection] if connection else []
    if stream:
        try:
            subprocess.run([flwr, "log", str(run_id), *where, "--stream"], check=False, env=env, timeout=timeout)
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


def run_record(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> dict[str, Any] | None:
    """The SuperLink's record of a run (`flwr ls --run-id`), or None if it lists none."""
    listed = subprocess.run(
        [flwr_executable(), "ls", *(where or []), "--run-id", str(run_id), "--format", "json"],
        check=False, env=dict(env), capture_output=True, text=True, timeout=60,
    )
    try:
        runs = json.loads(listed.stdout).get("runs", [])
    except json.JSONDecodeError as error:
        raise RunFailed(f"`flwr ls` gave no JSON: {listed.stdout}\n{listed.stderr}") from error
    return runs[0] if runs else None


def run_status(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> str:
    """The SuperLink's status of a run, such as `running` or `finished:completed`."""
    record = run_record(run_id, env, where)
    return str(record["status"]) if record else "unknown"


def wait_for_run(run_id: int, env: Mapping[str, str], deadline: float, where: list[str] | None = None) -> str:
    """Poll until the run has finished (or the deadline passes); return its status."""
    while True:
        status = run_status(run_id, env, where)
        if status.startswith("finished") or time.time() > deadline:
            return status
        time.sleep(1.0)


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


# --- Checking run-config overrides offline, the way Flower and the ServerApp will -------------------

# Flower's own `key=value` pattern (flwr.common.config.parse_config_args): text outside it is dropped silently.
_OVERRIDE_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


class RunConfigProblems(ValueError):
    """Overrides that `flwr run` or the ServerApp would reject; one message per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CheckedRunConfig:
    """The outcome of `check_run_config`: the overrides as Flower parsed them, the fused run config the
    ServerApp would receive, and the app's typed view of it."""

    overrides: dict[str, Any]
    run_config: dict[str, Any]
    config: Any  # flowertune_finance.config.AppConfig (imported lazily: it pulls in trl)


def app_default_config(app_dir: str | Path) -> dict[str, Any]:
    """The flat run-config defaults of the app's pyproject.toml, read and flattened by Flower's own code
    (which also validates the file the way `flwr run` does)."""
    from flwr.common.config import flatten_dict, get_project_config

    project = get_project_config(Path(app_dir))
    return flatten_dict(project["tool"]["flwr"]["app"].get("config", {}))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`--run-config` values (`"k=v k2=v2"` strings, or one `.toml` file) parsed by Flower's own parser.

    Flower silently drops text that is not a `key=value` pair, and reads a file only when its name
    ends in `.toml`; both are reported here instead, since a dropped override is what this check is for.
    """
    from flwr.common.config import parse_config_args

    problems = []
    for text in overrides:
        if text.endswith(".toml"):
            if not Path(text).expanduser().is_file():
                problems.append(f"run config file {text!r} does not exist")
            continue
        if Path(text).expanduser().is_file():
            problems.append(f"{text!r} is a file, but Flower reads a --run-config file only when its name ends in .toml")
            continue
        leftover = " ".join(_OVERRIDE_PAIR.sub(" ", text).split())
        if leftover:
            problems.append(f"{leftover!r} is not a key=value pair; Flower would ignore it")
    if problems:
        raise RunConfigProblems(problems)
    try:
        return parse_config_args(overrides)
    except Exception as error:  # click.ClickException, ValueError, TOMLDecodeError: Flower's wording, as is
        message = getattr(error, "message", None) or str(error)
        raise RunConfigProblems([f"the overrides do not parse: {message}"]) from error


def check_run_config(app_dir: str | Path, overrides: list[str]) -> CheckedRunConfig:
    """Validate overrides offline exactly as a run would: Flower's key check against pyproject.toml
    (each unknown key named with the closest valid one), Flower's merge, then `parse_run_config`.

    Raises RunConfigProblems listing every problem found.
    """
    from flwr.common.config import fuse_dicts

    from flowertune_finance.config import TRAINING_ARGUMENTS_PREFIX, ConfigError, parse_run_config

    app_dir = Path(app_dir)
    defaults = app_default_config(app_dir)
    parsed = parse_overrides(overrides)
    problems = []
    for key in (key for key in parsed if key not in defaults):
        close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
        if close:
            hint = f"did you mean '{close[0]}'?"
        elif key.startswith(TRAINING_ARGUMENTS_PREFIX):
            hint = f"to pass another trl.SFTConfig argument, add it under [tool.flwr.app.config] in {app_dir / 'pyproject.toml'}"
        else:
            hint = f"the keys are those under [tool.flwr.app.config] in {app_dir / 'pyproject.toml'}"
        problems.append(f"unknown run config key '{key}' (Flower rejects keys missing from pyproject.toml); {hint}")
    run_config = fuse_dicts(defaults, {k: v for k, v in parsed.items() if k in defaults}, check_keys=True)
    config = None
    try:
        with _quiet_library_notices():
            config = parse_run_config(run_config)
    except ConfigError as error:
        problems.append(str(error))
    if problems:
        raise RunConfigProblems(problems)
    return CheckedRunConfig(overrides=parsed, run_config=run_config, config=config)


@contextmanager
def _quiet_library_notices() -> Iterator[None]:
    """Keep a one-line answer one line: building an SFTConfig imports trl, whose imports warn about
    deprecations and (bitsandbytes) a missing optional kernel package, none of which concerns the check."""
    import logging
    import warnings

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        bnb_logger.setLevel(level)


# --- A private SuperLink per checkout, for the smoke --------------------------------------------------

SMOKE_DIR = ".smoke"
SMOKE_CONNECTION = "smoke"  # the only connection in the private FLWR_HOME's config.toml
SUPERLINK_RECORD = "superlink.json"
SUPERLINK_MARKER = "FLOWERTUNE_SMOKE_SUPERLINK"  # env var = app folder, carried by every process it starts
# Below Linux's ephemeral range (32768+), so no outgoing connection holds a port we derive.
PORT_RANGE = (21000, 32000)
PORT_CANDIDATES = 25
SUPERLINK_STARTUP_TIMEOUT = 60.0
STOP_GRACE_S = 5.0


class SuperLinkError(RuntimeError):
    """The private SuperLink could not be started."""


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
    app folder's path (another one, recorded, if a foreign process listens there), the Python that
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
        low, high = PORT_RANGE
        ports: list[int] = []
        attempt = 0
        while len(ports) < PORT_CANDIDATES:
            digest = hashlib.sha256(f"{self.app_dir}#{attempt}".encode()).digest()
            port = low + int.from_bytes(digest[:4], "big") % (high - low)
            if port not in ports:
                ports.append(port)
            attempt += 1
        return ports

    def cli_env(self) -> dict[str, str]:
        """Environment for `flwr` commands against this SuperLink."""
        env = flwr_env({"FLWR_HOME": str(self.flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1"})
        env.pop(SUPERLINK_MARKER, None)  # only the SuperLink's own processes carry the marker
        return env

    def _process_env(self, port: int) -> dict[str, str]:
        env = self.cli_env()
        env.update({SUPERLINK_MARKER: str(self.app_dir), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)})
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
        return _process_environ(pid).get(SUPERLINK_MARKER) == str(self.app_dir)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One smoke at a time decides about this checkout's SuperLink (no two start one each)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "superlink.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure(self) -> tuple[SuperLinkRecord, str]:
        """Reuse this checkout's SuperLink, or start one; returns it and a note saying which happened."""
        with self._locked():
            record = self.read_record()
            note = "started"
            if record is not None and self._is_ours(record.pid):
                if record.environment != current_environment():
                    self._stop(record)
                    note = f"restarted (the previous one ran {record.python}, not {current_python()})"
                elif _healthy(record.port) and _owns_listener(record.pid, record.port):
                    self._write_connection(record.port)
                    return record, "reused"
                else:
                    self._stop(record)
                    note = "restarted (the previous one did not answer)"
            else:
                kill_processes_with_env(SUPERLINK_MARKER, str(self.app_dir), STOP_GRACE_S)  # orphans of a dead one
            preferred = [record.port] if record is not None else []
            tried = []
            for port in dict.fromkeys(preferred + self.candidate_ports()):
                if not _port_free(port):
                    continue
                tried.append(port)
                started = self._start(port)
                if started is not None:
                    return started, note
            raise SuperLinkError(
                f"no free port for the private SuperLink (tried {', '.join(map(str, tried)) or 'none free'} "
                f"in {PORT_RANGE[0]}-{PORT_RANGE[1]}); see {self.log_file}"
            )

    def _start(self, port: int) -> SuperLinkRecord | None:
        """`flower-superlink` as Flower's own `:local:` start runs it, in its own process group with
        the marker; None when another process took the port first (the caller tries the next one)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command = [
            _script("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port),
            "--database", str(self.flwr_home / "local-superlink" / "state.db"),
        ]
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log_handle:
            process = subprocess.Popen(
                command, env=self._process_env(port), cwd=self.app_dir, stdin=subprocess.DEVNULL,
                stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True,
            )
        record = SuperLinkRecord(
            app_dir=str(self.app_dir), flwr_home=str(self.flwr_home), port=port, pid=process.pid,
            python=current_python(), environment=current_environment(), log_file=str(self.log_file),
            started_at=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        self._write_record(record)  # first, so that `smoke --stop` finds it even if start-up is interrupted
        deadline = time.time() + SUPERLINK_STARTUP_TIMEOUT
        try:
            while True:
                if process.poll() is not None:
                    output = _read_from(self.log_file, offset)
                    if "address already in use" in output.lower() or not _port_free(port):
                        return None
                    raise SuperLinkError(
                        f"flower-superlink exited with code {process.returncode}; log {self.log_file}:\n{output[-2000:]}"
                    )
                if _healthy(port) and _owns_listener(process.pid, port):
                    self._write_connection(port)
                    return record
                if time.time() > deadline:
                    raise SuperLinkError(
                        f"flower-superlink did not answer on port {port} within {SUPERLINK_STARTUP_TIMEOUT:.0f} s; "
                        f"log {self.log_file}"
                    )
                time.sleep(0.2)
        except BaseException:  # also Ctrl-C: leave nothing half-started behind
            self._stop(record)
            raise

    def _write_record(self, record: SuperLinkRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.record_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(asdict(record), indent=2) + "\n")
        temporary.replace(self.record_path)

    def _write_connection(self, port: int) -> None:
        """The private FLWR_HOME's config.toml: a `smoke` connection to this port and nothing else, so
        no `flwr` command using it can start or reach another SuperLink."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": SMOKE_CONNECTION,
                                SMOKE_CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def _stop(self, record: SuperLinkRecord | None) -> None:
        """SIGTERM the SuperLink's process group (SIGKILL after a grace period), then every process
        still carrying this checkout's marker (the SuperExec detaches into its own session)."""
        if record is not None and self._is_ours(record.pid) and _process_group(record.pid) == record.pid:
            signal_group(record.pid, signal.SIGTERM)
            deadline = time.time() + STOP_GRACE_S
            while self._is_ours(record.pid) and time.time() < deadline:
                time.sleep(0.1)
            if self._is_ours(record.pid):
                signal_group(record.pid, signal.SIGKILL)
        kill_processes_with_env(SUPERLINK_MARKER, str(self.app_dir), STOP_GRACE_S)

    def release_orphans(self) -> list[int]:
        """Kill what a stopped run left behind, once no run is active here; returns their PIDs.

        `flwr stop` ends the run's simulation process, but its Ray agents (~200 MB) survive as orphans
        until the SuperLink stops. Every process this SuperLink legitimately runs has it, or another of
        its processes, as parent; an orphan carrying the marker has neither.
        """
        record = self.running()
        if record is None or _active_runs(self.cli_env()) != 0:
            return []
        ours = set(processes_with_env(SUPERLINK_MARKER, str(self.app_dir)))
        orphans = [pid for pid in ours if pid != record.pid and _parent(pid) not in ours]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in orphans:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + STOP_GRACE_S
            while time.time() < deadline and any(self._is_ours(pid) for pid in orphans):
                time.sleep(0.1)
        return orphans

    def stop(self) -> SuperLinkRecord | None:
        """Stop this checkout's SuperLink and everything it started; returns what was running, if anything."""
        with self._locked():
            record = self.read_record()
            running = record if record is not None and self._is_ours(record.pid) else None
            strays = processes_with_env(SUPERLINK_MARKER, str(self.app_dir))
            self._stop(running)
            self.record_path.unlink(missing_ok=True)
            if running is None and strays:  # no (valid) record, but processes of this checkout were left
                return SuperLinkRecord(str(self.app_dir), str(self.flwr_home), 0, strays[0], "", "", "", "")
            return running


def _script(name: str) -> str:
    """A console script of this environment (the SuperLink starts `flower-superexec` by name from PATH,
    which `flwr_env` puts this environment first on)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _process_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"


def _active_runs(env: Mapping[str, str]) -> int | None:
    """How many runs the SuperLink has not finished (None if it cannot tell)."""
    listed = subprocess.run(
        [flwr_executable(), "ls", SMOKE_CONNECTION, "--format", "json"],
        check=False, env=dict(env), capture_output=True, text=True, timeout=60,
    )
    try:
        runs = json.loads(listed.stdout).get("runs", [])
    except json.JSONDecodeError:
        return None
    return sum(not str(run.get("status", "")).startswith("finished") for run in runs)


def _process_group(pid: int) -> int | None:
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


def _port_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:port (SO_REUSEADDR as uvicorn sets it, so only a listener blocks)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _healthy(port: int) -> bool:
    """The SuperLink's HTTP API answers `/health` (what Flower's CLI probes), bypassing any proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


def _listening_inodes(port: int) -> set[str] | None:
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


def _owns_listener(pid: int, port: int) -> bool:
    """Whether the listener on `port` is `pid`'s own socket (a foreign SuperLink also answers /health)."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return True  # no /proc: liveness and /health must do
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


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def venvs_inside(app_dir: str | Path) -> list[Path]:
    """Virtual environments in direct subfolders of the app folder (Flower's bundler walks them every run)."""
    folders = (child for child in Path(app_dir).iterdir() if child.is_dir() and not child.is_symlink())
    return sorted(folder for folder in folders if (folder / "pyvenv.cfg").is_file())


# --- The smoke run: submit, show one line per round, stop on Ctrl-C -----------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROGRESS = re.compile(r"(round \d+/\d+ · .*)$")  # metrics.progress_line, logged by the ServerApp each round
_RUN_FOLDER = re.compile(r"Run folder: (\S.*?)\s*$")
_SAVED_CHECKPOINT = re.compile(r"Saved checkpoint (\S.*?)\s*$")
_ROUND_PROBLEMS = re.compile(r"Round (\d+): (\d+) sampled, (\d+) replied, (\d+) failed, (\d+) rejected")
_NOTABLE = re.compile(r"(Round \d+ skipped.*|Stopping the run: .*)$")
_LEVEL = re.compile(r"^(INFO|WARNING|ERROR|DEBUG|CRITICAL)\s*:")


class RunInterrupted(RuntimeError):
    """Ctrl-C during the smoke: the run was asked to stop; `status` is what the SuperLink then reported."""

    def __init__(self, run_id: int | None, status: str) -> None:
        super().__init__(f"run {run_id} interrupted ({status})")
        self.run_id = run_id
        self.status = status


@dataclass(frozen=True)
class SmokeResult:
    run_id: int
    status: str
    wall_time_s: float
    run_dir: Path | None
    checkpoint: Path | None
    log_file: Path


class _LogWatcher:
    """Keeps a run's full log in a file and shows either all of it (`verbose`) or what matters: one
    line per round, rounds whose clients failed, and the ServerApp's reasons for stopping."""

    def __init__(self, log_file: Path, verbose: bool, say: Callable[[str], None]) -> None:
        self.handle = log_file.open("a", encoding="utf-8")
        self.verbose = verbose
        self.say = say
        self.run_dir: Path | None = None
        self.checkpoint: Path | None = None
        self.error_block: list[str] = []
        self._in_error = False

    def feed(self, raw: str) -> None:
        self.handle.write(raw)
        self.handle.flush()
        if self.verbose:
            self.say(raw.rstrip("\n"))
        line = _ANSI.sub("", raw).rstrip()
        if (match := _RUN_FOLDER.search(line)) and self.run_dir is None:
            self.run_dir = Path(match.group(1))
            self._show(f"Run folder: {self.run_dir}")
        if match := _SAVED_CHECKPOINT.search(line):
            self.checkpoint = Path(match.group(1))
        if match := _PROGRESS.search(line):
            self._show(f"  {match.group(1)}")
        if (match := _ROUND_PROBLEMS.search(line)) and (int(match.group(4)) or int(match.group(5))):
            self._show(f"  round {match.group(1)}: {match.group(4)} of {match.group(2)} clients failed, "
                       f"{match.group(5)} replies rejected (details in the full log)")
        if match := _NOTABLE.search(line):
            self._show(f"  {match.group(1)}")
        self._track_errors(line)

    def _track_errors(self, line: str) -> None:
        """The newest ERROR message and its continuation lines, for the failure summary."""
        level = _LEVEL.match(line)
        if level and level.group(1) == "ERROR":
            self.error_block, self._in_error = [line], True
        elif level:
            self._in_error = False
        elif self._in_error and len(self.error_block) < 12:
            self.error_block.append(line)

    def _show(self, text: str) -> None:
        if not self.verbose:
            self.say(text)

    def close(self) -> None:
        self.handle.close()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """No second Ctrl-C while a run is being stopped (only the main thread may change handlers)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_run(run_id: int, env: Mapping[str, str], where: list[str], wait: float = 30.0) -> str:
    """`flwr stop RUN_ID`, then wait until the SuperLink reports the run finished; returns its status."""
    subprocess.run(
        [flwr_executable(), "stop", str(run_id), *where, "--format", "json"],
        check=False, env=dict(env), capture_output=True, text=True, timeout=60,
    )
    deadline = time.time() + wait
    status = run_status(run_id, env, where)
    while not status.startswith("finished") and time.time() < deadline:
        time.sleep(0.5)
        status = run_status(run_id, env, where)
    return status


def _submit(command: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """`flwr run` in its own session, so a Ctrl-C cannot cut a submission in half: on Ctrl-C the
    submission completes and the run it created is stopped."""
    process = subprocess.Popen(
        command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except KeyboardInterrupt:
        with _sigint_ignored():
            stdout, _ = process.communicate(timeout=120)
            run_id = _run_id(stdout)
            status = stop_run(run_id, env, command[3:4]) if run_id is not None else "not submitted"
        raise RunInterrupted(run_id, status) from None
    except subprocess.TimeoutExpired as error:
        process.kill()
        raise RunFailed("`flwr run` did not return within 120 s") from error
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_smoke(
    superlink: PrivateSuperLink,
    run_config: Mapping[str, Any],
    num_supernodes: int = NUM_SUPERNODES,
    verbose: bool = False,
    say: Callable[[str], None] = print,
    timeout: float = 3600,
) -> SmokeResult:
    """Submit the smoke run to the checkout's private SuperLink and follow it to its final status.

    By default prints one line per round (the ServerApp's progress line) and keeps Flower's full log
    in `.smoke/logs/run-<id>.log`; `verbose` prints the full log as it comes. Ctrl-C stops the run
    (`flwr stop`) and raises RunInterrupted; a run that does not complete raises RunFailed.
    """
    env = superlink.cli_env()
    where = [SMOKE_CONNECTION]
    flwr = flwr_executable()
    config_file = write_run_config(run_config, superlink.folder / f"run-config-{os.getpid()}-{time.time_ns()}.toml")
    command = [flwr, "run", str(superlink.app_dir), SMOKE_CONNECTION, "--run-config", str(config_file),
               "--format", "json", "--federation-config", f"num-supernodes={num_supernodes}"]
    started = time.time()
    try:
        submitted = _submit(command, env)
    finally:
        config_file.unlink(missing_ok=True)
    run_id = _run_id(submitted.stdout)
    if submitted.returncode != 0 or run_id is None:
        raise RunFailed(f"`flwr run` did not start the run:\n{submitted.stdout}\n{submitted.stderr}")
    log_dir = superlink.folder / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"run-{run_id}.log"
    say(f"Run {run_id} submitted ({num_supernodes} SuperNodes); Ctrl-C stops it. Full log: {log_file}")
    watcher = _LogWatcher(log_file, verbose, say)
    try:
        _follow_log(flwr, run_id, where, env, watcher, deadline=started + timeout)
        status = wait_for_run(run_id, env, deadline=max(started + timeout, time.time() + 30), where=where)
    except KeyboardInterrupt:
        with _sigint_ignored():
            status = stop_run(run_id, env, where)
            if status.startswith("finished"):
                superlink.release_orphans()
        raise RunInterrupted(run_id, status) from None
    finally:
        watcher.close()
    run_dir = watcher.run_dir or _newest_folder(Path(str(run_config.get("output.dir", ""))), started)
    checkpoint = watcher.checkpoint or (_newest_checkpoint(run_dir) if run_dir else None)
    result = SmokeResult(run_id, status, time.time() - started, run_dir, checkpoint, log_file)
    if status != "finished:completed":
        details = run_details(run_id, env, where)
        why = details or "\n".join(watcher.error_block) or "see the log"
        raise RunFailed(f"run {run_id} ended with status {status!r}: {why}\nFull log: {log_file}")
    return result


def _follow_log(
    flwr: str, run_id: int, where: list[str], env: Mapping[str, str], watcher: _LogWatcher, deadline: float
) -> None:
    """Feed `flwr log --stream` into the watcher until the run ends (the stream closes) or the deadline."""
    import threading

    streamer = subprocess.Popen(
        [flwr, "log", str(run_id), *where, "--stream"], env=dict(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
    )
    watchdog = threading.Timer(max(deadline - time.time(), 1.0), streamer.terminate)
    watchdog.daemon = True
    watchdog.start()
    try:
        for line in streamer.stdout:
            watcher.feed(line)
    finally:
        watchdog.cancel()
        if streamer.poll() is None:
            streamer.terminate()
            try:
                streamer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                streamer.kill()
        streamer.stdout.close()


def run_details(run_id: int, env: Mapping[str, str], where: list[str] | None = None) -> str:
    """The SuperLink's `status-details` of a run (why it failed), or '' if it has none."""
    try:
        record = run_record(run_id, env, where)
    except RunFailed:
        return ""
    details = str(record.get("status-details", "")) if record else ""
    return "" if details == "N/A" else details


def _newest_folder(output_dir: Path, since: float) -> Path | None:
    """The newest run folder created under `output_dir` after `since` (when the log named none)."""
    if not output_dir.is_dir():
        return None
    fresh = [p for p in output_dir.iterdir() if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(fresh, key=lambda p: p.stat().st_mtime, default=None)


def _newest_checkpoint(run_dir: Path) -> Path | None:
    numbered = [(int(p.name[5:]), p) for p in run_dir.glob("peft_*") if p.name[5:].isdigit()]
    return max(numbered)[1] if numbered else None
