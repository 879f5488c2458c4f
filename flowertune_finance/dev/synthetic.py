"""Synthetic finance-sentiment text whose label follows from the words, for offline runs.

Nothing here is real market data. Each sentence is "<company> <polarity phrase> <filler>";
the phrase alone decides the label, so a model that learns the task can reach ~100% on
held-out sentences about companies it never saw. The shipped sample
(`data/fingpt_sentiment_sample.jsonl`) and the tests' fixtures are generated here.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

LABELS = ("negative", "neutral", "positive")

INSTRUCTION_NEWS = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
INSTRUCTION_TWEET = "What is the sentiment of this tweet? Please choose an answer from {negative/neutral/positive}."
INSTRUCTION_GRADED = (
    "What is the sentiment of this news? Please choose an answer from {strong negative/moderately negative/"
    "mildly negative/neutral/mildly positive/moderately positive/strong positive}."
)

PHRASES = {
    "positive": (
        "reported record quarterly profit", "raised its full-year guidance", "beat analyst expectations",
        "won a major supply contract", "announced a higher dividend", "saw revenue jump sharply",
        "expanded its operating margin", "secured new long-term financing", "posted strong sales growth",
        "shares rallied after upbeat results", "cut debt ahead of schedule", "gained market share",
        "received an upgrade from analysts", "doubled its net income", "opened profitable new stores",
    ),
    "negative": (
        "reported a quarterly loss", "cut its full-year guidance", "missed analyst expectations",
        "lost a major customer contract", "suspended its dividend", "saw revenue fall sharply",
        "announced large job cuts", "faces a costly lawsuit", "posted weak sales",
        "shares slumped after poor results", "warned of lower profits", "lost market share",
        "was downgraded by analysts", "swung to a net loss", "closed unprofitable stores",
    ),
    "neutral": (
        "will publish its results next week", "appointed a new board member", "held its annual meeting",
        "moved its headquarters", "published its annual report", "kept its outlook unchanged",
        "renamed its retail division", "scheduled an investor call", "completed a planned reorganisation",
        "shares were little changed", "confirmed its meeting date", "updated its articles of association",
        "listed new bonds on the exchange", "named a new spokesperson", "signed a routine lease renewal",
    ),
}
GRADES = {"positive": ("mildly positive", "moderately positive", "strong positive"),
          "negative": ("mildly negative", "moderately negative", "strong negative"),
          "neutral": ("neutral",)}

TRAIN_COMPANIES = (
    "Alder Corp", "Birchwood Holdings", "Cobalt Mining", "Delta Freight", "Ember Energy", "Fjord Shipping",
    "Granite Bank", "Harbor Foods", "Ion Telecom", "Juniper Retail", "Kestrel Air", "Lumen Pharma",
    "Maple Insurance", "Nordic Paper", "Onyx Steel", "Pine Software", "Quartz Media", "Raven Motors",
    "Summit Chemicals", "Tundra Oil", "Umbra Textiles", "Vertex Logistics", "Willow Health", "Xenon Labs",
)
HELD_OUT_COMPANIES = (
    "Aurora Mills", "Basalt Capital", "Cedar Brewing", "Dune Solar", "Elm Robotics", "Falcon Cement",
    "Glacier Water", "Helix Biotech", "Iris Optics", "Jasper Gaming", "Krypton Cables", "Lotus Hotels",
)
FILLERS = ("", "on Monday", "in Helsinki", "according to a statement", "this quarter", "in early trading",
           "the company said", "analysts noted", "in its latest filing", "for the period")


def sentences(n: int, seed: int, companies: Sequence[str] = TRAIN_COMPANIES) -> Iterator[tuple[str, str]]:
    """Yield `n` (sentence, label) pairs with labels balanced over negative/neutral/positive."""
    rng = random.Random(seed)
    for i in range(n):
        label = LABELS[i % 3]
        filler = rng.choice(FILLERS)
        text = f"{rng.choice(companies)} {rng.choice(PHRASES[label])}{' ' + filler if filler else ''}."
        yield text, label


def fingpt_rows(n: int, seed: int, graded_share: float = 0.2) -> list[dict[str, str]]:
    """Rows in the `flwrlabs/fingpt-sentiment-train` schema: instruction, input, output."""
    rng = random.Random(seed + 1)
    rows = []
    for text, label in sentences(n, seed):
        if rng.random() < graded_share:
            rows.append({"instruction": INSTRUCTION_GRADED, "input": text, "output": rng.choice(GRADES[label])})
        else:
            instruction = INSTRUCTION_TWEET if rng.random() < 0.4 else INSTRUCTION_NEWS
            rows.append({"instruction": instruction, "input": text, "output": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Sequence[dict], path: Path) -> Path:
    """Write rows as JSON lines (the format `dataset.path` accepts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


EVAL_SETS = ("fpb", "fiqa", "tfns")
TFNS_LABEL_IDS = {"negative": 0, "positive": 1, "neutral": 2}  # the hub's map, unlike FPB's 0/1/2 order
# FiQA scores per label, including the protocol's thresholds (-0.1 is neutral, 0.1 is positive).
FIQA_SCORES = {
    "negative": (-0.9, -0.55, -0.3, -0.1001),
    "neutral": (-0.1, -0.02, 0.0, 0.05, 0.0999),
    "positive": (0.1, 0.25, 0.6, 0.87),
}


def _fiqa_rows(n: int, seed: int, companies: Sequence[str]) -> dict[str, list]:
    rng = random.Random(seed + 2)
    rows: dict[str, list] = {key: [] for key in
                             ("sentence", "snippets", "target", "sentiment_score", "aspects", "format", "label")}
    for text, label in sentences(n, seed, companies):
        company = next(name for name in companies if text.startswith(name))
        rows["sentence"].append(text)
        rows["snippets"].append(str([text[len(company) + 1:].rstrip(".")]))
        rows["target"].append(company)
        rows["sentiment_score"].append(rng.choice(FIQA_SCORES[label]))
        rows["aspects"].append(str([rng.choice(("Corporate/Sales", "Stock/Price Action", "Corporate/Legal"))]))
        rows["format"].append(rng.choice(("post", "headline")))
        rows["label"].append(LABELS.index(label))
    return rows


def write_eval_sets(
    data_dir: str | Path,
    rows_per_set: int = 60,
    seed: int = 0,
    companies: Sequence[str] = HELD_OUT_COMPANIES,
    datasets: Sequence[str] = EVAL_SETS,
) -> Path:
    """Write offline stand-ins for the leaderboard's FPB, FiQA and TFNS as `save_to_disk` folders.

    Each `data_dir/<name>` has the hub data set's splits, columns and label encodings, so the
    evaluation code reads them exactly as it reads the real ones (`--data-dir`); the text is
    synthetic, so labels follow from the words. Existing folders are never overwritten.
    Prints each folder and how many test examples the protocol takes from it (FPB and FiQA:
    the 25% test split, rounded up as `train_test_split` does; TFNS: all of validation).
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    unknown = [name for name in datasets if name not in EVAL_SETS]
    if unknown:
        raise ValueError(f"unknown evaluation set(s) {', '.join(unknown)}; allowed: {', '.join(EVAL_SETS)}")
    if rows_per_set < 3:
        raise ValueError(f"rows_per_set = {rows_per_set} is too small; allowed: an integer >= 3")
    data_dir = Path(data_dir)
    taken = [str(data_dir / name) for name in datasets if (data_dir / name).exists()]
    if taken:
        raise FileExistsError(f"evaluation set folder(s) already exist, not overwriting: {', '.join(taken)}")

    def texts(n: int, offset: int) -> list[tuple[str, str]]:
        return list(sentences(n, seed * 1000 + offset, companies))

    test_examples = {"fpb": math.ceil(0.25 * rows_per_set), "fiqa": math.ceil(0.25 * rows_per_set),
                     "tfns": rows_per_set}
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()  # a save_to_disk bar per split says nothing here
    try:
        for name in datasets:
            if name == "fpb":
                rows = texts(rows_per_set, 1)
                features = Features({"sentence": Value("string"), "label": ClassLabel(names=list(LABELS))})
                splits = {"train": Dataset.from_dict(
                    {"sentence": [t for t, _ in rows], "label": [LABELS.index(lab) for _, lab in rows]},
                    features=features)}
            elif name == "fiqa":
                sizes = {"train": rows_per_set - 2 * (rows_per_set // 5), "validation": rows_per_set // 5,
                         "test": rows_per_set // 5}
                splits = {split: Dataset.from_dict(_fiqa_rows(size, seed * 1000 + 10 + i, companies))
                          for i, (split, size) in enumerate(sizes.items())}
            else:
                splits = {}
                for i, split in enumerate(("train", "validation")):
                    rows = texts(rows_per_set, 20 + i)
                    splits[split] = Dataset.from_dict(
                        {"text": [t for t, _ in rows], "label": [TFNS_LABEL_IDS[lab] for _, lab in rows]})
            DatasetDict(splits).save_to_disk(str(data_dir / name))
            print(f"wrote {data_dir / name}: {test_examples[name]} test examples under the protocol's split")
    finally:
        if not bars_were_off:
            enable_progress_bars()
    return data_dir
