"""Where a submission's numbers come from: the run's record and checkpoint, and the evaluation that scored it.

`gather_run` reads both sides and ties them together: the three accuracy files of one
evaluation, and, when `eval` wrote its summary, proof that it used the leaderboard's
computation (protocol mode, 4-bit, every example) on the exact adapter bytes submitted.
Every problem is listed in `problems`; nothing is raised for a bad file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict, get_project_config

from flowertune_finance.checkpoint import ADAPTER_WEIGHTS
from flowertune_finance.generation import file_sha256
from flowertune_finance.leaderboard import DATASETS as LEADERBOARD_DATASETS
from flowertune_finance.leaderboard import QUANTIZATION as LEADERBOARD_QUANTIZATION
from flowertune_finance.leaderboard import SET_SIZES as LEADERBOARD_SET_SIZES
from flowertune_finance.tools.run_folder import (
    check_checkpoint,
    check_rounds,
    check_static,
    planned_rounds,
    read_json_object,
    read_rounds,
    read_run_config,
)

LEADERBOARD_MODE = "protocol"  # `eval --mode`: only the official computation counts
# "Accuracy: {acc}. " with Python's float text (it always has a "." or an exponent): a truncated file fails to match
ACCURACY_PATTERN = re.compile(r"^Accuracy:\s*([0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)\.$")
RUN_EVAL_DIR = "eval"  # where `eval` writes the scores of a run's checkpoint, inside the run folder
OFFICIAL_EVAL_DIR = Path("benchmarks")  # where the leaderboard's own script writes
ACCURACY_TOLERANCE = 1e-4  # an acc_*.txt may round what the summary records


@dataclass(frozen=True)
class RunSummary:
    """What SUBMISSION.md reports, gathered and checked before anything is written.

    `evaluation` is the `summary_<run>.json` that `eval` wrote (None for the official
    script's files, which record no provenance).
    """

    run_dir: Path
    checkpoint: Path
    rounds: int
    communication_mb: float
    accuracies: dict[str, float]
    accuracy_files: dict[str, Path]
    run_name: str
    run_config: dict[str, Any]
    defaults: dict[str, Any]
    eval_dir: Path
    adapter_sha256: str
    evaluation: dict[str, Any] | None


def read_accuracy(path: Path) -> float:
    """The accuracy in a leaderboard `acc_*.txt` file (`Accuracy: 0.8316. `), a fraction in [0, 1]."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (not UTF-8); it should read 'Accuracy: <number>. '") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    match = ACCURACY_PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"{path} does not read 'Accuracy: <number>. '")
    value = float(match.group(1))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{path} holds accuracy {value}, outside [0, 1]")
    return value


def find_run_name(eval_dir: Path) -> str:
    """The one run name with an FPB accuracy file in `eval_dir`; ambiguity is an error, not a guess."""
    if not eval_dir.is_dir():
        raise ValueError(f"evaluation folder {eval_dir} is not a folder; run `flowertune-finance eval` or pass --eval-dir")
    names = sorted(p.name[len("acc_fpb_"):-len(".txt")] for p in eval_dir.glob("acc_fpb_*.txt"))
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        raise ValueError(f"pass --run-name: {eval_dir} holds accuracy files of {len(names)} runs ({found})")
    return names[0]


def default_eval_dir(run_dir: Path) -> Path:
    """`RUN_DIR/eval` (where `eval` writes a run's scores) if it exists, else the official script's `benchmarks`."""
    return run_dir / RUN_EVAL_DIR if (run_dir / RUN_EVAL_DIR).is_dir() else OFFICIAL_EVAL_DIR


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's default run config (`[tool.flwr.app.config]` of its pyproject.toml), flat as Flower sees it."""
    return flatten_dict(get_project_config(app_dir)["tool"]["flwr"]["app"]["config"])


def read_accuracies(eval_dir: Path, run_name: str, checkpoint: Path | str, problems: list[str]
                    ) -> tuple[dict[str, float], dict[str, Path]]:
    """The accuracy and file of each leaderboard set found in `eval_dir` under `run_name`."""
    accuracies: dict[str, float] = {}
    files: dict[str, Path] = {}
    for dataset in LEADERBOARD_DATASETS:
        path = eval_dir / f"acc_{dataset}_{run_name}.txt"
        if not path.is_file():
            problems.append(f"accuracy file {path} is missing (run `flowertune-finance eval` on {checkpoint})")
            continue
        try:
            accuracies[dataset] = read_accuracy(path)
            files[dataset] = path
        except ValueError as error:
            problems.append(str(error))
    return accuracies, files


def check_evaluation(path: Path, checkpoint: Path | None, sha256: str | None, accuracies: dict[str, float],
                     problems: list[str]) -> dict[str, Any] | None:
    """Check `eval`'s summary: protocol mode, 4-bit, and the submitted checkpoint's exact adapter bytes."""
    summary, error = read_json_object(path, "an evaluation summary")
    if error is not None:
        problems.append(f"{error}: the accuracies' provenance cannot be checked")
        return None
    mode, quantization = summary.get("mode"), summary.get("quantization")
    if mode != LEADERBOARD_MODE:
        problems.append(f"{path.name} records mode {mode!r}: only mode {LEADERBOARD_MODE!r} (the leaderboard's "
                        "computation) counts; rerun `flowertune-finance eval --mode protocol`")
    if isinstance(quantization, bool) or quantization != LEADERBOARD_QUANTIZATION:
        problems.append(f"{path.name} records quantization {quantization!r}: the leaderboard scores with "
                        f"{LEADERBOARD_QUANTIZATION}-bit; rerun `flowertune-finance eval --quantization 4`")
    batch_size, base_model = summary.get("batch_size"), summary.get("base_model")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"{path.name} records batch_size {batch_size!r}, not a positive integer")
    if not isinstance(base_model, str) or not base_model:
        problems.append(f"{path.name} records base_model {base_model!r}, not a model name or folder")
    counts = summary.get("counts")
    partial = {d: counts.get(d) for d in LEADERBOARD_DATASETS if counts.get(d) != LEADERBOARD_SET_SIZES[d]
               } if isinstance(counts, dict) else {}
    if summary.get("limit") is not None or partial:
        scored_sets = ", ".join(f"{d} {n}" for d, n in partial.items()) or f"limit {summary.get('limit')!r}"
        problems.append(f"{path.name} scored part of the sets ({scored_sets}); the leaderboard scores every "
                        f"example ({', '.join(f'{d} {n:,}' for d, n in LEADERBOARD_SET_SIZES.items())})")
    recorded, scored = summary.get("adapter_sha256"), summary.get("peft_path")
    if not recorded:
        what = "the bare base model" if scored is None else f"{scored} without recording its adapter's sha256"
        problems.append(f"{path.name} scored {what}: its accuracies cannot be tied to {checkpoint or 'the checkpoint'}")
    elif sha256 is not None and recorded != sha256:
        problems.append(f"{path.name} scored another checkpoint ({scored}, adapter sha256 {str(recorded)[:12]}...) "
                        f"than the one submitted ({checkpoint}, sha256 {sha256[:12]}...); evaluate {checkpoint}")
    for dataset, value in accuracies.items():
        noted = summary.get(dataset)
        if isinstance(noted, (int, float)) and not math.isclose(noted, value, abs_tol=ACCURACY_TOLERANCE):
            problems.append(f"acc_{dataset}_{path.stem.removeprefix('summary_')}.txt holds {value} but "
                            f"{path.name} records {noted}: the files come from different evaluations")
    return summary


def gather_run(run_dir: Path, eval_dir: Path, run_name: str | None, app_dir: Path, problems: list[str]
               ) -> RunSummary | None:
    """Everything a submission reports, checked; None when anything is wrong (all of it listed in `problems`)."""
    run_config = read_run_config(run_dir, problems)
    check_static(run_config, problems)
    num_rounds = planned_rounds(run_config, problems)
    records = read_rounds(run_dir, problems)
    communication_mb = check_rounds(records, num_rounds, problems)
    checkpoint = check_checkpoint(run_dir, num_rounds, problems)
    sha256 = file_sha256(checkpoint / ADAPTER_WEIGHTS) if checkpoint is not None else None

    accuracies: dict[str, float] = {}
    files: dict[str, Path] = {}
    evaluation = None
    try:
        run_name = run_name or find_run_name(eval_dir)
    except ValueError as error:
        problems.append(str(error))
    else:
        accuracies, files = read_accuracies(eval_dir, run_name, checkpoint or run_dir, problems)
        summary_path = eval_dir / f"summary_{run_name}.json"
        if summary_path.exists():
            evaluation = check_evaluation(summary_path, checkpoint, sha256, accuracies, problems)
    try:
        defaults = app_defaults(app_dir)
    except (OSError, KeyError, TypeError, ValueError) as error:
        problems.append(f"no app defaults to compare with in {app_dir}: {error}; pass --app-dir")
        defaults = {}
    if problems or checkpoint is None or sha256 is None or run_name is None:
        return None
    return RunSummary(run_dir, checkpoint, len(records), communication_mb, accuracies, files, run_name,
                      run_config, defaults, eval_dir, sha256, evaluation)
