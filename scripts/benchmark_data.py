"""Data-stage throughput: shard writing, and streaming decode + crop + augment (+ standardise) samples/s.

Default workload: 6-channel 512 x 512 uint16 fields written as 16-bit PNGs in the RxRx layout, sharded,
then streamed as 6 x 256 x 256 crops (4 per field). "per core" figures come from one process reading
the stream in its main loop (no DataLoader workers); the last line uses DataLoader workers.

    python scripts/benchmark_data.py [--fields 64] [--field-size 512] [--crop 256] [--workdir DIR]

Target: >= 1,000 samples/s per core streamed (so a 16-core GPU host feeds > 10k samples/s). Every figure
includes the per-field CRC-32 check the stream makes on each read.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_inputs(root: Path, fields: int, size: int, channels: int) -> int:
    """RxRx-layout 16-bit PNGs with smooth, image-like content (random noise would not compress like real data)."""
    import imagecodecs

    rng = np.random.default_rng(0)
    total = 0
    base = rng.normal(size=(channels, size // 16, size // 16))
    for index in range(fields):
        well = f"{'ABCDEFGHIJKLMNOP'[index // 24 % 16]}{index % 24 + 1:02d}"
        low = np.kron(base + 0.3 * rng.normal(size=base.shape), np.ones((16, 16)))
        pixels = np.clip(8000 + 3000 * low + rng.normal(0, 300, size=(channels, size, size)), 0, 65535).astype(
            np.uint16
        )
        plate_dir = root / "bench" / f"Plate{index // 384 + 1}"
        plate_dir.mkdir(parents=True, exist_ok=True)
        for c in range(channels):
            (plate_dir / f"{well}_s{index // 384 + 1}_w{c + 1}.png").write_bytes(
                imagecodecs.png_encode(pixels[c], level=1)
            )
        total += pixels.nbytes
    return total


def time_stream(shard_dir: str, seconds: float, **options) -> float:
    from hf_cellmae.data.streaming import stream_fields

    stream = stream_fields(shard_dir, num_epochs=None, **options)
    iterator = iter(stream)
    for _ in range(8):  # warm-up: imports, first row group
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += 1
    return count / (time.perf_counter() - start)


def time_loader(shard_dir: str, workers: int, seconds: float, crop: int) -> float:
    import torch

    from hf_cellmae.data.streaming import stream_fields

    stream = stream_fields(shard_dir, image_size=crop, crops_per_field=4, num_epochs=None, num_workers=workers)
    loader = torch.utils.data.DataLoader(stream, batch_size=32, num_workers=workers)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += next(iterator)["pixel_values"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, default=64)
    parser.add_argument("--field-size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each streaming measurement")
    parser.add_argument("--workdir", help="keep inputs and shards here (default: a temporary folder)")
    args = parser.parse_args()

    from hf_cellmae.data.shards import shard_folder

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cellmae-bench-"))
    cores = os.cpu_count() or 1
    print(
        f"machine: {platform.processor() or platform.machine()}, {cores} cores; workload: {args.fields} fields of "
        f"{args.channels}x{args.field_size}x{args.field_size} uint16 -> {args.channels}x{args.crop}x{args.crop} crops"
    )
    try:
        pixel_bytes = write_inputs(workdir / "images", args.fields, args.field_size, args.channels)
        for workers in (1, cores):
            out = workdir / f"shards-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            manifest = shard_folder(
                workdir / "images", out, num_workers=workers, progress=False, target_shard_size="64MB"
            )
            elapsed = time.perf_counter() - start
            print(
                f"shard writing, {workers} process(es): {manifest['num_fields'] / elapsed:8.1f} fields/s  "
                f"{pixel_bytes / elapsed / 2**20:8.1f} MiB/s of pixels (PNG decode included; {manifest['num_shards']} shards)"
            )
        start = time.perf_counter()
        again = shard_folder(workdir / "images", out, num_workers=cores, progress=False, target_shard_size="64MB")
        print(
            f"idempotent re-run: {again['shards_reused']}/{again['num_shards']} shards reused in {time.perf_counter() - start:.2f} s"
        )

        shards = str(out)
        crop = dict(image_size=args.crop, crops_per_field=4)
        print(
            f"stream, 1 core, decode+crop only            : {time_stream(shards, args.seconds, augment=False, standardize=False, **crop):8.0f} samples/s"
        )
        print(
            f"stream, 1 core, decode+crop+augment          : {time_stream(shards, args.seconds, augment=True, standardize=False, **crop):8.0f} samples/s"
        )
        print(
            f"stream, 1 core, decode+crop+augment, views  : {time_stream(shards, args.seconds, augment=True, standardize=False, contiguous=False, **crop):8.0f} samples/s  (what `cellmae pretrain` streams; standardised on the device)"
        )
        print(
            f"stream, 1 core, views, on_error='skip'       : {time_stream(shards, args.seconds, augment=True, standardize=False, contiguous=False, on_error='skip', **crop):8.0f} samples/s  (batched map that can drop corrupt fields)"
        )
        print(
            f"stream, 1 core, decode+crop+augment+standardise: {time_stream(shards, args.seconds, augment=True, standardize=True, **crop):8.0f} samples/s"
        )
        print(
            f"stream, 1 core, + random 3-channel subsets    : {time_stream(shards, args.seconds, augment=True, standardize=True, channel_subset=3, **crop):8.0f} samples/s"
        )
        print(
            f"DataLoader, {cores} workers, batch 32, standardised: {time_loader(shards, cores, args.seconds, args.crop):8.0f} samples/s"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
