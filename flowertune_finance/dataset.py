"""Partitions of the fingpt sentiment data, prompt formats, and their tokenized form.

The training prompt matters for the score: the leaderboard asks
``Instruction: ...\\nInput: ...\\nAnswer: `` and reads the text generated after it. The
``answer`` format trains on exactly that prompt, token for token, and closes the label with
EOS; ``alpaca`` (the default) is the reference template's example, token for token: its
text, BOS and no EOS, loss on the tokens after ``### Response:``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from flowertune_finance.prompts import PROMPT_FORMATS
from flowertune_finance.worker_cache import WORKER_CACHE

REQUIRED_COLUMNS = ("instruction", "input", "output")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SENTIMENTS = ("positive", "negative", "neutral")
GRADES = ("", "mildly ", "moderately ", "strong ", "strongly ")
KNOWN_LABELS = frozenset(grade + sentiment for grade in GRADES for sentiment in SENTIMENTS)


class DataError(ValueError):
    """The training data is missing, malformed, or lacks a required column."""


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


def row_problem(instruction: Any, text: Any, output: Any) -> str | None:
    """Why a row cannot be trained on, or None. A null input counts as empty (allowed)."""
    for column, value in (("instruction", instruction), ("output", output)):
        if value is None or isinstance(value, str) and not value.strip():
            return f"an empty {column}"
        if not isinstance(value, str):
            return f"{column} = {value!r} is not text"
    if text is not None and not isinstance(text, str):
        return f"input = {text!r} is not text"
    return None


def column_values(dataset: Dataset, *columns: str) -> list[list[Any]]:
    """The values of `columns`, read in one batch: iterating `dataset[column]` (a lazy `Column`)
    reads the table once per row, about 15 times slower."""
    values = dataset.select_columns(list(columns)).to_dict()
    return [values[column] for column in columns]


def bad_rows(dataset: Dataset) -> list[tuple[int, str]]:
    """(index, problem) of every row that cannot be trained on."""
    rows = zip(*column_values(dataset, *REQUIRED_COLUMNS))
    return [(i, problem) for i, row in enumerate(rows) if (problem := row_problem(*row))]


def _check_utf8(path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        data = path.read_bytes()
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            f"data file {str(path)!r} is not UTF-8 text: byte 0x{data[error.start]:02x} on line {line}; "
            "save it as UTF-8"
        ) from None


def _json_rows(path: Path) -> list[Any]:
    """The rows of a JSON array or JSON Lines file, read with Python's json so that a value of the
    wrong type is reported by row instead of as an Arrow schema error."""
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise DataError(f"data file {str(path)!r} is not valid JSON/JSON Lines: {error}") from None


def validate_data_file(path: str | Path, setting: str = "run config 'dataset.path'") -> Dataset:
    """Check a local data file before any training: it exists, is UTF-8, parses, has the fingpt
    columns and only rows that can be trained on. Returns the data. `setting` names where the path
    came from, for the error message."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist (set by {setting})")
    builder = _builder(path)
    if builder == "json":
        _check_utf8(path)
        rows = _json_rows(path)
        if not all(isinstance(row, dict) for row in rows):
            raise DataError(f"data file {str(path)!r}: every row must be a JSON object with {', '.join(REQUIRED_COLUMNS)}")
        _check_columns(sorted({key for row in rows for key in row}), str(path))
        _raise_for_bad_rows(path, [(i, p) for i, row in enumerate(rows) if (p := row_problem(*_values(row)))])
    try:
        dataset = Dataset.from_json(str(path)) if builder == "json" else Dataset.from_parquet(str(path))
    except Exception as error:  # datasets raises several types for unreadable files
        raise DataError(f"data file {str(path)!r} could not be read as {builder}: {error}") from error
    _check_columns(dataset.column_names, str(path))
    _raise_for_bad_rows(path, bad_rows(dataset))
    return dataset


def _values(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(column) for column in REQUIRED_COLUMNS)


def _raise_for_bad_rows(path: Path, problems: list[tuple[int, str]]) -> None:
    if problems:
        index, problem = problems[0]
        raise DataError(
            f"data file {str(path)!r} has {len(problems)} row(s) that cannot be trained on, first at row {index} "
            f"(0-based): {problem}; fix or remove them"
        )


def label_report(outputs: Sequence[str]) -> tuple[str, list[str]]:
    """A one-line label distribution, and the labels outside the sentiment vocabulary (typos such
    as `postive` train the model to say them)."""
    counts = Counter(output.strip() for output in outputs)
    line = ", ".join(f"{label} {count}" for label, count in counts.most_common())
    return line, sorted(label for label in counts if label.lower() not in KNOWN_LABELS)


def load_partition(partition_id: int, num_partitions: int, dataset_name: str, dataset_path: str = "") -> Dataset:
    """One IID partition of the training data, from the hub or from a local file.

    The partitioned data set is built once per process (`WORKER_CACHE.federated_dataset`):
    Flower Datasets loads and shuffles the whole data set once, and every later client call
    in this worker only slices it. Rows with a blank instruction or output are dropped (hub
    data cannot be fixed by the user; a local file is checked strictly by `validate_data_file`
    at server start).
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is out of range for num-partitions {num_partitions}")
    source = WORKER_CACHE.federated_dataset(
        (dataset_name, dataset_path, num_partitions),
        lambda: federated_dataset(dataset_name, dataset_path, num_partitions),
    )
    partition = source.load_partition(partition_id, "train")
    _check_columns(partition.column_names, dataset_path or dataset_name)
    rows = {index for index, _ in bad_rows(partition)}
    if rows:
        partition = partition.select(i for i in range(len(partition)) if i not in rows)
    if len(partition) == 0:
        raise DataError(
            f"partition {partition_id} of {num_partitions} is empty: the data has fewer usable rows than "
            "partitions (SuperNodes); use more data or fewer SuperNodes"
        )
    return partition


def federated_dataset(dataset_name: str, dataset_path: str, num_partitions: int):
    """Flower Datasets' IID partitioning of the local file when given, else of the hub data set."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    partitioners = {"train": IidPartitioner(num_partitions=num_partitions)}
    if dataset_path:
        path = Path(dataset_path).expanduser()
        return FederatedDataset(dataset=_builder(path), data_files=str(path), partitioners=partitioners)
    return FederatedDataset(dataset=dataset_name, partitioners=partitioners)


def load_tokenizer(model_name: str):
    """The model's tokenizer, set up for training as upstream does: pad = EOS, right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_partition(partition: Dataset, tokenizer, prompt_format: str, seq_length: int) -> Dataset:
    """Pre-tokenized examples in the shape TRL's SFTTrainer accepts (`input_ids`, `completion_mask`)."""
    tokenize = PROMPT_FORMATS[prompt_format].tokenize
    return partition.map(lambda row: tokenize(tokenizer, row, seq_length), remove_columns=partition.column_names)


def check_examples_fit(rows: Sequence[dict[str, Any]], tokenizer, prompt_format: str, seq_length: int) -> None:
    """Fail when a row's label would be cut off by `train.seq-length` (it would train nothing),
    naming the longest example and the value that fits."""
    lengths = []
    for row in rows:
        full = PROMPT_FORMATS[prompt_format].tokenize(tokenizer, row, 10**9)
        prompt_tokens = full["completion_mask"].index(1) if 1 in full["completion_mask"] else len(full["input_ids"])
        lengths.append((len(full["input_ids"]), prompt_tokens))
    longest, prompt_tokens = max(lengths)
    if longest > seq_length:
        raise DataError(
            f"run config 'train.seq-length' = {seq_length} cuts the label off: the longest of {len(rows)} examples "
            f"checked has a {prompt_tokens}-token prompt and {longest} tokens with its label "
            f"(format {prompt_format!r}); set train.seq-length >= {longest}"
        )
