"""The run config, declared once: every key with its default, check and help, typed by OmegaConf.

`context.run_config` is a flat mapping of dotted keys (``model.lora.peft-lora-r``). Each key is
a field of the dataclasses below, declared with `settings.setting(...)`: its run-config key,
default, allowed values and help text live in that one place. `parse_run_config` turns the flat
mapping into the typed `AppConfig` (OmegaConf structured config: defaults merged, types
enforced), runs the checks, and builds the run's `trl.SFTConfig` once, so a typo or an
out-of-range value stops the run with a message naming the key before anything is loaded.
The README's table (`settings_table`) and `pyproject.toml`'s defaults are tested against it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowertune_finance.leaderboard import STATIC_DATASET_NAME
from flowertune_finance.prompts import PROMPT_FORMATS
from flowertune_finance.settings import Setting, at_least, below_one, declared_settings, markdown_table, one_of, setting
from flowertune_finance.strategies import STRATEGIES

QUANTIZATIONS = (0, 4, 8)
# torch dtype names (`getattr(torch, name)`): what the base layers compute in, and what travels either way
COMPUTE_DTYPES = ("float32", "bfloat16")
TRANSPORT_DTYPES = ("float32", "float16")
TRAINING_ARGUMENTS_PREFIX = "train.training-arguments."


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


ALL_LINEAR = "all-linear"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def target_module_names(value: str) -> list[str]:
    """The names of a comma-separated `model.lora.target-modules` list, stripped."""
    return [name.strip() for name in value.split(",")]


def valid_target_modules(value: str) -> bool:
    """Syntax of `model.lora.target-modules`; whether the names exist is checked against the model."""
    return value in ("", ALL_LINEAR) or all(_MODULE_NAME.match(name) for name in target_module_names(value))


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter (everything that changes the model's shape or arithmetic)."""

    name: str = setting("model.name", "mistralai/Mistral-7B-v0.3",
                        "hub id or local model folder (any causal LM: Mistral, Llama, Qwen2, ...)",
                        "a hub id or a local model folder", bool)
    quantization: int = setting("model.quantization", 4, "bitsandbytes 4- or 8-bit; 0 = none (CPU runs)",
                                *one_of(QUANTIZATIONS))
    gradient_checkpointing: bool = setting("model.gradient-checkpointing", True,
                                           "recompute activations in the backward pass (less memory)")
    lora_r: int = setting("model.lora.peft-lora-r", 32, "LoRA rank",
                          *at_least(0, strict=True))
    lora_alpha: int = setting("model.lora.peft-lora-alpha", 64, "LoRA alpha", *at_least(0, strict=True))
    lora_dropout: float = setting("model.lora.peft-lora-dropout", 0.075, "LoRA dropout", *below_one())
    compute_dtype: str = setting(
        "model.compute-dtype", "float32",
        "what the base layers compute in: float32 is the reference's 4-bit compute; bfloat16 is faster on a GPU",
        *one_of(COMPUTE_DTYPES))
    lora_target_modules: str = setting(
        "model.lora.target-modules", "",
        "layers that get LoRA: empty = PEFT's default for the architecture (Mistral/Llama/Qwen2: q_proj, v_proj); "
        "checked against the model's modules at start",
        '"", "all-linear", or comma-separated module names such as "q_proj,k_proj,v_proj,o_proj"',
        valid_target_modules)
    lora_freeze_a: bool = setting(
        "model.lora.freeze-a", False,
        "true: FFA-LoRA, every A matrix stays at its seeded initialisation (derived by each client, checked by "
        "checksum) and only B is trained and sent, both ways (half the traffic or less)")


@dataclass(frozen=True)
class TrainConfig:
    """Client-side training."""

    save_every_round: int = setting("train.save-every-round", 5,
                                    "checkpoint interval (the last round is always saved)", *at_least(1))
    dynamic_data_seed: bool = setting(
        "train.dynamic-data-seed", False,
        "true: the trainer's data seed is seed + round - 1, a new shuffle of the partition each round (as upstream)")
    learning_rate_max: float = setting("train.learning-rate-max", 5e-5,
                                       "cosine annealing over rounds from this, constant within a round",
                                       *at_least(0, strict=True))
    learning_rate_min: float = setting("train.learning-rate-min", 1e-6, "... down to this in the last round",
                                       *at_least(0))
    seq_length: int = setting("train.seq-length", 512, "tokens per example (prompt and label)",
                              *at_least(0, strict=True))
    prompt_format: str = setting("train.prompt-format", "alpaca",
                                 "alpaca (the template's, token for token) or answer (the evaluation prompt + EOS)",
                                 *one_of(tuple(PROMPT_FORMATS)))
    transport_dtype: str = setting("train.transport-dtype", "float32",
                                   "float16 halves communication; aggregation stays fp32", *one_of(TRANSPORT_DTYPES))
    cache_base_model: bool = setting("train.cache-base-model", True,
                                     "false rebuilds the base model every client call, as upstream (benchmarks)")
    # `train.training-arguments.*`, passed to trl.SFTConfig (see `training_arguments`)
    training_arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation."""

    name: str = setting("strategy.name", "fedavg", "Flower's own strategy", *one_of(tuple(STRATEGIES)))
    fraction_train: float = setting("strategy.fraction-train", 0.1, "share of SuperNodes that train each round",
                                    "0 < fraction <= 1", lambda v: 0 < v <= 1)
    fraction_evaluate: float = setting("strategy.fraction-evaluate", 0.0, "share of SuperNodes asked to evaluate",
                                       "0 <= fraction <= 1", lambda v: 0 <= v <= 1)
    max_skipped_rounds: int = setting(
        "strategy.max-skipped-rounds", 3,
        "stop the run (failed) after this many rounds in a row with no accepted reply; the first round: at once",
        *at_least(1))
    proximal_mu: float = setting("strategy.proximal-mu", 0.01, "fedprox: weight of the proximal term",
                                 *at_least(0))
    fedavgm_server_learning_rate: float = setting("strategy.fedavgm.server-learning-rate", 1.0,
                                                  "fedavgm: server step on the averaged update",
                                                  *at_least(0, strict=True))
    fedavgm_server_momentum: float = setting("strategy.fedavgm.server-momentum", 0.9, "fedavgm: momentum",
                                             *below_one())
    # FedAdam's step per element is about eta whatever the update's size, so eta must be of the
    # order of a client's per-round LoRA change (not Flower's 0.1, which would wreck an adapter).
    fedadam_eta: float = setting("strategy.fedadam.eta", 1e-3, "fedadam: server step size",
                                 *at_least(0, strict=True))
    fedadam_beta_1: float = setting("strategy.fedadam.beta-1", 0.9, "fedadam: first-moment decay", *below_one())
    fedadam_beta_2: float = setting("strategy.fedadam.beta-2", 0.99, "fedadam: second-moment decay", *below_one())
    fedadam_tau: float = setting("strategy.fedadam.tau", 1e-3, "fedadam: damping of elements that barely move",
                                 *at_least(0, strict=True))


@dataclass(frozen=True)
class EvalConfig:
    """Optional server-side fast evaluation during training (off by default)."""

    every_rounds: int = setting("eval.every-rounds", 0, "fast-mode accuracy every N rounds; 0 = off", *at_least(0))
    num_examples: int = setting("eval.num-examples", 64, "examples per set for that evaluation", *at_least(1))
    data_dir: str = setting("eval.data-dir", "", "save_to_disk folders of the three sets (offline), or empty",
                            "a folder of save_to_disk data sets, or empty")


@dataclass(frozen=True)
class AppConfig:
    """The whole run config, typed and validated."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    num_server_rounds: int = setting("num-server-rounds", 200, "federated rounds", *at_least(1))
    dataset_name: str = setting("static.dataset.name", STATIC_DATASET_NAME,
                                "fixed by the leaderboard (the static section)", "a hub data set id", bool)
    dataset_path: str = setting("dataset.path", "", "a local JSON/JSONL/Parquet file in the fingpt schema instead "
                                "of the hub data", "a local .json, .jsonl or .parquet file, or empty")
    output_dir: str = setting("output.dir", "results", "where run folders are created", "a folder path", bool)
    resume_from: str = setting("resume.from", "", "a run folder to continue", "a run folder such as results/<run>")

    def defining_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (stored in every checkpoint)."""
        return {
            "model": dataclasses.asdict(self.model),
            "num_server_rounds": self.num_server_rounds,
            "dataset_name": self.dataset_name,
            "dataset_path": self.dataset_path,
            "prompt_format": self.train.prompt_format,
        }


SETTINGS: dict[str, Setting] = declared_settings(AppConfig)


def _typed(key: str, value: Any, setting_: Setting) -> Any:
    """`value` as the setting's type, or a ConfigError naming the key (no string-to-number guessing)."""
    expected = setting_.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
        raise ConfigError(f"run config '{key}' = {value!r} has type {type(value).__name__}; "
                          f"expected {expected.__name__} ({setting_.spec.allowed})")
    return value


def unknown_key_error(key: str) -> ConfigError:
    """An unknown key, named with the closest declared one."""
    close = difflib.get_close_matches(key, list(SETTINGS), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown run config key '{key}'{hint} (known keys: see docs/configuration.md, "
                       f"or `flowertune-finance check-config`; training arguments go under {TRAINING_ARGUMENTS_PREFIX}*)")


def parse_run_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Build and validate an `AppConfig` from a flat Flower run config.

    Keys left out keep their declared defaults; unknown keys and bad values raise
    `ConfigError` naming the key, its value and what is allowed.
    """
    from flowertune_finance.training_arguments import check_training_arguments, collect_training_arguments

    overrides = OmegaConf.create()
    for key, value in run_config.items():
        if key.startswith(TRAINING_ARGUMENTS_PREFIX):
            continue
        if key not in SETTINGS:
            raise unknown_key_error(key)
        declared = SETTINGS[key]
        value = _typed(key, value, declared)
        if declared.spec.check is not None and not declared.spec.check(value):
            raise ConfigError(f"run config '{key}' = {value!r} is not allowed; allowed: {declared.spec.allowed}")
        if key == "model.name" and len(value) > 1 and looks_like_path(value):
            value = value.rstrip("/")  # "models/x/" and "models/x" are one model (on resume too)
        OmegaConf.update(overrides, declared.path, value)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AppConfig), overrides)
        config: AppConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:  # the checks above make this a safety net
        raise ConfigError(f"run config rejected: {error}") from error
    if config.train.learning_rate_min > config.train.learning_rate_max:
        raise ConfigError(
            f"run config 'train.learning-rate-min' = {config.train.learning_rate_min} exceeds "
            f"'train.learning-rate-max' = {config.train.learning_rate_max}; the minimum must be <= the maximum"
        )
    train = dataclasses.replace(config.train, training_arguments=collect_training_arguments(run_config))
    check_training_arguments(train)
    return dataclasses.replace(config, train=train)


def looks_like_path(name: str) -> bool:
    """Whether `model.name` names a folder (path-like, or an existing folder) rather than a hub id."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().is_dir()


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


def settings_table() -> str:
    """The Markdown table of every key (docs/configuration.md holds it; a test keeps them equal)."""
    return markdown_table(SETTINGS)
