"""Single-cell embeddings (embed --single-cell), the pooled synthetic screen and evaluation from cells."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from hf_cellmae.data.synthetic import CHANNELS, make_synthetic_screen
from hf_cellmae.evaluation.cells import aggregate_cells, join_cell_labels
from hf_cellmae.evaluation.embed import ModelFeaturizer, embed_dataset
from hf_cellmae.evaluation.report import read_embeddings
from hf_cellmae.evaluation.single_cell import (
    CellOptions,
    SingleCellFeaturizer,
    cell_keep_masks,
    cells_of_labels,
    crop_at,
    find_label_image,
    index_label_images,
)
from tests.helpers.data_fixtures import shared_folder


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """A one-plate pooled synthetic screen (96 px fields, 2 wells x 2 sites), sharded, and a tiny 32 px model."""
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
    from hf_cellmae.data.shards import shard_folder

    root = tmp_path_factory.mktemp("pooled")
    screen = make_synthetic_screen(
        root / "screen",
        pooled=True,
        num_plates=1,
        field_size=96,
        sites_per_well=2,
        pooled_wells_per_plate=2,
        num_workers=1,
        progress=False,
    )
    shard_folder(
        screen["images"],
        root / "shards",
        metadata=screen["metadata"],
        channel_names=screen["channels"],
        progress=False,
    )
    config = CellMAEConfig.from_preset("tiny", image_size=32, channel_names=list(CHANNELS))
    CellMAEForPreTraining(config).save_pretrained(root / "model")
    return {"screen": screen, "shards": root / "shards", "model": root / "model"}


def _featurizer(model, **options):
    return SingleCellFeaturizer(ModelFeaturizer(model, device="cpu", readout="mean"), CellOptions(**options))


# ------------------------------------------------------------------------------------------- crops and masks
def test_crop_is_centred_on_the_cell_and_padded_by_reflection_or_zeros_at_the_border():
    pixels = np.arange(2 * 10 * 10, dtype=np.uint16).reshape(2, 10, 10)
    inside = crop_at(pixels, 5, 5, 4)
    np.testing.assert_array_equal(inside, pixels[:, 3:7, 3:7])  # centre pixel (5, 5) at index size // 2
    corner = crop_at(pixels, 0, 0, 4, "zero")
    assert corner.shape == (2, 4, 4) and (corner[:, :2] == 0).all() and (corner[:, :, :2] == 0).all()
    np.testing.assert_array_equal(corner[:, 2:, 2:], pixels[:, :2, :2])
    reflected = crop_at(pixels, 0, 0, 4, "reflect")
    np.testing.assert_array_equal(reflected[:, 1, 2:], pixels[:, 1, :2])  # row -1 mirrors row 1


def test_keep_mask_is_the_patches_overlapping_the_cell_and_grows_with_dilation():
    labels = np.zeros((32, 32), dtype=np.int64)
    labels[14:18, 14:18] = 3  # a 4 x 4 cell straddling the four central 8 px patches of a 32 px crop
    cells = cells_of_labels(labels)
    assert cells == [{"cell_id": 3, "centroid_y": 15.5, "centroid_x": 15.5, "area": 16}]
    keep = cell_keep_masks(labels, cells, size=32, patch_size=8).reshape(4, 4)
    expected = np.zeros((4, 4), bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(keep, expected)
    grown = cell_keep_masks(labels, cells, size=32, patch_size=8, dilation=8).reshape(4, 4)
    assert grown.sum() > keep.sum() and grown[keep].all()


def test_label_images_are_matched_by_plate_well_and_site_tokens(tmp_path):
    for name in ("Plate1/B02_s1_cp_masks.png", "Plate1/B02_s2_cp_masks.png", "Plate2_B02_site1_labels.tif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    index = index_label_images(tmp_path)
    assert find_label_image(index, {"plate": "Plate1", "well": "B02", "site": 2}).endswith("B02_s2_cp_masks.png")
    assert find_label_image(index, {"plate": "Plate2", "well": "B02", "site": 1}).endswith(
        "Plate2_B02_site1_labels.tif"
    )
    with pytest.raises(ValueError, match="no label image for plate Plate1, well C03, site 1"):
        find_label_image(index, {"plate": "Plate1", "well": "C03", "site": 1}, str(tmp_path))


# ------------------------------------------------------------------------------------------- embedding cells
def test_single_cell_embed_writes_one_row_per_cell_equal_to_the_model_on_its_kept_tokens(pooled, tmp_path):
    import pyarrow.parquet as pq

    from hf_cellmae import CellMAEImageProcessor, CellMAEModel
    from hf_cellmae.data.shards import decode_pixels

    featurizer = _featurizer(pooled["model"])
    info = embed_dataset(pooled["shards"], tmp_path / "emb", featurizer, progress=False, num_workers=0)
    table = read_embeddings(tmp_path / "emb")
    assert info["num_rows"] == len(table) == featurizer.num_cells > 0
    for column in (
        "Metadata_cell_id",
        "Metadata_centroid_y",
        "Metadata_centroid_x",
        "Metadata_area",
        "Metadata_num_tokens",
        "Metadata_plate",
        "Metadata_well",
        "Metadata_site",
    ):
        assert column in table.columns
    assert (
        table["Metadata_num_tokens"].between(1, 16).all() and (table["Metadata_num_tokens"] < 16).mean() > 0.5
    )  # most cells: part of the 4 x 4 grid

    # One cell by hand: its field, the classical segmentation, the crop, the processor, the model on its patches.
    row = table.iloc[len(table) // 2]
    shard = next(iter(sorted(pooled["shards"].glob("shard-*.parquet"))))
    fields = pq.read_table(shard).to_pylist()
    record = next(f for f in fields if f["field_id"] == row["Metadata_field_id"])
    pixels = decode_pixels(record["pixels"], record["dtype"], record["shape"])
    from hf_cellmae.evaluation.cellprofiler import segment_field

    _, labels = segment_field(pixels, 0)
    cell = next(c for c in cells_of_labels(labels) if c["cell_id"] == row["Metadata_cell_id"])
    keep = cell_keep_masks(labels, [cell], 32, 8)
    assert keep.sum() == row["Metadata_num_tokens"]
    crop = crop_at(pixels, cell["centroid_y"], cell["centroid_x"], 32)
    values = CellMAEImageProcessor(image_size=32)([crop], crop_mode="none")["pixel_values"]
    model = CellMAEModel.from_pretrained(pooled["model"]).eval()
    tokens = model.embeddings(values, torch.arange(5)[None])  # (1, C*N, D)
    patches = torch.from_numpy(np.flatnonzero(keep[0]))
    ids = torch.cat([patches + 16 * c for c in range(5)])
    with torch.no_grad():
        hidden, _ = model._run_encoder(tokens[:, ids], False)
    expected = hidden[0, 1:].mean(0).numpy()
    features = row[[c for c in table.columns if c.startswith("feature_")]].to_numpy(dtype=np.float32)
    np.testing.assert_allclose(features, expected, atol=1e-4, rtol=1e-4)


def test_cell_tokens_all_feeds_the_whole_crop_and_changes_the_embedding(pooled, tmp_path):
    masked = embed_dataset(
        pooled["shards"], tmp_path / "masked", _featurizer(pooled["model"]), progress=False, num_workers=0
    )
    whole = embed_dataset(
        pooled["shards"],
        tmp_path / "all",
        _featurizer(pooled["model"], cell_tokens="all"),
        progress=False,
        num_workers=0,
    )
    a, b = read_embeddings(tmp_path / "masked"), read_embeddings(tmp_path / "all")
    assert masked["num_rows"] == whole["num_rows"]
    assert (b["Metadata_num_tokens"] == 16).all()
    features = [c for c in a.columns if c.startswith("feature_")]
    assert not np.allclose(a[features].to_numpy(), b[features].to_numpy(), atol=1e-3)


def test_single_cell_embedding_is_the_same_with_workers_and_resumes(pooled, tmp_path):
    one = embed_dataset(pooled["shards"], tmp_path / "w0", _featurizer(pooled["model"]), progress=False, num_workers=0)
    two = embed_dataset(pooled["shards"], tmp_path / "w2", _featurizer(pooled["model"]), progress=False, num_workers=2)
    pd.testing.assert_frame_equal(read_embeddings(tmp_path / "w0"), read_embeddings(tmp_path / "w2"))
    assert one["num_rows"] == two["num_rows"]
    with pytest.raises(ValueError, match="another input or other options"):  # other cell options: a new run
        embed_dataset(
            pooled["shards"],
            tmp_path / "w0",
            _featurizer(pooled["model"], mask_dilation=3),
            progress=False,
            num_workers=0,
        )


def test_user_label_images_give_the_cells_and_a_missing_one_is_skipped_and_listed(pooled, tmp_path):
    """Label images named like cellpose's, one per field but one missing: its field is skipped and listed."""
    import imagecodecs
    import pyarrow.parquet as pq

    from hf_cellmae.data.shards import decode_pixels

    fields = [
        f for shard in sorted(pooled["shards"].glob("shard-*.parquet")) for f in pq.read_table(shard).to_pylist()
    ]
    masks = tmp_path / "masks"
    (masks / "Plate1").mkdir(parents=True)
    drawn = {}
    for record in fields[1:]:  # the first field has no label image
        shape = decode_pixels(record["pixels"], record["dtype"], record["shape"]).shape[-2:]
        labels = np.zeros(shape, dtype=np.uint16)
        labels[10:30, 10:30], labels[50:70, 40:60] = 7, 9
        drawn[record["field_id"]] = labels
        (masks / "Plate1" / f"{record['well']}_s{record['site']}_cp_masks.png").write_bytes(
            imagecodecs.png_encode(labels)
        )
    featurizer = _featurizer(pooled["model"], masks=str(masks))
    info = embed_dataset(
        pooled["shards"], tmp_path / "emb", featurizer, progress=False, num_workers=0, on_error="skip"
    )
    table = read_embeddings(tmp_path / "emb")
    assert len(table) == 2 * (len(fields) - 1)
    assert sorted(set(table["Metadata_cell_id"])) == [7, 9]
    assert set(table.loc[table["Metadata_cell_id"] == 7, "Metadata_centroid_y"]) == {19.5}
    assert set(table["Metadata_area"]) == {400}
    assert info["num_skipped"] == 1
    skip = next(s for skips in info["skipped"].values() for s in skips)
    assert skip["field"] == fields[0]["field_id"] and "no label image" in skip["reason"]


# ------------------------------------------------------------------------------------------- pooled screen
def test_pooled_screen_reads_out_every_cell_with_its_own_perturbation_and_the_arrayed_biology(pooled):
    screen = pooled["screen"]
    cells = pd.read_csv(screen["cells"])
    assert len(cells) == screen["num_cells"] > 0
    assert set(cells.columns) >= {
        "plate",
        "well",
        "site",
        "cell_id",
        "centroid_y",
        "centroid_x",
        "perturbation",
        "gene",
        "complex",
        "pathway",
        "is_control",
    }
    one_field = cells.groupby(["well", "site"])["perturbation"].nunique()
    assert (one_field > 1).all()  # a field mixes perturbations
    genes = json.loads((pd.io.common.Path(screen["output_dir"]) / "synthetic_config.json").read_text())["genes"]
    by_gene = {g["gene"]: g for g in genes}
    labelled = cells[~cells["is_control"]]
    assert (labelled["complex"] == labelled["gene"].map(lambda g: by_gene[g]["complex"])).all()
    assert cells["is_control"].any()


def test_pooled_rendering_puts_each_read_out_cell_where_the_segmentation_finds_a_nucleus(pooled, tmp_path):
    featurizer = _featurizer(pooled["model"])
    embed_dataset(pooled["shards"], tmp_path / "emb", featurizer, progress=False, num_workers=0)
    from hf_cellmae.evaluation.cells import read_cell_table

    _, matched = join_cell_labels(read_embeddings(tmp_path / "emb"), read_cell_table(pooled["screen"]["cells"]))
    assert matched["matched"] >= 0.6 * matched["cells"]  # touching cells merge; most are found near a drawn centre


# ------------------------------------------------------------------------------------------- from cells
def _cells_table():
    rows = [
        ("P1", "A01", 1, 1, 10.0, 10.0, 1.0),
        ("P1", "A01", 1, 2, 50.0, 50.0, 3.0),
        ("P1", "A01", 2, 1, 10.0, 12.0, 5.0),
        ("P1", "A02", 1, 1, 80.0, 80.0, 7.0),
    ]
    return pd.DataFrame(
        rows,
        columns=[
            "Metadata_plate",
            "Metadata_well",
            "Metadata_site",
            "Metadata_cell_id",
            "Metadata_centroid_y",
            "Metadata_centroid_x",
            "feature_000",
        ],
    )


def test_cells_are_labelled_by_nearest_centroid_within_the_distance_or_by_id():
    readout = pd.DataFrame(
        {
            "plate": ["P1", "P1", "P1", "P1"],
            "well": ["A01", "A01", "A01", "A02"],
            "site": [1, 1, 2, 1],
            "cell_id": [2, 1, 1, 5],
            "centroid_y": [52.0, 11.0, 30.0, 80.0],
            "centroid_x": [49.0, 9.0, 30.0, 80.0],
            "perturbation": ["g2", "g1", "g3", "g4"],
        }
    )
    joined, info = join_cell_labels(_cells_table(), readout, by="centroid", max_distance=5)
    assert info == {
        "cells": 4,
        "matched": 3,
        "unmatched": 1,
    }  # the site-2 cell is 20 px from its field's only read-out
    assert joined["Metadata_perturbation"].tolist() == ["g1", "g2", "g4"]
    joined, info = join_cell_labels(_cells_table(), readout, by="id")
    assert joined["Metadata_perturbation"].tolist() == ["g1", "g2", "g3"]  # A02's cell 1 has no read-out (id 5)


def test_cells_aggregate_per_well_and_perturbation_with_a_minimum_count():
    table = _cells_table().assign(Metadata_perturbation=["g1", "g1", "g1", "g2"])
    groups, info = aggregate_cells(table, ["Metadata_plate", "Metadata_well", "Metadata_perturbation"], min_cells=2)
    assert info == {"groups": 2, "kept": 1, "dropped": 1, "cells_dropped": 1}
    assert groups["feature_000"].tolist() == [3.0] and groups["Metadata_num_cells"].tolist() == [3]
    median, _ = aggregate_cells(
        table.assign(feature_000=[1.0, 2.0, 9.0, 0.0]),
        ["Metadata_plate", "Metadata_well", "Metadata_perturbation"],
        how="median",
    )
    assert median["feature_000"].tolist() == [2.0, 0.0]


# ------------------------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_pooled_screen_embeds_per_cell_and_evaluates_from_cells(tmp_path, pooled):
    from hf_cellmae.cli import main

    screen = tmp_path / "screen"
    assert (
        main(
            [
                "synthetic",
                str(screen),
                "--pooled",
                "--plates",
                "1",
                "--field-size",
                "96",
                "--sites",
                "2",
                "--pooled-wells",
                "3",
                "--num-workers",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "shard",
                str(screen / "images"),
                str(tmp_path / "shards"),
                "--layout",
                "rxrx",
                "--metadata",
                str(screen / "metadata.csv"),
                "--channels",
                "w1=DNA,w2=ER,w3=RNA,w4=AGP,w5=Mito",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "embed",
                str(pooled["model"]),
                str(tmp_path / "shards"),
                str(tmp_path / "cells"),
                "--single-cell",
                "--mask-dilation",
                "2",
                "--device",
                "cpu",
                "--num-workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "cells"),
                "--cells",
                str(screen / "cells.csv"),
                "--min-cells",
                "2",
                "--synthetic-plate",
                str(screen),
                "--batch-col",
                "Metadata_plate",
                "--min-perturbations",
                "3",
                "--no-suite",
                "--no-plots",
                "--no-progress",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    groups = pd.read_parquet(tmp_path / "eval" / "cell_groups.parquet")
    assert (groups["Metadata_num_cells"] >= 2).all()
    treated = groups.loc[~groups["Metadata_is_control"].astype(bool), "Metadata_perturbation"]
    assert results["n_perturbations"] == treated.nunique()  # one profile per perturbation across wells
    assert (
        main(
            [
                "profiles",
                str(tmp_path / "cells"),
                str(tmp_path / "profiles"),
                "--cells",
                str(screen / "cells.csv"),
                "--min-cells",
                "2",
                "--perturbations",
                "--no-progress",
            ]
        )
        == 0
    )
    profiles = pd.read_parquet(tmp_path / "profiles" / "perturbation_profiles.parquet")
    assert len(profiles) == treated.nunique()


# ------------------------------------------------------------------------------------------- real pixels
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:channels are matched by position")
def test_real_bbbc022_sites_embed_per_cell_with_the_classical_segmentation(tmp_path):
    folder = shared_folder("cellpainting_bbbc022")
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    config = CellMAEConfig.from_preset("tiny", image_size=64)
    CellMAEForPreTraining(config).save_pretrained(tmp_path / "model")
    featurizer = SingleCellFeaturizer(
        ModelFeaturizer(tmp_path / "model", device="cpu", readout="mean"), CellOptions(nuclei_channel="Ch1")
    )
    info = embed_dataset(
        folder / "images",
        tmp_path / "emb",
        featurizer,
        progress=False,
        num_workers=0,
        fields_per_part=2,
        on_error="skip",
    )
    table = read_embeddings(tmp_path / "emb")
    assert info["num_rows"] == len(table) == featurizer.num_cells
    assert featurizer.num_nuclei >= featurizer.num_cells > 10 * table["Metadata_field_id"].nunique()
    assert table["Metadata_field_id"].nunique() == 10
    assert table["Metadata_num_tokens"].between(1, config.tokens_per_channel).all()
