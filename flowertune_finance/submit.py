"""Assemble what the FlowerTune LLM Leaderboard (Finance) asks for, after checking the run kept its rules.

A submission is the last round's PEFT checkpoint, the three accuracy files of the
evaluation and the communication cost. `build_submission` checks everything first and
collects every problem into one `SubmissionError`, so nothing is written for a run the
leaderboard would reject; the folder is assembled under a temporary name and renamed into
place, and an existing one is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict, get_project_config

from flowertune_finance.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointError,
    latest_checkpoint,
)
from flowertune_finance.config import ConfigError, parse_run_config
from flowertune_finance.metrics import COMMUNICATION_BUDGET_MB, METRICS_FILE, RUN_CONFIG, read_metrics

LEADERBOARD_DATASETS = ("fpb", "fiqa", "tfns")
LEADERBOARD_STATIC = {"static.dataset.name": "flwrlabs/fingpt-sentiment-train"}
LEADERBOARD_SUPERNODES = 50
ACCURACY_PATTERN = re.compile(r"^Accuracy:\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\.?$")


class SubmissionError(RuntimeError):
    """The run lacks something the leaderboard requires, or broke one of its rules."""

    def __init__(self, run_dir: Path, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"cannot build a leaderboard submission from {run_dir}:\n{listed}")


@dataclass(frozen=True)
class RunSummary:
    """What SUBMISSION.md reports, gathered and checked before anything is written."""

    run_dir: Path
    checkpoint: Path
    rounds: int
    communication_mb: float
    accuracies: dict[str, float]
    accuracy_files: dict[str, Path]
    run_name: str
    run_config: dict[str, Any]
    defaults: dict[str, Any]


def read_accuracy(path: Path) -> float:
    """The accuracy in a leaderboard `acc_*.txt` file (`Accuracy: 0.8316. `), a fraction in [0, 1]."""
    match = ACCURACY_PATTERN.match(path.read_text(encoding="utf-8").strip())
    if not match:
        raise ValueError(f"{path} does not read 'Accuracy: <number>. '")
    value = float(match.group(1))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{path} holds accuracy {value}, outside [0, 1]")
    return value


def find_run_name(eval_dir: Path) -> str:
    """The one run name with an FPB accuracy file in `eval_dir`; ambiguity is an error, not a guess."""
    if not eval_dir.is_dir():
        raise ValueError(f"evaluation folder {eval_dir} does not exist; run `flowertune-finance eval` or pass --eval-dir")
    names = sorted(p.name[len("acc_fpb_"):-len(".txt")] for p in eval_dir.glob("acc_fpb_*.txt"))
    if len(names) != 1:
        found = ", ".join(names) if names else "none"
        raise ValueError(f"pass --run-name: {eval_dir} holds accuracy files of {len(names)} runs ({found})")
    return names[0]


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's default run config (`[tool.flwr.app.config]` of its pyproject.toml), flat as Flower sees it."""
    return flatten_dict(get_project_config(app_dir)["tool"]["flwr"]["app"]["config"])


def check_run(run_dir: Path, eval_dir: Path, run_name: str | None, app_dir: Path) -> RunSummary:
    """Gather the submission's contents; raise SubmissionError listing every problem found."""
    if not run_dir.is_dir():
        raise SubmissionError(run_dir, [f"{run_dir} is not a run folder"])
    problems: list[str] = []
    run_config: dict[str, Any] = {}
    if (run_dir / RUN_CONFIG).is_file():
        run_config = json.loads((run_dir / RUN_CONFIG).read_text())
    else:
        problems.append(f"{RUN_CONFIG} is missing: the run's settings cannot be checked")
    for key, required in LEADERBOARD_STATIC.items():
        if run_config and run_config.get(key) != required:
            problems.append(f"static section changed: '{key}' = {run_config.get(key)!r}; the leaderboard requires {required!r}")
    try:
        num_rounds = parse_run_config(run_config).num_server_rounds if run_config else None
    except ConfigError as error:
        problems.append(f"{RUN_CONFIG} is not a valid run config: {error}")
        num_rounds = None

    records = read_metrics(run_dir)
    rounds = [r.get("round") for r in records]
    if not records:
        problems.append(f"{METRICS_FILE} is missing or empty")
    elif num_rounds is not None and rounds != list(range(1, num_rounds + 1)):
        problems.append(f"{METRICS_FILE} holds rounds {_span(rounds)}, not 1..{num_rounds}: the run did not finish")
    supernodes = {r.get("round"): r.get("num_supernodes") for r in records}
    wrong = {k: v for k, v in supernodes.items() if v != LEADERBOARD_SUPERNODES}
    if wrong:
        seen = sorted({str(v) for v in wrong.values()})
        problems.append(
            f"the leaderboard requires {LEADERBOARD_SUPERNODES} SuperNodes; {len(wrong)} round(s) recorded "
            f"num_supernodes = {', '.join(seen)} (e.g. round {min(wrong)})"
        )
    communication_mb = float(records[-1].get("cumulative_mb", 0.0)) if records else 0.0
    if communication_mb > COMMUNICATION_BUDGET_MB:
        problems.append(f"communication {communication_mb:,.0f} MB exceeds the budget of {COMMUNICATION_BUDGET_MB:,.0f} MB")

    checkpoint = run_dir
    try:
        latest = latest_checkpoint(run_dir)
        checkpoint = latest.path
        if num_rounds is not None and latest.round != num_rounds:
            problems.append(f"the newest checkpoint is {latest.path.name}, not the last round's peft_{num_rounds}")
    except CheckpointError as error:
        problems.append(str(error))

    accuracies: dict[str, float] = {}
    files: dict[str, Path] = {}
    try:
        run_name = run_name or find_run_name(eval_dir)
    except ValueError as error:
        problems.append(str(error))
        run_name = "?"
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
    try:
        defaults = app_defaults(app_dir)
    except (FileNotFoundError, KeyError, ValueError) as error:
        problems.append(f"no app defaults to compare with in {app_dir}: {error}; pass --app-dir")
        defaults = {}
    if problems:
        raise SubmissionError(run_dir, problems)
    return RunSummary(run_dir, checkpoint, len(records), communication_mb, accuracies, files, run_name,
                      run_config, defaults)


def _span(rounds: list[Any]) -> str:
    return f"{rounds[0]}..{rounds[-1]} ({len(rounds)} lines)" if rounds else "none"


def _value(value: Any) -> str:
    return "(not set)" if value is None else f"`{json.dumps(value)}`"


def config_diff(run_config: dict[str, Any], defaults: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, default, this run) for every key whose value differs from the app's default."""
    keys = sorted(set(run_config) | set(defaults))
    return [(k, defaults.get(k), run_config.get(k)) for k in keys if run_config.get(k) != defaults.get(k)]


def submission_markdown(summary: RunSummary) -> str:
    """SUBMISSION.md: the leaderboard row, the rule checks, and how this run differs from the defaults."""
    config = parse_run_config(summary.run_config)
    percent = {d: 100 * a for d, a in summary.accuracies.items()}
    average = sum(percent.values()) / len(percent)
    model = config.model.name + (f" ({config.model.quantization}-bit)" if config.model.quantization else "")
    lines = [
        "# FlowerTune LLM Leaderboard (Finance) submission", "",
        f"Run folder: `{summary.run_dir}`; evaluation run name: `{summary.run_name}`.", "",
        "| FPB | FIQA | TFNS | Average | Communication (MB) | Rounds | Base model | Strategy |",
        "|---|---|---|---|---|---|---|---|",
        f"| {percent['fpb']:.2f} | {percent['fiqa']:.2f} | {percent['tfns']:.2f} | {average:.2f} "
        f"| {summary.communication_mb:,.2f} | {summary.rounds} | {model} | {config.strategy.name} |", "",
        "## Leaderboard rules checked", "",
        *[f"- static section kept: `{k}` = `{v}`" for k, v in LEADERBOARD_STATIC.items()],
        f"- {LEADERBOARD_SUPERNODES} SuperNodes connected in every round (1..{summary.rounds})",
        f"- communication {summary.communication_mb:,.2f} MB within the {COMMUNICATION_BUDGET_MB:,.0f} MB budget",
        f"- checkpoint of the last round: `{summary.checkpoint.name}`", "",
    ]
    if config.dataset_path:
        lines += [f"Note: trained on the local file `{config.dataset_path}` (`dataset.path`); it must be a copy of "
                  f"`{LEADERBOARD_STATIC['static.dataset.name']}` for the result to count.", ""]
    diff = config_diff(summary.run_config, summary.defaults)
    lines += ["## Run config changed from the app's defaults (pyproject.toml)", ""]
    if diff:
        lines += ["| key | default | this run |", "|---|---|---|"]
        lines += [f"| `{key}` | {_value(default)} | {_value(value)} |" for key, default, value in diff]
    else:
        lines.append("None: the run used the defaults.")
    lines += ["", "## Files", "",
              f"- `{summary.checkpoint.name}/`: {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS} (load with `PeftModel.from_pretrained`)",
              *[f"- `{path.name}`: {path.read_text(encoding='utf-8').strip()}" for path in summary.accuracy_files.values()],
              ""]
    return "\n".join(lines)


def build_submission(
    run_dir: str | Path,
    output: str | Path | None = None,
    eval_dir: str | Path = "benchmarks",
    run_name: str | None = None,
    app_dir: str | Path = ".",
) -> Path:
    """Check the run, then write the submission folder (default `<run>/submission`); return its path."""
    run_dir, eval_dir = Path(run_dir).expanduser().resolve(), Path(eval_dir).expanduser()
    target = Path(output).expanduser() if output is not None else run_dir / "submission"
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or choose another folder with --output")
    summary = check_run(run_dir, eval_dir, run_name, Path(app_dir).expanduser())
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        (staging / summary.checkpoint.name).mkdir(parents=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(summary.checkpoint / name, staging / summary.checkpoint.name / name)
        for dataset, path in summary.accuracy_files.items():
            shutil.copy2(path, staging / path.name)
            generation = eval_dir / f"generation_{dataset}_{summary.run_name}.jsonl"
            if generation.is_file():
                shutil.copy2(generation, staging / generation.name)
        (staging / "SUBMISSION.md").write_text(submission_markdown(summary), encoding="utf-8")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
