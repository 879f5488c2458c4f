"""ServerApp: validate the config, start or resume a run, FedAvg over LoRA adapters, save checkpoints."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from peft import LoraConfig

from flowertune_finance.adapters import FROZEN_A_CHECKSUM_KEY, adapter_checksum, initial_adapter, split_frozen
from flowertune_finance.checkpoint import (
    check_resumable,
    create_run_dir,
    load_resumed_adapter,
    restart_metrics,
    resume_checkpoint,
    save_checkpoint,
    write_run_config,
)
from flowertune_finance.communication import CommunicationPlan, project_communication, report_projection
from flowertune_finance.config import AppConfig, check_local_paths, parse_run_config
from flowertune_finance.leaderboard import COMMUNICATION_BUDGET_MB
from flowertune_finance.metrics import CLIENT_PHASES, ReplyMetric, RoundRecord, append_metrics, progress_line
from flowertune_finance.models import cosine_annealing
from flowertune_finance.preflight import preflight
from flowertune_finance.strategy import FlowerTuneMixin, build_strategy
from flowertune_finance.worker_cache import WORKER_CACHE

if TYPE_CHECKING:
    from flowertune_finance.server_eval import ServerEvaluator

app = ServerApp()

ETA_WINDOW_ROUNDS = 10  # the ETA averages this many recent rounds, so start-up cost fades out


@dataclass
class RunSetup:
    """Where a run writes, and where it starts from (round 0, or the resumed checkpoint)."""

    run_dir: Path
    start_round: int
    adapter: dict[str, torch.Tensor]
    lora: LoraConfig
    communication_mb: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    run_uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # tells one run's checkpoints from another's
    # model.lora.freeze-a: the fixed A matrices, kept here (for checkpoints and evaluation); they never travel
    frozen_a: dict[str, torch.Tensor] | None = None
    projection: CommunicationPlan | None = None

    def travelling(self) -> dict[str, torch.Tensor]:
        """The arrays the strategy sends and averages: the whole adapter, or B only when A is frozen."""
        return {key: value for key, value in self.adapter.items() if not self.frozen_a or key not in self.frozen_a}

    def full_adapter(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The strategy's arrays completed with the frozen A matrices, in the adapter's key order (fp32)."""
        received = arrays.to_torch_state_dict()
        frozen = self.frozen_a or {}
        return {key: (received[key] if key in received else frozen[key]).float()
                for key in self.adapter if key in received or key in frozen}

    def round_config(self) -> ConfigRecord:
        """What every training message carries besides `server-round`: the checksum of the frozen A, if any."""
        return ConfigRecord({FROZEN_A_CHECKSUM_KEY: adapter_checksum(self.frozen_a)} if self.frozen_a else {})


def prepare_run(config: AppConfig, run_config: dict[str, Any]) -> RunSetup:
    """A fresh run folder with a new adapter, or the resumed run's folder and newest checkpoint
    (refused unless it continues this run: see `checkpoint.check_resumable`)."""
    adapter, lora = initial_adapter(config.model)
    frozen_a = split_frozen(adapter)[0] if config.model.lora_freeze_a else None
    if not config.resume_from:
        run_dir = create_run_dir(config.output_dir)
        write_run_config(run_dir, run_config)
        return RunSetup(run_dir=run_dir, start_round=0, adapter=adapter, lora=lora, frozen_a=frozen_a)

    checkpoint = resume_checkpoint(config.resume_from)
    check_resumable(checkpoint, config.resume_from, config.defining_settings(), config.num_server_rounds)
    resumed = load_resumed_adapter(checkpoint, config.resume_from, adapter, frozen_a, config.model.name)
    run_dir = checkpoint.path.parent.resolve()
    history = checkpoint.state.get("history", [])
    restart_metrics(run_dir, history)
    log(INFO, "Resuming %s from %s (round %s)", run_dir, checkpoint.path.name, checkpoint.round)
    return RunSetup(
        run_dir=run_dir,
        start_round=checkpoint.round,
        adapter=resumed,
        lora=lora,
        communication_mb=float(checkpoint.state.get("communication_mb", 0.0)),
        history=history,
        run_uid=checkpoint.state.get("run_uid") or uuid.uuid4().hex,
        frozen_a=frozen_a,
    )


class NoClientTrained(RuntimeError):
    """No client reply was accepted in the run's first round or in too many rounds in a row."""


class RoundRecorder:
    """Called by the strategy after every round: metrics line, progress, checkpoint."""

    def __init__(
        self, config: AppConfig, run: RunSetup, strategy: FlowerTuneMixin, evaluator: ServerEvaluator | None = None
    ) -> None:
        self.config = config
        self.run = run
        self.strategy = strategy
        self.evaluator = evaluator
        self.started = time.time()
        self.elapsed_before = float(run.history[-1].get("elapsed_s", 0.0)) if run.history else 0.0
        self.round_ends = [self.started]
        self.skipped_in_a_row = 0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's `evaluate_fn`, called with the run's round numbers (`FlowerTuneMixin.run_rounds`)."""
        if server_round == self.run.start_round:
            return None  # Flower's call before the first round: nothing trained yet
        self.round_ends.append(time.time())
        record = self.round_record(server_round)
        if self.run.projection is not None and len(self.round_ends) == 2:  # the first round of this start
            record.projected_mb = self.run.projection.projected_mb
        if self.evaluator is not None and self.evaluator.due(server_round):
            record.evaluation = self.evaluate(arrays)
            record.server_base_model_loads = WORKER_CACHE.base_model_loads  # the evaluator loads on first use
        append_metrics(self.run.run_dir, record.to_json())
        self.run.history.append(record.to_json())
        log(INFO, progress_line(
            server_round, self.config.num_server_rounds, record.train_loss, record.cumulative_mb,
            COMMUNICATION_BUDGET_MB, self.eta_seconds(server_round),
        ))
        self.apply_failure_policy(server_round, record.round_skipped)
        if server_round % self.config.train.save_every_round == 0 or server_round == self.config.num_server_rounds:
            self.save(server_round, arrays)
        return None

    def apply_failure_policy(self, server_round: int, skipped: bool) -> None:
        """Stop the run (it ends `finished:failed`) when its first round, or
        `strategy.max-skipped-rounds` rounds in a row, accepted no client reply: a run that
        trains nothing must not end as a success. Nothing is saved for such a round, so the
        last good checkpoint stays the newest."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        first_round = server_round == self.run.start_round + 1
        if not skipped or not first_round and self.skipped_in_a_row < self.config.strategy.max_skipped_rounds:
            return
        problems = Counter()
        for stats in list(self.strategy.rounds.values())[-self.skipped_in_a_row:]:
            problems.update(stats.problems)
        why = (f"round {server_round}, the first of this run," if first_round else
               f"{self.skipped_in_a_row} rounds in a row (strategy.max-skipped-rounds = "
               f"{self.config.strategy.max_skipped_rounds})")
        lines = [f"{count} x {problem}" for problem, count in problems.most_common()] or ["no client replied"]
        message = f"Stopping the run: {why} accepted no client reply. Client problems:\n  " + "\n  ".join(lines)
        log(ERROR, "%s", message)
        raise NoClientTrained(message)

    def evaluate(self, arrays: ArrayRecord) -> dict[str, float]:
        """Server-side fast eval metrics (`eval_*`); a failure is logged and never stops training."""
        try:
            return self.evaluator(self.run.full_adapter(arrays), self.run.lora)
        except Exception as error:  # monitoring only: the run and its checkpoints matter more
            log(WARNING, "Server-side evaluation failed: %s: %s", type(error).__name__, error)
            return {}

    def eta_seconds(self, server_round: int) -> float:
        """Rounds left times the mean end-to-end duration (checkpoints included) of the recent rounds."""
        recent = self.round_ends[-(ETA_WINDOW_ROUNDS + 1):]
        per_round = (recent[-1] - recent[0]) / (len(recent) - 1)
        return per_round * (self.config.num_server_rounds - server_round)

    def round_record(self, server_round: int) -> RoundRecord:
        stats = self.strategy.rounds[server_round]
        clients = stats.client_metrics
        return RoundRecord(
            round=server_round,
            wall_time_s=round(time.time() - stats.started, 3),
            elapsed_s=round(self.elapsed_before + time.time() - self.started, 3),
            train_loss=dict(stats.train_metrics or {}).get(ReplyMetric.TRAIN_LOSS),
            learning_rate=cosine_annealing(
                server_round, self.config.num_server_rounds,
                self.config.train.learning_rate_max, self.config.train.learning_rate_min,
            ),
            num_supernodes=stats.supernodes,
            clients_sampled=stats.sampled,
            clients_replied=stats.replied,
            clients_failed=stats.failed,
            clients_rejected=stats.rejected,
            clients_accepted=stats.accepted,
            mb_sent=stats.mb_sent,
            mb_received=stats.mb_received,
            cumulative_mb=stats.cumulative_mb,
            client_time_s={
                phase: round(sum(m.get(ReplyMetric.time(phase), 0.0) for m in clients), 4) for phase in CLIENT_PHASES
            },
            client_base_model_loads=int(sum(m.get(ReplyMetric.BASE_MODEL_LOADS, 0) for m in clients)),
            client_train_tokens=int(sum(m.get(ReplyMetric.TRAIN_TOKENS, 0) for m in clients)),
            client_peak_vram_mb=max((m[ReplyMetric.PEAK_VRAM_MB] for m in clients if ReplyMetric.PEAK_VRAM_MB in m),
                                    default=None),
            server_base_model_loads=WORKER_CACHE.base_model_loads,
        )

    def save(self, server_round: int, arrays: ArrayRecord) -> None:
        adapter = self.run.full_adapter(arrays)  # with freeze-a: the kept A + the trained B
        state = {
            "num_server_rounds": self.config.num_server_rounds,
            "settings": self.config.defining_settings(),
            "communication_mb": self.strategy.communication_mb,
            "history": self.run.history,
            "run_uid": self.run.run_uid,
        }
        path = save_checkpoint(self.run.run_dir, server_round, adapter, self.run.lora, state)
        log(INFO, "Saved checkpoint %s", path)


def start_run(
    run_config: Mapping[str, Any], num_partitions: int = 1
) -> tuple[AppConfig, RunSetup, ServerEvaluator | None]:
    """Everything before the first round, in the order that fails cheapest: config (training
    arguments included), paths, model folder and tokenizer, data file (when visible here),
    evaluation data (if server-side eval is on), then the new or resumed run folder. Nothing
    is written until all checks pass."""
    config = parse_run_config(run_config)
    check_local_paths(config)
    preflight(config, num_partitions)
    evaluator = None
    if config.eval.every_rounds:  # imported only when on: evaluation pulls in generation and data loaders
        from flowertune_finance.server_eval import ServerEvaluator

        evaluator = ServerEvaluator(config)
    run = prepare_run(config, dict(run_config))
    run.projection = project_communication(
        config, num_partitions, run.travelling(), run.start_round, run.communication_mb)
    report_projection(run.projection, run.run_dir, run.start_round)
    return config, run, evaluator


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federated fine-tuning described by the run config."""
    num_nodes = len(list(grid.get_node_ids()))  # the SuperNodes connected now: one partition each
    config, run, evaluator = start_run(context.run_config, max(num_nodes, 1))
    log(INFO, "Run folder: %s", run.run_dir)
    strategy = build_strategy(config.strategy, run.start_round, run.communication_mb, config.train.transport_dtype)
    strategy.run_rounds(grid, ArrayRecord(run.travelling()), run.round_config(), config.num_server_rounds,
                        after_round=RoundRecorder(config, run, strategy, evaluator))
    log(INFO, "Run finished; checkpoints in %s", run.run_dir)
    write_plots(run.run_dir)


def write_plots(run_dir: Path) -> None:
    """The run's figures; a plotting problem is logged, never allowed to fail a finished run."""
    try:
        from flowertune_finance.plots import plot_run  # at the end only: matplotlib is slow to import

        figures = plot_run(run_dir)
    except Exception as error:  # any failure here must leave the saved checkpoints and metrics a success
        log(WARNING, "Could not write the plots of %s: %s: %s", run_dir, type(error).__name__, error)
        return
    log(INFO, "Plots: %s", ", ".join(str(path) for path in figures))
