"""benchmarks/gpu_check.py: the 7B model it builds offline, its scheduling, and the whole command
on the CPU with the tiny model (`--model tiny --quick`), whose JSON must hold every figure."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowertune_finance.dev.processes import processes_with_env

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
DEFAULT_VARIANTS = ["cache-on/float32", "cache-on/bfloat16", "cache-off/bfloat16"]
REPORT_VARIABLE = "GPU_CHECK_TINY_QUICK_REPORT"  # set by .ci/run, which runs the command as a step of its own


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def test_the_config_is_mistral_7b_v03():
    spec = gpu_check.load_mistral_spec()
    assert spec["architectures"] == ["MistralForCausalLM"] and spec["model_type"] == "mistral"
    assert (spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]) == (4096, 14336, 32)
    assert (spec["num_attention_heads"], spec["num_key_value_heads"], spec["head_dim"]) == (32, 8, 128)
    assert (spec["vocab_size"], spec["max_position_embeddings"], spec["rope_theta"]) == (32768, 32768, 1e6)
    assert spec["sliding_window"] is None and spec["tie_word_embeddings"] is False
    assert (spec["bos_token_id"], spec["eos_token_id"], spec["torch_dtype"]) == (1, 2, "bfloat16")
    from transformers import AutoModelForCausalLM, MistralConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(MistralConfig(**spec))
    assert sum(p.numel() for p in model.parameters()) == 7_248_023_552  # Mistral-7B-v0.3's parameter count


def test_model_build_fills_the_vocabulary_is_reused_and_fits_training_and_evaluation(tmp_path):
    """The 7B build path on a model of the same vocabulary and ids but tiny layers."""
    from flowertune_finance import training
    from flowertune_finance.config import parse_run_config
    from flowertune_finance.dev import launch
    from flowertune_finance.generation import load_model

    spec = {**gpu_check.load_mistral_spec(), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an interrupted build: no marker, so it is rebuilt
    built = gpu_check.build_random_model(folder, spec)
    assert not built["reused"] and built["tokenizer_size"] == 32768 and (folder / "model.safetensors").is_file()
    assert gpu_check.build_random_model(folder, spec)["reused"]
    assert not gpu_check.build_random_model(folder, {**spec, "rms_norm_eps": 1e-6})["reused"]  # another spec

    config = parse_run_config({**launch.smoke_run_config(REPO_ROOT, folder, quantization=4),
                               **gpu_check.TEMPLATE_TRAINING})
    examples, tokenizer = training.tokenized_partition(config, 0, 50)
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id) == (32768, 1, 2)
    assert all(ids[0] == 1 and max(ids) < 32768 for ids in examples["input_ids"])
    assert all(any(label != -100 for label in labels) for labels in examples["labels"])  # the answer is found
    mean_tokens = sum(map(len, examples["input_ids"])) / len(examples)
    assert 40 < mean_tokens < 120  # whole words, not bytes: about what Mistral's tokenizer gives
    model, eval_tokenizer = load_model(str(folder), None, quantization=4)
    assert model.get_input_embeddings().weight.shape[0] == len(eval_tokenizer) == 32769  # + [PAD], as for Mistral
    assert eval_tokenizer.padding_side == "left"


def test_examples_per_call_follow_the_trainers_batches():
    assert gpu_check.examples_per_call(50, 16, 10) == 16 * 3 + 2 + 16 * 3 + 2 + 16 * 2
    assert gpu_check.examples_per_call(50, 16, 1) == 16
    assert gpu_check.examples_per_call(10, 16, 3) == 30


def test_prediction_adds_a_model_load_per_call_without_the_cache():
    plan = gpu_check.PLANS["mistral-7b", "full"]
    assert gpu_check.predicted_seconds("cache-on/bfloat16", {}, plan) is None
    base = {"status": "ok", "run_wall_s": 100.0,
            "summary": {"seconds_per_base_model_load": 20.0, "client_base_model_loads": 1}}
    done = {"cache-on/float32": base}
    assert gpu_check.predicted_seconds("cache-on/bfloat16", done, plan) == 100.0
    assert gpu_check.predicted_seconds("cache-off/bfloat16", done, plan) == 100.0 + 3 * 20.0
    done["cache-on/bfloat16"] = {**base, "run_wall_s": 60.0}
    assert gpu_check.predicted_seconds("cache-off/bfloat16", done, plan) == 60.0 + 3 * 20.0
    assert gpu_check.predicted_seconds("cache-off/float32", done, plan) == 100.0 + 3 * 20.0


def test_a_run_still_going_when_its_slot_ends_is_cut_off_not_failed():
    running = gpu_check.launch.RunFailed("run 7 ended with status 'running'; see ...", "running")
    status, reason = gpu_check.unfinished_outcome(running, elapsed_s=90.4, timeout_s=90.0)
    assert status == "cut off" and "90 s slot" in reason and "budget" in reason
    crashed = gpu_check.launch.RunFailed("run 7 ended with status 'finished:failed'", "finished:failed")
    assert gpu_check.unfinished_outcome(crashed, elapsed_s=95.0, timeout_s=90.0)[0] == "failed"
    assert gpu_check.unfinished_outcome(running, elapsed_s=30.0, timeout_s=90.0)[0] == "failed"  # not the clock
    not_started = gpu_check.launch.RunFailed("`flwr run` did not start the run")
    assert gpu_check.unfinished_outcome(not_started, elapsed_s=95.0, timeout_s=90.0) == (
        "failed", "RunFailed: `flwr run` did not start the run")


def test_the_7b_quick_look_starts_with_its_fastest_variant_and_fits_in_3_minutes(tmp_path):
    quick = gpu_check.parse_args(["--quick", "--output", str(tmp_path / "q.json")])
    assert quick.variants[0] == "cache-on/bfloat16" and sorted(quick.variants) == sorted(DEFAULT_VARIANTS)
    assert quick.budget_s <= 180 and gpu_check.PLANS["mistral-7b", "quick"].eval_reserve_s < quick.budget_s
    full = gpu_check.parse_args(["--output", str(tmp_path / "f.json")])
    assert full.variants == DEFAULT_VARIANTS and full.budget_s <= 480  # 8 minutes on one H100
    tiny = gpu_check.parse_args(["--model", "tiny", "--quick", "--output", str(tmp_path / "t.json")])
    assert tiny.variants == DEFAULT_VARIANTS and tiny.budget_s is None
    chosen = gpu_check.parse_args(["--quick", "--variants", "cache-off/float32", "--output", str(tmp_path / "c.json")])
    assert chosen.variants == ["cache-off/float32"]


def _round(number: int, wall: float, model: float, steps: float, loads: int, **extra) -> dict:
    times = {"model": model, "data": 0.2, "setup": 0.4, "train": steps + 0.2, "steps": steps, "serialize": 0.1}
    return {"round": number, "wall_time_s": wall, "clients_accepted": 2, "client_time_s": times,
            "client_base_model_loads": loads, "train_loss": 1.0, "mb_sent": 1.0, "mb_received": 1.0, **extra}


def test_summary_prefers_what_the_clients_report_and_estimates_otherwise():
    estimate = {"tokens_per_call": 1000}
    reported = [_round(1, 100.0, 40.0, 20.0, 1, client_train_tokens=3000, client_peak_vram_mb=9000.0),
                _round(2, 30.0, 0.0, 20.0, 0, client_train_tokens=4000, client_peak_vram_mb=9500.0)]
    summary = gpu_check.summarise(reported, estimate, cuda=True)
    assert summary["per_call_s"]["steps"] == 10.0 and summary["per_call_s"]["model"] == 0.0
    assert summary["round_1_per_call_s"]["model"] == 20.0 and summary["seconds_per_base_model_load"] == 40.0
    assert summary["train_tokens_per_call"] == 2000 and summary["train_tokens_per_s"] == 200.0
    assert "clients" in summary["tokens_source"] and summary["peak_vram_mb_per_client"] == 9500.0
    silent = [_round(1, 100.0, 40.0, 20.0, 1), _round(2, 30.0, 0.0, 20.0, 0, client_train_tokens=0)]
    summary = gpu_check.summarise(silent, estimate, cuda=True)
    assert summary["train_tokens_per_call"] == 1000 and summary["train_tokens_per_s"] == 100.0
    assert "estimate" in summary["tokens_source"]
    assert summary["peak_vram_mb_per_client"] is None and "peak-vram-mb" in summary["peak_vram_mb_per_client_why_null"]


def test_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    with pytest.raises(SystemExit):
        gpu_check.main(["--model", "tiny", "--output", str(taken)])
    assert "not overwriting" in capsys.readouterr().err and taken.read_text() == "{}"
    with pytest.raises(SystemExit):
        gpu_check.main(["--variants", "cache-on/float16", "--output", str(tmp_path / "x.json")])
    assert "cache-on/float16" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--model", "mistral-7b", "--output", str(tmp_path / "y.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "y.json").exists()


def test_a_spent_budget_skips_runs_and_evaluation_and_says_so(tiny_model, tmp_path):
    output = tmp_path / "budget.json"
    code = gpu_check.main(["--model", "tiny", "--quick", "--budget-s", "0.001", "--model-dir", str(tiny_model),
                           "--output", str(output)])
    report = json.loads(output.read_text())
    assert code == 0 and report["complete"]
    assert [v["status"] for v in report["variants"].values()] == ["skipped"] * 3
    assert all("budget" in v["reason"] for v in report["variants"].values())
    assert report["evaluation"]["status"] == "skipped" and "budget" in report["evaluation"]["reason"]


def tiny_quick_report(tiny_model: Path, tmp_path: Path) -> tuple[Path, str]:
    """The report and output of `gpu_check.py --model tiny --quick`: the ones CI's own step wrote when
    REPORT_VARIABLE names them (`.ci/run` runs the command before the tests), else from a run here."""
    if os.environ.get(REPORT_VARIABLE):
        output = Path(os.environ[REPORT_VARIABLE])
        return output, output.with_suffix(".log").read_text()
    output = tmp_path / "results" / "gpu_check.json"
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--quick", "--model-dir", str(tiny_model),
               "--output", str(output)]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the script then stops its SuperLink and workers
        log, _ = process.communicate(timeout=60)
        pytest.fail(f"gpu_check.py --model tiny --quick took over 900 s:\n{log[-3000:]}")
    assert process.returncode == 0, log[-3000:]
    return output, log


@pytest.mark.slow
def test_tiny_quick_command_reports_every_figure(tiny_model, tmp_path):
    output, log = tiny_quick_report(tiny_model, tmp_path)
    report = json.loads(output.read_text())

    assert report["complete"] and (report["mode"], report["model"]) == ("quick", "tiny")
    machine = report["machine"]
    assert all(machine["versions"][p] for p in ("torch", "bitsandbytes", "transformers", "peft", "trl", "flwr"))
    if not torch.cuda.is_available():
        assert machine["gpu"] is None and machine["driver"] is None
    settings = report["settings"]
    assert (settings["num_supernodes"], settings["clients_per_round"], settings["fraction_train"]) == (50, 2, 0.04)
    training = (settings["rounds"], settings["seq_length"], settings["batch_size"], settings["quantization"])
    assert training == (2, 512, 16, 4)
    assert list(report["variants"]) == DEFAULT_VARIANTS

    for name, variant in report["variants"].items():
        assert variant["status"] == "ok", (name, variant.get("reason"))
        rounds, summary = variant["rounds"], variant["summary"]
        assert [r["clients_accepted"] for r in rounds] == [2, 2] and summary["client_calls"] == 4
        assert summary["round_1_s"] > 0 and summary["later_rounds_mean_s"] > 0
        assert summary["rounds_s"] == [r["wall_time_s"] for r in rounds]
        per_call = summary["per_call_s"]
        assert all(per_call[p] >= 0 for p in gpu_check.PHASES) and 0 < per_call["steps"] <= per_call["train"]
        # a call's phases add up to more than its training, and it fits within its round
        assert per_call["train"] < summary["per_call_total_s"] < summary["later_rounds_mean_s"]
        assert summary["train_tokens_per_s"] > 0 and summary["train_tokens_per_call"] > 0
        assert summary["seconds_per_base_model_load"] > 0
        assert all(loss > 0 for loss in summary["train_loss"])
        if not torch.cuda.is_available():
            assert summary["peak_vram_mb_per_client"] is None and "GPU" in summary["peak_vram_mb_per_client_why_null"]
            assert variant["gpu_samples"]["peak_card_memory_used_mb"] is None and variant["gpu_samples"]["why_null"]

    cached, precision, uncached = (report["variants"][name]["summary"] for name in DEFAULT_VARIANTS)
    # the CPU runs all clients in one worker: the cache loads the base model once per run, no cache every call
    summaries = json.dumps([cached, precision, uncached], indent=1)
    assert cached["client_base_model_loads"] == precision["client_base_model_loads"] == 1, summaries
    assert uncached["client_base_model_loads"] == 4, summaries
    # a cache hit is a dict look-up (~1e-5 s), a rebuild of the 4-bit tiny model ~0.3 s
    assert cached["per_call_s"]["model"] < uncached["per_call_s"]["model"] / 3, summaries
    assert report["variants"]["cache-on/bfloat16"]["compute_dtype"] == "bfloat16"

    evaluation = report["evaluation"]
    assert evaluation["batch_size"] == 32 and evaluation["quantization"] == 4 and "random" in evaluation["note"]
    fast, protocol = evaluation["modes"]["fast"], evaluation["modes"]["protocol"]
    assert fast["examples"] == protocol["examples"] == 32
    assert fast["stopped_early"] is None and protocol["stopped_early"] is None
    assert 0 < fast["decode_steps_per_batch"] <= 8
    # one batch, no EOS from random weights: protocol generates until prompt + answer fill 512 tokens
    assert protocol["decode_steps_per_batch"] == 512 - evaluation["prompt_tokens_max"]
    assert all(m["examples_per_s"] > 0 and m["generated_tokens_per_s"] > 0 for m in (fast, protocol))
    assert all(name in report["table_markdown"] for name in DEFAULT_VARIANTS)
    assert "protocol" in log and str(output) in log
    assert not processes_with_env("FLWR_HOME", report["flwr_home"])  # SuperLink, simulation, workers: all gone


DOC_ROWS = {  # row label in docs/performance.md -> summary figure and its format
    "round 2 (s)": ("later_rounds_mean_s", "{:.1f}"),
    "per client call, round 2 (s): 10 optimizer steps": ("steps", "{:.1f}"),
    "training tokens/s": ("train_tokens_per_s", "{:,.0f}"),
    "peak VRAM per client, `torch.cuda.max_memory_allocated` (MB)": ("peak_vram_mb_per_client", "{:,.0f}"),
}


def doc_section(doc: str, heading: str) -> str:
    """The text under `### heading`, up to the next heading, with line breaks and runs of spaces as one space."""
    start = doc.index(f"### {heading}\n")
    return " ".join(doc[start:doc.find("\n#", start + 1)].split())


def assert_rows(section: str, summaries: list[dict]) -> None:
    for label, (key, form) in DOC_ROWS.items():
        values = [s["per_call_s"].get(key, s.get(key)) for s in summaries]
        assert f"| {label} | " + " | ".join(form.format(v) for v in values) + " |" in section, label


def committed_report(name: str, gpu: str) -> dict:
    report = json.loads((REPO_ROOT / "benchmarks" / "results" / name).read_text())
    assert report["complete"] and report["machine"]["gpu"] == gpu
    assert report["settings"]["num_supernodes"] == 50 and report["settings"]["max_steps"] == 10
    return report


def bf16_speedup(summaries: list[dict]) -> str:
    """How many times as fast bfloat16's optimizer steps ran as float32's (the first two summaries), as quoted."""
    return f"{summaries[0]['per_call_s']['steps'] / summaries[1]['per_call_s']['steps']:.1f}"


def peak_gb(summaries: list[dict]) -> str:
    return f"{max(s['peak_vram_mb_per_client'] for s in summaries) / 1000:.1f} GB"


def test_the_gpu_figures_in_the_performance_doc_are_the_committed_reports():
    """docs/performance.md quotes benchmarks/results/gpu_check_h100.json and gpu_check_h200*.json, and the README
    their speed-up and memory; a rerun that replaces a report must update both."""
    doc = (REPO_ROOT / "docs" / "performance.md").read_text()
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())

    h100 = committed_report("gpu_check_h100.json", "NVIDIA H100 80GB HBM3")
    section = doc_section(doc, "Measured on one NVIDIA H100")
    assert f"It took **{h100['total_seconds']:.0f} s** in all" in section
    assert h100["variants"]["cache-off/bfloat16"]["status"] == "skipped"  # the doc says so
    summaries = [h100["variants"][name]["summary"] for name in ("cache-on/float32", "cache-on/bfloat16")]
    assert_rows(section, summaries)
    assert all(s["per_call_s"]["model"] == 0.0 for s in summaries)  # the cache at work
    loads = " | ".join(f"{s['seconds_per_base_model_load']:.2f}" for s in summaries)
    assert f"| first call in a worker (s): base model load, 4-bit quantization, set adapter | {loads} |" in section
    assert f"ran the optimizer steps {bf16_speedup(summaries)} times as fast" in section
    assert f"About {peak_gb(summaries)} of GPU memory per client" in section
    h100_summaries = summaries
    fast, protocol = (h100["evaluation"]["modes"][mode] for mode in ("fast", "protocol"))
    assert f"fast mode {fast['examples']} examples in {fast['seconds']:.1f} s, {fast['examples_per_s']:.1f}" in section
    assert f"protocol mode {protocol['examples_per_s']:.2f} examples/s ({protocol['examples']} examples" in section

    full = committed_report("gpu_check_h200.json", "NVIDIA H200")
    cache_off = committed_report("gpu_check_h200_cache_off.json", "NVIDIA H200")
    section = doc_section(doc, "Measured on one NVIDIA H200")
    assert f"took **{full['total_seconds']:.0f} s**" in section
    summaries = [full["variants"]["cache-on/float32"]["summary"], full["variants"]["cache-on/bfloat16"]["summary"],
                 cache_off["variants"]["cache-off/bfloat16"]["summary"]]
    assert_rows(section, summaries)
    assert summaries[0]["per_call_s"]["model"] == summaries[1]["per_call_s"]["model"] == 0.0
    assert f"the optimizer steps ran {bf16_speedup(summaries)} times as fast" in section
    assert f"One client needs about {peak_gb(summaries)} of GPU memory" in section
    assert (f"trained {bf16_speedup(h100_summaries)} times as fast as the default on an H100 and "
            f"{bf16_speedup(summaries)} times on an H200") in readme
    assert f"peaked at {peak_gb(h100_summaries)} per client on an H100 and {peak_gb(summaries)} on an H200" in readme
    assert ("| per client call, round 2 (s): model load + set adapter | 0.000 | 0.000 | "
            f"{summaries[2]['per_call_s']['model']:.2f} |") in section
    fast = [r["evaluation"]["modes"]["fast"] for r in (full, cache_off)]
    assert " | ".join(f"{m['seconds']:.1f} s, {m['examples_per_s']:.1f} examples/s" for m in fast) in section
