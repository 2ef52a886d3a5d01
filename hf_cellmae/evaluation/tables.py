"""An embeddings table as every evaluation reads it, from the file to the profiles aligned on its controls.

A table (``cellmae embed`` writes one) has metadata columns prefixed ``Metadata_`` (the pycytominer / copairs
convention) and one numeric column per feature. This module is the one place that knows that layout:

- reading: ``open_table`` (its files, for streaming) and ``read_embeddings`` (in memory);
- splitting: ``split_table`` (metadata, features) and ``table_columns`` (their names, from a schema);
- controls: ``control_mask``;
- grouping: ``group_keys`` and ``well_profiles`` (rows averaged per well);
- aligning: ``align_rows`` and ``aligned_profiles`` (one table aligned once, then per-perturbation profiles).

``report``, ``suite``, ``probe``, ``profiles`` and ``cells`` import it; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .align import aggregate, align
from .options import AlignOptions

METADATA_PREFIX = "Metadata_"
WELL_COLUMNS = ("Metadata_plate", "Metadata_well")


def metadata_column(name: str) -> str:
    """``name`` as a metadata column: ``complex`` -> ``Metadata_complex`` (a prefixed name is kept)."""
    return name if name.startswith(METADATA_PREFIX) else f"{METADATA_PREFIX}{name}"


def is_metadata(column) -> bool:
    """Whether a column of a table is metadata (``Metadata_*``) rather than a feature."""
    return str(column).startswith(METADATA_PREFIX)


@dataclass
class TableFiles:
    """The files of an embeddings table on disk, read one after the other (``open_table``)."""

    files: list[Path]
    csv: bool = False

    @property
    def schema(self):
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        if self.csv:
            with pa_csv.open_csv(self.files[0]) as reader:
                return reader.schema
        return pq.read_schema(self.files[0])

    def num_rows(self) -> int | None:
        import pyarrow.parquet as pq

        return None if self.csv else sum(pq.ParquetFile(path).metadata.num_rows for path in self.files)

    def batches(self, columns: list[str], batch_rows: int):
        """pyarrow record batches of ``columns``, one file at a time (no read-ahead: memory stays at one batch)."""
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        for path in self.files:
            if self.csv:
                with pa_csv.open_csv(path, convert_options=pa_csv.ConvertOptions(include_columns=columns)) as reader:
                    yield from reader
            else:
                yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


def open_table(embeddings: str | Path) -> TableFiles:
    """The files of an embeddings table: a ``cellmae embed`` folder of Parquet parts, a Parquet file or a CSV.

    Files whose names start with "." or "_" (``_embedding_info.json``, unfinished parts) are not read.
    """
    path = Path(embeddings)
    if not path.exists():
        raise FileNotFoundError(f"embeddings {path} not found; write them with `cellmae embed MODEL DATA {path}`")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not files:
            raise FileNotFoundError(f"no Parquet part in {path}; is it a `cellmae embed` output folder?")
        return TableFiles(files)
    return TableFiles([path], csv=path.suffix == ".csv")


def read_embeddings(path: str | Path) -> pd.DataFrame:
    """An embeddings table from a Parquet file or folder of parts (its parts in order), or a CSV file."""
    table = open_table(path)
    if table.csv:
        return pd.read_csv(table.files[0])
    if not Path(path).is_dir():
        return pd.read_parquet(table.files[0])
    return pd.concat([pd.read_parquet(part) for part in table.files], ignore_index=True)


def _check_features(metadata: list[str], features: list[str], not_numeric: list[str]) -> None:
    if not features:
        raise ValueError(f"the table has no feature columns (only {metadata}); is it an embeddings table?")
    if not_numeric:
        raise ValueError(
            f"feature columns must be numeric; {not_numeric[:5]} are not. Prefix metadata columns with "
            f"'{METADATA_PREFIX}' so they are not read as features"
        )


def split_table(table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """``Metadata_*`` columns and the (n, D) float feature matrix (every other column)."""
    metadata_columns = [c for c in table.columns if is_metadata(c)]
    feature_columns = [c for c in table.columns if not is_metadata(c)]
    not_numeric = [c for c in feature_columns if not pd.api.types.is_numeric_dtype(table[c])]
    _check_features(metadata_columns, feature_columns, not_numeric)
    return table[metadata_columns].reset_index(drop=True), table[feature_columns].to_numpy()


def table_columns(source: pd.DataFrame | TableFiles) -> tuple[list[str], list[str]]:
    """Metadata and feature column names of a DataFrame or of a table on disk (from its schema, nothing read)."""
    if isinstance(source, pd.DataFrame):
        metadata, _ = split_table(source.iloc[:0])
        return list(metadata.columns), [c for c in source.columns if c not in set(metadata.columns)]
    import pyarrow as pa

    schema = source.schema
    metadata = [name for name in schema.names if is_metadata(name)]
    features = [name for name in schema.names if not is_metadata(name)]
    numeric = (pa.types.is_integer, pa.types.is_floating)
    _check_features(metadata, features, [n for n in features if not any(is_(schema.field(n).type) for is_ in numeric)])
    return metadata, features


def require_columns(metadata: pd.DataFrame, columns) -> None:
    """An error naming the ``columns`` (None entries ignored) that ``metadata`` lacks."""
    missing = [c for c in columns if c is not None and c not in metadata.columns]
    if missing:
        raise ValueError(f"column(s) {missing} not in the table; metadata columns are {list(metadata.columns)}")


def control_mask(
    metadata: pd.DataFrame,
    perturbation_col: str,
    controls: Sequence[str] | None = None,
    control_col: str | None = None,
    required: bool = True,
) -> np.ndarray:
    """Which rows are controls: ``controls`` labels of the perturbation column, or a boolean column
    (``control_col``, default ``Metadata_is_control`` when present).

    With ``required=False`` (``alignment="none"``: nothing is fitted on controls) a table that names no
    controls has none: every row is a perturbation. Otherwise that is an error saying how to name them.
    """
    if controls:
        mask = metadata[perturbation_col].astype(str).isin([str(c) for c in controls]).to_numpy()
        if not mask.any():
            seen = metadata[perturbation_col].astype(str).value_counts().index[:8].tolist()
            raise ValueError(
                f"no row of {perturbation_col} is one of the controls {list(controls)}; values include {seen}"
            )
        return mask
    default = metadata_column("is_control")
    control_col = control_col or (default if default in metadata else None)
    if control_col is None:
        if not required:
            return np.zeros(len(metadata), dtype=bool)
        raise ValueError(
            "say which rows are controls (the alignment is fitted on them; --alignment none needs none): "
            "--controls LABEL [LABEL ...] (values of the perturbation column) "
            f"or --control-col COLUMN (a boolean column such as {default})"
        )
    require_columns(metadata, [control_col])
    values = metadata[control_col]
    if values.dtype != bool:
        values = values.astype(str).str.lower().map({"true": True, "1": True, "false": False, "0": False})
        if values.isna().any():
            raise ValueError(
                f"{control_col} must hold booleans (True/False, 1/0); found {metadata[control_col].unique()[:5]}"
            )
    return values.to_numpy(dtype=bool)


def group_keys(metadata: pd.DataFrame, key_cols: Sequence[str]) -> np.ndarray:
    """The group of each row: its ``key_cols`` values as text, joined by "/" (``"P1/A01"``)."""
    missing = {c: int(n) for c, n in metadata[list(key_cols)].isna().sum().items() if n}
    if missing:
        raise ValueError(
            f"{sum(missing.values())} rows have no value in {list(missing)} ({missing}); fill them "
            "or drop those rows before aggregating by " + ", ".join(key_cols)
        )
    keys = metadata[key_cols[0]].astype(str)
    for column in key_cols[1:]:
        keys = keys + "/" + metadata[column].astype(str)
    return keys.to_numpy(dtype=object)


def well_profiles(
    metadata: pd.DataFrame,
    features: np.ndarray,
    well_cols: Sequence[str] = WELL_COLUMNS,
) -> tuple[pd.DataFrame, np.ndarray]:
    """The mean of the rows of each well: ``(metadata of each well, (n_wells, D))``, sorted by well.

    A well's metadata is the first value of each column among its rows (pandas ``first``: missing values skipped).
    """
    units = group_keys(metadata, well_cols)  # (n,) "plate/well"
    names, vectors = aggregate(features, units)  # names (W,) sorted, vectors (W, D)
    first = metadata.reset_index(drop=True).assign(_unit=units).groupby("_unit", sort=True).first()
    return first.loc[names].reset_index(drop=True), vectors


def align_rows(metadata: pd.DataFrame, features: np.ndarray, options: AlignOptions) -> tuple[np.ndarray, np.ndarray]:
    """Batch-correct ``features`` (n, D) on the control rows, per ``options.batch_col`` value when given.

    Returns:
        (aligned (n, D'), is_control (n,)): D' = D except for a truncating PCA / TVN ``n_components``.
    """
    require_columns(metadata, [options.perturbation_col, options.batch_col])
    is_control = control_mask(
        metadata, options.perturbation_col, options.controls, options.control_col, required=options.alignment != "none"
    )
    batch = metadata[options.batch_col].astype(str).to_numpy() if options.batch_col else None
    aligned = align(features, is_control, batch, method=options.alignment, **options.align_keywords())
    return aligned, is_control


@dataclass
class AlignedTable:
    """An embeddings table aligned on its controls: ``metadata`` (n rows), ``aligned`` (n, D'), ``is_control`` (n,).

    ``embedding_dim`` is the table's feature count D (before a truncating PCA / TVN); ``perturbation_col`` names
    what each row received.
    """

    metadata: pd.DataFrame
    aligned: np.ndarray
    is_control: np.ndarray
    embedding_dim: int
    perturbation_col: str

    def labels(self) -> np.ndarray:
        """(n,) the perturbation of each row, as text (a missing label is the perturbation "nan")."""
        return self.metadata[self.perturbation_col].astype(str).to_numpy()

    def control_labels(self) -> np.ndarray:
        """The perturbation labels used by any control row: all their rows are controls."""
        labels = self.labels()
        return np.unique(labels[self.is_control])

    def perturbations(self, method: str = "mean") -> tuple[np.ndarray, np.ndarray]:
        """One profile per perturbation, control labels left out: ``(labels (P,) sorted, vectors (P, D'))``."""
        labels = self.labels()
        keep = ~np.isin(labels, self.control_labels())
        if not keep.any():
            raise ValueError(
                f"no perturbation left to aggregate after leaving out the control rows of {self.perturbation_col}"
            )
        names, vectors = aggregate(self.aligned[keep], labels[keep], method=method)
        return names.astype(str), vectors


def aligned_profiles(table: pd.DataFrame, options: AlignOptions) -> AlignedTable:
    """``table`` split and aligned on its controls (``align_rows``), once for every metric that reads it."""
    metadata, features = split_table(table)
    aligned, is_control = align_rows(metadata, features, options)
    return AlignedTable(metadata, aligned, is_control, features.shape[1], options.perturbation_col)


__all__ = [
    "METADATA_PREFIX",
    "AlignedTable",
    "TableFiles",
    "align_rows",
    "aligned_profiles",
    "control_mask",
    "group_keys",
    "is_metadata",
    "metadata_column",
    "open_table",
    "read_embeddings",
    "require_columns",
    "split_table",
    "table_columns",
    "well_profiles",
]
