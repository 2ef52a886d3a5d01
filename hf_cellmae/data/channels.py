"""Which stain each channel holds: named by the data, or by the user token by token, never by position alone.

A file name carries only a channel *token* (``w1``, ``Ch2``, ``ch3``, ``d0``, or a load_data ``FileName_<Ch>``
suffix), and the stain behind a token differs between screens: JUMP's ``w1`` is AGP, RxRx's ``w1`` is DNA. A
list of names matched to tokens by position (``--channels DNA,ER,RNA,AGP,Mito``) therefore mislabels every
channel the moment the order is not the one the screen used. So names come, in this order, from:

1. ``--channels w1=AGP,w2=DNA,...``: an explicit ``token=name`` per file channel (also how to rename: a name
   the data gives to *another* token is refused, with both mappings);
2. the data: a per-file metadata table whose ``channel_name`` / ``compartment`` / ``stain`` column names the
   channel of each file (linked by its ``file`` column, or by a numeric ``channel`` column), or load_data
   ``FileName_<name>`` columns;
3. ``--channels DNA,ER,...`` by position, accepted only when the data names nothing or agrees with it;
4. the tokens themselves (``w1``...), which :func:`is_channel_token` recognises as "no name".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError
from .records import FieldRecord

# Columns of a metadata table that name a file's stain, most specific first (BBBC022 has both a
# ``stain`` "Hoechst 33342" and a ``compartment`` "DNA": the compartment is what models are named by).
NAME_COLUMNS = ("channel_name", "compartment", "stain")
FILE_COLUMNS = ("file", "file_name", "filename", "path")
_TOKEN = re.compile(r"[A-Za-z]{0,3}\d+")


def is_channel_token(name: str) -> bool:
    """True for a bare file-channel id (``w1``, ``Ch2``, ``ch3``, ``d0``, ``4``) that names no stain."""
    return bool(_TOKEN.fullmatch(str(name)))


def _token_number(token: str) -> int | None:
    digits = re.search(r"(\d+)$", token)
    return int(digits.group(1)) if digits else None


def stain_key(name: str) -> str:
    """What two names of one stain share: the name in lower case, without CellProfiler's ``Orig`` prefix
    (``OrigDNA``, ``dna`` and ``DNA`` are one stain)."""
    name = str(name).strip().lower()
    return name[4:] if name.startswith("orig") and len(name) > 4 else name


def same_stain(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one stain (:func:`stain_key`)."""
    return stain_key(a) == stain_key(b)


class ChannelVocabulary:
    """The channels a model (or a stream) knows, by name: the one rule that matches a plate's channel to one of them.

    A channel is the vocabulary's channel of the identical name, else of the same stain (:func:`same_stain`: any
    case, ``Orig`` prefix ignored); the first such channel when there are several. The training stream and
    ``cellmae embed`` both match channels with it.
    """

    def __init__(self, names):
        self.names = [str(name) for name in names]
        self._exact: dict[str, int] = {}
        self._stain: dict[str, int] = {}
        for index, name in enumerate(self.names):
            self._exact.setdefault(name, index)
            self._stain.setdefault(stain_key(name), index)

    def index(self, name: str) -> int | None:
        """The index of ``name``'s channel in the vocabulary, or None when the vocabulary has no such stain."""
        index = self._exact.get(str(name))
        return index if index is not None else self._stain.get(stain_key(name))

    def __len__(self) -> int:
        return len(self.names)


def _mapping_text(tokens: list[str], names: list[str]) -> str:
    return ",".join(f"{token}={name}" for token, name in zip(tokens, names))


def parse_channels_option(text: str | list[str] | dict[str, str] | None) -> list[str] | dict[str, str] | None:
    """``"w1=AGP,w2=DNA"`` -> ``{"w1": "AGP", "w2": "DNA"}``; ``"DNA,ER"`` -> ``["DNA", "ER"]``; lists/dicts pass through."""
    if text is None or isinstance(text, (list, tuple, dict)):
        return list(text) if isinstance(text, tuple) else text
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        return None
    explicit = [part for part in parts if "=" in part]
    if not explicit:
        return parts
    if len(explicit) != len(parts):
        raise UserError(
            f"--channels {text} mixes TOKEN=NAME and plain names; give every channel as TOKEN=NAME (e.g. w1=AGP,w2=DNA)"
        )
    mapping: dict[str, str] = {}
    for part in parts:
        token, _, name = (piece.strip() for piece in part.partition("="))
        if not token or not name:
            raise UserError(f"--channels {text}: {part!r} is not TOKEN=NAME; write e.g. w1=AGP")
        if token in mapping:
            raise UserError(f"--channels {text} names file channel {token} twice; give each token once")
        mapping[token] = name
    return mapping


def _normalized_columns(table) -> dict[str, str]:
    """``{bare lower-case name: column}`` with an optional ``Metadata_`` prefix removed."""
    columns = {}
    for column in table.columns:
        text = str(column)
        bare = text[len("Metadata_") :] if text.startswith("Metadata_") else text
        columns.setdefault(bare.lower(), column)
    return columns


def _absolute(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def channel_names_from_table(
    records: list[FieldRecord], table, source: str = "metadata", root: str | Path | None = None
) -> tuple[dict[str, str], str] | None:
    """The stain of each file-channel token as a per-file table names it, or ``None`` when it names none.

    Args:
        records: discovered fields whose ``channels`` are still the file tokens (``w1``...).
        table: a ``pandas.DataFrame``, one row per file (JUMP/BBBC022-style ``metadata.csv``).
        source: the table's path (its folder resolves relative ``file`` values; named in messages).
        root: the image folder (also tried for relative ``file`` values).

    Returns:
        ``({token: name}, "metadata.csv column 'compartment'")``. A token named differently in two rows, or
        a table that names some of the channels but not all, raises ``UserError``.
    """
    columns = _normalized_columns(table)
    name_column = next((columns[c] for c in NAME_COLUMNS if c in columns), None)
    if name_column is None and "channel" in columns:
        values = [str(v) for v in table[columns["channel"]].dropna()]
        if values and not any(is_channel_token(v) for v in values):
            name_column = columns["channel"]  # the channel column holds stain names itself
    if name_column is None or not records:
        return None
    tokens = list(records[0].channels)
    names_by_token: dict[str, set[str]] = {token: set() for token in tokens}
    file_column = next((columns[c] for c in FILE_COLUMNS if c in columns), None)
    if file_column is not None:
        folders = [Path(_absolute(source)).parent] + ([Path(root)] if root is not None else [])
        name_of_file: dict[str, str] = {}
        for value, name in zip(table[file_column], table[name_column]):
            if value is None or name is None or str(name) in ("", "nan"):
                continue
            candidates = [value] if os.path.isabs(str(value)) else [folder / str(value) for folder in folders]
            for candidate in candidates:
                name_of_file[_absolute(candidate)] = str(name).strip()
        for record in records:
            if record.stack:
                break  # one file holds every channel: only a channel-number column can name them
            for token, path in zip(record.channels, record.files):
                name = name_of_file.get(_absolute(path)) if path else None
                if name is not None:
                    names_by_token[token].add(name)
    if not any(names_by_token.values()) and "channel" in columns and name_column != columns["channel"]:
        by_number = {_token_number(token): token for token in tokens}
        by_text = {token.lower(): token for token in tokens}
        for value, name in zip(table[columns["channel"]], table[name_column]):
            token = by_text.get(str(value).strip().lower())  # "w1", or the number 1 for the token w1
            if token is None:
                try:
                    token = by_number.get(int(float(value)))
                except (TypeError, ValueError):
                    continue
            if token is not None and name is not None and str(name) not in ("", "nan"):
                names_by_token[token].add(str(name).strip())
    if not any(names_by_token.values()):
        return None
    where = f"{Path(str(source)).name} column {str(name_column)!r}"
    for token, names in names_by_token.items():
        if len(names) > 1:
            raise UserError(
                f"{where} names file channel {token} both {' and '.join(sorted(names))}; one token must be one stain "
                f"across the folder: fix the table, or name each channel yourself with --channels {token}=NAME,..."
            )
    named = {token: next(iter(names)) for token, names in names_by_token.items() if names}
    unnamed = [token for token in tokens if token not in named]
    if unnamed:
        suggestion = _mapping_text(tokens, [named.get(token, "NAME") for token in tokens])
        raise UserError(
            f"{where} names file channel(s) {', '.join(named)} but not {', '.join(unnamed)}; add their rows "
            f"to the table, or name every channel with --channels {suggestion}"
        )
    return named, where


def resolve_channel_names(
    tokens: list[str], given=None, from_data: tuple[dict[str, str], str] | None = None
) -> list[str]:
    """The stain name of each file-channel token (see the module docstring for the order of sources).

    Args:
        tokens: the file-channel tokens, in the order the pixels are stacked (``["w1", ..., "w5"]``).
        given: what the user passed (``--channels``): ``None``, names by position, or ``{token: name}``.
        from_data: ``({token: name}, where)`` from the data (:func:`channel_names_from_table`), or ``None``.

    Returns:
        One name per token. Raises ``UserError`` when a positional list contradicts the data (both mappings
        and the fix in the message), has the wrong length, or an explicit mapping misses or invents a token.
    """
    given = parse_channels_option(given)
    if isinstance(given, dict):
        names = _explicit_names(tokens, given)
        if from_data:
            _refuse_swapped_stains(tokens, names, from_data)
        return names
    data_names = [from_data[0][token] for token in tokens] if from_data else None
    if given is None:
        return data_names or list(tokens)
    if len(set(given)) != len(given):
        raise UserError(f"--channels {','.join(given)} repeats a name; give each stain once")
    if len(given) != len(tokens):
        raise UserError(
            f"{len(given)} channel names were given ({given}) but the files hold {len(tokens)} channels ({tokens}); "
            f"give one name per channel, in that order, or as TOKEN=NAME (e.g. --channels {_mapping_text(tokens, data_names or given + ['NAME'] * len(tokens))})"
        )
    if data_names is None or all(same_stain(a, b) for a, b in zip(given, data_names)):
        return list(given)
    raise UserError(
        f"--channels {','.join(given)} contradicts {from_data[1]}, which names each file's channel:\n"
        f"  --channels by position gives: {_mapping_text(tokens, given)}\n"
        f"  {from_data[1]} says:  {_mapping_text(tokens, data_names)}\n"
        f"drop --channels to use the table's names, or name each file channel explicitly: --channels {_mapping_text(tokens, data_names)}"
    )


def _refuse_swapped_stains(tokens: list[str], names: list[str], from_data: tuple[dict[str, str], str]) -> None:
    """Refuse a ``token=name`` mapping that gives a stain the data names to another token (``UserError``, both mappings).

    A name the data does not use is a rename (``w1=MitoTracker`` where the table says ``Mito``) and passes; a name
    the data gives to a different file channel (``w1=DNA`` where the table says ``w1=AGP, w2=DNA``) is a contradiction.
    """
    data_names = [from_data[0][token] for token in tokens]
    swapped = [
        token
        for token, name, data_name in zip(tokens, names, data_names)
        if not same_stain(name, data_name) and any(same_stain(name, other) for other in data_names)
    ]
    if swapped:
        raise UserError(
            f"--channels {_mapping_text(tokens, names)} contradicts {from_data[1]} for file channel(s) {', '.join(swapped)}:\n"
            f"  --channels gives:  {_mapping_text(tokens, names)}\n"
            f"  {from_data[1]} says:  {_mapping_text(tokens, data_names)}\n"
            f"drop --channels to use the table's names, or give the table's mapping: --channels {_mapping_text(tokens, data_names)}"
        )


def _explicit_names(tokens: list[str], mapping: dict[str, str]) -> list[str]:
    """Names from ``{token: name}``; a key may be the token (any case) or its number (``1`` for ``w1``)."""

    def token_of(key: str) -> str | None:
        for token in tokens:
            if token.lower() == key.lower() or (
                key.isdigit() and _token_number(token) == int(key) and is_channel_token(token)
            ):
                return token
        return None

    names: dict[str, str] = {}
    for key, name in mapping.items():
        token = token_of(key)
        if token is None:
            raise UserError(
                f"--channels names file channel {key!r}, which no file has; the files' channel tokens are "
                f"{', '.join(tokens)}: give TOKEN=NAME for each (e.g. --channels {_mapping_text(tokens, ['NAME'] * len(tokens))})"
            )
        names[token] = name
    missing = [token for token in tokens if token not in names]
    if missing:
        raise UserError(
            f"--channels {_mapping_text(list(mapping), list(mapping.values()))} does not name file channel(s) "
            f"{', '.join(missing)}; give TOKEN=NAME for every one of {', '.join(tokens)}"
        )
    result = [names[token] for token in tokens]
    if len(set(result)) != len(result):
        raise UserError(
            f"--channels {_mapping_text(tokens, result)} gives two file channels the same name; give each stain once"
        )
    return result


def name_channels(
    records: list[FieldRecord],
    given=None,
    table=None,
    source: str = "metadata",
    root: str | Path | None = None,
    layout: str | None = None,
) -> dict:
    """Rename every record's channels from file tokens to stain names, in place.

    Args:
        records: discovered fields whose ``channels`` are the file tokens (``discover_fields(...,
            channel_names=None)``); all share one token list.
        given: the user's ``--channels`` (text, names by position, or ``{token: name}``), or ``None``.
        table: a per-file metadata ``DataFrame`` that may name each file's stain, or ``None``.
        source: the table's path; root: the image folder (both resolve the table's ``file`` column).
        layout: ``"load_data"`` when the tokens are a load_data CSV's ``FileName_<name>`` columns.

    Returns:
        For the manifest: ``{"channel_map": {token: name}, "channels_named_by": where}``.
    """
    if not records:
        return {"channel_map": {}, "channels_named_by": None}
    tokens = list(records[0].channels)
    given = parse_channels_option(given)
    from_data = None  # an explicit token=name mapping may rename the data's stains, never swap them
    if table is not None:
        try:
            from_data = channel_names_from_table(records, table, source, root)
        except UserError:
            if not isinstance(given, dict):
                raise
            # A table that names a token two ways: the explicit mapping is the fix its message names.
    if from_data is None and layout == "load_data" and not any(is_channel_token(t) for t in tokens):
        from_data = ({token: token for token in tokens}, "the load_data CSV's FileName_<channel> columns")
    names = resolve_channel_names(tokens, given, from_data)
    if isinstance(given, dict):
        named_by = "--channels TOKEN=NAME"
    elif given is not None:
        named_by = "--channels by position" + (f" (agrees with {from_data[1]})" if from_data else "")
    else:
        named_by = from_data[1] if from_data else "file tokens (no stain names given)"
    for record in records:
        record.channels = list(names)
    return {"channel_map": dict(zip(tokens, names)), "channels_named_by": named_by}
