"""Optional fast-mode evaluation of the global adapter on the server, every few rounds.

Off by default (`eval.every-rounds = 0`), so the leaderboard path is unchanged. When on,
the server loads the base model once, on first use (counted in `WORKER_CACHE.base_model_loads`,
which the round record reports as `server_base_model_loads`), and scores each evaluated round's
aggregated adapter on the first `eval.num-examples` examples of FPB, FiQA and TFNS
(protocol splits, fast decoding). The data is loaded and checked when the run starts.
"""

from __future__ import annotations

import copy
import time
from logging import INFO

import torch
from flwr.common import log
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from flowertune_finance.adapters import ADAPTER_NAME
from flowertune_finance.config import AppConfig
from flowertune_finance.generation import load_model
from flowertune_finance.leaderboard import DATASETS
from flowertune_finance.scoring import load_eval_set, score_set
from flowertune_finance.worker_cache import WORKER_CACHE

BATCH_SIZE = 32  # the leaderboard's default batch size


class ServerEvaluator:
    """Fast accuracy of an adapter on fixed examples; returns round metrics prefixed `eval_`."""

    def __init__(self, config: AppConfig) -> None:
        self.every_rounds = config.eval.every_rounds
        self.model_name = config.model.name
        self.quantization = config.model.quantization
        data_dir = config.eval.data_dir or None
        self.sets = [load_eval_set(name, data_dir, config.eval.num_examples) for name in DATASETS]
        self.model = None
        self.tokenizer = None

    def due(self, server_round: int) -> bool:
        return self.every_rounds > 0 and server_round % self.every_rounds == 0

    def __call__(self, adapter: dict[str, torch.Tensor], lora: LoraConfig) -> dict[str, float]:
        started = time.perf_counter()
        if self.model is None:
            base, self.tokenizer = load_model(self.model_name, None, self.quantization)
            WORKER_CACHE.count_base_model_load()  # reported as the round record's server_base_model_loads
            self.model = get_peft_model(base, copy.deepcopy(lora)).eval()
        # PEFT's own loader: the [PAD]-resized embeddings are not part of the adapter
        loaded = set_peft_model_state_dict(self.model, adapter, adapter_name=ADAPTER_NAME)
        if loaded.unexpected_keys:
            raise ValueError(f"adapter keys not in the model, e.g. {loaded.unexpected_keys[0]}")
        metrics = {}
        for eval_set in self.sets:
            metrics[f"eval_{eval_set.name}_accuracy"] = score_set(
                self.model, self.tokenizer, eval_set, BATCH_SIZE, "fast"
            )["accuracy"]
        metrics["eval_average_accuracy"] = sum(metrics.values()) / len(metrics)
        # the cost is not named eval_*: the plots draw every eval_* key on the accuracy axes
        metrics["server_eval_s"] = round(time.perf_counter() - started, 3)
        log(INFO, "Server eval (fast, %s examples per set): %s", len(self.sets[0].prompts),
            ", ".join(f"{key} {value:.3f}" for key, value in metrics.items()))
        return metrics
