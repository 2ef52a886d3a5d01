"""Joining a metadata table (CSV/TSV/Parquet) onto discovered fields: perturbation, batch, control flag...

The table joins on the plate-position columns it has among ``experiment``, ``plate``, ``well``,
``site`` (case-insensitive, an optional ``Metadata_`` prefix is ignored; ``A1`` and ``A01`` match, so do
site ``01`` and ``1``). Without a ``site`` column a row describes every site of its well. Tables with one
row per *file* (several rows per site) are folded: columns that are constant within a site become
one value, columns that vary (``channel``, ``file``...) become a list in row order. Every other column
is carried through to the shards and, later, to the embeddings.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from .problems import ProblemLog
from .records import FieldRecord, normalize_key_value

KEY_COLUMNS = ("experiment", "plate", "well", "site")
# Tables a plate folder ships at its root (JUMP's and the synthetic plate's metadata.csv, a CellProfiler
# load_data.csv), tried in this order when no --metadata is given.
FOLDER_METADATA_NAMES = ("metadata.csv", "metadata.tsv", "metadata.parquet", "load_data.csv")


def find_folder_metadata(source: str | Path) -> Path | None:
    """The metadata table at the root of the image folder ``source`` (``FOLDER_METADATA_NAMES``), or ``None``."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    return next((folder / name for name in FOLDER_METADATA_NAMES if (folder / name).is_file()), None)


def read_metadata_table(path: str | Path, storage_options: dict | None = None):
    """Read a CSV, TSV or Parquet metadata table (a path, or an fsspec URL read with ``storage_options``) into a ``pandas.DataFrame``."""
    import io

    import pandas as pd

    from .remote import is_url, read_bytes

    if is_url(path):
        source, suffix = (
            io.BytesIO(read_bytes(str(path), storage_options)),
            Path(str(path).split("://", 1)[1]).suffix.lower(),
        )
    else:
        path = source = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"metadata table {path} does not exist")
        suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(source)
        return pd.read_csv(source, sep="\t" if suffix in (".tsv", ".tab") else ",")
    except UnicodeDecodeError as error:  # the decoder's text quotes the file's bytes (they can be secrets)
        raise ValueError(
            f"cannot read metadata table {path}: it is not UTF-8 text (UnicodeDecodeError at byte {error.start}); "
            "save it as a UTF-8 CSV/TSV or as Parquet"
        ) from error
    except Exception as error:
        raise ValueError(f"cannot read metadata table {path}: {type(error).__name__}: {error}") from error


def _python_value(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _record_key(record: FieldRecord, keys: list[str]) -> tuple:
    return tuple(normalize_key_value(key, getattr(record, key)) for key in keys)


def join_metadata(
    records: list[FieldRecord],
    table,
    problems: ProblemLog | None = None,
    source: str = "metadata",
) -> dict:
    """Add each matching table row's columns to ``record.metadata`` (in place).

    Args:
        records: fields from :func:`~hf_cellmae.data.layouts.discover_fields`.
        table: a ``pandas.DataFrame`` or a path to CSV/TSV/Parquet.
        problems: rows with an empty join key are reported there as unreadable metadata rows.
        source: name used in messages (the table's path).

    Returns:
        A summary for the manifest: ``{"join_keys", "columns", "per_channel_columns",
        "fields_without_metadata", "rows_without_fields", "unreadable_rows"}``.
    """
    problems = problems if problems is not None else ProblemLog()
    if not hasattr(table, "columns"):
        source = str(table)
        table = read_metadata_table(table)
    renamed = {}
    for column in table.columns:
        bare = str(column)[len("Metadata_") :] if str(column).startswith("Metadata_") else str(column)
        if bare.lower() in KEY_COLUMNS:
            renamed[column] = bare.lower()
    table = table.rename(columns=renamed)
    keys = [key for key in KEY_COLUMNS if key in table.columns]
    if "plate" not in keys and "well" not in keys:
        raise ValueError(
            f"metadata table {source} has neither a 'plate' nor a 'well' column (columns: {list(table.columns)}); it cannot be joined"
        )
    # A layout that cannot tell plates apart (e.g. a Phenix folder) names the plate after its folder:
    # then join on the remaining keys rather than match nothing.
    for key in ("experiment", "plate"):
        if key in keys and records:
            table_values = {normalize_key_value(key, v) for v in table[key]} - {""}
            if table_values and not table_values & {normalize_key_value(key, getattr(r, key)) for r in records}:
                keys.remove(key)
    value_columns = [column for column in table.columns if column not in keys]

    rows_by_key: dict[tuple, list[dict]] = defaultdict(list)
    unreadable = 0
    for line, row in enumerate(table.to_dict("records"), start=2):
        key = tuple(normalize_key_value(name, row[name]) for name in keys)
        if any(part == "" for part in key):
            unreadable += 1
            problems.report(
                f"unreadable metadata row: empty {[n for n, p in zip(keys, key) if p == '']}",
                file=f"{source}:{line}",
                stage="metadata",
            )
            continue
        rows_by_key[key].append(row)

    folded: dict[tuple, dict] = {}
    per_channel: set[str] = set()
    for key, rows in rows_by_key.items():
        values = {}
        for column in value_columns:
            column_values = [_python_value(row[column]) for row in rows]
            if all(v == column_values[0] for v in column_values):
                values[str(column)] = column_values[0]
            else:
                values[str(column)] = column_values
                per_channel.add(str(column))
        folded[key] = values

    matched_keys = set()
    without = 0
    for record in records:
        key = _record_key(record, keys)
        if key in folded:
            record.metadata.update(folded[key])
            matched_keys.add(key)
        else:
            without += 1
    return {
        "source": source,
        "join_keys": keys,
        "columns": [str(c) for c in value_columns],
        "per_channel_columns": sorted(per_channel),
        "fields_without_metadata": without,
        "rows_without_fields": sum(len(rows) for key, rows in rows_by_key.items() if key not in matched_keys),
        "unreadable_rows": unreadable,
    }
