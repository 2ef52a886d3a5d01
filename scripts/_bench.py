"""What the benchmark and measurement scripts share: one timing loop, one matmul peak, one peak-memory reading.

* ``interleaved_rounds``: seconds per call of several variants, after warm-up rounds, every variant once per
  round in turn, so that a change in the machine's load during the measurement hits every variant alike;
  scripts report the median of the rounds (``median_seconds`` for a single variant).
* ``matmul_peak``: FLOP/s of a square matmul, the ceiling that achieved FLOP/s and MFU are measured against.
* ``peak_mib_of`` / ``report_peak_and_exit``: peak resident memory (``ru_maxrss``) of a measured run in a fresh
  process (a script's hidden ``--one`` mode), of that process and of its largest child (a DataLoader worker).

Scripts import it as ``from _bench import ...``: Python puts a script's folder on the path when it runs one.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import NoReturn, TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the queued kernels of a CUDA device, so that a timer reads their end (no-op elsewhere)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rounds(
    runs: Mapping[Key, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
    after_round: Callable[[int, bool], None] | None = None,
) -> dict[Key, list[float]]:
    """Seconds of each call of each run: `warmup` untimed rounds, then `rounds` timed ones, each round calling
    every run once, in order. `after_round(index, warming_up)` runs after every round (index 0 is the first
    round, warm-up included), outside the timings."""
    times: dict[Key, list[float]] = {name: [] for name in runs}
    for index in range(warmup + rounds):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
        if after_round is not None:
            after_round(index, index < warmup)
    return times


def median_seconds(
    run: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | str | None = None
) -> float:
    """Median seconds of `repeats` calls of `run` after `warmup` untimed ones."""
    return statistics.median(interleaved_rounds({"run": run}, repeats, warmup, device)["run"])


def matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of a `size` x `size` by `size` x `size` matmul in `dtype` on `device`: the median of `repeats`
    after one warm-up, on the same device and threads as the work it is compared with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / median_seconds(lambda: torch.mm(a, b), repeats, warmup=1, device=device)


def report_peak_and_exit(code: int) -> NoReturn:
    """End a measured child (a script's `--one` mode): print, on the last line, its peak resident memory and
    that of its largest child process, in KiB (Linux's unit for ru_maxrss), then exit with `code`."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    largest_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak_kib {own} {largest_child}")
    sys.exit(code)


def peak_mib_of(command: list[str]) -> tuple[float, float, float]:
    """Run `command` (a child that ends with `report_peak_and_exit`) in a fresh process: the peak resident MiB of
    that process, the peak resident MiB of its largest child (0 without one), and the wall seconds."""
    start = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    main_kib, child_kib = result.stdout.strip().splitlines()[-1].split()[-2:]
    return int(main_kib) / 1024, int(child_kib) / 1024, seconds
