"""`train.training-arguments.*`: TRL's own `SFTConfig` fields, passed through as the run config says.

The keys are SFTConfig's field names with hyphens (``lr-scheduler-type``). They are checked
against SFTConfig's fields when the config is parsed, and the run's SFTConfig is built once
on the server before the run folder exists, so a bad value stops the run by name instead of
failing inside every client. `sft_arguments` is the single place that adds what the app owns.
"""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
from collections.abc import Mapping
from typing import Any

from flowertune_finance.config import TRAINING_ARGUMENTS_PREFIX, ConfigError, TrainConfig
from flowertune_finance.worker_cache import WORKER_CACHE

# Set by the app each round; a value in the run config is ignored (upstream's template ships
# `output-dir = ""` and `learning-rate = ""` for this reason).
APP_OWNED_TRAINING_ARGUMENTS = ("output_dir", "learning_rate")
# Precision flags that only make sense on a GPU; on the CPU the app trains in fp32.
GPU_PRECISION_ARGUMENTS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval")
DEFAULT_SEED = 42  # transformers' TrainingArguments.seed default
POSITIVE_INTEGERS = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps")


def _key(name: str) -> str:
    return f"{TRAINING_ARGUMENTS_PREFIX}{name.replace('_', '-')}"


def collect_training_arguments(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """`train.training-arguments.*` as snake_case SFTConfig keyword arguments, names checked."""
    from trl import SFTConfig  # deferred: trl imports torch

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    arguments: dict[str, Any] = {}
    for key, value in run_config.items():
        if not key.startswith(TRAINING_ARGUMENTS_PREFIX):
            continue
        name = key[len(TRAINING_ARGUMENTS_PREFIX):].replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{_key(close[0])}'?" if close else ""
            raise ConfigError(f"run config '{key}' is not a training argument of trl.SFTConfig{hint} "
                              "(see https://huggingface.co/docs/trl/sft_trainer for the allowed names)")
        integer = isinstance(value, int) and not isinstance(value, bool)
        if name in POSITIVE_INTEGERS and not (integer and value >= 1):
            raise ConfigError(f"run config '{key}' = {value!r} is out of range; allowed: an integer >= 1")
        if name == "max_steps" and not (integer and (value >= 1 or value == -1)):
            raise ConfigError(f"run config '{key}' = {value!r} is out of range; allowed: an integer >= 1, "
                              f"or -1 to train for {_key('num_train_epochs')} epochs")
        if name not in APP_OWNED_TRAINING_ARGUMENTS:
            arguments[name] = value
    return arguments


def sft_arguments(train: TrainConfig, learning_rate: float, output_dir: str, cuda: bool,
                  server_round: int = 1) -> dict[str, Any]:
    """Keyword arguments of this round's `trl.SFTConfig`: the run's training arguments as given,
    plus what the app owns (learning rate, output folder, data seed, loss and saving settings).

    Precision flags pass through as the run config says on a GPU and are dropped on a CPU, which
    trains in fp32; absent, bf16 and fp16 are off, as in the reference (TRL would turn bf16 on).
    With `dynamic-data-seed` the data seed is `(data-seed or seed) + round - 1`, as in the
    reference template: a new shuffle of the partition each round.
    """
    arguments = dict(train.training_arguments)
    if not cuda:
        for name in GPU_PRECISION_ARGUMENTS:
            arguments.pop(name, None)
    if train.dynamic_data_seed:
        base_seed = arguments.get("data_seed")
        base_seed = arguments.get("seed", DEFAULT_SEED) if base_seed is None else base_seed
        arguments["data_seed"] = int(base_seed) + server_round - 1
    arguments.update(
        output_dir=output_dir,
        learning_rate=learning_rate,
        max_length=train.seq_length,
        completion_only_loss=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},  # examples arrive tokenized, labels built once
        use_cpu=not cuda,
        bf16=bool(arguments.get("bf16", False)),
        fp16=bool(arguments.get("fp16", False)),
    )
    return arguments


def check_training_arguments(train: TrainConfig) -> None:
    """Build the run's `trl.SFTConfig`, naming the culprit key when it is refused. Once per process
    and argument set (`WORKER_CACHE`): clients parse the run config on every call, and building an
    SFTConfig each time would cost more than the check is worth."""
    key = (tuple(sorted((k, repr(v)) for k, v in train.training_arguments.items())), train.seq_length)
    WORKER_CACHE.check_training_arguments_once(key, lambda: _build_or_name_culprit(train))


def _build_or_name_culprit(train: TrainConfig) -> None:
    """Build the SFTConfig; when refused, build each argument alone to name the culprits."""
    from trl import SFTConfig

    def build(arguments: Mapping[str, Any]) -> None:
        candidate = dataclasses.replace(train, training_arguments=dict(arguments))
        with tempfile.TemporaryDirectory() as output_dir:
            SFTConfig(**sft_arguments(candidate, train.learning_rate_max, output_dir, cuda=False))

    try:
        build(train.training_arguments)
    except Exception as error:  # SFTConfig raises ValueError, TypeError, KeyError, ... for bad values
        culprits = []
        for name, value in train.training_arguments.items():
            try:
                build({name: value})
            except Exception:
                culprits.append(f"'{_key(name)}' = {value!r}")
        where = ", ".join(culprits) or f"the combination of {TRAINING_ARGUMENTS_PREFIX}*"
        raise ConfigError(f"run config {where} is not accepted by trl.SFTConfig: {error}") from error
