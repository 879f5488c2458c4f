"""`flowertune-finance` command line: thin wrappers that parse arguments and call the package."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
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


def _eval(args: argparse.Namespace) -> int:
    from flowertune_finance.evaluate import EvalError, evaluate_adapter

    try:
        summary = evaluate_adapter(
            args.base_model_name_path, args.peft_path, args.datasets.split(","), data_dir=args.data_dir,
            mode=args.mode, batch_size=args.batch_size, quantization=args.quantization,
            output_dir=args.output_dir, run_name=args.run_name,
        )
    except EvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scores = " · ".join(f"{name} {summary[name]:.2%}" for name in summary["counts"])
    print(f"{scores} · average {summary['average']:.2%} ({args.mode} mode); files in {args.output_dir}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from flowertune_finance.plots import plot_run

    try:
        figures = plot_run(args.run_dir, args.output_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(str(path) for path in figures))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from flowertune_finance.submit import SubmissionError, build_submission

    try:
        folder = build_submission(args.run_dir, args.output, args.eval_dir, args.run_name, args.app_dir)
    except (SubmissionError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Submission written to {folder}; see {folder / 'SUBMISSION.md'}")
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    from flowertune_finance import deployment, launch

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` tears down like Ctrl-C
    folder = args.folder or Path(tempfile.mkdtemp(prefix="flowertune-deployment-"))
    with deployment.LocalDeployment(folder, supernode_auth=args.auth) as running:
        try:
            running.start(deployment.node_configs(args.supernodes, args.dataset_path))
            print(running.describe(), flush=True)
            if args.smoke:
                result = running.run_smoke(args.app_dir)
                print(f"Deployment smoke run {result.run_id}: {result.status} in {result.wall_time_s:.1f} s")
            else:
                print("Press Ctrl-C to stop every process.", flush=True)
                running.wait_until_interrupted()
        except (deployment.DeploymentError, launch.RunFailed) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("Stopping the deployment.", flush=True)
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

    evaluate = commands.add_parser("eval", help="leaderboard accuracy on FPB, FiQA, TFNS (the leaderboard's protocol)")
    evaluate.add_argument("--base-model-name-path", default="mistralai/Mistral-7B-v0.3")
    evaluate.add_argument("--peft-path", default=None, help="PEFT checkpoint folder (default: the bare base model)")
    evaluate.add_argument("--run-name", default="fl", help="suffix of the output files")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--quantization", type=int, default=4, choices=(4, 8, 0), help="0: none (CPU)")
    evaluate.add_argument("--datasets", default="fpb,fiqa,tfns", help="comma-separated: fpb,fiqa,tfns")
    evaluate.add_argument("--data-dir", default=None, help="offline: DIR/fpb, DIR/fiqa, DIR/tfns save_to_disk folders")
    evaluate.add_argument("--output-dir", default="benchmarks")
    evaluate.add_argument("--mode", default="protocol", choices=("protocol", "fast"),
                          help="fast: stop each answer at a newline or after a few tokens")
    evaluate.set_defaults(handler=_eval)

    plot = commands.add_parser("plot", help="PNG figures of a run from its metrics.jsonl (default: RUN_DIR/plots)")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--output-dir", type=Path, default=None)
    plot.set_defaults(handler=_plot)

    submit = commands.add_parser("submit", help="check a finished, evaluated run and assemble its leaderboard submission")
    submit.add_argument("run_dir", type=Path)
    submit.add_argument("--output", type=Path, default=None, help="submission folder (default: RUN_DIR/submission)")
    submit.add_argument("--eval-dir", type=Path, default=Path("benchmarks"), help="where `eval` wrote acc_*.txt")
    submit.add_argument("--run-name", default=None, help="the eval run name (default: the only one in --eval-dir)")
    submit.add_argument("--app-dir", type=Path, default=Path("."), help="the app whose pyproject.toml holds the defaults")
    submit.set_defaults(handler=_submit)

    deploy = commands.add_parser(
        "deploy-local", help="SuperLink + SuperNodes with TLS on 127.0.0.1 (Flower's Deployment Engine), until Ctrl-C"
    )
    deploy.add_argument("--supernodes", type=int, default=3, help="SuperNodes with partition-id/num-partitions")
    deploy.add_argument("--dataset-path", action="append", default=[], metavar="FILE",
                        help="one more SuperNode that trains on this own file (repeatable)")
    deploy.add_argument("--auth", action="store_true", help="enable SuperNode authentication (keys registered for you)")
    deploy.add_argument("--folder", type=Path, default=None, help="certificates, keys, logs (default: a new temp folder)")
    deploy.add_argument("--smoke", action="store_true", help="run the 2-round tiny-model smoke on it, then stop")
    deploy.add_argument("--app-dir", default=".", help="the app folder for --smoke (default: .)")
    deploy.set_defaults(handler=_deploy_local)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
