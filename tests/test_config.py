"""The run config: upstream's keys and defaults, the leaderboard's static section, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, get_project_config

from flowertune_finance.config import SETTINGS, AppConfig, ConfigError, check_local_paths, parse_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every key and default of the upstream FlowerTune Finance app (flwr new, Message API template).
UPSTREAM_DEFAULTS = {
    "model.name": "mistralai/Mistral-7B-v0.3",
    "model.quantization": 4,
    "model.gradient-checkpointing": True,
    "model.lora.peft-lora-r": 32,
    "model.lora.peft-lora-alpha": 64,
    "train.save-every-round": 5,
    "train.dynamic-data-seed": False,
    "train.learning-rate-max": 5e-5,
    "train.learning-rate-min": 1e-6,
    "train.seq-length": 512,
    "train.training-arguments.output-dir": "",
    "train.training-arguments.learning-rate": "",
    "train.training-arguments.per-device-train-batch-size": 16,
    "train.training-arguments.gradient-accumulation-steps": 1,
    "train.training-arguments.logging-steps": 10,
    "train.training-arguments.num-train-epochs": 3,
    "train.training-arguments.max-steps": 10,
    "train.training-arguments.save-steps": 1000,
    "train.training-arguments.save-total-limit": 10,
    "train.training-arguments.gradient-checkpointing": True,
    "train.training-arguments.lr-scheduler-type": "constant",
    "strategy.fraction-train": 0.1,
    "strategy.fraction-evaluate": 0.0,
    "num-server-rounds": 200,
}


@pytest.fixture(scope="module")
def project_run_config() -> dict:
    return flatten_dict(get_project_config(REPO_ROOT)["tool"]["flwr"]["app"]["config"])


def test_pyproject_keeps_every_upstream_key_and_default(project_run_config):
    for key, value in UPSTREAM_DEFAULTS.items():
        assert key in project_run_config, key
        assert project_run_config[key] == value and type(project_run_config[key]) is type(value), key


def test_static_section_is_the_leaderboard_dataset(project_run_config):
    assert project_run_config["static.dataset.name"] == "flwrlabs/fingpt-sentiment-train"


def test_every_known_key_can_be_overridden_with_flwr_run(project_run_config):
    # `flwr run --run-config` only accepts keys that pyproject.toml declares.
    assert set(SETTINGS) <= set(project_run_config)


def test_pyproject_defaults_equal_the_declared_defaults(project_run_config):
    """pyproject.toml is the user-facing list of keys; the dataclass declaration is the source of truth."""
    for key, declared in SETTINGS.items():
        assert project_run_config[key] == declared.default, key
        assert type(project_run_config[key]) is type(declared.default), key
    undeclared = {k for k in project_run_config if k not in SETTINGS and not k.startswith("train.training-arguments.")}
    assert not undeclared


def test_configuration_doc_holds_the_generated_table():
    from flowertune_finance.config import settings_table

    assert settings_table() in (REPO_ROOT / "docs" / "configuration.md").read_text()


def test_parsed_pyproject_equals_typed_defaults(project_run_config):
    config = parse_run_config(project_run_config)
    defaults = AppConfig()
    assert config.model == defaults.model
    assert config.strategy == defaults.strategy
    assert config.num_server_rounds == 200 and config.dataset_name == "flwrlabs/fingpt-sentiment-train"
    assert config.train.learning_rate_max == 5e-5
    arguments = config.train.training_arguments
    assert (arguments["per_device_train_batch_size"], arguments["max_steps"], arguments["bf16"]) == (16, 10, False)
    # the app owns output_dir and learning_rate; the rest reaches SFTConfig unchanged
    assert "output_dir" not in config.train.training_arguments
    assert config.train.training_arguments["lr_scheduler_type"] == "constant"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"model.quantization": 3}, ["model.quantization", "0, 4 or 8"]),
        ({"model.quantization": "4"}, ["model.quantization", "int"]),
        ({"model.lora.peft-lora-r": 0}, ["model.lora.peft-lora-r", "> 0"]),
        ({"strategy.fraction-train": 1.5}, ["strategy.fraction-train", "0 < fraction <= 1"]),
        ({"num-server-rounds": 0}, ["num-server-rounds", ">= 1"]),
        ({"train.learning-rate-min": 1e-3}, ["train.learning-rate-min", "train.learning-rate-max"]),
        ({"train.prompt-format": "chatml"}, ["train.prompt-format", "alpaca or answer"]),
        ({"model.quantisation": 4}, ["unknown run config key 'model.quantisation'; did you mean 'model.quantization'?"]),
        ({"train.training-arguments.per-device-train-batch-size": 0}, ["per-device-train-batch-size", ">= 1"]),
        ({"train.training-arguments.no-such-argument": 1}, ["no-such-argument", "SFTConfig"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(project_run_config, override, named):
    with pytest.raises(ConfigError) as error:
        parse_run_config({**project_run_config, **override})
    for text in named:
        assert text in str(error.value)


def test_missing_local_model_folder_and_data_file_are_named(project_run_config, tmp_path):
    config = parse_run_config({**project_run_config, "model.name": str(tmp_path / "no-model")})
    with pytest.raises(ConfigError, match="model.name.*no such local model folder"):
        check_local_paths(config)
    config = parse_run_config({**project_run_config, "dataset.path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="dataset.path.*missing.jsonl.*no such file"):
        check_local_paths(config)
    # a hub id is not a local path and is left to the hub
    check_local_paths(parse_run_config(project_run_config))
