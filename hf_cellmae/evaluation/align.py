"""Control-based batch correction of embeddings, and aggregation to one vector per perturbation.

Every statistic is fitted on **control units only** (e.g. non-targeting wells) and then applied
to all units, so perturbation effects never leak into the correction. Inputs are plain arrays:

- ``features``: (n_units, D) float array, one row per unit (field, well, ...);
- ``is_control``: (n_units,) bool, True for control units;
- ``batch``: optional (n_units,) labels (plate, experiment, ...); None = one pooled batch.

Methods (``align(..., method=...)``):

- ``"center_scale"``: per batch, ``(x - mean_ctrl) / std_ctrl`` (std with ddof=0; a constant
  feature keeps scale 1, as scikit-learn's ``StandardScaler``).
- ``"pca_center_scale"``: PCA fitted on all controls (rotation onto the principal axes, optionally
  truncated), then per-batch center-scale on controls. The alignment used for RxRx3-core and the
  OpenPhenom model card.
- ``"tvn"`` (typical variation normalisation): center-scale on controls, full PCA fitted on the
  controls (rotation only), center-scale on controls again, which whitens the controls (zero mean,
  identity covariance); optionally per-batch CORAL,
  ``Z_b <- Z_b @ (cov(controls_b, ddof=1) + coral_eps * I)^(-1/2)``.
  With ``batch=None`` or ``scale_per_batch=False`` this is efaar_benchmarking 1.0's
  ``tvn_on_controls`` (which uses the batch only for CORAL); with the default
  ``scale_per_batch=True`` the two center-scale steps are done per batch, which also removes
  additive per-plate shifts that CORAL alone (a linear map) cannot remove. With fewer controls
  than dimensions the rotation keeps the principal components the controls span (a warning says
  how many), or ``n_components`` of them.

``aggregate`` then averages (or takes the median of) the aligned units of each perturbation and
drops the control labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

ALIGNMENT_METHODS = ("none", "center_scale", "pca_center_scale", "tvn")
MIN_CONTROLS_PER_BATCH = 2


def _as_inputs(features, is_control, batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D (n_units, D), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        features = features.astype(np.float64)
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise ValueError(f"features contain NaN or inf in {bad} rows; drop or repair those units before aligning")
    is_control = np.asarray(is_control)
    if is_control.shape != (len(features),):
        raise ValueError(f"is_control must have shape ({len(features)},), got {is_control.shape}")
    if is_control.dtype != bool:
        raise ValueError(f"is_control must be a boolean mask, got dtype {is_control.dtype}")
    if batch is None:
        batch = np.zeros(len(features), dtype=np.int64)
    batch = np.asarray(batch)
    if batch.shape != (len(features),):
        raise ValueError(f"batch must have shape ({len(features)},), got {batch.shape}")
    return features, is_control, batch


def _batches(batch: np.ndarray, is_control: np.ndarray) -> list[np.ndarray]:
    """Row masks of each batch, after checking every batch has enough controls."""
    masks = []
    for label in _unique_in_order(batch):
        in_batch = batch == label
        n_controls = int((in_batch & is_control).sum())
        if n_controls < MIN_CONTROLS_PER_BATCH:
            raise ValueError(
                f"batch {label!r} has {n_controls} control units; at least {MIN_CONTROLS_PER_BATCH} are needed "
                "to fit its statistics. Add control wells to that batch, merge it with another batch, "
                "or align without batches (batch=None)"
            )
        masks.append(in_batch)
    return masks


def _unique_in_order(values: np.ndarray) -> list:
    seen: dict = {}
    for value in values.tolist():
        seen.setdefault(value, None)
    return list(seen)


def _fit_scale(controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = controls.mean(axis=0)
    std = controls.std(axis=0)  # ddof=0, as StandardScaler
    std[std < 10 * np.finfo(std.dtype).eps] = 1.0  # a constant feature is centred, not blown up
    return mean, std


def center_scale(features, is_control, batch=None) -> np.ndarray:
    """Center and scale each batch on its controls: ``(x - mean_ctrl_b) / std_ctrl_b``.

    Args:
        features: (n_units, D) embeddings.
        is_control: (n_units,) bool mask of control units.
        batch: optional (n_units,) batch labels; None fits one pooled scaler.

    Returns:
        (n_units, D) float array; the controls of each batch have mean 0 and variance 1 per feature.
    """
    features, is_control, batch = _as_inputs(features, is_control, batch)
    out = np.empty_like(features)
    for in_batch in _batches(batch, is_control):
        mean, std = _fit_scale(features[in_batch & is_control])
        out[in_batch] = (features[in_batch] - mean) / std
    return out


def _fit_pca_rotation(controls: np.ndarray, n_components: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and principal axes (D, K) of the controls, by SVD, largest variance first."""
    mean = controls.mean(axis=0)
    _, _, vt = np.linalg.svd(controls - mean, full_matrices=False)  # vt: (min(n, D), D)
    if n_components is not None:
        if not 1 <= n_components <= vt.shape[0]:
            raise ValueError(f"n_components={n_components} must be between 1 and {vt.shape[0]} (min(n_controls, D))")
        vt = vt[:n_components]
    return mean, vt.T


def pca_center_scale(features, is_control, batch=None, n_components: int | None = None) -> np.ndarray:
    """PCA fitted on all controls, then per-batch center-scale on controls.

    Args:
        features: (n_units, D) embeddings.
        is_control: (n_units,) bool mask of control units.
        batch: optional (n_units,) batch labels for the scaling step.
        n_components: principal components kept (None = all, min(n_controls, D)).

    Returns:
        (n_units, K) float array, K = n_components or min(n_controls, D).
    """
    features, is_control, batch = _as_inputs(features, is_control, batch)
    _batches(batch, is_control)  # fail early on a batch without controls
    mean, axes = _fit_pca_rotation(features[is_control], n_components)
    rotated = (features - mean) @ axes  # (n_units, K)
    return center_scale(rotated, is_control, batch)


def tvn(
    features,
    is_control,
    batch=None,
    coral: bool = False,
    coral_eps: float = 0.5,
    scale_per_batch: bool = True,
    n_components: int | None = None,
) -> np.ndarray:
    """Typical variation normalisation on controls, with optional per-batch CORAL.

    Steps: center-scale on controls; full PCA rotation fitted on the controls; center-scale on
    controls again (the controls are then white: zero mean, identity covariance with ddof=0 when
    pooled); if ``coral``, each batch b is mapped by ``(cov(controls_b, ddof=1) + coral_eps*I)^(-1/2)``.

    Args:
        features: (n_units, D) embeddings. Needs more than D control units (a full-rank control
            covariance); reduce D first (e.g. ``pca_center_scale(n_components=...)``) otherwise.
        is_control: (n_units,) bool mask of control units.
        batch: optional (n_units,) batch labels (for per-batch scaling and CORAL).
        coral: apply the per-batch CORAL step (needs ``batch``).
        coral_eps: ridge added to each batch's control covariance before the inverse square root.
        scale_per_batch: center-scale per batch (True) or pooled (False, efaar_benchmarking's choice).
        n_components: keep at most this many principal components of the controls (the rotation
            step then also reduces the width); lets tables wider than their controls be whitened,
            and puts featurisers of different widths on an equal footing.

    Returns:
        (n_units, D) float array (D = min(D, n_components) when given).
    """
    features, is_control, batch_labels = _as_inputs(features, is_control, batch)
    n_controls, width = int(is_control.sum()), min(features.shape[1], n_components or features.shape[1])
    if n_controls < 2:
        raise ValueError(f"TVN needs at least 2 control units to whiten on; got {n_controls}")
    if n_controls <= width:
        if n_components is not None:
            raise ValueError(
                f"TVN keeps n_components={n_components} but there are only {n_controls} control units to whiten "
                f"them; use n_components < {n_controls} (--n-components), add controls, or use 'center_scale'"
            )
        # As efaar_benchmarking does with a PCA fitted on the controls: whiten the directions they span.
        warnings.warn(
            f"TVN: {n_controls} control units for {width} dimensions; whitening the first {n_controls - 1} "
            f"principal components of the controls (set n_components / --n-components to choose)",
            stacklevel=2,
        )
        width = n_controls - 1
    if coral and batch is None:
        raise ValueError("coral=True needs batch labels (CORAL matches each batch's control covariance)")
    scale_batch = batch if scale_per_batch else None
    z = center_scale(features, is_control, scale_batch)
    mean, axes = _fit_pca_rotation(z[is_control], width if width < features.shape[1] else None)
    z = (z - mean) @ axes  # (n_units, D) rotated onto the controls' principal axes (the first `width`)
    z = center_scale(z, is_control, scale_batch)
    if coral:
        identity = np.eye(z.shape[1], dtype=z.dtype)
        for in_batch in _batches(batch_labels, is_control):
            cov = np.cov(z[in_batch & is_control], rowvar=False, ddof=1) + coral_eps * identity
            z[in_batch] = z[in_batch] @ _inverse_sqrt_spd(cov)
    return z


def _inverse_sqrt_spd(matrix: np.ndarray) -> np.ndarray:
    """M^(-1/2) of a symmetric positive-definite matrix, by eigen-decomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T


def align(features, is_control, batch=None, method: str = "tvn", **options) -> np.ndarray:
    """Batch-correct ``features`` with one of ``ALIGNMENT_METHODS`` (options go to that method)."""
    if method == "none":
        return _as_inputs(features, is_control, batch)[0]
    functions = {"center_scale": center_scale, "pca_center_scale": pca_center_scale, "tvn": tvn}
    if method not in functions:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {ALIGNMENT_METHODS}")
    return functions[method](features, is_control, batch, **options)


def aggregate(
    features,
    perturbations: Sequence,
    method: str = "mean",
    drop: Sequence = (),
) -> tuple[np.ndarray, np.ndarray]:
    """One vector per perturbation: the mean (or median) of its units.

    Args:
        features: (n_units, D) aligned embeddings.
        perturbations: (n_units,) perturbation label of each unit.
        method: "mean" or "median".
        drop: labels to leave out (the control labels).

    Returns:
        (labels, vectors): labels (P,) sorted, vectors (P, D) in the same order.
    """
    features = np.asarray(features)
    perturbations = np.asarray(perturbations)
    if len(perturbations) != len(features):
        raise ValueError(f"{len(perturbations)} perturbation labels for {len(features)} feature rows")
    reducers = {"mean": np.mean, "median": np.median}
    if method not in reducers:
        raise ValueError(f"unknown aggregation {method!r}; choose 'mean' or 'median'")
    keep = ~np.isin(perturbations, np.asarray(list(drop), dtype=perturbations.dtype) if len(drop) else [])
    labels, inverse = np.unique(perturbations[keep], return_inverse=True)
    if len(labels) == 0:
        raise ValueError("no perturbation left to aggregate after dropping the control labels")
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(labels)))  # first row of each label
    grouped = features[keep][order]  # (n_kept, D) rows sorted by label
    if method == "mean":
        sums = np.add.reduceat(grouped.astype(np.float64, copy=False), starts, axis=0)
        vectors = sums / np.diff(np.append(starts, len(grouped)))[:, None]
    else:
        vectors = np.stack([np.median(group, axis=0) for group in np.split(grouped, starts[1:])])
    return labels, vectors.astype(np.result_type(features.dtype, np.float32), copy=False)
