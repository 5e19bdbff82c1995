"""Ending a multi-process run without hanging or crashing in PyTorch's own teardown.

Once every process has passed the trainer's last barrier, the run's outputs are complete on disk. What
is left (destroying the process group, then the interpreter's exit) is where PyTorch's CPU backend,
gloo, now and then hangs or aborts: ``destroy_process_group`` can block for good (pytorch/pytorch#75097),
and a gloo thread still alive when the interpreter tears itself down ends the process with
"terminate called without an active exception" (SIGABRT, pytorch/pytorch#190489). Either turns a
finished run into a hung or failed job. Two guards:

* :func:`end_distributed` destroys the process group once, after the process's last run (a run's
  prerequisites train in the same process group first), with a watchdog: if the teardown has not
  returned after ``timeout_s`` seconds, the process says so and exits (status 0 for a finished run), as the
  run's outputs are complete.
* :func:`exit_after_distributed_run` ends a process of a multi-process launch right after its run,
  with ``os._exit``, once the standard streams and the ``logging`` handlers are flushed, so that no C++
  destructor of the communication backend runs during interpreter shutdown.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

TEARDOWN_TIMEOUT_S = 120.0


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch`` / ``torchrun``) started; 1 outside one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to save
            pass
    logging.shutdown()
    os._exit(code)


def end_distributed(timeout_s: float = TEARDOWN_TIMEOUT_S, exit_code: int = 0) -> None:
    """Destroy the process group of a multi-process run, bounded in time; nothing in a single process.

    Call it once, after the last run of the process has ended on every process (:func:`flowlab.recipes.train`
    does). A watchdog thread ends this process with ``exit_code`` (0 for a finished run; a signal-stopped
    run's own code) if the teardown has not returned after ``timeout_s`` seconds: by then the run's outputs
    are complete.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    state = PartialState()
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(timeout_s):
            print(
                f"flowlab: warning: process {state.process_index}: the process-group teardown did not finish "
                f"in {timeout_s:g} s (a known PyTorch issue, pytorch/pytorch#75097); the run's outputs are "
                "complete, so this process exits now",
                file=sys.stderr,
            )
            _flush_and_exit(exit_code)

    threading.Thread(target=watchdog, name="flowlab-teardown-watchdog", daemon=True).start()
    try:
        state.destroy_process_group()
    finally:
        done.set()


def exit_after_distributed_run(code: int) -> int:
    """Return ``code`` in a single process; in a process of a multi-process launch, exit with it now.

    Called by :func:`flowlab.cli.train_main` once the run has ended on every process (finished, or
    stopped by a signal after its checkpoint). Skipping the interpreter's shutdown there is what keeps
    the communication backend's C++ destructors from aborting a finished run.
    """
    if launched_processes() > 1:
        _flush_and_exit(code)
    return code
