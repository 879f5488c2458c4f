"""Per-round metrics: one JSON line per round in `<run>/metrics.jsonl`, and a progress line.

The file is appended and flushed to disk every round, so a crash loses at most the round
in flight; `plot` and `submit` read it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG = "run_config.json"  # the run config, kept next to the checkpoints
# Where a client call's time goes; each client reports `time-<phase>` in seconds ("steps" lies within "train").
CLIENT_PHASES = ("model", "data", "setup", "train", "steps", "serialize")


class ReplyMetric:
    """The names of the metrics in a client's reply (its MetricRecord), shared by client and server.

    What travels in Flower's records is named in Flower's style, like its own `num-examples`;
    `metrics.jsonl` names its fields as Python does (`RoundRecord`).
    """

    NUM_EXAMPLES = "num-examples"  # the weight FedAvg averages by
    TRAIN_LOSS = "train-loss"
    LEARNING_RATE = "learning-rate"
    TRAIN_STEPS = "train-steps"
    TRAIN_TOKENS = "train-tokens"  # TRL's count of non-padding tokens
    BASE_MODEL_LOADS = "base-model-loads"
    PEAK_VRAM_MB = "peak-vram-mb"  # GPU only

    @staticmethod
    def time(phase: str) -> str:
        """The seconds one of `CLIENT_PHASES` took."""
        return f"time-{phase}"


@dataclass
class RoundRecord:
    """One round, as one line of `metrics.jsonl` (its keys are these fields' names).

    Client figures are summed over the accepted clients; the server's base-model loads count
    its own (0 unless server-side evaluation is on).
    """

    round: int
    wall_time_s: float  # sampling to aggregation
    elapsed_s: float  # since the run started, checkpoints and evaluation included (carried over on resume)
    train_loss: float | None  # weighted by examples over the accepted clients; None in a skipped round
    learning_rate: float  # the clients' learning rate this round (cosine schedule)
    num_supernodes: int  # connected when the round was sampled
    clients_sampled: int
    clients_replied: int
    clients_failed: int
    clients_rejected: int
    clients_accepted: int
    mb_sent: float
    mb_received: float
    cumulative_mb: float
    client_time_s: dict[str, float]  # per CLIENT_PHASES
    client_base_model_loads: int
    client_train_tokens: int
    client_peak_vram_mb: float | None  # GPU only
    server_base_model_loads: int
    projected_mb: float | None = None  # the start's projection, on the first round of each start
    evaluation: dict[str, float] = field(default_factory=dict)  # `eval_*` metrics where server evaluation ran

    @property
    def round_skipped(self) -> bool:
        """No reply was accepted: the global adapter was kept."""
        return self.clients_accepted == 0

    def to_json(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "evaluation"}
        if record["projected_mb"] is None:
            del record["projected_mb"]
        return {**record, "round_skipped": self.round_skipped, **self.evaluation}


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one round's record and force it to disk."""
    with (run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All round records of a run, in file order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    """`2h13m`, `4m05s`, `12s`: short enough for a progress line."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_line(
    server_round: int, num_rounds: int, loss: float | None, cumulative_mb: float, budget_mb: float, eta_seconds: float
) -> str:
    """`round 37/200 · loss 0.412 · comm 18,210 MB / 200,000 · ETA 2h13m`."""
    loss_text = "n/a" if loss is None else f"{loss:.3f}"
    return (
        f"round {server_round}/{num_rounds} · loss {loss_text} · "
        f"comm {cumulative_mb:,.0f} MB / {budget_mb:,.0f} · ETA {format_duration(eta_seconds)}"
    )
