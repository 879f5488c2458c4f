"""flowertune-finance: federated LoRA fine-tuning for the FlowerTune LLM Leaderboard (Finance).

Importing the package first filters a few known, harmless library messages at their source
(`quiet`), so both apps and the tools log only what matters.
"""

from flowertune_finance import quiet  # noqa: F401
