"""`flowertune-finance` command line: thin wrappers that parse arguments and call the package."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path


def _tiny_model(args: argparse.Namespace) -> int:
    from flowertune_finance.dev.tiny import build_tiny_model

    folder = build_tiny_model(args.dir, architecture=args.architecture)
    print(f"Tiny {args.architecture} model and tokenizer written to {folder.resolve()}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from flowertune_finance.dev import launch, smoke
    from flowertune_finance.dev.superlink import PrivateSuperLink, SuperLinkError

    app_dir = Path(args.app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        print(f"error: {app_dir} holds no pyproject.toml; pass the app folder (the repository root)", file=sys.stderr)
        return 2
    superlink = PrivateSuperLink(app_dir)
    stop_hint = f"flowertune-finance smoke --stop {_shell_path(app_dir)}"
    if args.stop:
        stopped = superlink.stop()
        print(f"Stopped the private SuperLink of {app_dir} (pid {stopped.pid})." if stopped
              else f"No private SuperLink is running for {app_dir}.")
        return 0
    for venv in smoke.venvs_inside(app_dir):
        print(f"warning: {venv} is a virtual environment inside the app folder; Flower's bundler walks it on every "
              "`flwr run` (about 4-5 s each): create the venv outside the app folder", file=sys.stderr)
    try:
        record, what = superlink.ensure()
        print(f"Private SuperLink of this checkout {what} on {record.address} (FLWR_HOME {record.flwr_home}); "
              f"it keeps running for the next smoke, `{stop_hint}` stops it", flush=True)
        model_dir = launch.ensure_tiny_model(superlink.folder / "tiny-model")
        run_config = launch.smoke_run_config(app_dir, model_dir, quantization=args.quantization, rounds=args.rounds)
        result = smoke.run_smoke(
            superlink, run_config, num_supernodes=args.num_supernodes, verbose=args.verbose,
            say=lambda line: print(line, flush=True),
        )
    except smoke.RunInterrupted as interrupted:
        print(f"Interrupted: run {interrupted.run_id} stopped (status {interrupted.status}); the private SuperLink "
              f"keeps running, `{stop_hint}` stops it.", flush=True)
        return 130
    except KeyboardInterrupt:
        print("Interrupted before a run was submitted; nothing is running but the private SuperLink "
              f"(`{stop_hint}` stops it).", flush=True)
        return 130
    except (launch.RunFailed, SuperLinkError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    run_dir = result.run_dir or app_dir / "results"
    checkpoint = result.checkpoint or run_dir / f"peft_{args.rounds}"
    print(f"Smoke run {result.run_id}: {result.status} in {result.wall_time_s:.1f} s.")
    print(f"Run folder:       {run_dir}")
    print(f"Final checkpoint: {checkpoint}")
    print("Next:")
    print(f"  flowertune-finance eval --base-model-name-path {_shell_path(model_dir)} "
          f"--peft-path {_shell_path(checkpoint)} --quantization 0 --run-name smoke")
    print("    (downloads FPB, FiQA and TFNS from the Hub; offline, add --data-dir DIR: see docs/first-run.md)")
    print(f"  flowertune-finance plot {_shell_path(run_dir)}")
    print(f"  flowertune-finance submit {_shell_path(run_dir)} --app-dir {_shell_path(app_dir)}")
    print(f"  {stop_hint}   # stops this checkout's private SuperLink (later smokes reuse it)")
    return 0


def _shell_path(path: str | Path) -> str:
    """A path as it can be pasted into a shell."""
    import shlex

    return shlex.quote(str(path))


def _check_config(args: argparse.Namespace) -> int:
    from flowertune_finance.tools.run_config_check import RunConfigProblems, check_run_config

    app_dir = Path(args.app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        print(f"error: {app_dir} holds no pyproject.toml; pass --app-dir (the repository root)", file=sys.stderr)
        return 2
    overrides = list(args.run_config or []) + ([str(args.file)] if args.file else [])
    if args.file and args.run_config:
        print("error: give either a FILE or --run-config values (Flower does not mix the two)", file=sys.stderr)
        return 2
    try:
        checked = check_run_config(app_dir, overrides)
    except RunConfigProblems as problems:
        for problem in problems.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:  # pyproject.toml unreadable or invalid for Flower
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = checked.config
    changed = ", ".join(f"{key}={value!r}" for key, value in checked.overrides.items()) or "no overrides"
    print(f"OK: {changed}; {config.num_server_rounds} rounds of {config.strategy.name} on {config.model.name} "
          f"(quantization {config.model.quantization}), checked against {app_dir / 'pyproject.toml'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from flowertune_finance.tools.evaluate import EvalError, evaluate_adapter

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
    print(f"{scores} · average {summary['average']:.2%} ({args.mode} mode, batch size {args.batch_size}); "
          f"files in {summary['output_dir']}")
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
    from flowertune_finance.tools.submit import SubmissionError, build_submission

    try:
        folder = build_submission(args.run_dir, args.output, args.eval_dir, args.run_name, args.app_dir)
    except (SubmissionError, OSError) as error:  # OSError: an existing --output, or a folder it may not read
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Submission written to {folder}; see {folder / 'SUBMISSION.md'}")
    return 0


def _deploy_local(args: argparse.Namespace) -> int:
    from flowertune_finance.dev import deployment, launch
    from flowertune_finance.dev.credentials import CredentialError

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` tears down like Ctrl-C
    folder = args.folder or Path(tempfile.mkdtemp(prefix="flowertune-deployment-"))
    try:
        running = deployment.LocalDeployment(folder, supernode_auth=args.auth)
    except CredentialError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    with running:
        try:
            running.start(deployment.node_configs(args.supernodes, args.dataset_path))
            print(running.describe(), flush=True)
            if args.smoke:
                result = running.run_smoke(args.app_dir)
                print(f"Deployment smoke run {result.run_id}: {result.status} in {result.wall_time_s:.1f} s")
            else:
                print("Press Ctrl-C to stop every process.", flush=True)
                running.wait_until_interrupted()
        except (deployment.DeploymentError, launch.RunFailed, CredentialError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("Stopping the deployment.", flush=True)
    return 0


def _hub_check(args: argparse.Namespace) -> int:
    from flowertune_finance.tools.hub import HubCheckError, check_app, report

    try:
        result = check_app(args.app_dir)
    except HubCheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report(result))
    return 0


def _add_try_out_commands(commands: argparse._SubParsersAction) -> None:
    """The commands that run the app on this machine: a tiny model, the CPU smoke, the config check."""
    tiny = commands.add_parser("tiny-model", help="write a tiny random causal LM + tokenizer to DIR (offline tests, smoke)")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--architecture", default="mistral", choices=("mistral", "llama", "qwen2"))
    tiny.set_defaults(handler=_tiny_model)

    smoke = commands.add_parser(
        "smoke", help="run the whole federation on the CPU: tiny model, sample data, 50 SuperNodes",
        description="Run the real app with the real `flwr run` on the CPU: tiny model, bundled sample data, "
                    "50 SuperNodes. It runs on this checkout's private SuperLink (its own FLWR_HOME in "
                    ".smoke/flwr-home and its own port), started on first use and reused later; `--stop` stops "
                    "it. Ctrl-C stops the run. Before a real run, check your overrides offline with "
                    "`flowertune-finance check-config --run-config \"k=v ...\"`.",
    )
    smoke.add_argument("app_dir", nargs="?", default=".", help="the app folder (default: .)")
    smoke.add_argument("--rounds", type=int, default=3)
    smoke.add_argument("--quantization", type=int, default=0, choices=(0, 4, 8))
    smoke.add_argument("--num-supernodes", type=int, default=50)
    smoke.add_argument("--verbose", action="store_true", help="stream Flower's full log (default: one line per round)")
    smoke.add_argument("--stop", action="store_true", help="stop this checkout's private SuperLink and exit")
    smoke.set_defaults(handler=_smoke)

    check = commands.add_parser(
        "check-config", help="offline: check run-config overrides as `flwr run` and the ServerApp would",
        description="Check `--run-config` overrides offline, the way a run would: keys against the app's "
                    "pyproject.toml (Flower's own parser and merge; an unknown key is named with the closest "
                    "valid one), then the app's own validation of every value. Exit 0 if valid, 2 if not.",
    )
    check.add_argument("file", nargs="?", type=Path, default=None, help="a run-config .toml file (as `flwr run -c`)")
    check.add_argument("--run-config", "-c", action="append", metavar="\"k=v k2=v2\"",
                       help="overrides as given to `flwr run --run-config` (repeatable)")
    check.add_argument("--app-dir", default=".", help="the app folder whose pyproject.toml holds the keys (default: .)")
    check.set_defaults(handler=_check_config)


def _add_leaderboard_commands(commands: argparse._SubParsersAction) -> None:
    """The commands that score a run and assemble its leaderboard submission."""
    evaluate = commands.add_parser("eval", help="leaderboard accuracy on FPB, FiQA, TFNS (the leaderboard's protocol)")
    evaluate.add_argument("--base-model-name-path", default="mistralai/Mistral-7B-v0.3")
    evaluate.add_argument("--peft-path", default=None, help="PEFT checkpoint folder (default: the bare base model)")
    evaluate.add_argument("--run-name", default="fl", help="suffix of the output files")
    evaluate.add_argument("--batch-size", type=int, default=32,
                          help="prompts per generate call; in protocol mode results depend on it, as on the leaderboard")
    evaluate.add_argument("--quantization", type=int, default=4, choices=(4, 8, 0), help="0: none (CPU)")
    evaluate.add_argument("--datasets", default="fpb,fiqa,tfns", help="comma-separated: fpb,fiqa,tfns")
    evaluate.add_argument("--data-dir", default=None, help="offline: DIR/fpb, DIR/fiqa, DIR/tfns save_to_disk folders")
    evaluate.add_argument("--output-dir", default=None,
                          help="default: RUN_DIR/eval for --peft-path RUN_DIR/peft_N, results/eval for the bare model")
    evaluate.add_argument("--mode", default="protocol", choices=("protocol", "fast"),
                          help="protocol: the leaderboard's computation; fast: greedy, stop each answer at a "
                               "newline or after a few tokens")
    evaluate.set_defaults(handler=_eval)

    plot = commands.add_parser("plot", help="PNG figures of a run from its metrics.jsonl (default: RUN_DIR/plots)")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--output-dir", type=Path, default=None)
    plot.set_defaults(handler=_plot)

    submit = commands.add_parser("submit", help="check a finished, evaluated run and assemble its leaderboard submission")
    submit.add_argument("run_dir", type=Path, help="the run folder (run_config.json, metrics.jsonl, peft_<round>/)")
    submit.add_argument("--output", type=Path, default=None,
                        help="a new submission folder, not inside a peft_<round> folder (default: RUN_DIR/submission)")
    submit.add_argument("--eval-dir", type=Path, default=None,
                        help="where the acc_*.txt (and eval's summary_*.json) are (default: RUN_DIR/eval if it "
                             "exists, else ./benchmarks, where the official evaluation script writes)")
    submit.add_argument("--run-name", default=None, help="the eval run name (default: the only one in the eval folder)")
    submit.add_argument("--app-dir", type=Path, default=Path("."), help="the app whose pyproject.toml holds the defaults")
    submit.set_defaults(handler=_submit)


def _add_deployment_commands(commands: argparse._SubParsersAction) -> None:
    """The commands for a deployment: a local one to try, the Hub's checks before publishing."""
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

    hub_check = commands.add_parser(
        "hub-check", help="offline: run `flwr app publish`'s own checks on the files it would upload to Flower Hub"
    )
    hub_check.add_argument("app_dir", nargs="?", default=".", help="the app folder (default: .)")
    hub_check.set_defaults(handler=_hub_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowertune-finance", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_try_out_commands, _add_leaderboard_commands, _add_deployment_commands):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
