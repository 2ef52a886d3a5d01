#!/usr/bin/env python3
"""What the decoder costs: FLOPs per image and pre-training step time, per decoder size, side by side.

The decoder is thrown away after pre-training, yet MAE's 512-wide, 8-block decoder runs over every
token of every channel. For one encoder (ViT-S/16 by default) this prints, for OpenPhenom's
per-channel decoder and for the shared decoder at each size of `DECODER_PRESETS` (and any
`--extra WIDTHxDEPTH`):

* decoder forward FLOPs per image (6 x 256 x 256, mask 0.75), counted on the decoder module with
  `torch.utils.flop_counter` (attention products added analytically where this CPU's SDPA kernel is
  not counted),
  and its ratio to OpenPhenom's decoder;
* the training step (forward + backward) time, median of interleaved rounds (every variant once per
  round, after a warm-up round), and its ratio to the `mae` decoder's.

    python scripts/benchmark_decoder.py [--encoder vit_s16] [--batch 2] [--rounds 5] [--extra 384x4 128x2]

Representation quality of the decoder sizes is measured separately (`investigate_pretraining.py
--experiments decoder_heavy decoder_light`); docs/decoder.md records both.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
from hf_cellmae.configuration_cellmae import DECODER_PRESETS

# scripts/ is on the path when a script in it runs: the shared timing loop and benchmark_model's helpers
from _bench import interleaved_rounds
from benchmark_model import attention_is_counted


def decoder_attention_flops(config: CellMAEConfig, channels: int, per_channel_tokens: int) -> int:
    """Forward FLOPs of the decoder's attention products (QK^T and AV) for one image."""
    tokens, width = channels * per_channel_tokens, config.decoder_hidden_size
    if config.decoder_type == "shared":
        return config.decoder_num_hidden_layers * 4 * tokens * tokens * width
    per = per_channel_tokens
    return 4 * tokens * tokens * width + channels * config.decoder_num_hidden_layers * 4 * per * per * width


def decoder_flops(
    model: CellMAEForPreTraining, pixels: torch.Tensor, noise: torch.Tensor, add_attention: bool
) -> float:
    """Forward FLOPs per image of the decoder module (counted per module by FlopCounterMode)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixels, noise=noise)
    counted = sum(counter.get_flop_counts()[f"{type(model).__name__}.decoder"].values()) / pixels.shape[0]
    per_channel_tokens = (pixels.shape[-2] // model.config.patch_size) * (pixels.shape[-1] // model.config.patch_size)
    return counted + (
        decoder_attention_flops(model.config, pixels.shape[1], per_channel_tokens) if add_attention else 0
    )


def variants(encoder: str, extra: list[str]) -> dict[str, CellMAEConfig]:
    configs = {
        "OpenPhenom per-channel 512x8": CellMAEConfig.from_preset(
            encoder,
            decoder_type="per_channel",
            decoder_num_channels=6,
            decoder_hidden_size=512,
            decoder_num_hidden_layers=8,
            decoder_num_attention_heads=16,
            drop_path_rate=0.0,
        )
    }
    for name, sizes in DECODER_PRESETS.items():
        label = f"shared {sizes['decoder_hidden_size']}x{sizes['decoder_num_hidden_layers']} ({name})"
        configs[label] = CellMAEConfig.from_preset(encoder, decoder=name, drop_path_rate=0.0)
    for size in extra:
        width, depth = (int(v) for v in size.lower().split("x"))
        configs[f"shared {width}x{depth}"] = CellMAEConfig.from_preset(
            encoder,
            decoder_hidden_size=width,
            decoder_num_hidden_layers=depth,
            decoder_num_attention_heads=max(1, width // 32),
            drop_path_rate=0.0,
        )
    return configs


def training_step(model: CellMAEForPreTraining, pixels: torch.Tensor, noise: torch.Tensor) -> None:
    model(pixels, noise=noise).loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="vit_s16", help="encoder preset (default: vit_s16)")
    parser.add_argument("--batch", type=int, default=2, help="images per training step (default: 2)")
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds (default: 5)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="WIDTHxDEPTH", help="more shared decoder sizes")
    args = parser.parse_args()

    torch.manual_seed(0)
    configs = variants(args.encoder, args.extra)
    models = {name: CellMAEForPreTraining(config).train() for name, config in configs.items()}
    pixels = torch.randn(args.batch, args.channels, args.image_size, args.image_size)
    noise = torch.rand(
        args.batch,
        args.channels * (args.image_size // configs[next(iter(configs))].patch_size) ** 2,
        generator=torch.Generator().manual_seed(0),
    )
    add_attention = not attention_is_counted()
    flops = {name: decoder_flops(model, pixels, noise, add_attention) for name, model in models.items()}

    def round_done(index: int, warming_up: bool) -> None:
        print(f"round {index} done" + (" (warm-up)" if warming_up else ""), flush=True)

    steps = {name: functools.partial(training_step, model, pixels, noise) for name, model in models.items()}
    times = interleaved_rounds(steps, args.rounds, warmup=1, after_round=round_done)

    reference_flops = flops["OpenPhenom per-channel 512x8"]
    base = next(name for name in models if name.endswith("(mae)"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; encoder {args.encoder}; images {args.batch} x "
        f"{args.channels} x {args.image_size} x {args.image_size}, mask {configs[base].mask_ratio}; "
        f"attention {'added analytically' if add_attention else 'counted'}"
    )
    print(
        "| decoder | decoder GFLOP / image | vs OpenPhenom's decoder | training step, s (min-max) | step time vs mae |"
    )
    print("|---|---|---|---|---|")
    for name in models:
        median = statistics.median(times[name])
        print(
            f"| {name} | {flops[name] / 1e9:.1f} | {flops[name] / reference_flops:.2f}x | "
            f"{median:.2f} ({min(times[name]):.2f}-{max(times[name]):.2f}) | {median / statistics.median(times[base]):.2f}x |"
        )


if __name__ == "__main__":
    main()
