"""Class labels of a shard folder's fields, for the supervised objectives (weak supervision, fine-tuning).

A label is a metadata column of the fields (``perturbation``, ``gene``, ...) or one of their identity
columns (``plate``, ``well``, ``experiment``). :func:`label_vocabulary` reads it from every shard (the small
columns only, no pixels) and numbers its values in sorted order, so every rank and every resumed run gives
each class the same id; the ids go into the model config as ``id2label`` / ``label2id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import UserError
from .shards import load_manifest

IDENTITY_COLUMNS = ("experiment", "plate", "well", "site")


def label_text(value) -> str:
    """A metadata value as the class name it stands for (``None`` -> ``""``, ``True`` -> ``"True"``, lists as JSON)."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


@dataclass
class LabelVocabulary:
    """The classes of one label column and the plates of a shard folder, each numbered in sorted order."""

    column: str
    labels: list[str]
    plates: list[str]

    @property
    def label2id(self) -> dict[str, int]:
        return {label: index for index, label in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def plate2id(self) -> dict[str, int]:
        return {plate: index for index, plate in enumerate(self.plates)}


def _read_small_columns(path: str, columns: list[str]):
    import pyarrow.parquet as pq

    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)
    return pq.read_table(path, columns=columns)


def label_vocabulary(shard_dir: str, column: str) -> LabelVocabulary:
    """Every value of ``column`` and every plate in the shards, sorted.

    Raises:
        UserError: ``column`` is neither an identity column nor one of ``manifest["metadata_columns"]``
            (the message lists the available columns).
    """
    manifest = load_manifest(shard_dir)
    metadata_columns = list(manifest.get("metadata_columns", []))
    available = sorted(set(IDENTITY_COLUMNS) | set(metadata_columns))
    if column not in available:
        raise UserError(
            f"label column {column!r} is not in the shards' metadata of {shard_dir}; the columns are {available}: "
            "pass one with --label-col, or re-shard with a metadata file that has it"
        )
    labels, plates = set(), set()
    for shard in manifest["shards"]:
        path = str(shard_dir).rstrip("/") + "/" + shard["file"]
        table = _read_small_columns(path, ["plate", "metadata"] + ([column] if column in IDENTITY_COLUMNS and column != "plate" else []))
        plates.update(table.column("plate").to_pylist())
        if column in IDENTITY_COLUMNS:
            labels.update(label_text(v) for v in table.column(column).to_pylist())
        else:
            labels.update(label_text(json.loads(text).get(column)) for text in table.column("metadata").to_pylist())
    return LabelVocabulary(column=column, labels=sorted(labels), plates=sorted(plates))
