"""Synthetic finance-sentiment text whose label follows from the words, for offline runs.

Nothing here is real market data. Each sentence is "<company> <polarity phrase> <filler>";
the phrase alone decides the label, so a model that learns the task can reach ~100% on
held-out sentences about companies it never saw. The shipped sample
(`data/fingpt_sentiment_sample.jsonl`) and the tests' fixtures are generated here.
"""

from __future__ import annotations

import json
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
