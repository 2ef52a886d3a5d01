"""Streaming training samples from a shard folder: a ``datasets.IterableDataset`` of random crops.

Quick start::

    from hf_cellmae.data.streaming import stream_fields
    stream = stream_fields("shards/", image_size=256, crops_per_field=4, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=64, num_workers=4)
    for batch in loader:
        batch["pixel_values"]  # (B, C, 256, 256) float32, standardised per image and channel
        batch["channel_ids"]   # (B, C) int64, indices into manifest["channels"] (or your vocabulary)
        batch["plate"], batch["well"], batch["perturbation"] ...  # metadata, lists of B values

How the order is made (and why resume is exact):

- A shard folder (``cellmae shard``) is a list of Parquet row groups ("units") of a few fields each;
  the writer already spread plates and wells across shards at random.
- Epoch ``e`` visits the units in a permutation drawn from ``(seed, e)`` and, inside each unit, its
  ``fields x crops_per_field`` samples in a permutation drawn from ``(seed, e, unit)``. Each sample's crop
  position, flips/rotation and channel subset come from its own seed ``(seed, e, unit, index)``.
  So the order is a pure function of ``(seed, epoch)``: no shuffle buffer (a buffer loses the examples
  it holds when you resume: a measured resume lost 60 of 256), nothing lost, nothing repeated.
- That epoch sequence is cut into ``world_size * num_workers`` contiguous "pieces" of equal size
  (+-1 sample); pieces are what ``datasets`` calls shards (``stream.n_shards``). Rank ``r`` reads pieces
  ``[r*num_workers, (r+1)*num_workers)`` and each DataLoader worker one of them, so every sample is read
  exactly once per epoch, by one rank and one worker, and ranks get the same number of samples +-num_workers.
  With ``num_epochs > 1`` (or ``None`` = endless), a piece goes on with the same slice of the next epoch.
- The stream yields small descriptors that a ``.map`` decodes (reading the row group once, cached), so
  ``stream.state_dict()`` / ``stream.load_state_dict(state)`` (``datasets``' own mechanism, which skips the
  descriptors already seen) resumes at the exact next sample, cheaply.

Using it with ``accelerate`` (pick ONE way of sharding across ranks, never both):

1. Let accelerate shard: build the stream without ``rank`` (``world_size`` defaults to the launcher's
   ``WORLD_SIZE``), wrap it in a DataLoader and ``accelerator.prepare`` it with
   ``Accelerator(dataloader_config=DataLoaderConfiguration(dispatch_batches=False))``. accelerate then
   calls ``stream.shard(num_shards=world_size, index=rank)``, which keeps this rank's pieces.
   (With the default ``dispatch_batches=True`` rank 0 would read everything and batches holding text
   metadata would crash.)
2. Shard yourself: ``stream_fields(..., rank=accelerator.process_index, world_size=accelerator.num_processes)``
   (this is ``datasets.distributed.split_dataset_by_node`` done on equal pieces) and do NOT pass the
   DataLoader through ``accelerator.prepare`` (move batches with ``.to(accelerator.device)``); preparing it
   too would shard a second time and silently drop data.

Resuming: with ``num_workers=0`` in the DataLoader, save ``stream.state_dict()`` and call
``stream.load_state_dict(state)`` on a stream built with the same arguments. With workers, use
``torchdata.stateful_dataloader.StatefulDataLoader`` (``pip install torchdata``; its ``state_dict()``
holds each worker's stream state; accelerate: ``DataLoaderConfiguration(use_stateful_dataloader=True)``),
or ``accelerator.skip_first_batches(loader, n)``, which is exact here because the order is deterministic.
For several passes, prefer ``num_epochs`` (or ``None``) over re-iterating: a second ``for`` over the same
stream repeats the same epoch unless you build it with ``epoch=`` the next one.

Integrity: every field's pixels are checked against their stored CRC-32, and its other columns (identity,
channels, shape, metadata) against its row checksum, when their row group is read (one CRC pass per field and
read, measured in ``scripts/benchmark_data.py``); a corrupt field raises ``BadInputError``
naming shard and field (``on_error="fail"``, the default) or is skipped, warned about and counted
(``on_error="skip"``, :func:`skipped_fields`). A shard with damaged Parquet structure raises, naming the file.

Throughput: with ``standardize=False`` samples stay uint16 (half the bytes of float32 through the
DataLoader's shared memory); standardise the batch on the GPU with
``hf_cellmae.data.standardize.standardize_channels(batch["pixel_values"].to(device))``: same contract.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict

import numpy as np

from .channels import ChannelVocabulary
from .problems import BadInputError, ProblemLog
from .shards import check_field_row, corrupt_shard_error, decode_pixels, load_manifest
from .standardize import contiguous_copy, rescale_factor_for_dtype, standardize_field_inplace, to_float32_contiguous

_DESCRIPTOR_KEYS = ["_path", "_group", "_unit", "_index", "_epoch"]


def _join(shard_dir: str, name: str) -> str:
    return str(shard_dir).rstrip("/") + "/" + name


def list_units(manifest: dict, shard_dir: str) -> list[tuple[str, int, int]]:
    """``[(shard path, row group, fields in it)]`` in manifest order: the units an epoch permutes."""
    return [
        (_join(shard_dir, shard["file"]), group, count)
        for shard in manifest["shards"]
        for group, count in enumerate(shard["row_groups"])
    ]


def _epoch_order(context: dict, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit visiting order and cumulative sample offsets for one epoch."""
    sizes = np.array([count for _, _, count in context["units"]], dtype=np.int64) * context["crops_per_field"]
    if context["shuffle"]:
        order = np.random.default_rng([context["seed"], epoch]).permutation(len(sizes))
    else:
        order = np.arange(len(sizes))
    offsets = np.concatenate([[0], np.cumsum(sizes[order])])  # (U + 1,)
    return order, offsets


def _piece_bounds(total: int, num_pieces: int, piece: int) -> tuple[int, int]:
    return (piece * total) // num_pieces, ((piece + 1) * total) // num_pieces


def _generate_descriptors(pieces: list[int], context: dict):
    """The ``datasets`` generator: yields one small descriptor per sample of the given pieces."""
    epochs = context["num_epochs"]
    if epochs is None:
        _check_one_piece_per_consumer(context)
    for piece in pieces:
        epoch = context["epoch"]
        while epochs is None or epoch < context["epoch"] + epochs:
            order, offsets = _epoch_order(context, epoch)
            low, high = _piece_bounds(int(offsets[-1]), context["num_pieces"], piece)
            first = int(np.searchsorted(offsets, low, side="right")) - 1
            position = first
            while position < len(order) and offsets[position] < high:
                unit = int(order[position])
                path, group, count = context["units"][unit]
                size = count * context["crops_per_field"]
                if context["shuffle"]:
                    within = np.random.default_rng([context["seed"], epoch, unit]).permutation(size)
                else:
                    within = np.arange(size)
                start = max(low - int(offsets[position]), 0)
                stop = min(high - int(offsets[position]), size)
                for index in within[start:stop]:
                    yield {
                        "_path": path,
                        "_group": group,
                        "_unit": unit,
                        "_index": int(index),
                        "_epoch": epoch,
                    }
                position += 1
            epoch += 1


def _check_one_piece_per_consumer(context: dict) -> None:
    """An endless piece never ends, so each consumer (rank x worker) must hold exactly one piece."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    workers = info.num_workers if info is not None else 1
    if workers != context["num_workers"]:
        raise ValueError(
            f"this endless stream (num_epochs=None) was built with num_workers={context['num_workers']} but is read by "
            f"{workers} DataLoader worker(s) per rank; pass num_workers={workers} to stream_fields (1 for a DataLoader "
            "with num_workers=0) so that each worker owns one piece of every epoch"
        )


def _binary_views(chunk) -> list[memoryview]:
    """The values of a pyarrow (large_)binary array as zero-copy memoryviews (``as_buffer`` copies)."""
    _, offsets_buffer, data = chunk.buffers()
    offset_type = np.int64 if str(chunk.type) == "large_binary" else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
    memory = memoryview(data)
    return [memory[int(start) : int(stop)] for start, stop in zip(offsets[:-1], offsets[1:])]


class _RowGroupCache:
    """The last few decoded row groups of this process (samples of a unit arrive one after another).

    A local shard is known by its absolute path, size and modification time, not by the path string a
    stream was given: a relative `shards/...` read again from another working folder, or a shard folder
    rewritten in the same process (a notebook), is read afresh instead of served from the cache.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self.groups: OrderedDict = OrderedDict()
        self.files: OrderedDict = OrderedDict()

    @staticmethod
    def _identity(path: str) -> tuple:
        if "://" in path:
            return (path,)
        stat = os.stat(path)
        return (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)

    def _parquet(self, path: str, identity: tuple, storage_options: dict):
        import pyarrow.parquet as pq

        if identity not in self.files:
            if "://" in path:
                import fsspec

                handle = fsspec.open(path, "rb", **storage_options).open()
                self.files[identity] = pq.ParquetFile(handle)
            else:
                self.files[identity] = pq.ParquetFile(path, memory_map=True)
            while len(self.files) > 4:
                self.files.popitem(last=False)
        return self.files[identity]

    def get(self, path: str, group: int, storage_options: dict) -> dict:
        """The decoded columns of one row group; ``"problem"`` holds, per field, the error of a failed pixel CRC-32
        or row checksum (``None`` when intact)."""
        identity = self._identity(path)
        key = (identity, group)
        if key not in self.groups:
            try:
                table = self._parquet(path, identity, storage_options).read_row_group(group)
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as error:  # pyarrow: "Invalid page header", truncated footer...
                self.files.pop(identity, None)
                raise corrupt_shard_error(path, error) from error
            columns = {name: table.column(name).to_pylist() for name in table.column_names if name != "pixels"}
            columns["pixels"] = [view for chunk in table.column("pixels").chunks for view in _binary_views(chunk)]
            # Checked once per row group load (every crop of a field reuses it): the cost is one CRC pass per field
            # over its pixels, and one over its other columns (format /1 shards have no row checksum).
            columns["problem"] = [_row_problem(columns, row, path) for row in range(len(columns["pixels"]))]
            columns["metadata"] = [json.loads(text) for text in columns["metadata"]]
            self.groups[key] = columns
            while len(self.groups) > self.size:
                self.groups.popitem(last=False)
        return self.groups[key]


def _row_problem(columns: dict, row: int, path: str) -> BadInputError | None:
    """The error of a row that fails its pixel CRC-32 or its row checksum (``None`` when intact)."""
    try:
        check_field_row({name: values[row] for name, values in columns.items()}, path)
    except BadInputError as error:
        return error
    return None


_CACHE = _RowGroupCache()
_SKIPPED: dict[tuple[str, str], str] = {}  # (shard, field_id) -> reason, for this process


def skipped_fields() -> list[dict]:
    """Fields this process skipped as corrupt (``on_error="skip"``): ``[{"file", "field", "reason", "stage"}]``.

    Each is also reported once, when first met, as a ``CorruptFieldWarning``; DataLoader workers keep their own lists.
    """
    return [
        {"reason": reason, "file": shard, "field": field_id, "stage": "stream"}
        for (shard, field_id), reason in _SKIPPED.items()
    ]


class CorruptFieldWarning(UserWarning):
    """A field skipped by the stream because its pixels fail their CRC-32 check (``on_error="skip"``)."""


def _check_intact(columns: dict, row: int, path: str, on_error: str) -> bool:
    """``True`` for an intact field; a corrupt one (pixels or row checksum) raises (``fail``) or is counted, warned
    about once, and dropped (``skip``)."""
    error = columns["problem"][row]
    if error is None:
        return True
    field_id = columns["field_id"][row]
    if on_error == "fail":
        raise BadInputError(
            f"{error} [or stream with on_error='skip' (--on-error skip) to skip and count corrupt fields]", file=path
        )
    if (path, field_id) not in _SKIPPED:
        _SKIPPED[(path, field_id)] = (
            "pixel CRC-32 mismatch" if "CRC-32 check" in str(error) else "row checksum mismatch"
        )
        warnings.warn(
            f"skipping {error} ({len(_SKIPPED)} corrupt field(s) skipped so far)", CorruptFieldWarning, stacklevel=2
        )
    return False


def _metadata_value(value):
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _decode_sample(descriptor: dict, options: dict) -> dict:
    """Descriptor -> training sample: decode the field, crop, augment, pick channels, standardise."""
    columns = _CACHE.get(descriptor["_path"], descriptor["_group"], options["storage_options"])
    row, crop_index = divmod(descriptor["_index"], options["crops_per_field"])
    if not _check_intact(columns, row, descriptor["_path"], options["on_error"]):
        return None
    field = decode_pixels(columns["pixels"][row], columns["dtype"][row], columns["shape"][row])  # (C, H, W)
    channels = columns["channels"][row]
    num_channels, height, width = field.shape
    rng = np.random.default_rng([options["seed"], descriptor["_epoch"], descriptor["_unit"], descriptor["_index"]])
    size = options["image_size"]
    if size is None:
        crop_y, crop_x, crop = 0, 0, field
    else:
        if size > height or size > width:
            raise ValueError(
                f"image_size={size} is larger than field {columns['field_id'][row]} ({height}x{width}); "
                "lower image_size or re-shard larger fields"
            )
        crop_y, crop_x = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        crop = field[:, crop_y : crop_y + size, crop_x : crop_x + size]  # (C, S, S)
    keep = np.arange(num_channels)
    subset = options["channel_subset"]
    if subset is not None:
        if subset > num_channels:
            raise ValueError(
                f"channel_subset={subset} but field {columns['field_id'][row]} has only {num_channels} channels"
            )
        keep = np.sort(rng.choice(num_channels, size=subset, replace=False))
        crop = crop[keep]
    transform = int(rng.integers(0, 8)) if options["augment"] else 0
    if transform:
        crop = np.rot90(crop, k=transform % 4, axes=(-2, -1))
        if transform >= 4:
            crop = crop[..., ::-1]
    if options["standardize"]:
        pixel_values = standardize_field_inplace(to_float32_contiguous(crop), rescale_factor_for_dtype(crop.dtype))
    else:
        pixel_values = contiguous_copy(crop) if options["contiguous"] else crop
    vocabulary = options["channel_vocabulary"]  # data.channels.ChannelVocabulary: the rule embed matches by too
    ids = [vocabulary.index(channels[i]) for i in keep]
    if None in ids:
        unknown = channels[keep[ids.index(None)]]
        raise ValueError(
            f"channel {unknown!r} of field {columns['field_id'][row]} is not in the channel vocabulary "
            f"{vocabulary.names}"
        )
    channel_ids = np.array(ids, dtype=np.int64)
    sample = {
        "pixel_values": pixel_values,
        "channel_ids": channel_ids,
        "field_id": columns["field_id"][row],
        "experiment": columns["experiment"][row],
        "plate": columns["plate"][row],
        "well": columns["well"][row],
        "site": columns["site"][row],
        "crop_index": crop_index,
        "crop_y": crop_y,
        "crop_x": crop_x,
        "transform": transform,
        "epoch": descriptor["_epoch"],
    }
    metadata = columns["metadata"][row]
    for name in options["metadata_fields"]:
        sample[name] = _metadata_value(metadata.get(name))
    return sample


def _decode_batch(batch: dict, options: dict) -> dict:
    """Batched form of :func:`_decode_sample` for ``on_error="skip"``: corrupt fields give no sample."""
    descriptors = [dict(zip(batch, values)) for values in zip(*batch.values())]
    samples = [sample for sample in (_decode_sample(d, options) for d in descriptors) if sample is not None]
    keys = samples[0].keys() if samples else []
    return {key: [sample[key] for sample in samples] for key in keys}


def stream_fields(
    shard_dir: str,
    *,
    image_size: int | None = 256,
    crops_per_field: int = 1,
    augment: bool = True,
    channel_subset: int | None = None,
    channel_vocabulary: list[str] | None = None,
    standardize: bool = True,
    contiguous: bool = True,
    seed: int = 0,
    epoch: int = 0,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 1,
    metadata_fields: list[str] | None = None,
    storage_options: dict | None = None,
    on_error: str = "fail",
    plates: list[str] | None = None,
    exclude_plates: list[str] | None = None,
):
    """Stream random crops of the fields in a shard folder as a ``datasets.IterableDataset``.

    Args:
        shard_dir: folder written by ``cellmae shard`` / ``cellmae synthetic --shards``, local path or any
            fsspec URL (``s3://bucket/shards``, ``hf://datasets/org/name/shards``).
        image_size: side ``S`` of the square crops; ``None`` yields whole fields (no crop).
        crops_per_field: samples drawn from each field per epoch (different random crops).
        augment: random flips and 90-degree rotations (the 8 symmetries of the square).
        channel_subset: keep this many channels per sample, chosen at random (channel-agnostic training);
            ``None`` keeps all. All samples then have the same C, so batches collate.
        channel_vocabulary: channel names that ``channel_ids`` index into (e.g. ``config.channel_names``);
            default ``manifest["channels"]``. A channel missing from it raises a clear error.
        standardize: yield ``pixel_values`` standardised per image and channel (the model's normalisation
            contract); ``False`` yields the raw crop at its stored dtype (uint8/uint16).
        contiguous: with ``standardize=False``, ``False`` yields crops as strided views of the decoded field
            (flipped/rotated views have negative strides) instead of copies: one copy less per sample when
            your collate copies anyway (``np.stack``, as the training loop does). ``torch.as_tensor`` and
            the default DataLoader collate reject negative strides, so keep the default unless you stack.
        seed, epoch: the order, crops and augmentations are a pure function of ``(seed, epoch)``.
        num_epochs: epochs this stream runs through, starting at ``epoch``, each in its own order;
            ``None`` = endless (for step-based training).
        shuffle: ``False`` keeps the manifest order and takes crops in order (evaluation, tests).
        rank, world_size: this process's share (see "Using it with accelerate" in the module docstring).
            ``world_size`` defaults to ``$WORLD_SIZE`` (1 when unset).
        num_workers: DataLoader workers per rank you will use; the epoch is cut into
            ``world_size * num_workers`` pieces so that no worker and no rank idles.
        metadata_fields: metadata columns to yield (default: all of ``manifest["metadata_columns"]``;
            missing values become ``""``, lists become JSON text, so that batches collate).
        storage_options: passed to fsspec for remote URLs.
        on_error: what a field whose pixels fail their CRC-32 check, or whose other columns fail the row checksum
            (both checked on every read), does: ``"fail"``
            raises ``BadInputError`` naming the shard and the field; ``"skip"`` drops its samples, warns once per
            field (``CorruptFieldWarning``) and counts it (:func:`skipped_fields`). A shard whose Parquet
            structure is damaged always raises, naming the file and the repair.
        plates: yield only samples of these plates (e.g. held-out plates to evaluate on); default all.
        exclude_plates: never yield samples of these plates (e.g. held out from training). Both filter decoded
            samples, so the order, crops and resume of the remaining samples are those of the unfiltered stream.

    Returns:
        ``datasets.IterableDataset`` whose examples are dicts:
        ``pixel_values`` float32 ``(C, S, S)`` (or the raw dtype), ``channel_ids`` int64 ``(C,)``,
        ``field_id``, ``experiment``, ``plate``, ``well``, ``site`` (str), ``crop_index``, ``crop_y``, ``crop_x``,
        ``transform`` (0-7: ``rot90`` k = t % 4, then a left-right flip if t >= 4), ``epoch`` (int),
        and the metadata fields. ``state_dict()`` / ``load_state_dict()`` resume at the exact sample.
        Use :func:`count_samples` for the number of samples per epoch.
    """
    import datasets

    manifest = load_manifest(shard_dir)
    ProblemLog(on_error)  # refuses an unknown policy
    if crops_per_field < 1:
        raise ValueError(f"crops_per_field must be >= 1, got {crops_per_field}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels or None, got {image_size}")
    if channel_subset is not None and channel_subset < 1:
        raise ValueError(f"channel_subset must be >= 1 or None, got {channel_subset}")
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    num_workers = max(1, num_workers)
    num_pieces = world_size * num_workers
    vocabulary = list(channel_vocabulary) if channel_vocabulary is not None else list(manifest["channels"])
    if metadata_fields is None:
        metadata_fields = list(manifest.get("metadata_columns", []))
    reserved = {
        "pixel_values",
        "channel_ids",
        "field_id",
        "experiment",
        "plate",
        "well",
        "site",
        "crop_index",
        "crop_y",
        "crop_x",
        "transform",
        "epoch",
    }
    metadata_fields = [name for name in metadata_fields if name not in reserved]
    context = {
        "units": list_units(manifest, shard_dir),
        "crops_per_field": crops_per_field,
        "seed": seed,
        "epoch": epoch,
        "num_epochs": num_epochs,
        "shuffle": shuffle,
        "num_pieces": num_pieces,
        "num_workers": num_workers,
    }
    pieces = list(range(num_pieces))
    if rank is not None:
        pieces = pieces[rank * num_workers : (rank + 1) * num_workers]
    stream = datasets.IterableDataset.from_generator(
        _generate_descriptors, gen_kwargs={"pieces": pieces, "context": context}
    )
    options = {
        "image_size": image_size,
        "crops_per_field": crops_per_field,
        "seed": seed,
        "augment": augment,
        "channel_subset": channel_subset,
        "standardize": standardize,
        "contiguous": contiguous,
        "channel_vocabulary": ChannelVocabulary(vocabulary),
        "metadata_fields": metadata_fields,
        "storage_options": storage_options or {},
        "on_error": on_error,
    }
    if on_error == "skip":  # a batched map may return fewer samples than it was given
        stream = stream.map(
            _decode_batch, batched=True, batch_size=1, fn_kwargs={"options": options}, remove_columns=_DESCRIPTOR_KEYS
        )
    else:
        stream = stream.map(_decode_sample, fn_kwargs={"options": options}, remove_columns=_DESCRIPTOR_KEYS)
    if plates is not None or exclude_plates:
        stream = stream.filter(
            _plate_is_kept,
            fn_kwargs={"keep": None if plates is None else set(plates), "drop": set(exclude_plates or [])},
        )
    return stream


def _plate_is_kept(sample: dict, keep: set | None, drop: set) -> bool:
    return (keep is None or sample["plate"] in keep) and sample["plate"] not in drop


def count_samples(
    shard_dir: str,
    crops_per_field: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 1,
) -> int:
    """Samples per epoch: of the whole folder, or of one rank when ``rank`` is given (same arguments as
    :func:`stream_fields`). Ranks differ by at most ``num_workers`` samples."""
    manifest = load_manifest(shard_dir)
    total = manifest["num_fields"] * crops_per_field
    if rank is None:
        return total
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    num_pieces = world_size * max(1, num_workers)
    pieces = range(rank * max(1, num_workers), (rank + 1) * max(1, num_workers))
    return sum(high - low for low, high in (_piece_bounds(total, num_pieces, piece) for piece in pieces))
