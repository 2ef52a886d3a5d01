"""A field of view as discovered on disk: where it sits on the plate and which files hold its channels."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field

_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


def normalize_well(well: object) -> str:
    """``"a1"``, ``"A01"``, ``"A001"`` -> ``"A01"`` (row letters upper-case, column two digits at least).

    Anything that is not letters + number is returned unchanged (as text) so odd layouts still work.
    """
    text = str(well).strip()
    match = _WELL.match(text)
    if not match:
        return text
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def well_from_row_col(row: object, col: object) -> str:
    """Phenix/Operetta ``r03c05`` (1-based row and column numbers) -> ``"C05"``."""
    row_number = int(row)
    letters = ""
    while row_number > 0:  # 1 -> A, 26 -> Z, 27 -> AA
        row_number, remainder = divmod(row_number - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return f"{letters}{int(col):02d}"


def normalize_site(site: object) -> str:
    """``1``, ``"01"``, ``1.0`` -> ``"1"``; non-numeric sites are kept as text; missing -> ``"1"``."""
    if site is None or (isinstance(site, float) and site != site):
        return "1"
    text = str(site).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number == int(number) else text


def normalize_key_value(name: str, value: object) -> str:
    """Normalise one join-key value so that a metadata table and a folder layout agree (missing -> "")."""
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        return ""
    if name == "well":
        return normalize_well(value)
    if name == "site":
        return normalize_site(value)
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value).strip()


@dataclass
class FieldRecord:
    """One field of view (site) before it is read.

    Attributes:
        plate: plate identifier (for the RxRx layout, the plate folder name, e.g. ``"Plate1"``).
        well: well name, normalised (``"A01"``).
        site: site / field number as text (``"1"``).
        channels: channel names, in the order the pixels will be stacked (C,).
        files: one file per channel, or a single multi-channel file when ``stack`` is true.
        stack: ``files[0]`` holds all channels (multi-page / multi-sample TIFF).
        experiment: optional outer grouping (RxRx ``{experiment}/Plate{n}``), ``""`` when absent.
        tags: further parts of the field's identity captured by a file-name pattern (e.g. Phenix
            ``{"plane": "1"}``); they are part of ``field_id`` and are copied into the metadata.
        metadata: anything else carried through to the shards (perturbation, batch, control flag...).
    """

    plate: str
    well: str
    site: str
    channels: list[str]
    files: list[str]
    stack: bool = False
    experiment: str = ""
    tags: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def field_id(self) -> str:
        """Unique, human-readable id: ``[experiment/]plate/well/s{site}``."""
        prefix = f"{self.experiment}/" if self.experiment else ""
        suffix = "".join(f"_{name}{value}" for name, value in sorted(self.tags.items()))
        return f"{prefix}{self.plate}/{self.well}/s{self.site}{suffix}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FieldRecord:
        return cls(**data)


def file_versions(files: list[str]) -> list[list]:
    """``[[size, mtime_ns], ...]`` of each file (``None`` for one that cannot be stat'ed): what tells a repaired or
    replaced input from the one an earlier run read, without reading its bytes again."""
    versions = []
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:
            versions.append(None)  # missing now: the read reports it
            continue
        versions.append([stat.st_size, stat.st_mtime_ns])
    return versions


def source_fingerprint(records: list[FieldRecord]) -> str:
    """SHA-256 over the fields' identities, files, metadata and each file's size and modification time.

    Two runs over the same records give the same fingerprint unless an input file was replaced, repaired or
    touched, or a field's metadata changed: a re-run compares it with the one it recorded to decide whether
    finished work can be reused (``cellmae shard`` folds it into each shard's plan hash). Record it per unit of
    work (a shard, an embedding part) so that only the units holding a changed file are redone.
    """
    text = json.dumps(
        [[record.to_dict(), file_versions(record.files)] for record in records], sort_keys=True, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()
