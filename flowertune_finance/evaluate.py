"""FlowerTune Finance leaderboard evaluation: FPB, FiQA and TFNS sentiment accuracy.

Splits, seeds, label maps, instructions, prompt, answer parsing, accuracy and output
files follow the leaderboard's script, so our numbers are the numbers it reports. Data
comes from the hub ids it uses, or from `save_to_disk` copies under a `data_dir`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flowertune_finance.dataset import format_prompt
from flowertune_finance.generation import MODES, EvalError, generate_batch, load_model

DATASETS = ("fpb", "fiqa", "tfns")
INSTRUCTION = "What is the sentiment of this {}? Please choose an answer from {{negative/neutral/positive}}."
SPLIT_SEED = 42
TEST_SIZE = 0.25


@dataclass(frozen=True)
class Source:
    """Where a set lives on the hub, and which splits/columns the protocol reads."""

    hub_id: str
    config: str | None
    splits: tuple[str, ...]
    columns: tuple[str, ...]


SOURCES = {
    "fpb": Source("takala/financial_phrasebank", "sentences_50agree", ("train",), ("sentence", "label")),
    "fiqa": Source("pauri32/fiqa-2018", None, ("train", "validation", "test"),
                   ("sentence", "snippets", "target", "sentiment_score", "aspects", "format", "label")),
    "tfns": Source("zeroshot/twitter-financial-news-sentiment", None, ("validation",), ("text", "label")),
}
FPB_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}


@dataclass(frozen=True)
class EvalSet:
    """One benchmark's examples in the protocol's order: prompts and gold label words."""

    name: str
    prompts: list[str]
    targets: list[str]


def eval_prompt(instruction: str, text: str) -> str:
    """The leaderboard's prompt; the same builder as the `answer` training format.

    The script drops the "Input:" line when the text is empty, so we do too.
    """
    return format_prompt(instruction, text, "answer") if text else f"Instruction: {instruction}\nAnswer: "


def fiqa_label(score: float) -> str:
    """FiQA's score to a label word: < -0.1 negative, < 0.1 neutral, else positive."""
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def parse_label(text: str) -> str:
    """The leaderboard's rule: positive if the text says so, else negative if it says so, else neutral."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


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


def _load_source(name: str, data_dir: str | Path | None):
    """The raw DatasetDict from `data_dir/name`, or from the hub, checked for splits and columns."""
    import datasets

    source = SOURCES[name]
    if data_dir is not None:
        folder = Path(data_dir).expanduser() / name
        if not folder.is_dir():
            raise EvalError(f"--data-dir: no folder {str(folder)!r} for {name} (a datasets.save_to_disk folder)")
        raw = datasets.load_from_disk(str(folder))
        where = str(folder)
    else:
        raw = _load_hub(source)
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
    prompts = [eval_prompt(instruction, text) for instruction, text in zip(instructions, texts)]
    stop = len(prompts) if limit is None else limit
    return EvalSet(name, prompts[:stop], list(targets[:stop]))


def generate_answers(model, tokenizer, prompts: Sequence[str], batch_size: int, mode: str, desc: str = "") -> list[str]:
    """Generations for all prompts; batched by length (results do not depend on batching)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc or mode, unit="batch"):
        chunk = order[start:start + batch_size]
        for index, text in zip(chunk, generate_batch(model, tokenizer, [prompts[i] for i in chunk], mode)):
            texts[index] = text
    return texts


def score_set(model, tokenizer, eval_set: EvalSet, batch_size: int = 32, mode: str = "protocol") -> dict[str, Any]:
    """Generate, parse and score one set; the per-example records are the leaderboard's."""
    started = time.perf_counter()
    generations = generate_answers(model, tokenizer, eval_set.prompts, batch_size, mode, f"{eval_set.name} ({mode})")
    seconds = time.perf_counter() - started
    predictions = [parse_label(answer_text(text)) for text in generations]
    gold = [parse_label(target) for target in eval_set.targets]
    correct = sum(p == g for p, g in zip(predictions, gold))
    return {
        "accuracy": correct / len(gold) if gold else 0.0,
        "correct": correct,
        "count": len(gold),
        "seconds": seconds,
        "records": [
            {"context": context, "new_target": target, "new_out": prediction}
            for context, target, prediction in zip(eval_set.prompts, gold, predictions)
        ],
        "generations": generations,
    }


def output_paths(output_dir: str | Path, name: str, run_name: str) -> tuple[Path, Path]:
    """The leaderboard's file names: accuracy text and generation JSON lines."""
    folder = Path(output_dir)
    return folder / f"acc_{name}_{run_name}.txt", folder / f"generation_{name}_{run_name}.jsonl"


def write_set_files(output_dir: str | Path, name: str, run_name: str, result: dict[str, Any]) -> None:
    """`Accuracy: {acc}. ` and the records, written by `datasets` exactly as the script writes them."""
    from datasets import Dataset

    acc_path, generation_path = output_paths(output_dir, name, run_name)
    acc_path.write_text(f"Accuracy: {result['accuracy']}. ")
    Dataset.from_list(result["records"]).to_json(str(generation_path))


def evaluate_adapter(
    base_model: str,
    peft_path: str | None,
    datasets: Sequence[str] = DATASETS,
    data_dir: str | None = None,
    mode: str = "protocol",
    batch_size: int = 32,
    quantization: int = 4,
    output_dir: str | None = "benchmarks",
    run_name: str = "run",
    limit: int | None = None,
) -> dict[str, Any]:
    """Score an adapter (or the bare base model, `peft_path=None`) on the leaderboard's sets.

    Returns accuracies as fractions under each set's name, their "average", "counts" and
    "seconds"; with `output_dir`, also writes the leaderboard's files and `summary_{run}.json`.
    Everything that can be checked is checked before the model loads.
    """
    names = check_names(datasets)
    if mode not in MODES:
        raise EvalError(f"--mode {mode!r} is not supported; allowed: {', '.join(MODES)}")
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size} is not allowed; use an integer >= 1")
    if peft_path is not None and not Path(peft_path).expanduser().is_dir():
        raise EvalError(f"--peft-path {peft_path!r}: no such folder")
    if output_dir is not None:
        taken = [str(p) for name in names for p in output_paths(output_dir, name, run_name) if p.exists()]
        summary_path = Path(output_dir) / f"summary_{run_name}.json"
        taken += [str(summary_path)] if summary_path.exists() else []
        if taken:
            raise EvalError(f"not overwriting earlier results {', '.join(taken)}; choose another --run-name")
    sets = [load_eval_set(name, data_dir, limit) for name in names]
    started = time.perf_counter()
    model, tokenizer = load_model(base_model, peft_path, quantization)
    load_seconds = time.perf_counter() - started
    results = {eval_set.name: score_set(model, tokenizer, eval_set, batch_size, mode) for eval_set in sets}
    summary = summarize(results)
    summary.update(run_name=run_name, mode=mode, base_model=base_model, peft_path=peft_path,
                   quantization=quantization, batch_size=batch_size, data_dir=data_dir, limit=limit,
                   load_seconds=round(load_seconds, 3), total_seconds=round(time.perf_counter() - started, 3))
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for name, result in results.items():
            write_set_files(output_dir, name, run_name, result)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
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
