"""`flowertune-finance check-config`: overrides checked offline exactly as a run would check them."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from flowertune_finance.cli import main
from flowertune_finance.tools.run_config_check import check_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def check(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["check-config", "--app-dir", str(REPO_ROOT), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_good_overrides_pass_with_a_one_line_summary(capsys):
    code, out, err = check(capsys, "--run-config", "num-server-rounds=7 model.quantization=0 strategy.name='fedprox'")
    assert (code, err) == (0, "")
    assert out.count("\n") == 1 and out.startswith("OK: num-server-rounds=7, model.quantization=0, strategy.name='fedprox'")
    assert "7 rounds of fedprox" in out


def test_unknown_keys_are_each_named_with_the_closest_valid_key(capsys):
    code, out, err = check(capsys, "--run-config", "num-server-round=5 model.lora.peft-lora-rank=8 strategy.fraction-train=0.2")
    assert code == 2 and out == ""
    assert "unknown run config key 'num-server-round'" in err and "did you mean 'num-server-rounds'?" in err
    assert "unknown run config key 'model.lora.peft-lora-rank'" in err and "did you mean 'model.lora.peft-lora-r'?" in err
    assert "strategy.fraction-train" not in err  # a valid override is not reported


def test_unknown_key_without_a_near_match_points_at_pyproject(capsys):
    code, _, err = check(capsys, "--run-config", "zzz=1")
    assert code == 2
    assert "unknown run config key 'zzz'" in err and "[tool.flwr.app.config]" in err and "pyproject.toml" in err


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("strategy.fraction-train=2.0", "'strategy.fraction-train' = 2.0"),
        ("num-server-rounds='five'", "'num-server-rounds' = 'five'"),
        ("model.quantization=3", "'model.quantization' = 3"),
        ("train.training-arguments.lr-scheduler-type='sometimes'", "'train.training-arguments.lr-scheduler-type'"),
    ],
)
def test_bad_values_are_named(capsys, override, named):
    code, out, err = check(capsys, "--run-config", override)
    assert code == 2 and out == ""
    assert named in err


def test_text_flower_would_silently_drop_is_reported(capsys):
    code, _, err = check(capsys, "--run-config", "num-server-rounds 5")
    assert code == 2
    assert "'num-server-rounds 5' is not a key=value pair; Flower would ignore it" in err


def test_a_run_config_file(capsys, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('"num-server-rounds" = 4\n"model.lora.peft-lora-r" = 8\n"train.prompt-format" = "answer"\n')
    code, out, _ = check(capsys, str(good))
    assert code == 0 and out.startswith("OK: num-server-rounds=4, model.lora.peft-lora-r=8, train.prompt-format='answer'")

    bad = tmp_path / "bad.toml"
    bad.write_text('"num-server-rounds" = 4\n"train.seq-lenght" = 256\n')
    code, _, err = check(capsys, str(bad))
    assert code == 2 and "'train.seq-lenght'" in err and "did you mean 'train.seq-length'?" in err

    not_toml = tmp_path / "overrides.txt"
    not_toml.write_text("num-server-rounds=4\n")
    code, _, err = check(capsys, "--run-config", str(not_toml))
    assert code == 2 and "only when its name ends in .toml" in err


def test_the_checked_config_is_what_the_serverapp_would_receive():
    """check-config merges with Flower's own functions: its result equals the runtime's fused config."""
    overrides = ["num-server-rounds=9 train.seq-length=256 dataset.path='/data/x.jsonl'"]
    checked = check_run_config(REPO_ROOT, overrides)
    assert checked.run_config == get_fused_config_from_dir(REPO_ROOT, parse_config_args(overrides))
    assert checked.config.num_server_rounds == 9 and checked.config.train.seq_length == 256
