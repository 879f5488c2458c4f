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
`plan_communication` projects a run's total before it starts, with the same byte count.
"""

from __future__ import annotations

import functools
import io
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING

import flwr.serverapp.strategy
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flowertune_finance.config import ConfigError, StrategyConfig
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB
from flowertune_finance.strategies import STRATEGIES

MB = 1024**2
FLOAT_DTYPES = ("float32", "float16")
MIN_TRAIN_NODES = 2  # Flower's default: FedAvg samples max(int(nodes * fraction-train), this)


def clients_per_round(num_nodes: int, fraction_train: float, min_train_nodes: int = MIN_TRAIN_NODES) -> int:
    """How many clients Flower's FedAvg (and its subclasses) samples each round."""
    return max(int(num_nodes * fraction_train), min_train_nodes)


def array_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """What `Array.count_bytes` counts for an array of this shape and dtype: the .npy payload and header."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    )
    return len(header.getvalue()) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def record_bytes(shapes: Mapping[str, tuple[int, ...]], dtype: str) -> int:
    """`ArrayRecord.count_bytes` of arrays with these names and shapes, without building them."""
    return sum(array_bytes(shape, dtype) + len(key) for key, shape in shapes.items())


@dataclass(frozen=True)
class CommunicationPlan:
    """A run's projected communication: what travels per client each way, times 2 directions,
    times the clients sampled per round, times the rounds (plus what a resumed run already spent)."""

    mb_per_client_each_way: float
    clients_per_round: int
    rounds: int  # rounds still to run
    num_supernodes: int
    transport_dtype: str
    freeze_a: bool
    spent_mb: float = 0.0
    budget_mb: float = COMMUNICATION_BUDGET_MB

    @property
    def projected_mb(self) -> float:
        return self.spent_mb + self.mb_per_client_each_way * 2 * self.clients_per_round * self.rounds

    @property
    def within_budget(self) -> bool:
        return self.projected_mb <= self.budget_mb

    def as_dict(self) -> dict:
        return {**asdict(self), "projected_mb": self.projected_mb, "within_budget": self.within_budget}

    def summary(self) -> str:
        travels = "B only, A frozen" if self.freeze_a else "A and B"
        spent = f" + {self.spent_mb:,.1f} MB already spent" if self.spent_mb else ""
        return (
            f"Projected communication: {self.mb_per_client_each_way:,.2f} MB per client each way "
            f"({self.transport_dtype}; {travels}) x 2 directions x {self.clients_per_round} clients per round "
            f"(of {self.num_supernodes} SuperNodes) x {self.rounds} rounds{spent} = {self.projected_mb:,.1f} MB "
            f"of the {self.budget_mb:,.0f} MB budget ({100 * self.projected_mb / self.budget_mb:.1f}%)"
        )

    def warning(self) -> str | None:
        if self.within_budget:
            return None
        return (
            f"Projected communication {self.projected_mb:,.0f} MB exceeds the leaderboard budget of "
            f"{self.budget_mb:,.0f} MB: lower num-server-rounds, strategy.fraction-train, the LoRA rank or "
            "model.lora.target-modules, or set train.transport-dtype = \"float16\" or model.lora.freeze-a = true"
        )


def plan_communication(
    travelling_shapes: Mapping[str, tuple[int, ...]],
    transport_dtype: str,
    num_supernodes: int,
    fraction_train: float,
    rounds: int,
    freeze_a: bool = False,
    spent_mb: float = 0.0,
) -> CommunicationPlan:
    """The plan for arrays of `travelling_shapes` sent as `transport_dtype` to and from each sampled client."""
    return CommunicationPlan(
        mb_per_client_each_way=record_bytes(travelling_shapes, transport_dtype) / MB,
        clients_per_round=clients_per_round(num_supernodes, fraction_train),
        rounds=rounds, num_supernodes=num_supernodes, transport_dtype=transport_dtype, freeze_a=freeze_a,
        spent_mb=spent_mb,
    )


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
        if array.dtype not in FLOAT_DTYPES:
            return f"{key} has dtype {array.dtype}; allowed: {', '.join(FLOAT_DTYPES)}"
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

    def setup_tracking(
        self, round_offset: int = 0, communication_mb: float = 0.0, transport_dtype: str = "float32"
    ) -> None:
        if transport_dtype not in FLOAT_DTYPES:
            raise ConfigError(
                f"run config 'train.transport-dtype' = {transport_dtype!r} is not allowed; "
                f"allowed: {', '.join(FLOAT_DTYPES)}"
            )
        self.round_offset = round_offset
        self.communication_mb = communication_mb
        self.transport_dtype = transport_dtype
        self.rounds: dict[int, RoundStats] = {}
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
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
        server_round += self.round_offset
        stats = self.rounds[server_round]
        replies = list(replies)
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
        for reply in valid:  # average in fp32 whatever the wire carried
            reply.content[self.arrayrecord_key] = with_dtype(reply.content[self.arrayrecord_key], "float32")
        stats.client_metrics = [dict(next(iter(r.content.metric_records.values()))) for r in valid]
        arrays, metrics = super().aggregate_train(server_round, valid + [r for r in replies if r.has_error()])
        stats.train_metrics = metrics
        # FedAdam and FedAvgM return float64; keep the global adapter (and the wire) in fp32
        return (with_dtype(arrays, "float32") if arrays is not None else None), metrics


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
    flower_class = getattr(flwr.serverapp.strategy, entry.flower_class)
    strategy = tracked(flower_class)(
        fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=MIN_TRAIN_NODES, **entry.options(config),
    )
    strategy.setup_tracking(
        round_offset=round_offset, communication_mb=communication_mb, transport_dtype=transport_dtype)
    return strategy
