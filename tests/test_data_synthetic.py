"""The synthetic screen: deterministic, relationships that match its phenotypes, batch effects, and the CLI."""

from __future__ import annotations

import itertools

import imagecodecs
import numpy as np
import pandas as pd
import pytest

from hf_cellmae.cli import main
from hf_cellmae.data.streaming import stream_fields
from hf_cellmae.data.synthetic import make_synthetic_screen

TINY = dict(
    num_plates=1,
    field_size=48,
    sites_per_well=1,
    num_pathways=1,
    complexes_per_pathway=2,
    genes_per_complex=2,
    replicates_per_plate=1,
    control_wells_per_plate=2,
    num_workers=1,
    progress=False,
)


def _read_field(root, row) -> np.ndarray:
    folder = root / "images" / row.experiment / row.plate
    return np.stack([imagecodecs.imread(folder / f"{row.well}_s{row.site}_w{c}.png") for c in range(1, 6)])


def _images(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "images").rglob("*.png"))}


def test_same_seed_gives_identical_screens(tmp_path):
    make_synthetic_screen(tmp_path / "a", seed=7, **TINY)
    make_synthetic_screen(tmp_path / "b", seed=7, **TINY)
    assert _images(tmp_path / "a") == _images(tmp_path / "b")
    assert (tmp_path / "a" / "metadata.csv").read_text() == (tmp_path / "b" / "metadata.csv").read_text()


def test_different_seed_gives_a_different_screen(tmp_path):
    make_synthetic_screen(tmp_path / "a", seed=7, **TINY)
    make_synthetic_screen(tmp_path / "b", seed=8, **TINY)
    assert _images(tmp_path / "a") != _images(tmp_path / "b")


def test_eight_bit_option_writes_uint8(tmp_path):
    make_synthetic_screen(tmp_path, bit_depth=8, **TINY)
    row = next(pd.read_csv(tmp_path / "metadata.csv").itertuples())
    field = _read_field(tmp_path, row)
    assert field.dtype == np.uint8 and field.shape == (5, 48, 48)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen")
    make_synthetic_screen(root, field_size=96, num_workers=2, progress=False)
    return root, pd.read_csv(root / "metadata.csv")


def test_metadata_labels_controls_and_genes(screen):
    _, metadata = screen
    controls = metadata[metadata.is_control]
    assert set(controls.perturbation) == {"non-targeting"} and controls.gene.isna().all()
    assert set(controls.plate) == {"Plate1", "Plate2"}
    genes = metadata[~metadata.is_control]
    assert (genes.perturbation == genes.gene).all() and genes.complex.notna().all()


def test_relationship_files_list_the_genes_sharing_a_complex_or_pathway(screen):
    root, metadata = screen
    genes = metadata[~metadata.is_control].drop_duplicates("gene")
    for level, name in (("complex", "complexes"), ("pathway", "pathways")):
        expected = {
            tuple(sorted(pair)) for _, group in genes.groupby(level) for pair in itertools.combinations(group.gene, 2)
        }
        pairs = pd.read_csv(root / "relationships" / f"{name}.csv")
        assert list(pairs.columns) == ["entity1", "entity2"]
        assert set(zip(pairs.entity1, pairs.entity2)) == expected


def _features(field: np.ndarray) -> np.ndarray:
    """Simple per-channel image statistics: log mean, log std, bright fraction, log edge energy."""
    out = []
    for channel in field.astype(np.float32):
        mean, std = channel.mean(), channel.std()
        edges = np.abs(
            4 * channel[1:-1, 1:-1] - channel[:-2, 1:-1] - channel[2:, 1:-1] - channel[1:-1, :-2] - channel[1:-1, 2:]
        ).mean()
        out += [np.log1p(mean), np.log1p(std), (channel > mean + std).mean(), np.log1p(edges)]
    return np.array(out)


def test_genes_of_one_complex_look_alike_and_others_do_not(screen):
    root, metadata = screen
    features = np.stack([_features(_read_field(root, row)) for row in metadata.itertuples()])
    for plate in metadata.plate.unique():  # centre and scale on each plate's controls (batch correction)
        on_plate = (metadata.plate == plate).values
        controls = on_plate & metadata.is_control.values
        features[on_plate] = (features[on_plate] - features[controls].mean(0)) / (features[controls].std(0) + 1e-6)
    genes = metadata[~metadata.is_control].drop_duplicates("gene")[["gene", "complex"]].values
    profiles = np.stack([features[(metadata.gene == gene).values].mean(0) for gene, _ in genes])
    profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
    similarity = profiles @ profiles.T
    same = [similarity[i, j] for i, j in itertools.combinations(range(len(genes)), 2) if genes[i][1] == genes[j][1]]
    other = [similarity[i, j] for i, j in itertools.combinations(range(len(genes)), 2) if genes[i][1] != genes[j][1]]
    assert np.mean(same) > np.mean(other) + 0.4


def test_plates_differ_by_a_batch_effect_that_knob_controls(tmp_path):
    def control_ratio(batch_effect):
        root = tmp_path / str(batch_effect)
        make_synthetic_screen(
            root,
            batch_effect=batch_effect,
            **{**TINY, "num_plates": 2, "control_wells_per_plate": 12, "field_size": 96, "sites_per_well": 2},
        )
        metadata = pd.read_csv(root / "metadata.csv")
        means = {
            plate: np.mean([_read_field(root, r).mean(axis=(1, 2)) for r in group.itertuples()], axis=0)
            for plate, group in metadata[metadata.is_control].groupby("plate")
        }
        return np.abs(np.log(means["Plate1"] / means["Plate2"])).mean()

    assert control_ratio(1.0) > 2 * control_ratio(0.0)


def test_cli_synthetic_then_shard_then_stream(tmp_path, capsys):
    assert (
        main(
            [
                "synthetic",
                str(tmp_path / "screen"),
                "--plates",
                "1",
                "--field-size",
                "64",
                "--sites",
                "1",
                "--quiet",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    hint = capsys.readouterr().out
    assert "next: cellmae shard" in hint and "--channels w1=DNA,w2=ER,w3=RNA,w4=AGP,w5=Mito" in hint  # per file token
    code = main(
        [
            "shard",
            str(tmp_path / "screen" / "images"),
            str(tmp_path / "shards"),
            "--metadata",
            str(tmp_path / "screen" / "metadata.csv"),
            "--channels",
            "w1=DNA,w2=ER,w3=RNA,w4=AGP,w5=Mito",
            "--quiet",
            "--num-workers",
            "1",
            "--verify",
        ]
    )
    assert code == 0 and "verified" in capsys.readouterr().out
    sample = next(iter(stream_fields(str(tmp_path / "shards"), image_size=32, crops_per_field=2)))
    assert sample["pixel_values"].shape == (5, 32, 32) and sample["perturbation"]
    assert list(sample["channel_ids"]) == [0, 1, 2, 3, 4]


def test_cli_shard_reports_a_missing_input_folder_in_one_line_with_exit_2(tmp_path, capsys):
    assert main(["shard", str(tmp_path / "nope"), str(tmp_path / "shards"), "--layout", "rxrx"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.startswith("cellmae shard: error:") and len(err.strip().splitlines()) == 1


def test_synthetic_into_an_unwritable_folder_fails_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # unwritable for every user, root included
    code = main(
        ["synthetic", str(blocker / "plate"), "--plates", "1", "--field-size", "32", "--quiet", "--num-workers", "1"]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert f"cannot write the synthetic screen to {blocker / 'plate'}" in error


def test_the_screen_size_holds_240_genes_in_30_complexes_and_10_pathways_on_4_plates():
    from hf_cellmae.data.synthetic import SCREEN_SIZES, SyntheticScreenConfig, design_screen, true_relationships

    config = SyntheticScreenConfig(**SCREEN_SIZES["screen"])
    genes = design_screen(config)["genes"]
    assert config.num_plates == 4 and len(genes) == len({g["gene"] for g in genes}) == 240
    assert len({g["complex"] for g in genes}) == 30 and len({g["pathway"] for g in genes}) == 10
    pairs = true_relationships(genes)
    assert len(pairs["complexes"]) == 30 * 28 and len(pairs["pathways"]) == 10 * (24 * 23 // 2)


def test_the_screen_size_draws_the_demo_genes_phenotypes_by_the_same_model():
    """Only the counts change: the demo's first pathway (the first genes drawn) is the same in both sizes."""
    from hf_cellmae.data.synthetic import SCREEN_SIZES, SyntheticScreenConfig, design_screen

    demo = design_screen(SyntheticScreenConfig())["genes"]
    screen = design_screen(SyntheticScreenConfig(**SCREEN_SIZES["screen"]))["genes"]
    assert [g["gene"] for g in demo[:4]] == [g["gene"] for g in screen[:4]] == ["CPLXA1", "CPLXA2", "CPLXA3", "CPLXA4"]
    np.testing.assert_allclose(demo[0]["phenotype"], screen[0]["phenotype"])


def test_cli_synthetic_size_screen_writes_the_requested_counts(tmp_path, capsys):
    root = tmp_path / "screen"
    assert (
        main(
            [
                "synthetic",
                str(root),
                "--size",
                "screen",
                "--plates",
                "1",
                "--field-size",
                "32",
                "--sites",
                "1",
                "--quiet",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    metadata = pd.read_csv(root / "metadata.csv", keep_default_na=False)
    treated = metadata[~metadata["is_control"]]
    assert metadata["plate"].unique().tolist() == ["Plate1"]  # --plates overrides the size's 4
    assert (treated["gene"].nunique(), treated["complex"].nunique(), treated["pathway"].nunique()) == (240, 30, 10)
    assert metadata["is_control"].sum() == 24
    assert len(pd.read_csv(root / "relationships" / "complexes.csv")) == 840
    assert len(pd.read_csv(root / "relationships" / "pathways.csv")) == 2760
