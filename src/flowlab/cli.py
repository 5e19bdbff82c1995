"""Command-line entries.

``python train.py --config configs/X.yaml key=value ...`` (:func:`train_main`), and the
``flowlab`` console script (:func:`main`) with two subcommands::

    flowlab train --config configs/X.yaml [key=value ...]       # same as train.py
    flowlab push <output_dir> --repo-id user/name [--private] [--revision R] [--dry-run] [--commit-message M]

Errors end in one line ``flowlab: error: ...`` and exit code 2. The config is validated before
torch and diffusers are imported, so a typo is reported at once; a run with ``hub.push=true`` and
no Hugging Face token is refused at start-up. A run with ``hub.push=true`` pushes from the main
process once training has finished; if that push fails, the trained run
stays on disk, the error and the ``flowlab push`` command to retry are printed, and the exit
code is 3.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

__all__ = ["train_main", "push_main", "main", "EXIT_PUSH_FAILED"]

#: Exit code of a training run that finished but whose ``hub.push`` failed.
EXIT_PUSH_FAILED = 3


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``flowlab: error: ...`` and exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"flowlab: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineErrorParser(
        prog="train.py",
        description="Train with flowlab. Any config key can be overridden as dotted key=value, e.g. train.max_steps=200.",
    )
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    return p


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse arguments, validate the config and train (then push if ``hub.push``). Returns a process exit code.

    In a process of a multi-process launch (``accelerate launch`` with several processes) the process
    exits here with that code instead of returning
    (:func:`flowlab.train.teardown.exit_after_distributed_run`), after the push and after destroying the
    process group (bounded: :func:`flowlab.train.teardown.end_distributed`) when the run ended on every
    process, finished or stopped by a signal.
    """
    parser = _parser()
    if prog is not None:
        parser.prog = prog
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    from .errors import CheckpointError, ConfigError, DataError, TrainingError
    from .recipes import load_config, train
    from .train.config import check_hub_config
    from .train.teardown import end_distributed, exit_after_distributed_run
    from .errors import TrainingInterrupted

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    # every return below goes through exit_after_distributed_run: in a process of a multi-process launch
    # it exits here (no interpreter shutdown, where gloo's threads can abort the process)
    try:
        # Validate first (light: no torch, no diffusers), then import the training stack and train,
        # after any run this one needs (e.g. an RL recipe's missing base model).
        config = load_config(args.config, args.overrides)
        check_hub_config(config)
        train(config, teardown=False)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        _close_progress_bars()
        print(f"flowlab: error: {e}", file=sys.stderr)
        return exit_after_distributed_run(2)
    except OSError as e:  # the file system said no (permissions, a full disk, a path that is a file)
        _close_progress_bars()
        print(f"flowlab: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return exit_after_distributed_run(2)
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: a checkpoint of the last step was saved
        _close_progress_bars()
        print(f"flowlab: {e}", file=sys.stderr)
        end_distributed(exit_code=e.exit_code)
        return exit_after_distributed_run(e.exit_code)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("flowlab: interrupted; resume with train.resume=latest", file=sys.stderr)
        return exit_after_distributed_run(130)
    code = _push_after_training(config) if config.hub.push else 0  # before the teardown: a hung one cannot skip it
    end_distributed(exit_code=code)
    return exit_after_distributed_run(code)


def _close_progress_bars() -> None:
    """End a progress bar left open by an exception, so the error starts on a line of its own."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _retry_command(output_dir: str, repo_id: str, private: bool, revision: str | None) -> str:
    cmd = ["flowlab", "push", output_dir, "--repo-id", repo_id]
    if private:
        cmd.append("--private")
    if revision:
        cmd += ["--revision", revision]
    return " ".join(shlex.quote(c) for c in cmd)


def _push_after_training(config) -> int:
    """``hub.push``: publish the finished run from the main process only."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    from .hub import HubError, push_to_hub

    h = config.hub
    print(f"flowlab: pushing {config.output_dir} to the Hub repo {h.repo_id}", flush=True)
    try:
        result = push_to_hub(config.output_dir, h.repo_id, private=h.private, revision=h.revision, license=h.license)
    except HubError as e:
        message = f"flowlab: error: training finished and the run is saved in {config.output_dir}, but the push failed: {e}"
        if "flowlab push" not in message:
            message += f" Retry with: {_retry_command(config.output_dir, h.repo_id, h.private, h.revision)}"
        print(message, file=sys.stderr)
        return EXIT_PUSH_FAILED
    print(f"flowlab: pushed {len(result.files)} files to {h.repo_id}: {result.commit_url}", flush=True)
    return 0


def _push_parser(prog: str = "flowlab push") -> argparse.ArgumentParser:
    p = _OneLineErrorParser(
        prog=prog,
        description=(
            "Publish a finished training run to the Hugging Face Hub: the trained artefact (its save_pretrained "
            "layout, at the repo root), a model card, the last sample grid, config.yaml and "
            "metrics.jsonl. Checkpoints and logs are never uploaded. The token comes from HF_TOKEN or "
            "`hf auth login`."
        ),
    )
    p.add_argument("output_dir", help="the output_dir of a finished training run")
    p.add_argument("--repo-id", help="target repo 'user/name' (default: the run's hub.repo_id)")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private (if it does not exist)")
    p.add_argument("--revision", help="branch to commit to, created if missing (default: main)")
    p.add_argument("--dry-run", action="store_true", help="send nothing: list the files and write the card to a preview folder")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--license", help="license id for the card (default: the run's hub.license, else apache-2.0)")
    p.add_argument("--max-retries", type=int, default=3, help="retries on transient failures (default: 3)")
    return p


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def push_main(argv: list[str] | None = None, prog: str = "flowlab push") -> int:
    """``flowlab push``: publish a finished run. Returns a process exit code."""
    try:
        args = _push_parser(prog).parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    from .hub import HubError, push_to_hub

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if args.max_retries < 0:
        print(f"flowlab: error: --max-retries must be >= 0, got {args.max_retries}", file=sys.stderr)
        return 2
    hub_cfg = _run_hub_section(args.output_dir)
    repo_id = args.repo_id or hub_cfg.get("repo_id")
    if not repo_id:
        print(f"flowlab: error: --repo-id is required ({args.output_dir} has no hub.repo_id in its config.yaml)", file=sys.stderr)
        return 2
    private = args.private if args.private is not None else bool(hub_cfg.get("private", False))
    revision = args.revision if args.revision is not None else hub_cfg.get("revision")
    try:
        result = push_to_hub(
            args.output_dir,
            repo_id,
            private=private,
            revision=revision,
            dry_run=args.dry_run,
            commit_message=args.commit_message,
            max_retries=args.max_retries,
            license=args.license,
        )
    except HubError as e:
        print(f"flowlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowlab: interrupted; nothing in the run folder was changed", file=sys.stderr)
        return 130
    where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
    if result.dry_run:
        print(f"flowlab: dry run: would push {len(result.files)} files to {where}:")
        width = max(len(f.path_in_repo) for f in result.files)
        for f in result.files:
            src = f.source if f.source is not None else "(generated)"
            print(f"  {f.path_in_repo:<{width}}  {_human(f.size):>9}  <- {src}")
        print(f"flowlab: model card preview: {result.card_path}")
    else:
        print(f"flowlab: pushed {len(result.files)} files to {where}: {result.commit_url}")
    return 0


def _run_hub_section(output_dir: str) -> dict:
    """The ``hub`` section of a run's config.yaml (empty if unreadable: push_to_hub reports that)."""
    import os

    import yaml

    try:
        with open(os.path.join(output_dir, "config.yaml")) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}
    hub = data.get("hub") if isinstance(data, dict) else None
    return hub if isinstance(hub, dict) else {}


def main(argv: list[str] | None = None) -> int:
    """The ``flowlab`` console script: ``flowlab train ...`` or ``flowlab push ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "train with a config (same as train.py)", "push": "publish a finished run to the Hugging Face Hub"}
    if not argv:
        print("flowlab: error: a command is required: flowlab {train,push} ... (see `flowlab --help`)", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print("usage: flowlab {train,push} ...\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<6} {text}")
        print("\n`flowlab <command> --help` for a command's options.")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest, prog="flowlab train")
    if command == "push":
        return push_main(rest)
    print(f"flowlab: error: unknown command {command!r} (choose from {', '.join(commands)})", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
