"""FlowerTune Finance leaderboard evaluation: FPB, FiQA and TFNS sentiment accuracy.

Splits, seeds, label maps, instructions, prompt, batching, answer parsing, accuracy and the
`acc_*`/`generation_*` files follow the leaderboard's script (protocol mode), so our numbers
are the numbers it computes. Data comes from the hub ids it uses, or from `save_to_disk`
copies under a `data_dir`. Every check runs before the model loads, each set's files are
written as soon as it is scored, and earlier results are never overwritten.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flowertune_finance.generation import (
    DTYPES,
    MAX_LENGTH,
    MODES,
    EvalError,
    check_adapter,
    check_base_model,
    file_sha256,
    first_line,
    generate_batch,
    load_model,
    load_tokenizer,
)
from flowertune_finance.leaderboard import (
    DATASETS,
    FPB_LABELS,
    INSTRUCTION,
    SOURCES,
    SPLIT_SEED,
    TEST_SIZE,
    TFNS_LABELS,
    Source,
    fiqa_label,
    parse_label,
)
from flowertune_finance.prompts import format_prompt

BARE_MODEL_OUTPUT_DIR = Path("results") / "eval"  # where `eval` writes when no adapter is scored


@dataclass(frozen=True)
class EvalSet:
    """One benchmark's examples in the protocol's order: prompts and gold label words.

    `instructions` and `inputs` are the script's own `instruction` and `input` columns (the
    prompt's parts), kept for the per-example answer records.
    """

    name: str
    prompts: list[str]
    targets: list[str]
    instructions: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


def eval_prompt(instruction: str, text: str) -> str:
    """The leaderboard's prompt; the same builder as the `answer` training format.

    The script drops the "Input:" line when the text is empty, so we do too.
    """
    return format_prompt(instruction, text, "answer") if text else f"Instruction: {instruction}\nAnswer: "


def answer_text(generated: str) -> str:
    """What the leaderboard parses: the text between the first and second "Answer: ", or "None"."""
    parts = generated.split("Answer: ")
    return parts[1] if len(parts) > 1 else "None"


def check_names(names: Sequence[str]) -> list[str]:
    """The requested sets, validated before anything is loaded."""
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))  # each set once, in order
    unknown = [name for name in names if name not in DATASETS]
    if unknown or not names:
        raise EvalError(f"unknown dataset(s) {', '.join(unknown) or '(none given)'}; allowed: {', '.join(DATASETS)}")
    return names


def check_run_name(run_name: str) -> str:
    """The run name is part of every output file name: non-empty, no path separators."""
    if not run_name.strip() or run_name in (".", "..") or any(c in run_name for c in ("/", "\\", os.sep, "\0")):
        raise EvalError(f"--run-name {run_name!r} is not allowed; use a non-empty name without '/' or '\\'")
    return run_name


def _load_source(name: str, data_dir: str | Path | None):
    """The raw DatasetDict from `data_dir/name`, or from the hub, checked for splits and columns."""
    import datasets

    source = SOURCES[name]
    if data_dir is not None:
        if not Path(data_dir).expanduser().is_dir():
            raise EvalError(f"--data-dir {str(data_dir)!r}: no such folder")
        folder = Path(data_dir).expanduser() / name
        if not folder.is_dir():
            raise EvalError(f"--data-dir: no folder {str(folder)!r} for {name} (a datasets.save_to_disk folder)")
        try:
            raw = datasets.load_from_disk(str(folder))
        except (OSError, ValueError) as error:
            raise EvalError(f"--data-dir: {str(folder)!r} is not a datasets.save_to_disk folder for {name} "
                            f"({first_line(error)})") from None
        where = str(folder)
    else:
        try:
            raw = _load_hub(source)
        except (OSError, ValueError) as error:
            raise EvalError(f"{name}: cannot load {source.hub_id!r} from the hub ({first_line(error)}); "
                            "pass --data-dir with save_to_disk copies") from None
        where = source.hub_id
    if not isinstance(raw, datasets.DatasetDict):
        raise EvalError(f"{where!r} holds a single Dataset; expected a DatasetDict with split(s) {source.splits}")
    for split in source.splits:
        if split not in raw:
            raise EvalError(f"{where!r} lacks split {split!r} (has: {', '.join(raw)}); {name} needs {source.splits}")
        missing = [column for column in source.columns if column not in raw[split].column_names]
        if missing:
            raise EvalError(f"{where!r} split {split!r} lacks column(s) {', '.join(missing)}; "
                            f"{name} needs {', '.join(source.columns)}")
    return raw


def _load_hub(source: Source):
    """Load from the hub; script-based repos are read from their parquet export instead."""
    import datasets

    try:
        return datasets.load_dataset(source.hub_id, source.config)
    except RuntimeError as error:  # datasets >= 4 refuses loading scripts
        if "script" not in str(error).lower():
            raise
        return datasets.load_dataset(source.hub_id, source.config, revision="refs/convert/parquet")


def load_eval_set(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> EvalSet:
    """One benchmark as the leaderboard builds it (splits, seed, labels, instructions)."""
    import datasets

    raw = _load_source(check_names([name])[0], data_dir)
    try:
        if name == "fpb":
            rows = raw["train"].train_test_split(TEST_SIZE, seed=SPLIT_SEED)["test"]
            texts, targets = rows["sentence"], [FPB_LABELS[label] for label in rows["label"]]
            instructions = [INSTRUCTION.format("news")] * len(texts)
        elif name == "fiqa":
            rows = datasets.concatenate_datasets([raw["train"], raw["validation"], raw["test"]])
            rows = rows.train_test_split(TEST_SIZE, seed=SPLIT_SEED)["test"]
            texts, targets = rows["sentence"], [fiqa_label(score) for score in rows["sentiment_score"]]
            instructions = [INSTRUCTION.format("tweet" if kind == "post" else "news") for kind in rows["format"]]
        else:
            rows = raw["validation"]
            texts, targets = rows["text"], [TFNS_LABELS[label] for label in rows["label"]]
            instructions = [INSTRUCTION.format("tweet")] * len(texts)
    except (ValueError, KeyError) as error:  # too few rows to split, or a label outside the map
        raise EvalError(f"{name}: cannot build the protocol's test examples: {first_line(error)}") from None
    if not texts:
        raise EvalError(f"{name}: the data yields no test examples")
    prompts = [eval_prompt(instruction, text) for instruction, text in zip(instructions, texts)]
    stop = len(prompts) if limit is None else limit
    return EvalSet(name, prompts[:stop], list(targets[:stop]), list(instructions[:stop]),
                   [text or "" for text in texts[:stop]])


def generate_answers(model, tokenizer, prompts: Sequence[str], batch_size: int, mode: str, desc: str = "") -> list[str]:
    """Generations for all prompts, in the prompts' order.

    Protocol: consecutive chunks of `batch_size` in the given order, as the leaderboard cuts
    them (an answer's budget depends on its chunk). Fast: longest prompts first, which is
    quicker and changes nothing there (each answer has its own budget).
    """
    if mode not in MODES:
        raise EvalError(f"mode {mode!r} is not supported; allowed: {', '.join(MODES)}")
    order = list(range(len(prompts)))
    if mode == "fast":
        order.sort(key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc or mode, unit="batch"):
        chunk = order[start:start + batch_size]
        for index, text in zip(chunk, generate_batch(model, tokenizer, [prompts[i] for i in chunk], mode)):
            texts[index] = text
    return texts


def score_set(model, tokenizer, eval_set: EvalSet, batch_size: int = 32, mode: str = "protocol") -> dict[str, Any]:
    """Generate, parse and score one set.

    `records` are what the leaderboard's script writes per example (context, new_target,
    new_out); `answers` are every column its data frame holds before it drops some (input,
    output, instruction, context, target, out_text, new_target, new_out).
    """
    started = time.perf_counter()
    generations = generate_answers(model, tokenizer, eval_set.prompts, batch_size, mode, f"{eval_set.name} ({mode})")
    seconds = time.perf_counter() - started
    count = len(eval_set.prompts)
    inputs = eval_set.inputs or [""] * count
    instructions = eval_set.instructions or [""] * count
    records, answers = [], []
    for text, context, target, instruction, text_input in zip(
            generations, eval_set.prompts, eval_set.targets, instructions, inputs):
        out_text = answer_text(text)
        new_target, new_out = parse_label(target), parse_label(out_text)
        records.append({"context": context, "new_target": new_target, "new_out": new_out})
        answers.append({"input": text_input, "output": target, "instruction": instruction, "context": context,
                        "target": target, "out_text": out_text, "new_target": new_target, "new_out": new_out})
    correct = sum(record["new_target"] == record["new_out"] for record in records)
    return {
        "accuracy": correct / count if count else 0.0,
        "correct": correct,
        "count": count,
        "seconds": seconds,
        "records": records,
        "answers": answers,
        "generations": generations,
    }


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
    if mode not in MODES:
        raise EvalError(f"--mode {mode!r} is not supported; allowed: {', '.join(MODES)}")
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size} is not allowed; use an integer >= 1")
    if quantization not in DTYPES:
        raise EvalError(f"--quantization {quantization!r} is not supported; allowed: 4, 8, 0 (no quantization)")
    if limit is not None and limit < 1:
        raise EvalError(f"limit {limit} is not allowed; use an integer >= 1 or none")
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
