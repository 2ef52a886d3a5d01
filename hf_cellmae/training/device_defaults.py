"""Fast settings for the device a run lands on, resolved once before training.

A field of `PretrainingArguments` left at `"auto"`/`None` gets the fast choice for the device:

| setting | CUDA GPU | CPU (and others) |
|---|---|---|
| `mixed_precision` | `bf16` autocast, fp32 master weights (when the GPU has bf16) | `no` (CPU bf16 autocast is rarely faster) |
| `torch_compile` | on, when Dynamo and Triton are usable (else off, with the reason) | off |
| `dataloader_num_workers` | CPU cores per rank - 1, at most 8 (needs torchdata for exact resume) | 0: the cores do the compute |
| pinned memory | yes, with `non_blocking` copies | no |

A value the user set is kept (except that on a machine without CUDA, `cellmae pretrain` first replaces a config
file's GPU settings, bf16, compile and workers beyond the cores, by the CPU's: `settings_for_a_cpu`), and so is a half precision or a compile backend that `accelerate launch`
was given (config file or flags) when the training arguments leave it open. The launcher's "no" is not a
choice: it writes "no" whenever nothing was said, so `--mixed-precision no` / `--torch-compile false` in
the training arguments are the way to train in fp32 / eager on a GPU. The optimiser's fused/foreach kernel is chosen by
`optimization.build_optimizer` from the same device type; attention uses SDPA inside the model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field

MAX_AUTO_WORKERS = 8  # beyond this the streaming decoder is rarely the bottleneck


@dataclass(frozen=True)
class DeviceDefaults:
    """The settings a run trains with, and a line for every choice made for the user."""

    mixed_precision: str
    torch_compile: bool
    dataloader_num_workers: int
    pin_memory: bool
    notes: tuple[str, ...] = field(default=())


def resolve_device_defaults(
    *,
    device_type: str,
    mixed_precision: str = "auto",
    torch_compile: bool | None = None,
    dataloader_num_workers: int | None = None,
    cpus_per_process: int = 1,
    bf16_supported: bool = False,
    has_torchdata: bool = False,
    compile_problem: str | None = None,
    launcher_mixed_precision: str | None = None,
    launcher_compiles: bool | None = None,
) -> DeviceDefaults:
    """Fill the `"auto"`/`None` settings for `device_type` ("cuda", "cpu", ...); a pure function of its arguments.

    `compile_problem` says why `torch.compile` cannot run here (None when it can): a compile the user asked
    for is then turned off with that reason rather than failing at the first step.
    `launcher_mixed_precision` / `launcher_compiles`: what `accelerate launch` was told, if anything.
    """
    notes = []
    on_gpu = device_type == "cuda"
    if mixed_precision == "auto" and launcher_mixed_precision:
        mixed_precision = launcher_mixed_precision
    if torch_compile is None and launcher_compiles is not None:
        torch_compile = launcher_compiles
    if mixed_precision == "auto":
        mixed_precision = "bf16" if on_gpu and bf16_supported else "no"
        if on_gpu and not bf16_supported:
            notes.append("mixed_precision=no: this GPU has no bf16 (set --mixed-precision fp16 to use half precision)")
    if torch_compile is None:
        torch_compile = on_gpu
        if torch_compile and compile_problem:
            notes.append(f"torch.compile off: {compile_problem}; training runs eager")
            torch_compile = False
    elif torch_compile and compile_problem:
        notes.append(f"torch.compile was asked for but {compile_problem}; training runs eager")
        torch_compile = False
    if dataloader_num_workers is None:
        dataloader_num_workers = 0
        if on_gpu:
            if has_torchdata:
                dataloader_num_workers = max(1, min(MAX_AUTO_WORKERS, cpus_per_process - 1))
            else:
                notes.append(
                    "dataloader_num_workers=0: pip install torchdata to decode data in worker processes (exact resume needs it)"
                )
    return DeviceDefaults(
        mixed_precision, bool(torch_compile), int(dataloader_num_workers), pin_memory=on_gpu, notes=tuple(notes)
    )


def settings_for_a_cpu(config_values: dict, typed: set[str], cpus: int) -> dict[str, object]:
    """The settings of a training config (sized for GPUs) that a run on a CPU replaces, ``{field: new value}``.

    A CPU trains in fp32 (bf16 GEMMs run at about a tenth of fp32 on CPUs without bf16 units), eager, and with
    no more DataLoader workers than it has cores to spare: the config's ``mixed_precision`` bf16/fp16,
    ``torch_compile: true`` and a ``dataloader_num_workers`` above ``cpus - 1`` become ``"no"``, ``False`` and 0
    (the cores do the compute). A setting typed on the command line (``typed``) is the user's choice and kept.
    """
    changes: dict[str, object] = {}
    if "mixed_precision" not in typed and config_values.get("mixed_precision") in ("bf16", "fp16"):
        changes["mixed_precision"] = "no"
    if "torch_compile" not in typed and config_values.get("torch_compile"):
        changes["torch_compile"] = False
    workers = config_values.get("dataloader_num_workers")
    if "dataloader_num_workers" not in typed and workers and workers > max(0, cpus - 1):
        changes["dataloader_num_workers"] = 0
    return changes


def cpus_of_this_process() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def find_compile_problem(device_type: str) -> str | None:
    """Why `torch.compile` cannot run on this machine for `device_type`, or None."""
    import torch

    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python version"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed (pip install triton)"
    elif device_type == "cpu" and not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler for Inductor's CPU kernels"
    return None


def compile_backend() -> str:
    """The `torch.compile` backend `accelerate launch` was given (its dynamo_config), else Inductor."""
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO")
    return "inductor" if backend.upper() == "NO" else backend.lower()


def training_device_type() -> str:
    """ "cuda" when this process will train on a CUDA GPU (as accelerate decides it), else "cpu"."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


def detect_device_defaults(args) -> DeviceDefaults:
    """`resolve_device_defaults` for this machine and process (read before the Accelerator is built)."""
    import torch

    device_type = training_device_type()
    cpus = cpus_of_this_process()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    # accelerate launch always sets both, to "no"/"NO" when its config and flags say nothing.
    launcher_mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    launcher_compiles = True if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() != "NO" else None
    compiles = args.torch_compile if args.torch_compile is not None else launcher_compiles
    wants_compile = compiles is True or (compiles is None and device_type == "cuda")
    return resolve_device_defaults(
        device_type=device_type,
        mixed_precision=args.mixed_precision,
        torch_compile=args.torch_compile,
        dataloader_num_workers=args.dataloader_num_workers,
        cpus_per_process=max(1, cpus // max(1, local_processes)),
        bf16_supported=device_type == "cuda" and torch.cuda.is_bf16_supported(),
        has_torchdata=importlib.util.find_spec("torchdata") is not None,
        compile_problem=find_compile_problem(device_type) if wants_compile else None,
        launcher_mixed_precision=None if launcher_mixed_precision == "no" else launcher_mixed_precision,
        launcher_compiles=launcher_compiles,
    )
