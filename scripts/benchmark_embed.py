#!/usr/bin/env python3
"""Embedding throughput: `cellmae embed` end to end against the model alone, and 2 processes against 1.

Measures, side by side in one run on this machine (fields/s, medians of interleaved rounds):
  * model only: the encoder's forward (``ModelFeaturizer.embed_prepared``) on crops prepared beforehand, in the
    same batches `cellmae embed` makes, with all of torch's threads and with the threads `cellmae embed` leaves the
    model beside its reading workers on a CPU; the faster is the ceiling the ratios are taken against;
  * `embed_dataset` on a shard folder (plan, read, CRC check, crop, forward, write Parquet; model already loaded)
    with the reading done in the main process (``--num-workers 0``) and by DataLoader workers (the default);
  * `cellmae embed` as 1 process and as 2 processes (`accelerate launch`, gloo on CPUs), one thread each, reading
    in the main process: fields/s of the embedding loop (total fields / slowest process), and the commands' wall time.

Presets: ``tiny`` (64 px crops, 4 per 128 px field: the model is cheap, so reading dominates, as it will on a GPU)
and ``openphenom`` (ViT-S/16, 256 px crops). Random weights: throughput does not depend on them.

    python scripts/benchmark_embed.py [--presets tiny openphenom] [--rounds 3] [--device cpu] [--no-processes]
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _bench import interleaved_rounds  # scripts/_bench.py: the timing loop of every benchmark

# preset -> (fields, field size); the sizes: 240 fields of 5 x 128² at tiny, 60 of 5 x 256² at openphenom
WORKLOADS = {"tiny": (240, 128), "openphenom": (60, 256), "vit_s16": (60, 256), "vit_b16": (60, 256)}
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def make_shards(root: Path, fields: int, size: int, shards: int = 4) -> Path:
    """``fields`` random 5-stain uint16 fields of ``size`` px as PNGs (RxRx layout), sharded into ``shards`` shards."""
    import imagecodecs

    from hf_cellmae.data.shards import shard_folder

    rng = np.random.default_rng(0)
    images = root / "images"
    for index in range(fields):
        well = f"{'ABCDEFGHIJKLMNOP'[index // 24 % 16]}{index % 24 + 1:02d}"
        folder = images / "exp" / f"Plate{index // 384 + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 4000, size=(len(CHANNELS), size, size), dtype=np.uint16)
        for c in range(len(CHANNELS)):
            (folder / f"{well}_s1_w{c + 1}.png").write_bytes(imagecodecs.png_encode(pixels[c], level=1))
    per_shard = -(-fields // shards)
    shard_folder(
        images,
        root / "shards",
        channel_names=",".join(f"w{c + 1}={n}" for c, n in enumerate(CHANNELS)),
        target_shard_size=per_shard * len(CHANNELS) * size * size * 2,
        fields_per_row_group=8,
        num_workers=1,
        progress=False,
    )
    return root / "shards"


def make_model(folder: Path, preset: str) -> Path:
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    CellMAEForPreTraining(CellMAEConfig.from_preset(preset, channel_names=CHANNELS)).save_pretrained(folder)
    return folder


def prepared_batches(featurizer, shards: Path, fields_per_batch: int) -> list:
    """The batches `cellmae embed` forms, read and cropped up front: ``[(fields, prepared)]``."""
    from hf_cellmae.evaluation.embed import _run_task, plan_units

    units, _, _ = plan_units(shards, fields_per_batch=fields_per_batch)
    return [group for unit in units for task in unit.tasks for group in _run_task(task, featurizer.preparer)["groups"]]


def model_only(featurizer, batches) -> None:
    for fields, prepared in batches:
        featurizer.embed_prepared(fields, prepared)


def embed_once(featurizer, shards: Path, workdir: Path, workers: int, fields_per_batch: int) -> None:
    import shutil

    from hf_cellmae.evaluation.embed import embed_dataset

    out = workdir / f"embed-w{workers}"
    shutil.rmtree(out, ignore_errors=True)  # the previous round's table (milliseconds, inside the timing)
    embed_dataset(shards, out, featurizer, num_workers=workers, fields_per_batch=fields_per_batch, progress=False)


def in_process_table(preset: str, rounds: int, device: str, workdir: Path, fields_per_batch: int) -> list[str]:
    import torch

    from hf_cellmae.evaluation.embed import ModelFeaturizer, default_num_workers

    count, size = WORKLOADS[preset]
    root = workdir / preset
    shards = make_shards(root, count, size)
    featurizer = ModelFeaturizer(make_model(root / "model", preset), device=device)
    batches = prepared_batches(featurizer, shards, fields_per_batch)
    workers = max(default_num_workers(), 1)
    threads = torch.get_num_threads()
    beside = max(1, threads - workers)  # the model's threads when the workers read (embed caps them so on a CPU)

    def at_threads(count, run):
        def timed():
            torch.set_num_threads(count)
            try:
                return run()
            finally:
                torch.set_num_threads(threads)

        return timed

    variants = {f"model only, {threads} thread(s)": lambda: model_only(featurizer, batches)}
    if device == "cpu" and beside != threads:
        variants[f"model only, {beside} thread(s)"] = at_threads(beside, lambda: model_only(featurizer, batches))
    variants.update(
        {
            "embed, 0 workers": lambda: embed_once(featurizer, shards, root, 0, fields_per_batch),
            f"embed, {workers} worker(s)": lambda: embed_once(featurizer, shards, root, workers, fields_per_batch),
        }
    )
    times = interleaved_rounds(variants, rounds, warmup=1, device=device)
    base = min(statistics.median(values) for name, values in times.items() if name.startswith("model only"))
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append(
            f"| {preset} | {count} x 5 x {size}² | {name} | {count / median:.1f} | {min(values):.2f}-{max(values):.2f} s "
            f"| {base / median:.2f} |"
        )
    return rows


def loop_rate(output: str) -> tuple[int, float]:
    """(fields, seconds of the slowest process) from `cellmae embed`'s "N fields in T s" lines."""
    found = [(int(n), float(t)) for n, t in re.findall(r"embed: (\d+) fields in ([\d.]+) s \(", output)]
    if not found:
        raise RuntimeError(f"no timing line in the output:\n{output[-2000:]}")
    return sum(n for n, _ in found), max(t for _, t in found)


def processes_table(preset: str, rounds: int, workdir: Path) -> list[str]:
    import shutil

    root = workdir / preset
    shards, model = root / "shards", root / "model"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    embed = ["-m", "hf_cellmae.cli", "embed", str(model), str(shards)]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
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
    commands = {"1 process": [sys.executable], "2 processes": launch}
    rates: dict[str, list[float]] = {name: [] for name in commands}

    def run(name: str) -> None:
        out = root / f"cli-{name.replace(' ', '')}"
        shutil.rmtree(out, ignore_errors=True)
        result = subprocess.run(
            [*commands[name], *embed, str(out), "--num-workers", "0", "--no-progress", "--device", "cpu"],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
        fields, seconds = loop_rate(result.stdout + result.stderr)
        rates[name].append(fields / seconds)

    walls = interleaved_rounds({name: functools.partial(run, name) for name in commands}, rounds, warmup=0)
    one, two = statistics.median(rates["1 process"]), statistics.median(rates["2 processes"])
    wall_one, wall_two = statistics.median(walls["1 process"]), statistics.median(walls["2 processes"])
    return [
        f"| {preset} | 1 process | {one:.1f} | {wall_one:.1f} s | 1.00 |",
        f"| {preset} | 2 processes | {two:.1f} | {wall_two:.1f} s | {two / one:.2f} (wall {wall_one / wall_two:.2f}) |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "openphenom"], choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fields-per-batch", type=int, default=16)
    parser.add_argument("--no-processes", action="store_true", help="skip the 1 vs 2 processes comparison")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="benchmark_embed-"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), device "
        f"{args.device}; load average {load:.2f} at start; {args.rounds} interleaved rounds after a warm-up"
    )
    print("\n| preset | fields | run | fields/s (median) | range | / best model only |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for row in in_process_table(preset, args.rounds, args.device, workdir, args.fields_per_batch):
            print(row, flush=True)
    if not args.no_processes and args.device == "cpu":
        print(
            "\n`cellmae embed` loop, 1 thread per process, reading in the main process (fields/s = all fields / "
            "slowest process):\n\n| preset | processes | fields/s (median) | command wall time | speed-up |\n|---|---|---|---|---|"
        )
        for preset in args.presets:
            for row in processes_table(preset, args.rounds, workdir):
                print(row, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.2f} at the end")


if __name__ == "__main__":
    main()
