"""Layouts (load_data CSV, TIFF stacks, patterns) and the shard writer (manifest, idempotence, --verify)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from hf_cellmae.data.layouts import discover_fields, discover_load_data, discover_pattern
from hf_cellmae.data.problems import ProblemLog
from hf_cellmae.data.shards import shard_folder, verify_shards
from hf_cellmae.data.streaming import stream_fields
from tests.helpers.data_fixtures import make_rxrx_plate


def _whole_fields(shard_dir):
    return {
        s["field_id"]: s
        for s in stream_fields(str(shard_dir), image_size=None, augment=False, standardize=False, shuffle=False)
    }


def test_load_data_csv_reads_channels_and_metadata(tmp_path):
    fields = make_rxrx_plate(tmp_path / "images", plates=1, wells=("B03",), sites=1)
    files = ",".join(f"B03_s1_w{c}.png,images/exp/Plate1" for c in (1, 2, 3))
    (tmp_path / "load_data.csv").write_text(
        "FileName_DNA,PathName_DNA,FileName_ER,PathName_ER,FileName_RNA,PathName_RNA,"
        "Metadata_Plate,Metadata_Well,Metadata_Site,Metadata_Compound\n" + files + ",P7,B03,1,DMSO\n"
    )
    (record,) = discover_load_data(tmp_path / "load_data.csv")
    assert (record.plate, record.well, record.site, record.channels) == ("P7", "B03", "1", ["DNA", "ER", "RNA"])
    assert record.metadata == {"Compound": "DMSO"}
    shard_folder(tmp_path / "load_data.csv", tmp_path / "shards", layout="load_data", num_workers=1, progress=False)
    (sample,) = _whole_fields(tmp_path / "shards").values()
    np.testing.assert_array_equal(sample["pixel_values"], fields["exp/Plate1/B03/s1"])
    assert sample["Compound"] == "DMSO"


def test_multipage_tiff_stack_keeps_every_channel(tmp_path):
    rng = np.random.default_rng(0)
    stacks = {}
    (tmp_path / "in").mkdir()
    for well in ("A01", "A02"):
        stacks[well] = rng.integers(0, 65535, size=(6, 32, 40), dtype=np.uint16)
        tifffile.imwrite(tmp_path / "in" / f"{well}.tiff", stacks[well], compression="zlib")
    manifest = shard_folder(tmp_path / "in", tmp_path / "shards", layout="stack", num_workers=1, progress=False)
    assert manifest["channels"] == [f"ch{c}" for c in range(1, 7)]
    samples = _whole_fields(tmp_path / "shards")
    for well, stack in stacks.items():
        np.testing.assert_array_equal(samples[f"in/{well}/s1"]["pixel_values"], stack)


def test_phenix_names_give_wells_from_row_and_column(tmp_path):
    for channel in (1, 2):
        tifffile.imwrite(tmp_path / f"r03c05f02p01-ch{channel}sk1fk1fl1.tiff", np.zeros((8, 8), np.uint16))
    (record,) = discover_pattern(tmp_path, "phenix")
    assert (record.well, record.site, record.tags, record.channels) == ("C05", "2", {"plane": "1"}, ["ch1", "ch2"])


def test_custom_pattern_with_named_groups(tmp_path):
    for channel in ("DAPI", "GFP"):
        tifffile.imwrite(tmp_path / f"scr1__H7__f4__{channel}.tif", np.zeros((8, 8), np.uint8))
    (record,) = discover_fields(
        tmp_path, layout="pattern", pattern=r"(?P<plate>\w+?)__(?P<well>\w+)__f(?P<site>\d+)__(?P<channel>\w+)\.tif"
    )
    assert (record.plate, record.well, record.site, record.channels) == ("scr1", "H07", "4", ["DAPI", "GFP"])


def test_undetectable_layout_is_a_clear_error(tmp_path):
    tifffile.imwrite(tmp_path / "whatever.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="--layout pattern --pattern REGEX"):
        discover_fields(tmp_path)


def test_manifest_counts_channels_dtypes_and_checksums(tmp_path):
    fields = make_rxrx_plate(tmp_path / "images", plates=2, wells=("A01", "A02"), sites=1)
    manifest = shard_folder(
        tmp_path / "images", tmp_path / "shards", target_shard_size=3 * 32 * 40 * 2 * 2, num_workers=1, progress=False
    )
    written = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert written == manifest
    assert manifest["num_fields"] == len(fields) == sum(s["num_fields"] for s in manifest["shards"])
    assert manifest["num_shards"] == 2 and manifest["channels"] == ["w1", "w2", "w3"]
    assert manifest["dtypes"] == {"uint16": 4} and manifest["shapes"] == {"3x32x40": 4}
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_rerun_reuses_finished_shards(tmp_path):
    make_rxrx_plate(tmp_path / "images", plates=2, wells=("A01", "A02"), sites=1)
    options = dict(target_shard_size=3 * 32 * 40 * 2 * 2, num_workers=1, progress=False)
    shard_folder(tmp_path / "images", tmp_path / "shards", **options)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("shard-*.parquet")}
    again = shard_folder(tmp_path / "images", tmp_path / "shards", **options)
    assert again["shards_reused"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("shard-*.parquet")} == stamps


def test_rerun_rewrites_a_shard_whose_file_is_gone(tmp_path):
    make_rxrx_plate(tmp_path / "images", plates=2, wells=("A01", "A02"), sites=1)
    options = dict(target_shard_size=3 * 32 * 40 * 2 * 2, num_workers=1, progress=False)
    shard_folder(tmp_path / "images", tmp_path / "shards", **options)
    (tmp_path / "shards" / "shard-00001.parquet").unlink()
    again = shard_folder(tmp_path / "images", tmp_path / "shards", **options)
    assert again["shards_reused"] == 1 and (tmp_path / "shards" / "shard-00001.parquet").is_file()


def test_verify_passes_on_intact_shards_and_finds_a_flipped_byte(tmp_path):
    make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=2)
    shard_folder(tmp_path / "images", tmp_path / "shards", num_workers=1, progress=False, verify=True)
    assert verify_shards(tmp_path / "shards", progress=False) == []
    path = tmp_path / "shards" / "shard-00000.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_shards(tmp_path / "shards", progress=False)
    assert problems and "sha256" in problems[0].reason


def test_parallel_writer_gives_the_same_shards_as_one_process(tmp_path):
    make_rxrx_plate(tmp_path / "images", plates=2, wells=("A01", "A02"), sites=1)
    options = dict(target_shard_size=3 * 32 * 40 * 2, progress=False)
    one = shard_folder(tmp_path / "images", tmp_path / "one", num_workers=1, **options)
    two = shard_folder(tmp_path / "images", tmp_path / "two", num_workers=2, **options)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


def _load_data_folder(root, path_name=None):
    """``root/ld/``: one B03 site (three PNGs) and ``load_data.csv`` naming them with FileName_ (+ PathName_)."""
    fields = make_rxrx_plate(root / "ld", plates=1, wells=("B03",), sites=1)
    for png in (root / "ld" / "exp" / "Plate1").glob("*.png"):
        png.rename(root / "ld" / png.name)
    columns = ",".join(f"FileName_w{c}" + (f",PathName_w{c}" if path_name is not None else "") for c in (1, 2, 3))
    values = ",".join(f"B03_s1_w{c}.png" + (f",{path_name}" if path_name is not None else "") for c in (1, 2, 3))
    (root / "ld" / "load_data.csv").write_text(
        f"{columns},Metadata_Plate,Metadata_Well,Metadata_Site\n{values},P1,B03,1\n"
    )
    return fields["exp/Plate1/B03/s1"]


def test_load_data_without_path_names_resolves_files_beside_a_relative_csv(tmp_path, monkeypatch):
    pixels = _load_data_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    manifest = shard_folder("ld/load_data.csv", "shards", layout="load_data", num_workers=1, progress=False)
    assert manifest["num_fields"] == 1 and manifest["skipped"] == []
    (sample,) = _whole_fields(tmp_path / "shards").values()
    np.testing.assert_array_equal(sample["pixel_values"], pixels)


def test_load_data_files_resolve_the_same_from_any_current_folder(tmp_path, monkeypatch):
    _load_data_folder(tmp_path)
    expected = [str(tmp_path / "ld" / f"B03_s1_w{c}.png") for c in (1, 2, 3)]
    for cwd, csv in (
        (tmp_path, "ld/load_data.csv"),
        (tmp_path / "ld", "load_data.csv"),
        (tmp_path / "ld", tmp_path / "ld" / "load_data.csv"),
    ):
        monkeypatch.chdir(cwd)
        (record,) = discover_load_data(csv)
        assert record.files == expected, (cwd, csv)


def test_load_data_relative_path_names_are_relative_to_the_csv_folder(tmp_path, monkeypatch):
    _load_data_folder(tmp_path, path_name=".")
    monkeypatch.chdir(tmp_path)
    (record,) = discover_load_data("ld/load_data.csv")
    assert record.files == [str(tmp_path / "ld" / f"B03_s1_w{c}.png") for c in (1, 2, 3)]


def test_load_data_absolute_path_names_are_used_as_they_are(tmp_path, monkeypatch):
    _load_data_folder(tmp_path, path_name=str(tmp_path / "ld"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (record,) = discover_load_data(tmp_path / "ld" / "load_data.csv")
    assert record.files == [str(tmp_path / "ld" / f"B03_s1_w{c}.png") for c in (1, 2, 3)]


def test_symlinked_plate_folder_is_followed(tmp_path):
    fields = make_rxrx_plate(tmp_path / "elsewhere", plates=1, wells=("A01", "A02"), sites=1)
    (tmp_path / "images" / "exp").mkdir(parents=True)
    (tmp_path / "images" / "exp" / "Plate1").symlink_to(
        tmp_path / "elsewhere" / "exp" / "Plate1", target_is_directory=True
    )
    problems = ProblemLog()
    records = discover_fields(tmp_path / "images", layout="rxrx", problems=problems)
    assert sorted(r.field_id for r in records) == sorted(fields) and len(problems) == 0


def test_a_symlink_loop_is_walked_once_and_reported(tmp_path):
    fields = make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=1)
    loop = tmp_path / "images" / "exp" / "Plate1" / "again"
    loop.symlink_to(tmp_path / "images" / "exp", target_is_directory=True)
    problems = ProblemLog()
    records = discover_fields(tmp_path / "images", layout="rxrx", problems=problems)
    assert [r.field_id for r in records] == list(fields)
    (problem,) = problems.problems
    assert problem.file == str(loop) and "already read" in problem.reason


def test_the_folder_cellmae_synthetic_writes_is_detected_and_read_from_its_root(tmp_path):
    from hf_cellmae.data.synthetic import make_synthetic_screen

    plate = make_synthetic_screen(
        tmp_path / "plate", num_plates=1, field_size=64, sites_per_well=1, num_workers=1, progress=False
    )
    problems = ProblemLog(on_error="fail")  # metadata.csv and relationships/*.csv sit beside the images
    from_root = discover_fields(tmp_path / "plate", problems=problems)
    from_images = discover_fields(plate["images"])
    assert len(from_root) == plate["num_fields"] and len(problems) == 0
    assert [r.field_id for r in from_root] == [r.field_id for r in from_images]


@pytest.mark.parametrize(
    "sidecar", ["metadata.csv", "README", "README.md", "notes.txt", "plate_map.json", "layout.tsv"]
)
def test_sidecar_tables_and_notes_beside_images_are_not_errors_under_fail(tmp_path, sidecar):
    fields = make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=1)
    (tmp_path / "images" / "exp" / "Plate1" / sidecar).write_text("plate,well\n")
    problems = ProblemLog(on_error="fail")
    assert len(discover_fields(tmp_path / "images", problems=problems)) == len(fields)
    assert len(problems) == 0


def test_an_image_that_does_not_fit_the_layout_is_still_a_stray_file_under_fail(tmp_path):
    make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=1)
    (tmp_path / "images" / "exp" / "Plate1" / "thumbnail.png").write_bytes(b"not read at discovery")
    with pytest.raises(ValueError, match="thumbnail.png"):
        discover_fields(tmp_path / "images", layout="rxrx", problems=ProblemLog(on_error="fail"))
