"""Round time and base-model loads of the real app, with the per-worker model cache on vs off.

Runs the app through the real `flwr run` (private FLWR_HOME and ports; everything it starts is
killed at the end) N rounds per arm:
  cache on   train.cache-base-model = true   the base model is built once per worker (default)
  cache off  train.cache-base-model = false  rebuilt in every client call, as the upstream template
Nothing else differs between the arms. The figures come from the run's metrics.jsonl: per-round
wall time, the clients' own phase timings (time-model/-data/-setup/-train/-steps/-serialize,
summed per round by the server) and base-model loads counted in the clients and in the server.
Prints a table and writes JSON (default benchmarks/results/round_time.json).

  python benchmarks/round_time.py                          # tiny model on the CPU = the smoke run
  python benchmarks/round_time.py --repeats 2              # each arm twice, interleaved
  python benchmarks/round_time.py --model mistral-7b-shape # GPU: random-weight Mistral-7B shape, 4-bit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from flowertune_finance.dev import launch, tiny
from flowertune_finance.dev.processes import isolated_flwr
from flowertune_finance.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
ARMS = {"off": False, "on": True}  # train.cache-base-model
PHASES = [  # (key in the round record's client_time_s, label)
    ("model", "model build/load + set adapter"),
    ("data", "data (partition, tokens, window)"),
    ("setup", "trainer set-up"),
    ("train", "trainer.train()"),
    ("steps", "  of which optimizer steps"),
    ("serialize", "serialisation"),
]
# Mistral-7B-v0.3's shape (its config.json), random weights: realistic memory and compute, no download.
MISTRAL_7B_SHAPE = dict(
    vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
)
# The upstream training arguments for the realistic model (the tiny smoke keeps its own).
UPSTREAM_TRAINING = {
    "train.seq-length": 512,
    "train.training-arguments.per-device-train-batch-size": 16,
    "train.training-arguments.max-steps": 10,
    "train.training-arguments.logging-steps": 10,
}


def build_random_model(folder: Path, shape: dict[str, Any]) -> Path:
    """A random-weight Mistral of `shape` (bf16 on a GPU) + the tiny tokenizer, saved like a hub model."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = MistralConfig(**shape, tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, max_shard_size="5GB")
    tiny.build_tokenizer().save_pretrained(folder)
    return folder


def run_config(args: argparse.Namespace, model_dir: Path, cache: bool, output_dir: Path) -> dict[str, Any]:
    config = launch.smoke_run_config(REPO_ROOT, model_dir, quantization=args.quantization, rounds=args.rounds)
    if args.model != "tiny":
        config.update(UPSTREAM_TRAINING)
    config.update({
        "output.dir": str(output_dir),
        "train.cache-base-model": cache,
        "train.transport-dtype": args.transport_dtype,
        "train.save-every-round": args.rounds,  # one checkpoint, at the end, in both arms
    })
    return config


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-client phase means over the rounds after the first, round times, loads, traffic."""
    later = records[1:] or records
    calls = sum(r["clients_accepted"] for r in later)
    phases = {key: sum(r["client_time_s"][key] for r in later) / calls for key, _ in PHASES}
    client_total = sum(phases[key] for key in ("model", "data", "setup", "train", "serialize"))
    return {
        "round_1_s": records[0]["wall_time_s"],
        "later_rounds_mean_s": statistics.mean(r["wall_time_s"] for r in later),
        "later_rounds_s": [r["wall_time_s"] for r in later],
        "client_phase_mean_s": phases,
        "client_total_mean_s": client_total,
        "share_outside_optimizer_steps": 1 - phases["steps"] / client_total,
        "client_calls": sum(r["clients_accepted"] for r in records),
        "client_base_model_loads": sum(r["client_base_model_loads"] for r in records),
        "server_base_model_loads": records[-1]["server_base_model_loads"],
        "mb_sent": sum(r["mb_sent"] for r in records),
        "mb_received": sum(r["mb_received"] for r in records),
        "train_loss": [r["train_loss"] for r in records],
    }


def run_arm(args, arm: str, model_dir: Path, env: dict[str, str], work: Path, resources) -> dict[str, Any]:
    output_dir = work / f"{arm}-{time.time_ns()}"
    load_before = os.getloadavg()
    result = launch.run_app(
        REPO_ROOT, run_config(args, model_dir, ARMS[arm], output_dir), num_supernodes=args.num_supernodes,
        env=env, timeout=args.timeout, stream=args.stream, client_resources=resources,
    )
    (run_dir,) = [p for p in output_dir.iterdir() if p.is_dir()]
    records = read_metrics(run_dir)
    return {
        "arm": arm, "run_id": result.run_id, "run_wall_s": result.wall_time_s, "run_dir": str(run_dir),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "summary": summarise(records), "rounds": records,
    }


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown table, one column per run (cache off / on, in the order they ran)."""
    head = ["", *[f"cache {r['arm']} #{i + 1}" for i, r in enumerate(runs)]]
    s = [r["summary"] for r in runs]
    rows = [[f"per client, rounds ≥ 2: {label} (s)", *[f"{x['client_phase_mean_s'][key]:.3f}" for x in s]]
            for key, label in PHASES]
    rows += [
        ["per client, rounds ≥ 2: total (s)", *[f"{x['client_total_mean_s']:.3f}" for x in s]],
        ["share of client time outside optimizer steps", *[f"{100 * x['share_outside_optimizer_steps']:.0f}%" for x in s]],
        ["round 1 wall time (s)", *[f"{x['round_1_s']:.2f}" for x in s]],
        ["rounds ≥ 2 wall time, mean (s)", *[f"{x['later_rounds_mean_s']:.2f}" for x in s]],
        ["run wall time, `flwr run` to finished (s)", *[f"{r['run_wall_s']:.1f}" for r in runs]],
        ["base-model loads: clients (calls)", *[f"{x['client_base_model_loads']} ({x['client_calls']})" for x in s]],
        ["base-model loads: server", *[str(x["server_base_model_loads"]) for x in s]],
        ["communication sent + received (MB)", *[f"{x['mb_sent'] + x['mb_received']:.2f}" for x in s]],
        ["train loss per round", *[" / ".join(f"{v:.4f}" for v in x["train_loss"]) for x in s]],
        ["load average before → after (1 min)",
         *[f"{r['load_average_before'][0]:.1f} → {r['load_average_after'][0]:.1f}" for r in runs]],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3, as the smoke run)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm, interleaved off/on (default 1)")
    parser.add_argument("--arms", default="off,on", help="which arms, in order: off,on (default) or one of them")
    parser.add_argument("--model", choices=("tiny", "mistral-7b-shape"), default="tiny",
                        help="tiny: the smoke's tiny Mistral on the CPU (default); mistral-7b-shape: a random-weight "
                             "Mistral-7B-v0.3-shaped model with the upstream training arguments (needs a GPU)")
    parser.add_argument("--quantization", type=int, choices=(0, 4, 8), default=None,
                        help="default: 0 for tiny (as the smoke run), 4 for mistral-7b-shape (the official path)")
    parser.add_argument("--transport-dtype", choices=("float32", "float16"), default="float32",
                        help="train.transport-dtype in both arms (default float32)")
    parser.add_argument("--num-supernodes", type=int, default=launch.NUM_SUPERNODES)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the unreported 1-round run that starts the SuperLink and Ray first")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the model is built (reused if present); default benchmarks/results/models/<model>")
    parser.add_argument("--output", type=Path, default=RESULTS / "round_time.json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--stream", action="store_true", help="stream the runs' logs")
    args = parser.parse_args(argv)
    if args.quantization is None:
        args.quantization = 0 if args.model == "tiny" else 4
    unknown = [arm for arm in args.arms.split(",") if arm not in ARMS]
    if unknown or args.rounds < 1 or args.repeats < 1:
        parser.error(f"--arms takes off,on (got {args.arms!r}); --rounds and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.model != "tiny" and not cuda:
        print("error: --model mistral-7b-shape needs a CUDA GPU (4-bit 7B training on a CPU would take hours)",
              file=sys.stderr)
        return 2
    model_dir = args.model_dir or RESULTS / "models" / args.model
    if args.model == "tiny":
        launch.ensure_tiny_model(model_dir)
    else:
        build_random_model(model_dir, MISTRAL_7B_SHAPE)
    # with a GPU, one client per GPU (Ray hides the GPU from clients that ask for none)
    resources = {"num-cpus": 4, "num-gpus": 1} if cuda else None
    runs = []
    with isolated_flwr() as env:
        work = RESULTS / "runs"  # kept (gitignored), so the runs can be inspected afterwards
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "rounds": 1})
            run_arm(warm, "on", model_dir, env, work, resources)
        for _ in range(args.repeats):
            for arm in args.arms.split(","):
                runs.append(run_arm(args, arm, model_dir, env, work, resources))
                print(f"cache {arm}: run {runs[-1]['run_id']} in {runs[-1]['run_wall_s']:.1f} s", flush=True)
    text = table(runs)
    print(text)
    machine = {
        "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(["python", "benchmarks/round_time.py", *(argv if argv is not None else sys.argv[1:])]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
        "settings": {k: str(v) for k, v in vars(args).items()}, "table_markdown": text, "runs": runs,
    }
    args.output.write_text(json.dumps(payload, indent=2))
    print(f"Wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
