"""CellProfiler features: the classical pipeline as a featuriser, and how well embeddings predict it.

Two uses, as in Kraus et al. (2024):

* **A baseline featuriser** (``CellProfilerFeaturizer``, ``cellmae embed cellprofiler ...``):
  segment each field classically, as CellProfiler's IdentifyPrimaryObjects / IdentifySecondaryObjects
  do (smoothing, Otsu threshold, distance-transform watershed for nuclei; watershed of the
  cytoplasm stains' gradient seeded by the nuclei for cells; no model download), measure every
  object with the ``cp-measure`` package (CellProfiler's own measurement code: intensity, texture,
  granularity, radial distribution, area/shape, correlation), and take the median over objects per
  field (pycytominer's default aggregation), named ``Nuclei_<feature>`` / ``Cells_<feature>``.
* **CellProfiler-feature prediction** (``cellprofiler_prediction``): cross-validated R² of a ridge
  regression from an embedding table to each CellProfiler feature of the same fields (folds never
  share a well), summarised per CellProfiler category. A representation that knows cell morphology
  predicts these well.

Position features (object centres, bounding boxes, orientation, raw spatial moments) describe where
a cell lies in the field, not what it looks like, and are left out. A field without a segmented
nucleus gets all-zero features and an object count of 0 (``Metadata_num_crops`` in the table; the
count of such fields is in ``empty_fields``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..data.standardize import rescale_factor_for_dtype
from .options import EmbedOptions

CATEGORIES = ("AreaShape", "Intensity", "Texture", "Granularity", "RadialDistribution", "Correlation")
OBJECTS = ("Nuclei", "Cells")
# "fast" drops the slowest measurements (Zernike moments, Feret diameters, Costes/RWC/Manders
# colocalisation): ~8x faster, every category still measured. "intensity_shape" keeps only the two
# cheapest categories, Intensity and AreaShape (Zernike and Feret included: they cost little on small
# objects): measured on 128 px demo fields, 1 process, it costs a third of "fast" (seconds per field:
# segmentation 0.14, intensity 0.31, area/shape 0.11 + Zernike 0.04 + Feret 0.02; left out: texture
# 0.52, granularity 0.33, radial distribution 0.29 + radial Zernikes 0.11, Pearson correlation 0.14).
FEATURE_SETS = {
    "fast": dict(
        zernike=False,
        radial_zernikes=False,
        feret=False,
        correlation_costes=False,
        correlation_rwc=False,
        correlation_manders_fold=False,
    ),
    "full": dict(correlation_costes_params={"scale_max": 65535}),
    "intensity_shape": dict(
        texture=False,
        granularity=False,
        radial_distribution=False,
        radial_zernikes=False,
        correlation_pearson=False,
        correlation_costes=False,
        correlation_rwc=False,
        correlation_manders_fold=False,
    ),
}
_POSITION = re.compile(r"^(Location|Center|BoundingBoxM(in|ax)imum|Orientation|SpatialMoment)")
_NUCLEAR_NAMES = ("DNA", "Hoechst", "DAPI", "nuclei", "Nuclei")


def _category_of_measurement(name: str) -> str:
    """The category of a cp-measure column (``MeanIntensity`` is named ``Intensity_MeanIntensity__ER``)."""
    stem, *channels = name.split("__")
    for prefix in ("Intensity", "Granularity", "RadialDistribution"):
        if stem.startswith(prefix):
            return prefix
    if len(channels) == 2:
        return "Correlation"
    if len(channels) == 1:
        return "Texture"  # Haralick measurements: AngularSecondMoment, Contrast, Entropy, ...
    return "AreaShape"


def _cellprofiler_name(obj: str, name: str) -> str:
    """CellProfiler's column naming: ``Cells_AreaShape_Area``, ``Nuclei_Texture_Contrast_3_00__DNA``."""
    category = _category_of_measurement(name)
    return f"{obj}_{name}" if name.startswith(category) else f"{obj}_{category}_{name}"


def feature_category(name: str) -> str:
    """The CellProfiler category of a feature column: ``Cells_Intensity_MeanIntensity__ER`` -> ``Intensity``."""
    parts = name.split("_")
    if len(parts) < 3 or parts[0] not in OBJECTS or parts[1] not in CATEGORIES:
        raise ValueError(f"{name!r} is not a CellProfiler feature column (<Object>_<Category>_<Measurement>)")
    return parts[1]


def _nucleus_diameter_default(field_size: int) -> int:
    return max(8, field_size // 12)


def segment_field(
    pixels: np.ndarray,
    nuclei_channel: int,
    cell_channels: Sequence[int] | None = None,
    nucleus_diameter: int | None = None,
    smoothing: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Classical nucleus and cell segmentation of one field, as CellProfiler's Identify*Objects.

    Args:
        pixels: ``(C, H, W)`` at the stored dtype (integers are rescaled by their dtype's maximum).
        nuclei_channel: index of the nuclear stain (DNA / Hoechst).
        cell_channels: indices of the stains that fill the cell body (default: every other channel).
        nucleus_diameter: typical nucleus diameter in pixels (default: field width / 12); sets the
            smallest object kept and the distance between seeds of touching nuclei.
        smoothing: Gaussian sigma (pixels) before thresholding.

    Returns:
        ``(nuclei, cells)``: ``(H, W)`` int32 label images; cell ``i`` grows from nucleus ``i``.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, sobel, threshold_otsu
    from skimage.segmentation import relabel_sequential, watershed

    pixels = np.asarray(pixels)
    if pixels.ndim != 3:
        raise ValueError(f"a field must be (C, H, W), got shape {pixels.shape}")
    channels = pixels.shape[0]
    if not 0 <= nuclei_channel < channels:
        raise ValueError(f"nuclei_channel={nuclei_channel} but the field has {channels} channels")
    image = pixels.astype(np.float32) * rescale_factor_for_dtype(pixels.dtype)
    diameter = nucleus_diameter or _nucleus_diameter_default(pixels.shape[-1])
    min_area = np.pi * (diameter / 4) ** 2

    dna = gaussian(image[nuclei_channel], sigma=smoothing)
    nuclei = np.zeros(dna.shape, dtype=np.int32)
    cells = np.zeros(dna.shape, dtype=np.int32)
    if np.ptp(dna) == 0:
        return nuclei, cells
    foreground = dna > threshold_otsu(dna)
    objects, _ = ndi.label(foreground)
    distance = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=max(1, diameter // 3), labels=objects, exclude_border=False)
    markers = np.zeros(dna.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    nuclei = watershed(-distance, markers, mask=foreground)
    areas = np.bincount(nuclei.ravel())
    nuclei[areas[nuclei] < min_area] = 0  # debris
    nuclei = relabel_sequential(nuclei)[0].astype(np.int32)
    if nuclei.max() == 0:
        return nuclei, cells

    others = [c for c in range(channels) if c != nuclei_channel] if cell_channels is None else list(cell_channels)
    body = image[others] if others else image[[nuclei_channel]]
    body = gaussian(body.sum(0) / len(body), sigma=smoothing)
    cell_mask = (body > threshold_otsu(body) if np.ptp(body) > 0 else np.zeros_like(body, bool)) | (nuclei > 0)
    cells = watershed(sobel(body), markers=nuclei, mask=cell_mask).astype(np.int32)
    return nuclei, cells


def _measure(task) -> tuple[np.ndarray | None, int]:
    """Worker: one field -> (median per object type, concatenated; or None) and its nucleus count."""
    pixels, nuclei_channel, cell_channels, diameter, config, columns = task
    from cp_measure.featurizer import featurize

    nuclei, cells = segment_field(pixels, nuclei_channel, cell_channels, diameter)
    count = int(nuclei.max())
    if count == 0:
        return None, 0
    image = pixels.astype(np.float32)[None] * rescale_factor_for_dtype(pixels.dtype)  # (1, C, H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined ratios of tiny objects -> NaN, handled below
        data, names, rows = featurize(image, np.stack([nuclei, cells])[None], config)
        objects = np.array([row[1] for row in rows])
        keep = [names.index(c) for c in columns]
        per_object = [np.nanmedian(data[objects == name.lower()][:, keep], axis=0) for name in OBJECTS]
    return np.nan_to_num(np.concatenate(per_object), nan=0.0, posinf=0.0, neginf=0.0), count


class CellProfilerFeaturizer:
    """CellProfiler features of each field: classical segmentation + ``cp-measure`` + median per field.

    Args:
        nuclei_channel: name of the nuclear stain (default: the first of DNA/Hoechst/DAPI present).
        cell_channels: names of the stains that fill the cell body (default: all others).
        feature_set: ``"fast"`` (default; no Zernike, Feret, Costes/RWC/Manders), ``"full"``, or
            ``"intensity_shape"`` (only the Intensity and AreaShape categories: a third of ``"fast"``'s cost).
        nucleus_diameter: typical nucleus diameter in pixels (default: field width / 12).
        num_workers: processes measuring fields in parallel (default: 1; 0 = all cores).
    """

    name = "cellprofiler"

    def __init__(
        self,
        nuclei_channel: str | None = None,
        cell_channels: Sequence[str] | None = None,
        feature_set: str = EmbedOptions.feature_set,
        nucleus_diameter: int | None = None,
        num_workers: int = EmbedOptions.measure_workers,
    ):
        try:
            import cp_measure  # noqa: F401
        except ImportError as error:
            raise ImportError("CellProfiler features need the cp-measure package: pip install cp-measure") from error
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature_set={feature_set!r} is not one of {sorted(FEATURE_SETS)}")
        self.nuclei_channel, self.cell_channels = nuclei_channel, list(cell_channels) if cell_channels else None
        self.feature_set, self.nucleus_diameter = feature_set, nucleus_diameter
        self.num_workers = num_workers
        self.empty_fields = 0
        self._columns: dict[tuple, list[str]] = {}
        self._pool = None

    def describe(self) -> dict:
        return {
            "featurizer": self.name,
            "nuclei_channel": self.nuclei_channel,
            "cell_channels": self.cell_channels,
            "feature_set": self.feature_set,
            "nucleus_diameter": self.nucleus_diameter,
        }

    def _channel_indices(self, channels: list[str]) -> tuple[int, list[int] | None]:
        if self.nuclei_channel is not None:
            if self.nuclei_channel not in channels:
                raise ValueError(
                    f"nuclei_channel={self.nuclei_channel!r} is not among the channels {channels}; "
                    "pass the name of the DNA/Hoechst stain"
                )
            nuclear = channels.index(self.nuclei_channel)
        else:
            found = [c for c in channels if c in _NUCLEAR_NAMES]
            if not found:
                raise ValueError(
                    f"no nuclear stain among the channels {channels}; pass nuclei_channel=NAME "
                    "(--nuclei-channel) naming the DNA/Hoechst channel"
                )
            nuclear = channels.index(found[0])
        if self.cell_channels is None:
            return nuclear, None
        missing = [c for c in self.cell_channels if c not in channels]
        if missing:
            raise ValueError(f"cell_channels {missing} are not among the channels {channels}")
        return nuclear, [channels.index(c) for c in self.cell_channels]

    def _config(self, channels: list[str]) -> dict:
        from cp_measure.featurizer import make_featurizer_config

        names = [re.sub(r"\W", "", c) or f"ch{i}" for i, c in enumerate(channels)]
        return make_featurizer_config(names, objects=[o.lower() for o in OBJECTS], **FEATURE_SETS[self.feature_set])

    def _measured_columns(self, channels: list[str]) -> list[str]:
        """cp-measure's column names for these channels (measured once on a two-disc image), position features dropped."""
        key = tuple(channels)
        if key not in self._columns:
            from cp_measure.featurizer import featurize

            size = 48
            yy, xx = np.mgrid[:size, :size]
            radius = np.hypot(yy - size / 2, xx - size / 2)
            masks = np.stack([(radius < 6), (radius < 14)]).astype(np.int32)[None]  # (1, 2, S, S)
            image = np.random.default_rng(0).random((1, len(channels), size, size)).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                _, names, _ = featurize(image, masks, self._config(channels))
            self._columns[key] = [n for n in names if not _POSITION.match(n)]
        return self._columns[key]

    def feature_names(self, channels: list[str]) -> list[str]:
        columns = self._measured_columns(channels)
        return [_cellprofiler_name(o, c) for o in OBJECTS for c in columns]

    def __call__(self, fields) -> tuple[np.ndarray, np.ndarray]:
        channels = fields[0].channels
        nuclear, cell = self._channel_indices(channels)
        columns = self._measured_columns(channels)
        config = self._config(channels)
        tasks = [(f.pixels, nuclear, cell, self.nucleus_diameter, config, columns) for f in fields]
        if self.num_workers == 1 or len(tasks) == 1:
            measured = [_measure(task) for task in tasks]
        else:
            measured = self._map(tasks)
        width = len(OBJECTS) * len(columns)
        features = np.stack([m if m is not None else np.zeros(width) for m, _ in measured]).astype(np.float32)
        counts = np.array([count for _, count in measured], dtype=np.int64)
        self.empty_fields += int((counts == 0).sum())
        return features, counts

    def _map(self, tasks):
        import multiprocessing
        import os

        if self._pool is None:
            workers = self.num_workers or os.cpu_count() or 1
            self._pool = multiprocessing.get_context("spawn").Pool(workers)
        return self._pool.map(_measure, tasks)

    def close(self) -> None:
        """Stop the worker processes (also done when the featuriser is garbage-collected)."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.terminate()


def cellprofiler_prediction(
    embeddings: pd.DataFrame,
    cellprofiler: pd.DataFrame,
    on: str = "Metadata_field_id",
    group_cols: Sequence[str] = ("Metadata_plate", "Metadata_well"),
    folds: int = 5,
    alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1000.0),
    seed: int = 0,
) -> dict:
    """Cross-validated R² of a ridge regression from embeddings to each CellProfiler feature.

    Rows of the two tables are matched on ``on``; features and targets are standardised inside each
    training fold; folds are ``GroupKFold`` over wells (``group_cols``) so no well is on both sides;
    the ridge strength is chosen per feature by leave-one-out inside the training fold (``RidgeCV``).
    R² is computed on the pooled out-of-fold predictions; constant features are skipped.

    Returns:
        ``{"n_fields", "n_features", "folds", "per_category": {category: {"median_r2", "mean_r2",
        "n_features"}}, "median_r2", "per_feature": {feature: r2}}``.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold

    if on not in embeddings.columns or on not in cellprofiler.columns:
        raise ValueError(f"both tables need the column {on!r} to match their fields (cellmae embed writes it)")
    x_cols = [c for c in embeddings.columns if not c.startswith("Metadata_")]
    y_cols = [c for c in cellprofiler.columns if not c.startswith("Metadata_")]
    joined = embeddings[[on, *[c for c in group_cols if c in embeddings.columns], *x_cols]].merge(
        cellprofiler[[on, *y_cols]].rename(columns={c: f"target::{c}" for c in y_cols}), on=on, how="inner"
    )
    if len(joined) < 2 * folds:
        raise ValueError(
            f"only {len(joined)} fields are in both tables (matched on {on}); need at least {2 * folds}. "
            "Embed the same data with both featurisers."
        )
    x = joined[x_cols].to_numpy(np.float64)
    y = joined[[f"target::{c}" for c in y_cols]].to_numpy(np.float64)
    finite = np.isfinite(y).all(0) & (np.nanstd(y, axis=0) > 0)
    y, y_cols = y[:, finite], [c for c, keep in zip(y_cols, finite) if keep]
    x = np.nan_to_num(x)
    present = [c for c in group_cols if c in joined.columns]
    groups = joined[present].astype(str).agg("/".join, axis=1).to_numpy() if present else joined[on].to_numpy()
    n_folds = min(folds, len(np.unique(groups)))
    if n_folds < 2:
        raise ValueError("CellProfiler-feature prediction needs fields from at least two wells")
    predicted = np.zeros_like(y)
    for train, test in GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, groups=groups):
        x_mean, x_std = x[train].mean(0), x[train].std(0) + 1e-8
        y_mean, y_std = y[train].mean(0), y[train].std(0) + 1e-8
        model = RidgeCV(alphas=alphas, alpha_per_target=True).fit(
            (x[train] - x_mean) / x_std, (y[train] - y_mean) / y_std
        )
        predicted[test] = model.predict((x[test] - x_mean) / x_std) * y_std + y_mean
    r2 = 1 - ((y - predicted) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    per_feature = dict(zip(y_cols, r2.tolist()))
    categories = np.array([feature_category(c) if c.split("_")[0] in OBJECTS else "other" for c in y_cols])
    per_category = {
        category: {
            "median_r2": float(np.median(r2[categories == category])),
            "mean_r2": float(np.mean(r2[categories == category])),
            "n_features": int((categories == category).sum()),
        }
        for category in CATEGORIES
        if (categories == category).any()
    }
    return {
        "n_fields": int(len(joined)),
        "n_features": int(len(y_cols)),
        "folds": n_folds,
        "split": "GroupKFold over " + ("/".join(present) if present else on),
        "per_category": per_category,
        "median_r2": float(np.median(r2)),
        "per_feature": per_feature,
    }


def plot_cellprofiler_prediction(results: dict, path) -> None:
    """Bar chart: median cross-validated R² per CellProfiler category, one bar per featuriser.

    Args:
        results: ``{featuriser name: cellprofiler_prediction(...) result}``.
        path: PNG file to write.
    """
    from matplotlib.figure import Figure

    names = list(results)
    categories = [c for c in CATEGORIES if any(c in r["per_category"] for r in results.values())]
    width = 0.8 / max(1, len(names))
    fig = Figure(figsize=(1.3 * len(categories) + 2, 3.6))
    ax = fig.subplots()
    for i, name in enumerate(names):
        values = [results[name]["per_category"].get(c, {}).get("median_r2", np.nan) for c in categories]
        ax.bar(np.arange(len(categories)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(categories)), categories, rotation=20)
    ax.set_ylabel("median cross-validated R²")
    ax.set_title("Predicting CellProfiler features from embeddings (ridge, folds by well)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


__all__ = [
    "CATEGORIES",
    "FEATURE_SETS",
    "CellProfilerFeaturizer",
    "cellprofiler_prediction",
    "feature_category",
    "plot_cellprofiler_prediction",
    "segment_field",
]
