"""`flwr build` packages the Flower app and its config: no harness, tools, tests, benchmarks or outputs."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

from flowertune_finance.dev.processes import flwr_env, flwr_executable

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_fab_holds_the_package_and_config_but_no_results_tests_or_venvs(tmp_path):
    app = tmp_path / "app"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split():
        if (REPO_ROOT / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, app / name)
    # what a user's checkout accumulates: run outputs, smoke files, test outputs, a virtual environment
    for leftover in ("results/2026-01-01_00-00-00/peft_5/adapter_config.json", "results/x/metrics.jsonl",
                     ".smoke/tiny-model/config.json", ".venv/lib/site.py", "tests/outputs/report.json"):
        (app / leftover).parent.mkdir(parents=True, exist_ok=True)
        (app / leftover).write_text("{}")
    built = subprocess.run([flwr_executable(), "build", "--app", str(app)], cwd=tmp_path, env=flwr_env(),
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "pyproject.toml" in names
    for module in ("server_app.py", "client_app.py", "models.py", "dataset.py", "strategy.py", "config.py"):
        assert f"flowertune_finance/{module}" in names
    assert "flowertune_finance/scoring.py" in names  # the ServerApp's optional evaluation scores through it
    outside_the_app = ("flowertune_finance/tools/", "flowertune_finance/dev/", "flowertune_finance/cli.py")
    assert not [n for n in names if n.startswith(outside_the_app)], names
    assert not [n for n in names if n.startswith(("benchmarks/", "configs/"))], names
    assert not [n for n in names if n.startswith(("results/", ".smoke/", ".venv/", "tests/"))], names
