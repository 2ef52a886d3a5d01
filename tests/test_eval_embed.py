"""`cellmae embed`: fields -> Parquet with Metadata_* + feature columns, tiling, resume, shards, real data."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from hf_cellmae.evaluation.embed import ModelFeaturizer, PixelStatsFeaturizer, embed_dataset
from hf_cellmae.evaluation.pixel_stats import pixel_statistics
from hf_cellmae.evaluation.report import read_embeddings

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WELLS = ["A01", "A02", "B01", "B02", "C01"]


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """Five 3-channel uint16 fields of 64 x 128 px (two 64 px tiles each) + a metadata table."""
    root = tmp_path_factory.mktemp("plate")
    rng = np.random.default_rng(0)
    for well in WELLS:
        for channel in (1, 2, 3):
            tifffile.imwrite(
                root / f"plate1_{well}_site1_Ch{channel}.tif", rng.integers(0, 4000, (64, 128), dtype=np.uint16)
            )
    metadata = root.parent / f"{root.name}_metadata.csv"
    pd.DataFrame(
        {
            "plate": "plate1",
            "well": WELLS,
            "perturbation": ["g1", "g2", "g3", "ctrl", "ctrl"],
            "is_control": [False, False, False, True, True],
        }
    ).to_csv(metadata, index=False)
    return root, metadata


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    folder = tmp_path_factory.mktemp("tiny_model")
    CellMAEForPreTraining(CellMAEConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


class CountingFeaturizer(PixelStatsFeaturizer):
    """Pixel statistics that count fields seen and can fail after a number of fields."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.seen, self.fail_after = 0, fail_after

    def __call__(self, fields):
        if self.fail_after is not None and self.seen + len(fields) > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.seen += len(fields)
        return super().__call__(fields)


def test_model_embeddings_are_tile_means_with_metadata_columns(plate, tiny_model, tmp_path):
    import torch

    from hf_cellmae import CellMAEImageProcessor, CellMAEModel

    root, metadata = plate
    featurizer = ModelFeaturizer(tiny_model, batch_size=3, readout="mean")
    embed_dataset(root, tmp_path / "emb", featurizer, metadata=metadata, progress=False)
    table = read_embeddings(tmp_path / "emb")
    assert table["Metadata_well"].tolist() == WELLS
    assert table["Metadata_perturbation"].tolist() == ["g1", "g2", "g3", "ctrl", "ctrl"]
    assert table["Metadata_num_crops"].tolist() == [2] * 5
    features = table[[c for c in table.columns if not c.startswith("Metadata_")]].to_numpy()
    assert features.shape == (5, featurizer.config.hidden_size)
    # Direct computation for the first field: both 64 px tiles through the encoder, averaged.
    pixels = np.stack([tifffile.imread(root / f"plate1_A01_site1_Ch{c}.tif") for c in (1, 2, 3)])
    crops = CellMAEImageProcessor(image_size=64, crop_mode="tile")(pixels, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = CellMAEModel.from_pretrained(tiny_model)(crops).pooler_output.mean(0).numpy()
    np.testing.assert_allclose(features[0], expected, rtol=1e-4, atol=1e-5)


def test_channelwise_embeddings_have_one_block_per_channel(plate, tiny_model, tmp_path):
    root, _ = plate
    featurizer = ModelFeaturizer(tiny_model, channelwise=True)
    embed_dataset(root, tmp_path / "emb", featurizer, progress=False)
    table = read_embeddings(tmp_path / "emb")
    width = featurizer.config.hidden_size
    features = table[[c for c in table.columns if not c.startswith("Metadata_")]].to_numpy()
    assert features.shape == (5, 3 * width)
    feature_columns = [c for c in table.columns if not c.startswith("Metadata_")]
    assert feature_columns[0] == "Ch1_feature_000" and feature_columns[-1] == f"Ch3_feature_{width - 1:03d}"


def test_the_default_readout_is_channelwise_the_one_the_evidence_evaluates(plate, tiny_model, tmp_path, capsys):
    """`cellmae embed` with no read-out option: one mean token per stain, concatenated (docs/evidence.md, section 3)."""
    import torch

    from hf_cellmae import CellMAEImageProcessor, CellMAEModel
    from hf_cellmae.cli import main

    root, _ = plate
    assert main(["embed", str(tiny_model), str(root), str(tmp_path / "emb"), "--no-progress", "--by-position"]) == 0
    table = read_embeddings(tmp_path / "emb")
    features = table[[c for c in table.columns if not c.startswith("Metadata_")]]
    width = CellMAEModel.from_pretrained(tiny_model).config.hidden_size
    assert features.shape == (5, 3 * width) and features.columns[0] == "Ch1_feature_000"
    pixels = np.stack([tifffile.imread(root / f"plate1_A01_site1_Ch{c}.tif") for c in (1, 2, 3)])
    crops = CellMAEImageProcessor(image_size=64, crop_mode="tile")(pixels, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = CellMAEModel.from_pretrained(tiny_model)(crops, output_channelwise_embeddings=True)
    np.testing.assert_allclose(
        features.to_numpy()[0], out.channelwise_embeddings.mean(0).flatten().numpy(), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("readout, layer", [("cls", None), ("mean_std", None), ("mean", 2), ("channelwise", -1)])
def test_each_readout_is_the_documented_function_of_the_tokens(plate, tiny_model, readout, layer):
    import torch

    from hf_cellmae import CellMAEImageProcessor, CellMAEModel
    from hf_cellmae.evaluation.embed import Field

    root, _ = plate
    pixels = np.stack([tifffile.imread(root / f"plate1_A01_site1_Ch{c}.tif") for c in (1, 2, 3)])
    featurizer = ModelFeaturizer(tiny_model, readout=readout, layer=layer)
    features, counts = featurizer([Field(pixels, ["Ch1", "Ch2", "Ch3"], {})])
    assert features.shape[1] == len(featurizer.feature_names(["Ch1", "Ch2", "Ch3"]))
    crops = CellMAEImageProcessor(image_size=64, crop_mode="tile")(pixels, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = CellMAEModel.from_pretrained(tiny_model)(crops, output_hidden_states=True)
    tokens = out.last_hidden_state if layer is None else out.hidden_states[layer % 5]  # (2, 1 + 3*64, D), 4 blocks
    expected = (
        {
            "cls": lambda t: t[:, 0],
            "mean_std": lambda t: torch.cat([t[:, 1:].mean(1), t[:, 1:].std(1)], 1),
            "mean": lambda t: t[:, 1:].mean(1),
            "channelwise": lambda t: t[:, 1:].reshape(2, 3, -1, t.shape[-1]).mean(2).flatten(1),
        }[readout](tokens)
        .mean(0)
        .numpy()
    )
    np.testing.assert_allclose(features[0], expected, rtol=1e-4, atol=1e-5)


def test_unknown_readout_or_layer_is_refused_with_the_choices(tiny_model):
    with pytest.raises(ValueError, match="readout='max'"):
        ModelFeaturizer(tiny_model, readout="max")
    with pytest.raises(ValueError, match="layer=9 is outside the encoder's blocks 1..4"):
        ModelFeaturizer(tiny_model, layer=9)


def test_interrupted_run_resumes_without_redoing_finished_parts(plate, tmp_path):
    root, metadata = plate
    out = tmp_path / "emb"
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(
            root,
            out,
            CountingFeaturizer(fail_after=3),
            metadata=metadata,
            fields_per_part=2,
            fields_per_batch=1,
            progress=False,
        )
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]
    resumed = CountingFeaturizer()
    info = embed_dataset(root, out, resumed, metadata=metadata, fields_per_part=2, fields_per_batch=1, progress=False)
    assert resumed.seen == 3  # the two fields of part 0 were not embedded again
    assert info["num_rows"] == 5
    fresh = tmp_path / "fresh"
    embed_dataset(root, fresh, CountingFeaturizer(), metadata=metadata, fields_per_part=2, progress=False)
    pd.testing.assert_frame_equal(read_embeddings(out), read_embeddings(fresh))


def test_rerun_with_other_options_into_same_folder_is_refused(plate, tmp_path):
    root, _ = plate
    embed_dataset(root, tmp_path / "emb", PixelStatsFeaturizer(), progress=False)
    with pytest.raises(ValueError, match="another input or other options"):
        embed_dataset(root, tmp_path / "emb", PixelStatsFeaturizer(percentiles=(50,)), progress=False)


def test_shard_folder_gives_the_same_rows_as_the_image_folder(plate, tmp_path):
    from hf_cellmae.data.layouts import discover_fields
    from hf_cellmae.data.metadata import join_metadata, read_metadata_table
    from hf_cellmae.data.shards import write_shards

    root, metadata = plate
    records = discover_fields(root)
    join_metadata(records, read_metadata_table(metadata))
    write_shards(
        records, tmp_path / "shards", target_shard_size=1, fields_per_row_group=2, num_workers=1, progress=False
    )
    embed_dataset(tmp_path / "shards", tmp_path / "from_shards", PixelStatsFeaturizer(), progress=False)
    embed_dataset(root, tmp_path / "from_images", PixelStatsFeaturizer(), metadata=metadata, progress=False)
    a = read_embeddings(tmp_path / "from_shards").sort_values("Metadata_field_id").reset_index(drop=True)
    b = read_embeddings(tmp_path / "from_images")
    columns = ["Metadata_field_id", "Metadata_perturbation"] + [c for c in b.columns if not c.startswith("Metadata_")]
    pd.testing.assert_frame_equal(a[columns], b[columns], check_dtype=False)


def test_pixel_statistics_of_a_hand_made_field():
    field = np.array([[[0, 255], [255, 0]], [[51, 51], [51, 51]]], dtype=np.uint8)
    stats = pixel_statistics(field, percentiles=(50,)).reshape(2, 3)
    np.testing.assert_allclose(stats, [[0.5, 0.5, 0.5], [0.2, 0.0, 0.2]], atol=1e-6)


def test_real_bbbc022_fields_embed_with_metadata(tmp_path):
    folder = DATA / "cellpainting_bbbc022"
    if not folder.is_dir():
        pytest.skip(f"real data not found: {folder}")
    info = embed_dataset(folder / "images", tmp_path / "emb", PixelStatsFeaturizer(), progress=False)
    table = read_embeddings(tmp_path / "emb")
    assert info["num_rows"] == len(table) == 10  # 5 wells x 2 sites; Not_an_Image.txt is reported, not embedded
    assert table.filter(like="_mean").shape[1] == 5
    assert table["Metadata_well"].nunique() == 5


def test_cli_embed_writes_pixel_statistics_table(plate, tmp_path):
    from hf_cellmae.cli import main

    root, metadata = plate
    code = main(
        ["embed", "pixel_stats", str(root), str(tmp_path / "emb"), "--metadata", str(metadata), "--no-progress"]
    )
    assert code == 0
    table = read_embeddings(tmp_path / "emb")
    assert len(table) == 5 and "Ch1_mean" in table.columns and "Metadata_is_control" in table.columns


def test_cli_embed_names_an_image_folders_channels_with_channels_as_shard_does(plate, tmp_path, capsys):
    from hf_cellmae.cli import main

    root, metadata = plate
    code = main(
        [
            "embed",
            "pixel_stats",
            str(root),
            str(tmp_path / "emb"),
            "--channels",
            "Ch1=DNA,Ch2=ER,Ch3=RNA",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    columns = read_embeddings(tmp_path / "emb").columns
    assert {"DNA_mean", "ER_mean", "RNA_mean"} <= set(columns) and "Ch1_mean" not in columns
    assert main(["embed", "pixel_stats", str(root), str(tmp_path / "bad"), "--channels", "Ch1=DNA,ER"]) == 2
    assert "mixes TOKEN=NAME and plain names" in capsys.readouterr().err


def test_embed_refuses_channels_for_a_shard_folder_whose_channels_were_named_when_sharding(plate, tmp_path):
    from hf_cellmae.data.shards import shard_folder

    root, _ = plate
    shard_folder(root, tmp_path / "shards", channel_names="Ch1=DNA,Ch2=ER,Ch3=RNA", num_workers=1, progress=False)
    with pytest.raises(ValueError, match="its channels were named when sharding"):
        embed_dataset(
            tmp_path / "shards", tmp_path / "emb", PixelStatsFeaturizer(), channels="Ch1=DNA", progress=False
        )


@pytest.fixture
def plate_copy(plate, tmp_path):
    """A private copy of the plate (these tests damage it)."""
    import shutil

    root, metadata = plate
    shutil.copytree(root, tmp_path / "images")
    return tmp_path / "images", metadata


def _shards_of(images, out):
    from hf_cellmae.data.shards import shard_folder

    shard_folder(images, out, target_shard_size=1, num_workers=1, shuffle=False, progress=False)  # one field per shard
    return out


def test_embed_fails_on_a_corrupt_shard_field_naming_shard_and_field(plate_copy, tmp_path):
    from hf_cellmae.data.problems import BadInputError
    from tests.helpers.data_fixtures import flip_pixel_byte

    shards = _shards_of(plate_copy[0], tmp_path / "shards")
    field_id = flip_pixel_byte(shards / "shard-00002.parquet")
    with pytest.raises(
        BadInputError,
        match=f"field {field_id} in shard .*shard-00002.parquet fails its CRC-32 check.*2 part\\(s\\) already written .* are kept",
    ):
        embed_dataset(shards, tmp_path / "emb", PixelStatsFeaturizer(), progress=False)
    assert sorted(p.name for p in (tmp_path / "emb").glob("*.parquet")) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]


def test_embed_skips_and_counts_a_corrupt_shard_field_under_skip(plate_copy, tmp_path, capsys):
    from tests.helpers.data_fixtures import flip_pixel_byte

    shards = _shards_of(plate_copy[0], tmp_path / "shards")
    field_id = flip_pixel_byte(shards / "shard-00002.parquet")
    info = embed_dataset(shards, tmp_path / "emb", PixelStatsFeaturizer(), progress=False, on_error="skip")
    assert info["num_rows"] == 4 and info["num_skipped"] == 1
    assert field_id not in set(read_embeddings(tmp_path / "emb")["Metadata_field_id"])
    assert info["skipped"]["shard-00002"][0]["field"] == field_id
    assert "skipped 1 field(s)" in capsys.readouterr().out


def test_embed_names_the_shard_and_the_repair_when_its_parquet_structure_is_damaged(plate_copy, tmp_path):
    from hf_cellmae.data.problems import BadInputError
    from tests.helpers.data_fixtures import damage_page_header

    shards = _shards_of(plate_copy[0], tmp_path / "shards")
    damage_page_header(shards / "shard-00001.parquet")
    with pytest.raises(
        BadInputError, match=r"cannot read shard .*shard-00001.parquet .*re-run the same `cellmae shard`"
    ):
        embed_dataset(shards, tmp_path / "emb", PixelStatsFeaturizer(), progress=False, on_error="skip")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_embed_on_an_image_folder_skips_and_counts_a_truncated_image_under_skip(plate_copy, tmp_path, capsys):
    images, metadata = plate_copy
    _truncate(images / "plate1_B01_site1_Ch2.tif")
    info = embed_dataset(
        images,
        tmp_path / "emb",
        PixelStatsFeaturizer(),
        metadata=metadata,
        fields_per_part=2,
        progress=False,
        on_error="skip",
    )
    assert info["num_rows"] == 4 and info["num_skipped"] == 1
    (skip,) = info["skipped"]["part-00001"]
    assert skip["field"] == "plate1/B01/s1" and skip["file"].endswith("plate1_B01_site1_Ch2.tif")
    assert "plate1_B01_site1_Ch2.tif" in capsys.readouterr().out
    assert len(read_embeddings(tmp_path / "emb")) == 4


def test_an_image_folder_gets_the_field_checks_of_shard_under_the_same_policy(plate_copy, tiny_model, tmp_path):
    from hf_cellmae.data.problems import BadInputError

    images, metadata = plate_copy
    nan_field = np.random.default_rng(1).random((64, 128)).astype(np.float32)
    nan_field[5, 7] = np.nan
    for channel in (1, 2, 3):  # B01: float pixels with one NaN; C01: an 8 x 8 field
        (images / f"plate1_B01_site1_Ch{channel}.tif").unlink()
        tifffile.imwrite(
            images / f"plate1_B01_site1_Ch{channel}.tif", nan_field if channel == 2 else np.ones((64, 128), np.float32)
        )
        tifffile.imwrite(images / f"plate1_C01_site1_Ch{channel}.tif", np.ones((8, 8), np.uint16))
    for featurizer in (PixelStatsFeaturizer(), ModelFeaturizer(tiny_model, image_size=64)):
        out = tmp_path / featurizer.name
        info = embed_dataset(images, out, featurizer, metadata=metadata, progress=False, on_error="skip")
        assert info["num_rows"] == 3 and info["num_skipped"] == 2
        skips = {skip["field"]: skip for skip in info["skipped"]["part-00000"]}
        assert "1 non-finite pixel(s) (NaN)" in skips["plate1/B01/s1"]["reason"]
        assert skips["plate1/B01/s1"]["file"].endswith("plate1_B01_site1_Ch2.tif")
        assert "8x8 px" in skips["plate1/C01/s1"]["reason"] and skips["plate1/C01/s1"]["file"].endswith("_Ch1.tif")
        table = read_embeddings(out)
        assert set(table["Metadata_well"]) == {"A01", "A02", "B02"}
        assert np.isfinite(table.filter(regex="^(?!Metadata_)").to_numpy()).all()
    with pytest.raises(
        BadInputError, match=r"field plate1/B01/s1 has 1 non-finite pixel\(s\) .*plate1_B01_site1_Ch2.tif"
    ):
        embed_dataset(images, tmp_path / "fail", PixelStatsFeaturizer(), metadata=metadata, progress=False)


def test_a_repaired_image_is_embedded_again_on_a_re_run_and_its_skip_goes_away(plate_copy, tmp_path, capsys):
    images, metadata = plate_copy
    broken = images / "plate1_B01_site1_Ch2.tif"
    original = broken.read_bytes()
    _truncate(broken)
    options = dict(metadata=metadata, fields_per_part=2, progress=False, on_error="skip")
    first = embed_dataset(images, tmp_path / "emb", PixelStatsFeaturizer(), **options)
    assert first["num_rows"] == 4 and first["num_skipped"] == 1
    untouched = {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("*.parquet") if p.name != "part-00001.parquet"
    }
    broken.write_bytes(original)  # repaired as the message says
    second = embed_dataset(images, tmp_path / "emb", PixelStatsFeaturizer(), **options)
    assert (
        "1 part(s) whose input changed since they were written are embedded again: part-00001"
        in capsys.readouterr().out
    )
    assert second["num_rows"] == 5 and second["num_skipped"] == 0 and second["skipped"]["part-00001"] == []
    assert {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("*.parquet") if p.name in untouched
    } == untouched
    embed_dataset(images, tmp_path / "fresh", PixelStatsFeaturizer(), **options)
    pd.testing.assert_frame_equal(read_embeddings(tmp_path / "emb"), read_embeddings(tmp_path / "fresh"))


def test_a_run_that_skips_every_field_fails_naming_the_first_reason(plate_copy, tmp_path):
    from hf_cellmae.data.problems import BadInputError

    images, metadata = plate_copy
    for path in images.glob("*_Ch1.tif"):
        _truncate(path)
    with pytest.raises(
        BadInputError,
        match=r"every one of the 5 fields .* was skipped, so .* holds no embedding; the first reason: .*_Ch1.tif",
    ):
        embed_dataset(
            images, tmp_path / "emb", PixelStatsFeaturizer(), metadata=metadata, progress=False, on_error="skip"
        )


def test_a_field_the_model_cannot_crop_is_skipped_naming_it_not_its_batch_position(plate_copy, tiny_model, tmp_path):
    images, metadata = plate_copy
    for channel in (1, 2, 3):  # A02: 40 x 40, above shard's minimum but smaller than the model's 64 px crop
        tifffile.imwrite(images / f"plate1_A02_site1_Ch{channel}.tif", np.ones((40, 40), np.uint16))
    info = embed_dataset(
        images,
        tmp_path / "emb",
        ModelFeaturizer(tiny_model, image_size=64),
        metadata=metadata,
        progress=False,
        on_error="skip",
    )
    (skip,) = info["skipped"]["part-00000"]
    assert skip["field"] == "plate1/A02/s1" and skip["file"].endswith("plate1_A02_site1_Ch1.tif")
    assert "cannot be prepared for the model: image of 40x40 pixels is smaller than image_size=64" in skip["reason"]
    assert info["num_rows"] == 4


def test_embed_on_an_image_folder_fails_in_one_line_naming_the_file_and_keeps_written_parts(plate_copy, tmp_path):
    from hf_cellmae.data.problems import BadInputError

    images, metadata = plate_copy
    _truncate(images / "plate1_B01_site1_Ch2.tif")
    with pytest.raises(BadInputError) as error:
        embed_dataset(
            images, tmp_path / "emb", PixelStatsFeaturizer(), metadata=metadata, fields_per_part=2, progress=False
        )
    message = str(error.value)
    assert "plate1_B01_site1_Ch2.tif" in message and "\n" not in message and "on_error='skip'" in message
    assert [p.name for p in (tmp_path / "emb").glob("*.parquet")] == ["part-00000.parquet"]


def test_cli_embed_of_a_corrupt_shard_exits_non_zero_with_one_line_naming_shard_and_field(
    plate_copy, tmp_path, capsys
):
    from hf_cellmae.cli import main
    from tests.helpers.data_fixtures import flip_pixel_byte

    shards = _shards_of(plate_copy[0], tmp_path / "shards")
    field_id = flip_pixel_byte(shards / "shard-00000.parquet")
    code = main(["embed", "pixel_stats", str(shards), str(tmp_path / "emb"), "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert code != 0 and len(error.splitlines()) == 1
    assert field_id in error and "shard-00000.parquet" in error and "CRC-32" in error


def test_cli_embed_on_error_skip_skips_counts_and_lists_a_corrupt_field(plate_copy, tmp_path, capsys):
    import json

    from hf_cellmae.cli import main
    from tests.helpers.data_fixtures import flip_pixel_byte

    shards = _shards_of(plate_copy[0], tmp_path / "shards")
    field_id = flip_pixel_byte(shards / "shard-00000.parquet")
    code = main(["embed", "pixel_stats", str(shards), str(tmp_path / "emb"), "--no-progress", "--on-error", "skip"])
    assert code == 0
    assert "skipped 1 field(s)" in capsys.readouterr().out
    info = json.loads((tmp_path / "emb" / "_embedding_info.json").read_text())
    assert info["num_skipped"] == 1 and info["skipped"]["shard-00000"][0]["field"] == field_id


# ---------------------------------------------------------------- channels matched by name (issue 10, item 1)

MODEL_STAINS = ["DNA", "ER", "RNA", "AGP", "Mito"]  # RxRx order, as a model trained on RxRx shards records it


@pytest.fixture(scope="module")
def named_model(tmp_path_factory):
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    folder = tmp_path_factory.mktemp("named_model")
    CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", channel_names=MODEL_STAINS)).save_pretrained(folder)
    return folder


def _direct_embedding(model_folder, pixels, channel_ids):
    """The tile-mean pooled embedding of one field with explicit channel ids (the model, without embed)."""
    import torch

    from hf_cellmae import CellMAEImageProcessor, CellMAEModel

    crops = CellMAEImageProcessor(image_size=64, crop_mode="tile")(pixels, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = CellMAEModel.from_pretrained(model_folder)(crops, channel_ids=torch.tensor(channel_ids))
    return out.last_hidden_state[:, 1:].mean(1).mean(0).numpy()


def test_plate_channels_in_another_order_and_a_subset_are_fed_by_stain_name(named_model):
    from hf_cellmae.evaluation.embed import Field

    pixels = np.random.default_rng(1).integers(0, 4000, (2, 64, 128), dtype=np.uint16)
    featurizer = ModelFeaturizer(named_model, readout="mean")
    features, _ = featurizer([Field(pixels, ["Mito", "DNA"], {})])
    np.testing.assert_allclose(features[0], _direct_embedding(named_model, pixels, [4, 0]), rtol=1e-4, atol=1e-5)


def test_embed_matches_stains_by_the_streams_rule_any_case_and_cellprofilers_orig_prefix(named_model):
    from hf_cellmae.evaluation.embed import Field

    pixels = np.random.default_rng(1).integers(0, 4000, (2, 64, 128), dtype=np.uint16)
    features, _ = ModelFeaturizer(named_model, readout="mean")([Field(pixels, ["mito", "OrigDNA"], {})])
    np.testing.assert_allclose(features[0], _direct_embedding(named_model, pixels, [4, 0]), rtol=1e-4, atol=1e-5)


def test_an_unknown_stain_is_refused_naming_it_and_the_models_channels(named_model):
    from hf_cellmae.errors import UserError
    from hf_cellmae.evaluation.embed import Field

    pixels = np.zeros((2, 64, 64), dtype=np.uint16)
    with pytest.raises(UserError) as refused:
        ModelFeaturizer(named_model)([Field(pixels, ["DNA", "Actin"], {})])
    message = str(refused.value)
    assert "'Actin'" in message and "DNA, ER, RNA, AGP, Mito" in message and "--channels" in message


def test_unnamed_channels_given_to_a_model_with_stain_names_are_refused_naming_the_fix(plate, named_model, tmp_path):
    from hf_cellmae.errors import UserError

    root, _ = plate  # files Ch1..Ch3: tokens, no stain names
    with pytest.raises(UserError) as refused:
        embed_dataset(root, tmp_path / "emb", ModelFeaturizer(named_model), fields_per_batch=2, progress=False)
    message = str(refused.value)
    assert "Ch1, Ch2, Ch3" in message and "DNA, ER, RNA, AGP, Mito" in message
    assert "--channels Ch1=NAME,Ch2=NAME,Ch3=NAME" in message and "--by-position" in message


def test_cli_embed_of_unnamed_channels_with_a_named_model_exits_with_one_line(plate, named_model, tmp_path, capsys):
    from hf_cellmae.cli import main

    root, _ = plate
    code = main(["embed", str(named_model), str(root), str(tmp_path / "emb"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1 and "--by-position" in err


def test_channels_without_names_are_fed_by_position_with_one_warning_under_by_position(plate, named_model, tmp_path):
    root, _ = plate
    with pytest.warns(UserWarning, match="matched by position") as caught:
        embed_dataset(
            root, tmp_path / "emb", ModelFeaturizer(named_model, by_position=True), fields_per_batch=2, progress=False
        )
    assert len([w for w in caught if "matched by position" in str(w.message)]) == 1


def test_image_folder_channels_are_named_by_a_per_file_table(plate, tmp_path):
    root, _ = plate
    rows = [
        {
            "file": f"plate1_{well}_site1_Ch{c}.tif",
            "plate": "plate1",
            "well": well,
            "site": 1,
            "channel": c,
            "compartment": stain,
        }
        for well in WELLS
        for c, stain in zip((1, 2, 3), ("Mito", "DNA", "ER"))
    ]
    table = tmp_path / "per_file.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    # The table sits outside the image folder: its relative file names resolve from the image folder.
    embed_dataset(root, tmp_path / "emb", PixelStatsFeaturizer(percentiles=(50,)), metadata=table, progress=False)
    columns = [c for c in read_embeddings(tmp_path / "emb").columns if not c.startswith("Metadata_")]
    assert columns[0].startswith("Mito_") and columns[-1].startswith("ER_")


def test_jump_shards_embed_with_each_stain_fed_as_the_models_stain(tmp_path, named_model):
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.streaming import stream_fields

    source = DATA / "cellpainting_jump_rab30"
    if not source.is_dir():
        pytest.skip(f"real data not found: {source}")
    shard_folder(source, tmp_path / "shards", metadata=source / "metadata.csv", num_workers=1, progress=False)
    featurizer = ModelFeaturizer(named_model, batch_size=64, readout="mean")
    assert featurizer._channel_ids(["AGP", "DNA", "ER", "Mito", "RNA"]).tolist() == [3, 0, 1, 4, 2]
    embed_dataset(tmp_path / "shards", tmp_path / "emb", featurizer, progress=False)
    table = read_embeddings(tmp_path / "emb").set_index("Metadata_field_id")
    sample = next(
        s
        for s in stream_fields(
            str(tmp_path / "shards"), image_size=None, augment=False, standardize=False, shuffle=False
        )
        if s["field_id"] == "BR00123947/G01/s1"
    )
    expected = _direct_embedding(named_model, sample["pixel_values"], [3, 0, 1, 4, 2])
    got = table.loc["BR00123947/G01/s1", [c for c in table.columns if not c.startswith("Metadata_")]].to_numpy(float)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_jump_stain_names_flow_from_metadata_to_shards_model_folder_and_embeddings(tmp_path):
    import json

    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.training.arguments import parse_pretraining_arguments
    from hf_cellmae.training.loop import pretrain

    source = DATA / "cellpainting_jump_rab30"
    if not source.is_dir():
        pytest.skip(f"real data not found: {source}")
    jump = ["AGP", "DNA", "ER", "Mito", "RNA"]
    assert (
        shard_folder(source, tmp_path / "shards", metadata=source / "metadata.csv", num_workers=1, progress=False)[
            "channels"
        ]
        == jump
    )
    values = dict(
        data=tmp_path / "shards",
        output_dir=tmp_path / "run",
        model_preset="tiny",
        max_steps=2,
        per_device_train_batch_size=2,
        save_steps=2,
        logging_steps=1,
        figure_steps=0,
        report_to="none",
        progress_bar=False,
        crops_per_field=1,
    )
    model_dir = Path(pretrain(parse_pretraining_arguments([f"--{k}={v}" for k, v in values.items()]))["model_dir"])
    assert json.loads((model_dir / "config.json").read_text())["channel_names"] == jump
    assert json.loads((model_dir / "preprocessor_config.json").read_text())["channel_names"] == jump
    featurizer = ModelFeaturizer(model_dir)
    assert featurizer._channel_ids(["RNA", "AGP"]).tolist() == [4, 0]
    info = embed_dataset(tmp_path / "shards", tmp_path / "emb", featurizer, progress=False)
    assert info["num_rows"] == 2
