"""Inputs in object storage (S3, GCS, Azure, the Hub...) through fsspec: list once, read with retries.

A source is remote when it is a URL with a protocol other than ``file://`` (``s3://bucket/prefix/``,
``gs://...``, ``az://...``, ``hf://datasets/...``). Everything that reads one goes through this module:

- ``filesystem(url, storage_options)``: the fsspec filesystem; a missing protocol package (``s3fs``,
  ``gcsfs``, ``adlfs``) is one line naming the hf-cellmae extra that installs it.
- ``list_folder(url, storage_options)``: every object under a folder, listed **once** (a ``RemoteFolder``
  the layouts walk instead of ``os.walk``); ``write_listing`` / ``read_listing`` record it as JSON so a
  re-run or another machine's ``--part`` plans from the same objects.
- ``read_bytes(url, storage_options)``: an object's bytes, retried with exponential backoff on transient
  errors (connection, timeout, throttling, 5xx); the final error names the object and the number of tries.
- ``parse_storage_options(text)``: ``--storage-options '{"anon": true}'`` -> dict.

Storage options are fsspec's keyword arguments for the protocol, e.g. ``{"anon": true}`` for the Cell
Painting Gallery, ``{"endpoint_url": "http://127.0.0.1:9000"}`` for an S3-compatible server.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

# protocol -> the hf-cellmae extra that installs its fsspec implementation
PROTOCOL_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}
RETRIES = 5  # tries of a read before giving up
BACKOFF_S = 0.5  # first wait; doubled after each failed try
LISTING_FORMAT = "hf_cellmae.listing/1"
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_MODULES = (
    "aiohttp",
    "botocore",
    "aiobotocore",
    "urllib3",
    "requests",
    "google",
    "azure",
    "fsspec",
    "s3fs",
    "gcsfs",
    "adlfs",
)


def is_url(path: str | Path | None) -> bool:
    """True for ``protocol://...`` other than ``file://`` (a local path, even with a colon, is not a URL)."""
    if not isinstance(path, str):  # a Path, or a RemoteFolder already listed
        return False
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]+)://", str(path))
    return match is not None and match.group(1) not in ("file", "local")


def parse_storage_options(text: str | Mapping | None) -> dict:
    """``'{"anon": true}'`` (JSON object) or a mapping -> dict; anything else is a one-line error."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        options = json.loads(text)
    except ValueError as error:
        raise ValueError(
            f"storage options {text!r} (--storage-options) are not JSON ({error}); write e.g. --storage-options '{{\"anon\": true}}'"
        ) from None
    if not isinstance(options, dict):
        raise ValueError(
            f"storage options {text!r} (--storage-options) are not a JSON object; write e.g. --storage-options '{{\"anon\": true}}'"
        )
    return options


def filesystem(url: str, storage_options: Mapping | None = None):
    """``(fs, path)`` for ``url``: the fsspec filesystem and the path without the protocol.

    A missing protocol package raises ``ImportError`` in one line: ``pip install 'hf-cellmae[s3]'``.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as error:
        protocol = str(url).split("://", 1)[0]
        extra = PROTOCOL_EXTRAS.get(protocol)
        install = (
            f"pip install 'hf-cellmae[{extra}]'" if extra else f"install the fsspec implementation of {protocol}://"
        )
        raise ImportError(
            f"reading {protocol}:// URLs ({url}) needs a package that is not installed ({error}); {install}"
        ) from None
    except ValueError as error:  # an unknown protocol
        raise ValueError(
            f"cannot read {url}: {error}; check the URL's protocol (s3://, gs://, az://, hf://...)"
        ) from None


def _transient(error: BaseException) -> bool:
    """A failure worth retrying: not a missing object or a refused permission; network, timeout, throttling, 5xx."""
    if isinstance(error, _PERMANENT):
        return False
    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return True
    return type(error).__module__.split(".")[0] in _TRANSIENT_MODULES


def with_retries(action, what: str, retries: int = RETRIES, backoff_s: float = BACKOFF_S):
    """``action()``, tried up to ``retries`` times with waits of ``backoff_s``, 2x, 4x... on transient errors.

    A permanent error (missing object, no permission) is raised at once; the last transient one as ``OSError``
    naming ``what`` and the number of tries.
    """
    for attempt in range(1, retries + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - sorted into permanent and transient below
            if not _transient(error):
                raise
            if attempt == retries:
                detail = " ".join(str(error).split())[:300]
                raise OSError(
                    f"cannot read {what} after {retries} tries ({type(error).__name__}: {detail}); check the "
                    "network, the endpoint and the credentials (--storage-options), then re-run"
                ) from error
            time.sleep(backoff_s * 2 ** (attempt - 1))


def read_bytes(
    url: str, storage_options: Mapping | None = None, retries: int = RETRIES, backoff_s: float = BACKOFF_S
) -> bytes:
    """The bytes of the object at ``url``, retried on transient errors; a missing object names itself."""
    fs, path = filesystem(url, storage_options)
    try:
        return with_retries(lambda: fs.cat_file(path), url, retries, backoff_s)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist (or is not readable with these --storage-options)") from None
    except PermissionError as error:
        raise _refused(url, error) from None


def _refused(url: str, error: PermissionError) -> PermissionError:
    return PermissionError(
        f"access to {url} is refused ({' '.join(str(error).split()) or 'forbidden'}); give credentials in "
        "--storage-options (or '{\"anon\": true}' for a public bucket)"
    )


@dataclass
class RemoteFolder:
    """A folder in object storage, listed once; the layouts walk its ``files`` instead of ``os.walk``.

    It stands in for the ``pathlib.Path`` root of a local folder: ``name``, ``is_dir()``, ``is_file()`` and
    ``os.fspath()`` (the path without the protocol, which ``PurePosixPath.relative_to`` accepts).
    ``files`` are the objects' paths without the protocol; ``url_of`` turns one back into a URL.
    """

    url: str
    protocol: str
    root: PurePosixPath
    files: list[PurePosixPath]
    sizes: list[int] = field(default_factory=list)
    storage_options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def suffix(self) -> str:
        return ""

    def is_dir(self) -> bool:
        return True

    def is_file(self) -> bool:
        return False

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return self.url

    def url_of(self, path: PurePosixPath | str) -> str:
        return f"{self.protocol}://{PurePosixPath(path)}"

    def listing(self) -> dict:
        """The record of the listing: URL, object count, total bytes, digest, and every object (relative path, size)."""
        objects = [[str(path.relative_to(self.root)), size] for path, size in zip(self.files, self.sizes)]
        digest = hashlib.sha256(json.dumps(objects).encode()).hexdigest()
        return {
            "format": LISTING_FORMAT,
            "url": self.url,
            "num_objects": len(objects),
            "total_bytes": sum(size for _, size in objects),
            "sha256": digest,
            "objects": objects,
        }


def list_folder(
    url: str, storage_options: Mapping | None = None, retries: int = RETRIES, backoff_s: float = BACKOFF_S
) -> RemoteFolder:
    """Every object under the folder ``url`` (one recursive listing, retried on transient errors), sorted."""
    fs, path = filesystem(url, storage_options)
    root = PurePosixPath(path.rstrip("/"))
    try:
        found = with_retries(
            lambda: fs.find(str(root), withdirs=False, detail=True), f"the listing of {url}", retries, backoff_s
        )
    except PermissionError as error:
        raise _refused(url, error) from None
    if not found:
        raise FileNotFoundError(
            f"no object under {url}; check the URL (a folder prefix such as s3://bucket/plate/) "
            "and --storage-options (e.g. '{\"anon\": true}' for a public bucket)"
        )
    protocol = url.split("://", 1)[0]
    names = sorted(found)
    return RemoteFolder(
        url.rstrip("/"),
        protocol,
        root,
        [PurePosixPath(name) for name in names],
        [int(found[name].get("size") or 0) for name in names],
        dict(storage_options or {}),
    )


def write_listing(folder: RemoteFolder, path: str | Path) -> Path:
    """Record ``folder``'s listing as JSON at ``path`` (atomically)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(folder.listing()) + "\n")
    temporary.replace(path)
    return path


def read_listing(path: str | Path, url: str, storage_options: Mapping | None = None) -> RemoteFolder | None:
    """The ``RemoteFolder`` recorded at ``path`` for ``url`` (None when there is none, or it lists another URL)."""
    path = Path(path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format") != LISTING_FORMAT or record.get("url") != url.rstrip("/"):
        return None
    _, root = filesystem(url, storage_options)
    root = PurePosixPath(root.rstrip("/"))
    return RemoteFolder(
        record["url"],
        url.split("://", 1)[0],
        root,
        [root / name for name, _ in record["objects"]],
        [size for _, size in record["objects"]],
        dict(storage_options or {}),
    )


__all__ = [
    "PROTOCOL_EXTRAS",
    "RemoteFolder",
    "filesystem",
    "is_url",
    "list_folder",
    "parse_storage_options",
    "read_bytes",
    "read_listing",
    "with_retries",
    "write_listing",
]
