"""`flowertune-finance check-config`: run-config overrides checked offline, the way Flower and the ServerApp will.

Flower reads the overrides with its own parser (silently dropping text that is not `key=value`),
rejects keys missing from the app's pyproject.toml, merges them into the defaults, and the
ServerApp then validates every value; this runs those same steps without starting anything, so a
mistake is named before a run is submitted. `write_run_config` writes a run config as the one TOML
file `flwr run --run-config FILE` reads.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w


def write_run_config(run_config: Mapping[str, Any], path: Path) -> Path:
    """A TOML file for `flwr run --run-config FILE` (dotted keys quoted, as flwr expects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(run_config)))
    return path


# Flower's own `key=value` pattern (flwr.common.config.parse_config_args): text outside it is dropped silently.
_OVERRIDE_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


class RunConfigProblems(ValueError):
    """Overrides that `flwr run` or the ServerApp would reject; one message per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class CheckedRunConfig:
    """The outcome of `check_run_config`: the overrides as Flower parsed them, the fused run config the
    ServerApp would receive, and the app's typed view of it."""

    overrides: dict[str, Any]
    run_config: dict[str, Any]
    config: Any  # flowertune_finance.config.AppConfig (imported lazily: it pulls in trl)


def app_default_config(app_dir: str | Path) -> dict[str, Any]:
    """The flat run-config defaults of the app's pyproject.toml, read and flattened by Flower's own code
    (which also validates the file the way `flwr run` does)."""
    from flwr.common.config import flatten_dict, get_project_config

    project = get_project_config(Path(app_dir))
    return flatten_dict(project["tool"]["flwr"]["app"].get("config", {}))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`--run-config` values (`"k=v k2=v2"` strings, or one `.toml` file) parsed by Flower's own parser.

    Flower silently drops text that is not a `key=value` pair, and reads a file only when its name
    ends in `.toml`; both are reported here instead, since a dropped override is what this check is for.
    """
    from flwr.common.config import parse_config_args

    problems = []
    for text in overrides:
        if text.endswith(".toml"):
            if not Path(text).expanduser().is_file():
                problems.append(f"run config file {text!r} does not exist")
            continue
        if Path(text).expanduser().is_file():
            problems.append(f"{text!r} is a file, but Flower reads a --run-config file only when its name ends in .toml")
            continue
        leftover = " ".join(_OVERRIDE_PAIR.sub(" ", text).split())
        if leftover:
            problems.append(f"{leftover!r} is not a key=value pair; Flower would ignore it")
    if problems:
        raise RunConfigProblems(problems)
    try:
        return parse_config_args(overrides)
    except Exception as error:  # click.ClickException, ValueError, TOMLDecodeError: Flower's wording, as is
        message = getattr(error, "message", None) or str(error)
        raise RunConfigProblems([f"the overrides do not parse: {message}"]) from error


def check_run_config(app_dir: str | Path, overrides: list[str]) -> CheckedRunConfig:
    """Validate overrides offline exactly as a run would: Flower's key check against pyproject.toml
    (each unknown key named with the closest valid one), Flower's merge, then `parse_run_config`.

    Raises RunConfigProblems listing every problem found.
    """
    from flwr.common.config import fuse_dicts

    from flowertune_finance.config import TRAINING_ARGUMENTS_PREFIX, ConfigError, parse_run_config

    app_dir = Path(app_dir)
    defaults = app_default_config(app_dir)
    parsed = parse_overrides(overrides)
    problems = []
    for key in (key for key in parsed if key not in defaults):
        close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
        if close:
            hint = f"did you mean '{close[0]}'?"
        elif key.startswith(TRAINING_ARGUMENTS_PREFIX):
            hint = f"to pass another trl.SFTConfig argument, add it under [tool.flwr.app.config] in {app_dir / 'pyproject.toml'}"
        else:
            hint = f"the keys are those under [tool.flwr.app.config] in {app_dir / 'pyproject.toml'}"
        problems.append(f"unknown run config key '{key}' (Flower rejects keys missing from pyproject.toml); {hint}")
    run_config = fuse_dicts(defaults, {k: v for k, v in parsed.items() if k in defaults}, check_keys=True)
    config = None
    try:
        with _quiet_library_notices():
            config = parse_run_config(run_config)
    except ConfigError as error:
        problems.append(str(error))
    if problems:
        raise RunConfigProblems(problems)
    return CheckedRunConfig(overrides=parsed, run_config=run_config, config=config)


@contextmanager
def _quiet_library_notices() -> Iterator[None]:
    """Keep a one-line answer one line: building an SFTConfig imports trl, whose imports warn about
    deprecations and (bitsandbytes) a missing optional kernel package, none of which concerns the check."""
    import logging
    import warnings

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        bnb_logger.setLevel(level)
