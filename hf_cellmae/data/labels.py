"""Class labels of a shard folder's fields, for the supervised objectives (weak supervision, fine-tuning).

A label is a metadata column of the fields (``perturbation``, ``gene``, ...) or one of their identity
columns (``plate``, ``well``, ``experiment``). :func:`label_vocabulary` reads it from every shard (the small
columns only, no pixels) and numbers its values in sorted order, so every rank and every resumed run gives
each class the same id; the ids go into the model config as ``id2label`` / ``label2id``. A field whose label
is empty (a control well without a complex, NaN) is no class: it is left out and counted, unless the user
names a class for it (``unlabeled_class``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import UserError
from .shards import load_manifest

IDENTITY_COLUMNS = ("experiment", "plate", "well", "site")


def is_unlabeled(value) -> bool:
    """True for a missing label: ``None``, an empty string, NaN (also as the text ``"nan"``)."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


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
    unlabeled_class: str | None = None  # the class of fields without a label; None: they are left out
    num_unlabeled: int = 0  # fields without a label in the shards
    num_fields: int = 0

    def label_of(self, value) -> str | None:
        """The class name of a field's label value; ``None`` for an unlabeled field that is left out."""
        return self.unlabeled_class if is_unlabeled(value) else label_text(value)

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


def label_vocabulary(shard_dir: str, column: str, unlabeled_class: str | None = None) -> LabelVocabulary:
    """Every value of ``column`` and every plate in the shards, sorted; fields without a value are counted and
    become ``unlabeled_class`` when it is given (else they are no class).

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
    labels, plates, unlabeled, fields = set(), set(), 0, 0
    for shard in manifest["shards"]:
        path = str(shard_dir).rstrip("/") + "/" + shard["file"]
        table = _read_small_columns(path, ["plate", "metadata"] + ([column] if column in IDENTITY_COLUMNS and column != "plate" else []))
        plates.update(table.column("plate").to_pylist())
        if column in IDENTITY_COLUMNS:
            values = table.column(column).to_pylist()
        else:
            values = [json.loads(text).get(column) for text in table.column("metadata").to_pylist()]
        fields += len(values)
        unlabeled += sum(is_unlabeled(v) for v in values)
        labels.update(label_text(v) for v in values if not is_unlabeled(v))
    if unlabeled and unlabeled_class is not None:
        labels.add(unlabeled_class)
    if not labels:
        raise UserError(f"no field of {shard_dir} has a {column!r} label ({unlabeled} without one); pass another --label-col, "
                        "or --unlabeled-class NAME to make them one class")
    return LabelVocabulary(column=column, labels=sorted(labels), plates=sorted(plates), unlabeled_class=unlabeled_class,
                           num_unlabeled=unlabeled, num_fields=fields)
