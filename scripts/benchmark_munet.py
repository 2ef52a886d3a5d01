#!/usr/bin/env python3
"""MU-Net throughput: forward+backward images/s and achieved GFLOP/s of masked U-Net pre-training steps,
beside the CA-MAE figures of scripts/benchmark_model.py.

Measures, in one run on this machine:
  * the fp32 matmul peak (4096 x 4096 x 4096 `torch.mm`, median of repeats),
  * hf_cellmae `CellMUNetForPreTraining` at each preset on C x S x S images (parameters of the encoder and of
    the whole autoencoder, GFLOP per image counted with `torch.utils.flop_counter`, s/step, images/s),
  * optionally `CellMAEForPreTraining` presets on the same images (`--vit-presets vit_s16`).

    python scripts/benchmark_munet.py [--batch-size 2] [--steps 3] [--presets tiny munet_m] [--vit-presets vit_s16] [--bf16]
"""

from __future__ import annotations

import argparse
import functools

import torch

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining, CellMUNetConfig, CellMUNetForPreTraining

from _bench import matmul_peak  # scripts/_bench.py: the peak of every benchmark
from benchmark_model import count_flops, forward_loss, time_steps  # the CA-MAE figures' step timing and FLOP count


def millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["tiny", "munet_m"])
    parser.add_argument("--vit-presets", nargs="*", default=[], help="CA-MAE presets timed on the same images")
    parser.add_argument(
        "--bf16", action="store_true", help="time under bf16 autocast (FLOP share still vs the fp32 peak)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, channels, size = args.batch_size, args.channels, args.image_size
    peak = matmul_peak(torch.float32, repeats=5) / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul peak {peak:.1f} GFLOP/s")
    print(
        f"images: {batch} x {channels} x {size} x {size}; attention of CA-MAE rows not counted on CPU builds that skip SDPA"
    )
    print(
        f"{'model':<26}{'enc M':>8}{'all M':>8}{'s/step':>8}{'img/s':>8}{'GFLOP/img':>11}{'GFLOP/s':>9}{'% peak':>8}"
    )
    pixels = torch.randn(batch, channels, size, size)
    models = []
    for preset in args.presets:
        model = CellMUNetForPreTraining(CellMUNetConfig.from_preset(preset, image_size=size, num_channels=channels))
        models.append((f"MU-Net {preset}", model, model.munet))
    for preset in args.vit_presets:
        model = CellMAEForPreTraining(
            CellMAEConfig.from_preset(preset, image_size=size, max_channels=max(channels, 11))
        )
        models.append((f"CA-MAE {preset}", model, model.cellmae))
    for name, model, encoder in models:
        model.train()
        step = functools.partial(forward_loss, model, pixel_values=pixels, mask_seed=0)
        flops = count_flops(model, step)
        seconds = time_steps(model, step, args.steps, args.bf16)
        achieved = flops / seconds / 1e9
        print(
            f"{name:<26}{millions(encoder):>8.1f}{millions(model):>8.1f}{seconds:>8.3f}{batch / seconds:>8.2f}"
            f"{flops / batch / 1e9:>11.2f}{achieved:>9.1f}{100 * achieved / peak:>7.1f}%"
        )


if __name__ == "__main__":
    main()
