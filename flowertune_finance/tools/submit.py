"""Assemble what the FlowerTune LLM Leaderboard (Finance) asks for, after checking the run kept its rules.

A submission is the last round's PEFT checkpoint, the three accuracy files of the
evaluation and the communication cost, with SUBMISSION.md saying what was checked.
`check_run` collects every problem (a broken rule, a missing or unreadable file, accuracies
that cannot be tied to the submitted checkpoint; see `run_folder` and `provenance`) into one
`SubmissionError`, so nothing is written for a run the leaderboard would reject. The folder
is assembled under a temporary name and renamed into place (`checkpoint.staged_folder`); an
existing one is never overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flowertune_finance.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_PATTERN, staged_folder
from flowertune_finance.communication import PROJECTION_FILE
from flowertune_finance.config import parse_run_config
from flowertune_finance.generation import file_sha256
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB
from flowertune_finance.leaderboard import NUM_SUPERNODES as LEADERBOARD_SUPERNODES
from flowertune_finance.leaderboard import QUANTIZATION as LEADERBOARD_QUANTIZATION
from flowertune_finance.leaderboard import SET_SIZES as LEADERBOARD_SET_SIZES
from flowertune_finance.tools.provenance import (
    LEADERBOARD_MODE,
    RunSummary,
    default_eval_dir,
    gather_run,
    read_accuracy,
)
from flowertune_finance.tools.run_folder import LEADERBOARD_STATIC, read_json


class SubmissionError(RuntimeError):
    """The run lacks something the leaderboard requires, or broke one of its rules."""

    def __init__(self, run_dir: Path, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"cannot build a leaderboard submission from {run_dir}:\n{listed}")


def check_run_folder(run_dir: Path) -> None:
    """Refuse a path that is not a run folder, naming the run folder when a checkpoint was passed instead."""
    if CHECKPOINT_PATTERN.match(run_dir.name) or (run_dir / ADAPTER_CONFIG).is_file():
        problem = (f"{run_dir} is a checkpoint folder; pass the run folder that holds it ({run_dir.parent}): "
                   "submit takes the last round's checkpoint itself")
        raise SubmissionError(run_dir, [problem])
    if not run_dir.is_dir():
        raise SubmissionError(run_dir, [f"{run_dir} is not a run folder"])


def check_output(run_dir: Path, target: Path) -> None:
    """Refuse an existing output folder, and one in (or named like) a checkpoint folder: the submission
    would change the checkpoint it copies, and a `peft_<round>` folder passes for a checkpoint on resume."""
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or choose another folder with --output")
    inside = next((folder for folder in (target, *target.parents) if CHECKPOINT_PATTERN.match(folder.name)), None)
    if inside == target:
        problem = f"--output {target} is named like a checkpoint folder (peft_<round>); choose another name"
        raise SubmissionError(run_dir, [problem])
    if inside is not None:
        problem = (f"--output {target} lies inside the checkpoint folder {inside}; choose a folder outside it "
                   "(default: RUN_DIR/submission)")
        raise SubmissionError(run_dir, [problem])


def check_run(run_dir: Path, eval_dir: Path, run_name: str | None, app_dir: Path) -> RunSummary:
    """Gather the submission's contents; raise SubmissionError listing every problem found."""
    check_run_folder(run_dir)
    problems: list[str] = []
    summary = None
    try:
        summary = gather_run(run_dir, eval_dir, run_name, app_dir, problems)
    except OSError as error:  # a file or folder the finer checks could not read (permissions, I/O errors)
        problems.append(f"cannot read {error.filename or run_dir}: {error.strerror or error}")
    if problems or summary is None:
        raise SubmissionError(run_dir, problems)
    return summary


def _value(value: Any) -> str:
    return "(not set)" if value is None else f"`{json.dumps(value)}`"


def config_diff(run_config: dict[str, Any], defaults: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, default, this run) for every key whose value differs from the app's default."""
    keys = sorted(set(run_config) | set(defaults))
    return [(k, defaults.get(k), run_config.get(k)) for k in keys if run_config.get(k) != defaults.get(k)]


def provenance_lines(summary: RunSummary, trained_on: str) -> list[str]:
    """Where the accuracies come from, and what of that was verified."""
    weights = f"`{summary.checkpoint.name}/{ADAPTER_WEIGHTS}`"
    files = f"`acc_*_{summary.run_name}.txt` in `{summary.eval_dir}`"
    evaluation = summary.evaluation
    if evaluation is None:
        not_recorded = ("provenance not recorded, so the evaluation mode, quantization, batch size and scored "
                        "checkpoint were not verified")
        source = f"the official evaluation script's files ({files}; no `summary_{summary.run_name}.json`)"
        return [f"- accuracies from {source}: {not_recorded}",
                f"- submitted adapter {weights}: sha256 `{summary.adapter_sha256}`"]
    settings = (f"mode `{evaluation['mode']}`, {evaluation['quantization']}-bit quantization, batch size "
                f"{evaluation['batch_size']}, base model `{evaluation['base_model']}`")
    lines = [f"- accuracies from `flowertune-finance eval` ({files}, `summary_{summary.run_name}.json`)",
             f"- {settings} (verified: {LEADERBOARD_MODE} mode, {LEADERBOARD_QUANTIZATION}-bit)",
             f"- scored adapter sha256 `{summary.adapter_sha256}` = the submitted {weights} (verified)"]
    if isinstance(evaluation.get("counts"), dict):
        sizes = ", ".join(f"{d} {n:,}" for d, n in LEADERBOARD_SET_SIZES.items())
        lines.append(f"- every example of each set scored ({sizes}; verified)")
    if evaluation["base_model"] != trained_on:
        lines.append(f"- note: the run trained on `{trained_on}`; the evaluation's base model must be that model")
    return lines


def projection_lines(run_dir: Path) -> list[str]:
    """The communication the ServerApp projected when the run started (`projected_communication.json`)."""
    data, problem = read_json(run_dir / PROJECTION_FILE)
    if problem or not isinstance(data, dict) or not isinstance(data.get("projected_mb"), (int, float)):
        return []
    return [f"- communication projected at start: {data['projected_mb']:,.2f} MB"]


def submission_markdown(summary: RunSummary) -> str:
    """SUBMISSION.md: the leaderboard row, the rule checks, provenance, and how this run differs from the defaults."""
    config = parse_run_config(summary.run_config)
    percent = {d: 100 * a for d, a in summary.accuracies.items()}
    average = sum(percent.values()) / len(percent)
    model = config.model.name + (f" ({config.model.quantization}-bit)" if config.model.quantization else "")
    lines = [
        "# FlowerTune LLM Leaderboard (Finance) submission", "",
        f"Run folder: `{summary.run_dir}`; evaluation run name: `{summary.run_name}`.", "",
        "| FPB | FIQA | TFNS | Average | Communication (MB) | Rounds | Base model | Strategy |",
        "|---|---|---|---|---|---|---|---|",
        (f"| {percent['fpb']:.2f} | {percent['fiqa']:.2f} | {percent['tfns']:.2f} | {average:.2f} "
        f"| {summary.communication_mb:,.2f} | {summary.rounds} | {model} | {config.strategy.name} |"), "",
        "## Leaderboard rules checked", "",
        *[f"- static section kept: `{k}` = `{v}`" for k, v in LEADERBOARD_STATIC.items()],
        f"- {LEADERBOARD_SUPERNODES} SuperNodes connected in every round (1..{summary.rounds})",
        "- every round accepted at least one client reply (no round skipped)",
        f"- communication {summary.communication_mb:,.2f} MB within the {COMMUNICATION_BUDGET_MB:,.0f} MB budget",
        f"- checkpoint of the last round: `{summary.checkpoint.name}`",
        *projection_lines(summary.run_dir), "",
        "## Evaluation provenance", "", *provenance_lines(summary, config.model.name), "",
    ]
    if config.dataset_path:
        lines += [(f"Note: trained on the local file `{config.dataset_path}` (`dataset.path`); it must be a copy of "
                  f"`{LEADERBOARD_STATIC['static.dataset.name']}` for the result to count."), ""]
    diff = config_diff(summary.run_config, summary.defaults)
    lines += ["## Run config changed from the app's defaults (pyproject.toml)", ""]
    if diff:
        lines += ["| key | default | this run |", "|---|---|---|"]
        lines += [f"| `{key}` | {_value(default)} | {_value(value)} |" for key, default, value in diff]
    else:
        lines.append("None: the run used the defaults.")
    lines += ["", "## Files", "",
              f"- `{summary.checkpoint.name}/`: {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS} (load with `PeftModel.from_pretrained`)",
              *[f"- `{path.name}`: Accuracy: {summary.accuracies[dataset]}"
                for dataset, path in summary.accuracy_files.items()],
              ""]
    return "\n".join(lines)


def _check_copies(staging: Path, summary: RunSummary) -> None:
    """The copied adapter and accuracies must be the ones checked: a file changed meanwhile is an error."""
    changed: list[Path] = []
    if file_sha256(staging / summary.checkpoint.name / ADAPTER_WEIGHTS) != summary.adapter_sha256:
        changed.append(summary.checkpoint / ADAPTER_WEIGHTS)
    for dataset, path in summary.accuracy_files.items():
        try:
            if read_accuracy(staging / path.name) != summary.accuracies[dataset]:
                changed.append(path)
        except ValueError:
            changed.append(path)
    if changed:
        raise SubmissionError(summary.run_dir, [f"{path} changed while the submission was assembled; run submit again"
                                                for path in changed])


def _fill(folder: Path, summary: RunSummary) -> None:
    """Copy the checkpoint, the accuracy files and what `eval` wrote with them, then write SUBMISSION.md."""
    (folder / summary.checkpoint.name).mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(summary.checkpoint / name, folder / summary.checkpoint.name / name)
    for dataset, path in summary.accuracy_files.items():
        shutil.copy2(path, folder / path.name)
        generation = summary.eval_dir / f"generation_{dataset}_{summary.run_name}.jsonl"
        if generation.is_file():
            shutil.copy2(generation, folder / generation.name)
    if summary.evaluation is not None:
        shutil.copy2(summary.eval_dir / f"summary_{summary.run_name}.json", folder)
    _check_copies(folder, summary)
    (folder / "SUBMISSION.md").write_text(submission_markdown(summary), encoding="utf-8")


def build_submission(
    run_dir: str | Path,
    output: str | Path | None = None,
    eval_dir: str | Path | None = None,
    run_name: str | None = None,
    app_dir: str | Path = ".",
) -> Path:
    """Check the run, then write the submission folder (default `<run>/submission`); return its path.

    `eval_dir` defaults to `<run>/eval` if it exists, else `benchmarks` (the official script's folder).
    """
    given = Path(run_dir)
    try:
        run_dir = given.expanduser().resolve()
        eval_dir = Path(eval_dir).expanduser() if eval_dir is not None else default_eval_dir(run_dir)
        target = Path(output).expanduser().resolve() if output is not None else run_dir / "submission"
        app_dir = Path(app_dir).expanduser()
    except RuntimeError as error:  # `~name/...` with no such user
        raise SubmissionError(given, [f"a path starting with '~' names no known home folder ({error})"]) from None
    check_run_folder(run_dir)
    check_output(run_dir, target)
    summary = check_run(run_dir, eval_dir, run_name, app_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_folder(target) as folder:
            _fill(folder, summary)
    except OSError as error:
        raise SubmissionError(run_dir, [f"cannot write the submission folder {target}: {error}"]) from error
    return target
