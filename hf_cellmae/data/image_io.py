"""Reading microscopy image files at their original bit depth, never dropping a channel.

TIFF goes through ``tifffile`` (+ ``imagecodecs`` for LZW/zlib/JPEG...), PNG through ``imagecodecs``
(16-bit stays 16-bit), anything else through ``imagecodecs.imread``. Pillow is not used for TIFF:
it returns the first page of a multi-page file only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .problems import BadInputError
from .records import FieldRecord

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".bmp", ".webp")


def is_image_path(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def _read_tiff(path: str, data: bytes | None = None) -> tuple[np.ndarray, str]:
    import io

    import tifffile

    with tifffile.TiffFile(io.BytesIO(data) if data is not None else path) as tif:
        if not tif.series:
            raise BadInputError(f"{path}: TIFF holds no image series; replace the file or remove it", file=path)
        series = tif.series[0]
        return series.asarray(), series.axes


def _remote_bytes(path: str, storage_options) -> bytes:
    """An object's bytes (``hf_cellmae.data.remote``: retried on transient errors); a missing one is a bad input."""
    from .remote import read_bytes

    try:
        return read_bytes(path, storage_options)
    except FileNotFoundError as error:
        raise BadInputError(
            f"cannot read image {path}: {error}; upload it or remove it from the input", file=path
        ) from None


def read_stack(path: str | Path, storage_options: dict | None = None) -> np.ndarray:
    """Read a multi-channel image file as ``(C, H, W)`` at its stored dtype.

    Multi-page TIFF pages, ImageJ/OME channel axes and RGB-like sample axes all become channels
    (every axis that is not Y or X is folded into C, in file order). ``path`` may be an fsspec URL
    (``s3://...``; ``storage_options`` are the protocol's options): its bytes are read with retries.
    """
    from .remote import is_url

    path = str(path)
    data = _remote_bytes(path, storage_options) if is_url(path) else None
    try:
        if path.lower().endswith((".tif", ".tiff")):
            array, axes = _read_tiff(path, data)
            if axes.endswith("S") and array.ndim >= 3:  # (..., Y, X, S) samples per pixel -> (..., S, Y, X)
                array = np.moveaxis(array, -1, -3)
        else:
            import imagecodecs

            if path.lower().endswith(".png"):
                if data is None:
                    with open(path, "rb") as handle:
                        data = handle.read()
                array = imagecodecs.png_decode(data)
            else:
                array = imagecodecs.imread(data if data is not None else path)
            if array.ndim == 3:  # (H, W, S) colour -> (S, H, W)
                array = np.moveaxis(array, -1, 0)
    except BadInputError:
        raise
    except Exception as error:  # corrupt or truncated files raise many different types
        # The decoders' own text can quote the file's first bytes (header=b'...', "starts with 0x41 0x57"): a
        # non-image file may hold secrets, so only the error type is kept.
        raise BadInputError(
            f"cannot read image {path} ({type(error).__name__}): the file is truncated, corrupt or not a "
            f"{Path(path).suffix.lstrip('.').upper() or 'known'} image; replace it or remove it",
            file=path,
        ) from None
    if array.ndim < 2:
        raise BadInputError(f"{path}: expected an image, got an array of shape {array.shape}", file=path)
    return np.ascontiguousarray(array.reshape((-1,) + array.shape[-2:]))  # (C, H, W)


def read_plane(path: str | Path, storage_options: dict | None = None) -> np.ndarray:
    """Read a single-channel image file (or URL) as ``(H, W)`` at its stored dtype (uint8, uint16, ...)."""
    stack = read_stack(path, storage_options)
    if stack.shape[0] != 1:
        raise BadInputError(
            f"{path}: expected one channel per file but found {stack.shape[0]} planes of {stack.shape[1:]}; "
            "for multi-channel files use the 'stack' layout",
            file=str(path),
        )
    return stack[0]


def read_field(record: FieldRecord, storage_options: dict | None = None) -> np.ndarray:
    """Read every channel of a field of view and stack them: ``(C, H, W)`` in the stored dtype.

    Files that are fsspec URLs are read with ``storage_options`` (see :mod:`~hf_cellmae.data.remote`).

    Raises ``BadInputError`` naming the file when a file is unreadable, when channels differ in
    size or dtype, or when a stack's channel count does not match ``record.channels``.
    """
    if record.stack:
        pixels = read_stack(record.files[0], storage_options)
        if len(record.channels) and pixels.shape[0] != len(record.channels):
            raise BadInputError(
                f"{record.files[0]}: stack has {pixels.shape[0]} channels but {len(record.channels)} channel names "
                f"were given ({record.channels}); fix the channel names",
                file=record.files[0],
            )
        return pixels
    planes = [read_plane(path, storage_options) for path in record.files]
    first_shape, first_dtype = planes[0].shape, planes[0].dtype
    for name, path, plane in zip(record.channels, record.files, planes):
        if plane.shape != first_shape or plane.dtype != first_dtype:
            raise BadInputError(
                f"field {record.field_id}: channel {name} ({path}) is {plane.shape[0]}x{plane.shape[1]} {plane.dtype} "
                f"but channel {record.channels[0]} ({record.files[0]}) is {first_shape[0]}x{first_shape[1]} {first_dtype}; "
                "all channels of a site must share size and dtype",
                file=path,
            )
    return np.stack(planes)  # (C, H, W)
