"""Flower's strategies, made fit for long LLM runs: communication accounting, reply checks, resume.

`FlowerTuneMixin` sits in front of any of Flower's built-in strategies (FedAvg, FedProx,
FedAdam, FedAvgM). It adds three things without copying their aggregation code:
- communication cost: bytes of every ArrayRecord sent and received, per round and in
  total, against the leaderboard's 200,000 MB budget;
- robust aggregation: a reply with missing keys, wrong shapes or dtypes, or non-finite
  values is dropped and logged (FedAvg would average it in); with none valid, the global
  adapter stays as it was;
- a round offset, so a resumed run continues its round numbering (and with it the
  learning-rate schedule the clients compute from `server-round`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from flowertune_finance.config import StrategyConfig

COMMUNICATION_BUDGET_MB = 200_000.0
MB = 1024**2
FLOAT_DTYPES = ("float32", "float16")


@dataclass
class RoundStats:
    """What happened in one training round, for logs and `metrics.jsonl`."""

    round: int
    started: float
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    mb_sent: float = 0.0
    mb_received: float = 0.0
    cumulative_mb: float = 0.0
    train_metrics: MetricRecord | None = None

    @property
    def accepted(self) -> int:
        return self.replied - self.rejected


def reply_problem(reply: ArrayRecord, expected: ArrayRecord) -> str | None:
    """Why a client's adapter cannot be averaged into `expected`, or None if it can."""
    missing = sorted(set(expected) - set(reply))
    if missing:
        return f"missing {len(missing)} array(s), e.g. {missing[0]}"
    extra = sorted(set(reply) - set(expected))
    if extra:
        return f"unexpected array(s), e.g. {extra[0]}"
    for key, array in reply.items():
        if array.dtype not in FLOAT_DTYPES:
            return f"{key} has dtype {array.dtype}; allowed: {', '.join(FLOAT_DTYPES)}"
        if tuple(array.shape) != tuple(expected[key].shape):
            return f"{key} has shape {tuple(array.shape)}, expected {tuple(expected[key].shape)}"
        if not np.isfinite(array.numpy()).all():
            return f"{key} has non-finite values"
    return None


class FlowerTuneMixin:
    """Adds communication tracking, reply validation and a round offset to a Flower strategy."""

    def setup_tracking(self, round_offset: int = 0, communication_mb: float = 0.0) -> None:
        self.round_offset = round_offset
        self.communication_mb = communication_mb
        self.rounds: dict[int, RoundStats] = {}
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        stats = RoundStats(round=server_round, started=time.time())
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = arrays
        stats.sampled = len(messages)
        stats.mb_sent = arrays.count_bytes() * len(messages) / MB
        self.rounds[server_round] = stats
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.rounds[server_round]
        replies = list(replies)
        valid = []
        for reply in replies:
            if reply.has_error():
                stats.failed += 1
                continue
            stats.replied += 1
            arrays = reply.content.array_records.get(self.arrayrecord_key)
            stats.mb_received += (arrays.count_bytes() if arrays is not None else 0) / MB
            problem = "no adapter arrays in the reply" if arrays is None else reply_problem(arrays, self._sent)
            if problem:
                stats.rejected += 1
                log(WARNING, "Round %s: rejected the reply of node %s: %s", server_round, reply.metadata.src_node_id, problem)
            else:
                valid.append(reply)
        self.communication_mb += stats.mb_sent + stats.mb_received
        stats.cumulative_mb = self.communication_mb
        log(
            INFO,
            "Round %s: %s sampled, %s replied, %s failed, %s rejected; communication %.2f MB this round, %.2f MB total",
            server_round, stats.sampled, stats.replied, stats.failed, stats.rejected,
            stats.mb_sent + stats.mb_received, self.communication_mb,
        )
        if self.communication_mb > COMMUNICATION_BUDGET_MB:
            log(
                WARNING,
                "Communication so far (%.0f MB) exceeds the leaderboard budget of %.0f MB",
                self.communication_mb, COMMUNICATION_BUDGET_MB,
            )
        if not valid:
            log(WARNING, "Round %s skipped: no valid reply; the global adapter is unchanged", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, valid + [r for r in replies if r.has_error()])
        stats.train_metrics = metrics
        return arrays, metrics


class FlowerTuneFedAvg(FlowerTuneMixin, FedAvg):
    """FedAvg over LoRA adapters (the upstream template's strategy)."""


class FlowerTuneFedProx(FlowerTuneMixin, FedProx):
    """FedProx: FedAvg on the server; clients add the proximal term to their loss."""


class FlowerTuneFedAdam(FlowerTuneMixin, FedAdam):
    """FedAdam: an Adam step on the server with the averaged update as pseudo-gradient."""


class FlowerTuneFedAvgM(FlowerTuneMixin, FedAvgM):
    """FedAvgM: server-side momentum on the averaged update."""


def build_strategy(config: StrategyConfig, round_offset: int = 0, communication_mb: float = 0.0) -> FlowerTuneMixin:
    """The configured Flower strategy with tracking; `round_offset` > 0 when resuming."""
    common = {"fraction_train": config.fraction_train, "fraction_evaluate": config.fraction_evaluate}
    if config.name == "fedavg":
        strategy = FlowerTuneFedAvg(**common)
    elif config.name == "fedprox":
        strategy = FlowerTuneFedProx(**common, proximal_mu=config.proximal_mu)
    elif config.name == "fedadam":
        strategy = FlowerTuneFedAdam(**common, eta=config.server_learning_rate)
    elif config.name == "fedavgm":
        strategy = FlowerTuneFedAvgM(
            **common, server_learning_rate=config.server_learning_rate, server_momentum=config.server_momentum
        )
    else:
        raise ValueError(f"strategy.name = {config.name!r} is not supported; allowed: fedavg, fedprox, fedadam, fedavgm")
    strategy.setup_tracking(round_offset=round_offset, communication_mb=communication_mb)
    return strategy
