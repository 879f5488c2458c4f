"""Assemble what the FlowerTune LLM Leaderboard (Finance) asks for, after checking the run kept its rules.

A submission is the last round's PEFT checkpoint, the three accuracy files of the
evaluation and the communication cost. `check_run` reads every file defensively and
collects every problem (a broken rule, a missing or unreadable file, accuracies that cannot
be tied to the submitted checkpoint) into one `SubmissionError`, so nothing is written for
a run the leaderboard would reject and no corrupt file ends in a traceback. The folder is
assembled under a temporary name and renamed into place; an existing one is never
overwritten.
"""

from __future__ import annotations

import json
import math
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
    CHECKPOINT_PATTERN,
    CheckpointError,
    checkpoint_folders,
    read_checkpoint,
)
from flowertune_finance.config import ConfigError, parse_run_config
from flowertune_finance.generation import file_sha256
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB, STATIC_DATASET_NAME
from flowertune_finance.leaderboard import DATASETS as LEADERBOARD_DATASETS
from flowertune_finance.leaderboard import NUM_SUPERNODES as LEADERBOARD_SUPERNODES
from flowertune_finance.leaderboard import QUANTIZATION as LEADERBOARD_QUANTIZATION
from flowertune_finance.leaderboard import SET_SIZES as LEADERBOARD_SET_SIZES
from flowertune_finance.metrics import METRICS_FILE, RUN_CONFIG

LEADERBOARD_STATIC = {"static.dataset.name": STATIC_DATASET_NAME}
LEADERBOARD_MODE = "protocol"  # `eval --mode`: only the official computation counts
# "Accuracy: {acc}. " with Python's float text (it always has a "." or an exponent): a truncated file fails to match
ACCURACY_PATTERN = re.compile(r"^Accuracy:\s*([0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)\.$")
RUN_EVAL_DIR = "eval"  # where `eval` writes the scores of a run's checkpoint, inside the run folder
OFFICIAL_EVAL_DIR = Path("benchmarks")  # where the leaderboard's own script writes
ACCURACY_TOLERANCE = 1e-4  # an acc_*.txt may round what the summary records


class SubmissionError(RuntimeError):
    """The run lacks something the leaderboard requires, or broke one of its rules."""

    def __init__(self, run_dir: Path, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"cannot build a leaderboard submission from {run_dir}:\n{listed}")


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


def _read_json(path: Path) -> tuple[Any, str | None]:
    """A JSON file's content, or why it cannot be read: callers list problems, they never crash."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except UnicodeDecodeError:
        return None, f"{path} is not a text file (not UTF-8)"
    except OSError as error:
        return None, f"cannot read {path}: {error.strerror or error}"
    except (ValueError, RecursionError) as error:
        return None, f"{path} is not valid JSON ({error})"


def _rounds_text(rounds: list[Any]) -> str:
    """`1-3, 5, 7-8`: consecutive integer rounds folded into ranges."""
    parts: list[str] = []
    index = 0
    while index < len(rounds):
        end = index
        while (isinstance(rounds[index], int) and end + 1 < len(rounds) and isinstance(rounds[end + 1], int)
               and rounds[end + 1] == rounds[end] + 1):
            end += 1
        parts.append(str(rounds[index]) if end == index else f"{rounds[index]}-{rounds[end]}")
        index = end + 1
    return ", ".join(parts)


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


def _read_run_config(run_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        problems.append(f"{RUN_CONFIG} is missing: the run's settings cannot be checked")
        return None
    data, error = _read_json(path)
    if error is None and not isinstance(data, dict):
        error = f"{path} holds a JSON {type(data).__name__}, not a mapping of run-config keys"
    if error is not None:
        problems.append(f"{error}: the run's settings cannot be checked")
        return None
    return data


def _read_rounds(run_dir: Path, problems: list[str]) -> list[dict[str, Any]]:
    """The run's round records; unreadable lines (a crash mid-write, a corrupt file) become problems."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        problems.append(f"{METRICS_FILE} is missing: the run's rounds cannot be checked")
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.append(f"{path} is not a text file (not UTF-8): the run's rounds cannot be checked")
        return []
    except OSError as error:
        problems.append(f"cannot read {path}: {error.strerror or error}")
        return []
    records, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        problems.append(f"{path} line(s) {_rounds_text(bad)} are not JSON round records (truncated or corrupt)")
    if not records and not bad:
        problems.append(f"{path} is empty: the run recorded no round")
    return records


def _check_rounds(records: list[dict[str, Any]], num_rounds: int | None, problems: list[str]) -> float:
    """Check every round trained with the leaderboard's SuperNodes; return the run's communication in MB."""
    if not records:
        return 0.0
    rounds = [r.get("round") for r in records]
    if num_rounds is not None and rounds != list(range(1, num_rounds + 1)):
        shown = f"{rounds[0]}..{rounds[-1]} ({len(rounds)} lines)"
        problems.append(f"{METRICS_FILE} holds rounds {shown}, not 1..{num_rounds}: the run did not finish")
    wrong = [(r.get("round"), r.get("num_supernodes")) for r in records
             if r.get("num_supernodes") != LEADERBOARD_SUPERNODES]
    if wrong:
        seen = sorted({str(value) for _, value in wrong})
        problems.append(
            f"the leaderboard requires {LEADERBOARD_SUPERNODES} SuperNodes; {len(wrong)} round(s) recorded "
            f"num_supernodes = {', '.join(seen)} (e.g. round {wrong[0][0]})"
        )
    accepted = [r.get("clients_accepted") for r in records]
    empty = [r.get("round") for r, n in zip(records, accepted) if r.get("round_skipped") is True or n == 0]
    if empty:
        problems.append(f"round(s) {_rounds_text(empty)} accepted no client reply (skipped: the global adapter "
                        "did not change): a submitted run must train in every round it reports")
    unknown = [r.get("round") for r, n in zip(records, accepted)
               if r.get("round_skipped") is not True and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0)]
    if unknown:
        problems.append(f"round(s) {_rounds_text(unknown)} record no valid clients_accepted: "
                        "it cannot be checked that they trained")
    communication = records[-1].get("cumulative_mb")
    if isinstance(communication, bool) or not isinstance(communication, (int, float)) or not (
            math.isfinite(communication) and communication >= 0):
        problems.append(f"the last line of {METRICS_FILE} records cumulative_mb = {communication!r}, not a number "
                        "of MB: the communication cost cannot be reported")
        return 0.0
    if communication > COMMUNICATION_BUDGET_MB:
        problems.append(f"communication {communication:,.0f} MB exceeds the budget of {COMMUNICATION_BUDGET_MB:,.0f} MB")
    return float(communication)


def _check_checkpoint(run_dir: Path, num_rounds: int | None, problems: list[str]) -> Path | None:
    """The last round's checkpoint folder, complete and readable, or None (with the reason listed)."""
    folders = dict(checkpoint_folders(run_dir))
    if not folders:
        problems.append(f"{run_dir} holds no checkpoint (no peft_<round> folder)")
        return None
    newest = max(folders)
    if num_rounds is not None and newest != num_rounds:
        problems.append(f"the newest checkpoint is peft_{newest}, not the last round's peft_{num_rounds}")
        return None
    try:
        read_checkpoint(folders[newest])
    except CheckpointError as error:
        problems.append(str(error))
        return None
    except Exception as error:  # noqa: BLE001 -- e.g. a run_state.json that is not an object: a problem, not a crash
        problems.append(f"checkpoint {folders[newest]} is corrupt: its files do not hold what a checkpoint "
                        f"records ({type(error).__name__}: {error})")
        return None
    adapter_config, _ = _read_json(folders[newest] / ADAPTER_CONFIG)
    if not isinstance(adapter_config, dict) or not adapter_config.get("peft_type"):
        problems.append(f"{folders[newest] / ADAPTER_CONFIG} is not a PEFT adapter config (a JSON object with a "
                        "peft_type): `PeftModel.from_pretrained` could not load the submitted adapter")
        return None
    return folders[newest]


def _read_accuracies(eval_dir: Path, run_name: str, checkpoint: Path | str, problems: list[str]
                     ) -> tuple[dict[str, float], dict[str, Path]]:
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


def _check_evaluation(path: Path, checkpoint: Path | None, sha256: str | None, accuracies: dict[str, float],
                      problems: list[str]) -> dict[str, Any] | None:
    """Check `eval`'s summary: protocol mode, 4-bit, and the submitted checkpoint's exact adapter bytes."""
    summary, error = _read_json(path)
    if error is None and not isinstance(summary, dict):
        error = f"{path} holds a JSON {type(summary).__name__}, not an evaluation summary"
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


def check_run(run_dir: Path, eval_dir: Path, run_name: str | None, app_dir: Path) -> RunSummary:
    """Gather the submission's contents; raise SubmissionError listing every problem found."""
    check_run_folder(run_dir)
    problems: list[str] = []
    summary = None
    try:
        summary = _gather(run_dir, eval_dir, run_name, app_dir, problems)
    except OSError as error:  # a file or folder the finer checks could not read (permissions, I/O errors)
        problems.append(f"cannot read {error.filename or run_dir}: {error.strerror or error}")
    if problems or summary is None:
        raise SubmissionError(run_dir, problems)
    return summary


def _gather(run_dir: Path, eval_dir: Path, run_name: str | None, app_dir: Path, problems: list[str]
            ) -> RunSummary | None:
    run_config = _read_run_config(run_dir, problems)
    for key, required in LEADERBOARD_STATIC.items():
        if run_config is not None and run_config.get(key) != required:
            problems.append(f"static section changed: '{key}' = {run_config.get(key)!r}; the leaderboard requires {required!r}")
    try:
        num_rounds = parse_run_config(run_config).num_server_rounds if run_config is not None else None
    except ConfigError as error:
        problems.append(f"{RUN_CONFIG} is not a valid run config: {error}")
        num_rounds = None

    records = _read_rounds(run_dir, problems)
    communication_mb = _check_rounds(records, num_rounds, problems)
    checkpoint = _check_checkpoint(run_dir, num_rounds, problems)
    sha256 = file_sha256(checkpoint / ADAPTER_WEIGHTS) if checkpoint is not None else None

    accuracies: dict[str, float] = {}
    files: dict[str, Path] = {}
    evaluation = None
    try:
        run_name = run_name or find_run_name(eval_dir)
    except ValueError as error:
        problems.append(str(error))
    else:
        accuracies, files = _read_accuracies(eval_dir, run_name, checkpoint or run_dir, problems)
        summary_path = eval_dir / f"summary_{run_name}.json"
        if summary_path.exists():
            evaluation = _check_evaluation(summary_path, checkpoint, sha256, accuracies, problems)
    try:
        defaults = app_defaults(app_dir)
    except (OSError, KeyError, TypeError, ValueError) as error:
        problems.append(f"no app defaults to compare with in {app_dir}: {error}; pass --app-dir")
        defaults = {}
    if problems or checkpoint is None or sha256 is None or run_name is None:
        return None
    return RunSummary(run_dir, checkpoint, len(records), communication_mb, accuracies, files, run_name,
                      run_config, defaults, eval_dir, sha256, evaluation)


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
    data, problem = _read_json(run_dir / "projected_communication.json")
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
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        if staging.exists():
            shutil.rmtree(staging)
        (staging / summary.checkpoint.name).mkdir(parents=True)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(summary.checkpoint / name, staging / summary.checkpoint.name / name)
        for dataset, path in summary.accuracy_files.items():
            shutil.copy2(path, staging / path.name)
            generation = eval_dir / f"generation_{dataset}_{summary.run_name}.jsonl"
            if generation.is_file():
                shutil.copy2(generation, staging / generation.name)
        if summary.evaluation is not None:
            shutil.copy2(eval_dir / f"summary_{summary.run_name}.json", staging)
        _check_copies(staging, summary)
        (staging / "SUBMISSION.md").write_text(submission_markdown(summary), encoding="utf-8")
        os.rename(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise SubmissionError(run_dir, [f"cannot write the submission folder {target}: {error}"]) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
