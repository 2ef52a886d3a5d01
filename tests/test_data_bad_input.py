"""Messy folders: every bad input is named, then skipped and counted (--on-error skip) or raised (fail)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_cellmae.cli import main
from hf_cellmae.data.problems import BadInputError
from hf_cellmae.data.shards import shard_folder
from hf_cellmae.errors import UserError
from tests.helpers.data_fixtures import make_rxrx_plate, write_png


@pytest.fixture
def plate(tmp_path):
    fields = make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01", "A02"), sites=2)
    return tmp_path, fields


def _shard(tmp_path, on_error, **options):
    options.setdefault("max_skipped_share", 0.5)  # these tests break one of four fields on purpose
    return shard_folder(
        tmp_path / "images",
        tmp_path / "shards",
        layout="rxrx",
        on_error=on_error,
        num_workers=1,
        progress=False,
        **options,
    )


def _skipped(manifest, stage):
    return [p for p in manifest["skipped"] if p["stage"] == stage]


def test_stray_file_is_counted_as_skip(plate):
    tmp_path, fields = plate
    (tmp_path / "images" / "exp" / "Plate1" / "archive.zip").write_text(
        "not an image"
    )  # a note (.txt) would be a sidecar
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields)
    (problem,) = manifest["skipped"]
    assert problem["file"].endswith("archive.zip") and "stray file" in problem["reason"]


def test_stray_file_fails_under_fail_policy(plate):
    tmp_path, _ = plate
    (tmp_path / "images" / "exp" / "Plate1" / "archive.zip").write_text("not an image")
    with pytest.raises(BadInputError, match="archive.zip"):
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


def test_a_repaired_image_is_read_again_on_a_re_run_and_its_skip_goes_away(plate):
    tmp_path, fields = plate
    broken = tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png"
    _truncate(broken)
    assert _shard(tmp_path, "skip")["num_fields"] == len(fields) - 1
    write_png(broken, fields["exp/Plate1/A02/s1"][1])  # repaired as the message says
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields)
    assert manifest["skipped"] == []


def test_a_re_run_with_unchanged_inputs_reuses_every_shard(plate):
    tmp_path, _ = plate
    first = _shard(tmp_path, "skip")
    again = _shard(tmp_path, "skip")
    assert again["shards_reused"] == first["num_shards"] and again["shards"] == first["shards"]


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
    write_png(tmp_path / "images" / "exp" / "Plate1" / "A02_s2_w1.png", np.zeros((32, 40), np.uint8))
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


def test_skipping_more_than_five_percent_of_fields_fails_with_the_reasons_tallied(plate):
    tmp_path, _ = plate
    _truncate(tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png")
    with pytest.raises(
        UserError, match=r"skipped 1 of 4 fields \(25%\).*max_skipped_share=0.05.*1 x cannot read image"
    ) as error:
        shard_folder(tmp_path / "images", tmp_path / "shards", layout="rxrx", num_workers=1, progress=False)
    assert "--max-skipped-share" in str(error.value) and "\n" not in str(error.value)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_fields"] == 3 and manifest["skipped"][0]["field"] == "exp/Plate1/A02/s1"


def test_skipped_share_up_to_the_stated_limit_is_accepted(plate):
    tmp_path, fields = plate
    _truncate(tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png")
    manifest = _shard(tmp_path, "skip", max_skipped_share=0.25)
    assert manifest["num_fields"] == len(fields) - 1 and manifest["num_skipped"] == 1


def test_stray_files_are_not_lost_fields(plate):
    tmp_path, fields = plate
    for name in ("archive.zip", "thumbnail.jpg"):
        (tmp_path / "images" / "exp" / "Plate1" / name).write_text("not part of the layout")
    manifest = _shard(tmp_path, "skip", max_skipped_share=0.0)
    assert manifest["num_fields"] == len(fields) and manifest["num_skipped"] == 2


def test_a_run_that_writes_no_field_fails_even_when_every_skip_is_allowed(plate):
    tmp_path, _ = plate
    for png in (tmp_path / "images" / "exp" / "Plate1").glob("*_w1.png"):
        _truncate(png)
    with pytest.raises(UserError, match=r"wrote 0 fields.*4 x cannot read image"):
        _shard(tmp_path, "skip", max_skipped_share=1.0)
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["num_skipped"] == 4


def test_max_skipped_share_outside_zero_to_one_is_rejected(plate):
    tmp_path, _ = plate
    with pytest.raises(UserError, match="max_skipped_share=5"):
        _shard(tmp_path, "skip", max_skipped_share=5)


def test_shard_command_exits_non_zero_when_too_many_fields_are_skipped(plate, capsys):
    tmp_path, _ = plate
    _truncate(tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png")
    command = [
        "shard",
        str(tmp_path / "images"),
        str(tmp_path / "shards"),
        "--layout",
        "rxrx",
        "--num-workers",
        "1",
        "--quiet",
    ]
    assert main(command) != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "1 of 4 fields" in line and "--max-skipped-share" in line
    assert main(command + ["--max-skipped-share", "0.25"]) == 0


@pytest.fixture
def float_stacks(tmp_path):
    """Three 2-channel float32 TIFF stacks: A01 clean, A02 with a NaN in channel 2, A03 with +inf in channel 1."""
    import tifffile

    (tmp_path / "stacks").mkdir()
    for well, (channel, value) in {"A01": (0, 1.0), "A02": (1, np.nan), "A03": (0, np.inf)}.items():
        pixels = np.ones((2, 32, 40), np.float32)
        pixels[channel, 5, 7] = value
        tifffile.imwrite(tmp_path / "stacks" / f"{well}.tiff", pixels)
    return tmp_path


def _shard_stacks(tmp_path, on_error="skip", **options):
    return shard_folder(
        tmp_path / "stacks",
        tmp_path / "shards",
        layout="stack",
        on_error=on_error,
        num_workers=1,
        progress=False,
        **options,
    )


def test_non_finite_pixels_skip_their_field_and_name_field_and_file(float_stacks):
    manifest = _shard_stacks(float_stacks, max_skipped_share=1.0)
    assert manifest["num_fields"] == 1
    skipped = {p["field"]: p for p in _skipped(manifest, "read")}
    assert set(skipped) == {"stacks/A02/s1", "stacks/A03/s1"}
    for field, problem in skipped.items():
        well = field.split("/")[1]
        assert problem["file"].endswith(f"{well}.tiff") and f"{well}.tiff" in problem["reason"]
        assert "non-finite" in problem["reason"] and field in problem["reason"]
    assert "channel(s) ['ch2']" in skipped["stacks/A02/s1"]["reason"] and "NaN" in skipped["stacks/A02/s1"]["reason"]


def test_non_finite_pixels_fail_under_fail_policy(float_stacks):
    with pytest.raises(BadInputError, match=r"field stacks/A0[23]/s1 .*non-finite"):
        _shard_stacks(float_stacks, on_error="fail")


def test_non_finite_pixels_count_towards_the_skipped_share(float_stacks):
    with pytest.raises(UserError, match=r"skipped 2 of 3 fields.*non-finite"):
        _shard_stacks(float_stacks)


def _shrink_site(tmp_path, site="A01_s2", size=(16, 16)):
    for channel in (1, 2, 3):
        write_png(tmp_path / "images" / "exp" / "Plate1" / f"{site}_w{channel}.png", np.ones(size, np.uint16))


def test_fields_smaller_than_min_field_size_are_skipped_with_their_size(plate):
    tmp_path, fields = plate
    _shrink_site(tmp_path)
    manifest = _shard(tmp_path, "skip")
    assert manifest["num_fields"] == len(fields) - 1
    (problem,) = _skipped(manifest, "read")
    assert problem["field"] == "exp/Plate1/A01/s2" and problem["file"].endswith("A01_s2_w1.png")
    assert (
        "16x16" in problem["reason"]
        and "min_field_size=32" in problem["reason"]
        and "--min-field-size" in problem["reason"]
    )


def test_small_fields_fail_under_fail_policy(plate):
    tmp_path, _ = plate
    _shrink_site(tmp_path, size=(16, 48))
    with pytest.raises(BadInputError, match=r"exp/Plate1/A01/s2 is 16x48 px"):
        _shard(tmp_path, "fail")


def test_min_field_size_can_be_lowered(plate):
    tmp_path, fields = plate
    _shrink_site(tmp_path)
    manifest = _shard(tmp_path, "skip", min_field_size=16)
    assert manifest["num_fields"] == len(fields) and manifest["shapes"]["3x16x16"] == 1


def test_min_field_size_below_one_pixel_is_rejected(plate):
    tmp_path, _ = plate
    with pytest.raises(UserError, match="min_field_size=0"):
        _shard(tmp_path, "skip", min_field_size=0)


def test_shard_command_takes_min_field_size(plate):
    tmp_path, fields = plate
    _shrink_site(tmp_path)
    command = [
        "shard",
        str(tmp_path / "images"),
        str(tmp_path / "shards"),
        "--layout",
        "rxrx",
        "--num-workers",
        "1",
        "--quiet",
    ]
    assert main(command + ["--min-field-size", "16"]) == 0
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["num_fields"] == len(fields)


def test_a_skipped_field_names_the_broken_channels_file_in_the_manifest(plate):
    tmp_path, _ = plate
    _truncate(tmp_path / "images" / "exp" / "Plate1" / "A02_s1_w2.png")
    manifest = _shard(tmp_path, "skip")
    (problem,) = _skipped(manifest, "read")
    assert problem["file"].endswith("A02_s1_w2.png")


@pytest.mark.parametrize("suffix", ["tif", "jpg"])
def test_errors_never_echo_the_first_bytes_of_a_non_image_file(plate, suffix):
    tmp_path, _ = plate
    folder = tmp_path / "images" / "exp" / "Plate1"
    (folder / "A01_s1_w1.png").unlink()
    (folder / f"A01_s1_w1.{suffix}").write_text("API_TOKEN=hunter2-secret\n")
    with pytest.raises(BadInputError) as error:
        _shard(tmp_path, "fail")
    message = str(error.value)
    assert f"A01_s1_w1.{suffix}" in message and "\n" not in message
    for leak in ("API_", "hunter2", "0x41", "b'"):
        assert leak not in message


def test_shard_and_embed_into_an_unwritable_folder_fail_in_one_line_before_reading_images(tmp_path, capsys):
    """Issue 12 item 9: an output folder that cannot be written is refused up front, with the fix."""
    from hf_cellmae.cli import main
    from hf_cellmae.data.synthetic import make_synthetic_screen

    plate = make_synthetic_screen(
        tmp_path / "plate",
        num_plates=1,
        field_size=32,
        num_pathways=1,
        complexes_per_pathway=1,
        genes_per_complex=2,
        control_wells_per_plate=1,
        sites_per_well=1,
        num_workers=1,
        progress=False,
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # unwritable for every user, root included (a read-only mount behaves alike)
    for argv in (
        ["shard", str(plate["images"]), str(blocker / "shards")],
        ["embed", "pixel_stats", str(plate["images"]), str(blocker / "emb"), "--no-progress"],
    ):
        code = main(argv)
        error = capsys.readouterr().err.strip()
        assert code != 0 and len(error.splitlines()) == 1 and "cannot write" in error, (argv, error)
    assert not any(blocker.parent.glob("**/*.parquet"))


def test_a_binary_metadata_table_is_refused_without_quoting_its_bytes(tmp_path):
    """Issue 12 item 10: error messages never echo a file's bytes (a mistaken 'CSV' can hold secrets)."""
    import pytest

    from hf_cellmae.data.metadata import read_metadata_table

    table = tmp_path / "plate_map.csv"
    table.write_bytes(b"AWS_SECRET=\x89\xfe\xff" * 20)
    with pytest.raises(ValueError) as raised:
        read_metadata_table(table)
    message = str(raised.value)
    assert "not UTF-8" in message and "0x89" not in message and "\\x89" not in message and "AWS_SECRET" not in message
