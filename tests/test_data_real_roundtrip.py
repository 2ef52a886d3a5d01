"""Real plates: layout -> shards -> stream gives pixel-exact fields (original bit depth, every channel)
and the metadata joined from the folder's table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from hf_cellmae.data.shards import shard_folder
from hf_cellmae.data.streaming import stream_fields
from tests.helpers.data_fixtures import shared_folder


def _direct_read(path: str) -> np.ndarray:
    """An independent reader: tifffile for TIFF, Pillow for PNG."""
    if path.lower().endswith((".tif", ".tiff")):
        return tifffile.imread(path)
    return np.array(Image.open(path))


def _stream_whole_fields(shard_dir) -> dict[str, dict]:
    stream = stream_fields(str(shard_dir), image_size=None, augment=False, standardize=False, shuffle=False)
    return {sample["field_id"]: sample for sample in stream}


def _assert_pixel_exact(sample: dict, files: list[str]) -> None:
    expected = np.stack([_direct_read(path) for path in files])
    assert sample["pixel_values"].dtype == expected.dtype
    assert sample["pixel_values"].shape == expected.shape
    np.testing.assert_array_equal(sample["pixel_values"], expected)


def test_bbbc022_tiff_pattern_layout_round_trips_pixel_exact(tmp_path):
    source = shared_folder("cellpainting_bbbc022")
    manifest = shard_folder(
        source / "images",
        tmp_path,
        metadata=source / "metadata.csv",
        num_workers=1,
        progress=False,
        fields_per_row_group=3,
    )
    samples = _stream_whole_fields(tmp_path)
    assert len(samples) == 10 and manifest["dtypes"] == {"uint16": 10}
    assert manifest["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]  # the table's compartment, not its stain column
    for field_id, sample in samples.items():
        plate, well, site = field_id.split("/")
        files = [str(source / "images" / f"{plate}_{well}_site{site[1:]}_Ch{c}.tif") for c in range(1, 6)]
        _assert_pixel_exact(sample, files)
        assert json.loads(sample["compartment"]) == ["DNA", "ER", "RNA", "AGP", "Mito"]


def test_jump_rab30_png_rxrx_layout_round_trips_with_metadata(tmp_path):
    source = shared_folder("cellpainting_jump_rab30")
    shard_folder(
        source,
        tmp_path,
        layout="rxrx",
        metadata=source / "metadata.csv",
        num_workers=1,
        progress=False,
        channel_names=["AGP", "DNA", "ER", "Mito", "RNA"],
    )
    samples = _stream_whole_fields(tmp_path)
    assert sorted(samples) == ["BR00123947/G01/s1", "CP-CC9-R1-05/L07/s0"]
    for field_id, sample in samples.items():
        plate, well, site = field_id.split("/")
        _assert_pixel_exact(sample, [str(source / plate / f"{well}_{site}_w{c}.png") for c in range(1, 6)])
        assert sample["gene"] == "RAB30"
    assert samples["BR00123947/G01/s1"]["modality"] == "ORF"
    assert samples["CP-CC9-R1-05/L07/s0"]["batch"] == "20220914_Run1"


def test_six_channel_lzw_tiff_site_keeps_all_six_channels(tmp_path):
    source = shared_folder("cellpainting_6ch_pediatric")
    manifest = shard_folder(
        source / "images",
        tmp_path,
        layout="pattern",
        pattern="phenix",
        metadata=source / "metadata.csv",
        num_workers=1,
        progress=False,
    )
    assert manifest["channels"] == [
        "Brightfield",
        "ER",
        "AGP",
        "Mito",
        "DNA",
        "RNA",
    ]  # named by metadata.csv, per file
    assert manifest["channel_map"]["ch1"] == "Brightfield"
    (sample,) = _stream_whole_fields(tmp_path).values()
    _assert_pixel_exact(sample, [str(source / "images" / f"r03c03f03p01-ch{c}sk1fk1fl1.tiff") for c in range(1, 7)])
    assert json.loads(sample["compartment"]) == ["Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"]


def test_example_human_8bit_stays_8bit(tmp_path):
    source = shared_folder("example_human_3ch")
    manifest = shard_folder(source / "images", tmp_path, num_workers=1, progress=False)
    assert manifest["dtypes"] == {"uint8": 1}
    (sample,) = _stream_whole_fields(tmp_path).values()
    assert sample["well"] == "D03"
    _assert_pixel_exact(sample, [str(source / "images" / f"AS_09125_050116030001_D03f00d{c}.tif") for c in range(3)])


@pytest.mark.parametrize("folder", ["cellpainting_bbbc022"])
def test_real_folder_text_file_beside_the_images_is_a_note_not_an_error(tmp_path, folder):
    source = shared_folder(folder)
    assert (source / "images" / "Not_an_Image.txt").is_file()
    manifest = shard_folder(source / "images", tmp_path, num_workers=1, progress=False, on_error="fail")
    assert manifest["num_skipped"] == 0 and manifest["num_fields"] > 0
