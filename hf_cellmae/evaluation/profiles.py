"""Profiles a scientist takes downstream: fields -> wells -> batch-corrected wells -> perturbations.

``cellmae profiles EMBEDDINGS OUT`` (``write_profiles``) reads a ``cellmae embed`` table (a folder of
Parquet parts, a Parquet file or a CSV), and writes into ``OUT``::

    well_profiles.parquet           one row per well: Metadata_* columns + one column per feature
    perturbation_profiles.parquet   with --perturbations: one row per perturbation (controls left out)
    _profiles_info.json             options, counts, the metadata columns left out and why

(``.h5ad`` instead of ``.parquet`` with ``--format h5ad``: an AnnData file, ``obs`` = the metadata,
``X`` = the features, the layout scanpy and efaar_benchmarking read.) Column names follow pycytominer
and copairs: metadata columns start with ``Metadata_``, every other column is a feature.

The steps:

- ``group_profiles``: the mean (or median) of the rows of each group (a well, a perturbation), keeping
  the metadata columns that are constant within every group. A table on disk is streamed batch by batch,
  one file at a time, with pyarrow: a first pass reads only the metadata columns (group sizes, first values), a second
  pass adds up the features. Memory holds the groups' vectors (and, for the median, only the rows of
  groups not yet complete: one well at a time for a table in well order, as ``cellmae embed`` writes),
  never the whole table.
- ``tables.align_rows``: batch correction fitted on the control rows (``align.align``: center-scale, PCA,
  TVN, TVN + CORAL), per batch when a batch column is given.
- ``perturbation_profiles``: wells -> perturbations, control wells left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .options import ProfilesOptions
from .tables import WELL_COLUMNS, align_rows, group_keys, is_metadata, open_table, table_columns

PROFILE_FORMATS = ("parquet", "h5ad")
WELLS_NAME = "well_profiles"
PERTURBATIONS_NAME = "perturbation_profiles"
INFO_NAME = "_profiles_info.json"
BATCH_ROWS = 65_536  # rows read at a time from a table on disk
AGGREGATIONS = ("mean", "median")


@dataclass
class Profiles:
    """One vector per group: ``metadata`` (G rows, sorted by ``keys``), ``vectors`` (G, D), ``feature_names`` (D,).

    ``keys`` (G,) are the group names (the key columns' values joined by "/"); ``varying_columns`` are the
    metadata columns left out because their value differs within a group (a field's site, its crop count).
    """

    metadata: pd.DataFrame
    vectors: np.ndarray
    feature_names: list[str]
    keys: np.ndarray
    varying_columns: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """``Metadata_*`` columns then one column per feature (the Parquet layout)."""
        features = pd.DataFrame(self.vectors, columns=self.feature_names)
        return pd.concat([self.metadata.reset_index(drop=True), features], axis=1)


def _source_batches(
    source, metadata_cols: list[str], feature_cols: list[str], batch_rows: int
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """(metadata DataFrame, (n, D) features) of ``source`` (a DataFrame or ``TableFiles``), at most ``batch_rows`` rows each."""
    if isinstance(source, pd.DataFrame):
        for start in range(0, max(len(source), 1), batch_rows):
            rows = source.iloc[start : start + batch_rows]
            yield rows[metadata_cols], rows[feature_cols].to_numpy()
        return
    width = len(feature_cols)
    for batch in source.batches([*metadata_cols, *feature_cols], batch_rows):
        if not batch.num_rows:
            continue
        metadata = batch.select(metadata_cols).to_pandas()
        # column by column into one array: no pandas block copy (the features are most of the memory)
        features = (
            np.column_stack([batch.column(name).to_numpy(zero_copy_only=False) for name in feature_cols])
            if width
            else np.zeros((batch.num_rows, 0))
        )
        yield metadata, features


def _differs(a: pd.DataFrame, b: pd.DataFrame) -> pd.Series:
    """Per column: does any row of ``a`` differ from the same row of ``b`` (two missing values are equal)."""
    a, b = a.astype(object), b.astype(object)
    return ((a != b) & ~(a.isna() & b.isna())).any(axis=0)


def group_profiles(
    rows,
    key_cols: Sequence[str] = WELL_COLUMNS,
    method: str = "mean",
    count_col: str | None = "Metadata_n_fields",
    batch_rows: int = BATCH_ROWS,
    progress: bool = False,
) -> Profiles:
    """The mean (or median) of the rows of each group, streamed when ``rows`` is a table on disk.

    Args:
        rows: an embeddings DataFrame (``Metadata_*`` + feature columns) or the path of a table
            (``open_table``: a ``cellmae embed`` folder, Parquet or CSV).
        key_cols: the columns naming a group (default: plate and well).
        method: "mean" or "median".
        count_col: metadata column added with the number of rows in each group (None: not added).
        batch_rows: rows read at a time from a table on disk.
        progress: show a progress bar per pass.

    Returns:
        ``Profiles`` sorted by group key; its metadata keeps the columns constant within every group.
    """
    from tqdm.auto import tqdm

    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {AGGREGATIONS}")
    source = rows if isinstance(rows, pd.DataFrame) else open_table(rows)
    metadata_cols, feature_names = table_columns(source)
    missing = [c for c in key_cols if c not in metadata_cols]
    if missing:
        raise ValueError(
            f"column(s) {missing} not in the table; metadata columns are {metadata_cols}. Name the "
            "columns of a group with --well-cols (or write them with `cellmae embed --metadata`)"
        )

    # Pass 1, metadata only: group sizes, the first row of each group, the columns that vary within one.
    firsts, counts, varying = [], {}, pd.Series(False, index=metadata_cols)
    seen: dict[str, int] = {}
    total = len(source) if isinstance(source, pd.DataFrame) else source.num_rows()
    bar = tqdm(total=total, unit="row", desc="profiles: metadata", disable=not progress)
    for batch, _ in _source_batches(source, metadata_cols, [], batch_rows):
        keys = group_keys(batch, key_cols)
        frame = batch.reset_index(drop=True)
        if len(metadata_cols):
            varying |= (frame.assign(_key=keys).groupby("_key", sort=False).nunique(dropna=False) > 1).any(axis=0)
        first_rows = frame[~pd.Series(keys).duplicated().to_numpy()].assign(_key=pd.unique(keys))
        known = first_rows["_key"].isin(seen).to_numpy()
        if known.any():  # groups that continue from an earlier batch: compare with their first row
            earlier = pd.concat(firsts).set_index("_key").loc[first_rows["_key"][known], metadata_cols]
            varying |= _differs(
                first_rows.loc[known, metadata_cols].reset_index(drop=True), earlier.reset_index(drop=True)
            )
        for key in first_rows["_key"][~known]:
            seen[key] = len(seen)
        firsts.append(first_rows[~known])
        for key, n in pd.Series(keys).value_counts(sort=False).items():
            counts[key] = counts.get(key, 0) + int(n)
        bar.update(len(batch))
    bar.close()
    if not seen:
        raise ValueError("the table has no rows to aggregate")
    first = pd.concat(firsts, ignore_index=True)  # one row per group, in order of first appearance
    index_of = pd.Index(first["_key"])
    sizes = np.array([counts[key] for key in first["_key"]])  # (G,) rows per group

    # Pass 2, features: sums per group (mean), or each group's rows until it is complete (median).
    width = len(feature_names)
    sums = np.zeros((len(first), width), dtype=np.float64) if method == "mean" else None
    medians = np.zeros((len(first), width), dtype=np.float64) if method == "median" else None
    pending: dict[int, list[np.ndarray]] = {}
    filled = np.zeros(len(first), dtype=np.int64)
    dtype = None
    bar = tqdm(total=int(sizes.sum()), unit="row", desc=f"profiles: {method} per group", disable=not progress)
    for batch, features in _source_batches(source, list(key_cols), feature_names, batch_rows):  # features: (n, D)
        dtype = np.result_type(features.dtype, np.float32) if dtype is None else dtype
        group = index_of.get_indexer(group_keys(batch, key_cols))  # (n,) group of each row
        order = np.argsort(group, kind="stable")  # rows of one group together, in table order
        present, starts = np.unique(group[order], return_index=True)
        if method == "mean":
            sums[present] += np.add.reduceat(features[order], starts, axis=0, dtype=np.float64)
        else:
            for index, block in zip(present, np.split(features[order], starts[1:])):
                pending.setdefault(index, []).append(block)
                if filled[index] + len(block) == sizes[index]:
                    medians[index] = np.median(np.concatenate(pending.pop(index)), axis=0)
        np.add.at(filled, present, np.diff(np.append(starts, len(order))))
        bar.update(len(batch))
    bar.close()
    vectors = sums if method == "mean" else medians
    if method == "mean":
        vectors /= sizes[:, None]

    kept = [c for c in metadata_cols if c in key_cols or not varying[c]]
    metadata = first[kept].copy()
    if count_col:
        metadata[count_col] = sizes
    keys = first["_key"].to_numpy(dtype=object)
    order = np.argsort(keys, kind="stable")  # sorted by group key, as align.aggregate
    return Profiles(
        metadata.iloc[order].reset_index(drop=True),
        vectors.astype(dtype, copy=False)[order],
        list(feature_names),
        keys[order],
        [c for c in metadata_cols if c not in kept],
    )


def aligned_feature_names(feature_names: Sequence[str], width: int, alignment: str) -> list[str]:
    """Column names after alignment: the input's for a per-feature correction, ``{alignment}_0000``... after a rotation."""
    if alignment in ("none", "center_scale") and width == len(feature_names):
        return list(feature_names)
    return [f"{alignment}_{i:04d}" for i in range(width)]


def group_rows(
    metadata: pd.DataFrame,
    features: np.ndarray,
    key_cols: Sequence[str],
    method: str = "mean",
    count_col: str | None = None,
    feature_names: Sequence[str] | None = None,
) -> Profiles:
    """``group_profiles`` of rows already in memory: ``metadata`` (n rows) and their ``features`` (n, D)."""
    names = (
        list(feature_names) if feature_names is not None else [f"feature_{i:04d}" for i in range(features.shape[1])]
    )
    meta = metadata[[c for c in metadata.columns if is_metadata(c)]].reset_index(drop=True)
    table = pd.concat([meta, pd.DataFrame(features, columns=names)], axis=1)
    return group_profiles(table, key_cols, method=method, count_col=count_col, batch_rows=max(len(table), 1))


def perturbation_profiles(
    metadata: pd.DataFrame,
    features: np.ndarray,
    is_control: np.ndarray,
    perturbation_col: str = "Metadata_perturbation",
    method: str = "mean",
    feature_names: Sequence[str] | None = None,
    count_col: str | None = "Metadata_n_wells",
) -> Profiles:
    """One profile per perturbation from its rows (wells or fields), leaving out every control label's rows.

    A perturbation label used by any control row is a control label: all its rows are left out. Labels
    are read as text (a missing label is the perturbation "nan", as ``align.aggregate`` has it).
    """
    labels = metadata[perturbation_col].astype(str).to_numpy()
    treated = ~np.isin(labels, np.unique(labels[np.asarray(is_control, dtype=bool)]))
    if not treated.any():
        raise ValueError(f"no perturbation left to aggregate after leaving out the control rows of {perturbation_col}")
    rows = metadata.iloc[np.flatnonzero(treated)].assign(**{perturbation_col: labels[treated]})
    return group_rows(rows, np.asarray(features)[treated], [perturbation_col], method, count_col, feature_names)


def _obs(metadata: pd.DataFrame) -> pd.DataFrame:
    """AnnData ``obs``: text columns as categoricals (scanpy's convention; h5ad stores them everywhere)."""
    obs = metadata.reset_index(drop=True).copy()
    for column in obs.columns:
        if not (pd.api.types.is_numeric_dtype(obs[column]) or pd.api.types.is_bool_dtype(obs[column])):
            obs[column] = obs[column].astype(str).astype("category")
    obs.index = pd.Index([str(i) for i in range(len(obs))], dtype=object)
    return obs


def write_profile_table(
    profiles: Profiles, path: str | Path, format: str = "parquet", info: Mapping | None = None
) -> Path:
    """Write ``profiles`` to ``path`` + ``.parquet`` (Metadata_* + features) or ``.h5ad`` (AnnData: obs, X, var)."""
    if format not in PROFILE_FORMATS:
        raise ValueError(f"unknown profile format {format!r}; choose one of {PROFILE_FORMATS}")
    path = Path(path).with_suffix(f".{format}")
    temporary = path.with_name(f".{path.name}.tmp")
    if format == "parquet":
        profiles.to_frame().to_parquet(temporary, index=False)
    else:
        try:
            import anndata
        except ImportError:
            raise ImportError(
                "writing h5ad (--format h5ad) needs anndata, which is not installed: pip install 'hf-cellmae[anndata]' "
                "(or pip install anndata), or write Parquet (the default)"
            ) from None
        var = pd.DataFrame(index=pd.Index([str(n) for n in profiles.feature_names], dtype=object))
        adata = anndata.AnnData(
            X=np.asarray(profiles.vectors, dtype=np.float32),
            obs=_obs(profiles.metadata),
            var=var,
            uns={"hf_cellmae": json.dumps(dict(info or {}), default=str)},
        )
        adata.write_h5ad(temporary)
    temporary.replace(path)  # a profile file exists only once complete
    return path


def write_profiles(
    embeddings: str | Path | pd.DataFrame, out_dir: str | Path, options: ProfilesOptions | None = None
) -> dict:
    """Fields -> wells -> aligned wells (-> perturbations), written into ``out_dir`` (see the module docstring).

    Args:
        embeddings: a ``cellmae embed`` folder, a Parquet/CSV table, or a DataFrame.
        out_dir: output folder (created).
        options: ``cellmae profiles``'s (default: its defaults): ``well_cols`` name a well, ``aggregation`` makes
            fields -> wells and wells -> perturbations, the alignment is fitted on the control wells,
            ``perturbations`` also writes one profile per perturbation (control wells left out), ``format`` is
            parquet or h5ad. ``cells`` is not read here: the command aggregates the cells first.

    Returns:
        The ``_profiles_info.json`` dict: options, ``n_fields``, ``n_wells``, ``n_control_wells``,
        ``n_perturbations``, ``left_out_columns`` and the files written.
    """
    options = options or ProfilesOptions()
    well_cols, aggregation, format = options.well_cols, options.aggregation, options.format
    if format not in PROFILE_FORMATS:
        raise ValueError(f"unknown --format {format!r}; choose one of {PROFILE_FORMATS}")
    wells = group_profiles(
        embeddings, well_cols, method=aggregation, count_col="Metadata_n_fields", progress=not options.no_progress
    )
    aligned, is_control = align_rows(wells.metadata, wells.vectors, options)
    names = aligned_feature_names(wells.feature_names, aligned.shape[1], options.alignment)
    aligned_wells = Profiles(wells.metadata, aligned, names, wells.keys, wells.varying_columns)
    info = {
        "source": str(embeddings) if not isinstance(embeddings, pd.DataFrame) else "DataFrame",
        "options": {
            "well_cols": list(well_cols),
            "aggregation": aggregation,
            "perturbation_col": options.perturbation_col,
            "controls": list(options.controls) if options.controls else None,
            "control_col": options.control_col,
            "batch_col": options.batch_col,
            "alignment": options.alignment,
            "align_options": options.align_keywords(),
            "format": format,
        },
        "n_fields": int(wells.metadata["Metadata_n_fields"].sum()),
        "n_wells": len(wells.keys),
        "n_control_wells": int(is_control.sum()),
        "left_out_columns": {c: "differs between the fields of a well" for c in wells.varying_columns},
        "files": {},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info["files"]["wells"] = write_profile_table(aligned_wells, out_dir / WELLS_NAME, format, info).name
    if options.perturbations:
        per = perturbation_profiles(wells.metadata, aligned, is_control, options.perturbation_col, aggregation, names)
        info["n_perturbations"] = len(per.keys)
        info["left_out_columns"].update(
            {
                c: "differs between the wells of a perturbation"
                for c in per.varying_columns
                if c not in info["left_out_columns"]
            }
        )
        info["files"]["perturbations"] = write_profile_table(per, out_dir / PERTURBATIONS_NAME, format, info).name
    (out_dir / INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return info


__all__ = [
    "Profiles",
    "aligned_feature_names",
    "group_profiles",
    "group_rows",
    "perturbation_profiles",
    "write_profile_table",
    "write_profiles",
]
