#!/usr/bin/env python3
"""Training throughput of `cellmae pretrain` (the real loop, streaming real shards).

For each configuration it runs the loop for a few logged windows and prints steps/s, images/s and the
share of wall time spent waiting for data (the model must never wait on data). On a CUDA machine it
also measures bf16 model-FLOP utilisation (MFU) of ViT-B/16 and ViT-L/8 CA-MAE steps against the
measured bf16 matmul peak.

    python scripts/benchmark_train.py [--steps 40] [--configs demo vit_s16] [--mfu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
from hf_cellmae.data.shards import shard_folder
from hf_cellmae.data.synthetic import make_synthetic_screen
from hf_cellmae.training.arguments import PretrainingArguments, read_config_file
from hf_cellmae.training.loop import pretrain

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "hf_cellmae" / "configs" / "demo_cpu.yaml"


def synthetic_shards(root: Path, field_size: int) -> Path:
    plate = make_synthetic_screen(root / f"plate{field_size}", field_size=field_size, num_plates=1, progress=False)
    shard_folder(plate["images"], root / f"shards{field_size}", metadata=plate["metadata"], channel_names=plate["channels"], progress=False)
    return root / f"shards{field_size}"


def run(name: str, values: dict, steps: int, root: Path) -> None:
    values = {**values, "max_steps": steps, "logging_steps": max(1, steps // 4), "save_steps": 10**9,
              "figure_steps": 0, "report_to": "none", "progress_bar": False, "output_dir": str(root / name)}
    start = time.perf_counter()
    pretrain(PretrainingArguments(**values))
    wall = time.perf_counter() - start
    history = json.loads((root / name / "model" / "trainer_state.json").read_text())["log_history"][1:]  # skip warm-up window
    images = statistics.median(r["images_per_s"] for r in history)
    batch = values["per_device_train_batch_size"] * values.get("gradient_accumulation_steps", 1)
    wait = statistics.median(r["data_wait_share"] for r in history)
    print(f"{name:<10} {images / batch:>8.2f} {images:>9.1f} {100 * wait:>10.1f}% {wall:>8.1f}")


def bf16_mfu(preset: str, batch: int, channels: int = 6) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    device = "cuda"
    size = 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    peak = 10 * 2 * size**3 / (time.perf_counter() - start)
    config = CellMAEConfig.from_preset(preset, image_size=256)
    model = CellMAEForPreTraining(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    pixels = torch.randn(batch, channels, 256, 256, device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    print(f"{preset:<10} batch {batch}: {batch / seconds:.1f} img/s, {flops / seconds / 1e12:.1f} TFLOP/s, "
          f"MFU {100 * flops / seconds / peak:.1f}% of the measured bf16 matmul peak ({peak / 1e12:.0f} TFLOP/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--configs", nargs="+", default=["demo", "vit_s16"])
    parser.add_argument("--mfu", action="store_true", help="measure bf16 MFU of ViT-B/16 and ViT-L/8 (needs CUDA)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{'config':<10} {'steps/s':>8} {'images/s':>9} {'data wait':>11} {'wall s':>8}")
        for name in args.configs:
            if name == "demo":
                values = read_config_file(DEMO_CONFIG)
                values["data"] = str(synthetic_shards(root, 128))
            elif name == "vit_s16":
                values = dict(data=str(synthetic_shards(root, 256)), model_preset="vit_s16", optimizer="lion",
                              per_device_train_batch_size=4, crops_per_field=1, learning_rate=1e-4,
                              mixed_precision="bf16" if torch.cuda.is_available() else "no")
            else:
                raise SystemExit(f"unknown config {name!r}: use demo or vit_s16")
            run(name, values, args.steps if name == "demo" else max(4, args.steps // 8), root)
    if args.mfu:
        if not torch.cuda.is_available():
            print("MFU: no CUDA device on this machine; run with --mfu on a GPU host.")
        else:
            bf16_mfu("vit_b16", batch=64)
            bf16_mfu("vit_l8", batch=8)


if __name__ == "__main__":
    main()
