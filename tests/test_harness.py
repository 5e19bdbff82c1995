"""The multi-process test harness (conftest.run_checked): a hung launch fails the test with each process's
stacks instead of blocking the suite, and no process it started outlives it."""
import os
import sys
import time

import pytest

from conftest import launch_two_cpu_processes, run_checked

# a parent that starts a child in a new session (both sleeping in a named function), writes the child's
# pid, then exits at once ("exit") or hangs ("hang")
SCRIPT = """
import os, subprocess, sys, time
def parent_waits_here():
    time.sleep(600)
# a session of its own, as torch's launcher starts its workers: out of reach of the parent's process group
child = subprocess.Popen([sys.executable, "-c", "import time\\ndef child_waits_here():\\n    time.sleep(600)\\nchild_waits_here()"],
                         start_new_session=True)
open(sys.argv[2], "w").write(str(child.pid))
print("started", flush=True)
if sys.argv[1] == "hang":
    parent_waits_here()
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child not yet reaped by its (dead) parent is a zombie until init reaps it
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _gone_soon(pid):
    for _ in range(50):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_hung_command_fails_with_every_process_stacks_and_leaves_nothing(tmp_path):
    pid_file = tmp_path / "child.pid"
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as err:
        run_checked([sys.executable, "-c", SCRIPT, "hang", str(pid_file)], timeout=10)
    assert time.monotonic() - t0 < 40
    message = str(err.value)
    assert "ran past 10 s" in message and "started" in message
    assert "parent_waits_here" in message and "child_waits_here" in message  # both processes' stacks
    assert _gone_soon(int(pid_file.read_text()))


def test_a_finished_command_leaves_no_process_behind(tmp_path):
    pid_file = tmp_path / "child.pid"
    log = run_checked([sys.executable, "-c", SCRIPT, "exit", str(pid_file)], timeout=60)
    assert "started" in log
    assert _gone_soon(int(pid_file.read_text()))


def test_a_failing_command_fails_the_test_with_its_output():
    with pytest.raises(AssertionError, match="no such luck"):
        run_checked([sys.executable, "-c", "import sys; sys.exit('no such luck')"])


def test_a_hung_two_process_launch_fails_with_the_workers_stacks_and_kills_them(tmp_path):
    """The real case: torch's launcher starts each worker in a session of its own. A launch whose workers
    hang fails with each worker's stack, and neither worker survives."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, sys, time\n"
        "def worker_waits_here():\n"
        "    time.sleep(600)\n"
        "open(os.path.join(sys.argv[1], 'pid.' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
        "worker_waits_here()\n"
    )
    with pytest.raises(AssertionError) as err:
        launch_two_cpu_processes(str(tmp_path), script=str(script), timeout=40)  # start-up takes seconds on a busy CI
    assert "ran past 40 s" in str(err.value) and str(err.value).count("worker_waits_here") >= 2  # both workers' stacks
    pids = [int((tmp_path / f"pid.{rank}").read_text()) for rank in (0, 1)]
    assert all(_gone_soon(pid) for pid in pids)
