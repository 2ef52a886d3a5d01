"""Class labels of a shard folder's fields, for the supervised objectives (weak supervision, fine-tuning).

A label is a metadata column of the fields (``perturbation``, ``gene``, ...) or one of their identity
columns (``plate``, ``well``, ``experiment``). :func:`label_vocabulary` reads it from every shard (the small
columns only, no pixels) and numbers its values in sorted order, so every rank and every resumed run gives
each class the same id; the ids go into the model config as ``id2label`` / ``label2id``. A field whose label
is empty (a control well without a complex, NaN) is no class: a run refuses such fields unless they are left out
(``--drop-missing-labels``, counted) or the user names their class (``unlabeled_class``, ``--unlabeled-class``).

It also counts what a run must know before it trains: fields without a value (``None``, NaN or empty text, never
a class: :func:`check_labels` refuses them unless they are dropped), the number of classes (at least 2), and
classes with few fields (:func:`label_warnings`). Rows failing their row checksum are left out of the counts
(the stream then fails or skips them under its ``on_error`` policy).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from ..errors import UserError
from .shards import IDENTITY_COLUMNS, ROW_CHECKSUM_COLUMNS, load_manifest, row_checksum

MIN_EXAMPLES_PER_CLASS = 10  # fields; a class with fewer is warned about (it can hardly be learnt or measured)


def is_missing_label(value) -> bool:
    """Whether a label value stands for "no value": ``None``, a float NaN, or empty / blank text."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


is_unlabeled = is_missing_label  # the name the training loop's filters use


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
    counts: dict[str, int] = field(default_factory=dict)  # fields per class
    missing: int = 0  # fields without a value in the column
    num_fields: int = 0  # fields read (missing ones included, corrupt rows not)
    corrupt: int = 0  # rows failing their row checksum, left out of everything above
    unlabeled_class: str | None = None  # the class of fields without a value; None: they are no class

    @property
    def num_unlabeled(self) -> int:
        return self.missing

    def label_of(self, value) -> str | None:
        """The class name of a field's label value; ``None`` for a field without one (when no class is named)."""
        return self.unlabeled_class if is_missing_label(value) else label_text(value)

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
    """The given columns of a shard that it has (format /1 shards have no ``row_crc32``)."""
    import pyarrow.parquet as pq

    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])
    parquet = pq.ParquetFile(path)
    return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])


def label_vocabulary(shard_dir: str, column: str, unlabeled_class: str | None = None) -> LabelVocabulary:
    """Every value of ``column`` and every plate in the shards, sorted, with the fields per class and the fields
    without a value (no class, or the class ``unlabeled_class`` when it is given).

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
    counts: Counter = Counter()
    plates: set = set()
    missing = num_fields = corrupt = 0
    for shard in manifest["shards"]:
        path = str(shard_dir).rstrip("/") + "/" + shard["file"]
        rows = _read_small_columns(path, [*ROW_CHECKSUM_COLUMNS, "row_crc32"]).to_pylist()
        for row in rows:
            if row.get("row_crc32") is not None and row_checksum(row) != row["row_crc32"]:
                corrupt += 1
                continue
            plates.add(row["plate"])
            num_fields += 1
            value = row[column] if column in IDENTITY_COLUMNS else json.loads(row["metadata"]).get(column)
            if is_missing_label(value):
                missing += 1
            else:
                counts[label_text(value)] += 1
    if missing and unlabeled_class is not None:
        counts[unlabeled_class] += missing
    return LabelVocabulary(
        column=column,
        labels=sorted(counts),
        plates=sorted(plates),
        counts=dict(counts),
        missing=missing,
        num_fields=num_fields,
        corrupt=corrupt,
        unlabeled_class=unlabeled_class,
    )


def check_labels(vocabulary: LabelVocabulary, drop_missing: bool = False) -> None:
    """Refuse a label column a classifier cannot be trained on: fields without a value (unless ``drop_missing``:
    they are then left out of training) or fewer than 2 classes. ``UserError`` names the column, the count and
    the fix."""
    column = vocabulary.column
    if vocabulary.missing and not drop_missing and vocabulary.unlabeled_class is None:
        raise UserError(
            f"label column {column!r} has no value in {vocabulary.missing} of {vocabulary.num_fields} fields (None, NaN "
            "or empty, e.g. control wells without a complex); pass --drop-missing-labels to leave them out of training "
            "(counted), --unlabeled-class NAME to train them as one class, or fill them in the metadata and re-shard"
        )
    if len(vocabulary.labels) < 2:
        found = f"{len(vocabulary.labels)} class{'' if len(vocabulary.labels) == 1 else 'es'}"
        shown = f" ({', '.join(vocabulary.labels)})" if vocabulary.labels else ""
        raise UserError(
            f"label column {column!r} has {found}{shown} in {vocabulary.num_fields - vocabulary.missing} labelled "
            "fields; a classifier needs at least 2: pick another column with --label-col"
        )


def label_warnings(vocabulary: LabelVocabulary, min_examples: int = MIN_EXAMPLES_PER_CLASS) -> list[str]:
    """Warnings a run should print about its labels: classes with fewer than ``min_examples`` fields (the
    rarest first) and rows left out because they fail their row checksum."""
    notes = []
    rare = sorted((count, label) for label, count in vocabulary.counts.items() if count < min_examples)
    if rare:
        listed = ", ".join(f"{label} ({count})" for count, label in rare[:10]) + (" ..." if len(rare) > 10 else "")
        notes.append(
            f"{len(rare)} class(es) of label column {vocabulary.column!r} have fewer than {min_examples} fields: "
            f"{listed}; such classes are hard to learn and their accuracy is noisy (merge them or add fields)"
        )
    if vocabulary.corrupt:
        notes.append(
            f"{vocabulary.corrupt} row(s) fail their row checksum and are not counted as labelled; "
            "the stream fails or skips them (--on-error)"
        )
    return notes
