"""From cells to perturbations: join a per-cell read-out (barcodes) to single-cell embeddings, then aggregate.

A pooled screen's perturbations are read per cell (a guide's barcode), in a table with one row per cell:
``plate, well, site`` and either ``cell_id`` (the label of the cell in the same segmentation or label images the
embeddings used) or ``centroid_y, centroid_x`` (pixels in the field), plus the label columns (``perturbation``,
``gene``, ``is_control`` ...; a ``Metadata_`` prefix is accepted). :func:`join_cell_labels` gives every embedded cell
its labels, by id or by the nearest read-out centroid in the same field within ``max_distance`` px; cells left
without a label are counted and dropped. :func:`aggregate_cells` then averages (or takes the median of) the cells
of each perturbation in each well into one row (``Metadata_num_cells``), dropping groups of fewer than
``min_cells`` cells (counted). ``cellmae evaluate --cells`` and ``cellmae profiles --cells`` run the arrayed-screen
evaluation on those rows: alignment on the control rows, one profile per perturbation across wells, recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .options import EvaluateOptions, ProfilesOptions
from .tables import METADATA_PREFIX, WELL_COLUMNS, is_metadata, metadata_column, read_embeddings

FIELD_KEYS = ("plate", "well", "site")
MATCHES = ("centroid", "id")
GROUP_TABLE = "cell_groups.parquet"


def read_cell_table(path: str | Path) -> pd.DataFrame:
    """A per-cell read-out table (CSV or Parquet), its ``Metadata_`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"cell read-out table {path} not found; pass --cells with the per-cell table "
            "(plate, well, site, cell_id or centroid_y/centroid_x, perturbation...)"
        )
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return table.rename(columns={c: c.removeprefix(METADATA_PREFIX) for c in table.columns if is_metadata(c)})


def join_cell_labels(
    cells: pd.DataFrame,
    readout: pd.DataFrame,
    by: str = "centroid",
    max_distance: float = 8.0,
) -> tuple[pd.DataFrame, dict]:
    """``cells`` (single-cell embeddings) with the read-out's label columns as ``Metadata_<name>``; unmatched cells
    dropped. Returns ``(table, {"cells", "matched", "unmatched"})``."""
    if by not in MATCHES:
        raise ValueError(f"cell match {by!r} is not one of {MATCHES}")
    need = [*FIELD_KEYS, *(("cell_id",) if by == "id" else ("centroid_y", "centroid_x"))]
    missing = [c for c in need if c not in readout.columns]
    if missing:
        raise ValueError(
            f"the cell read-out has no column(s) {missing} (it has {list(readout.columns)}); matching by "
            f"{by} needs {need}"
        )
    cell_need = [metadata_column(c) for c in need]
    absent = [c for c in cell_need if c not in cells.columns]
    if absent:
        raise ValueError(
            f"the embeddings have no column(s) {absent}; are they single-cell embeddings "
            "(cellmae embed ... --single-cell)?"
        )
    labels = [
        c for c in readout.columns if c not in (*FIELD_KEYS, "cell_id", "centroid_y", "centroid_x", "experiment")
    ]
    readout = readout.assign(**{k: readout[k].astype(str) for k in FIELD_KEYS})
    key = [cells[metadata_column(k)].astype(str) for k in FIELD_KEYS]
    matched = np.full(len(cells), -1, dtype=np.int64)  # row of the read-out for each cell
    fields = readout.groupby(list(FIELD_KEYS), sort=False).indices
    cell_fields = (
        pd.DataFrame({k: v.to_numpy() for k, v in zip(FIELD_KEYS, key)}).groupby(list(FIELD_KEYS), sort=False).indices
    )
    for field, rows in cell_fields.items():
        candidates = fields.get(field)
        if candidates is None:
            continue
        if by == "id":
            ids = pd.Series(candidates, index=readout["cell_id"].to_numpy()[candidates].astype(np.int64))
            ids = ids[~ids.index.duplicated(keep=False)]
            wanted = cells["Metadata_cell_id"].to_numpy()[rows].astype(np.int64)
            found = ids.reindex(wanted)
            matched[rows] = found.fillna(-1).to_numpy().astype(np.int64)
            continue
        mine = cells[["Metadata_centroid_y", "Metadata_centroid_x"]].to_numpy()[rows]  # (m, 2)
        theirs = readout[["centroid_y", "centroid_x"]].to_numpy()[candidates]  # (r, 2)
        distance = np.linalg.norm(mine[:, None, :] - theirs[None, :, :], axis=-1)  # (m, r)
        nearest = distance.argmin(1)
        close = distance[np.arange(len(rows)), nearest] <= max_distance
        matched[rows[close]] = candidates[nearest[close]]
    keep = matched >= 0
    joined = cells.loc[keep].reset_index(drop=True)
    for column in labels:
        joined[metadata_column(column)] = readout[column].to_numpy()[matched[keep]]
    # label columns go with the other Metadata_ columns, before the features
    metadata = [c for c in joined.columns if is_metadata(c)]
    joined = joined[metadata + [c for c in joined.columns if not is_metadata(c)]]
    return joined, {"cells": len(cells), "matched": int(keep.sum()), "unmatched": int((~keep).sum())}


def aggregate_cells(
    cells: pd.DataFrame,
    group_cols: Sequence[str],
    how: str = "mean",
    min_cells: int = 1,
) -> tuple[pd.DataFrame, dict]:
    """One row per group of cells (e.g. plate, well, perturbation): the mean or median of their features, the
    groups' other constant ``Metadata_`` columns, and ``Metadata_num_cells``; groups of fewer than ``min_cells``
    cells are dropped. Returns ``(table, {"groups", "kept", "dropped", "cells_dropped"})``."""
    if how not in ("mean", "median"):
        raise ValueError(f"aggregation {how!r} is not mean or median")
    if min_cells < 1:
        raise ValueError(f"min_cells={min_cells} must be >= 1")
    missing = [c for c in group_cols if c not in cells.columns]
    if missing:
        raise ValueError(
            f"cannot group cells by {missing}: not columns of the table (has {list(cells.columns)[:12]}...)"
        )
    features = [c for c in cells.columns if not is_metadata(c)]
    grouped = cells.groupby(list(group_cols), sort=True, dropna=False)
    sizes = grouped.size()
    values = grouped[features].mean() if how == "mean" else grouped[features].median()
    constant = [
        c
        for c in cells.columns
        if is_metadata(c)
        and c not in (*group_cols, "Metadata_num_cells")
        and (grouped[c].nunique(dropna=False) <= 1).all()
    ]
    metadata = grouped[constant].first() if constant else pd.DataFrame(index=values.index)
    table = pd.concat([metadata, values], axis=1)
    table.insert(len(constant), "Metadata_num_cells", sizes.to_numpy())
    kept = sizes.to_numpy() >= min_cells
    table = table[kept].reset_index()
    return table, {
        "groups": int(len(sizes)),
        "kept": int(kept.sum()),
        "dropped": int((~kept).sum()),
        "cells_dropped": int(sizes.to_numpy()[~kept].sum()),
    }


def cells_to_groups(
    embeddings, out: str | Path, options: EvaluateOptions | ProfilesOptions, well_cols: Sequence[str] = WELL_COLUMNS
) -> tuple[Path, dict]:
    """Single-cell embeddings -> labelled cells -> one row per (well, perturbation), written to ``out/cell_groups.parquet``.

    ``options`` are ``cellmae evaluate``'s or ``cellmae profiles``': the read-out ``cells``, joined by ``cell_match``
    (within ``max_cell_distance`` px), its ``perturbation_col``, groups of at least ``min_cells`` cells aggregated
    by ``aggregation``. Prints what was matched and dropped; raises when nothing is left."""
    cells_table, perturbation_col, by = options.cells, options.perturbation_col, options.cell_match
    max_distance, how, min_cells = options.max_cell_distance, options.aggregation, options.min_cells
    table = embeddings if isinstance(embeddings, pd.DataFrame) else read_embeddings(embeddings)
    joined, matched = join_cell_labels(table, read_cell_table(cells_table), by=by, max_distance=max_distance)
    if perturbation_col not in joined.columns:
        raise ValueError(
            f"the cell read-out gives no {perturbation_col} (columns: "
            f"{[c for c in joined.columns if is_metadata(c)]}); pass --perturbation-col"
        )
    groups, dropped = aggregate_cells(joined, [*well_cols, perturbation_col], how=how, min_cells=min_cells)
    print(
        f"cells: {matched['matched']} of {matched['cells']} cells labelled from {cells_table} (by {by}"
        + (f", within {max_distance:g} px" if by == "centroid" else "")
        + f"; {matched['unmatched']} without a label, left out)"
    )
    print(
        f"cells: {dropped['kept']} (well, perturbation) groups of >= {min_cells} cells ({how}); {dropped['dropped']} "
        f"smaller groups left out ({dropped['cells_dropped']} cells)"
    )
    if groups.empty:
        raise ValueError(
            f"no (well, perturbation) group has {min_cells} labelled cells; lower --min-cells or check "
            "the read-out's plate/well/site and centroids against the embeddings"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / GROUP_TABLE
    groups.to_parquet(path, index=False)
    return path, {**matched, **dropped}
