"""CellProfiler features: classical segmentation, cp-measure per field, and ridge prediction from embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("cp_measure", reason="CellProfiler features need the cp-measure package")

from hf_cellmae.evaluation.cellprofiler import (  # noqa: E402
    CellProfilerFeaturizer,
    cellprofiler_prediction,
    feature_category,
    plot_cellprofiler_prediction,
    segment_field,
)
from hf_cellmae.evaluation.embed import Field  # noqa: E402

CHANNELS = ["DNA", "ER", "Mito"]


def cells_field(centres, nucleus_radius=5.0, cell_radius=11.0, size=96, seed=0) -> np.ndarray:
    """(3, size, size) uint16: bright discs (nuclei) in DNA, larger discs (cytoplasm) in ER and Mito, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((3, size, size))
    for y, x in centres:
        radius = np.hypot(yy - y, xx - x)
        image[0] += radius < nucleus_radius
        image[1] += 0.6 * (radius < cell_radius)
        image[2] += 0.4 * (radius < cell_radius) * (1 + np.sin(xx / 2.0))
    image = np.clip(image, 0, 1) * 0.7 + 0.02 + 0.01 * rng.random(image.shape)
    return (image * 65535).astype(np.uint16)


SEPARATE = [(20, 20), (20, 70), (70, 20), (70, 70)]


def test_segmentation_finds_each_nucleus_and_grows_one_cell_around_it():
    nuclei, cells = segment_field(cells_field(SEPARATE), nuclei_channel=0, nucleus_diameter=10)
    assert nuclei.max() == 4
    assert cells.max() == 4
    for label in range(1, 5):
        # the cell of nucleus i contains nucleus i and is larger than it (it is the cytoplasm disc)
        assert np.all(cells[nuclei == label] == label)
        assert (cells == label).sum() > 3 * (nuclei == label).sum()


def test_segmentation_splits_touching_nuclei():
    touching = [(40, 34), (40, 45)]  # radius 5 discs 11 px apart: one connected blob above threshold
    nuclei, _ = segment_field(cells_field(touching, nucleus_radius=6.0), nuclei_channel=0, nucleus_diameter=10)
    assert nuclei.max() == 2


def test_segmentation_of_an_empty_field_returns_no_objects():
    nuclei, cells = segment_field(np.zeros((3, 64, 64), np.uint16), nuclei_channel=0)
    assert nuclei.max() == 0 and cells.max() == 0


def test_featurizer_measures_every_category_and_sees_larger_nuclei():
    featurizer = CellProfilerFeaturizer(nucleus_diameter=10)
    small = Field(cells_field(SEPARATE, nucleus_radius=4.0), CHANNELS, {})
    large = Field(cells_field(SEPARATE, nucleus_radius=7.0), CHANNELS, {})
    features, counts = featurizer([small, large])
    names = featurizer.feature_names(CHANNELS)
    assert features.shape == (2, len(names)) and np.isfinite(features).all()
    assert list(counts) == [4, 4]
    assert {feature_category(n) for n in names} == {
        "AreaShape",
        "Intensity",
        "Texture",
        "Granularity",
        "RadialDistribution",
        "Correlation",
    }
    assert not any("Location" in n or "Center" in n for n in names)  # where a cell is, not what it is
    area = names.index("Nuclei_AreaShape_Area")
    assert features[1, area] > 2 * features[0, area]


def test_intensity_shape_set_measures_only_intensity_and_area_shape_and_the_same_values():
    """The demo's cheap set: two categories, each feature the same value as in the "fast" set."""
    cheap = CellProfilerFeaturizer(nucleus_diameter=10, feature_set="intensity_shape")
    fast = CellProfilerFeaturizer(nucleus_diameter=10)
    field = Field(cells_field(SEPARATE, nucleus_radius=6.0), CHANNELS, {})
    names, fast_names = cheap.feature_names(CHANNELS), fast.feature_names(CHANNELS)
    assert {feature_category(n) for n in names} == {"AreaShape", "Intensity"}
    assert "Cells_AreaShape_Zernike_0_0" in names and "Nuclei_AreaShape_MaxFeretDiameter" in names
    shared = [n for n in names if n in fast_names]
    assert len(shared) > 100
    values = dict(zip(names, cheap([field])[0][0]))
    fast_values = dict(zip(fast_names, fast([field])[0][0]))
    np.testing.assert_allclose([values[n] for n in shared], [fast_values[n] for n in shared], rtol=1e-5)


def test_featurizer_finds_the_nuclear_stain_by_name_or_says_which_to_pass():
    field = Field(cells_field(SEPARATE)[[1, 0, 2]], ["ER", "DNA", "Mito"], {})
    _, counts = CellProfilerFeaturizer(nucleus_diameter=10)([field])
    assert counts[0] == 4  # found DNA as channel 1
    unnamed = Field(field.pixels, ["w1", "w2", "w3"], {})
    with pytest.raises(ValueError, match="nuclei_channel"):
        CellProfilerFeaturizer()([unnamed])
    _, counts = CellProfilerFeaturizer(nuclei_channel="w2", nucleus_diameter=10)([unnamed])
    assert counts[0] == 4


def test_a_field_without_nuclei_gets_zero_features_and_is_counted():
    featurizer = CellProfilerFeaturizer(nucleus_diameter=10)
    features, counts = featurizer(
        [Field(np.zeros((3, 64, 64), np.uint16), CHANNELS, {}), Field(cells_field(SEPARATE), CHANNELS, {})]
    )
    assert counts[0] == 0 and not features[0].any()
    assert featurizer.empty_fields == 1


def feature_tables(seed=0, fields=120):
    """Embeddings carrying two CellProfiler features linearly; a third feature is pure noise."""
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame(
        {
            "Metadata_field_id": [f"f{i}" for i in range(fields)],
            "Metadata_plate": "P1",
            "Metadata_well": [f"W{i // 3}" for i in range(fields)],
        }
    )
    latent = rng.standard_normal((fields, 2))
    embeddings = pd.concat(
        [
            meta,
            pd.DataFrame(
                np.c_[latent @ rng.standard_normal((2, 8)), 0.1 * rng.standard_normal((fields, 8))],
                columns=[f"feature_{i:03d}" for i in range(16)],
            ),
        ],
        axis=1,
    )
    cellprofiler = pd.concat(
        [
            meta,
            pd.DataFrame(
                {
                    "Cells_AreaShape_Area": 3 * latent[:, 0] + 10,
                    "Cells_Intensity_MeanIntensity__ER": latent[:, 1],
                    "Cells_Texture_Contrast_3_00__ER": rng.standard_normal(fields),
                    "Cells_Granularity_1__ER": np.ones(fields),  # constant: skipped
                }
            ),
        ],
        axis=1,
    )
    return embeddings, cellprofiler.sample(frac=1.0, random_state=seed)  # row order must not matter


def test_prediction_r2_is_high_for_encoded_features_and_not_for_noise(tmp_path):
    embeddings, cellprofiler = feature_tables()
    result = cellprofiler_prediction(embeddings, cellprofiler)
    assert result["n_fields"] == 120 and result["n_features"] == 3
    assert result["per_feature"]["Cells_AreaShape_Area"] > 0.9
    assert result["per_feature"]["Cells_Intensity_MeanIntensity__ER"] > 0.9
    assert result["per_feature"]["Cells_Texture_Contrast_3_00__ER"] < 0.1
    assert set(result["per_category"]) == {"AreaShape", "Intensity", "Texture"}
    plot_cellprofiler_prediction({"model": result, "baseline": result}, tmp_path / "cp.png")
    assert (tmp_path / "cp.png").stat().st_size > 0


def test_prediction_refuses_tables_that_share_no_fields():
    embeddings, cellprofiler = feature_tables()
    cellprofiler["Metadata_field_id"] = "other-" + cellprofiler["Metadata_field_id"]
    with pytest.raises(ValueError, match="fields are in both tables"):
        cellprofiler_prediction(embeddings, cellprofiler)
