"""Adapter checkpoints and run state, written atomically, found again for resume.

A checkpoint is a folder `<run>/peft_<round>` holding what `PeftModel.from_pretrained`
reads (`adapter_config.json`, `adapter_model.safetensors`) plus `run_state.json`, the
little the server needs to continue the run. The folder is assembled under a temporary
name and renamed into place, so a crash mid-write never leaves a `peft_<round>` that looks
complete, and an existing checkpoint is never overwritten.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from flowertune_finance.metrics import RUN_CONFIG

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_STATE = "run_state.json"
CHECKPOINT_PATTERN = re.compile(r"^peft_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint or run folder is missing, incomplete, or belongs to another run."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    round: int
    state: dict[str, Any]


def create_run_dir(output_dir: str | Path) -> Path:
    """A new, empty run folder `<output_dir>/<timestamp>` (suffixed if the name is taken)."""
    base = Path(output_dir).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for attempt in range(1000):
        run_dir = base / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise CheckpointError(f"could not create a new run folder under {base}")


def save_checkpoint(
    run_dir: Path, server_round: int, adapter: dict[str, torch.Tensor], lora: LoraConfig, state: dict[str, Any]
) -> Path:
    """Write `peft_<round>` with the adapter and the run state; refuse to overwrite."""
    target = run_dir / f"peft_{server_round}"
    if target.exists():
        raise CheckpointError(f"checkpoint {target} already exists; refusing to overwrite it")
    staging = run_dir / f".peft_{server_round}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    saved_config = copy.deepcopy(lora)
    saved_config.inference_mode = True  # as PeftModel.save_pretrained writes it
    saved_config.save_pretrained(str(staging))
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in adapter.items()}
    save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (staging / RUN_STATE).write_text(json.dumps({"round": server_round, **state}, indent=2))
    _fsync_dir(staging)
    os.rename(staging, target)
    _fsync_dir(run_dir)
    return target


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir() if path.is_dir() else ():
        if child.is_file():
            with child.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint folder."""
    return load_file(str(Path(path) / ADAPTER_WEIGHTS))


def read_checkpoint(path: Path) -> Checkpoint:
    """Validate and read one checkpoint folder; raise CheckpointError naming what is wrong."""
    match = CHECKPOINT_PATTERN.match(path.name)
    if not match:
        raise CheckpointError(f"{path} is not a checkpoint folder (expected a name like peft_<round>)")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_STATE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        state = json.loads((path / RUN_STATE).read_text())
        json.loads((path / ADAPTER_CONFIG).read_text())
        load_adapter(path)
    except Exception as error:  # json and safetensors raise various types on corrupt files
        raise CheckpointError(f"checkpoint {path} is corrupt: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: {RUN_STATE} holds {type(state).__name__}, not an object")
    if state.get("round") != int(match.group(1)):
        raise CheckpointError(f"checkpoint {path} records round {state.get('round')!r}, not {match.group(1)}")
    return Checkpoint(path=path, round=int(match.group(1)), state=state)


def checkpoint_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(round, folder) of every `peft_<round>` folder in a run folder, oldest first."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise CheckpointError(f"resume.from = {str(run_dir)!r}: no such run folder")
    return sorted(
        (int(m.group(1)), child) for child in run_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(child.name))
    )


def latest_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The newest complete checkpoint of a run folder; incomplete or corrupt ones are skipped
    with their reasons reported if none is usable."""
    candidates = checkpoint_folders(run_dir)
    problems = []
    for _, path in reversed(candidates):
        try:
            return read_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
    detail = "; ".join(problems) if problems else "it holds no peft_<round> folder"
    raise CheckpointError(f"resume.from = {str(run_dir)!r} has no complete checkpoint: {detail}")


def resume_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The checkpoint a resumed run continues from: the newest one, which must be complete
    and belong to the same run as the folder's other checkpoints.

    Unlike `latest_checkpoint`, a broken newest checkpoint is an error rather than skipped:
    the resumed run would otherwise reach that round and find the name taken, hours later.
    """
    if CHECKPOINT_PATTERN.match(Path(run_dir).name) or (Path(run_dir) / ADAPTER_CONFIG).is_file():
        raise CheckpointError(
            f"resume.from = {str(run_dir)!r} is a checkpoint folder; pass the run folder that holds it "
            f"({str(Path(run_dir).parent)!r}): a run resumes from its newest complete checkpoint"
        )
    candidates = checkpoint_folders(run_dir)
    if not candidates:
        raise CheckpointError(
            f"resume.from = {str(run_dir)!r} has no complete checkpoint: it holds no peft_<round> folder"
        )
    try:
        newest = read_checkpoint(candidates[-1][1])
    except CheckpointError as error:
        older = [path.name for _, path in candidates[:-1]]
        hint = f"move it out of the run folder to resume from {older[-1]}" if older else "no older checkpoint exists"
        raise CheckpointError(f"resume.from = {str(run_dir)!r}: {error}; {hint}") from error
    run_uid = newest.state.get("run_uid")
    for _, path in candidates[:-1]:
        try:
            other = json.loads((path / RUN_STATE).read_text()).get("run_uid")
        except (OSError, ValueError):
            continue  # an older broken checkpoint does not matter for the resume
        if other != run_uid:
            raise CheckpointError(
                f"resume.from = {str(run_dir)!r}: {newest.path.name} belongs to run {run_uid!r} but {path.name} "
                f"to run {other!r}; a run folder must hold the checkpoints of one run only"
            )
    return newest


def write_run_config(run_dir: Path, run_config: dict[str, Any]) -> None:
    """Keep the run config next to the checkpoints (for `submit` and for humans)."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        path.write_text(json.dumps(dict(run_config), indent=2, sort_keys=True, default=str))
