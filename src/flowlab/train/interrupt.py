"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (preemption, ``kill``).

While a :class:`StopSignals` is active, the first SIGINT or SIGTERM is only recorded: the trainer
asks :meth:`StopSignals.agreed` at every step boundary, and once any process has seen a signal every
process saves the same checkpoint and stops together (``TrainingInterrupted``). The same signal
a second time raises ``KeyboardInterrupt`` at once, for a user who does not want to wait. The other
signal after the first is ignored: a Ctrl-C under ``accelerate launch`` reaches the workers as
SIGINT from the terminal and then as SIGTERM from the launcher shutting them down (which sends
SIGKILL some 30 s later, so the checkpoint must fit in that time).
"""
from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator

__all__ = ["StopSignals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager recording SIGINT/SIGTERM instead of dying (see the module docstring).

    Handlers can only be installed from the main thread; elsewhere (a trainer run from a worker
    thread) the signals keep their handlers and :meth:`agreed` only reports other processes' signals.
    """

    def __init__(self) -> None:
        self.received: int = 0  # the first signal received, 0 if none
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received == signum:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt
        if not self.received:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal to stop on if any process received one (the largest number), else 0. A
        collective call with more than one process: every process must call it at the same step."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([float(self.received)], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())
