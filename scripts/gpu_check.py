#!/usr/bin/env python3
"""One GPU check, in one run: train, resume, embed, and print one table.

On one GPU (sized for <= 8 minutes on an H100-class card with the defaults):
  1. renders a synthetic 6-stain screen and shards it (`cellmae shard`);
  2. trains a ViT-B/16 CA-MAE with `cellmae pretrain` (bf16 autocast, `torch.compile`, fused AdamW, a checkpoint half
     way): the loss must decrease; throughput in images/s and model FLOP utilisation (MFU) against the bf16 matmul
     peak measured in the same run (FLOPs of one training image counted with `torch.utils.flop_counter`);
  3. deletes the final model, resumes from the half-way checkpoint with the same command and compares the weights
     and the loss history with the uninterrupted run's, bit for bit;
  4. embeds the screen with the trained model (`embed_dataset`, DataLoader workers reading) and times the model's
     forward alone on the same crops: fields/s of each and their ratio.

    python scripts/gpu_check.py [--preset vit_b16] [--steps 300] [--batch-size 64] [--out gpu_check]
    python scripts/gpu_check.py --preset tiny    # the same path on a CPU in about a minute (run by the tests)

Prints a Markdown table (and writes it with the raw figures to OUT/gpu_check.json); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_embed import model_only, prepared_batches  # noqa: E402

from _bench import median_seconds  # noqa: E402

TINY_OVERRIDES = {
    "image_size": 32,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """TFLOP/s of a ``size``^3 matmul in ``dtype`` on ``device``: median of ``repeats`` after a warm-up."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) / (10 if device.type == "cuda" else 1))
    return 2 * size**3 / statistics.median(times) / 1e12


def training_flops_per_image(model_dir: Path, channels: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs of one training image (forward + backward, the run's mask ratio), counted on ``device``."""
    from torch.utils.flop_counter import FlopCounterMode

    from hf_cellmae import CellMAEForPreTraining

    model = CellMAEForPreTraining.from_pretrained(model_dir).to(device).train()
    size = model.config.image_size
    pixels = torch.randn(2, channels, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(pixels, mask_seed=0).loss
        loss.backward()
    return counter.get_total_flops() / 2


def pretrain(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "hf_cellmae.cli", "pretrain", *args], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise SystemExit(f"gpu_check: `cellmae pretrain` failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_b16", help="model preset (tiny: the CPU smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 300 on a GPU, 8 for tiny)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per step (default: 64 on a GPU, 4 for tiny)"
    )
    parser.add_argument("--plates", type=int, default=None, help="synthetic plates (default: 2 on a GPU, 1 for tiny)")
    parser.add_argument("--out", default="gpu_check", help="working folder (default: ./gpu_check)")
    args = parser.parse_args(argv)

    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import make_synthetic_screen
    from hf_cellmae.evaluation.embed import ModelFeaturizer, embed_dataset

    started = time.perf_counter()
    tiny = args.preset == "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (8 if tiny else 300)
    batch = args.batch_size or (4 if tiny else 64)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    # 1. a synthetic screen, sharded
    field = 64 if tiny else 512
    plate = make_synthetic_screen(
        out / "plate",
        num_plates=args.plates or (1 if tiny else 2),
        field_size=field,
        num_workers=0 if tiny else min(16, os.cpu_count() or 1),
        progress=False,
        **(
            {
                "num_pathways": 1,
                "complexes_per_pathway": 2,
                "genes_per_complex": 2,
                "control_wells_per_plate": 4,
                "sites_per_well": 2,
            }
            if tiny
            else {}
        ),
    )
    manifest = shard_folder(
        plate["images"],
        out / "shards",
        metadata=plate["metadata"],
        channel_names=plate["channels"],
        progress=False,
        num_workers=1 if tiny else min(8, os.cpu_count() or 1),
    )
    channels = len(plate["channels"])

    # 2. train with a checkpoint half way
    overrides = json.dumps(TINY_OVERRIDES if tiny else {})
    run = out / "run"
    common = [
        f"--data={out / 'shards'}",
        f"--output_dir={run}",
        f"--model_preset={args.preset}",
        f"--model_overrides={overrides}",
        f"--max_steps={steps}",
        f"--save_steps={steps // 2}",
        f"--per_device_train_batch_size={batch}",
        "--optimizer=adamw",
        "--learning_rate=1e-4" if not tiny else "--learning_rate=1e-3",
        f"--logging_steps={1 if tiny else 10}",
        "--figure_steps=0",
        "--report_to=none",
        "--progress_bar=false",
        "--crops_per_field=4",
        "--seed=0",
    ]
    if device.type == "cuda":
        common += ["--mixed_precision=bf16", "--torch_compile=true"]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if tiny else {})}
    train_s = pretrain(common, env)
    state = json.loads((run / "model" / "trainer_state.json").read_text())
    history = [(r["step"], r["loss"]) for r in state["log_history"]]
    losses = [loss for _, loss in history]
    k = max(1, len(losses) // 4)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    steady = [r["images_per_s"] for r in state["log_history"][len(state["log_history"]) // 3 :]] or [float("nan")]
    images_per_s = statistics.median(steady)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flops = training_flops_per_image(run / "model", channels, device, dtype)
    peak = matmul_peak_tflops(device, dtype, 8192 if device.type == "cuda" else 1024)
    mfu = flops * images_per_s / (peak * 1e12)

    # 3. resume from the half-way checkpoint: the same weights and losses, bit for bit
    from safetensors.torch import load_file

    uninterrupted = load_file(str(run / "model" / "model.safetensors"))
    shutil.rmtree(run / "model")
    resume_s = pretrain([*common, f"--resume_from_checkpoint={run / 'checkpoints' / f'checkpoint-{steps // 2}'}"], env)
    resumed = load_file(str(run / "model" / "model.safetensors"))
    resumed_history = [
        (r["step"], r["loss"]) for r in json.loads((run / "model" / "trainer_state.json").read_text())["log_history"]
    ]
    max_diff = max((uninterrupted[key].float() - resumed[key].float()).abs().max().item() for key in uninterrupted)
    exact = resumed.keys() == uninterrupted.keys() and all(
        torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted
    )

    # 4. embed the screen: end to end against the model alone, on the same crops
    featurizer = ModelFeaturizer(run / "model")
    batches = prepared_batches(featurizer, out / "shards", 16)
    model_only(featurizer, batches[:2])  # warm-up
    model_s = median_seconds(lambda: model_only(featurizer, batches), repeats=1, warmup=0, device=device)
    embed_once = time.perf_counter()
    info = embed_dataset(out / "shards", out / "embeddings", featurizer, progress=False)
    embed_s = time.perf_counter() - embed_once
    fields = manifest["num_fields"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    checks = {
        "loss decreases": last < first,
        "resume is bit-exact": exact and resumed_history == history,
        "every field embedded": info["num_rows"] == fields,
    }
    rows = [
        (
            "device",
            f"{name}, torch {torch.__version__}, {'bf16 autocast + torch.compile' if device.type == 'cuda' else 'fp32 eager'}",
        ),
        ("data", f"{fields} synthetic fields of {channels} x {field}² in {len(manifest['shards'])} shard(s)"),
        (
            "training",
            f"{args.preset}, {steps} steps x {batch} images, AdamW: loss {first:.4f} -> {last:.4f} "
            f"({'decreases' if last < first else 'DOES NOT DECREASE'}), {train_s:.0f} s with start-up",
        ),
        (
            "throughput",
            f"{images_per_s:.1f} images/s, {flops / 1e9:.3g} GFLOP per image: {flops * images_per_s / 1e12:.3g} "
            f"TFLOP/s, MFU {100 * mfu:.1f}% of the {peak:.3g} TFLOP/s {str(dtype).split('.')[-1]} matmul peak measured here",
        ),
        (
            "resume",
            f"checkpoint-{steps // 2} -> {steps}: weights {'bit-exact' if exact else f'DIFFER (max |diff| {max_diff:.2e})'}, "
            f"loss history {'identical' if resumed_history == history else 'DIFFERS'} ({resume_s:.0f} s)",
        ),
        (
            "embedding",
            f"{fields / embed_s:.1f} fields/s end to end (embed_dataset, {info['num_rows']} rows) vs "
            f"{fields / model_s:.1f} fields/s model only: {model_s / embed_s:.2f}",
        ),
        ("wall time", f"{time.perf_counter() - started:.0f} s"),
    ]
    table = "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    failed = [name for name, ok in checks.items() if not ok]
    print("gpu_check: all checks passed" if not failed else f"gpu_check: FAILED: {', '.join(failed)}")
    figures = {
        "rows": dict(rows),
        "checks": checks,
        "images_per_s": images_per_s,
        "flops_per_image": flops,
        "peak_tflops": peak,
        "mfu": mfu,
        "loss_first": first,
        "loss_last": last,
        "max_weight_diff": max_diff,
        "embed_fields_per_s": fields / embed_s,
        "model_only_fields_per_s": fields / model_s,
    }
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
