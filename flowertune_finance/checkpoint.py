"""Adapter checkpoints and run state, written atomically, found again and checked for resume.

A checkpoint is a folder `<run>/peft_<round>` holding what `PeftModel.from_pretrained`
reads (`adapter_config.json`, `adapter_model.safetensors`) plus `run_state.json`, the
little the server needs to continue the run. The folder is assembled under a temporary
name and renamed into place (`staged_folder`, which `submit` uses too), so a crash mid-write
never leaves a `peft_<round>` that looks complete, and an existing folder is never overwritten.
A resumed run continues the newest checkpoint only if it is the same run: same defining
settings, rounds left, an adapter that fits the model.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS
from safetensors.torch import load_file, save_file

from flowertune_finance.metrics import METRICS_FILE, RUN_CONFIG, append_metrics

RUN_STATE = "run_state.json"
CHECKPOINT_PATTERN = re.compile(r"^peft_(\d+)$")
NAME_ATTEMPTS = 1000  # `<stamp>`, `<stamp>-1`, ...: far more writers than can start within one second
# Model settings added after checkpoints were first written, with the value such a checkpoint was trained
# with: a checkpoint that lacks one resumes as if it recorded that value.
MODEL_SETTINGS_ADDED = {"lora_target_modules": "", "lora_freeze_a": False}


class CheckpointError(RuntimeError):
    """A checkpoint or run folder is missing, incomplete, or belongs to another run."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    round: int
    state: dict[str, Any]


def claim_timestamped_name(parent: Path, claim: Callable[[Path], None], prefix: str = "", suffix: str = "") -> Path:
    """`parent/<prefix><time><suffix>`, or the first of `<time>-1`, `<time>-2`, ... that `claim` could take.

    `claim` creates the name and raises FileExistsError when it is taken, so two writers
    within the same second never share or replace each other's file or folder.
    """
    stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    for attempt in range(NAME_ATTEMPTS):
        path = parent / f"{prefix}{stamp}{f'-{attempt}' if attempt else ''}{suffix}"
        try:
            claim(path)
        except FileExistsError:
            continue
        return path
    raise CheckpointError(f"no free name like {prefix}{stamp}{suffix} in {parent}: {NAME_ATTEMPTS} are taken")


def create_run_dir(output_dir: str | Path) -> Path:
    """A new, empty run folder `<output_dir>/<timestamp>` (suffixed if the name is taken)."""
    base = Path(output_dir).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    return claim_timestamped_name(base, Path.mkdir)


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise FileExistsError(f"{target} already exists; refusing to overwrite it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A new folder to fill, under a temporary name beside `target`; when the block ends without
    an error, its files are forced to disk and it is renamed to `target` in one step.

    `target`'s parent must exist. An existing `target` is refused with FileExistsError, on entry
    and again at the rename (callers check earlier with their own message); on any error the
    temporary folder is removed.
    """
    _refuse_existing(target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():  # left by a killed process that had the same pid
        shutil.rmtree(staging)
    try:
        staging.mkdir()
        yield staging
        for path in [*staging.rglob("*"), staging]:
            _fsync(path)
        _refuse_existing(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(target.parent)


def save_checkpoint(
    run_dir: Path, server_round: int, adapter: dict[str, torch.Tensor], lora: LoraConfig, state: dict[str, Any]
) -> Path:
    """Write `peft_<round>` with the adapter and the run state; refuse to overwrite."""
    target = run_dir / f"peft_{server_round}"
    if target.exists():
        raise CheckpointError(f"checkpoint {target} already exists; refusing to overwrite it")
    with staged_folder(target) as staging:
        saved_config = copy.deepcopy(lora)
        saved_config.inference_mode = True  # as PeftModel.save_pretrained writes it
        saved_config.save_pretrained(str(staging))
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in adapter.items()}
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / RUN_STATE).write_text(json.dumps({"round": server_round, **state}, indent=2))
    return target


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


def with_settings_added_since(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded settings, completed with `MODEL_SETTINGS_ADDED` it predates."""
    if not isinstance(saved.get("model"), dict):
        return saved
    return {**saved, "model": {**MODEL_SETTINGS_ADDED, **saved["model"]}}


def check_resumable(checkpoint: Checkpoint, resume_from: str, settings: dict[str, Any], num_server_rounds: int) -> None:
    """Refuse to continue a checkpoint whose run-defining settings differ from `settings` (the
    resumed run's `AppConfig.defining_settings()`), or whose run already has all its rounds."""
    saved = with_settings_added_since(checkpoint.state.get("settings", {}))
    current = json.loads(json.dumps(settings))  # the JSON types the checkpoint recorded
    if saved != current:
        changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
        raise CheckpointError(
            f"cannot resume {resume_from!r}: settings that define the run differ from the checkpoint's "
            f"({', '.join(changed)}); saved {json.dumps({k: saved.get(k) for k in changed})}, "
            f"now {json.dumps({k: current.get(k) for k in changed})}"
        )
    if checkpoint.round >= num_server_rounds:
        raise CheckpointError(
            f"cannot resume {resume_from!r}: its newest checkpoint is round {checkpoint.round} "
            f"of {num_server_rounds}, the run is already complete"
        )


def load_resumed_adapter(
    checkpoint: Checkpoint, resume_from: str, fresh: dict[str, torch.Tensor],
    frozen_a: dict[str, torch.Tensor] | None, model_name: str,
) -> dict[str, torch.Tensor]:
    """The checkpoint's adapter, refused unless it has the keys and shapes of `fresh` (what this model
    and LoRA make) and, with model.lora.freeze-a, exactly the seeded A matrices `frozen_a`."""
    resumed = load_adapter(checkpoint.path)
    if set(resumed) != set(fresh) or any(resumed[k].shape != fresh[k].shape for k in fresh):
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit model {model_name!r} with this LoRA")
    changed_a = sorted(key for key in frozen_a or {} if not torch.equal(resumed[key].float(), frozen_a[key]))
    if changed_a:
        raise CheckpointError(
            f"cannot resume {resume_from!r} with model.lora.freeze-a: {len(changed_a)} A matrices of "
            f"{checkpoint.path.name} (e.g. {changed_a[0]}) differ from the seeded initialisation derived here "
            "(another torch version?); the clients would train on a different A"
        )
    return resumed


def restart_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Start `metrics.jsonl` again from a checkpoint's history; the crashed run's file, whose lines
    may run ahead of the checkpoint, is kept as `metrics.before-resume-<time>.jsonl`."""
    metrics_path = run_dir / METRICS_FILE

    def move_to(kept: Path) -> None:
        _refuse_existing(kept)
        metrics_path.rename(kept)

    if metrics_path.exists():
        claim_timestamped_name(run_dir, move_to, prefix="metrics.before-resume-", suffix=".jsonl")
    for record in history:
        append_metrics(run_dir, record)


def write_run_config(run_dir: Path, run_config: dict[str, Any]) -> None:
    """Keep the run config next to the checkpoints (for `submit` and for humans)."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        path.write_text(json.dumps(dict(run_config), indent=2, sort_keys=True, default=str))
