"""Flower's strategies, made fit for long LLM runs: communication accounting, reply checks, resume.

`FlowerTuneMixin` sits in front of any of Flower's built-in strategies (the registry is
`strategies.STRATEGIES`). It adds three things without copying their aggregation code:
- communication cost: bytes of every ArrayRecord sent and received, per round and in
  total, against the leaderboard's 200,000 MB budget;
- robust aggregation: a reply with missing keys, wrong shapes or dtypes, or non-finite
  values is dropped and logged (FedAvg would average it in); with none valid, the global
  adapter stays as it was;
- a round offset, so a resumed run continues its round numbering (and with it the
  learning-rate schedule the clients compute from `server-round`); Flower counts from 1
  at every start, and `FlowerTuneMixin.run_round` is the one place that translates.
"""

from __future__ import annotations

import functools
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import flwr.serverapp.strategy
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from flowertune_finance.communication import MB, MIN_TRAIN_NODES
from flowertune_finance.config import TRANSPORT_DTYPES, ConfigError, StrategyConfig
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB
from flowertune_finance.metrics import ReplyMetric
from flowertune_finance.strategies import STRATEGIES


@dataclass
class RoundStats:
    """What happened in one training round, for logs and `metrics.jsonl`."""

    round: int
    started: float
    supernodes: int = 0
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0
    mb_sent: float = 0.0
    mb_received: float = 0.0
    cumulative_mb: float = 0.0
    train_metrics: MetricRecord | None = None
    client_metrics: list[dict] = field(default_factory=list)  # each accepted reply's own metrics
    problems: Counter = field(default_factory=Counter)  # why replies failed or were rejected -> how many

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
        if array.dtype not in TRANSPORT_DTYPES:
            return f"{key} has dtype {array.dtype}; allowed: {', '.join(TRANSPORT_DTYPES)}"
        if tuple(array.shape) != tuple(expected[key].shape):
            return f"{key} has shape {tuple(array.shape)}, expected {tuple(expected[key].shape)}"
        if not np.isfinite(array.numpy()).all():
            return f"{key} has non-finite values"
    return None


def content_problem(
    content: RecordDict, expected: ArrayRecord, arrayrecord_key: str, weighted_by_key: str
) -> str | None:
    """Why a reply cannot be aggregated, or None: Flower's FedAvg raises (and ends the run) on
    a reply without exactly one ArrayRecord and one MetricRecord holding the weight, and
    divides by the weights, so those are checked here too."""
    if list(content.array_records) != [arrayrecord_key]:
        return f"expected one ArrayRecord {arrayrecord_key!r}, got {sorted(content.array_records) or 'none'}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weighted_by_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
        return f"metric {weighted_by_key!r} is {weight!r}; expected a number > 0"
    return reply_problem(content.array_records[arrayrecord_key], expected)


EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Warning|Exit|Interrupt)): (.+)$")


def error_summary(reason: str | None) -> str:
    """A client's error as one line, "ExceptionName: message".

    Flower wraps it as "<class 'X'>:<'message'>"; in simulation X is Ray's task error and the
    message holds the client's traceback, whose last exception line is the one that matters.
    """
    lines = (reason or "unknown error").replace("\\n", "\n").splitlines()
    for line in reversed(lines):
        match = EXCEPTION_LINE.match(line)
        if match and "ClientAppException" not in match.group(1) and "RayTaskError" not in match.group(1):
            text = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}"
            break
    else:
        text = " ".join(" ".join(lines).split())
        match = re.search(r"<class '([\w.]+)'>:<'(.*)'>$", text)
        if match:
            text = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    text = re.sub(r"'>$", "", text)
    return text if len(text) <= 400 else text[:397] + "..."


def metric_key_outliers(replies: list[Message]) -> list[Message]:
    """Replies whose metric names differ from the most common set (FedAvg refuses to mix them)."""
    key_sets = [frozenset(next(iter(r.content.metric_records.values())).keys()) for r in replies]
    if len(set(key_sets)) <= 1:
        return []
    common = Counter(key_sets).most_common(1)[0][0]
    return [reply for reply, keys in zip(replies, key_sets) if keys != common]


def with_dtype(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """`record` with every array cast to `dtype` (the same record if nothing changes)."""
    if all(array.dtype == dtype for array in record.values()):
        return record
    return ArrayRecord(OrderedDict((key, Array(array.numpy().astype(dtype))) for key, array in record.items()))


class FlowerTuneMixin:
    """Adds communication tracking, reply validation and a round offset to a Flower strategy.

    With `transport_dtype="float16"` the adapter travels as fp16 both ways (half the bytes),
    while the strategy keeps, averages and returns it in fp32: the global adapter is cast
    only for the wire, and fp16 replies are cast back before Flower aggregates them (its
    FedAvg would otherwise average in fp16).
    """

    def __init__(
        self, *, round_offset: int = 0, communication_mb: float = 0.0, transport_dtype: str = "float32",
        **flower_options: Any,
    ) -> None:
        """`round_offset`: the rounds a resumed run already trained, `communication_mb` what they cost;
        `flower_options` go to the Flower strategy behind the mixin."""
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ConfigError(
                f"run config 'train.transport-dtype' = {transport_dtype!r} is not allowed; "
                f"allowed: {', '.join(TRANSPORT_DTYPES)}"
            )
        super().__init__(**flower_options)
        self.round_offset = round_offset
        self.communication_mb = communication_mb
        self.transport_dtype = transport_dtype
        self.rounds: dict[int, RoundStats] = {}
        self._sent: ArrayRecord | None = None

    def run_round(self, flower_round: int) -> int:
        """The run's number of Flower's round `flower_round` (Flower counts from 1 at every start)."""
        return flower_round + self.round_offset

    def run_rounds(
        self, grid: Grid, initial_arrays: ArrayRecord, train_config: ConfigRecord, last_round: int,
        after_round: Callable[[int, ArrayRecord], MetricRecord | None],
    ) -> Result:
        """Flower's `start` for the run's rounds after `round_offset` up to `last_round`.

        `after_round(run_round, arrays)` is Flower's `evaluate_fn`, called with the run's round
        numbers: once before the first round (with `round_offset`), then after every round.
        """
        return self.start(
            grid=grid, initial_arrays=initial_arrays, train_config=train_config,
            num_rounds=last_round - self.round_offset,
            evaluate_fn=lambda flower_round, arrays: after_round(self.run_round(flower_round), arrays),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling under the run's round number; the adapter cast for the wire, the bytes counted."""
        server_round = self.run_round(server_round)
        stats = RoundStats(round=server_round, started=time.time())
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = arrays
        if messages and self.transport_dtype != "float32":
            content = RecordDict(dict(messages[0].content))  # Flower shares one content among the messages
            content[self.arrayrecord_key] = with_dtype(arrays, self.transport_dtype)
            for message in messages:
                message.content = content
        stats.supernodes = len(list(grid.get_node_ids()))  # connected now; the leaderboard requires 50
        stats.sampled = len(messages)
        stats.mb_sent = sum(a.count_bytes() for m in messages for a in m.content.array_records.values()) / MB
        self.rounds[server_round] = stats
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's aggregation of the valid replies only, in fp32; (None, None) keeps the adapter."""
        server_round = self.run_round(server_round)
        stats = self.rounds[server_round]
        replies = list(replies)
        valid = self.screen_replies(server_round, replies)
        self.count_communication(stats)
        if not valid:
            log(WARNING, "Round %s skipped: no valid reply; the global adapter is unchanged", server_round)
            return None, None
        for reply in valid:  # average in fp32 whatever the wire carried
            reply.content[self.arrayrecord_key] = with_dtype(reply.content[self.arrayrecord_key], "float32")
        stats.client_metrics = [dict(next(iter(r.content.metric_records.values()))) for r in valid]
        arrays, metrics = super().aggregate_train(server_round, valid + [r for r in replies if r.has_error()])
        stats.train_metrics = metrics
        # FedAdam and FedAvgM return float64; keep the global adapter (and the wire) in fp32
        return (with_dtype(arrays, "float32") if arrays is not None else None), metrics

    def screen_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies Flower may average; every other one is counted in the round's stats with its problem."""
        stats = self.rounds[server_round]
        valid = []
        for reply in replies:
            if reply.has_error():
                stats.failed += 1
                stats.problems[error_summary(reply.error.reason)] += 1
                continue
            stats.replied += 1
            stats.mb_received += sum(a.count_bytes() for a in reply.content.array_records.values()) / MB
            problem = content_problem(reply.content, self._sent, self.arrayrecord_key, self.weighted_by_key)
            if problem:
                stats.rejected += 1
                stats.problems[f"reply rejected: {problem}"] += 1
                log(WARNING, "Round %s: rejected the reply of node %s: %s",
                    server_round, reply.metadata.src_node_id, problem)
            else:
                valid.append(reply)
        for reply in metric_key_outliers(valid):
            valid.remove(reply)
            stats.rejected += 1
            stats.problems["reply rejected: its metric names differ from the other replies'"] += 1
            log(WARNING, "Round %s: rejected the reply of node %s: its metric names differ from the other replies'",
                server_round, reply.metadata.src_node_id)
        return valid

    def count_communication(self, stats: RoundStats) -> None:
        """Add the round's traffic to the run's total, log it, and warn once the total is over budget."""
        self.communication_mb += stats.mb_sent + stats.mb_received
        stats.cumulative_mb = self.communication_mb
        log(
            INFO,
            "Round %s: %s sampled, %s replied, %s failed, %s rejected; communication %.2f MB this round, %.2f MB total",
            stats.round, stats.sampled, stats.replied, stats.failed, stats.rejected,
            stats.mb_sent + stats.mb_received, self.communication_mb,
        )
        if self.communication_mb > COMMUNICATION_BUDGET_MB:
            log(
                WARNING,
                "Communication so far (%.0f MB) exceeds the leaderboard budget of %.0f MB",
                self.communication_mb, COMMUNICATION_BUDGET_MB,
            )


@functools.cache
def tracked(flower_class: type) -> type:
    """`flower_class` with the tracking mixin in front (one class per Flower strategy)."""
    return type(f"FlowerTune{flower_class.__name__}", (FlowerTuneMixin, flower_class),
                {"__doc__": f"{flower_class.__name__} with communication tracking, reply checks and a round offset."})


def build_strategy(
    config: StrategyConfig, round_offset: int = 0, communication_mb: float = 0.0, transport_dtype: str = "float32"
) -> FlowerTuneMixin:
    """The configured Flower strategy with tracking; `round_offset` > 0 when resuming.

    FedAdam's moments and FedAvgM's momentum live in the strategy object: a resumed run
    starts them afresh.
    """
    if config.name not in STRATEGIES:
        raise ConfigError(
            f"run config 'strategy.name' = {config.name!r} is not allowed; allowed: {', '.join(STRATEGIES)}")
    entry = STRATEGIES[config.name]
    return tracked(getattr(flwr.serverapp.strategy, entry.flower_class))(
        round_offset=round_offset, communication_mb=communication_mb, transport_dtype=transport_dtype,
        fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=MIN_TRAIN_NODES, weighted_by_key=ReplyMetric.NUM_EXAMPLES, **entry.options(config),
    )
