"""Figures of a run, drawn from its `metrics.jsonl`: loss, communication vs budget, learning rate, eval.

Drawn with matplotlib's object API (`Figure` rendered by Agg), not pyplot: no global
backend or figure state, so the ServerApp can call `plot_run` at the end of a run on a
machine without a display, and repeated calls never leak figures.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB
from flowertune_finance.metrics import METRICS_FILE, RUN_CONFIG, format_duration, read_metrics

PLOTS_DIR = "plots"
EVAL_PREFIX = "eval_"
LOG_SCALE_BELOW = 0.02  # a run projected to use < 2% of the budget is drawn on a log axis, or its line is flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Rounds and values of `key`, skipping rounds where it is missing or null."""
    points = [(r["round"], float(r[key])) for r in records if _is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _style(axes: Axes, title: str, ylabel: str) -> None:
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)


def _marker(rounds: list[int]) -> str:
    return "o" if len(rounds) <= 30 else ""


def draw_loss(axes: Axes, records: list[dict[str, Any]], num_rounds: int) -> None:
    rounds, loss = _series(records, "train_loss")
    axes.plot(rounds, loss, marker=_marker(rounds), color="tab:blue")
    _style(axes, "Training loss (weighted over clients)", "loss")


def draw_communication(axes: Axes, records: list[dict[str, Any]], num_rounds: int) -> None:
    rounds, cumulative = _series(records, "cumulative_mb")
    axes.plot(rounds, cumulative, marker=_marker(rounds), color="tab:green", label="used")
    projected = cumulative[-1] / rounds[-1] * num_rounds if rounds else 0.0  # at the mean MB per round so far
    if 0 < projected and rounds[-1] < num_rounds:
        axes.plot([rounds[-1], num_rounds], [cumulative[-1], projected], linestyle="--", color="tab:green",
                  alpha=0.6, label=f"projected: {projected:,.0f} MB at round {num_rounds}")
    if 0 < projected < LOG_SCALE_BELOW * COMMUNICATION_BUDGET_MB:
        axes.set_yscale("log")
    axes.axhline(COMMUNICATION_BUDGET_MB, color="tab:red", linestyle=":",
                 label=f"budget: {COMMUNICATION_BUDGET_MB:,.0f} MB")
    axes.legend(loc="best", fontsize="small")
    scale = " (log scale)" if axes.get_yscale() == "log" else ""
    _style(axes, "Cumulative communication", f"MB{scale}")


def draw_learning_rate(axes: Axes, records: list[dict[str, Any]], num_rounds: int) -> None:
    rounds, rate = _series(records, "learning_rate")
    axes.plot(rounds, rate, marker=_marker(rounds), color="tab:purple")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    _style(axes, "Client learning rate", "learning rate")


def eval_keys(records: list[dict[str, Any]]) -> list[str]:
    """The numeric server-side eval metrics present in any round, in a stable order."""
    keys = {k for r in records for k, v in r.items() if k.startswith(EVAL_PREFIX) and _is_number(v)}
    return sorted(keys)


def draw_eval(axes: Axes, records: list[dict[str, Any]], num_rounds: int) -> None:
    for key in eval_keys(records):
        rounds, values = _series(records, key)
        axes.plot(rounds, values, marker="o", label=key[len(EVAL_PREFIX):])
    axes.legend(loc="best", fontsize="small")
    _style(axes, "Server-side evaluation", "value")


def draw_summary(axes: Axes, records: list[dict[str, Any]], num_rounds: int) -> None:
    """The run at a glance, as text: where it stands against its plan and the budget."""
    last = records[-1]
    loss = last.get("train_loss")
    facts = [
        f"round {last['round']} of {num_rounds}",
        f"last training loss: {'n/a' if loss is None else f'{loss:.4f}'}",
        f"communication: {last.get('cumulative_mb', 0.0):,.1f} MB of {COMMUNICATION_BUDGET_MB:,.0f}",
        f"SuperNodes: {last.get('num_supernodes', 'not recorded')}",
        f"last round: {last.get('clients_sampled', '?')} clients sampled, {last.get('clients_accepted', '?')} accepted",
    ]
    if "elapsed_s" in last:
        facts.append(f"elapsed: {format_duration(last['elapsed_s'])}")
    axes.axis("off")
    axes.set_title("Run")
    axes.text(0.02, 0.95, "\n".join(facts), va="top", ha="left", family="monospace", transform=axes.transAxes)


Panel = Callable[[Axes, list[dict[str, Any]], int], None]


def _save(path: Path, panels: list[Panel], records: list[dict[str, Any]], num_rounds: int) -> Path:
    columns = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5.5 * columns, 3.6 * rows), layout="constrained")
    for index, draw in enumerate(panels):
        draw(figure.add_subplot(rows, columns, index + 1), records, num_rounds)
    figure.savefig(path, dpi=90)
    return path


def num_server_rounds(run_dir: Path, records: list[dict[str, Any]]) -> int:
    """The run's planned rounds (from `run_config.json`), so projections reach its end."""
    config_path = run_dir / RUN_CONFIG
    if config_path.is_file():
        return int(json.loads(config_path.read_text()).get("num-server-rounds", 200))
    return max(r["round"] for r in records)


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per figure plus `overview.png` (all panels and a summary) to `output_dir` (default `<run>/plots`)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / METRICS_FILE} is missing or empty: nothing to plot")
    target = Path(output_dir) if output_dir is not None else run_dir / PLOTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    num_rounds = num_server_rounds(run_dir, records)
    panels: dict[str, Panel] = {
        "loss": draw_loss, "communication": draw_communication, "learning_rate": draw_learning_rate,
    }
    if eval_keys(records):
        panels["eval"] = draw_eval
    written = [_save(target / f"{name}.png", [draw], records, num_rounds) for name, draw in panels.items()]
    written.append(_save(target / "overview.png", [*panels.values(), draw_summary], records, num_rounds))
    return written
