"""Messy folders: every bad input is named, then skipped and counted (--on-error skip) or raised (fail)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_fixtures import make_rxrx_plate, write_png
from hf_cellmae.data.problems import BadInputError
from hf_cellmae.data.shards import shard_folder


@pytest.fixture
def plate(tmp_path):
    fields = make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01", "A02"), sites=2)
    return tmp_path, fields


def _shard(tmp_path, on_error, **options):
    return shard_folder(tmp_path / "images", tmp_path / "shards", layout="rxrx", on_error=on_error, num_workers=1, progress=False, **options)


def _skipped(manifest, stage):
    return [p for p in manifest["skipped"] if p["stage"] == stage]


def test_stray_file_is_counted_as_skip(plate):
    tmp_path, fields = plate
    (tmp_path / "images" / "exp" / "Plate1" / "notes.txt").write_text("not an image")
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields)
    (problem,) = manifest["skipped"]
    assert problem["file"].endswith("notes.txt") and "stray file" in problem["reason"]


def test_stray_file_fails_under_fail_policy(plate):
    tmp_path, _ = plate
    (tmp_path / "images" / "exp" / "Plate1" / "notes.txt").write_text("not an image")
    with pytest.raises(BadInputError, match="notes.txt"):
        _shard(tmp_path, "fail")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_truncated_image_skips_its_field_and_names_the_file(plate):
    tmp_path, fields = plate
    _truncate(tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png")
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields) - 1
    (problem,) = _skipped(manifest, "read")
    assert problem["field"] == "exp/Plate1/A02/s1" and "A02_s1_w2.png" in problem["reason"]


def test_truncated_image_fails_under_fail_policy(plate):
    tmp_path, _ = plate
    _truncate(tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png")
    with pytest.raises(BadInputError, match="A02_s1_w2.png"):
        _shard(tmp_path, "fail")


def test_corrupt_image_bytes_are_reported(plate):
    tmp_path, fields = plate
    (tmp_path / "images" / "exp" / "Plate1" / "A01_s2_w1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields) - 1
    assert "A01_s2_w1.png" in _skipped(manifest, "read")[0]["reason"]


def test_site_missing_a_channel_is_skipped_and_named(plate):
    tmp_path, fields = plate
    (tmp_path / "images" / "exp" / "Plate1" / "A01_s1_w3.png").unlink()
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields) - 1
    (problem,) = _skipped(manifest, "discover")
    assert problem["field"] == "exp/Plate1/A01/s1" and "missing channel(s) ['w3']" in problem["reason"]


def test_site_missing_a_channel_fails_under_fail_policy(plate):
    tmp_path, _ = plate
    (tmp_path / "images" / "exp" / "Plate1" / "A01_s1_w3.png").unlink()
    with pytest.raises(BadInputError, match="missing channel"):
        _shard(tmp_path, "fail")


def test_mixed_sizes_within_a_site_are_reported(plate):
    tmp_path, fields = plate
    write_png(tmp_path / "images" / "exp" / "Plate1" / "A01_s1_w2.png", np.zeros((10, 10), np.uint16))
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields) - 1
    reason = _skipped(manifest, "read")[0]["reason"]
    assert "A01_s1_w2.png" in reason and "10x10" in reason


def test_mixed_dtypes_within_a_site_are_reported(plate):
    tmp_path, _ = plate
    write_png(tmp_path / "images" / "exp" / "Plate1" / "A02_s2_w1.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(BadInputError, match="uint8"):
        _shard(tmp_path, "fail")


def test_unreadable_metadata_rows_are_counted(plate):
    tmp_path, fields = plate
    table = tmp_path / "metadata.csv"
    table.write_text("plate,well,site,perturbation\nPlate1,A01,1,GENE1\n,A02,1,GENE2\nPlate1,,2,GENE3\n")
    manifest = _shard(tmp_path, "skip", metadata=table)
    assert manifest["num_fields"] == len(fields)
    assert manifest["metadata"]["unreadable_rows"] == 2
    assert sorted(p["file"] for p in _skipped(manifest, "metadata")) == [f"{table}:3", f"{table}:4"]


def test_unreadable_metadata_row_fails_under_fail_policy(plate):
    tmp_path, _ = plate
    table = tmp_path / "metadata.csv"
    table.write_text("plate,well,site,perturbation\n,A02,1,GENE2\n")
    with pytest.raises(BadInputError, match="metadata.csv:2"):
        _shard(tmp_path, "fail", metadata=table)


def test_skips_are_listed_in_the_written_manifest(plate):
    tmp_path, _ = plate
    (tmp_path / "images" / "exp" / "Plate1" / "A01_s1_w3.png").unlink()
    _truncate(tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png")
    _shard(tmp_path, "skip")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_skipped"] == 2 and {p["stage"] for p in manifest["skipped"]} == {"discover", "read"}


def test_unknown_on_error_policy_is_rejected(plate):
    tmp_path, _ = plate
    with pytest.raises(ValueError, match="on_error='ignore'"):
        _shard(tmp_path, "ignore")
