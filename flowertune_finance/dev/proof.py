"""The learning proof's pieces: a pre-trained tiny base model, its data, and its run config.

The question the proof answers on a CPU: does the whole chain (data partitions, prompt
format, client training, aggregation, checkpoint, evaluation) make a model learn? A
random tiny model cannot answer it (it never emits a label), so stage A pre-trains one
centrally, as a stand-in for a pretrained LLM: on label-free synthetic sentences and on
prompts in both formats followed by RANDOM labels. It learns the language and that a
label follows a prompt, not which label; it scores near chance. Stage B is the real app
(`flwr run`, 50 SuperNodes) training LoRA on labelled data; the real evaluation scores
held-out sentences about companies no training row mentions.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowertune_finance.checkpoint import latest_checkpoint
from flowertune_finance.dev import launch, synthetic, tiny
from flowertune_finance.prompts import format_completion, format_prompt, tokenize_prompt_then_label

PROMPT_INSTRUCTIONS = (synthetic.INSTRUCTION_NEWS, synthetic.INSTRUCTION_TWEET)


@dataclass(frozen=True)
class ProofSize:
    """How big the proof is: the base model, its pre-training, the federated run, the data."""

    hidden_size: int
    num_layers: int
    pretrain_steps: int
    pretrain_learning_rate: float
    pretrain_batch_size: int
    rounds: int
    train_rows: int
    eval_rows: int  # rows of the FPB-schema folder; the protocol scores its 25% test split


SIZES = {
    "full": ProofSize(hidden_size=128, num_layers=4, pretrain_steps=300, pretrain_learning_rate=3e-3,
                      pretrain_batch_size=32, rounds=20, train_rows=5000, eval_rows=1200),
    "ci": ProofSize(hidden_size=64, num_layers=2, pretrain_steps=150, pretrain_learning_rate=5e-3,
                    pretrain_batch_size=16, rounds=20, train_rows=5000, eval_rows=360),
}


def write_training_file(path: str | Path, num_rows: int, seed: int) -> Path:
    """Labelled training rows in the fingpt schema, plain labels only, about the training companies."""
    return synthetic.write_jsonl(synthetic.fingpt_rows(num_rows, seed, graded_share=0.0), Path(path))


def pretraining_examples(tokenizer, num_examples: int, seed: int) -> list[list[int]]:
    """Token ids for stage A: half label-free sentences, half prompts with a random label.

    The prompts are tokenized exactly as the app tokenizes training examples, in both
    prompt formats, so the base model knows the shape of an answer but not the mapping.
    """
    rng = random.Random(seed)
    companies = synthetic.TRAIN_COMPANIES + synthetic.HELD_OUT_COMPANIES
    texts = [text for text, _ in synthetic.sentences(num_examples, seed, companies=companies)]
    examples = []
    for i, text in enumerate(texts):
        if i % 2 == 0:
            examples.append(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
            continue
        prompt_format = "answer" if i % 4 == 1 else "alpaca"
        prompt = format_prompt(rng.choice(PROMPT_INSTRUCTIONS), text, prompt_format)
        completion = format_completion(rng.choice(synthetic.LABELS), prompt_format)
        examples.append(tokenize_prompt_then_label(tokenizer, prompt, completion, 10**9)["input_ids"])
    return examples


def _batches(examples: list[list[int]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled batches of right-padded ids with labels (-100 on padding)."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id)
            labels = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                labels[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            yield input_ids, mask, labels


def pretrain_tiny_base(
    output_dir: str | Path,
    hidden_size: int = 128,
    num_layers: int = 4,
    steps: int = 300,
    learning_rate: float = 3e-3,
    batch_size: int = 32,
    num_examples: int = 4000,
    seed: int = 0,
) -> dict[str, Any]:
    """Stage A: build a tiny Mistral, train all its weights on `pretraining_examples`, save it.

    Saved with `save_pretrained` (model + tokenizer), so the app and the evaluation load it
    by path like any hub model. Returns the settings and the first/last loss.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine two threads thrash (10x slower per step)
    try:
        return _pretrain(output_dir, hidden_size, num_layers, steps, learning_rate, batch_size, num_examples, seed)
    finally:
        torch.set_num_threads(threads)


def _pretrain(output_dir, hidden_size, num_layers, steps, learning_rate, batch_size, num_examples, seed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    tiny.build_tiny_model(output_dir, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
    examples = pretraining_examples(tokenizer, num_examples, seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    batches = _batches(examples, batch_size, tokenizer.eos_token_id, random.Random(seed))
    for _ in range(steps):
        input_ids, mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return {
        "hidden_size": hidden_size, "num_layers": num_layers, "steps": steps, "learning_rate": learning_rate,
        "batch_size": batch_size, "num_parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
    }


def proof_run_config(
    base_model: str | Path,
    data_file: str | Path,
    output_dir: str | Path,
    rounds: int = 20,
    prompt_format: str = "answer",
    strategy: str = "fedavg",
    **overrides: Any,
) -> dict[str, Any]:
    """Stage B's run config: the real app on the tiny base, unquantized, fresh data each round.

    The learning rate is that of a tiny model trained for a few steps (a 7B model wants
    ~1e-4); everything else about the app is its normal code path.
    """
    return {
        "model.name": str(base_model),
        "model.quantization": 0,
        "model.gradient-checkpointing": False,
        "model.lora.peft-lora-r": 16,
        "model.lora.peft-lora-alpha": 32,
        "model.lora.peft-lora-dropout": 0.0,
        "num-server-rounds": rounds,
        "dataset.path": str(data_file),
        "output.dir": str(output_dir),
        "strategy.name": strategy,
        "train.prompt-format": prompt_format,
        "train.dynamic-data-seed": True,
        "train.learning-rate-max": 1e-2,
        "train.learning-rate-min": 2e-3,
        "train.seq-length": 128,
        "train.save-every-round": rounds,
        "train.training-arguments.per-device-train-batch-size": 16,
        "train.training-arguments.max-steps": 5,
        "train.training-arguments.logging-steps": 5,
        "train.training-arguments.gradient-checkpointing": False,
        **overrides,
    }


def train_federated(
    app_dir: str | Path, run_config: Mapping[str, Any], env: Mapping[str, str], timeout: float = 1200
) -> tuple[launch.RunResult, Path]:
    """Stage B: the real app through `flwr run` with 50 SuperNodes; returns the final checkpoint."""
    output_dir = Path(run_config["output.dir"])
    before = set(output_dir.iterdir()) if output_dir.is_dir() else set()
    result = launch.run_app(app_dir, run_config, num_supernodes=launch.NUM_SUPERNODES, env=env, timeout=timeout)
    created = sorted(p for p in output_dir.iterdir() if p.is_dir() and p not in before)
    if len(created) != 1:
        raise RuntimeError(f"expected one new run folder under {output_dir}, found {len(created)}")
    return result, latest_checkpoint(created[0]).path


def score_heldout(
    base_model: str | Path, peft_path: str | Path | None, data_dir: str | Path, output_dir: str | Path, run_name: str
) -> dict[str, Any]:
    """The real evaluation (protocol mode, unquantized tiny model) on the held-out FPB-schema set."""
    from flowertune_finance.tools.evaluate import evaluate_adapter

    return evaluate_adapter(
        str(base_model), None if peft_path is None else str(peft_path), datasets=("fpb",), data_dir=str(data_dir),
        mode="protocol", batch_size=32, quantization=0, output_dir=str(output_dir), run_name=run_name,
    )


def sample_generations(
    base_model: str | Path, peft_path: str | Path | None, data_dir: str | Path, count: int = 6
) -> list[dict[str, str]]:
    """A few raw generations with their gold label: the parse rule maps garbage to "neutral",
    so accuracy alone cannot tell a model that answers from one that babbles."""
    from flowertune_finance.generation import load_model
    from flowertune_finance.scoring import answer_text, generate_answers, load_eval_set

    eval_set = load_eval_set("fpb", str(data_dir), limit=count)
    model, tokenizer = load_model(str(base_model), None if peft_path is None else str(peft_path), quantization=0)
    generations = generate_answers(model, tokenizer, eval_set.prompts, batch_size=count, mode="protocol")
    return [{"answer": answer_text(text), "gold": gold} for text, gold in zip(generations, eval_set.targets)]
