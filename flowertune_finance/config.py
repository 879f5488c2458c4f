"""One typed, validated view of the run config, built once at the edge of each app.

`context.run_config` is a flat mapping of dotted keys (``model.lora.peft-lora-r``). Both
apps turn it into an `AppConfig` with `parse_run_config` before they load anything, so a
typo or an out-of-range value stops the run with a message naming the key, instead of
surfacing after a 7B model has been loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUANTIZATIONS = (0, 4, 8)
PROMPT_FORMATS = ("alpaca", "answer")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm")
TRANSPORT_DTYPES = ("float32", "float16")
TRAINING_ARGUMENTS_PREFIX = "train.training-arguments."

# Training arguments the app sets itself each round; a value in the run config is ignored
# (upstream's template ships `output-dir = ""` and `learning-rate = ""` for this reason).
APP_OWNED_TRAINING_ARGUMENTS = ("output_dir", "learning_rate")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter settings (everything that changes the model's shape)."""

    name: str = "mistralai/Mistral-7B-v0.3"
    quantization: int = 4
    gradient_checkpointing: bool = True
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.075


@dataclass(frozen=True)
class TrainConfig:
    """Client-side training settings."""

    save_every_round: int = 5
    dynamic_data_seed: bool = False
    learning_rate_max: float = 5e-5
    learning_rate_min: float = 1e-6
    seq_length: int = 512
    prompt_format: str = "alpaca"
    transport_dtype: str = "float32"
    # Keep the base model + LoRA wrapper in the worker between client calls; False rebuilds
    # it every call like the upstream template (for before/after benchmarks; same results).
    cache_base_model: bool = True
    training_arguments: Mapping[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.training_arguments.get("per_device_train_batch_size", 16))

    @property
    def max_steps(self) -> int:
        return int(self.training_arguments.get("max_steps", 10))

    @property
    def examples_per_round(self) -> int:
        """Examples one client consumes in one round: steps x batch x accumulation."""
        accumulation = int(self.training_arguments.get("gradient_accumulation_steps", 1))
        return self.max_steps * self.batch_size * accumulation


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation settings."""

    name: str = "fedavg"
    fraction_train: float = 0.1
    fraction_evaluate: float = 0.0
    # FedProx: weight of the proximal term mu/2 * ||w - w_global||^2 the clients add to their loss.
    proximal_mu: float = 0.01
    # FedAvgM: server step on the averaged update (1.0 = take it whole) and its momentum.
    fedavgm_server_learning_rate: float = 1.0
    fedavgm_server_momentum: float = 0.9
    # FedAdam: Adam on the server with the averaged update as pseudo-gradient. Its step per
    # element is about eta whatever the update's size, so eta must be of the order of a
    # client's own per-round LoRA change (not Flower's 0.1, which would wreck an adapter);
    # tau damps elements that barely move.
    fedadam_eta: float = 1e-3
    fedadam_beta_1: float = 0.9
    fedadam_beta_2: float = 0.99
    fedadam_tau: float = 1e-3


@dataclass(frozen=True)
class EvalConfig:
    """Optional server-side fast evaluation during training (off by default)."""

    every_rounds: int = 0
    num_examples: int = 64
    data_dir: str = ""


@dataclass(frozen=True)
class AppConfig:
    """The whole run config, typed and validated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    num_server_rounds: int = 200
    dataset_name: str = "flwrlabs/fingpt-sentiment-train"
    dataset_path: str = ""
    output_dir: str = "results"
    resume_from: str = ""

    def defining_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (stored in every checkpoint)."""
        return {
            "model": dataclasses.asdict(self.model),
            "num_server_rounds": self.num_server_rounds,
            "dataset_name": self.dataset_name,
            "dataset_path": self.dataset_path,
            "prompt_format": self.train.prompt_format,
        }


def _positive(value: float) -> bool:
    return value > 0


def _fraction(value: float) -> bool:
    return 0 < value <= 1


def _fraction_or_zero(value: float) -> bool:
    return 0 <= value <= 1


def _non_negative(value: float) -> bool:
    return value >= 0


# key -> (section, field, type, check, what is allowed)
_Check = Callable[[Any], bool] | None
_KEYS: dict[str, tuple[str, str, type, _Check, str]] = {
    "model.name": ("model", "name", str, bool, "a hub id or a local model folder"),
    "model.quantization": ("model", "quantization", int, QUANTIZATIONS.__contains__, "0, 4 or 8"),
    "model.gradient-checkpointing": ("model", "gradient_checkpointing", bool, None, "true or false"),
    "model.lora.peft-lora-r": ("model", "lora_r", int, _positive, "an integer > 0"),
    "model.lora.peft-lora-alpha": ("model", "lora_alpha", int, _positive, "an integer > 0"),
    "model.lora.peft-lora-dropout": ("model", "lora_dropout", float, lambda v: 0 <= v < 1, "0 <= dropout < 1"),
    "train.save-every-round": ("train", "save_every_round", int, _positive, "an integer >= 1"),
    "train.dynamic-data-seed": ("train", "dynamic_data_seed", bool, None, "true or false"),
    "train.learning-rate-max": ("train", "learning_rate_max", float, _positive, "a number > 0"),
    "train.learning-rate-min": ("train", "learning_rate_min", float, _non_negative, "a number >= 0"),
    "train.seq-length": ("train", "seq_length", int, _positive, "an integer > 0"),
    "train.prompt-format": ("train", "prompt_format", str, PROMPT_FORMATS.__contains__, " or ".join(PROMPT_FORMATS)),
    "train.transport-dtype": ("train", "transport_dtype", str, TRANSPORT_DTYPES.__contains__, " or ".join(TRANSPORT_DTYPES)),
    "train.cache-base-model": ("train", "cache_base_model", bool, None, "true or false"),
    "strategy.name": ("strategy", "name", str, STRATEGIES.__contains__, ", ".join(STRATEGIES)),
    "strategy.fraction-train": ("strategy", "fraction_train", float, _fraction, "0 < fraction <= 1"),
    "strategy.fraction-evaluate": ("strategy", "fraction_evaluate", float, _fraction_or_zero, "0 <= fraction <= 1"),
    "strategy.proximal-mu": ("strategy", "proximal_mu", float, _non_negative, "a number >= 0"),
    "strategy.fedavgm.server-learning-rate": (
        "strategy", "fedavgm_server_learning_rate", float, _positive, "a number > 0"),
    "strategy.fedavgm.server-momentum": (
        "strategy", "fedavgm_server_momentum", float, lambda v: 0 <= v < 1, "0 <= momentum < 1"),
    "strategy.fedadam.eta": ("strategy", "fedadam_eta", float, _positive, "a number > 0"),
    "strategy.fedadam.beta-1": ("strategy", "fedadam_beta_1", float, lambda v: 0 <= v < 1, "0 <= beta < 1"),
    "strategy.fedadam.beta-2": ("strategy", "fedadam_beta_2", float, lambda v: 0 <= v < 1, "0 <= beta < 1"),
    "strategy.fedadam.tau": ("strategy", "fedadam_tau", float, _positive, "a number > 0"),
    "eval.every-rounds": ("eval", "every_rounds", int, _non_negative, "0 (off) or an integer >= 1"),
    "eval.num-examples": ("eval", "num_examples", int, _positive, "an integer >= 1"),
    "eval.data-dir": ("eval", "data_dir", str, None, "a folder of save_to_disk data sets, or empty"),
    "num-server-rounds": ("", "num_server_rounds", int, _positive, "an integer >= 1"),
    "static.dataset.name": ("", "dataset_name", str, bool, "a hub data set id"),
    "dataset.path": ("", "dataset_path", str, None, "a local JSON/JSONL/Parquet file, or empty"),
    "output.dir": ("", "output_dir", str, bool, "a folder path"),
    "resume.from": ("", "resume_from", str, None, "a run folder such as results/<run>, or empty"),
}

# Upstream keys passed to the trainer as they are; validated against SFTConfig's fields.
_INT_TRAINING_ARGUMENTS = {
    "per_device_train_batch_size": "an integer >= 1",
    "gradient_accumulation_steps": "an integer >= 1",
    "max_steps": "an integer >= 1",
    "logging_steps": "an integer >= 1",
}


def _coerce(key: str, value: Any, type_: type, allowed: str) -> Any:
    """Return `value` as `type_`, or raise a ConfigError naming the key."""
    if type_ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_ is not bool and isinstance(value, bool) or not isinstance(value, type_):
        raise ConfigError(
            f"run config '{key}' = {value!r} has type {type(value).__name__}; expected {type_.__name__} ({allowed})"
        )
    return value


def _training_arguments(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Collect `train.training-arguments.*` as snake_case keyword arguments for SFTConfig."""
    from trl import SFTConfig  # deferred: trl imports torch, keep `config` light to import

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    arguments: dict[str, Any] = {}
    for key, value in run_config.items():
        if not key.startswith(TRAINING_ARGUMENTS_PREFIX):
            continue
        name = key[len(TRAINING_ARGUMENTS_PREFIX):].replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"run config '{key}' is not a training argument of trl.SFTConfig; "
                "see https://huggingface.co/docs/trl/sft_trainer for the allowed names"
            )
        if name in _INT_TRAINING_ARGUMENTS:
            value = _coerce(key, value, int, _INT_TRAINING_ARGUMENTS[name])
            if value < 1:
                raise ConfigError(f"run config '{key}' = {value!r} is out of range; allowed: {_INT_TRAINING_ARGUMENTS[name]}")
        if name not in APP_OWNED_TRAINING_ARGUMENTS:
            arguments[name] = value
    return arguments


def parse_run_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Build and validate an `AppConfig` from a flat Flower run config.

    Keys left out keep the upstream defaults; unknown keys and bad values raise
    `ConfigError` naming the key, its value and what is allowed.
    """
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}, "strategy": {}, "eval": {}, "": {}}
    for key, value in run_config.items():
        if key.startswith(TRAINING_ARGUMENTS_PREFIX):
            continue
        if key not in _KEYS:
            allowed = ", ".join(k for k in _KEYS if not k.startswith("static."))
            raise ConfigError(f"unknown run config key '{key}'; known keys: {allowed}, {TRAINING_ARGUMENTS_PREFIX}*")
        section, name, type_, check, allowed = _KEYS[key]
        value = _coerce(key, value, type_, allowed)
        if check is not None and not check(value):
            raise ConfigError(f"run config '{key}' = {value!r} is not allowed; allowed: {allowed}")
        sections[section][name] = value

    train = TrainConfig(**sections["train"], training_arguments=_training_arguments(run_config))
    if train.learning_rate_min > train.learning_rate_max:
        raise ConfigError(
            f"run config 'train.learning-rate-min' = {train.learning_rate_min} exceeds "
            f"'train.learning-rate-max' = {train.learning_rate_max}; the minimum must be <= the maximum"
        )
    return AppConfig(
        model=ModelConfig(**sections["model"]),
        train=train,
        strategy=StrategyConfig(**sections["strategy"]),
        eval=EvalConfig(**sections["eval"]),
        **sections[""],
    )


def check_local_paths(config: AppConfig, on_server: bool = True) -> None:
    """Fail early when a path-like setting points at nothing.

    `model.name` counts as local when it looks like a path (absolute, or starting with
    `.`/`~`) or when the folder exists; otherwise it is a hub id and is left alone.
    `eval.data-dir` is only read by the ServerApp, so a ClientApp (`on_server=False`) skips it.
    """
    name = config.model.name
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"run config 'model.name' = {name!r}: no such local model folder")
    if config.dataset_path and not Path(config.dataset_path).expanduser().is_file():
        raise ConfigError(
            f"run config 'dataset.path' = {config.dataset_path!r}: no such file "
            "(allowed: a local .json, .jsonl or .parquet file in the fingpt schema, or empty)"
        )
    if on_server and config.eval.data_dir and not Path(config.eval.data_dir).expanduser().is_dir():
        raise ConfigError(f"run config 'eval.data-dir' = {config.eval.data_dir!r}: no such folder")
