#!/usr/bin/env python3
"""Training throughput and model-FLOP utilisation (MFU), the same script on every machine.

For each model (ViT-S/16, ViT-B/16, ViT-L/8 CA-MAE by default) and precision (fp32, bf16 autocast
with fp32 master weights) it times the pre-training step exactly as `cellmae pretrain` runs it:
forward with masking, backward, gradient-norm clipping (which also flags NaN/inf gradients), the
optimizer step gated on the device (fused AdamW / foreach Lion), zero_grad; `torch.compile` on CUDA
by default. It reports images/s, tokens/s (every patch token of every channel, as the training log
does), the step's FLOPs counted by `torch.utils.flop_counter`, achieved FLOP/s, and MFU against the
peak of a square matmul in the same precision measured in the same run, on the same device and threads.

    python scripts/benchmark_train.py                                  # GPU: all models, fp32 and bf16
    python scripts/benchmark_train.py --models vit_s16 --precisions fp32 --batch 2 --rounds 3   # a CPU

`--loop` additionally runs the real loop (streaming synthetic shards) for a few logged windows and
reports its images/s and the share of wall time spent waiting for data.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
from hf_cellmae.training.device_defaults import find_compile_problem
from hf_cellmae.training.optimization import build_optimizer, skip_step_if

from _bench import matmul_peak, median_seconds  # scripts/_bench.py: the peak and timing loop of every benchmark

MODELS = ("vit_s16", "vit_b16", "vit_l8")
PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def training_step(model, optimizer, pixels, precision: str, max_grad_norm: float = 1.0):
    """One optimizer step as the loop runs it (no host read: the skip flag stays on the device)."""
    autocast = torch.autocast(pixels.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with autocast:
        loss = model(pixels).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    skip_step_if(optimizer, (~torch.isfinite(norm)).float())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_steps(model, optimizer, pixels, precision: str, steps: int) -> None:
    for _ in range(steps):
        training_step(model, optimizer, pixels, precision)


def measure(preset: str, precision: str, args, device: torch.device, peak: float) -> dict:
    torch.manual_seed(0)
    config = CellMAEConfig.from_preset(preset, image_size=args.image_size, max_channels=max(11, args.channels))
    model = CellMAEForPreTraining(config).to(device).train()
    optimizer = build_optimizer(model, args.optimizer, 1e-4, 0.05, (0.9, 0.95), device_type=device.type)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if compiled:
        problem = find_compile_problem(device.type)
        if problem:
            print(f"  torch.compile off for {preset}: {problem}")
            compiled = False
        else:
            model = torch.compile(model)
    pixels = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # eager, before timing: the model's FLOPs, not the compiler's
        training_step(getattr(model, "_orig_mod", model), optimizer, pixels, precision)
    flops = counter.get_total_flops()
    training_steps(model, optimizer, pixels, precision, args.warmup)
    one_round = functools.partial(training_steps, model, optimizer, pixels, precision, args.steps_per_round)
    step_s = median_seconds(one_round, args.rounds, warmup=0, device=device) / args.steps_per_round
    images_per_s = args.batch / step_s
    achieved = flops / step_s
    return {
        "model": preset,
        "precision": precision,
        "batch": args.batch,
        "channels": args.channels,
        "image_size": args.image_size,
        "compiled": compiled,
        "step_s": step_s,
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * args.channels * config.tokens_per_channel,
        "step_gflop": flops / 1e9,
        "achieved_tflop_s": achieved / 1e12,
        "peak_tflop_s": peak / 1e12,
        "mfu": achieved / peak,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
    }


def run_loop(name: str, steps: int, root: Path) -> None:
    """The real `cellmae pretrain` loop on synthetic shards: images/s and data-wait share (median of logged windows)."""
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import make_synthetic_screen
    from hf_cellmae.training.arguments import PretrainingArguments, read_config_file
    from hf_cellmae.training.loop import pretrain

    def shards(field_size: int) -> str:
        plate = make_synthetic_screen(root / f"plate{field_size}", field_size=field_size, num_plates=1, progress=False)
        shard_folder(
            plate["images"],
            root / f"shards{field_size}",
            metadata=plate["metadata"],
            channel_names=plate["channels"],
            progress=False,
        )
        return str(root / f"shards{field_size}")

    if name == "demo":
        values = read_config_file(Path(__file__).resolve().parents[1] / "hf_cellmae" / "configs" / "demo_cpu.yaml")
        values["data"] = shards(128)
    elif name == "vit_s16":
        values = dict(
            data=shards(256),
            model_preset="vit_s16",
            optimizer="lion",
            per_device_train_batch_size=4,
            learning_rate=1e-4,
        )
    else:
        raise SystemExit(f"unknown loop config {name!r}: use demo or vit_s16")
    values.update(
        max_steps=steps,
        logging_steps=max(1, steps // 4),
        save_steps=10**9,
        figure_steps=0,
        report_to="none",
        progress_bar=False,
        output_dir=str(root / name),
    )
    pretrain(PretrainingArguments(**values))
    history = json.loads((root / name / "model" / "trainer_state.json").read_text())["log_history"][
        1:
    ]  # skip warm-up window
    images = statistics.median(r["images_per_s"] for r in history)
    wait = statistics.median(r["data_wait_share"] for r in history)
    print(f"loop {name:<8} {images:>9.2f} images/s, {100 * wait:.1f}% of wall time waiting for data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help=f"presets ({', '.join(MODELS)}, tiny, openphenom)"
    )
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 64 on CUDA, 2 on CPU)")
    parser.add_argument("--channels", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "lion"))
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds, median reported (default 10 on CUDA, 3 on CPU)"
    )
    parser.add_argument("--steps-per-round", type=int, default=None, help="default 10 on CUDA, 1 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument(
        "--compile", default="auto", choices=("auto", "on", "off"), help="auto: on with CUDA, off on CPU"
    )
    parser.add_argument(
        "--peak-size", type=int, default=None, help="matmul side for the peak (default 8192 on CUDA, 2048 on CPU)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--loop", nargs="*", default=None, metavar="CONFIG", help="also run the real loop: demo and/or vit_s16"
    )
    parser.add_argument("--loop-steps", type=int, default=40)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    for name, gpu, cpu in (
        ("batch", 64, 2),
        ("rounds", 10, 3),
        ("steps_per_round", 10, 1),
        ("warmup", 5, 1),
        ("peak_size", 8192, 2048),
    ):
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    where = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__} on {where}; batch {args.batch} x {args.channels} x {args.image_size}^2, "
        f"{args.optimizer}, median of {args.rounds} rounds x {args.steps_per_round} steps"
    )
    peaks = {p: matmul_peak(DTYPES[p], device, args.peak_size, repeats=5) for p in args.precisions}
    for precision, peak in peaks.items():
        print(f"measured {precision} matmul peak ({args.peak_size}^2): {peak / 1e12:.3f} TFLOP/s")
    print(f"{'model':<9} {'prec':<5} {'img/s':>9} {'tokens/s':>11} {'GFLOP/step':>11} {'TFLOP/s':>9} {'MFU':>7}")
    rows = []
    for preset in args.models:
        for precision in args.precisions:
            row = measure(preset, precision, args, device, peaks[precision])
            rows.append(row)
            print(
                f"{preset:<9} {precision:<5} {row['images_per_s']:>9.2f} {row['tokens_per_s']:>11.0f} {row['step_gflop']:>11.1f} "
                f"{row['achieved_tflop_s']:>9.3f} {100 * row['mfu']:>6.1f}%",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    if args.loop is not None:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.loop or ["demo"]:
                run_loop(name, args.loop_steps, Path(tmp))


if __name__ == "__main__":
    main()
