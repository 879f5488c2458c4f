"""`flowertune-finance smoke`: the real app through the real `flwr run` on this checkout's private SuperLink.

The run is submitted to the checkout's `PrivateSuperLink`; its log is followed and kept in
`.smoke/logs/run-<id>.log` while one line per round is shown; a failed run is reported with the
SuperLink's reason; Ctrl-C stops the run (`flwr stop`) and what it left behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowertune_finance.dev import control
from flowertune_finance.dev.launch import RunFailed, run_details, run_id_of, stop_run, wait_for_run
from flowertune_finance.dev.processes import flwr_executable, signals_ignored
from flowertune_finance.dev.superlink import SMOKE_CONNECTION, PrivateSuperLink
from flowertune_finance.leaderboard import NUM_SUPERNODES
from flowertune_finance.tools.run_config_check import write_run_config


def venvs_inside(app_dir: str | Path) -> list[Path]:
    """Virtual environments in direct subfolders of the app folder (Flower's bundler walks them every run)."""
    folders = (child for child in Path(app_dir).iterdir() if child.is_dir() and not child.is_symlink())
    return sorted(folder for folder in folders if (folder / "pyvenv.cfg").is_file())


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


def _submit(command: list[str], env: Mapping[str, str], stop: Callable[[int], str]) -> subprocess.CompletedProcess:
    """`flwr run` in its own session, so a Ctrl-C cannot cut a submission in half: on Ctrl-C the
    submission completes and the run it created is stopped (`stop(run_id)`)."""
    process = subprocess.Popen(
        command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except KeyboardInterrupt:
        with signals_ignored():
            stdout, _ = process.communicate(timeout=120)
            run_id = run_id_of(stdout)
            status = stop(run_id) if run_id is not None else "not submitted"
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
    config_file = write_run_config(run_config, superlink.folder / f"run-config-{os.getpid()}-{time.time_ns()}.toml")
    command = [flwr_executable(), "run", str(superlink.app_dir), SMOKE_CONNECTION, "--run-config", str(config_file),
               "--format", "json", "--federation-config", f"num-supernodes={num_supernodes}"]
    started = time.time()
    try:
        submitted = _submit(command, env, lambda run_id: _stop(superlink, run_id, env, where))
    finally:
        config_file.unlink(missing_ok=True)
    run_id = run_id_of(submitted.stdout)
    if submitted.returncode != 0 or run_id is None:
        raise RunFailed(f"`flwr run` did not start the run:\n{submitted.stdout}\n{submitted.stderr}")
    log_dir = superlink.folder / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"run-{run_id}.log"
    say(f"Run {run_id} submitted ({num_supernodes} SuperNodes); Ctrl-C stops it. Full log: {log_file}")
    watcher = _LogWatcher(log_file, verbose, say)
    try:
        for line in control.log_lines(run_id, env, started + timeout, where):
            watcher.feed(line)
        status = wait_for_run(
            run_id, env, deadline=max(started + timeout, time.time() + 30), where=where, follow=False
        )
    except KeyboardInterrupt:
        with signals_ignored():
            status = _stop(superlink, run_id, env, where)
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


def _stop(superlink: PrivateSuperLink, run_id: int, env: Mapping[str, str], where: list[str]) -> str:
    """`flwr stop` the run; once it is finished, stop what it left behind: `release_orphans` waits for
    the run's simulation process to exit (its Ray daemons are orphaned only then), following its
    process tree from before the stop, since Ray's agents cannot be found by the marker."""
    before = superlink.run_processes()
    status = stop_run(run_id, env, where)
    if status.startswith("finished"):
        superlink.release_orphans(before)
    return status


def _newest_folder(output_dir: Path, since: float) -> Path | None:
    """The newest run folder created under `output_dir` after `since` (when the log named none)."""
    if not output_dir.is_dir():
        return None
    fresh = [p for p in output_dir.iterdir() if p.is_dir() and p.stat().st_mtime >= since - 1]
    return max(fresh, key=lambda p: p.stat().st_mtime, default=None)


def _newest_checkpoint(run_dir: Path) -> Path | None:
    numbered = [(int(p.name[5:]), p) for p in run_dir.glob("peft_*") if p.name[5:].isdigit()]
    return max(numbered)[1] if numbered else None
