"""One client's round of local training: the cached model and data, TRL's SFTTrainer, the reply.

`train_adapter` reads top to bottom as the round's steps: the received adapter (with FFA-LoRA's
frozen A derived here), the worker's model, the partition's tokenized examples, the trainer's
run, the reply. What a worker keeps between client calls (model, tokenizer, tokenized
partitions) is in `worker_cache.WORKER_CACHE`, so `client_app` stays a thin Flower handler and
tests and benchmarks can call `train_adapter` in-process.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from flowertune_finance import adapters, models
from flowertune_finance.config import AppConfig
from flowertune_finance.dataset import DataError, load_partition, load_tokenizer, tokenize_partition
from flowertune_finance.metrics import ReplyMetric
from flowertune_finance.prompts import PROMPT_FORMATS
from flowertune_finance.training_arguments import sft_arguments
from flowertune_finance.worker_cache import WORKER_CACHE


def with_labels(examples, seq_length: int):
    """`input_ids` + `labels` (-100 outside the completion), truncated to `seq_length`.

    This is what TRL's SFTTrainer would derive from the completion mask in every call
    (build labels, truncate); done once per partition here, so the trainer can skip its
    per-call dataset preparation (`skip_prepare_dataset`).
    """
    def labels(row: dict[str, list[int]]) -> dict[str, list[int]]:
        ids = row["input_ids"][:seq_length]
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, row["completion_mask"])]}

    return examples.map(labels, remove_columns=["completion_mask"])


def trainer_examples(config: AppConfig, partition_id: int, num_partitions: int, tokenizer):
    """The partition as `input_ids` + `labels`, without the examples whose label
    `train.seq-length` cuts off (they would train nothing)."""
    partition = load_partition(partition_id, num_partitions, config.dataset_name, config.dataset_path)
    tokenized = tokenize_partition(partition, tokenizer, config.train.prompt_format, config.train.seq_length)
    examples = with_labels(tokenized, config.train.seq_length)
    keep = [i for i, labels in enumerate(examples["labels"]) if any(label != -100 for label in labels)]
    if not keep:
        full = PROMPT_FORMATS[config.train.prompt_format].tokenize(tokenizer, partition[0], 10**9)["input_ids"]
        raise DataError(
            f"no example keeps a label token within train.seq-length = {config.train.seq_length}; "
            f"examples here are ~{len(full)} tokens long with their label: raise train.seq-length"
        )
    return examples.select(keep) if len(keep) < len(examples) else examples


def tokenized_partition(config: AppConfig, partition_id: int, num_partitions: int):
    """The node's trainer-ready examples and the tokenizer, both built once per worker."""
    tokenizer = WORKER_CACHE.tokenizer(config.model.name, load_tokenizer)
    source = (config.model.name, config.dataset_name, config.dataset_path, num_partitions,
              config.train.prompt_format, config.train.seq_length)
    examples = WORKER_CACHE.tokenized_partition(
        source, partition_id, lambda: trainer_examples(config, partition_id, num_partitions, tokenizer)
    )
    return examples, tokenizer


def sft_config(config: AppConfig, learning_rate: float, output_dir: str, server_round: int):
    """The SFTConfig for this round on this machine."""
    from trl import SFTConfig

    return SFTConfig(**sft_arguments(config.train, learning_rate, output_dir, models.use_cuda(), server_round))


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the wall time of the block as `timings[key]` (when it completes)."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def with_frozen_a(
    config: AppConfig, adapter: dict[str, torch.Tensor], frozen_a_sha256: str | None
) -> tuple[dict[str, torch.Tensor], bool]:
    """The adapter to train and whether A is frozen. With `model.lora.freeze-a` the server sends B
    only: A is derived here from the shared seed and checked against the server's checksum,
    before any base model loads."""
    if not config.model.lora_freeze_a:
        return adapter, False
    frozen_a = adapters.frozen_lora_a(config.model)
    adapters.check_frozen_a(frozen_a, frozen_a_sha256)
    sent_a = sorted(set(adapter) & set(frozen_a))
    if sent_a:
        raise adapters.FrozenAdapterMismatch(
            f"model.lora.freeze-a is true but the server sent A matrices (e.g. {sent_a[0]}); "
            "the server and this node disagree on model.lora.freeze-a"
        )
    return {**frozen_a, **adapter}, True


def worker_model(config: AppConfig) -> PeftModel:
    """The worker's cached model, or a fresh build with `train.cache-base-model = false`."""
    if config.train.cache_base_model:
        return models.cached_peft_model(config.model)
    return models.build_peft_model(config.model)


def fit(config: AppConfig, model: PeftModel, adapter: dict[str, torch.Tensor], examples, tokenizer,
        learning_rate: float, server_round: int, proximal_mu: float, freeze_a: bool, timings: dict[str, float]):
    """Load `adapter` into the model and train it for the round; returns TRL's result and the
    number of non-padding tokens trained on. Adds the setup, train and steps timings."""
    from flowertune_finance.proximal import ProximalSFTTrainer

    with tempfile.TemporaryDirectory(prefix="flowertune-") as output_dir, models.trainer_call(model):
        with timed(timings, ReplyMetric.time("setup")):
            step_timer = StepTimer()
            trainer = ProximalSFTTrainer(
                model=model, args=sft_config(config, learning_rate, output_dir, server_round),
                train_dataset=examples, processing_class=tokenizer, proximal_mu=proximal_mu, callbacks=[step_timer],
            )
            trainer.remove_callback(PrinterCallback)  # per-step dicts: the round's loss reaches the server's log
            # after TRL's bf16 cast of the LoRA weights: back to fp32, then the global adapter unrounded
            models.keep_adapter_fp32(model)
            if freeze_a:
                models.freeze_lora_a(model)  # before the optimizer exists (it is built in train())
            adapters.set_adapter_state(model, adapter)
        with timed(timings, ReplyMetric.time("train")):
            result = trainer.train()
        timings[ReplyMetric.time("steps")] = step_timer.seconds  # the optimizer steps within time-train
    return result, int(getattr(trainer, "_total_train_tokens", 0))  # TRL's count of non-padding tokens


def train_adapter(
    config: AppConfig,
    adapter: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    server_round: int,
    proximal_mu: float = 0.0,
    frozen_a_sha256: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train `adapter` on the node's data for one round; return new weights and metrics.

    The trainer samples its batches from the whole partition, as the reference does
    (`max-steps` batches, or `num-train-epochs` passes with `max-steps = -1`).
    `proximal_mu` > 0 (sent by FedProx) adds the proximal term to the training loss.
    With `model.lora.freeze-a`, `adapter` holds B only: A is derived here from the shared seed,
    checked against the server's `frozen_a_sha256` before the base model loads, and left out
    of the reply.
    """
    timings: dict[str, float] = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    loads_before = WORKER_CACHE.base_model_loads
    with timed(timings, ReplyMetric.time("model")):
        adapter, freeze_a = with_frozen_a(config, adapter, frozen_a_sha256)
        model = worker_model(config)
    with timed(timings, ReplyMetric.time("data")):
        examples, tokenizer = tokenized_partition(config, partition_id, num_partitions)
    learning_rate = models.cosine_annealing(
        server_round, config.num_server_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    result, train_tokens = fit(config, model, adapter, examples, tokenizer, learning_rate, server_round,
                               proximal_mu, freeze_a, timings)
    with timed(timings, ReplyMetric.time("serialize")):
        new_adapter = adapters.get_adapter_state(model, getattr(torch, config.train.transport_dtype))
        if freeze_a:  # A never changed and never travels
            new_adapter = adapters.split_frozen(new_adapter)[1]
    metrics: dict[str, float] = {
        ReplyMetric.TRAIN_LOSS: float(result.training_loss),
        ReplyMetric.NUM_EXAMPLES: len(examples),
        ReplyMetric.LEARNING_RATE: learning_rate,
        ReplyMetric.TRAIN_STEPS: int(result.global_step),
        ReplyMetric.TRAIN_TOKENS: train_tokens,
        ReplyMetric.BASE_MODEL_LOADS: WORKER_CACHE.base_model_loads - loads_before,
        **timings,
    }
    if torch.cuda.is_available():  # every client of a run reports the same keys (FedAvg refuses to mix them)
        metrics[ReplyMetric.PEAK_VRAM_MB] = torch.cuda.max_memory_allocated() / 2**20
    return new_adapter, metrics


class StepTimer(TrainerCallback):
    """Trainer callback summing the wall time of the optimizer steps themselves (forward,
    backward, optimizer update), so benchmarks can tell them from everything around them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seconds += time.perf_counter() - self._started


def silence_progress_bars() -> None:
    """No per-call "Map" / "Loading weights" bars in the worker's log (the round log says enough)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
