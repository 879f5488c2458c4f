"""Accuracy levers: aligned prompt, fresh data each round, Flower strategies, FedProx's loss term."""

from __future__ import annotations

import pytest
import torch
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from flowertune_finance import models, training
from flowertune_finance.config import ConfigError, ModelConfig, StrategyConfig, parse_run_config
from flowertune_finance.dataset import load_partition
from flowertune_finance.dev import synthetic
from flowertune_finance.prompts import format_completion, format_prompt
from flowertune_finance.strategy import build_strategy

INSTRUCTION = synthetic.INSTRUCTION_NEWS
TEXT = "Aurora Mills reported a quarterly loss."


@pytest.mark.parametrize(
    ("prompt_format", "prompt", "completion"),
    [
        ("answer", f"Instruction: {INSTRUCTION}\nInput: {TEXT}\nAnswer: ", "negative"),
        (
            "alpaca",
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n### Instruction:\n{INSTRUCTION} {TEXT}\n### Response:",
            " negative",
        ),
    ],
)
def test_prompt_formats_produce_the_expected_strings(prompt_format, prompt, completion):
    assert format_prompt(INSTRUCTION, TEXT, prompt_format) == prompt
    assert format_completion("negative", prompt_format) == completion


def test_unknown_prompt_format_is_a_clear_error():
    message = r"'train.prompt-format' = 'chatml' is not allowed; allowed: alpaca or answer"
    with pytest.raises(ConfigError, match=message):
        parse_run_config({"train.prompt-format": "chatml"})


@pytest.fixture
def sample_file(tmp_path):
    return synthetic.write_jsonl(synthetic.fingpt_rows(300, seed=5, graded_share=0.0), tmp_path / "rows.jsonl")


def test_answer_format_trains_on_the_evaluation_prompt_tokens_and_only_the_label(tiny_model, sample_file):
    """The client's own pipeline (tokenized partition + SFTTrainer's collator) on the answer format:
    the context is token for token what the evaluator feeds, and only label + EOS carry loss."""
    from flowertune_finance.proximal import ProximalSFTTrainer

    config = parse_run_config({
        "model.name": str(tiny_model), "model.quantization": 0, "model.gradient-checkpointing": False,
        "dataset.path": str(sample_file), "train.prompt-format": "answer", "train.seq-length": 128,
        "train.training-arguments.per-device-train-batch-size": 6,
    })
    examples, *_, tokenizer = training.tokenized_partition(config, partition_id=3, num_partitions=50)
    rows = load_partition(3, 50, config.dataset_name, config.dataset_path).select(range(6))
    model = models.cached_peft_model(config.model)
    trainer = ProximalSFTTrainer(
        model=model, args=training.sft_config(config, 1e-3, "unused", 1), train_dataset=examples.select(range(6)),
        processing_class=tokenizer, proximal_mu=0.0,
    )
    batch = trainer.data_collator([examples[i] for i in range(6)])
    for row, ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
        evaluation_ids = tokenizer(format_prompt(row["instruction"], row["input"], "answer"))["input_ids"]
        assert ids[: len(evaluation_ids)] == evaluation_ids
        assert labels[: len(evaluation_ids)] == [-100] * len(evaluation_ids)
        trained = [label for label in labels if label != -100]
        assert trained == tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[len(evaluation_ids): len(evaluation_ids) + len(trained)] == trained


@pytest.mark.parametrize(
    ("run_config", "strategy_class", "attributes"),
    [
        ({}, FedAvg, {"fraction_train": 0.1, "fraction_evaluate": 0.0}),
        ({"strategy.name": "fedprox", "strategy.proximal-mu": 0.3}, FedProx, {"proximal_mu": 0.3}),
        (
            {"strategy.name": "fedadam", "strategy.fedadam.eta": 0.002, "strategy.fedadam.beta-1": 0.8,
             "strategy.fedadam.beta-2": 0.95, "strategy.fedadam.tau": 1e-4},
            FedAdam,
            {"eta": 0.002, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-4},
        ),
        (
            {"strategy.name": "fedavgm", "strategy.fedavgm.server-learning-rate": 0.5,
             "strategy.fedavgm.server-momentum": 0.7},
            FedAvgM,
            {"server_learning_rate": 0.5, "server_momentum": 0.7},
        ),
    ],
)
def test_strategy_names_build_flower_strategies_with_their_settings(run_config, strategy_class, attributes):
    strategy = build_strategy(parse_run_config(run_config).strategy)
    assert isinstance(strategy, strategy_class)
    for name, value in attributes.items():
        assert getattr(strategy, name) == pytest.approx(value), name


def test_strategy_defaults_are_documented_values():
    defaults = StrategyConfig()
    assert defaults.name == "fedavg"
    assert build_strategy(StrategyConfig(name="fedavgm")).server_learning_rate == 1.0  # Flower's own default
    adam = build_strategy(StrategyConfig(name="fedadam"))
    assert adam.eta == 1e-3 and adam.tau == 1e-3  # sized for LoRA deltas, not Flower's eta=0.1


def test_unknown_strategy_name_is_a_clear_error():
    allowed = "allowed: fedavg, fedprox, fedadam or fedavgm"
    with pytest.raises(ConfigError, match=rf"'strategy.name' = 'fedyogi' is not allowed; {allowed}"):
        parse_run_config({"strategy.name": "fedyogi"})
    with pytest.raises(ConfigError, match="'fedyogi' is not allowed"):
        build_strategy(StrategyConfig(name="fedyogi"))


def test_fedprox_term_grows_with_the_distance_from_the_global_adapter(tiny_model, sample_file):
    from datasets import Dataset
    from trl import SFTConfig

    from flowertune_finance.dataset import load_tokenizer, tokenize_partition
    from flowertune_finance.models import build_peft_model
    from flowertune_finance.proximal import ProximalSFTTrainer, proximal_term

    tokenizer = load_tokenizer(str(tiny_model))
    examples = tokenize_partition(
        Dataset.from_list(synthetic.fingpt_rows(4, seed=2)), tokenizer, "answer", seq_length=128
    )
    model = build_peft_model(ModelConfig(name=str(tiny_model), quantization=0, gradient_checkpointing=False,
                                         lora_dropout=0.0))
    args = SFTConfig(output_dir="unused", per_device_train_batch_size=4, use_cpu=True, bf16=False,
                     report_to="none", max_length=128)
    trainer = ProximalSFTTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer,
                                 proximal_mu=0.5)
    trainer.capture_global_weights()
    assert all("lora_" in name for name in trainer.global_weights)  # only the adapter, never the base
    batch = trainer.data_collator([examples[i] for i in range(4)])
    model.train()

    def losses() -> tuple[float, float]:
        trainer.proximal_mu = 0.5
        with_term = trainer.compute_loss(model, dict(batch)).item()
        trainer.proximal_mu = 0.0
        return with_term, trainer.compute_loss(model, dict(batch)).item()

    with_term, without = losses()
    assert with_term == pytest.approx(without)  # at the global weights the term is zero
    gaps = []
    for scale in (0.01, 0.05):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in trainer.global_weights:
                    param.copy_(trainer.global_weights[name] + scale)
        with_term, without = losses()
        distance = proximal_term(model, trainer.global_weights).item()
        assert with_term - without == pytest.approx(0.5 / 2 * distance, rel=1e-4)
        gaps.append(with_term - without)
    assert 0 < gaps[0] < gaps[1]
