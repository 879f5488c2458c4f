"""Checks the ServerApp runs before it creates a run folder: cheap, and without base weights.

Each trigger here used to surface only inside every client, round after round, while the run
"completed" with nothing trained. The server checks what it can see: a local model folder
(weights and tokenizer files), the tokenizer itself, and, when the data file is visible to it
(simulation, or a shared path), the rows per partition, their labels, and whether
`train.seq-length` keeps every label. In a deployment the data owners' files are not on the
SuperLink: each SuperNode then runs the same data checks at its first call (`training`).
"""

from __future__ import annotations

import random
from logging import INFO, WARNING
from pathlib import Path

from flwr.common import log

from flowertune_finance.config import AppConfig, ConfigError
from flowertune_finance.dataset import (
    DataError,
    check_examples_fit,
    column_values,
    label_report,
    load_tokenizer,
    validate_data_file,
)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
FIT_SAMPLE_ROWS = 512  # rows whose tokenized length is checked against train.seq-length
FIT_SAMPLE_SEED = 0


def is_local_model(name: str) -> bool:
    """Whether `model.name` names a folder (a path-like name, or an existing folder) rather than a hub id."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().is_dir()


def check_model_folder(name: str) -> None:
    """A local model folder must hold a config, weights and tokenizer files."""
    if not is_local_model(name):
        return
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"run config 'model.name' = {name!r}: no such local model folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        missing.append(f"weights ({', '.join(WEIGHT_PATTERNS)})")
    if not any((folder / file).is_file() for file in TOKENIZER_FILES):
        missing.append(f"tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ConfigError(
            f"run config 'model.name' = {name!r}: the folder lacks {'; '.join(missing)}; "
            "save the model with save_pretrained() and its tokenizer with tokenizer.save_pretrained()"
        )


def load_run_tokenizer(name: str):
    """The run's tokenizer, or a ConfigError that names model.name."""
    try:
        return load_tokenizer(name)
    except Exception as error:  # transformers raises OSError, ValueError, ... for unusable tokenizers
        raise ConfigError(f"run config 'model.name' = {name!r}: its tokenizer does not load: {error}") from error


def check_data_file(config: AppConfig, tokenizer, num_partitions: int) -> None:
    """The local data file: valid rows, at least one per partition, known labels, labels that fit."""
    dataset = validate_data_file(config.dataset_path)
    if len(dataset) < num_partitions:
        raise DataError(
            f"data file {config.dataset_path!r} has {len(dataset)} row(s) for {num_partitions} partitions "
            "(one per SuperNode); every partition needs at least one row: use more data or fewer SuperNodes"
        )
    (outputs,) = column_values(dataset, "output")
    distribution, unknown = label_report(outputs)
    log(INFO, "Training labels in %s: %s", config.dataset_path, distribution)
    if unknown:
        log(WARNING, "Labels outside the sentiment vocabulary (positive/negative/neutral, optionally graded): %s",
            ", ".join(repr(label) for label in unknown))
    indices = sorted(random.Random(FIT_SAMPLE_SEED).sample(range(len(dataset)), min(FIT_SAMPLE_ROWS, len(dataset))))
    check_examples_fit(dataset.select(indices).to_list(), tokenizer, config.train.prompt_format, config.train.seq_length)


def preflight(config: AppConfig, num_partitions: int) -> None:
    """Everything the server can check before the run folder exists; raises naming the culprit."""
    check_model_folder(config.model.name)
    tokenizer = load_run_tokenizer(config.model.name)
    if config.dataset_path and Path(config.dataset_path).expanduser().is_file():
        check_data_file(config, tokenizer, num_partitions)
