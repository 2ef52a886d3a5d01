"""``cellmae profiles``: fields -> wells (streamed) -> aligned on control wells -> perturbations, as Parquet or h5ad."""

import json

import numpy as np
import pandas as pd
import pytest

from hf_cellmae.cli import main
from hf_cellmae.evaluation.options import ProfilesOptions
from hf_cellmae.evaluation.profiles import group_profiles, write_profiles

GENES = ["ctrl", "g1", "g2", "g3"]
FEATURES = [f"emb_{i:03d}" for i in range(4)]


def _embeddings(folder, fields_per_well=3, rows_per_part=10, seed=0):
    """A ``cellmae embed``-like folder: 2 plates x 14 wells x ``fields_per_well`` fields, parts that split wells.

    Each gene shifts its fields along its own direction; plate P2 adds a shift and a scale to every field;
    wells A01-A08 of each plate are controls (``ctrl``). Rows are shuffled, so wells straddle parts.
    """
    rng = np.random.default_rng(seed)
    directions = {gene: (0 if gene == "ctrl" else 3) * rng.standard_normal(len(FEATURES)) for gene in GENES}
    rows = []
    for plate, (shift, scale) in {"P1": (0.0, 1.0), "P2": (5.0, 2.0)}.items():
        for w in range(14):
            gene = "ctrl" if w < 8 else GENES[1 + (w - 8) % 3]
            for site in range(1, fields_per_well + 1):
                vector = (directions[gene] + rng.standard_normal(len(FEATURES))) * scale + shift
                rows.append(
                    {
                        "Metadata_plate": plate,
                        "Metadata_well": f"{'AB'[w // 8]}{w % 8 + 1:02d}",
                        "Metadata_site": site,
                        "Metadata_perturbation": gene,
                        "Metadata_is_control": gene == "ctrl",
                        **dict(zip(FEATURES, vector.astype(np.float32))),
                    }
                )
    table = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(table), rows_per_part):
        table.iloc[start : start + rows_per_part].to_parquet(
            folder / f"part-{start // rows_per_part:05d}.parquet", index=False
        )
    (folder / "_embedding_info.json").write_text("{}")  # cellmae embed's info file is not a part
    return table


@pytest.mark.parametrize("method", ["mean", "median"])
def test_well_profiles_are_each_wells_mean_or_median_streamed_in_batches_smaller_than_a_well(tmp_path, method):
    table = _embeddings(tmp_path / "emb")
    wells = group_profiles(tmp_path / "emb", method=method, batch_rows=4)
    expected = table.groupby(["Metadata_plate", "Metadata_well"])[FEATURES].agg(method)
    assert [tuple(k.split("/")) for k in wells.keys] == list(expected.index)
    np.testing.assert_allclose(wells.vectors, expected.to_numpy(), rtol=1e-6, atol=1e-6)
    assert wells.metadata["Metadata_n_fields"].tolist() == [3] * 28


def test_metadata_constant_within_a_well_is_kept_and_varying_columns_are_named(tmp_path):
    _embeddings(tmp_path / "emb")
    wells = group_profiles(tmp_path / "emb", batch_rows=5)
    assert list(wells.metadata.columns) == [
        "Metadata_plate",
        "Metadata_well",
        "Metadata_perturbation",
        "Metadata_is_control",
        "Metadata_n_fields",
    ]
    assert wells.varying_columns == ["Metadata_site"]


def test_a_missing_well_column_is_one_line_naming_it_and_the_option(tmp_path):
    _embeddings(tmp_path / "emb")
    with pytest.raises(ValueError, match=r"\['Metadata_row'\] not in the table.*--well-cols"):
        group_profiles(tmp_path / "emb", key_cols=["Metadata_plate", "Metadata_row"])


def test_alignment_is_fitted_on_the_control_wells_of_each_plate(tmp_path):
    _embeddings(tmp_path / "emb")
    options = ProfilesOptions(alignment="center_scale", batch_col="Metadata_plate", no_progress=True)
    info = write_profiles(tmp_path / "emb", tmp_path / "out", options)
    wells = pd.read_parquet(tmp_path / "out" / info["files"]["wells"])
    for _, plate in wells[wells["Metadata_is_control"]].groupby("Metadata_plate"):
        np.testing.assert_allclose(plate[FEATURES].mean(), 0.0, atol=1e-6)
        np.testing.assert_allclose(plate[FEATURES].std(ddof=0), 1.0, atol=1e-6)
    assert info["n_wells"] == 28 and info["n_control_wells"] == 16 and info["n_fields"] == 84


def test_cli_profiles_writes_parquet_that_pandas_and_copairs_read(tmp_path, capsys):
    from copairs import map as copairs_map

    _embeddings(tmp_path / "emb")
    out = tmp_path / "profiles"
    assert (
        main(
            [
                "profiles",
                str(tmp_path / "emb"),
                str(out),
                "--batch-col",
                "Metadata_plate",
                "--alignment",
                "tvn",
                "--coral",
                "--perturbations",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "84 fields -> 28 wells (16 control)" in printed and "left out Metadata_site" in printed
    wells = pd.read_parquet(out / "well_profiles.parquet")
    features = [c for c in wells.columns if not c.startswith("Metadata_")]
    assert len(wells) == 28 and features == [f"tvn_{i:04d}" for i in range(4)]
    treated = wells[~wells["Metadata_is_control"]].reset_index(drop=True)
    ap = copairs_map.average_precision(
        treated,
        treated[features].to_numpy(),
        pos_sameby=["Metadata_perturbation"],
        pos_diffby=["Metadata_plate"],
        neg_sameby=[],
        neg_diffby=["Metadata_perturbation"],
        progress_bar=False,
    )
    assert ap["average_precision"].mean() > 0.9  # the same gene on the other plate is the nearest well
    genes = pd.read_parquet(out / "perturbation_profiles.parquet")
    assert genes["Metadata_perturbation"].tolist() == ["g1", "g2", "g3"]
    assert genes["Metadata_n_wells"].tolist() == [4, 4, 4]
    np.testing.assert_allclose(
        genes[features].to_numpy()[0],
        treated.loc[treated["Metadata_perturbation"] == "g1", features].mean(),
        rtol=1e-6,
    )
    info = json.loads((out / "_profiles_info.json").read_text())
    assert info["options"]["align_options"] == {"coral": True} and info["n_perturbations"] == 3


def test_cli_profiles_h5ad_is_an_anndata_with_the_metadata_as_obs_and_the_features_as_x(tmp_path):
    anndata = pytest.importorskip("anndata")

    _embeddings(tmp_path / "emb")
    common = [
        "--batch-col",
        "Metadata_plate",
        "--alignment",
        "center_scale",
        "--aggregation",
        "median",
        "--perturbations",
        "--no-progress",
    ]
    assert main(["profiles", str(tmp_path / "emb"), str(tmp_path / "pq"), *common]) == 0
    assert main(["profiles", str(tmp_path / "emb"), str(tmp_path / "h5"), *common, "--format", "h5ad"]) == 0
    for name in ("well_profiles", "perturbation_profiles"):
        table = pd.read_parquet(tmp_path / "pq" / f"{name}.parquet")
        adata = anndata.read_h5ad(tmp_path / "h5" / f"{name}.h5ad")
        assert list(adata.var_names) == FEATURES
        np.testing.assert_allclose(adata.X, table[FEATURES].to_numpy(), rtol=1e-6)
        assert list(adata.obs.columns) == [c for c in table.columns if c.startswith("Metadata_")]
        assert adata.obs["Metadata_perturbation"].astype(str).tolist() == table["Metadata_perturbation"].tolist()


def test_a_csv_table_gives_the_same_well_profiles_as_its_parquet_parts(tmp_path):
    table = _embeddings(tmp_path / "emb")
    table.to_csv(tmp_path / "emb.csv", index=False)
    from_parts, from_csv = group_profiles(tmp_path / "emb"), group_profiles(tmp_path / "emb.csv")
    assert list(from_csv.keys) == list(from_parts.keys)
    np.testing.assert_allclose(from_csv.vectors, from_parts.vectors, rtol=1e-5)
