"""Evaluation on the tiny model: protocol vs fast mode, and protocol accuracy by batch size.

Two models are scored on offline FPB/FiQA/TFNS stand-ins (`synthetic.write_eval_sets`, the
sets the tests use): the random tiny model (it keeps talking, so protocol mode generates up to
512 tokens per chunk: the worst case for protocol speed) and the same model with a LoRA adapter
trained briefly by the app's own client code on the answer-format sample (it answers with a
label and EOS, so accuracy and agreement mean something).

* modes: protocol vs fast at one batch size: examples/s, speed ratio, label agreement
  (writes benchmarks/results/eval_modes.json).
* batch sizes: protocol-mode accuracy at batch sizes 1, 7 and 32 (writes
  benchmarks/results/eval_batch_sizes.json). Protocol mode is the leaderboard's computation, in
  which an answer may run to 512 tokens including the longest prompt of its chunk, padded on the
  tokenizer's own side, so the numbers may differ between batch sizes. The tiny tokenizer pads on
  the right (Mistral's pads on the left); a row with left padding shows what that side changes.

    python benchmarks/eval_modes.py --threads 1                      # both tables, ~5 minutes on 2 cores
    python benchmarks/eval_modes.py --threads 1 --table batch-sizes  # only the batch-size table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowertune_finance.adapters import initial_adapter
from flowertune_finance.checkpoint import save_checkpoint
from flowertune_finance.config import parse_run_config
from flowertune_finance.dev import launch, synthetic
from flowertune_finance.dev.tiny import build_tiny_model
from flowertune_finance.generation import load_model
from flowertune_finance.leaderboard import DATASETS
from flowertune_finance.metrics import ReplyMetric
from flowertune_finance.scoring import load_eval_set, score_set
from flowertune_finance.training import train_adapter

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def train_briefly(model_dir: Path, run_dir: Path, steps: int) -> Path:
    """A LoRA adapter trained for `steps` steps on the answer-format sample, saved as peft_1."""
    config = parse_run_config({
        **launch.smoke_run_config(REPO_ROOT, model_dir, rounds=1),
        "train.prompt-format": "answer",
        "train.training-arguments.max-steps": steps,
        "train.training-arguments.per-device-train-batch-size": 16,
        "train.learning-rate-max": 2e-3,
        "train.learning-rate-min": 2e-3,
        "output.dir": str(run_dir),
    })
    adapter, lora = initial_adapter(config.model)
    trained, metrics = train_adapter(config, adapter, partition_id=0, num_partitions=1, server_round=1)
    print(f"adapter: {steps} steps, train loss {metrics[ReplyMetric.TRAIN_LOSS]:.3f}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(run_dir, 1, trained, lora, {"benchmark": "eval_modes"})


def compare_modes(model_dir: Path, peft_path: Path | None, data_dir: Path, batch_size: int) -> dict:
    """Both modes on every set with one loaded model; per set and in total."""
    model, tokenizer = load_model(str(model_dir), str(peft_path) if peft_path else None, quantization=0)
    rows, totals = {}, {"count": 0, "agree": 0, "protocol_s": 0.0, "fast_s": 0.0}
    for name in DATASETS:
        eval_set = load_eval_set(name, data_dir)
        protocol = score_set(model, tokenizer, eval_set, batch_size, "protocol")
        fast = score_set(model, tokenizer, eval_set, batch_size, "fast")
        agree = sum(p["new_out"] == f["new_out"] for p, f in zip(protocol["records"], fast["records"]))
        rows[name] = {
            "examples": len(eval_set.prompts),
            "protocol_accuracy": protocol["accuracy"],
            "fast_accuracy": fast["accuracy"],
            "agreement": agree / len(eval_set.prompts),
            "protocol_examples_per_s": len(eval_set.prompts) / protocol["seconds"],
            "fast_examples_per_s": len(eval_set.prompts) / fast["seconds"],
            "speed_ratio": protocol["seconds"] / fast["seconds"],
        }
        totals["count"] += len(eval_set.prompts)
        totals["agree"] += agree
        totals["protocol_s"] += protocol["seconds"]
        totals["fast_s"] += fast["seconds"]
    rows["all"] = {
        "examples": totals["count"],
        "agreement": totals["agree"] / totals["count"],
        "protocol_examples_per_s": totals["count"] / totals["protocol_s"],
        "fast_examples_per_s": totals["count"] / totals["fast_s"],
        "speed_ratio": totals["protocol_s"] / totals["fast_s"],
    }
    return rows


def print_modes(label: str, rows: dict) -> None:
    print(f"\n{label}")
    print(f"{'set':6} {'n':>4} {'protocol ex/s':>14} {'fast ex/s':>10} {'speed x':>8} {'agree %':>8} "
          f"{'acc prot':>9} {'acc fast':>9}")
    for name, row in rows.items():
        accuracies = (f"{row['protocol_accuracy']:>9.3f} {row['fast_accuracy']:>9.3f}"
                      if "protocol_accuracy" in row else f"{'':>9} {'':>9}")
        print(f"{name:6} {row['examples']:>4} {row['protocol_examples_per_s']:>14.2f} "
              f"{row['fast_examples_per_s']:>10.2f} {row['speed_ratio']:>8.1f} {100 * row['agreement']:>8.1f} {accuracies}")


def accuracy_by_batch_size(model_dir: Path, peft_path: Path | None, data_dir: Path, batch_sizes: list[int],
                           padding_side: str | None = None) -> dict:
    """Protocol-mode accuracy of every set at each batch size, one loaded model (the tokenizer's
    padding side unless `padding_side` overrides it)."""
    model, tokenizer = load_model(str(model_dir), str(peft_path) if peft_path else None, quantization=0)
    if padding_side:
        tokenizer.padding_side = padding_side
    sets = [load_eval_set(name, data_dir) for name in DATASETS]
    rows = {}
    for batch_size in batch_sizes:
        scores = {eval_set.name: score_set(model, tokenizer, eval_set, batch_size, "protocol") for eval_set in sets}
        row = {name: result["accuracy"] for name, result in scores.items()}
        row["average"] = sum(row.values()) / len(row)
        row["seconds"] = round(sum(result["seconds"] for result in scores.values()), 2)
        rows[str(batch_size)] = row
    return {"padding_side": tokenizer.padding_side, "examples": {s.name: len(s.prompts) for s in sets},
            "batch_sizes": rows}


def print_batch_sizes(label: str, result: dict) -> None:
    print(f"\n{label} (padding side: {result['padding_side']}; examples {result['examples']})")
    print(f"{'batch':>5} {'FPB':>7} {'FiQA':>7} {'TFNS':>7} {'avg':>7} {'seconds':>8}")
    for batch_size, row in result["batch_sizes"].items():
        print(f"{batch_size:>5} {row['fpb']:>7.3f} {row['fiqa']:>7.3f} {row['tfns']:>7.3f} {row['average']:>7.3f} "
              f"{row['seconds']:>8.1f}")


def host() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60, help="rows per synthetic set (FPB/FiQA test = 25%%)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the modes table")
    parser.add_argument("--batch-sizes", default="1,7,32", help="batch sizes of the batch-size table")
    parser.add_argument("--table", choices=("modes", "batch-sizes", "both"), default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/eval_modes.py " + shlex.join(sys.argv[1:])
    settings = {"rows_per_set": args.rows, "train_steps": args.train_steps, "command": command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    what = "tiny Mistral (hidden 64, 2 layers), fp32, quantization 0, offline synthetic FPB/FiQA/TFNS"
    with tempfile.TemporaryDirectory(prefix="eval-modes-") as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny")
        data_dir = synthetic.write_eval_sets(tmp / "data", rows_per_set=args.rows)
        adapter = train_briefly(model_dir, tmp / "run", args.train_steps)
        models = (("random tiny model (no adapter)", "random", None),
                  (f"tiny model + adapter trained {args.train_steps} steps", "trained", adapter))
        if args.table in ("modes", "both"):
            results = {"what": f"protocol vs fast evaluation mode, {what}", "host": host(),
                       "settings": {**settings, "batch_size": args.batch_size}}
            for label, key, peft_path in models:
                rows = compare_modes(model_dir, peft_path, data_dir, args.batch_size)
                results[key] = {"label": label, "sets": rows}
                print_modes(label, rows)
            write(results, RESULTS / "eval_modes.json")
        if args.table in ("batch-sizes", "both"):
            batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
            results = {"what": f"protocol-mode accuracy by batch size, {what}", "host": host(),
                       "settings": {**settings, "batch_sizes": batch_sizes}}
            for label, key, peft_path in models:
                results[key] = {"label": label, **accuracy_by_batch_size(model_dir, peft_path, data_dir, batch_sizes)}
                print_batch_sizes(label, results[key])
                left = accuracy_by_batch_size(model_dir, peft_path, data_dir, batch_sizes, padding_side="left")
                results[f"{key}_left_padding"] = {"label": f"{label}, tokenizer padding forced left", **left}
                print_batch_sizes(f"{label}, tokenizer padding forced left", left)
            write(results, RESULTS / "eval_batch_sizes.json")
    print(f"\ncommand: {command}\nhost: {json.dumps(host())}")


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
