"""One command that measures the app at Mistral-7B scale on one GPU, offline.

What it does, in order (the JSON report is rewritten after every step, so a command cut
short still leaves the figures it got):
  1. Builds a random-weight model of Mistral-7B-v0.3's exact shape (benchmarks/
     mistral_7b_v03_config.json) as bf16 safetensors plus a byte-level BPE tokenizer with the
     same number of ids (32,768) and special-token ids, once, into a cache folder that later
     invocations reuse. Nothing is downloaded: the GPU machine has no internet.
  2. Runs the real app through `flwr run` (private FLWR_HOME and ports, no runtime dependency
     installation; everything it started is killed at the end) with 50 SuperNodes, 2 clients
     per round (strategy.fraction-train 0.04), 2 rounds, the template's training arguments
     (seq 512, batch 16, 10 steps; --quick: 3), 4-bit, on the bundled sample data, per variant:
        cache-on/float32    the default run config
        cache-on/bfloat16   model.compute-dtype = "bfloat16"   (precision: compare with the first)
        cache-off/bfloat16  train.cache-base-model = false     (model cache: compare with the second)
     (--quick on the 7B model starts with cache-on/bfloat16, the fastest, so that one run fits its slot.)
     From the run's metrics.jsonl: seconds per round; per client call the time in model
     build/load, data, trainer set-up, training (of which optimizer steps) and serialisation;
     base-model loads; training tokens per second; peak VRAM per client (the round record's
     `client_peak_vram_mb`, when the clients report it); nvidia-smi samples taken meanwhile.
  3. Times fast-mode and protocol-mode evaluation of the 4-bit model with the app's evaluation
     functions on 256 synthetic examples at batch 32 (--quick: 64). The weights are random, so
     the model does not stop early: protocol mode generates until prompt + answer reach 512
     tokens, its worst case (a trained model answers in a few tokens).

With the 7B model a time budget (470 s; --quick 175 s; --budget-s) keeps the command inside
its slot: a variant or evaluation batch predicted not to fit is skipped, and a run still going
when its share of the budget ends is stopped ("cut off"); the report says which and why.
`--model tiny` runs the same steps with the smoke run's tiny Mistral on a CPU (--quick: 1 step
per call, 32 evaluation examples whose prompts are lengthened to ~490 tokens so that protocol
mode stays short); figures that need a GPU are reported as null with the reason.

  python benchmarks/gpu_check.py                      # GPU, full
  python benchmarks/gpu_check.py --quick              # GPU, quick
  python benchmarks/gpu_check.py --model tiny --quick # CPU

Prints a table and writes benchmarks/results/gpu_check.json (--output to choose another file;
an existing file is never overwritten).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from flowertune_finance.dev import launch
from flowertune_finance.dev.processes import flwr_env, flwr_executable, isolated_flwr, kill_processes_with_env
from flowertune_finance.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
MISTRAL_CONFIG = REPO_ROOT / "benchmarks" / "mistral_7b_v03_config.json"
MODEL_NAMES = {"mistral-7b": "mistral-7b-v0.3-shape", "tiny": "tiny"}
BUILD_MARKER = "gpu_check_build.json"  # written last: a folder without it is an interrupted build
CLIENTS_PER_ROUND = 2
FRACTION_TRAIN = CLIENTS_PER_ROUND / launch.NUM_SUPERNODES  # 0.04: 2 of 50 SuperNodes per round
EVAL_BATCH_SIZE = 32
PHASES = ("model", "data", "setup", "train", "steps", "serialize")  # the clients' time-* metrics
PHASE_LABELS = {
    "model": "model build/load + set adapter", "data": "data", "setup": "trainer set-up",
    "train": "training (trainer.train)", "steps": "  of which optimizer steps", "serialize": "serialisation",
}
# (train.cache-base-model, model.compute-dtype); None keeps the run config's default dtype.
VARIANTS: dict[str, tuple[bool, str | None]] = {
    "cache-on/float32": (True, None),
    "cache-on/bfloat16": (True, "bfloat16"),
    "cache-off/bfloat16": (False, "bfloat16"),
    "cache-off/float32": (False, None),
}
DEFAULT_VARIANTS = ("cache-on/float32", "cache-on/bfloat16", "cache-off/bfloat16")
# The template's training arguments (pyproject.toml); --quick only shortens the steps.
TEMPLATE_TRAINING = {
    "train.seq-length": 512,
    "train.training-arguments.per-device-train-batch-size": 16,
    "train.training-arguments.gradient-accumulation-steps": 1,
}


@dataclass(frozen=True)
class Plan:
    """What a run of the command does: rounds and steps per `flwr run`, evaluation examples and
    their prompt length, time budget (7B only) and the part of it kept for the evaluation."""

    rounds: int
    max_steps: int
    eval_examples: int
    eval_prompt_tokens: int | None  # None: natural prompts; else texts repeated to about this many tokens
    budget_s: float | None
    eval_reserve_s: float
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # the default --variants, in this order


# On the CPU (tiny model) the evaluation prompts are lengthened to ~490 tokens, as the
# evaluation tests do, so that protocol mode's 512-token budget leaves a few answer tokens.
PLANS = {
    ("mistral-7b", "full"): Plan(2, 10, 256, None, budget_s=470, eval_reserve_s=110),
    # Estimated from the full command's H100 figures (docs/performance.md): a first run of 3 steps needs about 116 s
    # from `flwr run` to finished in float32 and 94 s in bfloat16; the model build about 30 s, the evaluation (4-bit
    # load, 2 fast batches, 1 protocol batch) about 35 s. So the quick look starts with bfloat16, the run that fits.
    ("mistral-7b", "quick"): Plan(2, 3, 64, None, budget_s=175, eval_reserve_s=40,
                                  variants=("cache-on/bfloat16", "cache-on/float32", "cache-off/bfloat16")),
    ("tiny", "full"): Plan(2, 10, 256, 490, budget_s=None, eval_reserve_s=0),
    ("tiny", "quick"): Plan(2, 1, 32, 490, budget_s=None, eval_reserve_s=0),
}
RANDOM_MODEL_NOTE = (
    "random weights: the model practically never emits EOS, so protocol mode generates until prompt + answer "
    "reach 512 tokens in every batch and fast mode up to its 8-token cap: the worst case of both (a trained "
    "model answers in a few tokens); throughput only, accuracies mean nothing here"
)


class Clock:
    """Seconds since the start and seconds left in the budget (unlimited without one)."""

    def __init__(self, budget_s: float | None) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()


# ---------------------------------------------------------------------------------------------
# The model: random weights of Mistral-7B-v0.3's shape, built once
# ---------------------------------------------------------------------------------------------

def load_mistral_spec(path: Path = MISTRAL_CONFIG) -> dict[str, Any]:
    """The Mistral-7B-v0.3 config.json values the random model is built from."""
    return json.loads(path.read_text())


def _tokenizer_corpus() -> list[str]:
    """The tiny model's tokenizer corpus (both prompt formats, the evaluation prompt, synthetic
    finance text) plus every field of the sample data, so that the app's text tokenizes into
    whole words as with a real tokenizer. Byte-level BPE merges never cross word boundaries,
    so the words, not their arrangement, decide how a prompt tokenizes."""
    from flowertune_finance.dev import tiny

    rows = [json.loads(line) for line in launch.SAMPLE_DATA.read_text().splitlines() if line.strip()]
    return tiny._training_corpus() + [f"{row['instruction']}\n{row['input']} {row['output']}" for row in rows]


def build_tokenizer(vocab_size: int, bos_id: int, eos_id: int, seed: int = 0):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids, Mistral's special-token ids
    (<unk> 0, <s> `bos_id`, </s> `eos_id`), BOS prepended and no pad token, as Mistral's.

    The merges learned from the app's text come first; random filler words then fill the
    vocabulary to its full size, so the evaluation's added [PAD] grows the embedding to
    vocab + 1 as it does for the real model, instead of shrinking it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if (bos_id, eos_id) != (1, 2):
        raise ValueError(f"bos/eos ids {bos_id}/{eos_id} are not supported; this builder gives <s> 1 and </s> 2")
    rng = random.Random(seed)
    letters = string.ascii_letters + string.digits
    filler = ["".join(rng.choice(letters) for _ in range(rng.randint(6, 12))) for _ in range(max(vocab_size, 20_000))]
    tokenizer = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus() + filler, trainer=trainer)
    bos = specials["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)],
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **specials)  # as Mistral's
    ids = (wrapped.unk_token_id, wrapped.bos_token_id, wrapped.eos_token_id)
    if ids != (0, bos_id, eos_id) or len(wrapped) > vocab_size:
        raise RuntimeError(f"tokenizer came out with special ids {ids} and {len(wrapped)} tokens; "
                           f"expected (0, {bos_id}, {eos_id}) and at most {vocab_size}")
    return wrapped


def _spec_fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_random_model(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Build the model of `spec` with random weights into `folder` unless a complete build of
    the same spec is there; returns how long it took and whether it was reused.

    Weights are initialised on the GPU when there is one (seconds for 7B; the CPU takes
    minutes), saved as bf16 safetensors. The folder appears only when complete (built
    next to it, then renamed), so an interrupted build is never mistaken for a model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fingerprint = _spec_fingerprint(spec)
    marker = folder / BUILD_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("spec_sha256") == fingerprint:
        return {"path": str(folder), "reused": True, "seconds": 0.0, **json.loads(marker.read_text())}
    started = time.perf_counter()
    staging = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = build_tokenizer(spec["vocab_size"], spec["bos_token_id"], spec["eos_token_id"])
    tokenizer.save_pretrained(staging)
    (staging / "config.json").write_text(json.dumps(spec, indent=2))
    config = AutoConfig.from_pretrained(staging)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(staging, max_shard_size="5GB")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    info = {
        "spec_sha256": fingerprint, "parameters": parameters, "tokenizer_size": len(tokenizer),
        "weights_gb": round(sum(p.stat().st_size for p in staging.glob("*.safetensors")) / 1e9, 2),
        "built_on": device, "build_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / BUILD_MARKER).write_text(json.dumps(info, indent=2))
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted or outdated build of this cache folder
    staging.rename(folder)
    return {"path": str(folder), "reused": False, "seconds": info["build_seconds"], **info}


def prepare_model(args: argparse.Namespace) -> dict[str, Any]:
    """The model folder the runs load: the tiny smoke model or the cached 7B-shaped one."""
    if args.model == "tiny":
        started = time.perf_counter()
        folder = launch.ensure_tiny_model(args.model_dir)
        return {"path": str(folder), "reused": False, "seconds": round(time.perf_counter() - started, 1)}
    return build_random_model(args.model_dir, load_mistral_spec())


# ---------------------------------------------------------------------------------------------
# Machine, versions and nvidia-smi sampling
# ---------------------------------------------------------------------------------------------

def _nvidia_smi(*query: str) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-...` as lists of fields; None when nvidia-smi is unusable."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        done = subprocess.run([executable, *query, "--format=csv,noheader,nounits"],
                              check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[field.strip() for field in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """Card, driver, CUDA, CPU and the versions of everything the figures depend on."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = _nvidia_smi("--query-gpu=name,driver_version,memory.total") or []
    cuda_driver = None
    if shutil.which("nvidia-smi"):
        header = subprocess.run(["nvidia-smi"], check=False, capture_output=True, text=True, timeout=10).stdout
        marker = "CUDA Version:"
        if marker in header:
            cuda_driver = header.split(marker, 1)[1].split()[0]
    versions = {}
    for package in ("torch", "bitsandbytes", "transformers", "peft", "trl", "flwr", "flwr-datasets",
                    "accelerate", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_mb": int(gpus[0][2]) if gpus else None,
        "driver": gpus[0][1] if gpus else None,
        "cuda_driver_api": cuda_driver,
        "cuda_runtime_torch": torch.version.cuda,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


class GpuSampler:
    """Samples nvidia-smi every `interval` seconds in a background thread: memory used on the
    card, GPU utilisation and memory per process (what Ray's client workers hold, including
    their CUDA context and cached blocks, so above torch's max_memory_allocated)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float, float, dict[int, float]]] = []
        self.available = _nvidia_smi("--query-gpu=memory.used,utilization.gpu") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nvidia-smi-sampler", daemon=True)

    def start(self) -> None:
        if self.available:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            card = _nvidia_smi("--query-gpu=memory.used,utilization.gpu")
            apps = _nvidia_smi("--query-compute-apps=pid,used_memory") or []
            if card:
                per_pid = {}
                for row in apps:
                    try:
                        per_pid[int(row[0])] = float(row[1])
                    except (ValueError, IndexError):
                        continue
                self.samples.append((now, float(card[0][0]), float(card[0][1]), per_pid))
            self._stop.wait(self.interval)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Peaks and mean utilisation between two `time.monotonic()` readings."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            why = "nvidia-smi not available" if not self.available else "no sample in this window"
            return {"samples": 0, "peak_card_memory_used_mb": None, "mean_gpu_utilization_pct": None,
                    "peak_memory_per_process_mb": None, "why_null": why}
        per_pid: dict[int, float] = {}
        for _, _, _, processes in inside:
            for pid, used in processes.items():
                if pid != os.getpid():  # this process's own CUDA context is not a client's
                    per_pid[pid] = max(per_pid.get(pid, 0.0), used)
        return {
            "samples": len(inside),
            "peak_card_memory_used_mb": max(s[1] for s in inside),
            "mean_gpu_utilization_pct": round(sum(s[2] for s in inside) / len(inside), 1),
            "peak_memory_per_process_mb": {str(pid): used for pid, used in sorted(per_pid.items())} or None,
        }


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------

def run_config(args: argparse.Namespace, plan: Plan, variant: str, output_dir: Path) -> dict[str, Any]:
    """The variant's run config: the smoke's paths and data, the template's training arguments,
    2 clients per round, 4-bit; only cache and compute dtype differ between variants."""
    cache, compute_dtype = VARIANTS[variant]
    config = launch.smoke_run_config(REPO_ROOT, args.model_dir, quantization=4, rounds=plan.rounds)
    config.update(TEMPLATE_TRAINING)
    config.update({
        "train.training-arguments.max-steps": plan.max_steps,
        "train.training-arguments.logging-steps": plan.max_steps,
        "strategy.fraction-train": FRACTION_TRAIN,
        "train.save-every-round": plan.rounds,  # one checkpoint, after the last round, in every variant
        "train.cache-base-model": cache,
        "output.dir": str(output_dir),
    })
    if compute_dtype is not None:
        config["model.compute-dtype"] = compute_dtype
    return config


def config_problem(config: dict[str, Any]) -> str | None:
    """Why the app would reject this run config (e.g. a key it does not know yet), or None."""
    from flowertune_finance.config import ConfigError, parse_run_config

    try:
        parse_run_config(config)
    except ConfigError as error:
        return str(error)
    return None


def examples_per_call(partition_size: int, batch_size: int, max_steps: int) -> int:
    """Examples the trainer's `max_steps` batches hold: epochs of ceil(n / batch) batches, the
    last one partial (no drop_last), repeated until the steps run out."""
    if partition_size < 1 or batch_size < 1:
        raise ValueError(f"partition size {partition_size} and batch size {batch_size} must both be >= 1")
    full, rest = divmod(partition_size, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    return sum(sizes[step % len(sizes)] for step in range(max_steps))


def estimate_train_tokens(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Non-padding training tokens per client call, estimated from the sample data, for when
    the clients do not report `train-tokens`: examples per call (50 per IID partition, the
    trainer's batches) times the mean tokenized example length in the run's format."""
    from flowertune_finance.config import parse_run_config
    from flowertune_finance.training import tokenized_partition

    config = parse_run_config(run_config(args, plan, "cache-on/float32", Path(tempfile.gettempdir())))
    examples, _ = tokenized_partition(config, 0, 1)
    lengths = [len(ids) for ids in examples["input_ids"]]
    partition = len(lengths) // args.num_supernodes
    batch = TEMPLATE_TRAINING["train.training-arguments.per-device-train-batch-size"]
    count = examples_per_call(partition, batch, plan.max_steps)
    mean_length = sum(lengths) / len(lengths)
    return {"examples_per_call": count, "mean_example_tokens": round(mean_length, 1),
            "tokens_per_call": round(count * mean_length), "partition_examples": partition}


def summarise(records: list[dict[str, Any]], estimate: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The figures of one run from its metrics.jsonl. Rounds after the first are the steady
    state (round 1 also pays for Ray, imports and, with the cache, the model build)."""
    later = records[1:] or records
    calls_later = sum(r["clients_accepted"] for r in later)
    calls_all = sum(r["clients_accepted"] for r in records)
    per_call = {p: round(sum(r["client_time_s"][p] for r in later) / calls_later, 3) for p in PHASES}
    loads = sum(r["client_base_model_loads"] for r in records)
    model_seconds = sum(r["client_time_s"]["model"] for r in records)
    steps_seconds = sum(r["client_time_s"]["steps"] for r in later)
    summary: dict[str, Any] = {
        "rounds_s": [r["wall_time_s"] for r in records],
        "round_1_s": records[0]["wall_time_s"],
        "later_rounds_mean_s": round(sum(r["wall_time_s"] for r in later) / len(later), 2),
        "client_calls": calls_all,
        "per_call_s": per_call,  # rounds >= 2, mean per client call
        "per_call_total_s": round(sum(per_call[p] for p in PHASES if p != "steps"), 3),
        "round_1_per_call_s": {p: round(records[0]["client_time_s"][p] / records[0]["clients_accepted"], 3)
                               for p in PHASES},
        "client_base_model_loads": loads,
        "seconds_per_base_model_load": round(model_seconds / loads, 2) if loads else None,
        "train_loss": [r["train_loss"] for r in records],
        "mb_sent_plus_received": round(sum(r["mb_sent"] + r["mb_received"] for r in records), 2),
    }
    if all(r.get("client_train_tokens") for r in later):  # absent or 0: the clients do not count them
        tokens = sum(r["client_train_tokens"] for r in later)
        summary["train_tokens_per_call"] = round(tokens / calls_later)
        summary["tokens_source"] = "clients' train-tokens metric (non-padding tokens)"
    else:
        tokens = estimate["tokens_per_call"] * calls_later
        summary["train_tokens_per_call"] = estimate["tokens_per_call"]
        summary["tokens_source"] = ("estimate: examples per call x mean example length of the sample data "
                                    "(clients do not report train-tokens)")
    summary["train_tokens_per_s"] = round(tokens / steps_seconds, 1) if steps_seconds > 0 else None
    peaks = [r["client_peak_vram_mb"] for r in records if r.get("client_peak_vram_mb")]
    if not cuda:
        summary["peak_vram_mb_per_client"] = None
        summary["peak_vram_mb_per_client_why_null"] = "no CUDA GPU: training ran on the CPU"
    elif not peaks:
        summary["peak_vram_mb_per_client"] = None
        summary["peak_vram_mb_per_client_why_null"] = (
            "the clients do not report peak-vram-mb (torch.cuda.max_memory_allocated); see the nvidia-smi "
            "per-process peak instead")
    else:
        summary["peak_vram_mb_per_client"] = round(max(peaks), 1)
    return summary


def predicted_seconds(variant: str, done: dict[str, dict[str, Any]], plan: Plan) -> float | None:
    """How long a variant should take, from the runs already measured (None before the first):
    a finished run of the same precision, plus one base-model load per extra client call
    when this variant rebuilds the model every call."""
    finished = {name: result for name, result in done.items() if result["status"] == "ok"}
    if not finished:
        return None
    cache, dtype = VARIANTS[variant]
    same_dtype = [r for name, r in finished.items() if VARIANTS[name][1] == dtype]
    reference = (same_dtype or list(finished.values()))[0]
    seconds = reference["run_wall_s"]
    summary = reference["summary"]
    load_s = summary["seconds_per_base_model_load"] or 0.0
    if not cache:
        seconds += max(plan.rounds * CLIENTS_PER_ROUND - summary["client_base_model_loads"], 0) * load_s
    return seconds


def run_log_tail(run_id: int, env: dict[str, str], chars: int = 4000) -> str | None:
    """The end of a run's log (`flwr log RUN_ID --show`): why a run failed, in the report itself."""
    try:
        shown = subprocess.run([flwr_executable(), "log", str(run_id), "--show"], env=flwr_env(env),
                               check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return (shown.stdout + shown.stderr)[-chars:] or None


def unfinished_outcome(error: Exception, elapsed_s: float, timeout_s: float) -> tuple[str, str]:
    """(status, reason) of a run that did not finish successfully: "cut off" when it was still going as its
    time slot ended (the budget's share for it, or --run-timeout), else "failed" with the error."""
    status = getattr(error, "status", None)  # launch.RunFailed: the run's last status
    if status in ("pending", "starting", "running") and elapsed_s >= timeout_s:
        return "cut off", (f"time budget: still running when its {timeout_s:.0f} s slot ended "
                           "(--budget-s, or --run-timeout); stopped")
    return "failed", f"{type(error).__name__}: {error}"


def run_variant(
    args: argparse.Namespace, plan: Plan, variant: str, env: dict[str, str], work: Path,
    estimate: dict[str, Any], sampler: GpuSampler, timeout: float, cuda: bool,
) -> dict[str, Any]:
    """One `flwr run` of a variant and its figures. A failed or cut-off run is reported, not
    raised, with the rounds it finished (metrics.jsonl is written every round) and its log's end."""
    output_dir = work / variant.replace("/", "-")
    config = run_config(args, plan, variant, output_dir)
    problem = config_problem(config)
    if problem is not None:
        return {"status": "unavailable", "reason": f"the app rejects this variant's run config: {problem}"}
    resources = ({"num-cpus": args.cpus_per_client, "num-gpus": args.gpus_per_client} if cuda else None)
    result: dict[str, Any] = {"status": "ok", "cache_base_model": VARIANTS[variant][0],
                              "compute_dtype": VARIANTS[variant][1] or "float32 (default)"}
    started = time.monotonic()
    try:
        finished = launch.run_app(REPO_ROOT, config, num_supernodes=args.num_supernodes, env=env,
                                  timeout=timeout, stream=args.stream, client_resources=resources)
        result.update(run_id=finished.run_id, run_wall_s=round(finished.wall_time_s, 1))
    except (launch.RunFailed, OSError, subprocess.SubprocessError) as error:
        status, reason = unfinished_outcome(error, time.monotonic() - started, timeout)
        result.update(status=status, reason=reason)
        run_id = getattr(error, "run_id", None)
        if run_id is not None:
            result.update(run_id=run_id, log_tail=run_log_tail(run_id, env))
    result["gpu_samples"] = sampler.window(started, time.monotonic())
    run_dirs = [p for p in output_dir.iterdir() if p.is_dir()] if output_dir.is_dir() else []
    records = read_metrics(run_dirs[0]) if len(run_dirs) == 1 else []
    if result["status"] == "ok" and len(records) != plan.rounds:
        result.update(status="failed", reason=f"expected {plan.rounds} round records, found {len(records)}")
    records = [r for r in records if r["clients_accepted"] > 0]
    if records:
        result["summary"] = summarise(records, estimate, cuda)
        if result["status"] != "ok":
            result["summary"]["partial"] = f"from the {len(records)} round(s) finished before the run stopped"
    result["rounds"] = records
    return result


def run_variants(args, plan: Plan, clock: Clock, estimate, sampler: GpuSampler, cuda: bool, report) -> None:
    """All requested variants through one private SuperLink, in order, within the budget."""
    variants = report["variants"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-runs-") as work, isolated_flwr() as env:
        report["flwr_home"] = env["FLWR_HOME"]  # private; whatever ran under it is stopped on exit
        for variant in args.variants:
            reserve = plan.eval_reserve_s if clock.budget_s is not None else 0.0
            predicted = predicted_seconds(variant, variants, plan)
            room = clock.left() - reserve
            if predicted is not None and predicted > room:
                variants[variant] = {"status": "skipped", "reason": (
                    f"time budget: predicted {predicted:.0f} s, {max(room, 0):.0f} s left before the evaluation "
                    f"(--budget-s {clock.budget_s:.0f})")}
            elif room <= 0:
                variants[variant] = {"status": "skipped", "reason": "time budget used up"}
            else:
                timeout = room if math.isfinite(room) else args.run_timeout
                print(f"--- {variant}: flwr run ({plan.rounds} rounds, {CLIENTS_PER_ROUND} clients per round)",
                      flush=True)
                variants[variant] = run_variant(args, plan, variant, env, Path(work), estimate, sampler,
                                                min(timeout, args.run_timeout), cuda)
                if variants[variant]["status"] != "ok":
                    print((variants[variant].get("log_tail") or "")[-1500:], flush=True)
                    # a run cut off by its slot may still hold the GPU: stop everything it started
                    kill_processes_with_env("FLWR_HOME", env["FLWR_HOME"])
            print(f"--- {variant}: {variants[variant]['status']} {variants[variant].get('reason', '')}", flush=True)
            write_report(args.output, report)


# ---------------------------------------------------------------------------------------------
# Evaluation throughput
# ---------------------------------------------------------------------------------------------

class GenerateCounter:
    """Wraps a model's `generate` to count what it computed: decode steps and generated
    positions (rows x new tokens, padding after an early stop included), read off the
    returned ids' shape, whatever the evaluator's batching does."""

    def __init__(self, model) -> None:
        self.generate = model.generate
        self.steps = 0
        self.positions = 0

    def __call__(self, *args: Any, **kwargs: Any):
        output = self.generate(*args, **kwargs)
        sequences = output if hasattr(output, "shape") else output.sequences
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        new_tokens = sequences.shape[1] - prompt.shape[1]
        self.steps += new_tokens
        self.positions += new_tokens * sequences.shape[0]
        return output


def eval_examples(tokenizer, count: int, prompt_tokens: int | None):
    """`count` synthetic tweets in the leaderboard's prompt, as an EvalSet; with `prompt_tokens`
    each text is repeated until the prompt is about that long (at most that many tokens)."""
    from flowertune_finance.dev import synthetic
    from flowertune_finance.leaderboard import INSTRUCTION
    from flowertune_finance.scoring import EvalSet, eval_prompt

    instruction = INSTRUCTION.format("tweet")
    rows = list(synthetic.sentences(count, seed=5, companies=synthetic.HELD_OUT_COMPANIES))
    prompts = []
    for text, _ in rows:
        prompt = eval_prompt(instruction, text)
        repeats = 1
        while prompt_tokens:
            longer = eval_prompt(instruction, " ".join([text] * (repeats + 1)))
            if len(tokenizer(longer)["input_ids"]) > prompt_tokens:
                break
            prompt, repeats = longer, repeats + 1
        prompts.append(prompt)
    return EvalSet("synthetic-tweets", prompts, [label for _, label in rows])


def evaluate_throughput(args, plan: Plan, clock: Clock, sampler: GpuSampler, report: dict[str, Any]) -> None:
    """Fast then protocol mode on the same examples, one batch of 32 per `score_set` call (a
    batch is then exactly one batch of the evaluator's); stops between batches when the
    budget ends. The model is the evaluator's 4-bit load (`load_model`)."""
    from flowertune_finance.generation import load_model
    from flowertune_finance.scoring import EvalSet, score_set

    evaluation: dict[str, Any] = {"batch_size": EVAL_BATCH_SIZE, "examples_requested": plan.eval_examples,
                                  "quantization": 4, "note": RANDOM_MODEL_NOTE, "modes": {}}
    report["evaluation"] = evaluation
    if clock.left() <= 0:
        evaluation.update(status="skipped", reason="time budget used up by the runs")
        return
    window_start = time.monotonic()
    started = time.perf_counter()
    model, tokenizer = load_model(str(args.model_dir), None, quantization=4)
    evaluation["model_load_s"] = round(time.perf_counter() - started, 1)
    eval_set = eval_examples(tokenizer, plan.eval_examples, plan.eval_prompt_tokens)
    prompt_lengths = [len(tokenizer(p)["input_ids"]) for p in eval_set.prompts]
    evaluation["prompt_tokens_mean"] = round(sum(prompt_lengths) / len(prompt_lengths), 1)
    evaluation["prompt_tokens_max"] = max(prompt_lengths)
    if plan.eval_prompt_tokens:
        evaluation["prompts"] = (f"texts repeated to at most {plan.eval_prompt_tokens} prompt tokens, so that "
                                 "protocol mode's 512-token budget leaves few answer tokens on a CPU")
    counter = GenerateCounter(model)
    model.generate = counter
    for mode in ("fast", "protocol"):
        seconds, done, last, stopped = 0.0, 0, 0.0, None
        steps_before, positions_before = counter.steps, counter.positions
        for start in range(0, len(eval_set.prompts), EVAL_BATCH_SIZE):
            if done and clock.left() < last:
                stopped = f"time budget: {clock.left():.0f} s left, the last batch took {last:.0f} s"
                break
            batch = EvalSet(eval_set.name, eval_set.prompts[start:start + EVAL_BATCH_SIZE],
                            eval_set.targets[start:start + EVAL_BATCH_SIZE])
            last = float(score_set(model, tokenizer, batch, batch_size=EVAL_BATCH_SIZE, mode=mode)["seconds"])
            seconds += last
            done += len(batch.prompts)
        batches = math.ceil(done / EVAL_BATCH_SIZE)
        positions = counter.positions - positions_before
        evaluation["modes"][mode] = {
            "examples": done, "batches": batches, "seconds": round(seconds, 2),
            "examples_per_s": round(done / seconds, 2) if seconds else None,
            "decode_steps_per_batch": round((counter.steps - steps_before) / batches, 1) if batches else None,
            "generated_tokens_per_s": round(positions / seconds, 1) if seconds else None,
            "stopped_early": stopped,
        }
        print(f"--- evaluation {mode}: {done} examples in {seconds:.1f} s", flush=True)
        write_report(args.output, report)
    evaluation["gpu_samples"] = sampler.window(window_start, time.monotonic())
    del model, counter
    gc.collect()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(report: dict[str, Any]) -> str:
    """Markdown tables: one column per variant, then the evaluation modes."""
    names = list(report["variants"])
    results = [report["variants"][n] for n in names]
    summaries = [r.get("summary") for r in results]

    def row(label: str, values: list[str]) -> str:
        return "| " + " | ".join([label, *values]) + " |"

    def figure(getter) -> list[str]:
        return [getter(s) if s else "—" for s in summaries]

    lines = [row("", names), "|" + "---|" * (len(names) + 1)]
    lines.append(row("status", [r["status"] for r in results]))
    lines.append(row("round 1 (s)", figure(lambda s: _fmt(s["round_1_s"]))))
    lines.append(row("rounds ≥ 2, mean (s)", figure(lambda s: _fmt(s["later_rounds_mean_s"]))))
    for phase in PHASES:
        lines.append(row(f"per call, rounds ≥ 2: {PHASE_LABELS[phase]} (s)",
                         figure(lambda s, p=phase: _fmt(s["per_call_s"][p], 3))))
    lines.append(row("per call, rounds ≥ 2: total (s)", figure(lambda s: _fmt(s["per_call_total_s"], 3))))
    lines.append(row("round 1 per call: model (s)", figure(lambda s: _fmt(s["round_1_per_call_s"]["model"], 3))))
    lines.append(row("base-model loads (client calls)",
                     figure(lambda s: f"{s['client_base_model_loads']} ({s['client_calls']})")))
    lines.append(row("training tokens/s (optimizer steps)", figure(lambda s: _fmt(s["train_tokens_per_s"], 0))))
    lines.append(row("peak VRAM per client, torch (MB)", figure(lambda s: _fmt(s["peak_vram_mb_per_client"], 0))))
    gpu = [r.get("gpu_samples") for r in results]
    lines.append(row("peak card memory, nvidia-smi (MB)",
                     [_fmt(g.get("peak_card_memory_used_mb"), 0) if g else "—" for g in gpu]))
    lines.append(row("mean GPU utilisation (%)",
                     [_fmt(g.get("mean_gpu_utilization_pct"), 0) if g else "—" for g in gpu]))
    lines.append(row("run wall time (s)", [_fmt(r.get("run_wall_s"), 1) for r in results]))
    text = "\n".join(lines)
    evaluation = report.get("evaluation")
    if evaluation and evaluation.get("modes"):
        text += ("\n\n| evaluation (4-bit, batch 32, random weights) | examples | s | examples/s | "
                 "decode steps per batch | generated tokens/s |\n")
        text += "|---|---|---|---|---|---|\n"
        for mode, m in evaluation["modes"].items():
            text += (f"| {mode} | {m['examples']} | {_fmt(m['seconds'])} | {_fmt(m['examples_per_s'])} | "
                     f"{_fmt(m['decode_steps_per_batch'], 1)} | {_fmt(m['generated_tokens_per_s'], 1)} |\n")
        text += f"\n{RANDOM_MODEL_NOTE}"
    return text


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the report so far (this invocation's own file; replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2, default=str))
    partial.replace(path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODEL_NAMES), default="mistral-7b",
                        help="mistral-7b: random-weight Mistral-7B-v0.3 shape, needs a CUDA GPU (default); "
                             "tiny: the smoke's tiny Mistral, runs on a CPU")
    full, quick = PLANS["mistral-7b", "full"], PLANS["mistral-7b", "quick"]
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick.max_steps} steps per call, {quick.eval_examples} evaluation examples, "
                             f"{quick.budget_s:.0f} s budget (full: {full.max_steps} steps, {full.eval_examples} "
                             f"examples, {full.budget_s:.0f} s); tiny: {PLANS['tiny', 'quick'].max_steps} step, "
                             f"{PLANS['tiny', 'quick'].eval_examples} examples")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, run in this order (default {', '.join(DEFAULT_VARIANTS)}; the 7B "
                             f"--quick: {', '.join(quick.variants)}); known: {', '.join(VARIANTS)}")
    parser.add_argument("--num-supernodes", type=int, default=launch.NUM_SUPERNODES)
    parser.add_argument("--gpus-per-client", type=float, default=1.0,
                        help="GPU share per ClientApp (default 1.0, the template's: one client at a time on the GPU)")
    parser.add_argument("--cpus-per-client", type=int, default=6,
                        help="CPUs per ClientApp on a GPU machine (default 6, the template's)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole command; later variants and evaluation batches that would not "
                             "fit are skipped (default: the mode's budget for mistral-7b, none for tiny)")
    parser.add_argument("--run-timeout", type=float, default=900, help="seconds one `flwr run` may take (default 900)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model cache folder, reused when complete (default benchmarks/results/models/<model>)")
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu_check.json",
                        help="JSON report (default benchmarks/results/gpu_check.json); must not exist yet")
    parser.add_argument("--stream", action="store_true", help="stream the runs' logs")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    if args.variants is None:
        args.variants = ",".join(PLANS[args.model, args.mode].variants)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(f"--variants {', '.join(unknown) or '(none)'} not known; allowed: {', '.join(VARIANTS)}")
    if args.num_supernodes < CLIENTS_PER_ROUND:
        parser.error(f"--num-supernodes {args.num_supernodes} is too few; at least {CLIENTS_PER_ROUND}")
    if not 0 < args.gpus_per_client <= 1 or args.cpus_per_client < 1:
        parser.error(f"--gpus-per-client must be in (0, 1] (got {args.gpus_per_client}) and "
                     f"--cpus-per-client >= 1 (got {args.cpus_per_client})")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s} is not allowed; use a number of seconds > 0")
    if args.output.exists():
        parser.error(f"--output {args.output} exists; not overwriting saved results: choose another path")
    if args.budget_s is None and args.model != "tiny":
        args.budget_s = PLANS[args.model, args.mode].budget_s
    args.model_dir = (args.model_dir or RESULTS / "models" / MODEL_NAMES[args.model]).resolve()
    return args


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (a `timeout`, a test's terminate) unwinds normally, so the private SuperLink
    and everything it started are stopped by `isolated_flwr` instead of outliving us."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS[args.model, args.mode]
    clock = Clock(args.budget_s)
    import torch

    cuda = torch.cuda.is_available()
    if args.model == "mistral-7b" and not cuda:
        print("error: --model mistral-7b needs a CUDA GPU (4-bit 7B training on a CPU takes hours); "
              "use --model tiny on a CPU", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": False,
        "mode": args.mode,
        "model": MODEL_NAMES[args.model],
        "machine": machine_info(),
        "settings": {
            "num_supernodes": args.num_supernodes, "clients_per_round": CLIENTS_PER_ROUND,
            "fraction_train": FRACTION_TRAIN, "rounds": plan.rounds, "max_steps": plan.max_steps,
            "batch_size": TEMPLATE_TRAINING["train.training-arguments.per-device-train-batch-size"],
            "seq_length": TEMPLATE_TRAINING["train.seq-length"], "quantization": 4,
            "client_resources": ({"num-cpus": args.cpus_per_client, "num-gpus": args.gpus_per_client}
                                 if cuda else "flwr default (CPU)"),
            "budget_s": args.budget_s, "variants": args.variants, "data": str(launch.SAMPLE_DATA.name),
        },
        "variants": {},
    }
    if args.num_supernodes != launch.NUM_SUPERNODES:
        report["settings"]["note"] = (f"{args.num_supernodes} SuperNodes instead of the leaderboard's "
                                      f"{launch.NUM_SUPERNODES} (larger partitions, same clients per round)")
        print(f"note: {report['settings']['note']}", flush=True)
    write_report(args.output, report)
    print(f"--- model: {report['model']} in {args.model_dir}", flush=True)
    report["model_build"] = prepare_model(args)
    report["train_token_estimate"] = estimate_train_tokens(args, plan)
    write_report(args.output, report)
    sampler = GpuSampler()
    sampler.start()
    try:
        run_variants(args, plan, clock, report["train_token_estimate"], sampler, cuda, report)
        evaluate_throughput(args, plan, clock, sampler, report)
    finally:
        sampler.stop()
    report["total_seconds"] = round(clock.elapsed(), 1)
    report["table_markdown"] = table(report)
    report["complete"] = True
    write_report(args.output, report)
    print(report["table_markdown"])
    print(f"total {report['total_seconds']:.0f} s; wrote {args.output}")
    failed = [name for name, r in report["variants"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
