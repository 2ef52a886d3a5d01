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

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import ensure_writable_folder

from .options import EmbedOptions
from .pixel_stats import DEFAULT_PERCENTILES, pixel_statistic_names, pixel_statistics

INFO_NAME = "_embedding_info.json"
READOUTS = ("mean", "cls", "mean_std", "channelwise")
# The read-out the demo and docs/evidence.md (section 3) evaluate: one mean token per stain beat the pooled mean.
DEFAULT_READOUT = "channelwise"
MANIFEST_NAME = "manifest.json"
IDENTITY_COLUMNS = ("field_id", "experiment", "plate", "well", "site")


@dataclass
class Field:
    """One field of view to embed: pixels (C, H, W) at the stored dtype, channel names, identity."""

    pixels: np.ndarray
    channels: list[str]
    identity: dict
    metadata: dict = field(default_factory=dict)


@dataclass
class Unit:
    """A resumable piece of work: an input shard, or a slice of a layout's fields."""

    name: str
    num_fields: int
    read: callable  # () -> Iterator[Field]
    field_ids: list[str] | None = None


# ---------------------------------------------------------------- inputs


def _shard_units(shard_dir: Path, problems) -> tuple[list[Unit], list[str], dict]:
    """One unit per shard; every field's pixels are checked against their CRC-32 as they are read."""
    import pyarrow.parquet as pq

    from ..data.problems import BadInputError
    from ..data.shards import check_field_crc, corrupt_shard_error, decode_pixels, load_manifest

    manifest = load_manifest(str(shard_dir))

    def reader(path: Path):
        def read() -> Iterator[Field]:
            try:
                parquet = pq.ParquetFile(path)
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as error:
                raise corrupt_shard_error(path, error) from error
            for group in range(parquet.num_row_groups):  # one row group in memory at a time
                try:
                    table = parquet.read_row_group(group)
                except (OSError, ValueError) as error:  # pyarrow: "Invalid page header"...
                    raise corrupt_shard_error(path, error) from error
                for row in range(table.num_rows):  # one field's Python objects at a time
                    values = {name: table.column(name)[row].as_py() for name in table.column_names if name != "files"}
                    try:
                        check_field_crc(values["pixels"], values["crc32"], path, values["field_id"])
                    except BadInputError as error:
                        problems.report(str(error), file=str(path), field=values["field_id"], stage="embed")
                        continue
                    yield Field(
                        pixels=decode_pixels(values["pixels"], values["dtype"], values["shape"]),
                        channels=list(values["channels"]),
                        identity={key: values[key] for key in IDENTITY_COLUMNS},
                        metadata=json.loads(values["metadata"] or "{}"),
                    )
                del table

        return read

    units = [
        Unit(Path(entry["file"]).stem, int(entry["num_fields"]), reader(shard_dir / entry["file"]))
        for entry in manifest["shards"]
    ]
    source = {"kind": "shards", "path": str(shard_dir), "num_fields": manifest["num_fields"],
              "shards": [[entry["file"], entry.get("sha256")] for entry in manifest["shards"]]}
    return units, list(manifest.get("metadata_columns", [])), source


def _layout_units(source: Path, layout: str, pattern: str | None, metadata: str | Path | None,
                  fields_per_part: int, problems) -> tuple[list[Unit], list[str], dict]:
    """Units of ``fields_per_part`` discovered fields; an unreadable field follows the ``problems`` policy."""
    from ..data.channels import name_channels
    from ..data.image_io import read_field
    from ..data.layouts import discover_fields
    from ..data.metadata import join_metadata, read_metadata_table
    from ..data.problems import BadInputError, ProblemLog

    found = ProblemLog()  # stray files and incomplete sites lose no readable field: always listed, never fatal
    records = discover_fields(source, layout=layout, pattern=pattern, problems=found)
    table = read_metadata_table(metadata) if metadata is not None else None
    # The same stain names `cellmae shard` would record: a per-file table (or load_data columns) names the channels.
    read_layout = "load_data" if layout == "load_data" or (layout == "auto" and source.suffix.lower() == ".csv") else layout
    name_channels(records, table=table, source=str(metadata) if metadata else "metadata", root=source, layout=read_layout)
    if table is not None:
        join_metadata(records, table, found, source=str(metadata))
    if len(found):
        print(f"embed: {len(found)} input problems skipped while reading {source}:")
        for problem in found.as_dicts()[:20]:
            print(f"  {problem}")
    if not records:
        raise ValueError(f"no field of view found in {source} (layout={layout!r}); check --layout/--pattern")

    def reader(chunk):
        def read() -> Iterator[Field]:
            for record in chunk:
                try:
                    pixels = read_field(record)  # (C, H, W)
                except BadInputError as error:
                    problems.report(str(error), file=error.file or record.files[0], field=record.field_id, stage="embed")
                    continue
                yield Field(
                    pixels=pixels,
                    channels=list(record.channels),
                    identity={"field_id": record.field_id, "experiment": record.experiment, "plate": record.plate,
                              "well": record.well, "site": record.site},
                    metadata={**record.tags, **record.metadata},
                )

        return read

    units = []
    for k, start in enumerate(range(0, len(records), fields_per_part)):
        chunk = records[start : start + fields_per_part]
        units.append(Unit(f"part-{k:05d}", len(chunk), reader(chunk), [r.field_id for r in chunk]))
    keys = sorted({key for record in records for key in (*record.tags, *record.metadata)})
    info = {"kind": "layout", "path": str(source), "layout": layout, "pattern": pattern,
            "metadata": str(metadata) if metadata else None, "num_fields": len(records)}
    return units, keys, info


def plan_units(data: str | Path, layout: str = "auto", pattern: str | None = None,
               metadata: str | Path | None = None, fields_per_part: int = 512,
               problems=None) -> tuple[list[Unit], list[str], dict]:
    """The resumable units of an input: ``(units, metadata_keys, source_description)``.

    ``problems`` (a :class:`~hf_cellmae.data.problems.ProblemLog`, default ``fail``) decides what a field that
    cannot be read does when a unit is read: a corrupt shard field (CRC-32) or an unreadable image raises
    ``BadInputError`` naming it, or is skipped and recorded in the log.
    """
    from ..data.problems import ProblemLog

    problems = problems if problems is not None else ProblemLog("fail")
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"DATA {data} does not exist; pass a shard folder (cellmae shard) or an image folder")
    if (data / MANIFEST_NAME).is_file():
        if metadata is not None:
            raise ValueError(f"{data} is a shard folder: its metadata was joined when sharding; drop --metadata")
        return _shard_units(data, problems)
    return _layout_units(data, layout, pattern, metadata, fields_per_part, problems)


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
        device: torch device ("cpu", "cuda", "cuda:1", ...).
        dtype: "float32", "bfloat16" or "float16" (autocast on the device).
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
        by_position: feed plate channel i as model channel i when the plate's channels are unnamed file tokens
            (``w1``...) and the model's are stains; without it such a plate is refused.
    """

    name = "model"

    def __init__(self, model: str | Path, device: str = EmbedOptions.device, dtype: str = EmbedOptions.dtype,
                 batch_size: int = EmbedOptions.batch_size, crop_mode: str = EmbedOptions.crop_mode,
                 channelwise: bool = EmbedOptions.channelwise, image_size: int | None = None,
                 readout: str | None = EmbedOptions.readout, layer: int | None = None, by_position: bool = EmbedOptions.by_position):
        import torch

        from .. import CellMAEImageProcessor

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(dtypes)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path = str(model)
        self.model = load_encoder(model).to(device).eval()
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
            raise ValueError(f"layer={layer} is outside the encoder's blocks 1..{depth} (or -1..-{depth}); "
                             "omit it for the encoder's output")
        self.batch_size, self.crop_mode = batch_size, crop_mode
        self.readout, self.layer = readout, (None if layer is None else layer % (depth + 1) or depth)
        self.channelwise = readout == "channelwise"
        self._channel_id_cache: dict[tuple, object] = {}
        self._warned_positional = False
        self.by_position = by_position

    def describe(self) -> dict:
        info = {"featurizer": self.name, "model": self.model_path, "dtype": self.dtype, "crop_mode": self.crop_mode,
                "image_size": self.image_size, "channelwise": self.channelwise, "hidden_size": self.config.hidden_size}
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
        """The model's channel id of each of the plate's channels, matched by stain name (``(C,)``, or ``None``).

        A plate may hold the model's stains in another order, or a subset of them: each is fed with the id the
        model learnt for that stain. A stain the model does not know is refused (``UserError`` naming it and the
        model's names). Unnamed plate channels (file tokens such as ``w1``) for a model with stain names are refused
        too, unless ``by_position``; then, or for a model without ``channel_names``, channels are fed by position
        (``None`` = ids ``0..C-1``), with a one-time warning.
        """
        import torch

        from ..data.channels import is_channel_token
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
        ids = []
        for channel in channels:
            exact = [i for i, name in enumerate(model_names) if name == channel]
            folded = [i for i, name in enumerate(model_names) if name.lower() == str(channel).lower()]
            if not (exact or folded):
                raise UserError(
                    f"the plate's channel {channel!r} is not one of the model's channels ({', '.join(model_names)}); "
                    f"if it is one of those stains under another name, rename it when sharding "
                    f"(cellmae shard ... --channels TOKEN=NAME, e.g. w1={model_names[0]}), otherwise use a model trained on {channel}"
                )
            ids.append((exact or folded)[0])
        self._channel_id_cache[key] = torch.tensor(ids, device=self.device)  # (C,)
        return self._channel_id_cache[key]

    def _warn_positional(self, channels: list[str], model_names: list[str]) -> None:
        """Warn once per featuriser that channels are matched by position because names are missing."""
        import warnings

        if self._warned_positional:
            return
        self._warned_positional = True
        model = f"the model's are {', '.join(model_names)}" if model_names else "the model's config has no channel_names"
        warnings.warn(
            f"channels are matched by position, not by stain: the plate's channels are {', '.join(channels)} and "
            f"{model}; plate channel i is fed as model channel i. Name the plate's stains when sharding "
            "(cellmae shard ... --channels w1=NAME,... or a per-file metadata table) so they are matched by name",
            UserWarning, stacklevel=3,
        )

    def __call__(self, fields: list[Field]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        channels = fields[0].channels
        if any(f.channels != channels for f in fields):
            raise ValueError("a batch of fields must share one channel list; group fields by channel set first")
        batch = self.processor([f.pixels for f in fields], image_size=self.image_size, crop_mode=self.crop_mode,
                               return_tensors="pt")
        crops, index = batch["pixel_values"], batch["image_index"]  # (N, C, S, S), (N,)
        channel_ids = self._channel_ids(channels)
        outputs = []
        autocast = torch.autocast(self.device.type, dtype=self.torch_dtype, enabled=self.torch_dtype != torch.float32)
        with torch.inference_mode(), autocast:
            for start in range(0, len(crops), self.batch_size):
                pixel_values = crops[start : start + self.batch_size].to(self.device)
                out = self.model(pixel_values, channel_ids=channel_ids, output_hidden_states=self.layer is not None)
                vectors = self._read_out(out, len(channels))  # (b, F)
                outputs.append(vectors.float().cpu())
        crop_vectors = torch.cat(outputs)  # (N, F)
        sums = torch.zeros(len(fields), crop_vectors.shape[1]).index_add_(0, index, crop_vectors)
        counts = torch.bincount(index, minlength=len(fields))
        return (sums / counts[:, None]).numpy(), counts.numpy()


def load_encoder(model: str | Path):
    """The encoder of a model folder or Hub id: ``CellMAEModel``, or ``CellMUNetModel`` for a MU-Net. The folder may
    hold a pre-training model (decoder dropped), an encoder, or an image classifier (``cellmae pretrain --objective
    wsl|classify``: head dropped, so a weakly supervised model is read out like an MAE, by its pooled tokens)."""
    from transformers import AutoConfig

    from .. import CellMAEModel, CellMUNetModel

    config = AutoConfig.from_pretrained(model)
    encoder_class = CellMUNetModel if config.model_type == "cellmunet" else CellMAEModel
    return encoder_class.from_pretrained(model)


# ---------------------------------------------------------------- writer


def _plan_hash(units: list[Unit], source: dict, options: dict) -> str:
    plan = {"source": source, "options": options,
            "units": [[u.name, u.num_fields, u.field_ids] for u in units]}
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def _metadata_column(key: str) -> str:
    return key if key.startswith("Metadata_") else f"Metadata_{key}"


def _frame(fields: list[Field], features: np.ndarray, counts: np.ndarray, metadata_keys: list[str],
           feature_names: list[str]) -> pd.DataFrame:
    columns: dict[str, list] = {f"Metadata_{key}": [f.identity[key] for f in fields] for key in IDENTITY_COLUMNS}
    columns["Metadata_num_crops"] = counts.tolist()
    for key in metadata_keys:
        column = _metadata_column(key)
        if column not in columns:
            columns[column] = [f.metadata.get(key) for f in fields]
    if features.shape[1] != len(feature_names):
        raise ValueError(f"featuriser returned {features.shape[1]} features, expected {len(feature_names)}")
    frame = pd.DataFrame(columns)
    return pd.concat([frame, pd.DataFrame(features.astype(np.float32), columns=feature_names)], axis=1)


def embed_dataset(
    data: str | Path,
    out: str | Path,
    featurizer,
    layout: str = EmbedOptions.layout,
    pattern: str | None = None,
    metadata: str | Path | None = None,
    fields_per_batch: int = EmbedOptions.fields_per_batch,
    fields_per_part: int = EmbedOptions.fields_per_part,
    progress: bool = True,
    on_error: str = EmbedOptions.on_error,
) -> dict:
    """Embed every field of ``data`` into Parquet parts under ``out``; resume a finished-part-wise run.

    Args:
        data: shard folder or image folder / load_data CSV.
        out: output folder (created).
        featurizer: ``ModelFeaturizer(...)`` or ``PixelStatsFeaturizer()`` (anything with
            ``describe()``, ``feature_names(channels)`` and ``__call__(fields) -> (features, crop_counts)``).
        layout, pattern, metadata: how to read an image folder (see ``discover_fields``).
        fields_per_batch: fields read and featurised together (bounds memory with the crop batch).
        fields_per_part: fields per output part for an image folder (a shard folder: one part per shard).
        on_error: a field that cannot be read (an unreadable image, a shard field failing its CRC-32 check):
            ``"fail"`` raises ``BadInputError`` naming it (the parts already written are kept and a re-run resumes
            after them); ``"skip"`` leaves it out, counts it and lists it in ``_embedding_info.json`` under
            ``"skipped"``. Stray files and incomplete sites of an image folder are always listed and skipped.

    Returns:
        The ``_embedding_info.json`` dict: ``{"source", "options", "plan_hash", "parts": {name: rows},
        "num_rows", "feature_columns", "skipped": {part: [{"reason", "file", "field", "stage"}]}, "num_skipped"}``.
    """
    from ..data.problems import BadInputError, ProblemLog

    out = Path(out)
    problems = ProblemLog(on_error)
    units, metadata_keys, source = plan_units(data, layout, pattern, metadata, fields_per_part, problems)
    options = {**featurizer.describe(), "fields_per_part": fields_per_part}
    plan_hash = _plan_hash(units, source, options)
    info_path = out / INFO_NAME
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("plan_hash") != plan_hash:
            raise ValueError(
                f"{out} holds embeddings of another input or other options ({info.get('options')}); "
                "write into a new folder, or delete it to start over"
            )
    else:
        info = {"source": source, "options": options, "plan_hash": plan_hash, "parts": {}}
    ensure_writable_folder(out, "embeddings")  # before any field is embedded
    done = {name for name in info["parts"] if (out / f"{name}.parquet").is_file()}
    todo = [unit for unit in units if unit.name not in done]
    if done:
        print(f"embed: resuming, {len(done)} of {len(units)} parts already written in {out}")
    bar = tqdm(total=sum(u.num_fields for u in todo), desc="embed", unit="field", disable=not progress)
    info.setdefault("skipped", {})
    for unit in todo:
        frames = []
        skipped_before = len(problems)
        try:
            for fields in _batches_by_channels(unit.read(), fields_per_batch):
                features, counts = featurizer(fields)
                names = featurizer.feature_names(fields[0].channels)
                frames.append(_frame(fields, features, counts, metadata_keys, names))
                bar.update(len(fields))
        except BadInputError as error:
            kept = len([name for name in info["parts"] if (out / f"{name}.parquet").is_file()])
            raise BadInputError(f"{error}; the {kept} part(s) already written in {out} are kept and a re-run resumes after them",
                                file=error.file) from None
        skips = problems.as_dicts()[skipped_before:]
        bar.update(len(skips))
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        temporary = out / f".{unit.name}.parquet.tmp"
        table.to_parquet(temporary, index=False)
        os.replace(temporary, out / f"{unit.name}.parquet")  # a part exists only once complete
        info["parts"][unit.name] = len(table)
        info["skipped"][unit.name] = skips
        info["num_rows"] = sum(info["parts"].values())
        if frames:
            info["feature_columns"] = [c for c in table.columns if not c.startswith("Metadata_")][:3] + ["..."]
        _write_json(info_path, info)
    bar.close()
    info["num_rows"] = sum(info["parts"].values())
    info["num_skipped"] = sum(len(skips) for skips in info["skipped"].values())
    _write_json(info_path, info)
    if info["num_skipped"]:
        listed = [skip for skips in info["skipped"].values() for skip in skips]
        print(f"embed: skipped {info['num_skipped']} field(s) that could not be read (listed in {info_path} under 'skipped'):")
        for skip in listed[:20]:
            print(f"  - {skip['reason']} (field {skip['field']})")
    return info


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
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(temporary, path)
