"""What a run sends and receives: the byte count of an adapter on the wire, and the run's projection.

The leaderboard caps a run's communication at 200,000 MB. Before the first round the server
projects the run's total from the arrays that travel (the whole adapter, or B only with
`model.lora.freeze-a`), the transport dtype, the clients sampled per round and the rounds left,
counting bytes exactly as Flower's `ArrayRecord.count_bytes` does, so the projection and the
strategy's measured total agree when every sampled client replies.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import log

from flowertune_finance.adapters import adapter_shapes, split_frozen
from flowertune_finance.config import AppConfig
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB

MB = 1024**2
MIN_TRAIN_NODES = 2  # Flower's default: FedAvg samples max(int(nodes * fraction-train), this)
PROJECTION_FILE = "projected_communication.json"  # the plan of a run, next to run_config.json


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


def project_communication(
    config: AppConfig, num_supernodes: int, travelling: Mapping[str, Any] | None = None, start_round: int = 0,
    spent_mb: float = 0.0, hf_config: Any = None,
) -> CommunicationPlan:
    """The run's communication from round `start_round` on, for `num_supernodes` connected nodes.

    `travelling` holds the arrays (or shapes) that are sent; without it they come from the model's
    config (`hf_config`, or the model's config file) on the meta device.
    """
    if travelling is None:
        shapes = adapter_shapes(config.model, hf_config)
        travelling = split_frozen(shapes)[1] if config.model.lora_freeze_a else shapes
    shapes = {key: tuple(value.shape) if hasattr(value, "shape") else tuple(value) for key, value in travelling.items()}
    return plan_communication(
        shapes, config.train.transport_dtype, num_supernodes, config.strategy.fraction_train,
        config.num_server_rounds - start_round, freeze_a=config.model.lora_freeze_a, spent_mb=spent_mb,
    )


def report_projection(plan: CommunicationPlan, run_dir: Path, start_round: int) -> None:
    """Log the plan (one warning line when over budget) and keep it in the run folder."""
    log(INFO, "%s", plan.summary())
    if plan.warning():
        log(WARNING, "%s", plan.warning())
    name = PROJECTION_FILE if start_round == 0 else f"projected_communication.from-round-{start_round}.json"
    path = run_dir / name
    if not path.exists():  # a second resume from the same checkpoint keeps the first one's file
        path.write_text(json.dumps({"start_round": start_round, **plan.as_dict()}, indent=2) + "\n")
