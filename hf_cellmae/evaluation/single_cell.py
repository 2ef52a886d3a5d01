"""Single-cell embeddings (``cellmae embed ... --single-cell``): one row per cell, neighbours masked out.

For pooled screens, co-cultures and mixed populations a field mixes perturbations, so its tiles do too. Here each
cell becomes its own image: a crop of the model's size centred on the cell's centroid, and (``cell_tokens="mask"``,
the default) only the patch tokens that overlap the cell's mask, optionally dilated by ``mask_dilation`` px, go
into the encoder (``CellMAEModel.forward(keep_mask=...)``): the model was trained to read a subset of tokens, so
the neighbours' patches are simply not shown. ``cell_tokens="all"`` keeps the whole crop.

Cells come from the classical segmentation of the CellProfiler baseline (``segment_field``: Otsu threshold +
distance-transform watershed for nuclei, then the cell bodies grown from them) or from the user's label images
(``masks``: one integer label image per field, 0 = background, as CellProfiler, cellpose or StarDist write them;
see :func:`index_label_images` for how they are matched to fields).

Border: the field is padded by half a crop on each side before cropping, by reflection (``border="reflect"``, the
default: the crop's statistics stay those of a field) or with zeros (``border="zero"``); a cell near the border is
still centred. Each crop is then standardised per channel as the model's image processor does for any crop. A cell
larger than the crop is cut at the crop's edge (its ``Metadata_num_tokens`` says how many patches were kept).

Work split: DataLoader workers read each field and segment it (or read its label image) and compute every cell's
centroid, area and token keep-mask (:class:`CellPreparer`); the main process cuts the crops one model batch at a
time (:meth:`SingleCellFeaturizer.embed_prepared`), so memory holds a task's fields plus one batch of crops.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CELL_TOKENS = ("mask", "all")
BORDERS = ("reflect", "zero")
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
CELL_COLUMNS = ("cell_id", "centroid_y", "centroid_x", "area", "num_tokens")


@dataclass
class CellOptions:
    """How cells are found and shown to the model (written into the embedding plan, so a change is a new run)."""

    cell_tokens: str = "mask"
    mask_dilation: int = 0
    border: str = "reflect"
    masks: str | None = None  # a folder of label images; None: classical segmentation
    objects: str = "cells"  # the segmentation's cells (grown from nuclei) or its nuclei
    nuclei_channel: str | None = None
    cell_channels: list[str] | None = None
    nucleus_diameter: int | None = None

    def __post_init__(self):
        if self.cell_tokens not in CELL_TOKENS:
            raise ValueError(f"cell_tokens={self.cell_tokens!r} is not one of {CELL_TOKENS}")
        if self.border not in BORDERS:
            raise ValueError(f"border={self.border!r} is not one of {BORDERS}")
        if self.objects not in ("cells", "nuclei"):
            raise ValueError(f"objects={self.objects!r} is not 'cells' or 'nuclei'")
        if self.mask_dilation < 0:
            raise ValueError(f"mask_dilation={self.mask_dilation} must be >= 0 (pixels)")

    @classmethod
    def from_options(cls, options) -> CellOptions:
        """The cells ``cellmae embed --single-cell`` describes: an ``EmbedOptions``' single-cell and segmentation
        fields (``--cell-border``, ``--cell-objects``, comma-separated ``--cell-channels``...)."""
        return cls(
            cell_tokens=options.cell_tokens,
            mask_dilation=options.mask_dilation,
            border=options.cell_border,
            masks=options.masks,
            objects=options.cell_objects,
            nuclei_channel=options.nuclei_channel,
            cell_channels=options.cell_channels.split(",") if options.cell_channels else None,
            nucleus_diameter=options.nucleus_diameter,
        )


# ---------------------------------------------------------------- label images


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^0-9a-z]+", text.lower()) if t]


def index_label_images(folder: str | Path) -> list[tuple[tuple[str, ...], str]]:
    """Every label image under ``folder`` (``.tif``/``.tiff``/``.png``/``.npy``, recursively) with its path's tokens.

    A label image belongs to the field whose plate, well and site all appear as tokens of its path relative to
    ``folder`` (split on any non-alphanumeric character; the site as ``s1``, ``site1`` or ``1``), e.g.
    ``Plate1/B02_s1_cp_masks.png`` (cellpose), ``Plate1_B02_s1_labels.tif`` or ``plate1_A14_site1_Ch1_masks.tiff``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--masks {folder} is not a folder; pass the folder of label images (one per field)")
    found = [
        (tuple(_tokens(str(p.relative_to(folder).with_suffix("")))), str(p))
        for p in sorted(folder.rglob("*"))
        if p.suffix.lower() in LABEL_SUFFIXES and p.is_file()
    ]
    if not found:
        raise FileNotFoundError(f"--masks {folder} holds no label image ({', '.join(LABEL_SUFFIXES)})")
    return found


def find_label_image(index: list[tuple[tuple[str, ...], str]], identity: dict, folder: str = "") -> str:
    """The one label image of a field (``identity``: plate, well, site); ``ValueError`` naming the field if none or
    several match."""
    plate, well, site = str(identity["plate"]).lower(), str(identity["well"]).lower(), str(identity["site"])
    sites = {f"s{site}", f"site{site}", site}
    plate_tokens = _tokens(plate)
    matches = [
        path
        for tokens, path in index
        if well in tokens and sites & set(tokens) and all(t in tokens for t in plate_tokens)
    ]
    if len(matches) == 1:
        return matches[0]
    where = f"plate {identity['plate']}, well {identity['well']}, site {identity['site']}"
    if not matches:
        raise ValueError(
            f"no label image for {where} in {folder}; name it like "
            f"{identity['plate']}_{identity['well']}_s{identity['site']}_masks.tif"
        )
    raise ValueError(f"{len(matches)} label images match {where} in {folder} ({', '.join(matches[:3])}); keep one")


def read_label_image(path: str, shape: tuple[int, int]) -> np.ndarray:
    """An integer label image ``(H, W)`` (0 = background), checked against the field's ``shape``."""
    from ..data.image_io import read_plane

    labels = np.load(path) if path.endswith(".npy") else read_plane(path)
    labels = np.squeeze(np.asarray(labels))
    if labels.shape != tuple(shape):
        raise ValueError(
            f"label image {path} is {labels.shape[0]}x{labels.shape[1] if labels.ndim > 1 else ''} "
            f"but the field is {shape[0]}x{shape[1]}; it must be the field's own label image"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError(
                f"label image {path} has non-integer values ({labels.dtype}); pass a label image "
                "(0 = background, one integer per cell), not a probability map"
            )
    return labels.astype(np.int64)


# ---------------------------------------------------------------- cells of a field


def crop_at(pixels: np.ndarray, centre_y: float, centre_x: float, size: int, border: str = "reflect") -> np.ndarray:
    """The ``(C, size, size)`` crop of ``pixels`` ``(C, H, W)`` centred on a point, padded at the field's border
    (``"reflect"`` or ``"zero"``)."""
    half = size // 2
    mode = "reflect" if border == "reflect" else "constant"
    padded = np.pad(pixels, ((0, 0), (half, size - half), (half, size - half)), mode=mode)
    top, left = int(round(centre_y)), int(round(centre_x))  # in padded coordinates: centre - half + half
    return padded[:, top : top + size, left : left + size]


def cell_keep_masks(
    labels: np.ndarray, cells: list[dict], size: int, patch_size: int, dilation: int = 0
) -> np.ndarray:
    """``(M, N)`` bool: for each cell, the patches of its crop that overlap its mask (dilated by ``dilation`` px)."""
    from scipy import ndimage as ndi

    grid = size // patch_size
    keep = np.zeros((len(cells), grid * grid), dtype=bool)
    structure = ndi.generate_binary_structure(2, 1)
    for k, cell in enumerate(cells):
        mask = crop_at((labels == cell["cell_id"])[None], cell["centroid_y"], cell["centroid_x"], size, "zero")[0]
        if dilation:
            mask = ndi.binary_dilation(mask, structure, iterations=dilation)
        keep[k] = mask.reshape(grid, patch_size, grid, patch_size).any(axis=(1, 3)).reshape(-1)  # (N,) row-major
    return keep


def cells_of_labels(labels: np.ndarray) -> list[dict]:
    """``[{"cell_id", "centroid_y", "centroid_x", "area"}]`` of every label of a label image, in label order."""
    from scipy import ndimage as ndi

    ids = np.unique(labels)
    ids = ids[ids > 0]
    if not len(ids):
        return []
    areas = ndi.sum_labels(np.ones_like(labels), labels, ids)
    centres = ndi.center_of_mass(np.ones_like(labels), labels, ids)
    return [
        {"cell_id": int(i), "centroid_y": float(cy), "centroid_x": float(cx), "area": int(a)}
        for i, (cy, cx), a in zip(ids, centres, areas)
    ]


def nuclear_channel_index(channels: list[str], nuclei_channel: str | None) -> int:
    """The index of the DNA/Hoechst channel (named, or found by name as the CellProfiler featuriser does)."""
    from .cellprofiler import _NUCLEAR_NAMES

    if nuclei_channel is not None:
        if nuclei_channel not in channels:
            raise ValueError(
                f"nuclei_channel={nuclei_channel!r} is not among the channels {channels}; "
                "pass --nuclei-channel with the name of the DNA/Hoechst stain"
            )
        return channels.index(nuclei_channel)
    found = [c for c in channels if c in _NUCLEAR_NAMES]
    if not found:
        raise ValueError(
            f"no nuclear stain among the channels {channels}; pass --nuclei-channel NAME (the DNA/Hoechst "
            "channel) to segment, or --masks DIR with your own label images"
        )
    return channels.index(found[0])


def segment_cells(pixels: np.ndarray, channels: list[str], options: CellOptions) -> tuple[np.ndarray, int]:
    """The classical segmentation's label image of ``options.objects`` and its number of nuclei."""
    from .cellprofiler import segment_field

    nuclear = nuclear_channel_index(channels, options.nuclei_channel)
    cell = None
    if options.cell_channels:
        missing = [c for c in options.cell_channels if c not in channels]
        if missing:
            raise ValueError(f"cell_channels {missing} are not among the channels {channels}")
        cell = [channels.index(c) for c in options.cell_channels]
    nuclei, cells = segment_field(pixels, nuclear, cell, options.nucleus_diameter)
    return (cells if options.objects == "cells" else nuclei), int(nuclei.max())


class CellPreparer:
    """Fields -> their cells (picklable; runs in ``embed_dataset``'s DataLoader workers).

    Returns ``{"pixels": [(C, H, W)], "cells": [cell dicts with "field_index" and "num_tokens"], "keep_mask":
    (M, N) bool, "num_nuclei": [per field, or None with label images]}``."""

    def __init__(self, options: CellOptions, image_size: int, patch_size: int, label_index=None):
        self.options, self.image_size, self.patch_size, self.label_index = options, image_size, patch_size, label_index

    def __call__(self, fields) -> dict:
        cells, masks, nuclei = [], [], []
        for index, field in enumerate(fields):
            if self.options.masks is not None:
                path = find_label_image(self.label_index, field.identity, self.options.masks)
                labels, num_nuclei = read_label_image(path, field.pixels.shape[-2:]), None
            else:
                labels, num_nuclei = segment_cells(field.pixels, field.channels, self.options)
            found = cells_of_labels(labels)
            keep = cell_keep_masks(labels, found, self.image_size, self.patch_size, self.options.mask_dilation)
            if self.options.cell_tokens == "all":
                keep[:] = True
            for cell, row in zip(found, keep):
                cells.append({**cell, "field_index": index, "num_tokens": int(row.sum())})
            masks.append(keep)
            nuclei.append(num_nuclei)
        grid = (self.image_size // self.patch_size) ** 2
        return {
            "pixels": [f.pixels for f in fields],
            "cells": cells,
            "num_nuclei": nuclei,
            "keep_mask": np.concatenate(masks) if masks else np.zeros((0, grid), dtype=bool),
        }


# ---------------------------------------------------------------- featuriser


class SingleCellFeaturizer:
    """A CA-MAE's embedding of each cell: ``ModelFeaturizer``'s model and read-out on cell-centred crops, fed only
    the cell's patch tokens (``options.cell_tokens="mask"``) or the whole crop (``"all"``).

    ``embed_dataset`` writes one row per cell: the field's ``Metadata_*`` columns, ``Metadata_cell_id`` (the label
    in the segmentation or label image), ``Metadata_centroid_y/x`` (pixels in the field), ``Metadata_area``
    (pixels), ``Metadata_num_tokens`` (patches kept per channel), then the features. A field with no cell is
    counted and listed under ``skipped`` (stage ``cells``).
    """

    name = "single_cell"
    per_cell = True

    def __init__(self, model_featurizer, options: CellOptions | None = None):
        self.model = model_featurizer
        self.options = options or CellOptions()
        if self.model.is_munet:
            raise ValueError("--single-cell needs a CA-MAE (a MU-Net has no patch tokens to keep)")
        if self.model.readout == "mean_std" or self.model.layer is not None:
            raise ValueError(
                "--single-cell reads out the mean, channel-wise mean or class token of the last layer; "
                f"readout={self.model.readout!r}, layer={self.model.layer} are not supported"
            )
        self.image_size = self.model.image_size
        self.patch_size = self.model.config.patch_size
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of the patch size {self.patch_size}")
        index = index_label_images(self.options.masks) if self.options.masks is not None else None
        self.preparer = CellPreparer(self.options, self.image_size, self.patch_size, index)
        self.device = self.model.device
        self.num_nuclei = 0  # of the classical segmentation, over the fields embedded by this process
        self.num_cells = 0

    def describe(self) -> dict:
        return {
            **self.model.describe(),
            "featurizer": f"{self.name}:{self.model.name}",
            "readout": self.model.readout,
            "single_cell": asdict(self.options),
        }

    def feature_names(self, channels: list[str]) -> list[str]:
        return self.model.feature_names(channels)

    def __call__(self, fields):
        return self.embed_prepared(fields, self.preparer(fields))

    def embed_prepared(self, fields, prepared: dict) -> tuple[np.ndarray, list[dict]]:
        """``(features (M, F), cells)`` of the cells ``prepared`` lists, crops cut and embedded one batch at a time."""
        import torch

        channels = fields[0].channels
        channel_ids = self.model._channel_ids(channels)
        cells, pixels = prepared["cells"], prepared["pixels"]
        keep = torch.from_numpy(prepared["keep_mask"])  # (M, N)
        self.num_cells += len(cells)
        self.num_nuclei += sum(n for n in prepared["num_nuclei"] if n is not None)
        width = len(self.feature_names(channels))
        if not cells:
            return np.zeros((0, width), dtype=np.float32), []
        size, batch = self.image_size, self.model.batch_size
        processor = self.model.processor
        autocast = torch.autocast(
            self.device.type, dtype=self.model.torch_dtype, enabled=self.model.torch_dtype != torch.float32
        )
        outputs = []
        with torch.inference_mode(), autocast:
            for start in range(0, len(cells), batch):
                chunk = cells[start : start + batch]
                crops = [
                    crop_at(pixels[c["field_index"]], c["centroid_y"], c["centroid_x"], size, self.options.border)
                    for c in chunk
                ]
                pixel_values = processor(crops, image_size=size, crop_mode="none", return_tensors="pt")["pixel_values"]
                mask = None if self.options.cell_tokens == "all" else keep[start : start + batch].to(self.device)
                out = self.model.forward(
                    pixel_values.to(self.device),
                    channel_ids=channel_ids,
                    keep_mask=mask,
                    output_channelwise_embeddings=self.model.readout == "channelwise",
                )
                if self.model.readout == "cls":
                    vectors = out.last_hidden_state[:, 0]
                elif self.model.readout == "channelwise":
                    vectors = out.channelwise_embeddings.flatten(1)  # (b, C*D)
                else:
                    vectors = out.pooler_output  # (b, D)
                outputs.append(vectors.float().cpu())
        return torch.cat(outputs).numpy(), cells


# ---------------------------------------------------------------- figure


def plot_cell_crops(
    pixels: np.ndarray,
    labels: np.ndarray,
    cells: list[dict],
    image_size: int,
    patch_size: int,
    path: str | Path,
    channels: tuple[int, int, int] = (1, 4, 0),
    dilation: int = 0,
    border: str = "reflect",
    title: str = "",
) -> Path:
    """A row of cell crops (an RGB composite of three ``channels``, each scaled to its 1st-99.5th percentile) with
    the cell's mask contour and its kept patch tokens outlined, as ``cell_tokens="mask"`` feeds them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    keep = cell_keep_masks(labels, cells, image_size, patch_size, dilation)
    grid = image_size // patch_size
    figure, axes = plt.subplots(1, len(cells), figsize=(2.4 * len(cells), 2.7), squeeze=False)
    for axis, cell, kept in zip(axes[0], cells, keep):
        crop = crop_at(pixels, cell["centroid_y"], cell["centroid_x"], image_size, border).astype(np.float32)
        rgb = np.stack([crop[c] for c in channels], axis=-1)
        low, high = np.percentile(rgb, 1, axis=(0, 1)), np.percentile(rgb, 99.5, axis=(0, 1))
        axis.imshow(np.clip((rgb - low) / np.maximum(high - low, 1e-6), 0, 1))
        mask = crop_at((labels == cell["cell_id"])[None], cell["centroid_y"], cell["centroid_x"], image_size, "zero")[
            0
        ]
        axis.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        for index in np.flatnonzero(kept):
            row, col = divmod(int(index), grid)
            axis.add_patch(
                Rectangle(
                    (col * patch_size - 0.5, row * patch_size - 0.5),
                    patch_size,
                    patch_size,
                    fill=False,
                    edgecolor="yellow",
                    linewidth=1.0,
                )
            )
        axis.set_title(f"cell {cell['cell_id']}: {int(kept.sum())}/{grid * grid} tokens", fontsize=8)
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
