"""Shared fixtures: a tiny model built once, and an isolated Flower SuperLink for end-to-end runs.

Every end-to-end test goes through the real `flwr run` (see `flowertune_finance.dev.launch`).
The session gets its own FLWR_HOME and free ports, so it neither reuses nor disturbs a
SuperLink the developer has running, and every process started under that FLWR_HOME
(SuperLink, SuperExec, simulation, Ray workers) is killed when the session ends.
"""

from __future__ import annotations

import os

# One torch/OpenMP thread per process, set before anything imports torch and inherited by every process
# a test starts (SuperLinks, simulations, Ray workers): the suite runs three workers and their runs on a
# 2-core machine, where each process's own thread pool only adds spinning threads that compete for the
# same cores (the suite measured 510 s with the default, 477 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowertune_finance.dev import launch
from flowertune_finance.dev.processes import kill_processes_with_env, private_flwr_env, processes_with_env
from flowertune_finance.dev.superlink import SMOKE_CONNECTION, SUPERLINK_MARKER, PrivateSuperLink
from flowertune_finance.dev.tiny import build_tiny_model
from flowertune_finance.tools import hub

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tests that share an expensive fixture run on one worker when the suite runs in parallel
# (pytest-xdist, `--dist loadgroup`), so the fixture is built once; the rest spread out.
SHARED_FIXTURE_GROUPS = {
    "checkouts": "checkouts",
    "smoke_run": "checkouts",  # checkout A's smoke
    "quantized_frozen_a_fp16_run": "quantized-frozen-a-fp16-run",
    "deployment": "deployment",
}
APP_FILES = ("pyproject.toml", "README.md", ".gitignore", "LICENSE", "flowertune_finance")


def run_groups(item: pytest.Item) -> set[str]:
    """The worker groups of the shared runs `item` uses (at most one, see the hook below)."""
    fixtures = getattr(item, "fixturenames", ())
    return {group for name, group in SHARED_FIXTURE_GROUPS.items() if name in fixtures}


def start_rank(item: pytest.Item) -> int:
    """When a test that runs alone should start: 0 minutes-long (`slow`, `ray`), 1 a run of its own (`flwr_env`),
    2 the rest. Tests of a shared run all rank 2, so they keep their order in the group's worker."""
    if run_groups(item):
        return 2
    if item.get_closest_marker("slow") or item.get_closest_marker("ray"):
        return 0
    return 1 if "flwr_env" in getattr(item, "fixturenames", ()) else 2


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # xdist hands out the shared-run groups first (its queue puts the largest first); after them, the tests that
    # run the app start before the seconds-long ones, so no worker is left with a long run while the others idle.
    items.sort(key=start_rank)
    for item in items:
        groups = run_groups(item)
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


def copy_app(destination: Path) -> Path:
    """A checkout of the app: the files `flwr run` needs (the package, pyproject.toml, .gitignore)."""
    destination.mkdir(parents=True)
    for name in APP_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, destination / name)
    return destination


def smoke_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`flowertune-finance ARGS` as a user types it (stdout and stderr together)."""
    return subprocess.run(
        [sys.executable, "-m", "flowertune_finance.cli", *args], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False,
    )


def submitted(output: str) -> tuple[int, Path]:
    """The run id and full-log file from the smoke's "Run N submitted ...; Full log: FILE" line."""
    line = next((line for line in output.splitlines() if line.startswith("Run ") and " submitted (" in line), "")
    assert line, f"no run was submitted:\n{output}"
    return int(line.split()[1]), Path(line.split("Full log: ")[1].strip())


def value_after(output: str, prefix: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert lines, f"no line starting with {prefix!r} in:\n{output}"
    return lines[-1][len(prefix):].strip()


@pytest.fixture(scope="session")
def checkouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two copies of the app, each with its own private SuperLink once it runs a smoke: A holds exactly the
    files `flwr app publish` uploads (what `flwr new @account/app` unpacks), B the repository's app files.
    Every process their SuperLinks started must be gone at the end."""
    with hub.staged_app(REPO_ROOT, parent=tmp_path_factory.mktemp("checkout-a")) as app_a:
        apps = (app_a, copy_app(tmp_path_factory.mktemp("checkout-b") / "app"))
        yield apps
        for app in apps:
            PrivateSuperLink(app).stop()
            assert processes_with_env(SUPERLINK_MARKER, str(app)) == [], f"processes of {app} outlived the tests"


@pytest.fixture(scope="session")
def smoke_a(checkouts: tuple[Path, Path]) -> tuple[subprocess.CompletedProcess, launch.RunResult]:
    """The README's smoke, `flowertune-finance smoke`, in checkout A (50 SuperNodes, 3 rounds): the
    command's output, and its run with the final status as A's SuperLink reports it."""
    started = time.time()
    process = smoke_cli("smoke", str(checkouts[0]))
    wall_time = time.time() - started
    run_id, _ = submitted(process.stdout)
    status = launch.run_status(run_id, PrivateSuperLink(checkouts[0]).cli_env(), [SMOKE_CONNECTION])
    return process, launch.RunResult(run_id, status, wall_time)


@pytest.fixture(scope="session")
def smoke_run(smoke_a) -> tuple[launch.RunResult, Path]:
    """Checkout A's smoke as (result, run folder), shared read-only.

    Tests that only inspect a finished run (checkpoints, metrics, evaluation, plots, submission)
    use this instead of paying for a run of their own. Do not modify its folder: copy it first.
    """
    process, result = smoke_a
    assert process.returncode == 0, process.stdout
    return result, Path(value_after(process.stdout, "Run folder:"))


# The communication-saving recipe in 4 bits: the base model in 4 bits, LoRA's A frozen (only B travels), B sent
# in fp16. 5 SuperNodes that all train every round (so a rerun sees the same partitions whatever node ids the
# simulation draws), a fresh data window each round, a checkpoint every 2 rounds.
RECIPE_RUN_SUPERNODES = 5
RECIPE_RUN_CONFIG = {
    "model.quantization": 4, "model.lora.freeze-a": True, "train.transport-dtype": "float16",
    "num-server-rounds": 4, "strategy.fraction-train": 1.0, "train.save-every-round": 2,
    "train.dynamic-data-seed": True,
}


@pytest.fixture(scope="session")
def quantized_frozen_a_fp16_run(
    tiny_model: Path, flwr_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
):
    """One run of RECIPE_RUN_CONFIG for four readers: test_resume's uninterrupted reference, test_smoke_run's
    4-bit check, test_performance's traffic, test_recipes's frozen A. Shared read-only, like `smoke_run`."""
    return _run(tiny_model, flwr_env, tmp_path_factory.mktemp("quantized-frozen-a-fp16") / "results",
                RECIPE_RUN_SUPERNODES, 600, **RECIPE_RUN_CONFIG)
