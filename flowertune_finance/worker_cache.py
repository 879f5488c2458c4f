"""What a process keeps between client calls, in one object: `WORKER_CACHE`.

Flower calls the ClientApp's handler anew for every message, with the message and a `Context` whose
state holds records only (arrays, metrics, configs), never a model or a tokenizer. What is expensive
and the same in every call (the base model with its LoRA wrapper, the tokenizer, the loaded and the
tokenized data) can therefore only survive between calls in the process itself. That is why
`WORKER_CACHE` is a deliberate module-level global: every object a client call reuses lives in it,
with a bound per kind, and `clear()` empties them all.

Lifetime: one instance per process, created when this module is first imported, living as long as
the process. A simulation worker (a Ray actor) serves many client calls of a run, so there the cache
saves a model build and a tokenization per call; a Deployment Engine SuperNode starts a fresh
ClientApp process for every message (Flower's subprocess isolation), so there it lives one call. The
ServerApp's process holds one too: it counts the server-side evaluator's base-model load and
remembers the training arguments already checked.

The cache only stores. The modules that know how to build a thing pass their builder in
(`models.cached_peft_model`, `dataset.load_partition`, `training.tokenized_partition`, ...), so this
module imports nothing of the app and every layer can use it.

Bounds (`SIZES`); past its bound a kind evicts its least recently used entry:

- model (key: the ModelConfig), 1: a 4-bit 7B model takes ~5 GB; a new config replaces the old
  model, which is evicted before the new one is built.
- frozen-a (the ModelConfig), 1: follows the model.
- tokenizer (the model name), 2: small; one per model.
- federated-dataset (hub name, local file, partition count), 2: each holds its whole data set.
- tokenized-source (model, data, partition count, prompt format, seq length), 2: with every
  partition of that source this worker has served. A simulation worker serves many of the 50
  SuperNodes, and partitions of one source are disjoint, so a source holds at most one tokenized
  copy of its data set.
- data-file (path, size, modification time), 16: a node's own file, validated once; tiny keys.
- training-arguments (the arguments and the seq length), 16: SFTConfig built once; tiny keys.

The base-model load counter and the gc-freeze flag describe the process, not a cached object:
`clear()` keeps them.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from flowertune_finance.config import ModelConfig

T = TypeVar("T")

SIZES = {
    "model": 1,
    "frozen-a": 1,
    "tokenizer": 2,
    "federated-dataset": 2,
    "tokenized-source": 2,
    "data-file": 16,
    "training-arguments": 16,
}


class BoundedStore:
    """Up to `size` entries, the least recently used one evicted first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a cache bound of {size!r} is not allowed; allowed: an integer >= 1")
        self.size = size
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get_or_build(self, key: Hashable, build: Callable[[], T]) -> T:
        """The entry for `key`, built by `build()` when missing. Room is made before building, so a
        replaced model is released before its successor loads; a failed build stores nothing."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        while len(self.entries) >= self.size:
            self.entries.popitem(last=False)
        value = build()
        self.entries[key] = value
        return value

    def __len__(self) -> int:
        return len(self.entries)


class WorkerCache:
    """Everything one process keeps between client calls; see the module docstring for bounds and lifetime."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        unknown = sorted(set(sizes or {}) - set(SIZES))
        if unknown:
            raise KeyError(f"cache kind(s) {', '.join(map(repr, unknown))} unknown; allowed: {', '.join(SIZES)}")
        self.sizes = {**SIZES, **(sizes or {})}
        self._stores = {kind: BoundedStore(size) for kind, size in self.sizes.items()}
        self._base_model_loads = 0
        self._frozen = False

    def peft_model(self, model_config: ModelConfig, build: Callable[[ModelConfig], T]) -> T:
        """The process's PEFT model for `model_config`, `build(model_config)` on first use (one kept)."""
        return self._stores["model"].get_or_build(model_config, lambda: build(model_config))

    def frozen_lora_a(self, model_config: ModelConfig, derive: Callable[[ModelConfig], T]) -> T:
        """FFA-LoRA's fixed A matrices for `model_config`, `derive(model_config)` on first use (one kept)."""
        return self._stores["frozen-a"].get_or_build(model_config, lambda: derive(model_config))

    def tokenizer(self, model_name: str, load: Callable[[str], T]) -> T:
        """The tokenizer of `model_name`, `load(model_name)` on first use."""
        return self._stores["tokenizer"].get_or_build(model_name, lambda: load(model_name))

    def federated_dataset(self, source: tuple[str, str, int], build: Callable[[], T]) -> T:
        """The partitioned data set of `source` (hub name, local file, partition count), built on first use."""
        return self._stores["federated-dataset"].get_or_build(source, build)

    def tokenized_partition(self, source: Hashable, partition_id: int, build: Callable[[], T]) -> T:
        """Partition `partition_id` of `source` as trainer-ready examples, built on first use. Every
        partition of a kept source stays: together they are at most one tokenized copy of its data."""
        partitions = self._stores["tokenized-source"].get_or_build(source, dict)
        if partition_id not in partitions:
            partitions[partition_id] = build()
        return partitions[partition_id]

    def validate_data_file_once(self, key: Hashable, validate: Callable[[], object]) -> None:
        """Run `validate` unless it passed for `key` (path, size, modification time) before; a
        validation that raises is not remembered."""
        self._stores["data-file"].get_or_build(key, lambda: _passed(validate))

    def check_training_arguments_once(self, key: Hashable, check: Callable[[], object]) -> None:
        """Run `check` unless it passed for `key` before; a check that raises is not remembered."""
        self._stores["training-arguments"].get_or_build(key, lambda: _passed(check))

    def count_base_model_load(self) -> None:
        """Record one base-model load in this process (a client's build, or the server's evaluator)."""
        self._base_model_loads += 1

    @property
    def base_model_loads(self) -> int:
        """Base-model loads in this process so far, cached or not; `clear()` keeps the count."""
        return self._base_model_loads

    def freeze_once(self) -> bool:
        """After the process's first client call, take what lives as long as the process (imported
        modules, this cache's contents) out of the garbage collector's view with `gc.freeze()`.

        Every `Trainer.train()` runs a full `gc.collect()` (accelerate's `free_memory`), which
        otherwise walks ~0.5 M objects of torch/transformers/flwr in each call: about 0.3 s on a
        2-core CPU, more than two tiny training steps. Done once, after collecting the first call's
        garbage, since frozen objects are never collected. Returns whether this call froze.
        """
        if self._frozen:
            return False
        gc.collect()
        gc.freeze()
        self._frozen = True
        return True

    def held(self, kind: str) -> int:
        """How many entries of `kind` are kept (for tokenized partitions: how many sources)."""
        if kind not in self._stores:
            raise KeyError(f"cache kind {kind!r} is unknown; allowed: {', '.join(self._stores)}")
        return len(self._stores[kind])

    def clear(self) -> None:
        """Drop every cached object, as a new process would start; the load count and the freeze stay."""
        for store in self._stores.values():
            store.entries.clear()


def _passed(check: Callable[[], object]) -> bool:
    """Run `check` for its exceptions only: what it returns (e.g. the validated data) is not kept."""
    check()
    return True


# The process's one cache (see the module docstring for why it is a global).
WORKER_CACHE = WorkerCache()
