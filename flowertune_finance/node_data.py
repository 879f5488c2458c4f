"""Which data a SuperNode trains on, read from its node config (simulation and deployment alike).

Node-config keys (the simulation engine sets the first two; on the Deployment Engine the data
owner passes them with `flower-supernode --node-config`):

- `partition-id`, `num-partitions`: the node trains on that IID partition of the federation's
  data, i.e. the run config's `dataset.path` when set, else the hub data set.
- `dataset-path`: the data owner's own JSON/JSONL/Parquet file in the fingpt schema
  (instruction, input, output). It replaces the federation's data on this node. Alone, the
  whole file is the node's data; with `partition-id`/`num-partitions` as well, the node takes
  that partition of its file (useful to try several nodes on one file).

The file is checked (exists, parses, has the columns, no blank rows) before any model is loaded,
so a wrong path fails the node's first call with a message naming the key and the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowertune_finance.config import AppConfig
from flowertune_finance.dataset import DataError, validate_data_file
from flowertune_finance.worker_cache import WORKER_CACHE

PARTITION_KEYS = ("partition-id", "num-partitions")
DATASET_PATH_KEY = "dataset-path"
EXAMPLE = '--node-config "partition-id=0 num-partitions=50" or --node-config \'dataset-path="/data/mine.jsonl"\''


@dataclass(frozen=True)
class NodeData:
    """This node's share of the data: a partition of a source, and its own file if it has one."""

    partition_id: int
    num_partitions: int
    dataset_path: str = ""

    def use_in(self, config: AppConfig) -> AppConfig:
        """The run config as this node sees it: its own file, if any, replaces `dataset.path`."""
        return dataclasses.replace(config, dataset_path=self.dataset_path) if self.dataset_path else config


def _integer(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"node config '{key}' = {value!r} is not an integer; e.g. {EXAMPLE}")
    return value


def node_data(node_config: Mapping[str, Any]) -> NodeData:
    """Parse and check this node's data settings; raises DataError naming the bad key or file."""
    dataset_path = node_config.get(DATASET_PATH_KEY, "")
    if not isinstance(dataset_path, str):
        raise DataError(f"node config '{DATASET_PATH_KEY}' = {dataset_path!r} must be a quoted path; e.g. {EXAMPLE}")
    present = [key for key in PARTITION_KEYS if key in node_config]
    if len(present) == 1 or not (present or dataset_path):
        missing = [key for key in PARTITION_KEYS if key not in node_config]
        raise DataError(
            f"node config lacks {', '.join(repr(k) for k in missing)}"
            f"{'' if present else f' (or {DATASET_PATH_KEY!r})'}; start the SuperNode with {EXAMPLE}"
        )
    partition_id, num_partitions = (
        (_integer(node_config, "partition-id"), _integer(node_config, "num-partitions")) if present else (0, 1)
    )
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"node config partition-id {partition_id} is out of range for num-partitions {num_partitions}")
    if dataset_path:
        dataset_path = str(Path(dataset_path).expanduser().resolve())
        _validate_once(dataset_path)
    return NodeData(partition_id, num_partitions, dataset_path)


def _validate_once(path: str) -> None:
    """Validate the node's file once per process and version of the file (path, size, mtime):
    the ClientApp checks it on every call. A missing file is never remembered: validation raises."""
    file = Path(path)
    key = (path, file.stat().st_size, file.stat().st_mtime_ns) if file.is_file() else None
    WORKER_CACHE.validate_data_file_once(
        key, lambda: validate_data_file(path, setting=f"node config '{DATASET_PATH_KEY}'")
    )
