"""The FlowerTune LLM Leaderboard (Finance): its rules and its evaluation's facts, in one place.

Everything here is fixed by the leaderboard or by its official evaluation script
(`benchmarks/flowertune-llm/evaluation/finance` in the Flower repository); nothing here is a
choice of this app. It imports nothing of the package, so any module may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Training rules
STATIC_DATASET_NAME = "flwrlabs/fingpt-sentiment-train"  # `[tool.flwr.app.config.static]`
NUM_SUPERNODES = 50  # one IID partition each
COMMUNICATION_BUDGET_MB = 200_000.0  # every ArrayRecord sent and received over the whole run
QUANTIZATION = 4  # submitted numbers come from the official script with --quantization=4

# The official evaluation
DATASETS = ("fpb", "fiqa", "tfns")
SET_SIZES = {"fpb": 1212, "fiqa": 304, "tfns": 2388}  # test examples scored per set
INSTRUCTION = "What is the sentiment of this {}? Please choose an answer from {{negative/neutral/positive}}."
SPLIT_SEED = 42  # train_test_split(0.25, seed=42) for FPB and FiQA
TEST_SIZE = 0.25
MAX_LENGTH = 512  # tokenizer(max_length=...) and generate(max_length=...): prompt and answer together
SEED = 2024  # torch.manual_seed before loading (the [PAD] embedding row is sampled)
FPB_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}


@dataclass(frozen=True)
class Source:
    """Where a set lives on the hub, and which splits/columns the protocol reads."""

    hub_id: str
    config: str | None
    splits: tuple[str, ...]
    columns: tuple[str, ...]


SOURCES = {
    "fpb": Source("takala/financial_phrasebank", "sentences_50agree", ("train",), ("sentence", "label")),
    "fiqa": Source("pauri32/fiqa-2018", None, ("train", "validation", "test"),
                   ("sentence", "snippets", "target", "sentiment_score", "aspects", "format", "label")),
    "tfns": Source("zeroshot/twitter-financial-news-sentiment", None, ("validation",), ("text", "label")),
}


def fiqa_label(score: float) -> str:
    """FiQA's score to a label word: < -0.1 negative, < 0.1 neutral, else positive."""
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def parse_label(text: str) -> str:
    """The official rule: positive if the text says so, else negative if it says so, else neutral."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"
