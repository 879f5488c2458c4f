"""See the run: metrics.jsonl of the shared smoke run, its plots, and the progress/ETA (submission: test_submit.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from flowertune_finance import cli
from flowertune_finance.config import parse_run_config
from flowertune_finance.metrics import METRICS_FILE, progress_line, read_metrics
from flowertune_finance.models import cosine_annealing
from flowertune_finance.plots import plot_run
from flowertune_finance.server_app import RoundRecorder, RunSetup

ROUND_FIELDS = {
    "round", "wall_time_s", "elapsed_s", "train_loss", "learning_rate", "num_supernodes", "clients_sampled",
    "clients_replied", "clients_failed", "clients_rejected", "clients_accepted", "mb_sent", "mb_received",
    "cumulative_mb",
}


def test_metrics_jsonl_has_one_valid_line_per_round_with_consistent_sums(smoke_run):
    _, run_dir = smoke_run
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2, 3]
    running_mb = wall_time = 0.0
    for record in records:
        assert ROUND_FIELDS <= set(record), ROUND_FIELDS - set(record)
        assert record["num_supernodes"] == 50
        assert record["clients_sampled"] == 5
        assert record["clients_replied"] + record["clients_failed"] == record["clients_sampled"]
        assert record["clients_accepted"] == record["clients_replied"] - record["clients_rejected"] == 5
        assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
        assert record["learning_rate"] == pytest.approx(cosine_annealing(record["round"], 3, 5e-5, 1e-6))
        running_mb += record["mb_sent"] + record["mb_received"]
        assert record["cumulative_mb"] == pytest.approx(running_mb)
        assert record["wall_time_s"] > 0
        wall_time += record["wall_time_s"]
        assert record["elapsed_s"] >= wall_time - 1e-3  # rounds are disjoint parts of the elapsed time
    assert read_metrics(run_dir) == records


def _recorder(num_rounds: int, history: list[dict] | None = None) -> RoundRecorder:
    run = RunSetup(run_dir=Path("."), start_round=len(history or []), adapter={}, lora=None, history=history or [])
    return RoundRecorder(parse_run_config({"num-server-rounds": num_rounds}), run, strategy=None)


def test_eta_forgets_the_slow_first_round_and_elapsed_time_survives_resume():
    recorder = _recorder(200)
    recorder.round_ends = [0.0, 100.0] + [100.0 + 10 * i for i in range(1, 15)]  # 15 rounds: 100 s, then 10 s each
    assert recorder.eta_seconds(15) == pytest.approx(185 * 10)
    recorder.round_ends = [0.0, 100.0, 110.0]
    assert recorder.eta_seconds(2) == pytest.approx(198 * 55)
    assert _recorder(200, history=[{"round": 1, "elapsed_s": 42.0}]).elapsed_before == 42.0
    line = progress_line(37, 200, 0.41234, 18_210.4, 200_000, 2 * 3600 + 13 * 60 + 5)
    assert line == "round 37/200 · loss 0.412 · comm 18,210 MB / 200,000 · ETA 2h13m"


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 5_000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 250, (path, image.size)


def test_plots_are_written_at_the_end_of_the_run_and_by_the_cli(smoke_run, tmp_path, capsys):
    _, run_dir = smoke_run
    expected = {"loss.png", "communication.png", "learning_rate.png", "overview.png"}
    assert {path.name for path in (run_dir / "plots").glob("*.png")} == expected  # written by the ServerApp
    for name in expected:
        _assert_png(run_dir / "plots" / name)
    assert cli.main(["plot", str(run_dir), "--output-dir", str(tmp_path / "plots")]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.split()}
    assert written == expected
    for name in written:
        _assert_png(tmp_path / "plots" / name)


def test_eval_metrics_get_their_own_figure(smoke_run, tmp_path):
    _, run_dir = smoke_run
    records = read_metrics(run_dir)
    records[-1]["eval_fpb_accuracy"] = 0.5
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = {path.name: path for path in plot_run(tmp_path)}
    assert "eval.png" in figures
    _assert_png(figures["eval.png"])
    assert cli.main(["plot", str(tmp_path / "missing")]) == 2
