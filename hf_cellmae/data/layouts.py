"""Finding fields of view on disk: RxRx folders, file-name patterns, CellProfiler load_data CSVs, TIFF stacks.

Every discoverer returns a list of :class:`~hf_cellmae.data.records.FieldRecord` (one per site, channels in
a fixed order) and reports stray files and incomplete sites to a :class:`~hf_cellmae.data.problems.ProblemLog`.
:func:`discover_fields` picks the layout (``layout="auto"`` guesses it) and is what ``cellmae shard`` calls.

Layouts:

- ``rxrx``: ``{experiment}/Plate{n}/{well}_s{site}_w{channel}.png`` (or ``{plate}/{well}_s{site}_w{channel}.*``);
  plate = the folder holding the images, experiment = the folder above it when there is one.
- ``pattern``: a regular expression with named groups matched against each file's path relative to the
  root (or its file name). ``channel`` is required; ``plate``, ``well`` (or ``row`` + ``col``), ``site``
  (or ``field``) and ``experiment`` are understood; any other named group (e.g. ``plane``) becomes part of
  the field's identity and of its metadata. Presets: ``bbbc`` (``plate1_A14_site1_Ch1.tif``),
  ``phenix`` (``r01c01f01p01-ch1sk1fk1fl1.tiff``), ``cellomics`` (``AS_09125_..._D03f00d0.tif``).
- ``load_data``: a CellProfiler CSV with ``FileName_<Ch>`` / ``PathName_<Ch>`` pairs and ``Metadata_*``
  columns (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``; the others go into the metadata).
- ``stack``: one multi-page / multi-channel TIFF per field; plate/well/site from ``pattern`` when given
  (no ``channel`` group then), otherwise plate = parent folder, well = file stem, site = 1.

Every layout also reads a folder in object storage (``s3://bucket/plate/``, ``gs://``, ``az://``, ``hf://``):
it is listed once (:func:`~hf_cellmae.data.remote.list_folder`) and walked like a local folder; the records'
files are then URLs. A load_data CSV may itself be a URL, and its ``PathName_*`` values may be URLs.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from .image_io import is_image_path
from .problems import ProblemLog
from .records import FieldRecord, normalize_site, normalize_well, well_from_row_col
from .remote import RemoteFolder, is_url, list_folder

LAYOUTS = ("auto", "rxrx", "pattern", "load_data", "stack")

RXRX_PATTERN = r"(?:(?P<experiment>[^/]+)/)?(?P<plate>[^/]+)/(?P<well>[A-Za-z]{1,2}\d{1,3})_s(?P<site>\d+)_w(?P<channel>\d+)\.(?:png|tiff?|jpe?g)"

# name -> (regular expression, prefix for numeric channel names)
PATTERN_PRESETS: dict[str, tuple[str, str]] = {
    "rxrx": (RXRX_PATTERN, "w"),
    "bbbc": (
        r"(?P<plate>[^_/]+)_(?P<well>[A-Za-z]{1,2}\d{1,3})_s(?:ite)?(?P<site>\d+)_(?:Ch|w)(?P<channel>\d+)\.tiff?",
        "Ch",
    ),
    "phenix": (
        r"r(?P<row>\d+)c(?P<col>\d+)f(?P<site>\d+)p(?P<plane>\d+)-ch(?P<channel>\d+)sk\d+fk\d+fl\d+\.tiff?",
        "ch",
    ),
    "cellomics": (r"(?P<plate>[^/]+)_(?P<well>[A-Za-z]{1,2}\d{2})f(?P<site>\d+)d(?P<channel>\d+)\.tiff?", "d"),
}

# Tables and notes that sit beside images (metadata.csv, README, plate maps): not part of any layout,
# never an error. Other files that are not images (an archive, an unsupported format) stay stray files.
SIDECAR_SUFFIXES = (
    ".csv",
    ".tsv",
    ".txt",
    ".json",
    ".md",
    ".rst",
    ".yaml",
    ".yml",
    ".parquet",
    ".xlsx",
    ".xls",
    ".xml",
    ".html",
    ".pdf",
    ".log",
)
SIDECAR_NAMES = ("readme", "license", "licence", "notice", "changelog")


def is_sidecar_path(path: str | Path) -> bool:
    """A table or note beside the images (``metadata.csv``, ``README``, ``*.txt``, ``*.json``...)."""
    name = Path(path).name.lower()
    return name.endswith(SIDECAR_SUFFIXES) or name.split(".")[0] in SIDECAR_NAMES


def _match_path(regex: re.Pattern, path: Path, root: Path) -> re.Match | None:
    """Match ``path`` relative to ``root``, else its shorter tails down to the file name (longest first).

    So a layout is found under wrapper folders too: ``cellmae synthetic``'s ``images/synthetic/Plate1/
    A01_s1_w1.png`` matches rxrx's ``{experiment}/{plate}/{file}`` from the plate's own root.
    """
    parts = path.relative_to(root).parts
    for start in range(len(parts)):
        match = regex.fullmatch("/".join(parts[start:]))
        if match is not None:
            return match
    return None


_KNOWN_GROUPS = {"experiment", "plate", "well", "row", "col", "site", "field", "channel"}


def _walk_files(root: Path, ignore: set[Path], problems: ProblemLog | None = None) -> list[Path]:
    """Every non-hidden file under ``root`` but sidecar tables/notes, sorted, following symlinked folders (each real folder once).

    A symlink to a folder already on the walk (a loop, or a second link to the same plate) is not entered
    again; it is reported to ``problems`` as a skip naming the link and its target.
    """
    if isinstance(root, RemoteFolder):  # listed once; hidden objects and sidecar tables left out as below
        ignored = {str(p) for p in ignore}
        return [
            path
            for path in root.files
            if not any(part.startswith(".") for part in path.relative_to(root).parts)
            and not is_sidecar_path(path)
            and root.url_of(path) not in ignored
        ]
    files = []
    seen = {os.path.realpath(root)}
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        kept = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(directory, name))
            if real in seen:  # the loop guard: each real folder is walked once
                if problems is not None:
                    problems.report(
                        f"symlinked folder leads to {real}, which is already read (a loop or a second link); "
                        "not read twice",
                        file=os.path.join(directory, name),
                        stage="discover",
                    )
                continue
            seen.add(real)
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = Path(directory) / name
            if name.startswith(".") or path.resolve() in ignore or is_sidecar_path(path):
                continue
            files.append(path)
    return files


def _as_root(root) -> Path | RemoteFolder:
    """A local folder as ``Path``; a listed remote folder as it is."""
    return root if isinstance(root, RemoteFolder) else Path(root)


def _location(root: Path | RemoteFolder, path) -> str:
    """What a record or a problem names a file by: its path, or its URL under a remote folder."""
    return root.url_of(path) if isinstance(root, RemoteFolder) else str(path)


def _channel_sort_key(channel: str):
    return (0, int(channel), "") if channel.isdigit() else (1, 0, channel)


def _channel_name(raw: str, prefix: str) -> str:
    return f"{prefix}{int(raw)}" if raw.isdigit() else raw


def _resolve_pattern(pattern: str) -> tuple[re.Pattern, str]:
    if pattern in PATTERN_PRESETS:
        regex, prefix = PATTERN_PRESETS[pattern]
    else:
        regex, prefix = pattern, "ch"
    try:
        compiled = re.compile(regex)
    except re.error as error:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}") from error
    return compiled, prefix


def _assemble_records(
    groups: dict[tuple, dict[str, str]],
    identities: dict[tuple, dict],
    problems: ProblemLog,
    channel_names: list[str] | None,
    prefix: str,
) -> list[FieldRecord]:
    """Turn {field key: {raw channel: file}} into records, reporting sites that miss a channel."""
    all_channels = sorted({channel for files in groups.values() for channel in files}, key=_channel_sort_key)
    if channel_names is not None and len(channel_names) != len(all_channels):
        raise ValueError(
            f"{len(channel_names)} channel names were given ({channel_names}) but the files hold "
            f"{len(all_channels)} channels ({all_channels}); give one name per channel, in that order"
        )
    names = list(channel_names) if channel_names is not None else [_channel_name(c, prefix) for c in all_channels]
    records = []
    for key in sorted(groups):
        files = groups[key]
        identity = identities[key]
        record = FieldRecord(channels=names, files=[files.get(c, "") for c in all_channels], **identity)
        missing = [name for raw, name in zip(all_channels, names) if raw not in files]
        if missing:
            problems.report(
                f"site is missing channel(s) {missing} (the layout has {names})",
                file=next(iter(files.values())),
                field=record.field_id,
                stage="discover",
            )
            continue
        records.append(record)
    return records


def discover_pattern(
    root: str | Path,
    pattern: str,
    problems: ProblemLog | None = None,
    channel_names: list[str] | None = None,
    ignore: list[str | Path] = (),
    channel_prefix: str | None = None,
) -> list[FieldRecord]:
    """Group per-channel files into fields with a named-group regular expression (or a preset name).

    Args:
        root: folder searched recursively.
        pattern: regex or one of ``PATTERN_PRESETS`` (``rxrx``, ``bbbc``, ``phenix``, ``cellomics``).
        problems: where stray files and incomplete sites go (default: a fresh ``skip`` log).
        channel_names: names for the channels in sorted channel-id order (default: ``Ch1``... from the files).
        ignore: files never reported as stray (e.g. the metadata table inside the folder).
    """
    root = _as_root(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist or is not a folder")
    problems = problems if problems is not None else ProblemLog()
    regex, prefix = _resolve_pattern(pattern)
    if "channel" not in regex.groupindex:
        raise ValueError(
            f"pattern {pattern!r} has no (?P<channel>...) group; per-channel layouts need one (or use layout='stack')"
        )
    prefix = channel_prefix or prefix
    groups: dict[tuple, dict[str, str]] = defaultdict(dict)
    identities: dict[tuple, dict] = {}
    for path in _walk_files(root, _ignored(root, ignore), problems):
        relative = path.relative_to(root).as_posix()
        match = _match_path(regex, path, root)
        if match is None:
            reason = (
                "stray file: not an image"
                if not is_image_path(path)
                else f"stray file: does not match the layout pattern {regex.pattern!r}"
            )
            problems.report(reason, file=_location(root, path), stage="discover")
            continue
        identity = _identity_from_match(match, relative, root)
        key = (
            identity["experiment"],
            identity["plate"],
            identity["well"],
            identity["site"],
            tuple(sorted(identity["tags"].items())),
        )
        channel = match.group("channel")
        if channel in groups[key]:
            problems.report(
                f"two files for channel {channel} of one site: {groups[key][channel]} and {_location(root, path)}",
                file=_location(root, path),
                stage="discover",
            )
            continue
        groups[key][channel] = _location(root, path)
        identities[key] = identity
    return _assemble_records(groups, identities, problems, channel_names, prefix)


def _ignored(root: Path | RemoteFolder, ignore) -> set:
    """The files never reported as stray: resolved paths, or the URLs themselves under a remote folder."""
    return {str(p) for p in ignore} if isinstance(root, RemoteFolder) else {Path(p).resolve() for p in ignore}


def _identity_from_match(match: re.Match, relative: str, root: Path) -> dict:
    found = {name: value for name, value in match.groupdict().items() if value is not None}
    parent = Path(relative).parent
    plate = found.get("plate") or (parent.name if parent.name else root.name)
    if "well" in found:
        well = normalize_well(found["well"])
    elif "row" in found and "col" in found:
        well = well_from_row_col(found["row"], found["col"])
    else:
        well = "A01"
    site = normalize_site(found.get("site", found.get("field", "1")))
    tags = {name: normalize_site(value) for name, value in found.items() if name not in _KNOWN_GROUPS}
    return {"experiment": found.get("experiment", ""), "plate": plate, "well": well, "site": site, "tags": tags}


def discover_rxrx(
    root: str | Path,
    problems: ProblemLog | None = None,
    channel_names: list[str] | None = None,
    ignore: list[str | Path] = (),
) -> list[FieldRecord]:
    """RxRx layout: ``[{experiment}/]{plate}/{well}_s{site}_w{channel}.png`` (8- or 16-bit PNG or TIFF)."""
    return discover_pattern(root, "rxrx", problems, channel_names, ignore)


def _load_data_file(path_name: str, csv_folder: Path | str, name: str) -> str:
    """A load_data file's path or URL: a ``PathName_*`` URL (``s3://...``) as it is, a path as CellProfiler resolves it."""
    if is_url(path_name):
        return f"{path_name.rstrip('/')}/{name}"
    if is_url(csv_folder):  # the CSV is in object storage: relative folders are relative to its prefix
        return f"{csv_folder}/{path_name.strip('/')}/{name}" if path_name else f"{csv_folder}/{name}"
    return str(_load_data_folder(path_name, csv_folder) / name)


def _load_data_folder(path_name: str, csv_folder: Path) -> Path:
    """The folder of a load_data file, as CellProfiler resolves it.

    An absolute ``PathName_<Ch>`` is used as it is; a relative one is taken relative to the CSV's folder;
    an empty or missing one means the CSV's folder itself. ``csv_folder`` is absolute, so the CSV's folder
    is never joined twice (``ld/ld/...``) and the result does not depend on the current folder.
    """
    return csv_folder / path_name if path_name else csv_folder


def discover_load_data(
    csv_path: str | Path,
    problems: ProblemLog | None = None,
    channel_names: list[str] | None = None,
    storage_options: dict | None = None,
) -> list[FieldRecord]:
    """CellProfiler load_data CSV: one row per site, ``FileName_<Ch>`` + ``PathName_<Ch>`` per channel.

    ``PathName_*`` values that are relative are taken relative to the CSV's folder (a missing
    ``PathName_*`` column means the CSV's folder), as in CellProfiler; the files are absolute paths, whatever
    the current folder and whether ``csv_path`` is relative. ``Metadata_Plate/Well/Site`` place the field;
    every other ``Metadata_*`` column goes into the record's metadata (without the prefix).
    Rows with an empty file name or without a plate/well are reported as unreadable metadata rows.
    ``csv_path`` and the ``PathName_*`` values may be fsspec URLs (read with ``storage_options``).
    """
    import io

    import pandas as pd

    if is_url(csv_path):
        from .remote import read_bytes

        csv_folder = str(csv_path).rsplit("/", 1)[0]
        source = io.BytesIO(read_bytes(str(csv_path), storage_options))
        compression = "gzip" if str(csv_path).lower().endswith(".gz") else None  # JUMP's load_data.csv.gz
    else:
        csv_path = Path(csv_path)
        csv_folder = Path(
            os.path.abspath(csv_path)
        ).parent  # absolute: the records must not depend on the current folder
        source, compression = csv_path, "infer"
    problems = problems if problems is not None else ProblemLog()
    try:
        table = pd.read_csv(source, dtype=str, keep_default_na=False, compression=compression)
    except Exception as error:
        raise ValueError(f"cannot read load_data CSV {csv_path}: {error}") from error
    channels = [column[len("FileName_") :] for column in table.columns if column.startswith("FileName_")]
    if not channels:
        raise ValueError(f"{csv_path} has no FileName_<channel> columns; it is not a CellProfiler load_data CSV")
    if channel_names is not None and len(channel_names) != len(channels):
        raise ValueError(
            f"{len(channel_names)} channel names given but {csv_path} has {len(channels)} FileName_ columns ({channels})"
        )
    names = list(channel_names) if channel_names is not None else channels
    records = []
    for row_number, row in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        where = f"{csv_path}:{row_number}"
        plate, well = row.get("Metadata_Plate", "").strip(), row.get("Metadata_Well", "").strip()
        files = []
        for channel in channels:
            name = row.get(f"FileName_{channel}", "").strip()
            folder = row.get(f"PathName_{channel}", "").strip()
            files.append(_load_data_file(folder, csv_folder, name) if name else "")
        site = normalize_site(row.get("Metadata_Site", "1") or "1")
        if not plate or not well or not all(files):
            empty = [c for c, f in zip(channels, files) if not f]
            reason = "unreadable load_data row: " + (
                "missing Metadata_Plate/Metadata_Well"
                if not plate or not well
                else f"empty FileName for channel(s) {empty}"
            )
            # Naming the field counts the row as a lost field (ProblemLog.skipped_fields).
            field_id = f"{plate}/{normalize_well(well)}/s{site}" if plate and well else f"row {row_number}"
            problems.report(reason, file=where, field=field_id, stage="metadata")
            continue
        metadata = {
            column[len("Metadata_") :]: value
            for column, value in row.items()
            if column.startswith("Metadata_") and column not in ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
        }
        records.append(
            FieldRecord(
                plate=plate,
                well=normalize_well(well),
                site=site,
                channels=names,
                files=files,
                metadata=metadata,
            )
        )
    return records


def discover_stacks(
    root: str | Path,
    problems: ProblemLog | None = None,
    channel_names: list[str] | None = None,
    pattern: str | None = None,
    ignore: list[str | Path] = (),
    storage_options: dict | None = None,
) -> list[FieldRecord]:
    """One multi-channel TIFF (multi-page, ImageJ/OME hyperstack or multi-sample) per field.

    Channel names default to ``ch1..chC`` (C read from the first stack); the reader checks every
    stack against that count, so a stack with a different number of channels is reported.
    """
    from .image_io import read_stack

    root = _as_root(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist or is not a folder")
    problems = problems if problems is not None else ProblemLog()
    regex = re.compile(pattern) if pattern else None
    records = []
    for path in _walk_files(root, _ignored(root, ignore), problems):
        relative = path.relative_to(root).as_posix()
        if not path.name.lower().endswith((".tif", ".tiff")):
            problems.report("stray file: not a TIFF stack", file=_location(root, path), stage="discover")
            continue
        if regex is not None:
            match = regex.fullmatch(relative) or regex.fullmatch(path.name)
            if match is None:
                problems.report(
                    f"stray file: does not match the layout pattern {regex.pattern!r}",
                    file=_location(root, path),
                    stage="discover",
                )
                continue
            identity = _identity_from_match(match, relative, root)
        else:
            parent = Path(relative).parent
            identity = {
                "experiment": "",
                "plate": parent.name or root.name,
                "well": path.stem.split(".")[0],
                "site": "1",
                "tags": {},
            }
        records.append(FieldRecord(channels=[], files=[_location(root, path)], stack=True, **identity))
    if records:
        if channel_names is None:
            try:
                count = read_stack(records[0].files[0], storage_options).shape[0]
            except Exception:
                count = 0  # the unreadable first stack is reported when the shard writer reads it
            channel_names = [f"ch{i + 1}" for i in range(count)]
        for record in records:
            record.channels = list(channel_names)
    return records


def detect_layout(root: str | Path) -> tuple[str, str | None]:
    """Guess ``(layout, pattern)`` for a folder from the presets that match the most image files."""
    if str(root).lower().endswith(".csv") and (is_url(root) or Path(root).is_file()):
        return "load_data", None
    root = _as_root(root)
    images = [path for path in _walk_files(root, set()) if is_image_path(path)]
    if not images:
        raise ValueError(
            f"no image files found under {root}; check the path (supported: {', '.join(('.tif', '.tiff', '.png'))})"
        )
    best, best_count = None, 0
    for name, (regex, _) in PATTERN_PRESETS.items():
        compiled = re.compile(regex)
        count = sum(_match_path(compiled, p, root) is not None for p in images)
        if count > best_count:
            best, best_count = name, count
    if best is None:
        raise ValueError(
            f"could not detect the layout of {root}: no file matches the rxrx/bbbc/phenix/cellomics names "
            f"(e.g. {images[0].name}); pass layout='pattern' with a regex (--layout pattern --pattern REGEX) or layout='stack'"
        )
    return ("rxrx", None) if best == "rxrx" else ("pattern", best)


def discover_fields(
    source: str | Path,
    layout: str = "auto",
    pattern: str | None = None,
    channel_names: list[str] | None = None,
    problems: ProblemLog | None = None,
    ignore: list[str | Path] = (),
    storage_options: dict | None = None,
) -> list[FieldRecord]:
    """Discover the fields of view under ``source`` (a folder, or a load_data CSV; local, a URL, or a ``RemoteFolder``).

    Args:
        source: input folder (rxrx / pattern / stack) or CSV (load_data).
        layout: one of ``LAYOUTS``; ``"auto"`` tries the presets and keeps the best-matching one.
        pattern: regex or preset name for ``layout="pattern"`` (and optionally ``"stack"``).
        channel_names: names replacing the channel ids found in the files, in sorted id order.
        problems: the skip/fail policy and log (default: skip).
        ignore: files that are not stray even though they are not images of the layout.
        storage_options: fsspec options for a ``source`` URL (a folder URL is listed once, here, unless
            ``source`` is a ``RemoteFolder`` listed already).

    Returns:
        ``list[FieldRecord]`` sorted by (experiment, plate, well, site).
    """
    problems = problems if problems is not None else ProblemLog()
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if is_url(source) and not (layout == "load_data" or str(source).lower().endswith(".csv")):
        source = list_folder(str(source), storage_options)
    if layout == "auto":
        layout, detected = detect_layout(source)
        pattern = pattern or detected
    if layout == "rxrx":
        return discover_rxrx(source, problems, channel_names, ignore)
    if layout == "pattern":
        if not pattern:
            raise ValueError(
                f"layout='pattern' needs a pattern: a regex with named groups or one of {sorted(PATTERN_PRESETS)}"
            )
        return discover_pattern(source, pattern, problems, channel_names, ignore)
    if layout == "load_data":
        return discover_load_data(source, problems, channel_names, storage_options)
    return discover_stacks(source, problems, channel_names, pattern, ignore, storage_options)
