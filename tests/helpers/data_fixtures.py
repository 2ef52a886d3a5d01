"""Helpers for the data-stage tests: the shared real-data folder and tiny RxRx plates written on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_folder(name: str) -> Path:
    """``../shared/data/<name>`` beside the repo, or skip the test when it is absent."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real test data not found: {folder} (the shared data folder sits beside the repository)")
    return folder


def write_png(path: Path, plane: np.ndarray) -> None:
    import imagecodecs

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(imagecodecs.png_encode(plane))


def make_rxrx_plate(
    root: Path,
    plates: int = 2,
    wells: tuple[str, ...] = ("A01", "A02", "B01"),
    sites: int = 2,
    channels: int = 3,
    size: tuple[int, int] = (32, 40),  # at least the shard writer's default min_field_size
    dtype=np.uint16,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write random fields in the RxRx layout ``root/exp/Plate{n}/{well}_s{site}_w{c}.png``.

    Returns:
        ``{field_id: (C, H, W) array}`` of exactly what was written.
    """
    rng = np.random.default_rng(seed)
    fields = {}
    top = np.iinfo(dtype).max
    for plate in range(1, plates + 1):
        for well in wells:
            for site in range(1, sites + 1):
                pixels = rng.integers(0, top, size=(channels, *size), dtype=dtype)
                for c in range(channels):
                    write_png(root / "exp" / f"Plate{plate}" / f"{well}_s{site}_w{c + 1}.png", pixels[c])
                fields[f"exp/Plate{plate}/{well}/s{site}"] = pixels
    return fields


def write_plate_metadata(path: Path, fields: dict[str, np.ndarray]) -> None:
    """One row per site: experiment, plate, well, site, perturbation, is_control."""
    lines = ["experiment,plate,well,site,perturbation,is_control"]
    for index, field_id in enumerate(sorted(fields)):
        experiment, plate, well, site = field_id.split("/")
        control = index % 3 == 0
        lines.append(
            f"{experiment},{plate},{well},{site[1:]},{'non-targeting' if control else 'GENE' + str(index)},{control}"
        )
    path.write_text("\n".join(lines) + "\n")


def flip_pixel_byte(shard_path) -> str:
    """Flip one byte inside the first field's pixels of an uncompressed shard; returns that field's id."""
    import pyarrow.parquet as pq

    row = pq.read_table(shard_path, columns=["field_id", "pixels"]).to_pylist()[0]
    data = bytearray(shard_path.read_bytes())
    start = data.find(row["pixels"][:256])
    assert start > 0
    data[start + 100] ^= 0xFF
    shard_path.write_bytes(bytes(data))
    return row["field_id"]


def damage_page_header(shard_path) -> None:
    """Overwrite the bytes just before the first field's pixels: the data page header of the pixels column."""
    import pyarrow.parquet as pq

    row = pq.read_table(shard_path, columns=["pixels"]).to_pylist()[0]
    data = bytearray(shard_path.read_bytes())
    start = data.find(row["pixels"][:256])
    data[start - 24 : start] = b"\xff" * 24
    shard_path.write_bytes(bytes(data))


def flip_metadata_text(shard_path, old: str, new: str) -> str:
    """Replace ``old`` in the stored bytes of the first row's metadata JSON with ``new`` (same length), as a
    flipped byte on disk would, in the data page and in the column statistics that repeat the text; returns that
    field's id."""
    import pyarrow.parquet as pq

    assert len(old) == len(new)
    row = pq.read_table(shard_path, columns=["field_id", "metadata"]).to_pylist()[0]
    text = row["metadata"].encode()
    assert old in row["metadata"]
    data = shard_path.read_bytes()
    assert data.count(text) >= 1
    shard_path.write_bytes(data.replace(text, text.replace(old.encode(), new.encode(), 1)))
    return row["field_id"]
