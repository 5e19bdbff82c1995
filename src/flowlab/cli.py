"""Command-line entry: ``python train.py --config configs/X.yaml key=value ...``."""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["train_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train with flowlab. Any config key can be overridden as dotted key=value, e.g. train.max_steps=200.",
    )
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    return p


def train_main(argv: list[str] | None = None) -> int:
    """Parse arguments, validate the config and train. Returns a process exit code."""
    args = _parser().parse_args(argv)
    from .data import DataError
    from .train import ConfigError, Trainer, TrainingError, load_config
    from .train.checkpoint import CheckpointError

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config)
        trainer.train()
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"flowlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowlab: interrupted; resume with train.resume=latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
