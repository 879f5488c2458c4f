"""`submit`: the leaderboard bundle, and every run or evaluation it must refuse instead of bundling.

The real smoke run checks that what the ServerApp writes passes; the refusals use a small run
folder written directly (run config, metrics, a real `save_checkpoint` adapter), built once per
module and copied per test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from flowertune_finance import cli
from flowertune_finance.checkpoint import save_checkpoint
from flowertune_finance.dev import launch
from flowertune_finance.generation import file_sha256
from flowertune_finance.metrics import METRICS_FILE, read_metrics
from flowertune_finance.tools.provenance import app_defaults
from flowertune_finance.tools.submit import SubmissionError, build_submission

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCURACIES = {"fpb": 0.5, "fiqa": 0.25, "tfns": 0.75}
ROUNDS = 3


def _write_accuracies(eval_dir: Path, run_name: str = "smoke") -> None:
    eval_dir.mkdir(parents=True, exist_ok=True)
    for dataset, accuracy in ACCURACIES.items():
        (eval_dir / f"acc_{dataset}_{run_name}.txt").write_text(f"Accuracy: {accuracy}. ")


def _write_summary(eval_dir: Path, checkpoint: Path | None, **fields) -> Path:
    """What `eval` records next to its accuracy files."""
    summary = {
        "mode": "protocol", "quantization": 4, "batch_size": 32, "base_model": "mistralai/Mistral-7B-v0.3",
        "peft_path": str(checkpoint) if checkpoint else None,
        "adapter_sha256": file_sha256(checkpoint / "adapter_model.safetensors") if checkpoint else None,
        "counts": {"fpb": 1212, "fiqa": 304, "tfns": 2388}, "limit": None, **ACCURACIES, **fields,
    }
    path = eval_dir / "summary_smoke.json"
    path.write_text(json.dumps(summary))
    return path


def _round(number: int, **fields) -> dict:
    return {"round": number, "num_supernodes": 50, "clients_sampled": 5, "clients_replied": 5, "clients_failed": 0,
            "clients_rejected": 0, "clients_accepted": 5, "round_skipped": False, "train_loss": 1.0,
            "mb_sent": 10.0, "mb_received": 10.0, "cumulative_mb": 20.0 * number, **fields}


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def written_run(tmp_path_factory) -> Path:
    """A finished 3-round run folder as the ServerApp leaves it, with evaluation files; read-only."""
    root = tmp_path_factory.mktemp("written")
    run_dir = root / "run"
    run_dir.mkdir()
    config = {**app_defaults(REPO_ROOT), **launch.smoke_run_config(REPO_ROOT, root / "tiny-model", rounds=ROUNDS)}
    (run_dir / "run_config.json").write_text(json.dumps(config))
    _write_metrics(run_dir, [_round(n) for n in range(1, ROUNDS + 1)])
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    generator = torch.Generator().manual_seed(0)
    for number in (2, ROUNDS):
        adapter = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=generator),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)}
        save_checkpoint(run_dir, number, adapter, lora, {"run_uid": "written"})
    _write_accuracies(root / "benchmarks")
    return root


@pytest.fixture
def run(written_run, tmp_path) -> tuple[Path, Path]:
    """A private copy of the written run: (run folder, evaluation folder)."""
    shutil.copytree(written_run, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run", tmp_path / "benchmarks"


def _submit(run_dir: Path, eval_dir: Path, **options) -> Path:
    return build_submission(run_dir, eval_dir=eval_dir, app_dir=REPO_ROOT, **options)


def _refused(run_dir: Path, eval_dir: Path, **options) -> str:
    """The refusal's message; nothing may have been written."""
    with pytest.raises(SubmissionError) as refused:
        _submit(run_dir, eval_dir, run_name="smoke", **options)
    assert not (run_dir / "submission").exists()
    assert not list(run_dir.glob(".submission*"))
    return str(refused.value)


def test_submit_assembles_the_leaderboard_bundle_and_never_overwrites(smoke_run, tmp_path, capsys):
    run_dir = Path(shutil.copytree(smoke_run[1], tmp_path / "run"))
    eval_dir = tmp_path / "benchmarks"
    _write_accuracies(eval_dir)
    args = ["submit", str(run_dir), "--eval-dir", str(eval_dir), "--app-dir", str(REPO_ROOT)]
    assert cli.main(args) == 0
    folder = run_dir / "submission"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / "peft_3" / name).read_bytes() == (run_dir / "peft_3" / name).read_bytes()
    assert sorted(p.name for p in folder.glob("acc_*.txt")) == [f"acc_{d}_smoke.txt" for d in ("fiqa", "fpb", "tfns")]
    text = (folder / "SUBMISSION.md").read_text()
    communication = read_metrics(run_dir)[-1]["cumulative_mb"]
    model = json.loads((run_dir / "run_config.json").read_text())["model.name"]
    assert f"| 50.00 | 25.00 | 75.00 | 50.00 | {communication:,.2f} | 3 | {model} | fedavg |" in text
    assert "| `num-server-rounds` | `200` | `3` |" in text
    assert "| `model.quantization` | `4` | `0` |" in text
    assert "static section kept: `static.dataset.name` = `flwrlabs/fingpt-sentiment-train`" in text
    assert "50 SuperNodes connected in every round (1..3)" in text
    assert "official evaluation script's files" in text and "provenance not recorded" in text
    before = (folder / "SUBMISSION.md").stat().st_mtime_ns
    assert cli.main(args) == 1
    assert "already exists" in capsys.readouterr().err
    assert (folder / "SUBMISSION.md").stat().st_mtime_ns == before


def test_submit_with_evals_summary_verifies_and_records_its_provenance(run, capsys):
    run_dir, _ = run
    eval_dir = run_dir / "eval"  # eval's own folder for a run's checkpoint: the default
    _write_accuracies(eval_dir)
    _write_summary(eval_dir, run_dir / "peft_3")
    assert cli.main(["submit", str(run_dir), "--app-dir", str(REPO_ROOT)]) == 0, capsys.readouterr().err
    folder = run_dir / "submission"
    text = (folder / "SUBMISSION.md").read_text()
    sha = file_sha256(run_dir / "peft_3" / "adapter_model.safetensors")
    assert "mode `protocol`, 4-bit quantization, batch size 32, base model `mistralai/Mistral-7B-v0.3`" in text
    assert f"scored adapter sha256 `{sha}` = the submitted `peft_3/adapter_model.safetensors` (verified)" in text
    assert "- every example of each set scored (fpb 1,212, fiqa 304, tfns 2,388; verified)" in text
    assert "provenance not recorded" not in text
    assert f"in `{eval_dir}`" in text
    assert json.loads((folder / "summary_smoke.json").read_text())["adapter_sha256"] == sha
    assert sorted(p.name for p in folder.glob("acc_*.txt")) == [f"acc_{d}_smoke.txt" for d in ("fiqa", "fpb", "tfns")]


def test_submit_without_summary_marks_the_official_scripts_files(run, monkeypatch):
    run_dir, eval_dir = run
    monkeypatch.chdir(eval_dir.parent)  # no RUN_DIR/eval: the default is ./benchmarks
    text = (build_submission(run_dir, app_dir=REPO_ROOT) / "SUBMISSION.md").read_text()
    assert "accuracies from the official evaluation script's files" in text
    assert "provenance not recorded" in text
    sha = file_sha256(run_dir / "peft_3" / "adapter_model.safetensors")
    assert f"submitted adapter `peft_3/adapter_model.safetensors`: sha256 `{sha}`" in text
    assert "| 50.00 | 25.00 | 75.00 | 50.00 | 60.00 | 3 |" in text


def _drop_tfns_accuracy(run_dir: Path, eval_dir: Path) -> None:
    (eval_dir / "acc_tfns_smoke.txt").unlink()


def _change_static_dataset(run_dir: Path, eval_dir: Path) -> None:
    config = json.loads((run_dir / "run_config.json").read_text())
    config["static.dataset.name"] = "someone/else"
    (run_dir / "run_config.json").write_text(json.dumps(config))


def _record_49_supernodes(run_dir: Path, eval_dir: Path) -> None:
    _write_metrics(run_dir, [{**r, "num_supernodes": 49} for r in read_metrics(run_dir)])


def _drop_last_round(run_dir: Path, eval_dir: Path) -> None:
    lines = (run_dir / METRICS_FILE).read_text().splitlines(keepends=True)
    (run_dir / METRICS_FILE).write_text("".join(lines[:-1]))
    shutil.rmtree(run_dir / "peft_3")


def _corrupt_accuracy(run_dir: Path, eval_dir: Path) -> None:
    (eval_dir / "acc_fpb_smoke.txt").write_text("Accuracy: 83.16. ")


def _fast_mode(run_dir: Path, eval_dir: Path) -> None:
    _write_summary(eval_dir, run_dir / "peft_3", mode="fast")


def _quantization_8(run_dir: Path, eval_dir: Path) -> None:
    _write_summary(eval_dir, run_dir / "peft_3", quantization=8)


def _other_checkpoints_numbers(run_dir: Path, eval_dir: Path) -> None:
    _write_summary(eval_dir, run_dir / "peft_2")


def _bare_base_models_numbers(run_dir: Path, eval_dir: Path) -> None:
    _write_summary(eval_dir, None)


def _part_of_the_sets(run_dir: Path, eval_dir: Path) -> None:
    _write_summary(eval_dir, run_dir / "peft_3", counts={"fpb": 100, "fiqa": 100, "tfns": 100}, limit=100)


def _summary_disagrees(run_dir: Path, eval_dir: Path) -> None:
    _write_summary(eval_dir, run_dir / "peft_3", fpb=0.9)


def _corrupt_summary(run_dir: Path, eval_dir: Path) -> None:
    (eval_dir / "summary_smoke.json").write_text('{"mode": "protocol", "quantiz')


def _skipped_round(run_dir: Path, eval_dir: Path) -> None:
    _write_metrics(run_dir, [_round(1), _round(2, round_skipped=True, clients_accepted=0), _round(3)])


def _zero_accepted(run_dir: Path, eval_dir: Path) -> None:
    _write_metrics(run_dir, [_round(1, clients_accepted=0, round_skipped=None), _round(2), _round(3)])


def _truncated_metrics_line(run_dir: Path, eval_dir: Path) -> None:
    text = (run_dir / METRICS_FILE).read_text()
    (run_dir / METRICS_FILE).write_text(text[:-25])  # a crash mid-write of the last line


def _corrupt_run_config(run_dir: Path, eval_dir: Path) -> None:
    (run_dir / "run_config.json").write_text('{"num-server-rounds": 3, ')


def _binary_accuracy_file(run_dir: Path, eval_dir: Path) -> None:
    (eval_dir / "acc_fiqa_smoke.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")


def _missing_weights(run_dir: Path, eval_dir: Path) -> None:
    (run_dir / "peft_3" / "adapter_model.safetensors").unlink()


def _corrupt_adapter_config(run_dir: Path, eval_dir: Path) -> None:
    (run_dir / "peft_3" / "adapter_config.json").write_bytes(b"\xff\x00{")


def _run_state_not_a_mapping(run_dir: Path, eval_dir: Path) -> None:
    (run_dir / "peft_3" / "run_state.json").write_text("[3]")


def _truncated_accuracy(run_dir: Path, eval_dir: Path) -> None:
    (eval_dir / "acc_tfns_smoke.txt").write_text("Accuracy: 0.7")  # "Accuracy: 0.75. " cut short


def _adapter_config_not_peft(run_dir: Path, eval_dir: Path) -> None:
    (run_dir / "peft_3" / "adapter_config.json").write_text("[]")


def _empty_run_config(run_dir: Path, eval_dir: Path) -> None:
    (run_dir / "run_config.json").write_text("{}")


def _no_communication_recorded(run_dir: Path, eval_dir: Path) -> None:
    records = read_metrics(run_dir)
    del records[-1]["cumulative_mb"]
    _write_metrics(run_dir, records)


@pytest.mark.parametrize(
    ("break_run", "message"),
    [
        (_drop_tfns_accuracy, "acc_tfns_smoke.txt is missing"),
        (_change_static_dataset, "static section changed: 'static.dataset.name' = 'someone/else'"),
        (_record_49_supernodes, "requires 50 SuperNodes; 3 round(s) recorded num_supernodes = 49"),
        (_drop_last_round, "holds rounds 1..2 (2 lines), not 1..3"),
        (_corrupt_accuracy, "holds accuracy 83.16, outside [0, 1]"),
        (_fast_mode, "summary_smoke.json records mode 'fast': only mode 'protocol'"),
        (_quantization_8, "summary_smoke.json records quantization 8: the leaderboard scores with 4-bit"),
        (_other_checkpoints_numbers, "summary_smoke.json scored another checkpoint ("),
        (_bare_base_models_numbers, "summary_smoke.json scored the bare base model"),
        (_part_of_the_sets, "summary_smoke.json scored part of the sets (fpb 100, fiqa 100, tfns 100)"),
        (_summary_disagrees, "acc_fpb_smoke.txt holds 0.5 but summary_smoke.json records 0.9"),
        (_corrupt_summary, "summary_smoke.json is not valid JSON"),
        (_skipped_round, "round(s) 2 accepted no client reply"),
        (_zero_accepted, "round(s) 1 accepted no client reply"),
        (_truncated_metrics_line, "metrics.jsonl line(s) 3 are not JSON round records (truncated or corrupt)"),
        (_corrupt_run_config, "run_config.json is not valid JSON"),
        (_binary_accuracy_file, "acc_fiqa_smoke.txt is not a text file (not UTF-8)"),
        (_missing_weights, "peft_3 is incomplete: adapter_model.safetensors is missing"),
        (_corrupt_adapter_config, "peft_3 is corrupt"),
        (_run_state_not_a_mapping, "peft_3 is corrupt"),
        (_no_communication_recorded, "records cumulative_mb = None, not a number of MB"),
        (_truncated_accuracy, "acc_tfns_smoke.txt does not read 'Accuracy: <number>. '"),
        (_adapter_config_not_peft, "adapter_config.json is not a PEFT adapter config"),
        (_empty_run_config, "static section changed: 'static.dataset.name' = None"),
    ],
)
def test_submit_refuses_what_the_leaderboard_would_reject(run, break_run: Callable, message: str):
    run_dir, eval_dir = run
    break_run(run_dir, eval_dir)
    assert message in _refused(run_dir, eval_dir)


def test_other_checkpoints_numbers_name_both_checkpoints(run):
    run_dir, eval_dir = run
    _other_checkpoints_numbers(run_dir, eval_dir)
    text = _refused(run_dir, eval_dir)
    scored = file_sha256(run_dir / "peft_2" / "adapter_model.safetensors")[:12]
    submitted = file_sha256(run_dir / "peft_3" / "adapter_model.safetensors")[:12]
    assert f"({run_dir / 'peft_2'}, adapter sha256 {scored}...)" in text
    assert f"({run_dir / 'peft_3'}, sha256 {submitted}...)" in text


def test_every_problem_is_listed_together(run):
    run_dir, eval_dir = run
    _write_summary(eval_dir, run_dir / "peft_2", mode="fast", quantization=8, batch_size=1)
    _write_metrics(run_dir, [_round(1), *[_round(n, round_skipped=True, clients_accepted=0) for n in (2, 3)]])
    (run_dir / "run_config.json").write_text("[]")
    error = pytest.raises(SubmissionError, _submit, run_dir, eval_dir, run_name="smoke").value
    expected = ["holds a JSON list", "round(s) 2-3 accepted no client reply", "records mode 'fast'",
                "records quantization 8", "scored another checkpoint"]
    assert [any(part in problem for problem in error.problems) for part in expected] == [True] * len(expected)


def test_the_cli_lists_problems_without_a_traceback(run, capsys):
    run_dir, eval_dir = run
    _truncated_metrics_line(run_dir, eval_dir)
    _binary_accuracy_file(run_dir, eval_dir)
    _corrupt_summary(run_dir, eval_dir)
    args = ["submit", str(run_dir), "--eval-dir", str(eval_dir), "--app-dir", str(REPO_ROOT)]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot build a leaderboard submission from {run_dir}:\n  - ")
    assert "acc_fiqa_smoke.txt is not a text file" in err and "summary_smoke.json is not valid JSON" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["peft_3/submission", "peft_3", "peft_7", "peft_3/adapter/deeper"])
def test_output_inside_or_named_like_a_checkpoint_is_refused(run, where: str):
    run_dir, eval_dir = run
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises((SubmissionError, FileExistsError)) as refused:
        _submit(run_dir, eval_dir, output=run_dir / where)
    message = str(refused.value)
    if where == "peft_3":
        assert "already exists" in message
    elif where == "peft_7":
        assert "is named like a checkpoint folder (peft_<round>)" in message
    else:
        assert f"lies inside the checkpoint folder {run_dir / 'peft_3'}" in message
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_a_file_changed_while_copying_is_refused(run, monkeypatch):
    run_dir, eval_dir = run
    real_copy = shutil.copy2

    def copy_then_change(source, target):  # the evaluation folder is rewritten between check and copy
        real_copy(source, target)
        if Path(source).name == "acc_fpb_smoke.txt":
            Path(target).write_text("Accuracy: 0.9. ")

    monkeypatch.setattr("flowertune_finance.tools.submit.shutil.copy2", copy_then_change)
    assert f"{eval_dir / 'acc_fpb_smoke.txt'} changed while the submission was assembled" in _refused(run_dir, eval_dir)


def test_a_checkpoint_passed_as_the_run_folder_names_the_run_folder(run):
    run_dir, eval_dir = run
    with pytest.raises(SubmissionError, match=f"is a checkpoint folder; pass the run folder that holds it \\({run_dir}\\)"):
        _submit(run_dir / "peft_3", eval_dir)


def test_submit_cannot_guess_between_two_evaluations(run):
    run_dir, eval_dir = run
    (eval_dir / "acc_fpb_other.txt").write_text("Accuracy: 0.1. ")
    with pytest.raises(SubmissionError, match="pass --run-name"):
        _submit(run_dir, eval_dir)
    assert (_submit(run_dir, eval_dir, run_name="smoke") / "SUBMISSION.md").is_file()
