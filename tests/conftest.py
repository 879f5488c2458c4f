"""Shared fixtures: a tiny model built once, and an isolated Flower SuperLink for end-to-end runs.

Every end-to-end test goes through the real `flwr run` (see `flowertune_finance.dev.launch`).
The session gets its own FLWR_HOME and free ports, so it neither reuses nor disturbs a
SuperLink the developer has running, and every process started under that FLWR_HOME
(SuperLink, SuperExec, simulation, Ray workers) is killed when the session ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowertune_finance.dev import launch
from flowertune_finance.dev.processes import kill_processes_with_env, private_flwr_env
from flowertune_finance.dev.tiny import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests that share an expensive fixture run on one worker when the suite runs in parallel
# (pytest-xdist, `--dist loadgroup`), so the fixture is built once; the rest spread out.
SHARED_FIXTURE_GROUPS = {
    "smoke_run": "smoke-run",
    "quantized_frozen_a_fp16_run": "quantized-frozen-a-fp16-run",
    "deployment": "deployment",
    "checkouts": "checkouts",
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Modules with minutes-long tests first, each in its own order, so parallel workers do not end on them.
    long_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow") or item.get_closest_marker("ray")}
    items.sort(key=lambda item: item.module.__name__ not in long_modules)
    for item in items:
        groups = {group for name, group in SHARED_FIXTURE_GROUPS.items() if name in getattr(item, "fixturenames", ())}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses fixtures of several worker groups: {sorted(groups)}")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mistral + tokenizer folder, built once per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def flwr_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment for `flwr`: private FLWR_HOME and ports; everything it started is killed at the end."""
    home = str(tmp_path_factory.mktemp("flwr-home"))
    env = private_flwr_env(home)
    yield env
    kill_processes_with_env("FLWR_HOME", home)


def smoke_config(tiny_model: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The README's smoke run config, with results under `output_dir` and any overrides."""
    config = launch.smoke_run_config(REPO_ROOT, tiny_model)
    config["output.dir"] = str(output_dir)
    config.update(overrides)
    return config


def run_dirs(output_dir: Path) -> list[Path]:
    """Run folders created under an `output.dir`, oldest first."""
    return sorted(p for p in output_dir.iterdir() if p.is_dir()) if output_dir.is_dir() else []


def _run(tiny_model: Path, env: dict[str, str], output_dir: Path, num_supernodes: int, timeout: float, **overrides: Any):
    config = smoke_config(tiny_model, output_dir, **overrides)
    before = set(run_dirs(output_dir))
    result = launch.run_app(REPO_ROOT, config, num_supernodes=num_supernodes, env=env, timeout=timeout)
    created = [p for p in run_dirs(output_dir) if p not in before]
    run_dir = created[-1] if created else Path(config.get("resume.from", ""))
    return result, run_dir


@pytest.fixture
def run_smoke(tiny_model: Path, flwr_env: dict[str, str], tmp_path: Path):
    """Run the app through `flwr run` with the smoke config (plus overrides); return (result, run folder)."""

    def run(num_supernodes: int = launch.NUM_SUPERNODES, timeout: float = 600, **overrides: Any):
        return _run(tiny_model, flwr_env, tmp_path / "results", num_supernodes, timeout, **overrides)

    return run


@pytest.fixture(scope="session")
def smoke_run(tiny_model: Path, flwr_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The README's smoke run (50 SuperNodes, 3 rounds), run once per session and shared read-only.

    Tests that only inspect a finished run (checkpoints, metrics, evaluation, plots,
    submission) use this instead of paying for a run of their own. Do not modify its folder:
    copy it first.
    """
    return _run(tiny_model, flwr_env, tmp_path_factory.mktemp("smoke") / "results", launch.NUM_SUPERNODES, 600)


@pytest.fixture(scope="session")
def quantized_frozen_a_fp16_run(
    tiny_model: Path, flwr_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
):
    """One run for three readers: the base model in 4 bits, LoRA's A frozen (only B travels) and B sent in
    fp16 (4 SuperNodes, so 2 clients a round, 2 rounds, a checkpoint every round). test_smoke_run checks
    the 4-bit side, test_performance the traffic, test_recipes frozen A. Shared read-only, like `smoke_run`."""
    overrides = {"model.quantization": 4, "model.lora.freeze-a": True, "train.transport-dtype": "float16",
                 "num-server-rounds": 2, "train.save-every-round": 1}
    return _run(tiny_model, flwr_env, tmp_path_factory.mktemp("quantized-frozen-a-fp16") / "results", 4, 600,
                **overrides)
