"""One client's round of local training: the cached model and data, TRL's SFTTrainer, the reply.

Everything a worker process keeps between client calls lives here (the tokenizer, each
partition's tokenized examples; the model cache is in `models`), so `client_app` stays a
thin Flower handler and tests and benchmarks can call `train_adapter` in-process.
"""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from flowertune_finance import models
from flowertune_finance.config import AppConfig
from flowertune_finance.dataset import DataError, load_partition, load_tokenizer, tokenize_partition
from flowertune_finance.prompts import PROMPT_FORMATS
from flowertune_finance.training_arguments import sft_arguments

TRANSPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# Per-worker caches of what is expensive and invariant across client calls: the tokenizer
# per model, and each partition's trainer-ready examples.
_TOKENIZERS: dict[str, Any] = {}
_TOKENIZED: dict[tuple, Any] = {}


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


def tokenized_partition(config: AppConfig, partition_id: int, num_partitions: int):
    """The node's partition as `input_ids` + `labels`, tokenized once per worker, without the
    examples whose label `train.seq-length` cuts off (they would train nothing)."""
    if config.model.name not in _TOKENIZERS:
        _TOKENIZERS[config.model.name] = load_tokenizer(config.model.name)
    tokenizer = _TOKENIZERS[config.model.name]
    key = (config.model.name, config.dataset_name, config.dataset_path, partition_id, num_partitions,
           config.train.prompt_format, config.train.seq_length)
    if key not in _TOKENIZED:
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
        _TOKENIZED[key] = examples.select(keep) if len(keep) < len(examples) else examples
    return _TOKENIZED[key], tokenizer


def sft_config(config: AppConfig, learning_rate: float, output_dir: str, server_round: int):
    """The SFTConfig for this round on this machine."""
    from trl import SFTConfig

    return SFTConfig(**sft_arguments(config.train, learning_rate, output_dir, models.use_cuda(), server_round))


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
    from flowertune_finance.proximal import ProximalSFTTrainer

    timings = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loads_before = models.BASE_MODEL_LOADS
    frozen_a = None
    if config.model.lora_freeze_a:
        frozen_a = models.frozen_lora_a(config.model)
        models.check_frozen_a(frozen_a, frozen_a_sha256)
        sent_a = sorted(set(adapter) & set(frozen_a))
        if sent_a:
            raise models.FrozenAdapterMismatch(
                f"model.lora.freeze-a is true but the server sent A matrices (e.g. {sent_a[0]}); "
                "the server and this node disagree on model.lora.freeze-a"
            )
        adapter = {**frozen_a, **adapter}
    if config.train.cache_base_model:
        model = models.cached_peft_model(config.model)
    else:
        model = models.build_peft_model(config.model)
    timings["time-model"] = time.perf_counter() - start

    start = time.perf_counter()
    examples, tokenizer = tokenized_partition(config, partition_id, num_partitions)
    timings["time-data"] = time.perf_counter() - start

    learning_rate = models.cosine_annealing(
        server_round, config.num_server_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    with tempfile.TemporaryDirectory(prefix="flowertune-") as output_dir, models.trainer_call(model):
        start = time.perf_counter()
        step_timer = StepTimer()
        trainer = ProximalSFTTrainer(
            model=model, args=sft_config(config, learning_rate, output_dir, server_round), train_dataset=examples,
            processing_class=tokenizer, proximal_mu=proximal_mu, callbacks=[step_timer],
        )
        trainer.remove_callback(PrinterCallback)  # per-step dicts: the round's loss reaches the server's log
        # after TRL's bf16 cast of the LoRA weights: back to fp32, then the global adapter unrounded
        models.keep_adapter_fp32(model)
        if frozen_a is not None:
            models.freeze_lora_a(model)  # before the optimizer exists (it is built in train())
        models.set_adapter_state(model, adapter)
        timings["time-setup"] = time.perf_counter() - start
        start = time.perf_counter()
        result = trainer.train()
        timings["time-train"] = time.perf_counter() - start
        timings["time-steps"] = step_timer.seconds  # the optimizer steps within time-train

    start = time.perf_counter()
    new_adapter = models.get_adapter_state(model, TRANSPORT_DTYPES[config.train.transport_dtype])
    if frozen_a is not None:  # A never changed and never travels
        new_adapter = models.split_frozen(new_adapter)[1]
    timings["time-serialize"] = time.perf_counter() - start
    metrics = {
        "train_loss": float(result.training_loss),
        "num-examples": len(examples),
        "learning-rate": learning_rate,
        "train-steps": int(result.global_step),
        "train-tokens": int(getattr(trainer, "_total_train_tokens", 0)),  # TRL's count of non-padding tokens
        "base-model-loads": models.BASE_MODEL_LOADS - loads_before,
        **timings,
    }
    if torch.cuda.is_available():  # every client of a run reports the same keys (FedAvg refuses to mix them)
        metrics["peak-vram-mb"] = torch.cuda.max_memory_allocated() / 2**20
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


_WORKER_FROZEN = False


def freeze_long_lived_objects() -> None:
    """After a worker's first client call, take what lives as long as the worker (imported
    modules, cached model and data) out of the garbage collector's view with `gc.freeze()`.

    Every `Trainer.train()` runs a full `gc.collect()` (accelerate's `free_memory`), which
    otherwise walks ~0.5 M objects of torch/transformers/flwr in each call: about 0.3 s on a
    2-core CPU, more than two tiny training steps. Done once, after collecting the first
    call's garbage, since frozen objects are never collected.
    """
    global _WORKER_FROZEN
    if not _WORKER_FROZEN:
        gc.collect()
        gc.freeze()
        _WORKER_FROZEN = True
