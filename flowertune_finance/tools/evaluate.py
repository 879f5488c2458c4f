"""The `eval` command: score a checkpoint (or a bare base model) on FPB, FiQA and TFNS.

Scoring is `flowertune_finance.scoring`, the leaderboard's computation. This module adds what a
tool needs around it: every check runs before the model loads, the `acc_*`/`generation_*` files
carry the leaderboard's names, each set's files are written as soon as it is scored, a summary
records the provenance `submit` checks, and earlier results are never overwritten.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowertune_finance.generation import (
    DTYPES,
    MAX_LENGTH,
    MODES,
    EvalError,
    check_adapter,
    check_base_model,
    file_sha256,
    first_line,
    load_model,
    load_tokenizer,
)
from flowertune_finance.leaderboard import DATASETS
from flowertune_finance.scoring import EvalSet, check_names, load_eval_set, score_set

BARE_MODEL_OUTPUT_DIR = Path("results") / "eval"  # where `eval` writes when no adapter is scored


def check_run_name(run_name: str) -> str:
    """The run name is part of every output file name: non-empty, no path separators."""
    if not run_name.strip() or run_name in (".", "..") or any(c in run_name for c in ("/", "\\", os.sep, "\0")):
        raise EvalError(f"--run-name {run_name!r} is not allowed; use a non-empty name without '/' or '\\'")
    return run_name


def output_paths(output_dir: str | Path, name: str, run_name: str) -> tuple[Path, Path, Path]:
    """Accuracy text and generation JSON lines (the leaderboard's names), and our full answer records."""
    folder = Path(output_dir)
    return (folder / f"acc_{name}_{run_name}.txt", folder / f"generation_{name}_{run_name}.jsonl",
            folder / f"answers_{name}_{run_name}.jsonl")


def summary_path(output_dir: str | Path, run_name: str) -> Path:
    return Path(output_dir) / f"summary_{run_name}.json"


def default_output_dir(peft_path: str | Path | None) -> Path:
    """Results belong with what they score: `<run_dir>/eval` for an adapter `<run_dir>/peft_N`
    (in general, `eval` beside the adapter folder); `results/eval` for the bare base model."""
    if peft_path is None:
        return BARE_MODEL_OUTPUT_DIR
    return Path(peft_path).expanduser().resolve().parent / "eval"


def check_not_taken(output_dir: Path, names: Sequence[str], run_name: str) -> None:
    """Earlier results are never overwritten: any output file of this run name is an error."""
    taken = [str(p) for name in names for p in output_paths(output_dir, name, run_name) if p.exists()]
    taken += [str(summary_path(output_dir, run_name))] if summary_path(output_dir, run_name).exists() else []
    if taken:
        raise EvalError(f"not overwriting earlier results {', '.join(taken)}; choose another --run-name")


def make_output_dir(output_dir: Path) -> None:
    """Create the output folder and prove it is writable, so hours of generation cannot be lost at the end."""
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise EvalError(f"--output-dir {str(output_dir)!r} is not a writable folder: {first_line(error)}") from None


def check_prompt_lengths(tokenizer, sets: Sequence[EvalSet]) -> None:
    """Protocol mode: transformers refuses generate(max_length=512) for a chunk padded to 512 tokens or more."""
    for eval_set in sets:
        lengths = [len(ids) for ids in tokenizer(list(eval_set.prompts))["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n >= MAX_LENGTH]
        if too_long:
            index, length = too_long[0]
            raise EvalError(f"{eval_set.name}: example {index} has a prompt of {length} tokens; protocol mode "
                            f"(generate(max_length={MAX_LENGTH}), as the leaderboard) needs every prompt under "
                            f"{MAX_LENGTH} tokens ({len(too_long)} are not)")


def write_set_files(output_dir: str | Path, name: str, run_name: str, result: dict[str, Any]) -> tuple[Path, ...]:
    """`Accuracy: {acc}. `, the records as the script writes them (by `datasets`), and the full answers."""
    from datasets import Dataset
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    acc_path, generation_path, answers_path = output_paths(output_dir, name, run_name)
    acc_path.write_text(f"Accuracy: {result['accuracy']}. ")
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # a "Creating json" bar per file says nothing here
    try:
        Dataset.from_list(result["records"]).to_json(str(generation_path), orient="records")
        Dataset.from_list(result["answers"]).to_json(str(answers_path), orient="records")
    finally:
        if not bars_were_off:
            enable_progress_bars()
    return acc_path, generation_path, answers_path


def _versions() -> dict[str, str]:
    import datasets
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "datasets": datasets.__version__, "python": platform.python_version()}


def check_options(mode: str, batch_size: int, quantization: int, limit: int | None) -> None:
    """The command's numeric and named options, before any data or model is touched."""
    if mode not in MODES:
        raise EvalError(f"--mode {mode!r} is not supported; allowed: {', '.join(MODES)}")
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size} is not allowed; use an integer >= 1")
    if quantization not in DTYPES:
        raise EvalError(f"--quantization {quantization!r} is not supported; allowed: 4, 8, 0 (no quantization)")
    if limit is not None and limit < 1:
        raise EvalError(f"limit {limit} is not allowed; use an integer >= 1 or none")


def evaluate_adapter(
    base_model: str,
    peft_path: str | None,
    datasets: Sequence[str] = DATASETS,
    data_dir: str | None = None,
    mode: str = "protocol",
    batch_size: int = 32,
    quantization: int = 4,
    output_dir: str | Path | None = None,
    run_name: str = "fl",
    limit: int | None = None,
) -> dict[str, Any]:
    """Score an adapter (or the bare base model, `peft_path=None`) on the leaderboard's sets.

    Writes each set's files as soon as it is scored, then `summary_{run}.json`, under
    `output_dir` (default: `default_output_dir(peft_path)`), and returns the summary:
    accuracies as fractions under each set's name, their "average", counts, timings and
    what was scored. Everything that can be checked is checked, and the output folder is
    created and written to, before the model loads.
    """
    names = check_names(datasets)
    check_options(mode, batch_size, quantization, limit)
    check_run_name(run_name)
    if peft_path is not None and not Path(peft_path).expanduser().is_dir():
        raise EvalError(f"--peft-path {peft_path!r}: no such folder")
    output = Path(output_dir).expanduser() if output_dir is not None else default_output_dir(peft_path)
    check_not_taken(output, names, run_name)
    sets = [load_eval_set(name, data_dir, limit) for name in names]
    check_base_model(base_model)
    weights = check_adapter(base_model, peft_path) if peft_path is not None else None
    tokenizer = load_tokenizer(base_model)
    if mode == "protocol":
        check_prompt_lengths(tokenizer, sets)
    make_output_dir(output)

    started = time.perf_counter()
    model, tokenizer = load_model(base_model, peft_path, quantization, check=False)
    load_seconds = time.perf_counter() - started
    results = {}
    for eval_set in sets:
        results[eval_set.name] = result = score_set(model, tokenizer, eval_set, batch_size, mode)
        paths = write_set_files(output, eval_set.name, run_name, result)
        print(f"{eval_set.name}: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['count']}); "
              f"wrote {', '.join(str(path) for path in paths)}", flush=True)
    summary = summarize(results)
    summary.update(
        run_name=run_name, mode=mode, base_model=base_model,
        peft_path=None if peft_path is None else str(Path(peft_path).expanduser().resolve()),
        adapter_sha256=None if weights is None else file_sha256(weights),
        adapter_file=None if weights is None else weights.name,
        quantization=quantization, batch_size=batch_size, data_dir=data_dir, limit=limit,
        output_dir=str(output.resolve()), device=str(model.device), versions=_versions(),
        load_seconds=round(load_seconds, 3), total_seconds=round(time.perf_counter() - started, 3),
    )
    summary_path(output, run_name).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per set and their unweighted mean, as the leaderboard averages them."""
    summary: dict[str, Any] = {name: result["accuracy"] for name, result in results.items()}
    summary["average"] = sum(summary.values()) / len(results)
    summary["counts"] = {name: result["count"] for name, result in results.items()}
    summary["correct"] = {name: result["correct"] for name, result in results.items()}
    summary["seconds"] = {name: round(result["seconds"], 3) for name, result in results.items()}
    summary["examples_per_s"] = {name: round(result["count"] / max(result["seconds"], 1e-9), 3)
                                 for name, result in results.items()}
    return summary
