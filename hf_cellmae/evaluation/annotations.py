"""The gene-relationship files of the recall benchmark, without efaar-benchmarking's dependencies.

Recall of known relationships (``relate.py``) reads the CORUM, HuMAP, Reactome, SIGNOR and StringDB
pair lists that Recursion ships in the PyPI package ``efaar-benchmarking==1.0``. That package also
declares scvi-tools, s3fs, geomloss and more as requirements, which hf_cellmae never imports, and a
pip extra cannot install a package without its requirements. So ``cellmae annotations`` fetches the
package's wheel with ``pip download --no-deps`` (your pip configuration and index, nothing else is
contacted), checks every file against the SHA-256 recorded below, and extracts only the annotation
files into the cache: ``$HF_CELLMAE_CACHE/annotations/efaar_benchmarking-1.0/`` (default
``~/.cache/hf_cellmae``). The wheel is kept beside them (tests compare against its code).

Where the files are looked up, in order (:func:`annotations_dir`): an installed ``efaar_benchmarking``
package (``pip install --no-deps efaar-benchmarking==1.0`` still works), then the cache.

Every read checks again (:func:`check_annotation_file`): ``cellmae evaluate`` refuses one of these files whose
SHA-256 is no longer the one recorded below, in the default folders and in any ``--annotations`` folder holding
the complete set (a ``cellmae annotations --dest`` copy). A folder of your own named sources is read as it is.

Licences differ per file (CORUM and SIGNOR are CC-BY-NC 4.0): see the ``LICENSE`` file extracted
next to them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

EFAAR_PACKAGE = "efaar-benchmarking"
EFAAR_VERSION = "1.0"
EFAAR_WHEEL = f"efaar_benchmarking-{EFAAR_VERSION}-py2.py3-none-any.whl"
_IN_WHEEL = "efaar_benchmarking/benchmark_annotations/"
# SHA-256 of the files inside efaar_benchmarking-1.0-py2.py3-none-any.whl (the relationship lists, the
# complex clusters and the licence); a fetched file that differs is refused.
ANNOTATION_FILES = {
    "CORUM.txt": "edaafc77a184ef452996d211e9fe1699615315a36e1efc9d602042c06168a695",
    "CORUM_clusters.tsv": "caab1d3db6fa694c001f41e2973492d248ea3936a1249be3bf497648071f5c99",
    "HuMAP.txt": "6d08074df77f1a7274e754bc6e5e29aa438004bec0a13cbfb934c2c81328f3c4",
    "Reactome.txt": "ed3cd0fc32d2fe3510f167e9df39668bc9637348d78787615d3f970b2b862e70",
    "SIGNOR.txt": "00525d3a90198378b54c5c3093374d5c9ee0550bbd799f06b443512a465bcad3",
    "StringDB.txt": "7955c846a551530c07b1eb508404cf15ef0b77ea39ad2368ed40c5c099dedb8c",
    "LICENSE": "1bf6881972e84546677534643476aa571efbc63ed3947849711b418f113d8afc",
}
FETCH_HINT = "run `cellmae annotations` (fetches efaar-benchmarking 1.0's files, about 2 MB, without its dependencies)"


def cache_root() -> Path:
    """hf_cellmae's cache folder: ``$HF_CELLMAE_CACHE``, else ``$XDG_CACHE_HOME/hf_cellmae``, else ``~/.cache/hf_cellmae``."""
    if os.environ.get("HF_CELLMAE_CACHE"):
        return Path(os.environ["HF_CELLMAE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "hf_cellmae"


def cached_annotations_dir() -> Path:
    """Where ``cellmae annotations`` puts the files (it may not exist yet)."""
    return cache_root() / "annotations" / f"efaar_benchmarking-{EFAAR_VERSION}"


def cached_wheel() -> Path:
    """Where ``cellmae annotations`` keeps efaar-benchmarking's wheel (it may not exist yet)."""
    return cache_root() / "annotations" / EFAAR_WHEEL


def installed_annotations_dir() -> Path | None:
    """The pair-list folder of an installed efaar_benchmarking package (it may not exist), or None without it."""
    spec = importlib.util.find_spec("efaar_benchmarking")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "benchmark_annotations"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ANNOTATION_FILES)


def annotations_dir() -> Path:
    """Folder holding the benchmark's pair lists: the installed efaar_benchmarking's, else the fetched copy.

    Raises:
        FileNotFoundError: neither is there; the message says how to fetch them.
    """
    installed = installed_annotations_dir()
    if installed is not None and installed.is_dir():
        return installed
    cached = cached_annotations_dir()
    if _complete(cached):
        return cached
    raise FileNotFoundError(
        f"the benchmark pair lists (CORUM, HuMAP, Reactome, SIGNOR, StringDB) are not on this machine "
        f"(looked for an installed efaar_benchmarking and in {cached}); {FETCH_HINT}, "
        "or pass CSV paths with columns entity1,entity2"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_efaar_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds efaar-benchmarking's complete set of annotation files (``ANNOTATION_FILES``)."""
    return _complete(Path(folder))


def check_annotation_file(path: str | Path) -> None:
    """Raise ``UserError`` when ``path`` is one of efaar's files (by name) and its SHA-256 differs from the one
    ``cellmae annotations`` verified; the message names the file and the repair. Other names pass.
    """
    from ..errors import UserError

    path = Path(path)
    expected = ANNOTATION_FILES.get(path.name)
    if expected is None:
        return
    found = _sha256(path.read_bytes())
    if found == expected:
        return
    installed = installed_annotations_dir()
    if installed is not None and path.parent.resolve() == installed.resolve():
        repair = (
            f"reinstall it (pip install --no-deps --force-reinstall {EFAAR_PACKAGE}=={EFAAR_VERSION}), or uninstall it "
            "and run `cellmae annotations`"
        )
    elif path.parent.resolve() == cached_annotations_dir().resolve():
        repair = "run `cellmae annotations` to fetch and check it again"
    else:
        repair = f"run `cellmae annotations --dest {path.parent}` to fetch and check it again"
    raise UserError(
        f"{path} has SHA-256 {found}, not the {expected} that `cellmae annotations` verified ({EFAAR_PACKAGE} "
        f"{EFAAR_VERSION}'s {path.name}): the file was changed or replaced; {repair}, or pass your own list as a "
        "CSV path with columns entity1,entity2"
    )


def _download_wheel(folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        f"{EFAAR_PACKAGE}=={EFAAR_VERSION}",
        "--dest",
        str(folder),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = folder / EFAAR_WHEEL
    if result.returncode != 0 or not wheel.is_file():
        reason = (result.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise OSError(
            f"could not download {EFAAR_PACKAGE}=={EFAAR_VERSION} with pip ({reason}); on a machine without a package "
            f"index, download {EFAAR_WHEEL} elsewhere and run `cellmae annotations --wheel PATH`"
        )
    return wheel


def fetch_annotations(wheel: str | Path | None = None, dest: str | Path | None = None) -> Path:
    """Put efaar-benchmarking 1.0's annotation files into ``dest`` (default: the cache) and return the folder.

    Args:
        wheel: a downloaded ``efaar_benchmarking-1.0-py2.py3-none-any.whl`` to read instead of
            running ``pip download`` (for machines without a package index).
        dest: folder to write (default :func:`cached_annotations_dir`). Files already there with the
            right checksum are kept; the others are written (each to a temporary name, then renamed).

    Raises:
        OSError: the download failed, or the wheel lacks a file or holds a different one (its
            name and both checksums are given; nothing is written then).
        UserError: ``dest`` (or the cache, for the downloaded wheel) cannot be written; checked before downloading.
    """
    dest = Path(dest).expanduser() if dest is not None else cached_annotations_dir()
    if all(
        (dest / name).is_file() and _sha256((dest / name).read_bytes()) == digest
        for name, digest in ANNOTATION_FILES.items()
    ):
        return dest
    from ..errors import ensure_writable_folder

    created = not dest.exists()
    ensure_writable_folder(dest, "the annotation files")  # before downloading, not after
    if wheel is None:
        ensure_writable_folder(cached_wheel().parent, "the downloaded wheel")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(wheel).expanduser() if wheel is not None else _download_wheel(Path(scratch))
            try:
                with zipfile.ZipFile(source) as archive:
                    contents = {
                        name: archive.read(_IN_WHEEL + name)
                        for name in ANNOTATION_FILES
                        if _IN_WHEEL + name in archive.namelist()
                    }
            except (zipfile.BadZipFile, FileNotFoundError) as error:
                raise OSError(f"{source} is not a readable wheel ({error}); download {EFAAR_WHEEL} again") from None
            missing = sorted(set(ANNOTATION_FILES) - set(contents))
            if missing:
                raise OSError(f"{source} has no {', '.join(missing)}: it is not {EFAAR_WHEEL}")
            for name, data in contents.items():
                if _sha256(data) != ANNOTATION_FILES[name]:
                    raise OSError(
                        f"{name} in {source} has SHA-256 {_sha256(data)}, expected {ANNOTATION_FILES[name]} "
                        f"({EFAAR_PACKAGE} {EFAAR_VERSION}); nothing was written. Download {EFAAR_WHEEL} again"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            for name, data in contents.items():
                partial = dest / f".{name}.partial"
                partial.write_bytes(data)
                os.replace(partial, dest / name)
            if wheel is None:  # keep the downloaded wheel: tests compare recall against its code
                cached_wheel().parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, cached_wheel())
    except BaseException:
        if created and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # nothing was written: leave no empty folder behind
        raise
    return dest
