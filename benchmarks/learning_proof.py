"""Learning proof on the CPU: does the whole app make a model learn, and what do the levers do?

Stage A pre-trains a tiny Mistral centrally on label-free synthetic finance text and on
prompts with RANDOM labels (a stand-in for a pretrained LLM: it knows the answer format,
not the mapping). Stage B runs the real app with `flwr run`, 50 SuperNodes, LoRA, for each
case (prompt format x strategy). The real evaluation (protocol mode) scores held-out
sentences about companies no training row mentions, in the FPB hub schema, before (base
model) and after (final PEFT checkpoint).

    python benchmarks/learning_proof.py                      # full size, 4 cases
    python benchmarks/learning_proof.py --size ci --cases answer-fedavg
    python benchmarks/learning_proof.py --communication --size ci --seeds 0,1,2

Prints a table and writes benchmarks/results/learning_proof.json; `--communication` compares
held-out accuracy with the total MB sent and received for FedAvg, fp16 transport, frozen A
(FFA-LoRA) and frozen A + fp16 on the same seeds, and writes learning_proof_comm.json.
Saved results are never overwritten: pass --output to write elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from flowertune_finance.dev import proof, synthetic
from flowertune_finance.dev.processes import isolated_flwr

APP_DIR = Path(__file__).resolve().parents[1]
RESULTS = APP_DIR / "benchmarks" / "results" / "learning_proof.json"
# name -> (prompt format, strategy, run-config overrides). FedAdam's step is scaled to this
# proof's client learning rate (1e-2, 200x a 7B's): its default eta=1e-3 suits the 7B's ~1e-4
# per-round LoRA change; "answer-fedadam-default" keeps it, to show the difference.
CASES = {
    "answer-fedavg": ("answer", "fedavg", {}),
    "alpaca-fedavg": ("alpaca", "fedavg", {}),
    "answer-fedprox": ("answer", "fedprox", {}),
    "answer-fedadam": ("answer", "fedadam", {"strategy.fedadam.eta": 1e-2}),
    "answer-fedadam-default": ("answer", "fedadam", {}),
    "answer-fedavg-fp16": ("answer", "fedavg", {"train.transport-dtype": "float16"}),
    "answer-fedavg-frozen-a": ("answer", "fedavg", {"model.lora.freeze-a": True}),
    "answer-fedavg-frozen-a-fp16": ("answer", "fedavg",
                                    {"model.lora.freeze-a": True, "train.transport-dtype": "float16"}),
    # only B learns with A frozen: the same schedule at twice the learning rate
    "answer-fedavg-frozen-a-2xlr": ("answer", "fedavg", {"model.lora.freeze-a": True, "train.learning-rate-max": 2e-2,
                                                         "train.learning-rate-min": 4e-3}),
}
DEFAULT_CASES = ("answer-fedavg", "alpaca-fedavg", "answer-fedprox", "answer-fedadam")
COMMUNICATION_RESULTS = APP_DIR / "benchmarks" / "results" / "learning_proof_comm.json"
COMMUNICATION_CASES = {  # name in the table -> case
    "FedAvg": "answer-fedavg",
    "fp16": "answer-fedavg-fp16",
    "frozen-A": "answer-fedavg-frozen-a",
    "frozen-A + fp16": "answer-fedavg-frozen-a-fp16",
}


def run(size_name: str, cases: list[str], seed: int, work_dir: Path, threads: int) -> dict:
    size = proof.SIZES[size_name]
    started = time.perf_counter()
    base = work_dir / "base"
    pretraining = proof.pretrain_tiny_base(
        base, hidden_size=size.hidden_size, num_layers=size.num_layers, steps=size.pretrain_steps,
        learning_rate=size.pretrain_learning_rate, batch_size=size.pretrain_batch_size, seed=seed,
    )
    pretraining["seconds"] = round(time.perf_counter() - started, 1)
    print(f"stage A: {pretraining}", flush=True)
    train_file = proof.write_training_file(work_dir / "train.jsonl", size.train_rows, seed)
    eval_dir = synthetic.write_eval_sets(work_dir / "eval", size.eval_rows, seed, datasets=("fpb",))
    scores = work_dir / "scores"
    before = proof.score_heldout(base, None, eval_dir, scores, "base")
    report = {
        "size": size_name, "settings": dataclasses.asdict(size), "seed": seed, "client_threads": threads,
        "pretraining": pretraining,
        "heldout_examples": before["counts"]["fpb"], "before": before["fpb"],
        "before_samples": proof.sample_generations(base, None, eval_dir), "cases": {},
    }
    print(f"before (base model): {before['fpb']:.3f} on {before['counts']['fpb']} held-out examples", flush=True)
    with isolated_flwr() as env:
        env = {**env, "OMP_NUM_THREADS": str(threads)}  # seen by the SuperLink it starts, and its workers
        for name in cases:
            prompt_format, strategy, overrides = CASES[name]
            config = proof.proof_run_config(base, train_file, work_dir / "runs" / name, size.rounds,
                                            prompt_format, strategy, **overrides)
            result, checkpoint = proof.train_federated(APP_DIR, config, env)
            after = proof.score_heldout(base, checkpoint, eval_dir, scores, name)
            state = json.loads((checkpoint / "run_state.json").read_text())
            report["cases"][name] = {
                "prompt_format": prompt_format, "strategy": strategy, "overrides": overrides, "rounds": size.rounds,
                "after": after["fpb"], "total_mb": state["communication_mb"],
                "flwr_run_wall_s": round(result.wall_time_s, 1),
                "eval_s": after["total_seconds"], "checkpoint": checkpoint.name,
                "samples": proof.sample_generations(base, checkpoint, eval_dir),
            }
            print(f"{name}: {report['before']:.3f} -> {after['fpb']:.3f} ({result.wall_time_s:.0f} s flwr run)",
                  flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    return report


def table(report: dict) -> str:
    lines = [
        (f"Held-out accuracy (real evaluation, protocol mode, {report['heldout_examples']} FPB-schema examples, "
        f"unseen companies), size {report['size']}, seed {report['seed']}:"),
        "| prompt format | strategy | rounds | before | after | `flwr run` wall |",
        "|---|---|---|---|---|---|",
    ]
    for case in report["cases"].values():
        strategy = " ".join([case["strategy"], *(f"{k.split('.')[-1]}={v}" for k, v in case["overrides"].items())])
        lines.append(f"| {case['prompt_format']} | {strategy} | {case['rounds']} | {report['before']:.3f} | "
                     f"{case['after']:.3f} | {case['flwr_run_wall_s']:.0f} s |")
    return "\n".join(lines)


def communication_study(size_name: str, seeds: list[int], threads: int) -> dict:
    """The four transport variants on the same seeds (same base, data and held-out set per seed)."""
    started = time.perf_counter()
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="learning-proof-") as work_dir:
            runs.append(run(size_name, list(COMMUNICATION_CASES.values()), seed, Path(work_dir), threads))
    rows = {}
    for label, case in COMMUNICATION_CASES.items():
        accuracies = [report["cases"][case]["after"] for report in runs]
        totals = [report["cases"][case]["total_mb"] for report in runs]
        rows[label] = {"case": case, "overrides": CASES[case][2], "accuracy_by_seed": accuracies,
                       "accuracy_mean": sum(accuracies) / len(accuracies), "accuracy_min": min(accuracies),
                       "total_mb_by_seed": totals, "total_mb": max(totals)}
    return {
        "size": size_name, "seeds": seeds, "rounds": runs[0]["cases"][COMMUNICATION_CASES["FedAvg"]]["rounds"],
        "heldout_examples": runs[0]["heldout_examples"], "before_by_seed": [report["before"] for report in runs],
        "rows": rows, "runs": runs, "total_s": round(time.perf_counter() - started, 1),
    }


def communication_table(study: dict) -> str:
    seeds = study["seeds"]
    lines = [
        (f"Held-out accuracy and total communication, size {study['size']}, {study['rounds']} rounds, "
        f"{study['heldout_examples']} held-out examples, seeds {', '.join(map(str, seeds))} "
        f"(base model before training: {', '.join(f'{b:.3f}' for b in study['before_by_seed'])}):"),
        "| transport | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | total MB | vs FedAvg |",
        "|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    reference = study["rows"]["FedAvg"]["total_mb"]
    for label, row in study["rows"].items():
        accuracies = " | ".join(f"{a:.3f}" for a in row["accuracy_by_seed"])
        lines.append(f"| {label} | {accuracies} | {row['accuracy_mean']:.3f} | {row['total_mb']:.3f} | "
                     f"{row['total_mb'] / reference:.1%} |")
    return "\n".join(lines)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_device": "cpu", "platform": platform.platform(),
            "load_average_1m_at_end": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(proof.SIZES), default="full")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--communication", action="store_true",
                        help=f"compare {', '.join(COMMUNICATION_CASES)} on --seeds "
                             f"(writes {COMMUNICATION_RESULTS.name})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds for --communication")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"default: {RESULTS.relative_to(APP_DIR)} "
                             f"(or {COMMUNICATION_RESULTS.relative_to(APP_DIR)})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per simulation worker (1: on a busy 2-core machine two threads thrash)")
    args = parser.parse_args()
    output = args.output or (COMMUNICATION_RESULTS if args.communication else RESULTS)
    if output.exists():
        parser.error(f"{output} exists; saved results are not overwritten: pass --output to write elsewhere")
    if args.communication:
        try:
            seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2")
        if not seeds:
            parser.error("--seeds: give at least one seed")
        study = communication_study(args.size, seeds, args.threads)
        study["machine"] = machine()
        print(communication_table(study))
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(study, indent=2) + "\n")
        print(f"wrote {output} (total {study['total_s']} s)")
        return
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in cases if name not in CASES]
    if unknown or not cases:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; allowed: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory(prefix="learning-proof-") as work_dir:
        report = run(args.size, cases, args.seed, Path(work_dir), args.threads)
    report["machine"] = machine()
    print(table(report))
    for name, case in report["cases"].items():
        print(f"{name} samples: {case['samples'][:3]}")
    print(f"before samples: {report['before_samples'][:3]}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output} (total {report['total_s']} s)")


if __name__ == "__main__":
    main()
