"""flowlab.train.teardown: a multi-process run ends without waiting on a hung process-group teardown,
and without the interpreter shutdown that lets gloo's threads abort a finished run."""
import os
import subprocess
import sys

from conftest import ROOT

SRC = os.path.join(ROOT, "src")


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": SRC, **env})


EXIT = """
import atexit, sys
from flowlab.train.teardown import exit_after_distributed_run
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("buffered, not yet flushed")
code = exit_after_distributed_run(3)
print(" returned", code)
"""


def test_a_process_of_a_multi_process_launch_exits_at_once_with_its_streams_flushed():
    res = _run(EXIT, WORLD_SIZE="2")
    assert res.returncode == 3, res.stderr
    assert res.stdout == "buffered, not yet flushed"  # flushed; no interpreter shutdown (no atexit), no return


def test_a_single_process_returns_the_code():
    res = _run(EXIT, WORLD_SIZE="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["buffered, not yet flushed returned 3", "atexit ran"]


HUNG_TEARDOWN = """
import time
import torch.distributed as dist
from accelerate import PartialState
from flowlab.train.teardown import end_distributed
dist.is_initialized = lambda: True  # a process group that is up, whose destruction never returns
PartialState.destroy_process_group = lambda self, group=None: time.sleep(600)
end_distributed(timeout_s=1)
print("not reached")
"""


def test_a_hung_process_group_teardown_ends_the_process_with_status_0():
    res = _run(HUNG_TEARDOWN)
    assert res.returncode == 0, res.stderr
    assert "not reached" not in res.stdout
    assert "process-group teardown did not finish in 1 s" in res.stderr


def test_a_prompt_teardown_returns():
    res = _run(HUNG_TEARDOWN.replace("time.sleep(600)", "None"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "not reached" and "warning" not in res.stderr


def test_a_hung_teardown_after_a_signal_keeps_the_runs_exit_code():
    res = _run(HUNG_TEARDOWN.replace("end_distributed(timeout_s=1)", "end_distributed(timeout_s=1, exit_code=143)"))
    assert res.returncode == 143, res.stderr
    assert "not reached" not in res.stdout
