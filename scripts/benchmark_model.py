#!/usr/bin/env python3
"""Model throughput: forward+backward images/s and achieved GFLOP/s of CA-MAE pre-training steps.

Measures, in one run on this machine:
  * the fp32 matmul peak (4096 x 4096 x 4096 `torch.mm`, median of repeats),
  * hf_cellmae `CellMAEForPreTraining` (tiny and ViT-S/16 presets) on 6 x 256 x 256 images,
  * transformers' `ViTMAEForPreTraining` at the same width/depth on the same images,
and prints images/s, GFLOP per image (counted with `torch.utils.flop_counter`, attention added
analytically where the CPU kernel is not counted) and achieved FLOP/s as a share of the matmul peak.

    python scripts/benchmark_model.py [--batch-size 2] [--steps 3] [--presets tiny vit_s16] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining


def matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def attention_is_counted() -> bool:
    """Whether FlopCounterMode counts the SDPA kernel on this device (it does not on some CPU builds)."""
    q = torch.randn(1, 2, 8, 4)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    return counter.get_total_flops() > 0


def attention_flops(config: CellMAEConfig, batch: int, channels: int) -> int:
    """Forward FLOPs of the attention products (QK^T and AV: 4 * Lq * Lk * width per layer)."""
    tokens = channels * config.tokens_per_channel
    visible = 1 + int(tokens * (1 - config.mask_ratio))
    flops = config.num_hidden_layers * 4 * visible * visible * config.hidden_size
    width = config.decoder_hidden_size
    if config.decoder_type == "shared":
        flops += config.decoder_num_hidden_layers * 4 * tokens * tokens * width
    else:
        per = config.tokens_per_channel
        flops += 4 * tokens * tokens * width + channels * config.decoder_num_hidden_layers * 4 * per * per * width
    return batch * flops


def vit_mae_attention_flops(config: ViTMAEConfig, batch: int) -> int:
    tokens = (config.image_size // config.patch_size) ** 2
    visible = 1 + int(tokens * (1 - config.mask_ratio))
    return batch * (
        config.num_hidden_layers * 4 * visible**2 * config.hidden_size
        + config.decoder_num_hidden_layers * 4 * (tokens + 1) ** 2 * config.decoder_hidden_size
    )


def time_steps(model, step, steps: int, bf16: bool) -> float:
    """Median seconds of a forward+backward step after one warm-up step."""
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(model, step) -> int:
    with FlopCounterMode(display=False) as counter:
        step().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["tiny", "vit_s16"])
    parser.add_argument("--bf16", action="store_true", help="time under bf16 autocast (FLOP share still vs the fp32 peak)")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, channels, size = args.batch_size, args.channels, args.image_size
    peak = matmul_peak_gflops()
    add_attention = not attention_is_counted()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s")
    print(f"images: {batch} x {channels} x {size} x {size}; attention FLOPs {'added analytically' if add_attention else 'counted'}")
    print(f"{'model':<34}{'s/step':>8}{'img/s':>8}{'GFLOP/img':>11}{'GFLOP/s':>9}{'% peak':>8}")
    pixels = torch.randn(batch, channels, size, size)
    results = {}
    for preset in args.presets:
        config = CellMAEConfig.from_preset(preset, image_size=size, max_channels=max(channels, 11))
        model = CellMAEForPreTraining(config).train()
        step = lambda: model(pixels, mask_seed=0).loss  # noqa: E731
        flops = count_flops(model, step) + (3 * attention_flops(config, batch, channels) if add_attention else 0)
        seconds = time_steps(model, step, args.steps, args.bf16)
        results[f"hf_cellmae {preset}"] = (seconds, flops)
        # transformers' ViT-MAE at the same encoder/decoder width and depth (not channel-agnostic:
        # one token per 16x16x6 patch, so 6x fewer tokens per image).
        reference = ViTMAEConfig(
            image_size=size, patch_size=config.patch_size, num_channels=channels,
            hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
            decoder_hidden_size=config.decoder_hidden_size, decoder_num_hidden_layers=config.decoder_num_hidden_layers,
            decoder_num_attention_heads=config.decoder_num_attention_heads,
            decoder_intermediate_size=config.decoder_intermediate_size, mask_ratio=config.mask_ratio,
        )
        vit_mae = ViTMAEForPreTraining(reference).train()
        noise = torch.rand(batch, (size // config.patch_size) ** 2, generator=torch.Generator().manual_seed(0))
        ref_step = lambda: vit_mae(pixel_values=pixels, noise=noise).loss  # noqa: E731
        ref_flops = count_flops(vit_mae, ref_step) + (3 * vit_mae_attention_flops(reference, batch) if add_attention else 0)
        results[f"transformers ViTMAE {preset}-size"] = (time_steps(vit_mae, ref_step, args.steps, args.bf16), ref_flops)
        for name in (f"hf_cellmae {preset}", f"transformers ViTMAE {preset}-size"):
            seconds, flops = results[name]
            achieved = flops / seconds / 1e9
            print(f"{name:<34}{seconds:>8.3f}{batch / seconds:>8.2f}{flops / batch / 1e9:>11.2f}{achieved:>9.1f}{100 * achieved / peak:>7.1f}%")
        ours, theirs = results[f"hf_cellmae {preset}"], results[f"transformers ViTMAE {preset}-size"]
        ratio = (ours[1] / ours[0]) / (theirs[1] / theirs[0])
        print(f"  -> {preset}: hf_cellmae achieves {ratio:.2f}x the FLOP/s of transformers' ViTMAE at the same size")


if __name__ == "__main__":
    main()
