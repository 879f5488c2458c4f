"""The learning proof, reduced: the real app (`flwr run`, 50 SuperNodes) makes a model learn.

A tiny base pre-trained on random labels scores near chance on held-out sentences about
unseen companies; after federated LoRA training with the aligned prompt the real
evaluation (protocol mode) must score at least THRESHOLD. The full-size version with the
alpaca/answer and strategy comparisons is `benchmarks/learning_proof.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flowertune_finance.dev import proof, synthetic

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 0
THRESHOLD = 0.80  # measured after training: docs/learning-proof.md gives the spread over seeds
CHANCE_CEILING = 0.60  # the base knows the answer format, not the mapping


@pytest.mark.slow
def test_federated_lora_learns_the_heldout_task(flwr_env, tmp_path):
    size = proof.SIZES["ci"]
    base = tmp_path / "base"
    proof.pretrain_tiny_base(
        base, hidden_size=size.hidden_size, num_layers=size.num_layers, steps=size.pretrain_steps,
        learning_rate=size.pretrain_learning_rate, batch_size=size.pretrain_batch_size, seed=SEED,
    )
    train_file = proof.write_training_file(tmp_path / "train.jsonl", size.train_rows, SEED)
    eval_dir = synthetic.write_eval_sets(tmp_path / "eval", size.eval_rows, SEED, datasets=("fpb",))

    before = proof.score_heldout(base, None, eval_dir, tmp_path / "scores", "base")
    config = proof.proof_run_config(base, train_file, tmp_path / "runs", size.rounds, "answer", "fedavg")
    # The session's SuperLink, whose workers run with one torch thread (conftest.py): on a busy 2-core machine
    # two threads thrash (measured 45 s vs 8 s per round); for this tiny model one is as fast.
    _, checkpoint = proof.train_federated(REPO_ROOT, config, flwr_env, timeout=900)
    after = proof.score_heldout(base, checkpoint, eval_dir, tmp_path / "scores", "after")
    samples = proof.sample_generations(base, checkpoint, eval_dir)

    assert checkpoint.name == f"peft_{size.rounds}"
    assert before["counts"]["fpb"] == after["counts"]["fpb"] == size.eval_rows // 4
    assert before["fpb"] <= CHANCE_CEILING, f"the base model already knows the mapping: {before['fpb']:.3f}"
    assert after["fpb"] >= THRESHOLD, f"held-out accuracy {after['fpb']:.3f} < {THRESHOLD} after federated training"
    # it answers with a label, rather than babbling text the parser would call "neutral"
    assert all(sample["answer"].strip() in synthetic.LABELS for sample in samples), samples
