"""Error classes of flowlab: the bottom layer, imported by every other layer and importing none.

Each message is one paragraph that names the offending key, file, value or URL, so the command
line can print it as ``flowlab: error: <message>`` without a traceback.
"""
from __future__ import annotations

__all__ = ["ConfigError", "OptionError", "DataError", "CheckpointError", "TrainingError", "TrainingInterrupted", "RewardError", "HubError"]


class ConfigError(ValueError):
    """An invalid configuration; the message names the dotted key at fault."""


class OptionError(ConfigError):
    """An invalid option of a config-addressable component (e.g. a reward). ``field`` is the option's
    name; the builder re-raises it as a :class:`ConfigError` prefixed with the spec's dotted key."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class DataError(ValueError):
    """Bad or missing data: the message names the file, column or split at fault."""

    def __init__(self, *args):
        # A DataLoader worker re-raises as DataError("Caught DataError in DataLoader worker process N.
        # Original Traceback ...: <message>"): keep the one-paragraph message, drop the traceback.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught DataError") and "DataError: " in args[0]:
            args = (args[0].rsplit("DataError: ", 1)[1].strip(),)
        super().__init__(*args)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names it."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint at a step boundary.

    Attributes:
        signum: the signal that stopped the run.
        step: the optimiser steps done (and saved).
        exit_code: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), the shell's convention.
    """

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class RewardError(RuntimeError):
    """A reward failed for the whole batch (server down, user function raised, wrong number
    of scores). Per-sample failures are NaN scores, never this exception."""


class HubError(RuntimeError):
    """Publishing to the Hub failed. The message is one paragraph naming the repo and the cause,
    with the token scrubbed; the local run folder is unchanged."""
