"""Protocol vs fast evaluation mode on the tiny model: examples/s, speed ratio, label agreement.

Two models are scored on offline FPB/FiQA/TFNS stand-ins (`synthetic.write_eval_sets`):
the random tiny model (it never emits EOS, so protocol mode generates up to 512 tokens per
example: the worst case for protocol speed) and the same model with a LoRA adapter trained
briefly by the app's own client code on the answer-format sample (it answers with a label
and EOS, so agreement is meaningful). Both modes use the same prompts and parsing.

    python benchmarks/eval_modes.py --threads 1          # ~4 minutes on a busy 2-core CPU
    python benchmarks/eval_modes.py --rows 12 --train-steps 150   # quicker, 18 examples

Prints a table and writes benchmarks/results/eval_modes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from flowertune_finance import launch, synthetic
from flowertune_finance.checkpoint import save_checkpoint
from flowertune_finance.training import train_adapter
from flowertune_finance.config import parse_run_config
from flowertune_finance.evaluate import DATASETS, load_eval_set, score_set
from flowertune_finance.generation import load_model
from flowertune_finance.models import initial_adapter
from flowertune_finance.tiny import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    print(f"adapter: {steps} steps, train loss {metrics['train_loss']:.3f}")
    run_dir.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(run_dir, 1, trained, lora, {"benchmark": "eval_modes"})


def compare(model_dir: Path, peft_path: Path | None, data_dir: Path, batch_size: int) -> dict:
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


def print_table(label: str, rows: dict) -> None:
    print(f"\n{label}")
    print(f"{'set':6} {'n':>4} {'protocol ex/s':>14} {'fast ex/s':>10} {'speed x':>8} {'agree %':>8} "
          f"{'acc prot':>9} {'acc fast':>9}")
    for name, row in rows.items():
        accuracies = (f"{row['protocol_accuracy']:>9.3f} {row['fast_accuracy']:>9.3f}"
                      if "protocol_accuracy" in row else f"{'':>9} {'':>9}")
        print(f"{name:6} {row['examples']:>4} {row['protocol_examples_per_s']:>14.2f} "
              f"{row['fast_examples_per_s']:>10.2f} {row['speed_ratio']:>8.1f} {100 * row['agreement']:>8.1f} {accuracies}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60, help="rows per synthetic set (FPB/FiQA test = 25%%)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "eval_modes.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {
        "what": "protocol vs fast evaluation mode, tiny Mistral (hidden 64, 2 layers), fp32, quantization 0",
        "host": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                 "platform": platform.platform(), "cuda": torch.cuda.is_available()},
        "settings": {"rows_per_set": args.rows, "train_steps": args.train_steps, "batch_size": args.batch_size},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="eval-modes-") as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "tiny")
        data_dir = synthetic.write_eval_sets(tmp / "data", rows_per_set=args.rows)
        adapter = train_briefly(model_dir, tmp / "run", args.train_steps)
        for label, peft_path in (("random tiny model (no adapter)", None),
                                 (f"tiny model + adapter trained {args.train_steps} steps", adapter)):
            rows = compare(model_dir, peft_path, data_dir, args.batch_size)
            results["trained" if peft_path else "random"] = {"label": label, "sets": rows}
            print_table(label, rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
