"""Integrity on read: a corrupt shard is caught by the stream and the shard writer, never used silently."""

from __future__ import annotations

import warnings

import pytest

from hf_cellmae.data.problems import BadInputError
from hf_cellmae.data.shards import shard_folder, verify_shards
from hf_cellmae.data.streaming import CorruptFieldWarning, skipped_fields, stream_fields
from tests.helpers.data_fixtures import (
    damage_page_header,
    flip_metadata_text,
    flip_pixel_byte,
    make_rxrx_plate,
    write_plate_metadata,
)

SHARD_OPTIONS = dict(layout="rxrx", target_shard_size=3 * 32 * 40 * 2 * 2, num_workers=1, progress=False)


@pytest.fixture
def shards(tmp_path):
    """Four 3 x 32 x 40 fields in two shards of two fields."""
    fields = make_rxrx_plate(tmp_path / "images", plates=2, wells=("A01", "A02"), sites=1)
    shard_folder(tmp_path / "images", tmp_path / "shards", **SHARD_OPTIONS)
    return tmp_path, fields


def _read_all(shard_dir, **options):
    return list(stream_fields(str(shard_dir), image_size=16, shuffle=False, augment=False, **options))


def test_stream_fails_on_a_flipped_pixel_byte_naming_shard_and_field(shards):
    tmp_path, _ = shards
    field_id = flip_pixel_byte(tmp_path / "shards" / "shard-00000.parquet")
    with pytest.raises(
        BadInputError,
        match=f"field {field_id} in shard .*shard-00000.parquet fails its CRC-32 check.*re-run the same `cellmae shard`",
    ):
        _read_all(tmp_path / "shards")


def test_stream_skips_counts_and_warns_about_a_corrupt_field_under_skip(shards):
    tmp_path, fields = shards
    field_id = flip_pixel_byte(tmp_path / "shards" / "shard-00000.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = _read_all(tmp_path / "shards", on_error="skip")
    assert sorted(s["field_id"] for s in samples) == sorted(set(fields) - {field_id})
    assert [str(w.message) for w in caught if issubclass(w.category, CorruptFieldWarning)] and field_id in str(
        caught[0].message
    )
    assert any(skip["field"] == field_id and skip["file"].endswith("shard-00000.parquet") for skip in skipped_fields())


def test_stream_names_the_shard_and_the_repair_when_parquet_structure_is_damaged(shards):
    tmp_path, _ = shards
    damage_page_header(tmp_path / "shards" / "shard-00001.parquet")
    with pytest.raises(
        BadInputError, match=r"cannot read shard .*shard-00001.parquet .*re-run the same `cellmae shard`.*--verify"
    ):
        _read_all(tmp_path / "shards")


def test_shard_rerun_rewrites_a_shard_whose_checksum_differs_from_the_manifest(shards):
    tmp_path, _ = shards
    flip_pixel_byte(tmp_path / "shards" / "shard-00000.parquet")
    again = shard_folder(tmp_path / "images", tmp_path / "shards", **SHARD_OPTIONS)
    assert again["shards_reused"] == 1
    assert verify_shards(tmp_path / "shards", progress=False) == []


def test_verify_failure_says_how_to_repair(shards, monkeypatch):
    import hf_cellmae.data.shards as shards_module

    tmp_path, _ = shards
    real_verify = shards_module.verify_shards

    def verify_after_damage(shard_dir, progress=True):  # the disk damages a shard between writing and --verify
        flip_pixel_byte(tmp_path / "shards" / "shard-00000.parquet")
        return real_verify(shard_dir, progress)

    monkeypatch.setattr(shards_module, "verify_shards", verify_after_damage)
    with pytest.raises(BadInputError, match="to repair, re-run the same `cellmae shard` command"):
        shard_folder(tmp_path / "images", tmp_path / "shards", verify=True, **SHARD_OPTIONS)


def test_stream_under_skip_resumes_at_the_exact_sample(shards):
    tmp_path, _ = shards
    flip_pixel_byte(tmp_path / "shards" / "shard-00000.parquet")
    options = dict(image_size=16, crops_per_field=3, on_error="skip", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptFieldWarning)
        full = [(s["field_id"], s["crop_index"]) for s in stream_fields(str(tmp_path / "shards"), **options)]
        stream = stream_fields(str(tmp_path / "shards"), **options)
        iterator = iter(stream)
        head = [next(iterator) for _ in range(4)]
        state = stream.state_dict()
        resumed = stream_fields(str(tmp_path / "shards"), **options)
        resumed.load_state_dict(state)
        rest = [(s["field_id"], s["crop_index"]) for s in resumed]
    assert [(s["field_id"], s["crop_index"]) for s in head] + rest == full and len(full) == 3 * 3


def test_verify_reports_a_damaged_parquet_structure_in_one_line(shards):
    tmp_path, _ = shards
    damage_page_header(tmp_path / "shards" / "shard-00001.parquet")
    problems = verify_shards(tmp_path / "shards", progress=False)
    unreadable = [p for p in problems if p.reason.startswith("cannot read shard")]
    assert unreadable and unreadable[0].file.endswith("shard-00001.parquet")
    assert all("\n" not in p.message() and "\x0f" not in p.message() for p in problems)


@pytest.fixture
def shards_with_metadata(tmp_path):
    """Four fields in two shards, joined with a metadata table (perturbation GENE<n> or non-targeting)."""
    fields = make_rxrx_plate(tmp_path / "images", plates=2, wells=("A01", "A02"), sites=1)
    write_plate_metadata(tmp_path / "metadata.csv", fields)
    shard_folder(tmp_path / "images", tmp_path / "shards", metadata=tmp_path / "metadata.csv", **SHARD_OPTIONS)
    return tmp_path, fields


def _flip_first_metadata(shard_path) -> str:
    """Turn the first field's is_control flag (or a GENE number) into another value of the same length."""
    import pyarrow.parquet as pq

    text = pq.read_table(shard_path, columns=["metadata"]).to_pylist()[0]["metadata"]
    old = "true" if "true" in text else "GENE"
    return flip_metadata_text(shard_path, old, "tru3" if old == "true" else "GENF")


def test_stream_fails_on_a_changed_metadata_byte_naming_shard_and_field(shards_with_metadata):
    tmp_path, _ = shards_with_metadata
    field_id = _flip_first_metadata(tmp_path / "shards" / "shard-00000.parquet")
    with pytest.raises(
        BadInputError,
        match=f"field {field_id} in shard .*shard-00000.parquet fails its row checksum.*re-run the same `cellmae shard`",
    ):
        _read_all(tmp_path / "shards")


def test_stream_skips_and_counts_a_field_whose_metadata_changed_under_skip(shards_with_metadata):
    tmp_path, fields = shards_with_metadata
    field_id = _flip_first_metadata(tmp_path / "shards" / "shard-00000.parquet")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        samples = _read_all(tmp_path / "shards", on_error="skip")
    assert sorted(s["field_id"] for s in samples) == sorted(set(fields) - {field_id})
    assert any(skip["field"] == field_id and skip["reason"] == "row checksum mismatch" for skip in skipped_fields())


def test_verify_lists_a_field_whose_metadata_changed(shards_with_metadata):
    tmp_path, _ = shards_with_metadata
    field_id = _flip_first_metadata(tmp_path / "shards" / "shard-00000.parquet")
    found = verify_shards(tmp_path / "shards", progress=False)
    assert [(p.field, p.reason) for p in found if p.field] == [
        (field_id, "row checksum mismatch (metadata or identity columns changed)")
    ]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_embed_from_shards_checks_each_rows_metadata(shards_with_metadata, on_error):
    from hf_cellmae.evaluation.embed import PixelStatsFeaturizer, embed_dataset

    tmp_path, fields = shards_with_metadata
    field_id = _flip_first_metadata(tmp_path / "shards" / "shard-00000.parquet")
    if on_error == "fail":
        with pytest.raises(BadInputError, match=f"field {field_id} in shard .*fails its row checksum"):
            embed_dataset(
                tmp_path / "shards", tmp_path / "emb", PixelStatsFeaturizer(), progress=False, on_error=on_error
            )
        return
    info = embed_dataset(
        tmp_path / "shards", tmp_path / "emb", PixelStatsFeaturizer(), progress=False, on_error=on_error
    )
    assert info["num_rows"] == len(fields) - 1
    assert [skip["field"] for skips in info["skipped"].values() for skip in skips] == [field_id]
