"""How much memory one training step needs, estimated before the run starts (no model is built).

The estimate is approximate, on purpose simple, and written out so a user can check it:

    total = parameters x 4 B                      (fp32 master weights)
          + parameters x 4 B                      (gradients)
          + parameters x 4 B x optimizer_states   (AdamW: 2, Lion: 1)
          + activations
          + RUNTIME_BYTES                         (torch, the interpreter, the DataLoader's batch)
          + workers x WORKER_BYTES                (each DataLoader worker is a process of its own)

    activations = batch x [ (encoder_tokens x hidden_size x encoder_blocks)
                            + (decoder_tokens x decoder_hidden_size x decoder_blocks) ]
                        x VALUES_PER_TOKEN_WIDTH x bytes_per_value
                + batch x channels x image_size^2 x PIXEL_VALUES x 4 B

    encoder_tokens = 1 + ceil((1 - mask_ratio) x channels x tokens_per_channel)   (visible tokens only)
    decoder_tokens = 1 + channels x tokens_per_channel                             (every token)

`VALUES_PER_TOKEN_WIDTH` (values a transformer block keeps for the backward pass, per token and per unit
of width, with mlp_ratio 4 and SDPA attention, which stores no token x token matrix) and `PIXEL_VALUES`
(copies of the pixels held by patchify, the targets and the Fourier loss) were checked against measured
CPU steps: 0.97-1.10x (`scripts/measure_train_memory.py`, docs/training_memory.md). bf16/fp16 halve the
activation bytes; gradient checkpointing keeps one block's activations plus each block's input.

How long a step takes on a CPU, more roughly (to tell a user what a GPU-sized run would cost there):

    step FLOPs = 3 (forward + backward) x batch x sum over blocks of
                 tokens x [2 x (4 + 2 x mlp_ratio) x width^2 + 4 x tokens x width]   (projections + MLP, attention)
    seconds    = step FLOPs / (STEP_EFFICIENCY x this CPU's fp32 matmul speed, measured in a fraction of a second)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..configuration_cellmae import CellMAEConfig

# Checked against measured CPU steps (scripts/measure_train_memory.py, docs/training_memory.md).
VALUES_PER_TOKEN_WIDTH = 24
PIXEL_VALUES = 24
RUNTIME_BYTES = 600 * 2**20
WORKER_BYTES = 500 * 2**20
OPTIMIZER_STATES = {"adamw": 2, "lion": 1}
# Share of the measured matmul speed a training step reaches on a CPU: 44-78% in the README's benchmarks.
STEP_EFFICIENCY = 0.5


@dataclass
class MemoryEstimate:
    """The terms of the estimate, in bytes."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def describe(self) -> str:
        gib = 2**30
        return (
            f"{self.total / gib:.1f} GiB (weights {self.weights / gib:.2f} + gradients {self.gradients / gib:.2f} + "
            f"optimizer {self.optimizer / gib:.2f} + activations {self.activations / gib:.2f} + runtime and workers "
            f"{self.runtime / gib:.2f}; {self.parameters / 1e6:.1f} M parameters)"
        )


def count_parameters(config: CellMAEConfig) -> int:
    """Parameters of `CellMAEForPreTraining(config)`, counted with empty (meta) weights: no memory allocated."""
    from accelerate import init_empty_weights

    from ..modeling_cellmae import CellMAEForPreTraining

    with init_empty_weights():
        model = CellMAEForPreTraining(config)
    return sum(p.numel() for p in model.parameters())


def activation_bytes(
    config: CellMAEConfig,
    batch_size: int,
    num_channels: int,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
) -> int:
    """The activations term of the module docstring's formula."""
    tokens_per_channel = config.tokens_per_channel
    encoder_tokens = 1 + math.ceil((1 - config.mask_ratio) * num_channels * tokens_per_channel)
    decoder_tokens = 1 + num_channels * tokens_per_channel
    encoder_blocks, decoder_blocks = config.num_hidden_layers, config.decoder_num_hidden_layers
    if gradient_checkpointing:  # one block's activations in flight, plus each block's saved input
        encoder_blocks = 1 + encoder_blocks / VALUES_PER_TOKEN_WIDTH
        decoder_blocks = 1 + decoder_blocks / VALUES_PER_TOKEN_WIDTH
    bytes_per_value = 2 if mixed_precision in ("bf16", "fp16") else 4
    per_image = (
        (
            encoder_tokens * config.hidden_size * encoder_blocks
            + decoder_tokens * config.decoder_hidden_size * decoder_blocks
        )
        * VALUES_PER_TOKEN_WIDTH
        * bytes_per_value
    )
    pixels = num_channels * config.image_size**2 * PIXEL_VALUES * 4
    return int(batch_size * (per_image + pixels))


def estimate_training_memory(
    config: CellMAEConfig,
    batch_size: int,
    num_channels: int,
    optimizer: str = "adamw",
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    num_workers: int = 0,
    parameters: int | None = None,
) -> MemoryEstimate:
    """The memory one training process needs for a step of `batch_size` images (module docstring)."""
    parameters = count_parameters(config) if parameters is None else parameters
    return MemoryEstimate(
        parameters=parameters,
        weights=4 * parameters,
        gradients=4 * parameters,
        optimizer=4 * parameters * OPTIMIZER_STATES.get(optimizer, 2),
        activations=activation_bytes(config, batch_size, num_channels, mixed_precision, gradient_checkpointing),
        runtime=RUNTIME_BYTES + num_workers * WORKER_BYTES,
    )


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the kernel's MemAvailable, lowered by a cgroup (container) limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # cgroup v2: a container's limit can be far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def largest_batch_that_fits(estimate_for, available: int, start: int) -> int:
    """The largest batch below `start` whose estimate (`estimate_for(batch).total`) fits in `available`; 0 if none."""
    batch = start
    while batch >= 1:
        if estimate_for(batch).total <= available:
            return batch
        batch //= 2
    return 0


def processes_on_this_machine() -> int:
    """Training processes sharing this machine's memory (`accelerate launch` sets LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def step_flops(config: CellMAEConfig, batch_size: int, num_channels: int) -> float:
    """Approximate FLOPs of one training step of `CellMAEForPreTraining(config)` (module docstring)."""
    tokens_per_channel = config.tokens_per_channel
    encoder_tokens = 1 + math.ceil((1 - config.mask_ratio) * num_channels * tokens_per_channel)
    decoder_tokens = 1 + num_channels * tokens_per_channel

    def blocks(tokens: int, width: int, depth: int, mlp_ratio: float) -> float:
        return depth * tokens * (2 * (4 + 2 * mlp_ratio) * width**2 + 4 * tokens * width)

    forward = blocks(encoder_tokens, config.hidden_size, config.num_hidden_layers, config.mlp_ratio) + blocks(
        decoder_tokens, config.decoder_hidden_size, config.decoder_num_hidden_layers, config.decoder_mlp_ratio
    )
    return 3.0 * batch_size * forward


def matmul_flops_per_second(size: int = 512, repeats: int = 5) -> float:
    """This machine's fp32 matmul speed (FLOP/s), the best of `repeats` `size` x `size` products."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:,.0f} hours"
    return f"{seconds / 60:,.0f} minutes"


def check_cpu_run_length(args, config_name: str, hardware: str) -> None:
    """Refuse (``UserError``) a config sized for GPUs run on a CPU for the config's `max_steps`.

    The message gives the estimated time (:func:`step_flops` at this CPU's measured matmul speed) and memory of
    the run as configured, and the two ways on: `--max-steps N` (a length the user chose: then it runs), or the
    CPU config `demo_cpu`. Called only when `--max-steps` was not typed.
    """
    from ..data.shards import load_manifest
    from ..errors import UserError
    from .models import model_config

    manifest = load_manifest(args.data)
    config = model_config(args, manifest)
    channels = args.channel_subset or len(manifest["channels"])
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
    seconds_per_step = step_flops(config, batch, channels) / (STEP_EFFICIENCY * matmul_flops_per_second())
    precision = "no" if args.mixed_precision in (None, "auto") else args.mixed_precision
    memory = estimate_training_memory(
        config,
        args.per_device_train_batch_size,
        channels,
        args.optimizer,
        precision,
        args.gradient_checkpointing,
        args.dataloader_num_workers or 0,
    )
    an_hour = max(1, int(3600 / seconds_per_step))
    raise UserError(
        f"{config_name} is sized for GPUs ({hardware.split('. ')[0].rstrip('.')}) and this machine has none: its {args.max_steps:,} steps of "
        f"batch {batch} ({config.image_size} px crops, {config.hidden_size}-wide encoder) would take about "
        f"{_duration(args.max_steps * seconds_per_step)} here (~{seconds_per_step:.2g} s a step, a rough estimate from the "
        f"step's FLOPs and this CPU's measured matmul speed) and {memory.total / 2**30:.1f} GiB; pass --max-steps N to train "
        f"that many steps here (about {an_hour:,} in an hour), or use --config demo_cpu (a tiny model, 1,600 steps, minutes on a laptop)"
    )


def check_training_memory(args, announce=print) -> MemoryEstimate | None:
    """Refuse (``UserError``) a CPU run whose estimated memory exceeds what the machine has available.

    The message gives the estimate and what fits: a smaller `--per-device-train-batch-size`, or the CPU
    config. On a GPU machine nothing is checked here (the device's memory is the limit there, and
    PyTorch's own out-of-memory error names it). Returns the estimate, or None when not checked.
    """
    import torch

    from ..data.shards import load_manifest
    from ..errors import UserError
    from .models import model_config

    if torch.cuda.is_available():
        return None
    if getattr(args, "model_type", "cellmae") != "cellmae":
        announce(f"memory: not estimated for model_type={args.model_type} (the formula covers CA-MAE's transformer)")
        return None
    available = available_memory_bytes()
    if available is None:
        return None
    manifest = load_manifest(args.data)
    config = model_config(args, manifest)  # the model the loop builds (without a classifier's head)
    channels = args.channel_subset or len(manifest["channels"])
    parameters = count_parameters(config)
    processes = processes_on_this_machine()
    # What the loop resolves "auto"/None to on a CPU (training/device_defaults.py): fp32, no worker processes.
    default_workers = 0 if args.dataloader_num_workers is None else args.dataloader_num_workers
    precision = "no" if args.mixed_precision in (None, "auto") else args.mixed_precision

    def estimate_for(batch: int, workers: int = default_workers) -> MemoryEstimate:
        return estimate_training_memory(
            config, batch, channels, args.optimizer, precision, args.gradient_checkpointing, workers, parameters
        )

    batch = args.per_device_train_batch_size
    estimate = estimate_for(batch)
    gib = 2**30
    crops = f"batch {batch} of {channels} x {config.image_size} x {config.image_size} px crops"
    if estimate.total * processes <= available:
        announce(
            f"memory: estimated {estimate.total / gib:.1f} GiB per process for {crops}; {available / gib:.1f} GiB available"
        )
        return estimate
    suggestion = "no batch of this model fits: use a smaller model (--model-preset tiny, or --config demo_cpu)"
    for workers in dict.fromkeys((default_workers, 0)):  # fewer worker processes free memory too
        fits = largest_batch_that_fits(
            lambda b, workers=workers: estimate_for(b, workers), available // processes, batch
        )
        if fits:
            accumulate = math.ceil(batch / fits) * args.gradient_accumulation_steps
            suggestion = (
                f"pass --per-device-train-batch-size {fits}"
                f"{' --dataloader-num-workers 0' if workers != default_workers else ''} "
                f"(estimated {estimate_for(fits, workers).total / gib:.1f} GiB; --gradient-accumulation-steps "
                f"{accumulate} keeps the effective batch)"
            )
            break
    raise UserError(
        f"this run would need about {estimate.describe()} per process for {crops}"
        f"{f' x {processes} processes' if processes > 1 else ''}, but this CPU machine has {available / gib:.1f} GiB "
        f"available; {suggestion}, or train on a GPU; --no-check-memory runs it anyway (the estimate is approximate: "
        "hf_cellmae/training/memory.py)"
    )
