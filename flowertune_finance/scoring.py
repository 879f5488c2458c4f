"""Leaderboard scoring: FPB, FiQA and TFNS examples built, answered and scored as the official script does.

Splits, seeds, label maps, instructions, prompt, batching, answer parsing and accuracy follow the
leaderboard's script (protocol mode), so our numbers are the numbers it computes. Data comes from
the hub ids it uses, or from `save_to_disk` copies under a `data_dir`. The ServerApp's optional
evaluation and the `eval` command both score through this module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flowertune_finance.generation import MODES, EvalError, first_line, generate_batch
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
