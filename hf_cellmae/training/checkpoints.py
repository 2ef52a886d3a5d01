"""Resumable checkpoints: written atomically, the newest K kept, `latest` found by scanning.

A checkpoint is a folder `checkpoint-{step}` holding accelerate's `save_state` (model weights in
safetensors, optimizer and RNG states of every rank), the learning-rate schedule's position
(`scheduler_state.json`), the data position of every rank (`data_state_rank{r}.json`) and
`trainer_state.json`. It is written under a temporary name and renamed when complete, so a crash
while saving never leaves a broken newest checkpoint.

Resuming never runs code from the folder: every pickle in it is read with `weights_only=True`
(tensors and plain values only), and one that asks for more is refused with `UntrustedFileError`.
The scheduler is not registered with accelerate, whose `custom_checkpoint_*.pkl` files are always
read with `weights_only=False`. FSDP's sharded checkpoints hold `.metadata` files that torch reads
with plain `pickle.load`; they are first checked with an allow-list unpickler.

The loadable model folder (`save_model_folder`: weights, config, processor, model code) is written at the end of
a run and, with `save_model_with_checkpoints`, inside each checkpoint; the FSDP helpers below it are what the
loop and trainer_state.json need to know of a sharded model.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, untrusted_pickle_error

if TYPE_CHECKING:
    from ..modeling_cellmae import CellMAEForPreTraining
    from .arguments import PretrainingArguments

PREFIX = "checkpoint-"
_NAME = re.compile(rf"{PREFIX}(\d+)")
SCHEDULER_STATE = "scheduler_state.json"
# Written by hf_cellmae before the scheduler state became JSON: the scheduler, pickled by accelerate.
LEGACY_SCHEDULER_STATE = "custom_checkpoint_0.pkl"
_ACCELERATE_CUSTOM_STATE = re.compile(r"custom_checkpoint_\d+\.pkl")
NOT_TRUSTED_FIX = (
    "resume only from checkpoints your own runs wrote: pass another checkpoint-N to --resume-from-checkpoint, "
    "or start afresh in a new output_dir"
)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, root: str | Path) -> Path | None:
    """`"latest"` -> the newest complete checkpoint under `root` (None when there is none); else the path."""
    if spec == "latest":
        checkpoints = list_checkpoints(root)
        return checkpoints[-1] if checkpoints else None
    path = Path(spec)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no trainer_state.json); pass 'latest' or a checkpoint-N folder."
        )
    return path


def save_checkpoint(
    accelerator, root: str | Path, step: int, data_state: dict, trainer_state: dict, keep: int, scheduler=None
) -> Path:
    """Save a resumable checkpoint for `step` on every rank (call it on all ranks).

    `scheduler`'s state goes to `scheduler_state.json` (never a pickle). A failure to write (permissions,
    a full disk) raises `UserError` naming the checkpoint and saying how to resume from the last complete one.
    """
    try:
        return _save_checkpoint(accelerator, Path(root), step, data_state, trainer_state, keep, scheduler)
    except OSError as error:
        complete = list_checkpoints(root)
        resume = (
            f"then resume from {complete[-1].name} with --resume-from-checkpoint latest"
            if complete
            else "then run again (no complete checkpoint exists yet)"
        )
        raise UserError(
            f"could not write checkpoint-{step} under {root}: {error.strerror or error}"
            f"{f' ({error.filename})' if error.filename else ''}; make the folder writable or free space, {resume}"
        ) from error


def _save_checkpoint(
    accelerator, root: Path, step: int, data_state: dict, trainer_state: dict, keep: int, scheduler
) -> Path:
    final = root / f"{PREFIX}{step}"
    partial = root / f".partial-{PREFIX}{step}"

    def prepare_folder() -> None:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

    def write_states() -> None:
        accelerator.save_state(str(partial))
        (partial / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(data_state))

    def complete() -> None:
        if accelerator.is_main_process:
            if scheduler is not None:
                (partial / SCHEDULER_STATE).write_text(json.dumps(scheduler.state_dict()))
            (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)  # atomic on one file system: a checkpoint-N folder is always complete
            for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)

    # Each phase ends with every rank learning whether any rank failed (instead of a barrier that a
    # failed rank never reaches): all ranks then raise together, none waits for ever.
    for phase in (prepare_folder, write_states, complete):
        on_every_rank(accelerator, phase)
    return final


def on_every_rank(accelerator, phase) -> None:
    """Run `phase` on this rank, then raise on every rank if it raised `OSError` on any (a collective call)."""
    error = None
    try:
        phase()
    except OSError as caught:
        error = caught
    failed = _ranks_that_failed(accelerator, error is not None)
    if error is not None:
        raise error
    if failed:
        raise OSError(f"rank {', '.join(map(str, failed))} could not write its part (its own message names the file)")


def _ranks_that_failed(accelerator, failed_here: bool) -> list[int]:
    """The ranks whose flag is set, known to every rank (a gather: every rank must call it)."""
    if accelerator.num_processes == 1:
        return [accelerator.process_index] if failed_here else []
    import torch

    flags = accelerator.gather(torch.tensor([1.0 if failed_here else 0.0], device=accelerator.device))
    failed = [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]
    # gloo frees the gather's tensors on its worker thread, which needs the GIL. If the process group is
    # destroyed first (the run ends right after its last save), its destructor joins that thread while
    # holding the GIL: both ranks hang at exit (seen under DDP on CPU). A barrier's wait releases the GIL.
    accelerator.wait_for_everyone()
    return failed


def load_checkpoint(accelerator, checkpoint: Path, scheduler) -> None:
    """Restore model, optimizer, RNG (through accelerate) and `scheduler` from `checkpoint`, running no code from it.

    Raises `UntrustedFileError` (a `UserError`) when a pickle in the folder asks for more than tensors and plain values.
    """
    from accelerate.utils import load as accelerate_load  # torch.load with weights_only=True and a numpy allow-list

    scheduler_state = _load_scheduler_state(checkpoint)
    for metadata in sorted(checkpoint.rglob(".metadata")):  # FSDP sharded state (torch.distributed.checkpoint)
        check_distributed_checkpoint_metadata(metadata)
    rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if rng_file.exists():  # accelerate swallows any error loading it, which would silently change the masks
        try:
            accelerate_load(rng_file, weights_only=True)
        except pickle.UnpicklingError as error:
            raise untrusted_pickle_error(rng_file, error, NOT_TRUSTED_FIX) from error
    with _without_accelerate_custom_states(checkpoint) as folder:
        try:
            accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
        except pickle.UnpicklingError as error:
            raise untrusted_pickle_error(_untrusted_state_file(checkpoint), error, NOT_TRUSTED_FIX) from error
    scheduler.load_state_dict(scheduler_state)


# What torch.distributed.checkpoint's `.metadata` pickle may name, besides its own metadata classes.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only what a `torch.distributed.checkpoint` `.metadata` file holds: its dataclasses, dtypes, sizes, paths."""

    def find_class(self, module: str, name: str):
        import torch

        allowed = (
            (
                module == _DCP_METADATA_MODULE
                and isinstance(getattr(torch.distributed.checkpoint.metadata, name, None), type)
            )
            or (module, name) in _DCP_METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def check_distributed_checkpoint_metadata(path: Path) -> None:
    """Raise `UntrustedFileError` unless the `.metadata` pickle at `path` names only torch's checkpoint metadata types.

    torch reads this file with plain `pickle.load` (when accelerate loads an FSDP sharded state), so it is
    checked first with an allow-list unpickler that builds nothing else.
    """
    import torch.distributed.checkpoint.metadata  # noqa: F401  (the classes the allow-list names)

    try:
        with open(path, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as error:
        raise untrusted_pickle_error(path, error, NOT_TRUSTED_FIX) from error


def _untrusted_state_file(checkpoint: Path) -> Path | str:
    """The state file (`*.bin`, `*.pt`) that asks for globals beyond torch's allow-list (found without loading it), to name it."""
    import torch

    for path in sorted([*checkpoint.glob("*.bin"), *checkpoint.glob("*.pt")]):
        try:
            if torch.serialization.get_unsafe_globals_in_checkpoint(path):
                return path
        except Exception:  # not even a readable torch file: as untrustworthy
            return path
    return f"a state file in {checkpoint}"


def _load_scheduler_state(checkpoint: Path) -> dict:
    """`scheduler_state.json`, or the pickle older versions wrote, read with `weights_only=True`."""
    import torch

    if (checkpoint / SCHEDULER_STATE).exists():
        return json.loads((checkpoint / SCHEDULER_STATE).read_text())
    legacy = checkpoint / LEGACY_SCHEDULER_STATE
    if not legacy.exists():
        raise UserError(
            f"{checkpoint} has no {SCHEDULER_STATE}, so the learning-rate schedule cannot resume; pass a complete checkpoint-N"
        )
    try:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise untrusted_pickle_error(legacy, error, NOT_TRUSTED_FIX) from error


@contextmanager
def _without_accelerate_custom_states(checkpoint: Path):
    """`checkpoint`, or a temporary view of it (symlinks) without `custom_checkpoint_*.pkl`.

    accelerate reads those with `weights_only=False`, and refuses a folder holding more of them than
    registered objects (none here), so they must not be where it looks.
    """
    entries = list(checkpoint.iterdir())
    if not any(_ACCELERATE_CUSTOM_STATE.fullmatch(entry.name) for entry in entries):
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix=f"cellmae-{checkpoint.name}-") as view:
        for entry in entries:
            if not _ACCELERATE_CUSTOM_STATE.fullmatch(entry.name):
                (Path(view) / entry.name).symlink_to(entry.resolve())
        yield Path(view)


def load_data_state(checkpoint: Path, rank: int) -> dict:
    path = checkpoint / f"data_state_rank{rank}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint was written by fewer ranks. Resume with the same number of processes."
        )
    return json.loads(path.read_text())


# ---- the loadable model folder, and what FSDP needs of the model to save it


def answer_input_embeddings(model: CellMAEForPreTraining) -> None:
    """accelerate's FSDP2 preparation shards `model.get_input_embeddings()` as its own unit; transformers'
    default raises for a model without a token-embedding table. Answer the patch embedding (as ViTMAE
    does) where the model class does not define it."""
    try:
        model.get_input_embeddings()
    except NotImplementedError:
        model.get_input_embeddings = lambda: model.cellmae.embeddings.patch_embeddings


def uses_activation_checkpointing(model) -> bool:
    """Whether blocks recompute their activations in the backward pass (the model's own switch or FSDP's wrapper)."""
    unwrapped = model.module if hasattr(model, "module") else model
    return bool(getattr(unwrapped, "is_activation_checkpointing", False)) or any(
        "checkpoint_wrapped_module" in name for name, _ in model.named_modules()
    )


def fully_sharded_modules(model) -> list[str]:
    """The class of every module FSDP2's `fully_shard` made a shard unit (blocks, embedding, tail, root); [] without FSDP."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    units = [getattr(m, "_checkpoint_wrapped_module", m) for m in model.modules() if isinstance(m, FSDPModule)]
    return sorted(type(m).__name__.removeprefix("FSDP") for m in units)


def save_model_folder(accelerator, model, path: Path, args: PretrainingArguments, trainer_state: dict) -> Path:
    """A loadable folder: safetensors weights, config, processor, model code, training args and state.

    Call it on every rank. A failure to write on any rank (permissions, a full disk) raises `UserError` on every
    rank, naming the folder, instead of leaving the others waiting for the failed one.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # a collective call under FSDP: every rank, before any write

    from ..image_processing_cellmae import CellMAEImageProcessor

    def write() -> None:
        unwrapped.save_pretrained(
            path, state_dict=state_dict, is_main_process=accelerator.is_main_process, save_function=accelerator.save
        )
        if accelerator.is_main_process:
            config = unwrapped.config
            processor = CellMAEImageProcessor(
                image_size=config.image_size, crop_mode="tile", channel_names=config.channel_names
            )
            processor.save_pretrained(path)
            args.save(path / "training_args.json")
            history = trainer_state["log_history"]
            final = history[-1] if history else {}
            logged = ("loss", "mse_loss", "fourier_loss") if "mse_loss" in final or not final else ("loss", "accuracy")
            summary = {**trainer_state, "final_losses": {k: final.get(k) for k in logged}}
            (path / "trainer_state.json").write_text(json.dumps(summary, indent=2))

    try:
        on_every_rank(accelerator, write)  # ends in a gather of failure flags: also the closing barrier
    except OSError as error:
        step = trainer_state.get("global_step")
        held = f"checkpoint-{step} holds the trained weights" if step is not None else "the checkpoints are complete"
        raise UserError(
            f"could not write the model folder {path}: {error.strerror or error}"
            f"{f' ({error.filename})' if error.filename else ''}; make the folder writable or free space, then run "
            f"again with --resume-from-checkpoint latest ({held})"
        ) from error
    return path
