"""Embeddings at scale: fields of view -> one row per field in a Parquet table (``cellmae embed``).

Input: a shard folder (``cellmae shard``; read one Parquet row group at a time) or any folder layout
that ``hf_cellmae.data.layouts.discover_fields`` reads (RxRx, file-name pattern, load_data CSV,
stacks), optionally joined with a metadata table.

Featurisers: a CA-MAE model (local folder or Hub id; ``ModelFeaturizer``), whose fields are tiled
into model-sized crops (``crop_mode="tile"``, RxRx3-core's four 256 px crops of a 512 px image) and
the crop embeddings averaged per field, pooled ``(D,)`` or channel-wise ``(C*D,)``; or raw pixel
statistics (``PixelStatsFeaturizer``, a baseline).

Output folder ``OUT``::

    part-00000.parquet ...   one per input shard (or per ``fields_per_part`` fields of a layout):
                             Metadata_field_id, Metadata_experiment, Metadata_plate, Metadata_well,
                             Metadata_site, Metadata_num_crops, Metadata_<key> for every metadata key
                             (perturbation, batch, is_control ...), then the feature columns
                             (``feature_000`` ... or ``<channel>_feature_000`` ... channel-wise).
    _embedding_info.json     model, data, options, the plan (units and their fields) and finished parts.

Read it back with ``hf_cellmae.evaluation.read_embeddings(OUT)``. Each part is written to a hidden
temporary file and renamed when complete, so an interrupted run resumes by skipping the finished
parts; a run with different options into the same folder is refused. Memory is bounded by one
batch of fields (and one shard row group), whatever the number of images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..data.shards import IDENTITY_COLUMNS, MANIFEST_NAME
from ..errors import ensure_writable_folder
from .options import EmbedOptions, embed_options
from .pixel_stats import DEFAULT_PERCENTILES, pixel_statistic_names, pixel_statistics
from .tables import is_metadata, metadata_column

INFO_NAME = "_embedding_info.json"
READOUTS = ("mean", "cls", "mean_std", "channelwise")
# The read-out the demo and docs/evidence.md (section 3) evaluate: one mean token per stain beat the pooled mean.
DEFAULT_READOUT = "channelwise"
# A field's identity in a shard row and in a table: its id, then where it was imaged (data.shards.IDENTITY_COLUMNS).
FIELD_IDENTITY = ("field_id", *IDENTITY_COLUMNS)


@dataclass
class Field:
    """One field of view to embed: pixels (C, H, W) at the stored dtype, channel names, identity."""

    pixels: np.ndarray
    channels: list[str]
    identity: dict
    metadata: dict = field(default_factory=dict)
    file: str = ""  # where it was read from (the first channel's file, or the shard), named when it is refused


# ---------------------------------------------------------------- inputs


@dataclass
class Task:
    """A piece of one unit that one DataLoader worker reads: a few shard row groups, or a few image-folder fields.

    Tasks are numbered in plan order (``index``); the main process consumes them in that order, so the rows of a
    part are the same whatever the number of workers.
    """

    unit: str
    num_fields: int
    shard: str | None = None  # a shard file and its row groups ...
    row_groups: tuple[int, ...] = ()
    records: list | None = None  # ... or image-folder FieldRecords
    min_field_size: int = 0
    storage_options: dict | None = None  # a shard folder in object storage: its fsspec options
    index: int = -1
    last: bool = False  # the unit's last task: its part is written after it


@dataclass
class Unit:
    """A resumable piece of work, written as one part: an input shard, or a slice of an image folder's fields."""

    name: str
    num_fields: int
    tasks: list[Task]
    field_ids: list[str] | None = None
    fingerprint: str | None = None  # the input's content (shard sha256; image files' sizes and mtimes) when planned


@dataclass
class ReadProblem:
    """A field a worker could not read or prepare; the main process applies the ``on_error`` policy to it."""

    reason: str
    file: str = ""
    field: str = ""
    fatal: bool = False  # the whole shard is unreadable: raised whatever the policy


def _read_task(task: Task) -> Iterator[Field | ReadProblem]:
    """The fields of one task in order, or a :class:`ReadProblem` in place of each one that cannot be read."""
    from ..data.problems import BadInputError

    if task.shard is not None:
        yield from _read_shard_groups(task.shard, task.row_groups, task.storage_options)
        return
    from ..data.image_io import read_field
    from ..data.shards import check_field_pixels

    for record in task.records:
        try:
            pixels = read_field(record)  # (C, H, W)
            check_field_pixels(record, pixels, task.min_field_size)  # the checks `cellmae shard` makes
        except BadInputError as error:
            yield ReadProblem(str(error), error.file or record.files[0], record.field_id)
            continue
        yield Field(
            pixels=pixels,
            channels=list(record.channels),
            identity={
                "field_id": record.field_id,
                "experiment": record.experiment,
                "plate": record.plate,
                "well": record.well,
                "site": record.site,
            },
            metadata={**record.tags, **record.metadata},
            file=record.files[0],
        )


def _read_shard_groups(
    path: str, row_groups: tuple[int, ...], storage_options: dict | None = None
) -> Iterator[Field | ReadProblem]:
    """Fields of some row groups of a shard (a local file or an fsspec URL); each field's pixels are checked against
    their CRC-32 as they are read. Remote reads are retried with backoff on transient errors."""
    import pyarrow.parquet as pq

    from ..data.problems import BadInputError
    from ..data.remote import filesystem, is_url, with_retries
    from ..data.shards import check_field_row, corrupt_shard_error, decode_pixels

    def open_shard():
        if not is_url(path):
            return pq.ParquetFile(path)
        fs, key = filesystem(path, storage_options)
        return pq.ParquetFile(fs.open(key, "rb"))

    try:
        parquet = with_retries(open_shard, path)
    except FileNotFoundError as error:
        yield ReadProblem(
            f"shard {path} is missing ({error}); re-run `cellmae shard` or point DATA at the right folder",
            path,
            fatal=True,
        )
        return
    except (OSError, ValueError) as error:
        yield ReadProblem(str(corrupt_shard_error(path, error)), path, fatal=True)
        return
    for group in row_groups:  # one row group in memory at a time
        try:
            table = (
                with_retries(lambda group=group: parquet.read_row_group(group), f"{path} (row group {group})")
                if is_url(path)
                else parquet.read_row_group(group)
            )
        except (OSError, ValueError) as error:  # pyarrow: "Invalid page header"...
            yield ReadProblem(str(corrupt_shard_error(path, error)), path, fatal=True)
            return
        for row in range(table.num_rows):  # one field's Python objects at a time
            values = {name: table.column(name)[row].as_py() for name in table.column_names}
            try:
                check_field_row(values, path)  # pixels against their CRC-32, every other column against row_crc32
            except BadInputError as error:
                yield ReadProblem(str(error), path, values["field_id"])
                continue
            yield Field(
                pixels=decode_pixels(values["pixels"], values["dtype"], values["shape"]),
                channels=list(values["channels"]),
                identity={key: values[key] for key in FIELD_IDENTITY},
                metadata=json.loads(values["metadata"] or "{}"),
                file=path,
            )
        del table


def _shard_units(
    shard_dir: str, fields_per_batch: int, storage_options: dict | None = None
) -> tuple[list[Unit], list[str], dict]:
    """One unit per shard, cut into tasks of whole row groups holding at least ``fields_per_batch`` fields.
    ``shard_dir`` is a local folder or an fsspec URL (``s3://bucket/shards``)."""
    import pyarrow.parquet as pq

    from ..data.shards import load_manifest

    manifest = load_manifest(shard_dir, storage_options)
    units = []
    for entry in manifest["shards"]:
        path = f"{str(shard_dir).rstrip('/')}/{entry['file']}"
        sizes = entry.get("row_groups")
        if sizes is None:  # an older manifest: the row groups from the file's footer
            metadata = pq.ParquetFile(path).metadata
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        tasks, groups, count = [], [], 0
        for group, size in enumerate(sizes):
            groups.append(group)
            count += size
            if count >= fields_per_batch or group == len(sizes) - 1:
                tasks.append(
                    Task(
                        Path(entry["file"]).stem,
                        count,
                        shard=path,
                        row_groups=tuple(groups),
                        storage_options=storage_options,
                    )
                )
                groups, count = [], 0
        units.append(Unit(Path(entry["file"]).stem, int(entry["num_fields"]), tasks, fingerprint=entry.get("sha256")))
    source = {
        "kind": "shards",
        "path": str(shard_dir),
        "num_fields": manifest["num_fields"],
        "shards": [[entry["file"], entry.get("sha256")] for entry in manifest["shards"]],
    }
    return units, list(manifest.get("metadata_columns", [])), source


def _layout_units(
    source: Path,
    layout: str,
    pattern: str | None,
    metadata: str | Path | None,
    fields_per_part: int,
    fields_per_batch: int,
    min_field_size: int,
    channels: str | list[str] | dict[str, str] | None = None,
) -> tuple[list[Unit], list[str], dict]:
    """Units of ``fields_per_part`` discovered fields, in tasks of ``fields_per_batch`` fields."""
    from ..data.channels import name_channels, parse_channels_option
    from ..data.layouts import discover_fields
    from ..data.metadata import join_metadata, read_metadata_table
    from ..data.problems import ProblemLog
    from ..data.records import source_fingerprint

    given = parse_channels_option(channels)  # refuse a malformed --channels before reading anything
    found = ProblemLog()  # stray files and incomplete sites lose no readable field: always listed, never fatal
    records = discover_fields(source, layout=layout, pattern=pattern, problems=found)
    table = read_metadata_table(metadata) if metadata is not None else None
    # The same stain names `cellmae shard` would record: a per-file table (or load_data columns) names the channels.
    read_layout = (
        "load_data" if layout == "load_data" or (layout == "auto" and source.suffix.lower() == ".csv") else layout
    )
    name_channels(
        records, given, table=table, source=str(metadata) if metadata else "metadata", root=source, layout=read_layout
    )
    if table is not None:
        join_metadata(records, table, found, source=str(metadata))
    if len(found):
        print(f"embed: {len(found)} input problems skipped while reading {source}:")
        for problem in found.as_dicts()[:20]:
            print(f"  {problem}")
    if not records:
        raise ValueError(f"no field of view found in {source} (layout={layout!r}); check --layout/--pattern")

    units = []
    for k, start in enumerate(range(0, len(records), fields_per_part)):
        name, chunk = f"part-{k:05d}", records[start : start + fields_per_part]
        tasks = [
            Task(
                name,
                len(chunk[i : i + fields_per_batch]),
                records=chunk[i : i + fields_per_batch],
                min_field_size=min_field_size,
            )
            for i in range(0, len(chunk), fields_per_batch)
        ]
        units.append(Unit(name, len(chunk), tasks, [r.field_id for r in chunk], fingerprint=source_fingerprint(chunk)))
    keys = sorted({key for record in records for key in (*record.tags, *record.metadata)})
    info = {
        "kind": "layout",
        "path": str(source),
        "layout": layout,
        "pattern": pattern,
        "metadata": str(metadata) if metadata else None,
        "num_fields": len(records),
    }
    if given is not None:  # only when given, so a folder embedded before --channels existed resumes
        info["channels"] = given
    return units, keys, info


def plan_units(
    data: str | Path, options: EmbedOptions | None = None, **settings
) -> tuple[list[Unit], list[str], dict]:
    """The resumable units of an input: ``(units, metadata_keys, source_description)``.

    A shard folder (local, or an fsspec URL such as ``s3://bucket/shards`` read with ``options.storage_options``)
    gives one unit per shard; a local image folder one unit per ``fields_per_part`` fields, whose fields get the
    checks ``cellmae shard`` makes (readable, finite, at least ``min_field_size`` px; default: shard's) and whose
    channels are named as ``cellmae shard`` names them (``channels``, else a per-file metadata table, else the file
    tokens). ``settings``: options by keyword, as :func:`embed_dataset`'s.
    """
    from ..data.remote import is_url, parse_storage_options
    from ..data.shards import MIN_FIELD_SIZE

    options = embed_options(options, **settings)
    fields_per_batch, fields_per_part, metadata = options.fields_per_batch, options.fields_per_part, options.metadata
    if fields_per_batch < 1 or fields_per_part < 1:
        raise ValueError(f"fields_per_batch={fields_per_batch} and fields_per_part={fields_per_part} must be >= 1")
    shard_folder = is_url(str(data)) or (Path(data) / MANIFEST_NAME).is_file()
    if shard_folder and metadata is not None:
        raise ValueError(f"{data} is a shard folder: its metadata was joined when sharding; drop --metadata")
    if shard_folder and options.channels is not None:
        raise ValueError(
            f"{data} is a shard folder: its channels were named when sharding (cellmae shard --channels); "
            "drop --channels"
        )
    if is_url(str(data)):
        try:
            return _shard_units(str(data), fields_per_batch, parse_storage_options(options.storage_options))
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error}. `cellmae embed` reads shard folders from object storage; for an image "
                f"folder there, shard it first: cellmae shard {data} SHARDS"
            ) from None
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"DATA {data} does not exist; pass a shard folder (cellmae shard) or an image folder")
    if shard_folder:
        return _shard_units(str(data), fields_per_batch)
    size = MIN_FIELD_SIZE if options.min_field_size is None else options.min_field_size
    return _layout_units(
        data, options.layout, options.pattern, metadata, fields_per_part, fields_per_batch, size, options.channels
    )


def parse_part(part: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"I/N"`` (1-based, e.g. ``"2/3"``) or ``(I, N)`` -> ``(I, N)``, as ``cellmae shard --part``; ``None`` -> ``(1, 1)``."""
    from ..data.shards import parse_part as parse_shard_part

    return (1, 1) if part is None else parse_shard_part(part)


def default_num_workers(processes: int = 1) -> int:
    """DataLoader workers per process: the cores this process may use, shared by ``processes`` processes on the
    machine, minus the one that runs the model; at most 8, and 0 (read in the main process) on a single core."""
    return max(0, min(8, _cores() // max(processes, 1) - 1))


# ---------------------------------------------------------------- featurisers


class PixelStatsFeaturizer:
    """Per-channel mean / std / percentiles of the rescaled pixels (a baseline, no model)."""

    name = "pixel_stats"

    def __init__(self, percentiles=DEFAULT_PERCENTILES):
        self.percentiles = tuple(percentiles)

    def describe(self) -> dict:
        return {"featurizer": self.name, "percentiles": list(self.percentiles)}

    def feature_names(self, channels: list[str]) -> list[str]:
        return pixel_statistic_names(channels, self.percentiles)

    def __call__(self, fields: list[Field]) -> tuple[np.ndarray, np.ndarray]:
        features = np.stack([pixel_statistics(f.pixels, self.percentiles) for f in fields])
        return features, np.ones(len(fields), dtype=np.int64)


class ModelFeaturizer:
    """CA-MAE encoder embeddings of fields, tiled into model-sized crops and averaged per field.

    A field's channels are matched to the model's by stain name (``config.channel_names``): another order or a
    subset of the model's stains works, an unknown stain is refused; see :meth:`_channel_ids`.

    Args:
        model: a model folder (``save_pretrained`` of ``CellMAEModel``, ``CellMAEForPreTraining`` or an image
            classifier such as a WSL run's, whose head is ignored) or a Hub id; its ``preprocessor_config.json``
            is used when present.
        device: torch device ("cpu", "cuda", "cuda:1", ...); "auto" (default): this process's device under
            ``accelerate launch`` (``cuda:LOCAL_RANK``), else CUDA when there is one, else the CPU.
        dtype: "float32", "bfloat16" or "float16" (autocast on the device); "auto" (default): bfloat16 on CUDA,
            float32 elsewhere.
        batch_size: crops per forward pass.
        crop_mode: "tile" (non-overlapping model-sized crops, averaged), "center" or "none".
        channelwise: one (D,) vector per channel, concatenated (C*D,), instead of the pooled (D,)
            (the same as ``readout="channelwise"``).
        image_size: crop size (default: the model's ``image_size``).
        readout: how a crop's tokens become one vector (see ``READOUTS``): ``"mean"`` (mean of the
            patch tokens, OpenPhenom's), ``"cls"`` (the class token), ``"mean_std"`` (mean and
            standard deviation of the patch tokens, 2D), ``"channelwise"`` (mean per channel, C*D);
            ``None``: ``DEFAULT_READOUT`` (``"mean"`` for a MU-Net, which has no tokens).
        layer: read the tokens after this encoder block (1-based; negative counts from the end;
            ``None`` = the encoder's output, after its final norm).
        compile: run the encoder through ``torch.compile`` (worth it on a GPU for a large screen; the first
            batches are slower while it compiles).

    Cropping and normalising (``preparer``, picklable) runs in ``embed_dataset``'s DataLoader workers; the model
    runs in :meth:`embed_prepared`. ``featurizer(fields)`` does both.
        by_position: feed plate channel i as model channel i when the plate's channels are unnamed file tokens
            (``w1``...) and the model's are stains; without it such a plate is refused.
    """

    name = "model"

    def __init__(
        self,
        model: str | Path,
        device: str = EmbedOptions.device,
        dtype: str = EmbedOptions.dtype,
        batch_size: int = EmbedOptions.batch_size,
        crop_mode: str = EmbedOptions.crop_mode,
        channelwise: bool = EmbedOptions.channelwise,
        image_size: int | None = None,
        readout: str | None = EmbedOptions.readout,
        layer: int | None = None,
        by_position: bool = EmbedOptions.by_position,
        compile: bool = EmbedOptions.compile,
    ):
        import torch

        from .. import CellMAEImageProcessor

        device = resolve_device(device)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype == "auto":
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        if dtype not in dtypes:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(dtypes)} or 'auto'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path = str(model)
        self.model = load_encoder(model).to(device).eval()
        self.forward = torch.compile(self.model) if compile else self.model
        self.config = self.model.config
        # A MU-Net (fixed-channel U-Net MAE) has no tokens: its embedding is the pooled bottleneck.
        self.is_munet = self.config.model_type == "cellmunet"
        if readout is None:
            readout = "mean" if self.is_munet and not channelwise else DEFAULT_READOUT
        if self.is_munet and (channelwise or readout != "mean" or layer is not None):
            raise ValueError(
                f"{model} is a MU-Net: its embedding is the pooled bottleneck (readout='mean'); readout={readout!r}, "
                f"channelwise={channelwise} and layer={layer} need a CA-MAE's tokens"
            )
        self.image_size = image_size or self.config.image_size
        try:
            self.processor = CellMAEImageProcessor.from_pretrained(model)
        except (OSError, ValueError):
            self.processor = CellMAEImageProcessor(image_size=self.image_size)
        self.device, self.dtype, self.torch_dtype = torch.device(device), dtype, dtypes[dtype]
        if channelwise:
            readout = "channelwise"
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r} is not one of {READOUTS}")
        depth = getattr(self.config, "num_hidden_layers", 0)
        if layer is not None and not (1 <= abs(layer) <= depth):
            raise ValueError(
                f"layer={layer} is outside the encoder's blocks 1..{depth} (or -1..-{depth}); "
                "omit it for the encoder's output"
            )
        self.batch_size, self.crop_mode = batch_size, crop_mode
        self.readout, self.layer = readout, (None if layer is None else layer % (depth + 1) or depth)
        self.channelwise = readout == "channelwise"
        self._channel_id_cache: dict[tuple, object] = {}
        self._warned_positional = False
        self.preparer = CropPreparer(self.processor, self.image_size, crop_mode)
        self.by_position = by_position

    @classmethod
    def from_options(cls, model: str | Path, options: EmbedOptions) -> ModelFeaturizer:
        """The featuriser ``cellmae embed MODEL ...`` builds: ``options``' model fields (device, read-out...)."""
        names = (
            "device",
            "dtype",
            "batch_size",
            "crop_mode",
            "channelwise",
            "image_size",
            "readout",
            "layer",
            "by_position",
            "compile",
        )
        return cls(model, **{name: getattr(options, name) for name in names})

    def describe(self) -> dict:
        info = {
            "featurizer": self.name,
            "model": self.model_path,
            "dtype": self.dtype,
            "crop_mode": self.crop_mode,
            "image_size": self.image_size,
            "channelwise": self.channelwise,
            "hidden_size": self.config.hidden_size,
        }
        if self.readout not in ("mean", "channelwise") or self.layer is not None:
            info.update(readout=self.readout, layer=self.layer)  # (absent from older plans: they stay resumable)
        return info

    def feature_names(self, channels: list[str]) -> list[str]:
        width = self.config.hidden_size
        if self.readout == "channelwise":
            return [f"{channel}_feature_{i:03d}" for channel in channels for i in range(width)]
        if self.readout == "mean_std":
            return [f"{stat}_feature_{i:03d}" for stat in ("mean", "std") for i in range(width)]
        return [f"feature_{i:03d}" for i in range(width)]

    def _read_out(self, out, channels: int):
        """One vector per crop from the model output, by ``self.readout`` and ``self.layer``."""
        import torch

        if self.is_munet:
            return out.pooler_output  # (b, D)
        hidden = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]  # (b, 1 + C*N, D)
        patch_tokens = hidden[:, 1:]
        if self.readout == "cls":
            return hidden[:, 0]
        if self.readout == "mean_std":
            return torch.cat([patch_tokens.mean(1), patch_tokens.std(1)], dim=1)  # (b, 2D)
        if self.readout == "channelwise":
            return patch_tokens.reshape(len(hidden), channels, -1, hidden.shape[-1]).mean(2).flatten(1)  # (b, C*D)
        return patch_tokens.mean(1)  # (b, D)

    def _channel_ids(self, channels: list[str]):
        """The model's channel id of each of the plate's channels, matched by stain name (``(C,)``, or ``None``):
        ``data.channels.ChannelVocabulary``, the identical name or the same stain in another case or with
        CellProfiler's ``Orig`` prefix.

        A plate may hold the model's stains in another order, or a subset of them: each is fed with the id the
        model learnt for that stain. A stain the model does not know is refused (``UserError`` naming it and the
        model's names). Unnamed plate channels (file tokens such as ``w1``) for a model with stain names are refused
        too, unless ``by_position``; then, or for a model without ``channel_names``, channels are fed by position
        (``None`` = ids ``0..C-1``), with a one-time warning.
        """
        import torch

        from ..data.channels import ChannelVocabulary, is_channel_token
        from ..errors import UserError

        key = tuple(channels)
        if key in self._channel_id_cache:
            return self._channel_id_cache[key]
        model_names = [str(name) for name in (getattr(self.config, "channel_names", None) or [])]
        named_model = bool(model_names) and not all(is_channel_token(n) for n in model_names)
        if named_model and all(is_channel_token(c) for c in channels) and not self.by_position:
            raise UserError(
                f"the plate's channels are unnamed file tokens ({', '.join(channels)}) and the model's are stains "
                f"({', '.join(model_names)}); name them when sharding (cellmae shard ... --channels "
                f"{','.join(f'{c}=NAME' for c in channels)}, or a metadata table), or pass --by-position to feed plate "
                "channel i as model channel i"
            )
        if not named_model or all(is_channel_token(c) for c in channels):
            self._warn_positional(channels, model_names)
            self._channel_id_cache[key] = None
            return None
        vocabulary = ChannelVocabulary(model_names)  # the rule the training stream matches channels by
        ids = []
        for channel in channels:
            index = vocabulary.index(channel)
            if index is None:
                raise UserError(
                    f"the plate's channel {channel!r} is not one of the model's channels ({', '.join(model_names)}); "
                    f"if it is one of those stains under another name, rename it when sharding "
                    f"(cellmae shard ... --channels TOKEN=NAME, e.g. w1={model_names[0]}), otherwise use a model trained on {channel}"
                )
            ids.append(index)
        self._channel_id_cache[key] = torch.tensor(ids, device=self.device)  # (C,)
        return self._channel_id_cache[key]

    def _warn_positional(self, channels: list[str], model_names: list[str]) -> None:
        """Warn once per featuriser that channels are matched by position because names are missing."""
        import warnings

        if self._warned_positional:
            return
        self._warned_positional = True
        model = (
            f"the model's are {', '.join(model_names)}" if model_names else "the model's config has no channel_names"
        )
        warnings.warn(
            f"channels are matched by position, not by stain: the plate's channels are {', '.join(channels)} and "
            f"{model}; plate channel i is fed as model channel i. Name the plate's stains when sharding "
            "(cellmae shard ... --channels w1=NAME,... or a per-file metadata table) so they are matched by name",
            UserWarning,
            stacklevel=3,
        )

    def __call__(self, fields: list[Field]) -> tuple[np.ndarray, np.ndarray]:
        """``(features (n, F), crops per field (n,))`` of fields sharing one channel list."""
        return self.embed_prepared(fields, self.preparer(fields))

    def embed_prepared(self, fields: list[Field], prepared: dict) -> tuple[np.ndarray, np.ndarray]:
        """The model part of :meth:`__call__`, on what :attr:`preparer` made of ``fields`` (in a worker)."""
        import torch

        channels = fields[0].channels
        if any(f.channels != channels for f in fields):
            raise ValueError("a batch of fields must share one channel list; group fields by channel set first")
        crops, index = prepared["pixel_values"], prepared["image_index"]  # (N, C, S, S), (N,)
        channel_ids = self._channel_ids(channels)
        outputs = []
        autocast = torch.autocast(self.device.type, dtype=self.torch_dtype, enabled=self.torch_dtype != torch.float32)
        non_blocking = crops.is_pinned()
        with torch.inference_mode(), autocast:
            for start in range(0, len(crops), self.batch_size):
                pixel_values = crops[start : start + self.batch_size].to(self.device, non_blocking=non_blocking)
                out = self.forward(pixel_values, channel_ids=channel_ids, output_hidden_states=self.layer is not None)
                vectors = self._read_out(out, len(channels))  # (b, F)
                outputs.append(vectors.float().cpu())
        crop_vectors = torch.cat(outputs)  # (N, F)
        sums = torch.zeros(len(fields), crop_vectors.shape[1]).index_add_(0, index, crop_vectors)
        counts = torch.bincount(index, minlength=len(fields))
        return (sums / counts[:, None]).numpy(), counts.numpy()


class CropPreparer:
    """Fields -> the model's normalised crops (``{"pixel_values": (N, C, S, S), "image_index": (N,)}``).

    Picklable and model-free, so DataLoader workers run it while the model embeds the previous batch."""

    def __init__(self, processor, image_size: int, crop_mode: str):
        self.processor, self.image_size, self.crop_mode = processor, image_size, crop_mode

    def __call__(self, fields: list[Field]) -> dict:
        batch = self.processor(
            [f.pixels for f in fields], image_size=self.image_size, crop_mode=self.crop_mode, return_tensors="pt"
        )
        return {"pixel_values": batch["pixel_values"], "image_index": batch["image_index"]}


def resolve_device(device: str) -> str:
    """``"auto"`` -> this process's device (``accelerate``'s: ``cuda:LOCAL_RANK`` under ``accelerate launch``, else
    CUDA, MPS or the CPU, as accelerate picks); any other value is returned as given."""
    if device != "auto":
        return device
    return str(process_state().device)


def process_state():
    """accelerate's ``PartialState`` of this process: under ``accelerate launch`` (or torchrun) it joins the process
    group, on GPUs (NCCL) or, where there is none or ``ACCELERATE_USE_CPU`` is set, on CPUs (gloo)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def load_encoder(model: str | Path):
    """The encoder of a model folder or Hub id: ``CellMAEModel``, or ``CellMUNetModel`` for a MU-Net. The folder may
    hold a pre-training model (decoder dropped), an encoder, or an image classifier (``cellmae pretrain --objective
    wsl|classify``: head dropped, so a weakly supervised model is read out like an MAE, by its pooled tokens)."""
    from transformers import AutoConfig

    from .. import CellMAEModel, CellMUNetModel

    config = AutoConfig.from_pretrained(model)
    encoder_class = CellMUNetModel if config.model_type == "cellmunet" else CellMAEModel
    return encoder_class.from_pretrained(model)


# ---------------------------------------------------------------- reading overlapped with compute


class _TaskStream(IterableDataset):
    """The tasks of this process as an ``IterableDataset``: worker ``w`` of ``W`` reads tasks ``w, w + W, ...`` and
    yields one item per task (its fields, read and, when the featuriser has a ``preparer``, prepared)."""

    def __init__(self, tasks: list[Task], preparer):
        self.tasks, self.preparer = tasks, preparer

    def __iter__(self):
        worker = get_worker_info()
        start, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for task in self.tasks[start::step]:
            yield _run_task(task, self.preparer)


def _run_task(task: Task, preparer) -> dict:
    """One task's item: ``{"index", "unit", "last", "problems", "groups": [(fields, prepared)]}``.

    Fields are grouped by channel list (a model batch shares one); with a ``preparer`` the pixels are replaced by what
    it returns (e.g. crops), and a group it refuses is retried field by field so the refusal names the one field."""
    fields, problems = [], []
    for item in _read_task(task):
        (problems if isinstance(item, ReadProblem) else fields).append(item)
    groups = []
    for group in _batches_by_channels(iter(fields), len(fields) or 1):
        if preparer is None:
            groups.append((group, None))
            continue
        try:
            groups.append((_drop_pixels(group), preparer(group)))
        except ValueError:
            for one in group:  # find the field(s) the preparer cannot take
                try:
                    groups.append((_drop_pixels([one]), preparer([one])))
                except ValueError as error:
                    problems.append(
                        ReadProblem(
                            f"field {one.identity['field_id']} cannot be prepared for the model: {error}",
                            one.file,
                            one.identity["field_id"],
                        )
                    )
    return {"index": task.index, "unit": task.unit, "last": task.last, "problems": problems, "groups": groups}


def _drop_pixels(fields: list[Field]) -> list[Field]:
    """The fields without their pixels (the prepared tensors travel instead)."""
    return [Field(None, f.channels, f.identity, f.metadata, f.file) for f in fields]


def _identity(item):
    return item


def _task_items(tasks: list[Task], preparer, num_workers: int, pin_memory: bool) -> Iterator[dict]:
    """Each task's item, in task order, read by ``num_workers`` DataLoader workers ahead of the consumer.

    Memory stays bounded: at most ``2 * num_workers`` items are in flight (the DataLoader's prefetch), and each
    worker yields exactly one item per task, so the reorder buffer holds at most one round of workers."""
    import torch

    if num_workers == 0 or len(tasks) <= 1:
        for task in tasks:
            yield _run_task(task, preparer)
        return
    loader = torch.utils.data.DataLoader(
        _TaskStream(tasks, preparer),
        batch_size=None,
        num_workers=min(num_workers, len(tasks)),
        collate_fn=_identity,
        pin_memory=pin_memory,
        prefetch_factor=2,
    )
    waiting, expected = {}, 0
    for item in loader:
        waiting[item["index"]] = item
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1


# ---------------------------------------------------------------- writer


def _plan_hash(units: list[Unit], source: dict, options: dict) -> str:
    """What the parts are (input, options, units and their fields); not the inputs' content, which each part records
    (its fingerprint), so a repaired input redoes its own part instead of making the folder another run's."""
    if "shards" in source:
        source = {**source, "shards": [name for name, _ in source["shards"]]}
    plan = {"source": source, "options": options, "units": [[u.name, u.num_fields, u.field_ids] for u in units]}
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _rows(
    owners: list[Field],
    extra: dict[str, list],
    features: np.ndarray,
    metadata_keys: list[str],
    feature_names: list[str],
) -> pd.DataFrame:
    """One row per feature vector: its field's identity, the ``extra`` columns, the field's metadata, the features."""
    columns: dict[str, list] = {metadata_column(key): [f.identity[key] for f in owners] for key in FIELD_IDENTITY}
    columns.update(extra)
    for key in metadata_keys:
        column = metadata_column(key)
        if column not in columns:
            columns[column] = [f.metadata.get(key) for f in owners]
    if features.shape[1] != len(feature_names):
        raise ValueError(f"featuriser returned {features.shape[1]} features, expected {len(feature_names)}")
    frame = pd.DataFrame(columns)
    return pd.concat([frame, pd.DataFrame(features.astype(np.float32), columns=feature_names)], axis=1)


def _frame(
    fields: list[Field], features: np.ndarray, counts: np.ndarray, metadata_keys: list[str], feature_names: list[str]
) -> pd.DataFrame:
    """One row per field, with ``Metadata_num_crops``."""
    return _rows(fields, {"Metadata_num_crops": counts.tolist()}, features, metadata_keys, feature_names)


def _cell_frame(
    fields: list[Field], cells: list[dict], features: np.ndarray, metadata_keys: list[str], feature_names: list[str]
) -> pd.DataFrame:
    """One row per cell: its field's identity and metadata, ``Metadata_cell_id``, centroid, area, tokens kept, then
    the features."""
    from .single_cell import CELL_COLUMNS

    owners = [fields[cell["field_index"]] for cell in cells]
    extra = {f"Metadata_{key}": [cell[key] for cell in cells] for key in CELL_COLUMNS}
    return _rows(owners, extra, features, metadata_keys, feature_names)


PART_KEY = b"hf_cellmae_part"  # a part's row count and skipped fields, in its Parquet footer


def _write_part(out: Path, name: str, table: pd.DataFrame, skips: list[dict], fingerprint: str | None = None) -> None:
    """Write one part atomically (a hidden temporary file, renamed once complete) with its record in the footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    record = json.dumps({"rows": len(table), "skipped": skips, "fingerprint": fingerprint}, default=str).encode()
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), PART_KEY: record})
    temporary = out / f".{name}.parquet.{os.getpid()}.tmp"
    pq.write_table(arrow, temporary)
    os.replace(temporary, out / f"{name}.parquet")  # a part exists only once complete


def _part_record(path: Path, old_info: dict) -> tuple[int, list[dict], list[str]]:
    """``(rows, skipped, column names)`` of a written part, from its footer (or, for a part written before footers
    held it, from the ``_embedding_info.json`` of that run)."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    metadata = schema.metadata or {}
    if PART_KEY in metadata:
        record = json.loads(metadata[PART_KEY])
        return int(record["rows"]), list(record["skipped"]), list(schema.names)
    name = path.stem
    rows = old_info.get("parts", {}).get(name)
    if rows is None:
        rows = pq.ParquetFile(path).metadata.num_rows
    return int(rows), list(old_info.get("skipped", {}).get(name, [])), list(schema.names)


def _part_is_current(out: Path, unit: Unit) -> bool:
    """Whether ``unit``'s part is written and was made from the input as it is now (its recorded fingerprint; a part
    written before parts recorded one counts as current)."""
    import pyarrow.parquet as pq

    path = out / f"{unit.name}.parquet"
    if not path.is_file():
        return False
    record = (pq.read_schema(path).metadata or {}).get(PART_KEY)
    recorded = json.loads(record).get("fingerprint") if record else None
    return recorded is None or unit.fingerprint is None or recorded == unit.fingerprint


def _assemble_info(out: Path, units: list[Unit], info: dict) -> dict:
    """The ``_embedding_info.json`` of a finished plan: every part's rows and skipped fields, read from the parts."""
    info = {**info, "parts": {}, "skipped": {}}
    for unit in units:
        rows, skipped, names = _part_record(out / f"{unit.name}.parquet", info)
        info["parts"][unit.name], info["skipped"][unit.name] = rows, skipped
        if rows and "feature_columns" not in info:
            info["feature_columns"] = [c for c in names if not is_metadata(c)][:3] + ["..."]
    info["num_rows"] = sum(info["parts"].values())
    info["num_skipped"] = sum(len(skips) for skips in info["skipped"].values())
    info["complete"] = True
    return info


def embed_dataset(
    data: str | Path, out: str | Path, featurizer, options: EmbedOptions | None = None, **settings
) -> dict:
    """Embed every field of ``data`` into Parquet parts under ``out``; resume a finished-part-wise run.

    Many processes: run under ``accelerate launch`` (or any ``torch.distributed`` launcher that sets ``RANK`` and
    ``WORLD_SIZE``), and each process embeds a deterministic share of the parts (part ``k`` goes to process
    ``k mod world size``); machines without a shared process group take ``part="I/N"`` shares instead (both
    combine). Every process writes its own parts; the main process, once all are done (or, with ``part``, the
    process that finds every part written), writes ``_embedding_info.json``. The result is the same table as one
    process's. A killed process is resumed by re-running the same command: finished parts are kept.

    Reading is overlapped with compute: ``num_workers`` DataLoader workers read (and, for a model, crop and
    normalise) the next fields while the model runs; the parts are the same whatever their number.

    Args:
        data: shard folder or image folder / load_data CSV.
        out: output folder (created; on a file system every process and machine sees).
        featurizer: ``ModelFeaturizer(...)`` or ``PixelStatsFeaturizer()`` (anything with ``describe()``,
            ``feature_names(channels)`` and ``__call__(fields) -> (features, crop_counts)``; one that also has a
            picklable ``preparer(fields)`` and ``embed_prepared(fields, prepared)`` has the preparation done by the
            workers). A featuriser with ``per_cell = True`` (``SingleCellFeaturizer``, ``--single-cell``) returns
            ``(features, cells)`` from ``embed_prepared`` and gets one row per cell; its fields without a cell are
            listed under ``skipped`` (stage ``cells``).
        options: ``cellmae embed``'s options, read whole (default: its defaults); those of the featuriser (model,
            read-out, device, CellProfiler, single cell) are read by whoever builds ``featurizer``. Here:
        layout, pattern, metadata, channels: how to read an image folder (see ``discover_fields``; ``channels`` as
            ``cellmae shard --channels``: ``"w1=DNA,w2=ER"`` names each file channel's stain).
        fields_per_batch: fields read and featurised together (bounds memory with the crop batch); a shard is read
            in whole row groups, at least this many fields at a time.
        fields_per_part: fields per output part for an image folder (a shard folder: one part per shard).
        on_error: a field that cannot be read (an unreadable image, non-finite pixels, a field smaller than
            ``min_field_size``, a shard field failing its CRC-32 check): ``"fail"`` raises ``BadInputError`` naming
            it (the parts already written are kept and a re-run resumes after them); ``"skip"`` leaves it out,
            counts it and lists it in ``_embedding_info.json`` under ``"skipped"``. Stray files and incomplete sites
            of an image folder are always listed and skipped. A run that skips every field raises.
        num_workers: DataLoader worker processes per process (``None``: on a GPU :func:`default_num_workers`, on a
            CPU 0, since the model's threads already use every core; 0: read in the main process).
        part: ``"I/N"``: embed only the I-th of N disjoint shares of the parts (1-based), for machines that share a
            folder but no process group.
        min_field_size: smallest field height and width accepted from an image folder (default: ``cellmae
            shard``'s).
        storage_options: fsspec options (dict or JSON) when ``data`` is a shard folder in object storage
            (``s3://bucket/shards``, ``gs://``, ``hf://``...), e.g. ``{"anon": true}``.
        no_progress: no progress bar.
        settings: options by keyword, replacing those of ``options``: a field's name, or ``progress``.

    Returns:
        The ``_embedding_info.json`` dict: ``{"source", "options", "plan_hash", "parts": {name: rows},
        "num_rows", "feature_columns", "skipped": {part: [{"reason", "file", "field", "stage"}]}, "num_skipped",
        "complete"}``; with ``part``, before the last share is done, ``complete`` is false and the counts cover only
        the parts written so far.
    """
    from ..data.problems import BadInputError, ProblemLog

    options = embed_options(options, **settings)
    out = Path(out)
    problems = ProblemLog(options.on_error)
    part_index, part_count = parse_part(options.part)
    state = process_state()
    units, metadata_keys, source = plan_units(data, options)
    described = {**featurizer.describe(), "fields_per_part": options.fields_per_part}
    plan_hash = _plan_hash(units, source, described)
    info_path = out / INFO_NAME
    info = {"source": source, "options": described, "plan_hash": plan_hash, "parts": {}}
    if info_path.is_file():  # every process checks, so every process refuses alike
        info = json.loads(info_path.read_text())
        if info.get("plan_hash") != plan_hash:
            raise ValueError(
                f"{out} holds embeddings of another input or other options ({info.get('options')}); "
                "write into a new folder, or delete it to start over"
            )
    ensure_writable_folder(out, "embeddings")  # before any field is embedded
    if not info_path.is_file() and state.is_main_process:
        _write_json(info_path, {**info, "complete": False})
    # The share of this process: part k of the plan goes to slot k mod (N x world size).
    slots = part_count * state.num_processes
    slot = (part_index - 1) * state.num_processes + state.process_index
    mine = [unit for k, unit in enumerate(units) if k % slots == slot]
    done = {unit.name for unit in mine if _part_is_current(out, unit)}
    todo = [unit for unit in mine if unit.name not in done]
    changed = [unit.name for unit in todo if (out / f"{unit.name}.parquet").is_file()]
    if changed:
        print(
            f"embed: {len(changed)} part(s) whose input changed since they were written are embedded again: "
            f"{', '.join(changed[:10])}{' ...' if len(changed) > 10 else ''}"
        )
    share = "" if slots == 1 else f" (share {slot + 1} of {slots}: {len(mine)} of {len(units)} parts)"
    if done:
        print(f"embed: resuming{share}, {len(done)} of {len(mine)} parts already written in {out}")
    elif share:
        print(f"embed: process {state.process_index} of {state.num_processes}{share}")
    tasks = [task for unit in todo for task in unit.tasks]
    for index, task in enumerate(tasks):
        task.index, task.last = index, False
    for unit in todo:
        unit.tasks[-1].last = True
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))  # this machine's, as torchrun sets
    device = getattr(featurizer, "device", None)
    workers = options.num_workers
    if workers is None:  # on a CPU the model's threads use every core: reading beside them measured slower
        workers = 0 if getattr(device, "type", "cpu") == "cpu" else default_num_workers(local_processes)
    if workers < 0:
        raise ValueError(f"num_workers={workers} must be >= 0 (0: read in the main process)")
    preparer = getattr(featurizer, "preparer", None)
    per_cell = getattr(featurizer, "per_cell", False)
    pin = preparer is not None and getattr(device, "type", "cpu") == "cuda"
    bar = tqdm(
        total=sum(u.num_fields for u in todo),
        desc="embed",
        unit="field",
        disable=options.no_progress or not state.is_local_main_process,
    )
    started = time.perf_counter()
    with _cpu_threads_beside(workers if getattr(device, "type", "cpu") == "cpu" else 0, local_processes):
        _embed_tasks(
            tasks,
            preparer,
            workers,
            pin,
            featurizer,
            problems,
            metadata_keys,
            out,
            bar,
            written=len(done),
            fingerprints={unit.name: unit.fingerprint for unit in todo},
            per_cell=per_cell,
        )
    bar.close()
    if todo:
        seconds, count = time.perf_counter() - started, sum(u.num_fields for u in todo)
        where = f" on process {state.process_index} of {state.num_processes}" if state.num_processes > 1 else ""
        print(
            f"embed: {count} fields in {seconds:.2f} s ({count / seconds:.1f} fields/s{where}, "
            f"{workers} reading worker(s))"
        )
        if per_cell:
            nuclei = (
                f" (the segmentation found {featurizer.num_nuclei} nuclei)" if featurizer.options.masks is None else ""
            )
            print(f"embed: {featurizer.num_cells} cells from {count} fields{nuclei}")
    state.wait_for_everyone()  # every process's parts are written
    missing = [unit.name for unit in units if not (out / f"{unit.name}.parquet").is_file()]
    if missing:  # a `part` run whose other shares are still running (or not started)
        print(
            f"embed: share {part_index}/{part_count} done; {len(missing)} of {len(units)} parts are still to be written "
            f"by the other shares (e.g. {missing[0]}); the last share to finish writes {info_path}"
        )
        return {**info, "complete": False, "num_rows": None, "missing_parts": missing}
    info = _assemble_info(out, units, {key: value for key, value in info.items() if key != "complete"})
    if state.is_main_process or slots > state.num_processes:  # with --part, whichever share ends last writes it
        _write_json(info_path, info)
    state.wait_for_everyone()
    if info["num_skipped"]:
        listed = [skip for skips in info["skipped"].values() for skip in skips]
        if state.is_main_process:
            why = "could not be read or held no cell" if per_cell else "could not be read"
            print(f"embed: skipped {info['num_skipped']} field(s) that {why} (listed in {info_path} under 'skipped'):")
            for skip in listed[:20]:
                print(f"  - {skip['reason']} (field {skip['field']})")
        if info["num_rows"] == 0:
            raise BadInputError(
                f"every one of the {info['num_skipped']} fields of {data} was skipped, so {out} holds "
                f"no embedding; the first reason: {listed[0]['reason']}",
                file=listed[0]["file"],
            )
    return info


def _embed_tasks(
    tasks, preparer, workers, pin, featurizer, problems, metadata_keys, out, bar, written, fingerprints, per_cell=False
):
    """The main process's loop: each task's item in order -> the policy on its problems, the model on its fields, and a
    part written after the last task of each unit (``written``: the parts there before, named in a failure)."""
    from ..data.problems import BadInputError

    frames, skips = [], []
    for item in _task_items(tasks, preparer, workers, pin):
        for problem in item["problems"]:
            where = {"file": problem.file, "field": problem.field}
            if problem.fatal:
                raise BadInputError(
                    f"{problem.reason}; the {written} part(s) already written in {out} are kept "
                    "and a re-run resumes after them",
                    file=problem.file,
                )
            try:
                problems.report(problem.reason, stage="embed", **where)
            except BadInputError as error:
                raise BadInputError(
                    f"{error}; the {written} part(s) already written in {out} are kept and a re-run "
                    "resumes after them",
                    file=problem.file,
                ) from None
            skips.append({"reason": problem.reason, **where, "stage": "embed"})
            bar.update(1)
        for fields, prepared in item["groups"]:
            names = featurizer.feature_names(fields[0].channels)
            if per_cell:  # one row per cell; a field without a cell is counted and listed
                features, cells = featurizer.embed_prepared(fields, prepared)
                frames.append(_cell_frame(fields, cells, features, metadata_keys, names))
                with_cells = {cell["field_index"] for cell in cells}
                skips += [
                    {
                        "reason": f"no cell found in field {f.identity['field_id']}",
                        "file": f.file,
                        "field": f.identity["field_id"],
                        "stage": "cells",
                    }
                    for k, f in enumerate(fields)
                    if k not in with_cells
                ]
            else:
                features, counts = (
                    featurizer(fields) if preparer is None else featurizer.embed_prepared(fields, prepared)
                )
                frames.append(_frame(fields, features, counts, metadata_keys, names))
            bar.update(len(fields))
        if item["last"]:
            _write_part(
                out,
                item["unit"],
                pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
                skips,
                fingerprints.get(item["unit"]),
            )
            frames, skips, written = [], [], written + 1


@contextlib.contextmanager
def _cpu_threads_beside(workers: int, processes: int):
    """On a CPU with ``workers`` reading processes, the model's torch threads take the cores left to this process
    (at least one), so readers and model do not oversubscribe the cores; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if workers:
        cores = _cores() // max(processes, 1)
        torch.set_num_threads(max(1, min(before, cores - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _batches_by_channels(fields: Iterator[Field], size: int) -> Iterator[list[Field]]:
    """Consecutive fields in lists of at most ``size`` sharing one channel list."""
    batch: list[Field] = []
    for item in fields:
        if batch and (len(batch) == size or item.channels != batch[0].channels):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)
