"""ClientApp: train the received LoRA adapter on this node's data with TRL's SFTTrainer."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowertune_finance.adapters import FROZEN_A_CHECKSUM_KEY
from flowertune_finance.config import check_local_paths, parse_run_config
from flowertune_finance.node_data import node_data
from flowertune_finance.training import silence_progress_bars, train_adapter
from flowertune_finance.worker_cache import WORKER_CACHE

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Set the global adapter, train locally, reply with the new adapter and metrics."""
    silence_progress_bars()
    node = node_data(context.node_config)  # partition and/or the data owner's own file
    config = node.use_in(parse_run_config(context.run_config))
    check_local_paths(config, on_server=False)  # before the model loads: a missing path fails fast, by name
    server_round = int(msg.content["config"]["server-round"])
    proximal_mu = float(msg.content["config"].get("proximal-mu", 0.0))  # only FedProx sends it
    frozen_a_sha256 = msg.content["config"].get(FROZEN_A_CHECKSUM_KEY)  # only with model.lora.freeze-a
    adapter = {key: tensor.float() for key, tensor in msg.content["arrays"].to_torch_state_dict().items()}
    new_adapter, metrics = train_adapter(
        config, adapter, node.partition_id, node.num_partitions, server_round, proximal_mu, frozen_a_sha256
    )
    content = RecordDict({"arrays": ArrayRecord(new_adapter), "metrics": MetricRecord(metrics)})
    WORKER_CACHE.freeze_once()  # after the first call: what lives as long as the worker leaves the gc's view
    return Message(content=content, reply_to=msg)
