"""Run-config presets (`configs/*.toml`): read them as Flower does, merge them, check their communication.

`flwr run . --run-config FILE.toml` reads one TOML file and refuses a file next to `key=value`
overrides, so presets cannot be stacked on the command line. `merge_run_configs` stacks any
number of preset files and `"k=v ..."` strings (each parsed by Flower's own parser, later ones
win) and `python -m flowertune_finance.tools.presets A.toml B.toml "k=v" -o run.toml` writes the
result as one file for `flwr run . --run-config run.toml`, after checking it like a run would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = REPO_ROOT / "configs"
MODEL_CONFIGS = PRESETS_DIR / "model-configs.json"  # published configs of the models the presets name


def read_run_config(item: str | Path) -> dict[str, Any]:
    """One `--run-config` value as `flwr run` parses it: a `.toml` file, or `"k=v k2=v2"`."""
    from flwr.common.config import parse_config_args

    text = str(item)
    if text.endswith(".toml") and not Path(text).expanduser().is_file():
        raise FileNotFoundError(f"run config file {text!r} does not exist")
    return parse_config_args([text])


def merge_run_configs(items: Iterable[str | Path]) -> dict[str, Any]:
    """Presets and overrides stacked in order: a key set by a later item replaces the earlier value."""
    merged: dict[str, Any] = {}
    for item in items:
        merged.update(read_run_config(item))
    return merged


def published_model_config(name: str) -> Any:
    """The transformers config of a model listed in `configs/model-configs.json`, built offline."""
    from transformers import AutoConfig

    known = {k: v for k, v in json.loads(MODEL_CONFIGS.read_text()).items() if not k.startswith("_")}
    if name not in known:
        raise KeyError(f"{name!r} is not in {MODEL_CONFIGS.name}; known: {', '.join(known)}")
    fields = dict(known[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowertune_finance.tools.presets",
        description="Merge run-config presets and overrides (later ones win) into one file for "
                    "`flwr run . --run-config FILE`, checked against the app's pyproject.toml and validation.",
    )
    parser.add_argument("items", nargs="+", help='preset .toml files and "key=value ..." strings, in order')
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .toml file to write (not overwritten)")
    parser.add_argument("--app-dir", type=Path, default=Path("."), help="the app folder (default: .)")
    args = parser.parse_args(argv)

    from flowertune_finance.tools.run_config_check import RunConfigProblems, check_run_config, write_run_config

    if args.output.suffix != ".toml":
        parser.error(f"{args.output} must end in .toml (Flower reads a --run-config file only then)")
    if args.output.exists():
        parser.error(f"{args.output} exists; choose another name (it is not overwritten)")
    staging = args.output.with_name(f".{args.output.name}.partial-{os.getpid()}.toml")
    try:
        merged = merge_run_configs(args.items)
        write_run_config(merged, staging)
        check_run_config(args.app_dir, [str(staging)])  # the file exactly as `flwr run` will read it
        os.rename(staging, args.output)
    except RunConfigProblems as problems:
        for problem in problems.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        staging.unlink(missing_ok=True)
    print(f"Wrote {args.output} ({len(merged)} keys): flwr run {args.app_dir} --run-config {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
