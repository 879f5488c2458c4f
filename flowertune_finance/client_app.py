"""ClientApp: train the received LoRA adapter on this node's partition with TRL's SFTTrainer."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_finance import models
from flowertune_finance.config import AppConfig, parse_run_config
from flowertune_finance.dataset import load_partition, load_tokenizer, round_indices, tokenize_partition

app = ClientApp()

# Precision flags that only make sense on a GPU; on the CPU the app trains in fp32.
GPU_PRECISION_ARGUMENTS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval")
TRANSPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# Per-worker caches of what is expensive and invariant across client calls: the tokenizer
# per model, and each partition's tokenized examples.
_TOKENIZERS: dict[str, Any] = {}
_TOKENIZED: dict[tuple, Any] = {}


def node_partition(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """This node's partition, from its node config (simulation and deployment alike)."""
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as error:
        raise ValueError(
            f"node config lacks {error.args[0]!r}; start the SuperNode with "
            "--node-config \"partition-id=0 num-partitions=50\""
        ) from error


def tokenized_partition(config: AppConfig, partition_id: int, num_partitions: int):
    """The node's partition as token ids + completion mask, tokenized once per worker."""
    if config.model.name not in _TOKENIZERS:
        _TOKENIZERS[config.model.name] = load_tokenizer(config.model.name)
    tokenizer = _TOKENIZERS[config.model.name]
    key = (config.model.name, config.dataset_name, config.dataset_path, partition_id, num_partitions,
           config.train.prompt_format, config.train.seq_length)
    if key not in _TOKENIZED:
        partition = load_partition(partition_id, num_partitions, config.dataset_name, config.dataset_path)
        _TOKENIZED[key] = tokenize_partition(partition, tokenizer, config.train.prompt_format, config.train.seq_length)
    return _TOKENIZED[key], tokenizer


def sft_config(config: AppConfig, learning_rate: float, output_dir: str):
    """SFTConfig from the run's training arguments, adapted to the machine."""
    from trl import SFTConfig

    arguments = dict(config.train.training_arguments)
    cuda = models.use_cuda()
    if not cuda:
        for name in GPU_PRECISION_ARGUMENTS:
            arguments.pop(name, None)
    arguments.update(
        output_dir=output_dir,
        learning_rate=learning_rate,
        max_length=config.train.seq_length,
        completion_only_loss=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=arguments.get("bf16", cuda),
    )
    return SFTConfig(**arguments)


def train_adapter(
    config: AppConfig, adapter: dict[str, torch.Tensor], partition_id: int, num_partitions: int, server_round: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train `adapter` on the node's data for one round; return new weights and metrics."""
    from trl import SFTTrainer

    timings = {}
    start = time.perf_counter()
    loads_before = models.BASE_MODEL_LOADS
    model = models.cached_peft_model(config.model)
    models.set_adapter_state(model, adapter)
    timings["time-model"] = time.perf_counter() - start

    start = time.perf_counter()
    examples, tokenizer = tokenized_partition(config, partition_id, num_partitions)
    window = examples.select(
        round_indices(len(examples), config.train.examples_per_round, server_round, config.train.dynamic_data_seed)
    )
    timings["time-data"] = time.perf_counter() - start

    learning_rate = models.cosine_annealing(
        server_round, config.num_server_rounds, config.train.learning_rate_max, config.train.learning_rate_min
    )
    with tempfile.TemporaryDirectory(prefix="flowertune-") as output_dir:
        start = time.perf_counter()
        trainer = SFTTrainer(
            model=model, args=sft_config(config, learning_rate, output_dir), train_dataset=window,
            processing_class=tokenizer,
        )
        timings["time-setup"] = time.perf_counter() - start
        start = time.perf_counter()
        result = trainer.train()
        timings["time-train"] = time.perf_counter() - start

    start = time.perf_counter()
    new_adapter = models.get_adapter_state(model, TRANSPORT_DTYPES[config.train.transport_dtype])
    timings["time-serialize"] = time.perf_counter() - start
    metrics = {
        "train_loss": float(result.training_loss),
        "num-examples": len(examples),
        "learning-rate": learning_rate,
        "base-model-loads": models.BASE_MODEL_LOADS - loads_before,
        **timings,
    }
    return new_adapter, metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Set the global adapter, train locally, reply with the new adapter and metrics."""
    config = parse_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context.node_config)
    server_round = int(msg.content["config"]["server-round"])
    adapter = {key: tensor.float() for key, tensor in msg.content["arrays"].to_torch_state_dict().items()}
    new_adapter, metrics = train_adapter(config, adapter, partition_id, num_partitions, server_round)
    content = RecordDict({"arrays": ArrayRecord(new_adapter), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
