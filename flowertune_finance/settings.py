"""How a run-config key is declared: `setting(...)` makes a dataclass field that carries its key,
default, allowed values, check and help, so `config.py` states each key once and the checks, the
pyproject defaults test and the documentation table all read it from there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Spec:
    """What the run config says about one field: its key, what is allowed, and why it exists."""

    key: str
    help: str
    allowed: str
    check: Callable[[Any], bool] | None = None


def setting(key: str, default: Any, help: str, allowed: str = "", check: Callable[[Any], bool] | None = None) -> Any:
    """A dataclass field that is also a run-config key."""
    return field(default=default, metadata={"spec": Spec(key, help, allowed or _allowed_for(default), check)})


def _allowed_for(default: Any) -> str:
    """What a field of this default's type allows, when the declaration says nothing more."""
    return "true or false" if isinstance(default, bool) else f"a {type(default).__name__}"


def one_of(values: tuple) -> tuple[str, Callable[[Any], bool]]:
    """`allowed` text and check for a fixed set of values (spread into `setting`)."""
    names = [str(v) for v in values]
    return f"{', '.join(names[:-1])} or {names[-1]}", values.__contains__


def at_least(low: float, strict: bool = False) -> tuple[str, Callable[[Any], bool]]:
    return (f"a number > {low}", lambda v: v > low) if strict else (f"a number >= {low}", lambda v: v >= low)


def below_one() -> tuple[str, Callable[[Any], bool]]:
    return "0 <= value < 1", lambda v: 0 <= v < 1


@dataclass(frozen=True)
class Setting:
    """A declared key: where it lives in `AppConfig`, its type and default, and its `Spec`."""

    path: str  # attribute path in AppConfig, e.g. "model.lora_r"
    type: type
    default: Any
    spec: Spec


def declared_settings(cls: type, prefix: str = "") -> dict[str, Setting]:
    """Every `setting(...)` field of a config dataclass and its nested ones, by run-config key."""
    found: dict[str, Setting] = {}
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(item.default_factory):
            found.update(declared_settings(item.default_factory, f"{prefix}{item.name}."))
        elif "spec" in item.metadata:
            found[item.metadata["spec"].key] = Setting(
                f"{prefix}{item.name}", type(item.default), item.default, item.metadata["spec"])
    return found


def markdown_table(settings: dict[str, Setting]) -> str:
    """One row per key: default, allowed values, meaning."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, declared in settings.items():
        rows.append(f"| `{key}` | `{json.dumps(declared.default)}` | {declared.spec.allowed} | {declared.spec.help} |")
    return "\n".join(rows)
