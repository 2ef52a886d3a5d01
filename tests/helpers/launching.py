"""Running `accelerate launch` from a test: every rank is killed if the run hangs, and the test fails saying why."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

# Two CPU processes through accelerate's launcher, on a free port, without the GPU-only defaults.
TWO_CPU_PROCESSES = [
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]


def cpu_launch_env() -> dict[str, str]:
    """The environment of a 2-process gloo run: CPU only, one thread per rank, this test's import path."""
    return {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }


def run_all_or_kill(command: list[str], env: dict[str, str], timeout: float, hang: str) -> subprocess.CompletedProcess:
    """Run `command` in a session of its own and return its result; after `timeout` seconds kill it with every
    process it started (killing the launcher alone would orphan the ranks) and fail the test with `hang` and
    the run's last output."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{hang} (killed after {timeout:.0f} s); the run's last output:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
