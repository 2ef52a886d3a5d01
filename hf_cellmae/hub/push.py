"""Push a checked model folder to the Hub in one commit.

    from hf_cellmae.hub import push_model_folder
    push_model_folder("runs/tiny/final", "my-org/cellmae-tiny", private=True)

The folder is checked first (``check_model_folder``: loads, safetensors only, no pickles, no
secrets, model code present and the installed hf_cellmae's own unless ``allow_modified_code``, then
named in a warning), its card is (re)generated with the repo id unless ``README.md`` was
written by hand, weights larger than ``max_shard_size`` are split into safetensors shards with an
index, and everything goes up in a single ``HfApi.upload_folder`` commit that also removes stale
weight files from the branch. The token comes from ``HF_TOKEN`` or the huggingface_hub login
(``hf auth login``); it is passed to huggingface_hub only, never written or printed. A Hub that
cannot be reached is a one-line ``UserError`` naming the endpoint.
"""

from __future__ import annotations

import errno
import glob
import importlib
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import UserError
from .folder_checks import check_model_folder
from .model_card import LOSS_CURVE_FILE, is_generated_card, write_model_card

if TYPE_CHECKING:  # huggingface_hub is imported where it is used, so `cellmae --help` stays fast
    from huggingface_hub import CommitInfo, HfApi

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
# OS errors that mean "this folder cannot be written" (not a missing input file).
CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise ValueError(f"max_shard_size={size!r} is not a size; write it like '5GB', '500MB' or a number of bytes")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def connection_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached (httpx, or httpx2 in newer releases)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def resolve_token(token: str | None = None) -> str:
    """The Hub token to use: the argument, else ``HF_TOKEN`` or the saved login; a clear error when none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            "no Hugging Face token found: log in with `hf auth login` or set the HF_TOKEN environment variable "
            "(a token with write access), then push again"
        )
    return token


@contextmanager
def sharded_copy(model_dir: Path, files: list[str], max_shard_size: int):
    """A temporary copy of the folder whose ``model.safetensors`` is split into shards + index.

    Non-weight files are hard-linked (copied across file systems), so the copy costs little disk.
    """
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="cellmae-push-") as staging:
        staging = Path(staging)
        for relative in files:
            if relative == "model.safetensors":
                continue
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(model_dir / relative, target)
            except OSError:
                shutil.copy2(model_dir / relative, target)
        state_dict = load_file(model_dir / "model.safetensors")
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(state_dict, staging, max_shard_size=max_shard_size, metadata={"format": "pt"})
        yield staging


def card_images(model_dir: Path) -> list[str]:
    """Images the generated card links to (written with it, e.g. the loss curve)."""
    return [LOSS_CURVE_FILE] if (model_dir / LOSS_CURVE_FILE).is_file() else []


def push_model_folder(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    exclude: list[str] | tuple[str, ...] = (),
    license: str | None = None,
    write_card: bool = True,
    token: str | None = None,
    allow_modified_code: bool = False,
) -> CommitInfo:
    """Check a model folder and upload it to ``repo_id`` in one commit; return the commit info.

    Args:
        model_dir: the saved model folder (``save_pretrained`` output plus training/evaluation files).
        repo_id: the Hub repo, "org/name"; created (``private`` or public) when it does not exist.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to, created from main when missing; main when None.
        commit_message: the commit title; a default names the model and hf_cellmae's version.
        max_shard_size: weights larger than this ("5GB", or bytes) are uploaded as safetensors shards.
        exclude: glob patterns of files in the folder not to upload.
        license: licence id for the generated card (default apache-2.0).
        write_card: regenerate ``README.md`` with the repo id (skipped when it was written by hand).
        token: a Hub token; when None, ``HF_TOKEN`` or the saved login. Never stored.
        allow_modified_code: upload ``*.py`` files that are not the installed hf_cellmae's own (logged as a
            warning naming them) instead of refusing the folder.

    Raises:
        FolderCheckError: the folder must not be pushed (each reason listed with its fix).
        PermissionError: no token is available.
        UserError: the Hub cannot be reached, or the card cannot be written into the folder.
    """
    model_dir = Path(model_dir)
    max_bytes = parse_size(max_shard_size)
    token = resolve_token(token)
    # A refused folder is left untouched.
    report = check_model_folder(model_dir, exclude=exclude, token=token, allow_modified_code=allow_modified_code)
    for what in report.modified_code.values():  # allowed, but never silently
        logger.warning("%s; uploading it as it is (--allow-modified-code)", what)
    readme = model_dir / "README.md"
    if write_card:
        if not readme.is_file() or is_generated_card(readme):
            try:
                write_model_card(model_dir, repo_id=repo_id, license=license)
            except OSError as error:
                if error.errno not in CANNOT_WRITE:
                    raise
                raise UserError(
                    f"cannot write the model card {readme}: {error.strerror or error}; make {model_dir} writable, or pass "
                    "--no-card (write_card=False) to upload the folder's README.md as it is"
                ) from error
            report.files = sorted({*report.files, "README.md", *card_images(model_dir)})
        else:
            logger.warning(
                "keeping the hand-written %s (delete it or run `cellmae card --force` to regenerate)", readme
            )

    from huggingface_hub import HfApi

    api = HfApi(token=token, library_name="hf_cellmae", library_version=__version__)
    try:
        return commit_folder(
            api, model_dir, report.files, report.weight_files, repo_id, private, revision, commit_message, max_bytes
        )
    except connection_errors() as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot reach the Hub at {api.endpoint} ({reason}); check your network connection and proxy, and HF_ENDPOINT "
            "if you set it, then push again"
        ) from error


def commit_folder(
    api: HfApi,
    model_dir: Path,
    files: list[str],
    weight_files: list[str],
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    max_bytes: int,
) -> CommitInfo:
    """Create the repo (and branch) if needed and upload ``files`` in one commit, sharded when larger than ``max_bytes``."""
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)

    title = commit_message or f"Upload {model_dir.resolve().name} with hf_cellmae {__version__}"
    description = "Files: " + ", ".join(files)
    needs_sharding = (
        weight_files == ["model.safetensors"] and (model_dir / "model.safetensors").stat().st_size > max_bytes
    )
    if needs_sharding:
        with sharded_copy(model_dir, files, max_bytes) as staging:
            staged = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
            return upload(api, staging, staged, repo_id, revision, title, description)
    return upload(api, model_dir, files, repo_id, revision, title, description)


def upload(
    api: HfApi, folder: Path, files: list[str], repo_id: str, revision: str | None, title: str, description: str
) -> CommitInfo:
    """One ``upload_folder`` commit of exactly ``files``; stale weight files on the branch are deleted in it."""
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message=title,
        commit_description=description,
        allow_patterns=[glob.escape(f) for f in files],
        delete_patterns=WEIGHT_PATTERNS,
    )
