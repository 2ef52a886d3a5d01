"""Linear probe / kNN with a split that never shares a plate or well, gene-set recall, copairs mAP."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from hf_cellmae.evaluation.probe import labelled_wells, plot_probe, probe_embeddings
from hf_cellmae.evaluation.retrieval import consistency_map, gene_set_recall, replicate_map
from hf_cellmae.evaluation.tables import split_table

COMPLEXES = {"A": ["A1", "A2", "A3"], "B": ["B1", "B2", "B3"], "C": ["C1", "C2", "C3"]}


def screen_table(signal: float, seed: int = 0, plates: int = 2, offset: float = 5.0) -> pd.DataFrame:
    """Two plates, each gene in 2 wells x 2 fields, 6 control wells; complexes have a mean direction."""
    rng = np.random.default_rng(seed)
    centres = {name: rng.standard_normal(16) for name in COMPLEXES}
    rows, features = [], []
    for plate in range(plates):
        plate_shift = offset * rng.standard_normal(16)  # a batch effect the control alignment must remove
        wells = iter(f"{r}{c:02d}" for r, c in itertools.product("ABCDEFGH", range(1, 13)))
        entries = [(g, name) for name, genes in COMPLEXES.items() for g in genes for _ in range(2)] + [
            ("ctrl", "")
        ] * 6
        for gene, name in entries:
            well = next(wells)
            for site in (1, 2):
                centre = centres[name] * signal if name else 0.0
                features.append(plate_shift + centre + rng.standard_normal(16))
                rows.append(
                    {
                        "Metadata_plate": f"P{plate}",
                        "Metadata_well": well,
                        "Metadata_site": site,
                        "Metadata_perturbation": gene,
                        "Metadata_complex": name,
                        "Metadata_is_control": gene == "ctrl",
                    }
                )
    table = pd.DataFrame(rows)
    return pd.concat([table, pd.DataFrame(np.array(features), columns=[f"f{i}" for i in range(16)])], axis=1)


def test_probe_reads_a_label_the_features_carry_and_not_one_they_do_not():
    strong = probe_embeddings(screen_table(signal=3.0), "complex")
    noise = probe_embeddings(screen_table(signal=0.0), "complex")
    assert strong["accuracy"] > 0.9
    assert noise["accuracy"] < 0.7  # chance is 1/3; 18 test wells per fold
    assert strong["chance_uniform"] == pytest.approx(1 / 3) and strong["n_classes"] == 3


def test_probe_holds_out_whole_plates_and_averages_fields_per_well():
    result = probe_embeddings(screen_table(signal=1.0), "Metadata_complex", classifier="knn")
    assert result["split"] == "leave one plate out"
    assert [fold["held_out"] for fold in result["folds"]] == [["P0"], ["P1"]]
    assert all(fold["n_train"] == 18 and fold["n_test"] == 18 for fold in result["folds"])  # 18 gene wells per plate
    assert result["n_units"] == 36


def test_probe_splits_by_well_when_there_is_one_plate():
    table = screen_table(signal=3.0, plates=1)
    result = probe_embeddings(table, "complex", max_folds=3)
    assert result["split"] == "3 folds over wells"
    metadata, features = split_table(table)
    units, _ = labelled_wells(metadata, features, "Metadata_complex")
    assert len(units) == 18 and result["accuracy"] > 0.8


def test_probe_names_a_missing_label_column():
    with pytest.raises(ValueError, match="no column"):
        probe_embeddings(screen_table(signal=1.0), "pathway")


def test_probe_plot_is_written(tmp_path):
    result = probe_embeddings(screen_table(signal=2.0), "complex")
    path = plot_probe(result, tmp_path / "probe.png")
    assert path.stat().st_size > 1000


def test_gene_set_recall_is_one_for_perfect_clusters_and_near_chance_for_noise():
    rng = np.random.default_rng(0)
    genes = [g for genes in COMPLEXES.values() for g in genes]
    pairs = [p for members in COMPLEXES.values() for p in itertools.combinations(members, 2)]
    clustered = np.stack([np.eye(3)[i // 3] * 10 + 0.1 * rng.standard_normal(3) for i in range(9)])
    perfect = gene_set_recall(clustered, genes, pairs)
    assert perfect["recall"] == 1.0 and perfect["chance"] == pytest.approx(2 / 8) and perfect["n_genes_scored"] == 9
    noise = [gene_set_recall(rng.standard_normal((9, 8)), genes, pairs)["recall"] for _ in range(50)]
    assert abs(np.mean(noise) - 2 / 8) < 0.08


def test_gene_set_recall_refuses_annotations_that_name_no_profiled_gene():
    with pytest.raises(ValueError, match="no annotated pair"):
        gene_set_recall(np.eye(3), ["x", "y", "z"], [("p", "q")])


def test_copairs_map_is_high_for_separable_replicates_and_groups():
    table = screen_table(signal=3.0)
    metadata, features = split_table(table)
    units, x = labelled_wells(metadata, features, "Metadata_perturbation")
    activity = replicate_map(
        units, x, "Metadata_perturbation", units["Metadata_is_control"].to_numpy(bool), null_size=200
    )
    assert activity["mean_map"] > 0.8 and activity["n_groups"] == 9
    flat = replicate_map(
        *labelled_wells(*split_table(screen_table(signal=0.0)), "Metadata_perturbation"),
        "Metadata_perturbation",
        units["Metadata_is_control"].to_numpy(bool),
        null_size=200,
    )
    assert flat["mean_map"] < activity["mean_map"] - 0.3
    genes = units[~units.Metadata_is_control.astype(bool)].drop_duplicates("Metadata_perturbation")
    profiles = np.stack(
        [x[(units.Metadata_perturbation == g).to_numpy()].mean(0) for g in genes.Metadata_perturbation]
    )
    consistency = consistency_map(
        profiles, genes.Metadata_perturbation.tolist(), genes.Metadata_complex.tolist(), null_size=200
    )
    assert consistency["mean_map"] > 0.9 and consistency["n_groups"] == 3
