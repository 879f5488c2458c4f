"""The strategies the app offers: one entry each, a Flower strategy and the run-config values it takes.

Adding a strategy is one entry here plus its keys in `config.StrategyConfig`; `strategy.build_strategy`
puts the communication tracking and reply checks in front of whichever Flower class the entry names.
Kept free of heavy imports (the class is named, not imported) so the config can take its allowed
`strategy.name` values from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StrategyEntry:
    """A class of `flwr.serverapp.strategy`, and its keyword arguments from a `StrategyConfig`."""

    flower_class: str
    options: Callable[[Any], dict[str, Any]]
    help: str


STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry("FedAvg", lambda c: {}, "FedAvg over LoRA adapters (the template's strategy)"),
    "fedprox": StrategyEntry(
        "FedProx", lambda c: {"proximal_mu": c.proximal_mu},
        "FedAvg on the server; clients add the proximal term mu/2 * ||w - w_global||^2 to their loss"),
    "fedadam": StrategyEntry(
        "FedAdam",
        lambda c: {"eta": c.fedadam_eta, "beta_1": c.fedadam_beta_1, "beta_2": c.fedadam_beta_2, "tau": c.fedadam_tau},
        "an Adam step on the server with the averaged update as pseudo-gradient"),
    "fedavgm": StrategyEntry(
        "FedAvgM",
        lambda c: {"server_learning_rate": c.fedavgm_server_learning_rate,
                   "server_momentum": c.fedavgm_server_momentum},
        "server-side momentum on the averaged update"),
}
