"""Raw pixel statistics per channel: the simplest image featuriser, a baseline for learned embeddings."""

from __future__ import annotations

import numpy as np

from ..data.standardize import rescale_factor_for_dtype

DEFAULT_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def pixel_statistic_names(channels: list[str], percentiles=DEFAULT_PERCENTILES) -> list[str]:
    """Feature names in the order of ``pixel_statistics``: ``{channel}_mean``, ``_std``, ``_p{q}``."""
    stats = ["mean", "std", *[f"p{q:g}" for q in percentiles]]
    return [f"{channel}_{stat}" for channel in channels for stat in stats]


def pixel_statistics(field: np.ndarray, percentiles=DEFAULT_PERCENTILES) -> np.ndarray:
    """Per-channel mean, standard deviation and percentiles of a field's pixels rescaled to [0, 1].

    Args:
        field: (C, H, W) pixels at their stored dtype (uint8/uint16 are divided by the dtype max;
            floats are taken as already in [0, 1]).
        percentiles: percentiles (0-100) to report.

    Returns:
        (C * (2 + len(percentiles)),) float32, channel-major (see ``pixel_statistic_names``).
    """
    field = np.asarray(field)
    if field.ndim != 3:
        raise ValueError(f"a field must be (C, H, W), got shape {field.shape}")
    pixels = field.reshape(field.shape[0], -1).astype(np.float64) * rescale_factor_for_dtype(field.dtype)  # (C, H*W)
    stats = [pixels.mean(axis=1, keepdims=True), pixels.std(axis=1, keepdims=True)]
    stats.append(np.percentile(pixels, percentiles, axis=1).T)  # (C, len(percentiles))
    return np.concatenate(stats, axis=1).reshape(-1).astype(np.float32)
