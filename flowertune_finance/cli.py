"""`flowertune-finance` command line: thin wrappers that parse arguments and call the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tiny_model(args: argparse.Namespace) -> int:
    from flowertune_finance.tiny import build_tiny_model

    folder = build_tiny_model(args.dir, architecture=args.architecture)
    print(f"Tiny {args.architecture} model and tokenizer written to {folder.resolve()}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from flowertune_finance import launch

    app_dir = Path(args.app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        print(f"error: {app_dir} holds no pyproject.toml; pass the app folder (the repository root)", file=sys.stderr)
        return 2
    model_dir = launch.ensure_tiny_model(app_dir / ".smoke" / "tiny-model")
    run_config = launch.smoke_run_config(app_dir, model_dir, quantization=args.quantization, rounds=args.rounds)
    try:
        result = launch.run_app(app_dir, run_config, num_supernodes=args.num_supernodes)
    except launch.RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Smoke run {result.run_id}: {result.status} in {result.wall_time_s:.1f} s; "
          f"checkpoints under {app_dir / 'results'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowertune-finance", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-model", help="write a tiny random causal LM + tokenizer to DIR (offline tests, smoke)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--architecture", default="mistral", choices=("mistral", "llama", "qwen2"))
    tiny.set_defaults(handler=_tiny_model)

    smoke = commands.add_parser("smoke", help="run the whole federation on the CPU: tiny model, sample data, 50 SuperNodes")
    smoke.add_argument("app_dir", nargs="?", default=".", help="the app folder (default: .)")
    smoke.add_argument("--rounds", type=int, default=3)
    smoke.add_argument("--quantization", type=int, default=0, choices=(0, 4, 8))
    smoke.add_argument("--num-supernodes", type=int, default=50)
    smoke.set_defaults(handler=_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
