"""The pre-training loop: streaming shards -> CA-MAE -> Accelerate, resumable at the exact sample.

One loop, three objectives (`--objective`):
- `mae` (default): masked-autoencoder pre-training of a CA-MAE or MU-Net.
- `wsl`: the weakly supervised baseline: a CellMAE/CellMUNetForImageClassification trained from scratch to
  classify `--label-col` of each crop, the pooled embedding normalised per plate in the batch
  (`classifier_batch_norm="plate"`, see `plate_batch_norm`).
- `classify`: fine-tuning: the encoder of `--init-from` with a new head, optionally with layer-wise lr decay.
Both supervised objectives can hold plates out (`--holdout-plates`) and report their accuracy at the end.

Single process:            cellmae pretrain --config run.yaml
Many GPUs / nodes / FSDP:  accelerate launch [--config_file examples/accelerate/ddp.yaml] -m hf_cellmae.cli pretrain --config run.yaml

`pretrain` reads top to bottom: `setup` (accelerator, model, optimizer, data, resume), then each micro-batch
`train_step`, every `logging_steps` `log_window`, a figure and a checkpoint when due, and `finish` (held-out
accuracy, the model folder, the summary).

Each rank streams its own disjoint share of the shards (`stream_fields(rank=..., world_size=...)`), so
the DataLoader is not passed through `accelerator.prepare` (that would shard a second time).

The host never waits for the device inside a step: losses are summed on the device and read every
`logging_steps` (`LoggingWindow`), and a step with NaN/inf gradients is skipped by the optimizer itself
on the device (fused AdamW's `found_inf`, the same flag in our Lion). Device-specific fast settings
(bf16, torch.compile, workers, pinned memory) come from `device_defaults.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configuration_cellmae import CellMAEConfig
from ..data.labels import (
    IDENTITY_COLUMNS,
    LabelVocabulary,
    check_labels,
    is_missing_label,
    label_vocabulary,
    label_warnings,
)
from ..data.shards import load_manifest
from ..data.streaming import skipped_fields, stream_fields
from ..errors import UserError, ensure_writable_folder
from ..image_processing_cellmae import default_rescale_factor, standardize_channels
from .arguments import PretrainingArguments, changed_result_arguments
from .checkpoints import (
    answer_input_embeddings,
    fully_sharded_modules,
    load_checkpoint,
    load_data_state,
    resolve_checkpoint,
    save_checkpoint,
    save_model_folder,
    uses_activation_checkpointing,
)
from .device_defaults import DeviceDefaults, compile_backend, detect_device_defaults
from .figures import reconstruction_figure, save_figure
from .models import build_model
from .optimization import build_optimizer, build_scheduler, skip_step_if, skips_on_device

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a NaN or infinite loss."""


def supervision(args: PretrainingArguments) -> LabelVocabulary | None:
    """The label vocabulary of a `wsl`/`classify` run (None for `mae`), with held-out plates checked against the shards
    and the labels checked (`check_labels`: fields without a value refused unless `drop_missing_labels`, at least 2
    classes)."""
    if args.objective == "mae":
        return None
    labels = label_vocabulary(args.data, args.label_col, args.unlabeled_class)
    check_labels(labels, drop_missing=args.drop_missing_labels)
    unknown = sorted(set(args.holdout_plates or []) - set(labels.plates))
    if unknown:
        raise UserError(f"holdout plates {unknown} are not in {args.data}; its plates are {labels.plates}")
    if args.holdout_plates and set(labels.plates) <= set(args.holdout_plates):
        raise UserError(
            f"--holdout-plates {args.holdout_plates} holds out every plate of {args.data}; leave at least one to train on"
        )
    return labels


def check_resume_arguments(args: PretrainingArguments, checkpoint_root: Path) -> None:
    """Refuse to resume when arguments that change the result differ from those the checkpoint was written with
    (`changed_result_arguments`), naming each, unless `allow_changed_args`. A checkpoint of an earlier version
    (no arguments in its trainer_state.json) is compared with the run folder's training_args.json, if any."""
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, checkpoint_root)
    if checkpoint is None or args.allow_changed_args:
        return
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("training_args")
    if saved is None and (checkpoint_root.parent / "training_args.json").is_file():
        saved = json.loads((checkpoint_root.parent / "training_args.json").read_text())
    if saved is None:
        return
    changed = changed_result_arguments(saved, args)
    if changed:
        raise UserError(
            f"{checkpoint} was written with other arguments that change the result: {', '.join(changed)}; resume with "
            "the checkpoint's values (they are in its trainer_state.json under training_args), start a new --output-dir, "
            "or pass --allow-changed-args to continue with the new ones"
        )


def label_notes(labels: LabelVocabulary | None) -> list[str]:
    """What a supervised run tells the user about its labels before training: the fields left out for want of a
    label (`--drop-missing-labels`) and the warnings of `label_warnings` (rare classes, corrupt rows)."""
    if labels is None:
        return []
    notes = []
    if labels.missing and labels.unlabeled_class is not None:
        notes.append(
            f"{labels.missing} of {labels.num_fields} fields have no {labels.column}: trained as the class "
            f"{labels.unlabeled_class!r} (--unlabeled-class)"
        )
    elif labels.missing:
        notes.append(
            f"left out {labels.missing} of {labels.num_fields} fields without a value in label column "
            f"{labels.column!r} (--drop-missing-labels); {labels.num_fields - labels.missing} are trained on"
        )
    return notes + [f"warning: {note}" for note in label_warnings(labels)]


def _has_label(sample: dict, column: str) -> bool:
    return not is_missing_label(sample[column])


def dataset_summary(args: PretrainingArguments, manifest: dict) -> dict:
    return {
        "name": Path(str(args.data).rstrip("/")).name,
        "path": str(args.data),
        "num_fields": manifest.get("num_fields"),
        "channels": list(manifest.get("channels", [])),
        "dtype": ",".join(sorted(manifest.get("dtypes", {}))),
    }


class DataPosition:
    """The training stream and its DataLoader, whose position is saved in checkpoints.

    With `num_workers=0` the stream's own `state_dict()` is exact; with workers, torchdata's
    `StatefulDataLoader` holds each worker's stream state.
    """

    def __init__(
        self,
        stream,
        batch_size: int,
        num_workers: int,
        pin_memory: bool = False,
        labels: LabelVocabulary | None = None,
    ):
        self.stream = stream
        self.num_workers = num_workers
        # The loader draws a base seed when an iterator starts: from its own generator, never from the
        # global RNG, whose state a resumed run restores from the checkpoint (masks depend on it).
        # Pinned batches let the copy to the GPU run asynchronously (`non_blocking=True` in to_model_input).
        options = dict(
            batch_size=batch_size,
            collate_fn=functools.partial(collate, labels=labels),
            generator=torch.Generator().manual_seed(0),
            pin_memory=pin_memory,
        )
        if num_workers > 0:
            try:
                from torchdata.stateful_dataloader import StatefulDataLoader
            except ImportError as error:
                raise ImportError(
                    "dataloader_num_workers > 0 needs torchdata for exact resume: pip install torchdata "
                    "(or use dataloader_num_workers=0)."
                ) from error
            self.loader = StatefulDataLoader(stream, num_workers=num_workers, **options)
        else:
            self.loader = torch.utils.data.DataLoader(stream, **options)

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.num_workers > 0 else self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        (self.loader if self.num_workers > 0 else self.stream).load_state_dict(state)


def collate(samples: list[dict], labels: LabelVocabulary | None = None) -> dict:
    """Stack raw pixels `(B, C, S, S)` (at their stored dtype, or as [0, 1] floats when dtypes are mixed)
    and channel ids `(B, C)`; with `labels` (supervised objectives), also `labels` `(B,)` (class ids of the
    label column) and `plate_ids` `(B,)` (for plate-wise normalisation). Other metadata is dropped."""
    pixels = [np.asarray(s["pixel_values"]) for s in samples]
    if len({p.dtype for p in pixels}) > 1:  # e.g. 8- and 16-bit plates in one batch
        pixels = [p.astype(np.float32) * np.float32(default_rescale_factor(p.dtype)) for p in pixels]
    batch = {
        "pixel_values": torch.from_numpy(np.stack(pixels)),
        "channel_ids": torch.stack([torch.as_tensor(s["channel_ids"]) for s in samples]),
    }
    if labels is not None:
        label2id, plate2id = labels.label2id, labels.plate2id
        batch["labels"] = torch.tensor(
            [label2id[labels.label_of(s[labels.column])] for s in samples], dtype=torch.long
        )
        batch["plate_ids"] = torch.tensor([plate2id[s["plate"]] for s in samples], dtype=torch.long)
    return batch


class LoggingWindow:
    """Losses, skipped steps and the gradient norm of one logging window, summed on the device.

    Nothing here makes the host wait for the device; `read` does, once per logging window.
    A non-finite loss is left out of the means; a non-finite gradient norm (the same on every rank,
    since gradients are reduced before it is computed) makes the optimizer skip the step on the device.
    """

    def __init__(self, device, names: tuple[str, ...] = ("loss", "mse_loss", "fourier_loss")):
        self.names = names  # the logged means; the first is the loss whose finiteness counts a micro-step
        self.sums = torch.zeros(len(names) + 1, device=device)  # the named values, then finite micro-steps
        self.skipped = torch.zeros((), device=device)  # optimizer steps skipped in this window
        self.in_a_row = torch.zeros((), device=device)  # skipped steps in a row, carried across windows
        self.most_in_a_row = torch.zeros((), device=device)
        self.grad_norm = torch.full((), float("nan"), device=device)
        self.reset_host_counters()

    def reset_host_counters(self) -> None:
        self.micro_steps, self.data_s, self.start = 0, 0.0, time.perf_counter()

    def add_losses(self, values: dict) -> None:
        """Add one micro-step's 0-dim tensors, one per name (e.g. `loss`, `mse_loss`, `fourier_loss`; `loss`, `accuracy`)."""
        losses = torch.stack([values[name] for name in self.names]).detach().float()  # (len(names),)
        finite = torch.isfinite(losses[0])
        self.sums[:-1] += torch.where(finite, losses, 0.0)
        self.sums[-1] += finite
        self.micro_steps += 1

    def add_optimizer_step(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """Record an optimizer step's gradient norm; returns its 0-dim skip flag (1.0: NaN/inf gradients)."""
        norm = grad_norm.detach().float()
        skip = (~torch.isfinite(norm)).float()
        self.skipped += skip
        self.in_a_row = (self.in_a_row + 1) * skip
        self.most_in_a_row = torch.maximum(self.most_in_a_row, self.in_a_row)
        self.grad_norm = norm
        return skip

    def read(self, accelerator) -> dict:
        """The window's mean losses over all ranks and its skip counts (the host waits here), then start a new window."""
        sums = accelerator.reduce(self.sums, reduction="sum") if accelerator.num_processes > 1 else self.sums
        counts = torch.stack([self.skipped, self.most_in_a_row, self.in_a_row, self.grad_norm])
        *totals, finite, skipped, most_in_a_row, in_a_row, grad_norm = torch.cat([sums, counts]).tolist()
        mean = (lambda total: total / finite) if finite else (lambda total: float("nan"))
        window = {
            **{name: mean(total) for name, total in zip(self.names, totals)},
            "grad_norm": grad_norm,
            "skipped": int(skipped),
            "most_in_a_row": int(most_in_a_row),
            "micro_steps": self.micro_steps,
            "data_s": self.data_s,
            "elapsed_s": time.perf_counter() - self.start,
        }
        self.sums.zero_()
        self.skipped.zero_()
        self.most_in_a_row.copy_(self.in_a_row)
        self.reset_host_counters()
        return window


def to_model_input(pixels: torch.Tensor, device) -> torch.Tensor:
    """Raw crops -> standardised float32 on the device: half the bytes of float32 through the loader
    for 16-bit data, and the per-channel arithmetic done on the accelerator instead of the data workers."""
    pixels = pixels.to(device, non_blocking=True)
    if pixels.dtype == torch.uint16:  # few torch ops take uint16: widen losslessly on the device first
        return standardize_channels(pixels.to(torch.int32), rescale_factor=1.0 / 65535)
    return standardize_channels(pixels)


def training_stream(
    args: PretrainingArguments,
    config: CellMAEConfig,
    vocabulary: list[str],
    rank: int,
    world_size: int,
    num_workers: int | None = None,
):
    """This rank's endless, disjoint share of the shards, in an order fixed by `args.seed`, split over
    `num_workers` DataLoader workers (default `args.dataloader_num_workers`, or none); without the held-out
    plates, and carrying the label column for the supervised objectives."""
    if num_workers is None:
        num_workers = args.dataloader_num_workers or 0
    stream = stream_fields(
        args.data,
        image_size=config.image_size,
        crops_per_field=args.crops_per_field,
        augment=args.augment,
        channel_subset=args.channel_subset,
        channel_vocabulary=vocabulary,
        seed=args.seed,
        num_epochs=None,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        standardize=False,
        contiguous=False,
        metadata_fields=label_fields(args),
        exclude_plates=args.holdout_plates,
        on_error=args.on_error,
    )
    return _without_unlabelled(stream, args)


def _without_unlabelled(stream, args: PretrainingArguments):
    """The stream without the fields whose label is missing (`--drop-missing-labels`; otherwise they were refused, or
    `--unlabeled-class` made them a class)."""
    if args.objective == "mae" or not args.drop_missing_labels or args.unlabeled_class is not None:
        return stream
    return stream.filter(_has_label, fn_kwargs={"column": args.label_col})


def label_fields(args: PretrainingArguments) -> list[str]:
    """The metadata the stream must carry: the label column of a supervised objective (identity columns always come)."""
    return [args.label_col] if args.objective != "mae" and args.label_col not in IDENTITY_COLUMNS else []


def model_inputs(batch: dict, device) -> dict:
    """A collated batch -> the model's keyword arguments on `device` (pixels standardised there)."""
    inputs = {
        "pixel_values": to_model_input(batch["pixel_values"], device),
        "channel_ids": batch["channel_ids"].to(device, non_blocking=True),
    }
    for name in ("labels", "plate_ids"):
        if name in batch:
            inputs[name] = batch[name].to(device, non_blocking=True)
    return inputs


def logged_values(out, inputs: dict) -> dict:
    """The 0-dim tensors a logging window averages: the MAE's loss terms, or a classifier's loss and accuracy."""
    if "labels" not in inputs:
        return {"loss": out.loss, "mse_loss": out.mse_loss, "fourier_loss": out.fourier_loss}
    return {"loss": out.loss, "accuracy": (out.logits.argmax(dim=-1) == inputs["labels"]).float().mean()}


@torch.no_grad()
def evaluate_holdout(
    args: PretrainingArguments, model, config, vocabulary: list[str], labels: LabelVocabulary, device
) -> dict:
    """Accuracy on the held-out plates: one pass over their fields (`crops_per_field` random crops each, no
    augmentation), in batches of `per_device_train_batch_size` in the stream's order, with plate ids for the
    plate-wise normalisation. Every rank evaluates the same samples (the model may be sharded)."""
    stream = stream_fields(
        args.data,
        image_size=config.image_size,
        crops_per_field=args.crops_per_field,
        augment=False,
        shuffle=False,
        num_epochs=1,
        rank=0,
        world_size=1,
        channel_vocabulary=vocabulary,
        standardize=False,
        metadata_fields=label_fields(args),
        plates=args.holdout_plates,
        on_error=args.on_error,
    )
    stream = _without_unlabelled(stream, args)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=args.per_device_train_batch_size, collate_fn=functools.partial(collate, labels=labels)
    )
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    per_class = torch.zeros(len(labels.labels), dtype=torch.long)
    for batch in loader:
        inputs = model_inputs(batch, device)
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        correct += (logits.argmax(dim=-1) == inputs["labels"]).sum()
        per_class += torch.bincount(batch["labels"], minlength=len(labels.labels))
    model.train(was_training)
    count = int(per_class.sum())
    majority = int(per_class.argmax())
    return {
        "plates": list(args.holdout_plates),
        "label_col": args.label_col,
        "num_samples": count,
        "accuracy": correct.item() / count if count else float("nan"),
        # the baselines beside it: always answering the held-out plates' most frequent class, and guessing
        "majority_class": labels.labels[majority],
        "majority_class_rate": per_class[majority].item() / count if count else float("nan"),
        "chance_rate": 1 / len(labels.labels),
        "num_classes": len(labels.labels),
    }


def holdout_line(result: dict) -> str:
    """Held-out accuracy with the majority-class and chance rates beside it."""
    return (
        f"{result['label_col']} accuracy {result['accuracy']:.4f} on {result['num_samples']} crops of held-out plates "
        f"{result['plates']} ({result['num_classes']} classes; always answering the most frequent, "
        f"{result['majority_class']!r}: {result['majority_class_rate']:.4f}; chance: {result['chance_rate']:.4f})"
    )


def fixed_validation_field(args: PretrainingArguments, image_size: int, vocabulary: list[str]) -> dict:
    """The first field of the shards, centre-cropped, no augmentation: the figure's subject."""
    stream = stream_fields(
        args.data,
        image_size=image_size,
        crops_per_field=1,
        augment=False,
        shuffle=False,
        num_epochs=1,
        rank=0,
        world_size=1,
        channel_vocabulary=vocabulary,
        metadata_fields=[],
        standardize=False,
        on_error=args.on_error,
    )
    return collate([next(iter(stream))])


@dataclass
class TrainingRun:
    """What `setup` makes and the parts of `pretrain` share: the accelerator, the prepared model and optimizer, the
    data position and `state` (what trainer_state.json holds: step, images seen, runtime, log history)."""

    args: PretrainingArguments
    accelerator: Any
    fast: DeviceDefaults
    manifest: dict
    labels: LabelVocabulary | None
    model: Any
    config: Any  # the model's config, read before `accelerator.prepare` wraps the model
    optimizer: Any
    scheduler: Any
    vocabulary: list[str]
    data: DataPosition
    validation: dict | None  # the reconstruction figure's field (None for a classifier)
    trackers: str | None
    state: dict
    clock_start: float = 0.0  # when this process began training (time.perf_counter)
    runtime_before: float = 0.0  # train_runtime_s of the processes before this one (resumed runs)

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def images_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes

    @property
    def tokens_per_image(self) -> int:
        return (self.args.channel_subset or len(self.vocabulary)) * self.config.tokens_per_channel

    @property
    def logged_names(self) -> tuple[str, ...]:
        return ("loss", "mse_loss", "fourier_loss") if self.labels is None else ("loss", "accuracy")

    def start_clock(self) -> None:
        self.clock_start, self.runtime_before = time.perf_counter(), self.state["train_runtime_s"]

    def stop_clock(self) -> None:
        self.state["train_runtime_s"] = self.runtime_before + time.perf_counter() - self.clock_start


def pretrain(args: PretrainingArguments) -> dict:
    """Run (or resume) pre-training; returns a summary. Writes into `args.output_dir`:
    `checkpoints/checkpoint-N/`, `model/` (loadable folder), `figures/`, `logs/`."""
    from tqdm.auto import tqdm

    run = setup(args)
    state, accelerator = run.state, run.accelerator
    progress = tqdm(
        total=args.max_steps,
        initial=state["global_step"],
        desc="pre-training",
        disable=not (accelerator.is_main_process and args.progress_bar),
    )
    window = LoggingWindow(accelerator.device, run.logged_names)
    run.model.train()
    batches = iter(run.data.loader)
    run.start_clock()
    while state["global_step"] < args.max_steps:
        wait_start = time.perf_counter()
        batch = next(batches)
        window.data_s += time.perf_counter() - wait_start
        if not train_step(run, batch, window):
            continue  # a micro-batch of gradient accumulation: no optimizer step yet
        state["global_step"] += 1
        state["images_seen"] += run.images_per_step
        step = state["global_step"]
        progress.update(1)
        # A window also ends at each checkpoint, so a resumed run logs the same windows as an uninterrupted one.
        if step % args.logging_steps == 0 or step == args.max_steps or step % args.save_steps == 0:
            record = log_window(run, window, step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
        if args.figure_steps and step % args.figure_steps == 0:
            save_reconstruction(run, step)
        if step % args.save_steps == 0 or step == args.max_steps:
            run.stop_clock()
            checkpoint = save_checkpoint(
                accelerator,
                run.checkpoint_root,
                step,
                run.data.state_dict(),
                trainer_state(run),
                args.save_total_limit,
                run.scheduler,
            )
            if args.save_model_with_checkpoints:
                save_model_folder(accelerator, run.model, checkpoint / "model", args, trainer_state(run))
    progress.close()
    run.stop_clock()
    return finish(run)


def setup(args: PretrainingArguments) -> TrainingRun:
    """Everything before the first step: checks, the accelerator, labels, model, optimizer, schedule, data, the
    checkpoint resumed from (if any), training_args.json and the trackers."""
    from accelerate.utils import set_seed

    output_dir = Path(args.output_dir)
    # Fail in seconds, not after hours at the first checkpoint (every rank checks: they may not share a disk).
    ensure_writable_folder(output_dir, "the run's outputs")
    ensure_writable_folder(output_dir / "checkpoints", "checkpoints")
    if args.resume_from_checkpoint:
        check_resume_arguments(args, output_dir / "checkpoints")  # before any data or model is read
    trackers = None if args.report_to == "none" else args.report_to
    fast = detect_device_defaults(args)
    accelerator = make_accelerator(args, fast, trackers)
    for note in fast.notes:
        accelerator.print(note)
    manifest = load_manifest(args.data)
    set_seed(args.seed)  # identical initial weights on every rank
    labels = supervision(args)
    for note in label_notes(labels):
        accelerator.print(note)
    model = build_model(args, manifest, labels)
    config = model.config
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = build_optimizer(
        model,
        args.optimizer,
        args.learning_rate,
        args.weight_decay,
        (args.adam_beta1, args.adam_beta2),
        device_type=accelerator.device.type,
        layer_decay=args.layer_decay,
    )
    scheduler = build_scheduler(optimizer, args.lr_scheduler, args.max_steps, args.warmup_ratio)
    vocabulary = list(config.channel_names or manifest["channels"])
    stream = training_stream(
        args, config, vocabulary, accelerator.process_index, accelerator.num_processes, fast.dataloader_num_workers
    )
    data = DataPosition(
        stream,
        args.per_device_train_batch_size,
        fast.dataloader_num_workers,
        pin_memory=fast.pin_memory,
        labels=labels,
    )
    validation = fixed_validation_field(args, config.image_size, vocabulary) if args.objective == "mae" else None
    if accelerator.is_fsdp2:
        answer_input_embeddings(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler (stepped once per optimizer step, by us) is saved as JSON by save_checkpoint, not registered
    # with accelerate: accelerate loads registered objects' pickles with weights_only=False.
    set_seed(args.seed, device_specific=True)  # masks and drop-path differ between ranks

    state = {
        "global_step": 0,
        "max_steps": args.max_steps,
        "images_seen": 0,
        "train_runtime_s": 0.0,
        "nonfinite_steps": 0,
        "log_history": [],
    }
    run = TrainingRun(
        args,
        accelerator,
        fast,
        manifest,
        labels,
        model,
        config,
        optimizer,
        scheduler,
        vocabulary,
        data,
        validation,
        trackers,
        state,
    )
    if args.resume_from_checkpoint:
        resume(run)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        args.save(output_dir / "training_args.json")
    if trackers:
        logged = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in args.to_dict().items()}  # model_overrides
        accelerator.init_trackers(
            "cellmae", config={k: v for k, v in logged.items() if isinstance(v, (int, float, str, bool))}
        )
    return run


def make_accelerator(args: PretrainingArguments, fast: DeviceDefaults, trackers: str | None):
    """The run's `Accelerator`: precision and compilation from `fast`, gradient accumulation, trackers writing
    into `output_dir/logs`."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if fast.torch_compile:
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True  # a graph Inductor cannot compile runs eager (with a warning)
    output_dir = Path(args.output_dir)
    return Accelerator(
        mixed_precision=fast.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dynamo_backend=compile_backend() if fast.torch_compile else "no",
    )


def resume(run: TrainingRun) -> None:
    """Load the checkpoint of `--resume-from-checkpoint` (weights, optimizer, RNG states, schedule, data position and
    trainer state), if there is one."""
    args, accelerator = run.args, run.accelerator
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, run.checkpoint_root)
    if checkpoint is None:
        accelerator.print(f"No checkpoint in {run.checkpoint_root}; starting from step 0.")
        return
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    if args.lr_scheduler == "one_cycle" and saved.get("max_steps", args.max_steps) != args.max_steps:
        raise ValueError(
            f"{checkpoint} was written by a run with max_steps={saved['max_steps']}; the one-cycle schedule is "
            f"fixed by it. Resume with --max-steps {saved['max_steps']}, or fine-tune further with --init-from "
            f"{run.output_dir / 'model'} and a new output_dir."
        )
    load_checkpoint(accelerator, checkpoint, run.scheduler)
    run.state.update(saved)
    run.data.load_state_dict(load_data_state(checkpoint, accelerator.process_index))
    accelerator.print(f"Resumed from {checkpoint} at step {run.state['global_step']}.")


def train_step(run: TrainingRun, batch: dict, window: LoggingWindow) -> bool:
    """One micro-batch: forward, backward and, at the end of gradient accumulation, the optimizer step (skipped on
    the device when the gradients hold NaN/inf) and the schedule's. Returns whether an optimizer step ended here."""
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    # The skip flag is applied by the optimizer on the device (fused AdamW, our Lion); any other optimizer
    # makes the host read it once per optimizer step.
    on_device_skip = skips_on_device(optimizer.optimizer)
    max_norm = run.args.max_grad_norm or float("inf")  # the norm is computed anyway: it detects NaN/inf gradients
    with accelerator.accumulate(model):
        inputs = model_inputs(batch, accelerator.device)
        out = model(**inputs)
        window.add_losses(logged_values(out, inputs))
        accelerator.backward(out.loss)
        if accelerator.sync_gradients:
            skip = window.add_optimizer_step(accelerator.clip_grad_norm_(model.parameters(), max_norm))
            if on_device_skip:
                skip_step_if(optimizer.optimizer, skip)
            if on_device_skip or not skip.item():
                optimizer.step()
            run.scheduler.step()  # a skipped step still counts: the schedule and max_steps stay fixed
            optimizer.zero_grad(set_to_none=True)
    return accelerator.sync_gradients


def log_window(run: TrainingRun, window: LoggingWindow, step: int) -> dict:
    """End the logging window at `step`: read it (the one place the host waits for the device), count skipped
    steps (aborting after `max_nonfinite_steps` in a row), log the record and add it to the log history."""
    args, accelerator = run.args, run.accelerator
    read = window.read(accelerator)
    run.state["nonfinite_steps"] += read["skipped"]
    if read["skipped"]:
        accelerator.print(
            f"Non-finite gradients: {read['skipped']} optimizer step(s) up to step {step} skipped "
            f"(at most {read['most_in_a_row']} in a row)."
        )
    if read["most_in_a_row"] > args.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{read['most_in_a_row']} consecutive non-finite losses (max_nonfinite_steps={args.max_nonfinite_steps}); "
            "lower the learning rate, enable gradient clipping or use bf16 instead of fp16."
        )
    images = read["micro_steps"] * args.per_device_train_batch_size * accelerator.num_processes
    elapsed = read["elapsed_s"]
    record = {
        "step": step,
        **{name: read[name] for name in window.names},
        "learning_rate": run.scheduler.get_last_lr()[0],
        "grad_norm": read["grad_norm"],
        "images_per_s": images / elapsed,
        "tokens_per_s": images * run.tokens_per_image / elapsed,
        "data_wait_share": read["data_s"] / elapsed,
    }
    run.state["log_history"].append(record)
    accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
    return record


def save_reconstruction(run: TrainingRun, step: int) -> Path | None:
    """The reconstruction figure of the fixed validation field at `step` (main process; None for a classifier)."""
    if run.validation is None:  # a classifier reconstructs nothing
        return None
    accelerator, model = run.accelerator, run.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pixels = to_model_input(run.validation["pixel_values"], accelerator.device)
        out = model(pixels, channel_ids=run.validation["channel_ids"].to(accelerator.device), mask_seed=0)
    model.train(was_training)
    if not accelerator.is_main_process:
        return None
    fig = reconstruction_figure(
        pixels[0].cpu(),
        out.logits[0].float().cpu(),
        out.mask[0].float().cpu(),
        run.config.patch_size,
        channel_names=run.vocabulary,
        title=f"step {step}: masked-patch MSE {out.mse_loss.item():.3f}",
    )
    if run.trackers and "tensorboard" in str(run.trackers):
        accelerator.get_tracker("tensorboard", unwrap=True).add_figure("reconstruction", fig, global_step=step)
    return save_figure(fig, run.output_dir / "figures" / f"reconstruction-step{step:06d}.png")


def trainer_state(run: TrainingRun) -> dict:
    """trainer_state.json: `run.state`, the hardware, the dataset and the arguments."""
    accelerator, fast = run.accelerator, run.fast
    return {
        **run.state,
        "hardware": {
            "device": str(accelerator.device),
            "num_processes": accelerator.num_processes,
            "mixed_precision": fast.mixed_precision,
            "distributed_type": accelerator.distributed_type.value,
            "torch_compile": fast.torch_compile,
            "activation_checkpointing": uses_activation_checkpointing(run.model),
            "fully_sharded_modules": fully_sharded_modules(run.model),
        },
        "dataset": dataset_summary(run.args, run.manifest),
        "training_args": run.args.to_dict(),  # what resume compares (check_resume_arguments)
    }


def release_before_end(run: TrainingRun) -> None:
    """Free the prepared model, optimizer and schedule on every rank while every rank is still alive.

    DDP's reducer holds the process group; freed after `end_training` (when `pretrain` returns), its gloo group
    was destroyed after the other rank had exited, and that rank hung in the destructor (seen once in CI's
    2-process test, a rank left in ``~ProcessGroupGloo`` after its model folder was written)."""
    import gc

    run.accelerator.wait_for_everyone()
    run.model = run.optimizer = run.scheduler = None
    run.accelerator.free_memory()
    gc.collect()
    run.accelerator.wait_for_everyone()


def finish(run: TrainingRun) -> dict:
    """After the last step: the held-out evaluation (if any), the model folder with its reconstruction figure, and
    the run's summary."""
    args, accelerator, state = run.args, run.accelerator, run.state
    if args.holdout_plates:
        state["holdout_evaluation"] = evaluate_holdout(
            args, run.model, run.config, run.vocabulary, run.labels, accelerator.device
        )
        accelerator.print(holdout_line(state["holdout_evaluation"]))
    # one line if it cannot be written
    model_dir = save_model_folder(accelerator, run.model, run.output_dir / "model", args, trainer_state(run))
    figure = run.output_dir / "figures" / f"reconstruction-step{state['global_step']:06d}.png"
    if not figure.exists():  # not already drawn at this step by figure_steps
        figure = save_reconstruction(run, state["global_step"])
    if accelerator.is_main_process and figure is not None:
        (model_dir / "reconstruction.png").write_bytes(figure.read_bytes())
    release_before_end(run)
    accelerator.end_training()
    final = state["log_history"][-1] if state["log_history"] else {}
    summary = {
        "model_dir": str(model_dir),
        "global_step": state["global_step"],
        "final_loss": final.get("loss"),
        "figure": str(figure) if figure else None,
    }
    if "holdout_evaluation" in state:
        summary["holdout_evaluation"] = state["holdout_evaluation"]
    if args.on_error == "skip":
        summary["skipped_fields"] = fields_skipped_in(args.data)
        skipped = summary["skipped_fields"]
        if skipped:
            logger.warning(
                "skipped %d corrupt field(s) of %s (--on-error skip): %s",
                len(skipped),
                args.data,
                "; ".join(f"{s['field']} in {Path(s['file']).name}" for s in skipped),
            )
    return summary


def fields_skipped_in(data: str) -> list[dict]:
    """The corrupt fields of the shard folder `data` this process's stream skipped (`--on-error skip`).

    DataLoader worker processes keep their own lists; each skip is also warned about where it happens."""
    if "://" in str(data):
        return skipped_fields()
    root = Path(data).resolve()
    return [skip for skip in skipped_fields() if Path(skip["file"]).resolve().is_relative_to(root)]
