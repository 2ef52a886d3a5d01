"""`cellmae shard` worker processes die with their parent, even when it is killed with kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers.data_fixtures import make_rxrx_plate


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO to hold a worker busy")
def test_kill_9_of_shard_leaves_no_worker_alive(tmp_path):
    make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01", "A02"), sites=2)
    busy = tmp_path / "images" / "exp" / "Plate1" / "A02_s2_w1.png"
    busy.unlink()
    os.mkfifo(busy)  # a worker opening it blocks until killed: the run is mid-way when we kill it
    command = [
        sys.executable,
        "-c",
        "import sys; from hf_cellmae.cli import main; sys.exit(main(sys.argv[1:]))",
        "shard",
        str(tmp_path / "images"),
        str(tmp_path / "shards"),
        "--layout",
        "rxrx",
        "--num-workers",
        "2",
        "--shard-size",
        "1",
        "--no-shuffle",
        "--quiet",
    ]
    shard = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = psutil.Process(shard.pid).children(recursive=True)
            time.sleep(0.2)
        assert len(workers) >= 2, "the shard run never started its workers"
        time.sleep(1.0)  # let the workers pick up tasks (one blocks on the FIFO)
        os.kill(shard.pid, signal.SIGKILL)
        shard.wait(10)
        deadline = time.monotonic() + 5
        while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w.pid for w in workers if not _gone(w)] == []
    finally:
        for process in workers:  # never leave a stray process behind, whatever the outcome
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        if shard.poll() is None:
            shard.kill()
