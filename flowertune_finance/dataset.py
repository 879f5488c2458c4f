"""Partitions of the fingpt sentiment data, prompt formats, and their tokenized form.

The training prompt matters for the score: the leaderboard asks
``Instruction: ...\\nInput: ...\\nAnswer: `` and reads the text generated after it. The
``answer`` format trains on exactly that prompt, token for token; ``alpaca`` is the
upstream template's prompt, kept as the default for comparability.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

REQUIRED_COLUMNS = ("instruction", "input", "output")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ALPACA_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
PARTITION_SEED = 42  # Flower Datasets' IidPartitioner shuffles with this seed by default


class DataError(ValueError):
    """The training data is missing, malformed, or lacks a required column."""


def format_prompt(instruction: str, text: str, prompt_format: str = "alpaca") -> str:
    """The prompt a model sees before the label, in one of the supported formats.

    `answer` is the evaluation prompt and ends with "Answer: " (trailing space), exactly
    as the leaderboard feeds it; `alpaca` folds the input into the instruction like the
    upstream template and ends with "### Response:".
    """
    if prompt_format == "answer":
        return f"Instruction: {instruction}\nInput: {text}\nAnswer: "
    if prompt_format == "alpaca":
        return f"{ALPACA_HEADER}\n### Instruction:\n{instruction} {text}\n### Response:"
    raise ValueError(f"prompt format {prompt_format!r} is not supported; allowed: alpaca, answer")


def format_completion(output: str, prompt_format: str = "alpaca") -> str:
    """The label text trained on; alpaca puts the space after "Response:" in the completion."""
    return output if prompt_format == "answer" else f" {output}"


def _builder(path: Path) -> str:
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data file {str(path)!r} has suffix {path.suffix!r}; allowed: .json, .jsonl, .parquet")
    return builder


def _check_columns(columns: Sequence[str], source: str) -> None:
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise DataError(
            f"data {source!r} lacks column(s) {', '.join(missing)}; the fingpt schema needs "
            f"{', '.join(REQUIRED_COLUMNS)} (found: {', '.join(columns) or 'none'})"
        )


def bad_rows(dataset: Dataset) -> list[int]:
    """Indices of rows whose instruction or output is null or blank (input may be empty)."""
    return [
        i
        for i, (instruction, output) in enumerate(zip(dataset["instruction"], dataset["output"]))
        if not (isinstance(instruction, str) and instruction.strip() and isinstance(output, str) and output.strip())
    ]


def validate_data_file(path: str | Path, setting: str = "run config 'dataset.path'") -> int:
    """Check a local data file before any training: it exists, parses, has the fingpt columns
    and no blank instruction/output. Returns the number of rows. `setting` names where the
    path came from, for the error message."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (set by {setting})")
    try:
        dataset = Dataset.from_json(str(path)) if _builder(path) == "json" else Dataset.from_parquet(str(path))
    except DataError:
        raise
    except Exception as error:  # datasets raises several types for unreadable files
        raise DataError(f"data file {str(path)!r} could not be read as {_builder(path)}: {error}") from error
    _check_columns(dataset.column_names, str(path))
    rows = bad_rows(dataset)
    if rows:
        raise DataError(
            f"data file {str(path)!r} has {len(rows)} row(s) with an empty instruction or output, "
            f"first at row {rows[0]} (0-based); fix or remove them"
        )
    return len(dataset)


# Per-process cache: one FederatedDataset per data source and partition count. Flower
# Datasets loads and shuffles the whole data set once; every later client call in this
# worker then only slices it.
_FEDERATED_DATASETS: dict[tuple[str, str, int], Any] = {}


def load_partition(partition_id: int, num_partitions: int, dataset_name: str, dataset_path: str = "") -> Dataset:
    """One IID partition of the training data, from the hub or from a local file.

    Rows with a blank instruction or output are dropped (hub data cannot be fixed by the
    user; a local file is checked strictly by `validate_data_file` at server start).
    """
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is out of range for num-partitions {num_partitions}")
    key = (dataset_name, dataset_path, num_partitions)
    if key not in _FEDERATED_DATASETS:
        partitioners = {"train": IidPartitioner(num_partitions=num_partitions)}
        if dataset_path:
            path = Path(dataset_path).expanduser()
            source = FederatedDataset(dataset=_builder(path), data_files=str(path), partitioners=partitioners)
        else:
            source = FederatedDataset(dataset=dataset_name, partitioners=partitioners)
        _FEDERATED_DATASETS[key] = source
    partition = _FEDERATED_DATASETS[key].load_partition(partition_id, "train")
    _check_columns(partition.column_names, dataset_path or dataset_name)
    rows = set(bad_rows(partition))
    if rows:
        partition = partition.select(i for i in range(len(partition)) if i not in rows)
    return partition


def load_tokenizer(model_name: str):
    """The model's tokenizer, set up for training as upstream does: pad = EOS, right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_example(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    """Token ids and completion mask for one prompt/completion pair.

    The prompt is tokenized on its own, exactly as an evaluator tokenizes it, so the
    context the model learns to continue is the context it is scored on. The completion
    takes the ids that follow the prompt in the joint tokenization when the prompt's ids
    are a prefix of it (the natural split), otherwise its own ids. EOS closes it.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint_ids = tokenizer(prompt + completion)["input_ids"]
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        completion_ids = joint_ids[len(prompt_ids):]
    else:
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }


def tokenize_partition(partition: Dataset, tokenizer, prompt_format: str, seq_length: int) -> Dataset:
    """Pre-tokenized prompt/completion examples in the shape TRL's SFTTrainer accepts."""

    def tokenize(row: dict[str, str]) -> dict[str, list[int]]:
        prompt = format_prompt(row["instruction"], row["input"], prompt_format)
        example = tokenize_example(tokenizer, prompt, format_completion(row["output"], prompt_format))
        return {key: ids[:seq_length] for key, ids in example.items()}

    return partition.map(tokenize, remove_columns=partition.column_names)


def round_indices(num_examples: int, examples_per_round: int, server_round: int, dynamic: bool) -> list[int]:
    """Which examples of a partition a client trains on in `server_round`.

    The partition is walked in a seeded random order. With `dynamic` off (upstream's
    default) every round takes the same first window; with it on, round r takes the
    r-th window, so successive rounds cover the whole partition before any example
    repeats, and each pass uses a fresh order. Stateless, so a resumed run draws the same
    data as an uninterrupted one.
    """
    if num_examples < 1:
        raise DataError("the partition is empty; use fewer partitions or more data")
    start = (server_round - 1) * examples_per_round if dynamic else 0
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(start, start + examples_per_round):
        epoch = position // num_examples
        if epoch not in orders:
            orders[epoch] = list(range(num_examples))
            random.Random(PARTITION_SEED + epoch).shuffle(orders[epoch])
        indices.append(orders[epoch][position % num_examples])
    return indices
