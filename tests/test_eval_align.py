"""Control-based batch correction (center-scale, PCA-center-scale, TVN + CORAL) and aggregation."""

import numpy as np
import pytest

from hf_cellmae.evaluation.align import aggregate, align, center_scale, pca_center_scale, tvn


def _plate(seed=0, n_per_batch=60, width=4, n_batches=2):
    """Units with a per-batch shift and scale; the first 40 of each batch are controls."""
    rng = np.random.default_rng(seed)
    features, is_control, batch = [], [], []
    mixing = rng.standard_normal((width, width))
    for b in range(n_batches):
        block = rng.standard_normal((n_per_batch, width)) @ mixing * (1 + b) + 5.0 * b
        features.append(block)
        is_control += [True] * 40 + [False] * (n_per_batch - 40)
        batch += [f"plate{b}"] * n_per_batch
    return np.concatenate(features), np.array(is_control), np.array(batch)


def test_center_scale_matches_hand_computed_case():
    features = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 8.0]])
    is_control = np.array([True, True, False])
    # control mean (2, 4), population std (1, 2)
    expected = np.array([[-1.0, -1.0], [1.0, 1.0], [3.0, 2.0]])
    np.testing.assert_allclose(center_scale(features, is_control), expected)


def test_center_scale_gives_each_batch_zero_mean_unit_variance_controls():
    features, is_control, batch = _plate()
    out = center_scale(features, is_control, batch)
    for label in np.unique(batch):
        controls = out[(batch == label) & is_control]
        np.testing.assert_allclose(controls.mean(axis=0), 0.0, atol=1e-12)
        np.testing.assert_allclose(controls.std(axis=0), 1.0, atol=1e-12)


def test_center_scale_keeps_constant_feature_finite():
    features = np.array([[1.0, 7.0], [3.0, 7.0], [2.0, 9.0]])
    out = center_scale(features, np.array([True, True, False]))
    np.testing.assert_allclose(out[:, 1], [0.0, 0.0, 2.0])


def test_tvn_whitens_pooled_controls_to_identity_covariance():
    features, is_control, _ = _plate()
    out = tvn(features, is_control)
    controls = out[is_control]
    np.testing.assert_allclose(controls.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.cov(controls, rowvar=False, ddof=0), np.eye(features.shape[1]), atol=1e-10)


def test_tvn_is_invariant_to_an_invertible_linear_map_of_the_embedding():
    # Whitening on controls removes any linear distortion up to a rotation: cosines are unchanged.
    features, is_control, _ = _plate(seed=1)
    distortion = np.random.default_rng(2).standard_normal((4, 4)) + 4 * np.eye(4)
    a, b = tvn(features, is_control), tvn(features @ distortion, is_control)
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-8)


def test_tvn_coral_whitens_each_batch_when_ridge_is_negligible():
    features, is_control, batch = _plate(seed=3)
    out = tvn(features, is_control, batch, coral=True, coral_eps=1e-12)
    for label in np.unique(batch):
        controls = out[(batch == label) & is_control]
        np.testing.assert_allclose(np.cov(controls, rowvar=False, ddof=1), np.eye(4), atol=1e-8)


def test_tvn_coral_scales_one_dimensional_batch_by_inverse_sqrt_of_variance_plus_ridge():
    features, is_control, batch = _plate(seed=4, width=1)
    before = tvn(features, is_control, batch, scale_per_batch=False)
    after = tvn(features, is_control, batch, coral=True, scale_per_batch=False)
    for label in np.unique(batch):
        rows = batch == label
        variance = np.var(before[rows & is_control], ddof=1)
        np.testing.assert_allclose(after[rows], before[rows] / np.sqrt(variance + 0.5))


def test_tvn_per_batch_scaling_removes_plate_shift_of_controls():
    features, is_control, batch = _plate(seed=5)
    out = tvn(features, is_control, batch)
    for label in np.unique(batch):
        np.testing.assert_allclose(out[(batch == label) & is_control].mean(axis=0), 0.0, atol=1e-10)


def test_pca_center_scale_decorrelates_pooled_controls_and_truncates():
    features, is_control, _ = _plate(seed=6)
    out = pca_center_scale(features, is_control, n_components=3)
    assert out.shape == (len(features), 3)
    np.testing.assert_allclose(np.cov(out[is_control], rowvar=False, ddof=0), np.eye(3), atol=1e-10)


def test_batch_without_controls_raises_naming_the_batch():
    features, is_control, batch = _plate()
    is_control[batch == "plate1"] = False
    with pytest.raises(ValueError, match="plate1.*0 control"):
        center_scale(features, is_control, batch)


def test_tvn_with_fewer_controls_than_dimensions_whitens_the_span_of_the_controls_and_says_so():
    features = np.random.default_rng(0).standard_normal((20, 8))
    is_control = np.arange(20) < 6
    with pytest.warns(UserWarning, match="6 control units for 8 dimensions"):
        out = tvn(features, is_control)
    assert out.shape == (20, 5)
    np.testing.assert_allclose(out[is_control].mean(0), 0, atol=1e-10)


def test_coral_without_batch_labels_raises():
    features, is_control, _ = _plate()
    with pytest.raises(ValueError, match="coral=True needs batch"):
        tvn(features, is_control, coral=True)


def test_align_rejects_unknown_method_and_nan_rows():
    features, is_control, _ = _plate()
    with pytest.raises(ValueError, match="unknown alignment method 'whiten'"):
        align(features, is_control, method="whiten")
    features[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in 1 rows"):
        align(features, is_control, method="center_scale")


def test_aggregate_mean_and_median_drop_controls():
    features = np.array([[0.0], [2.0], [10.0], [1.0], [2.0], [9.0]])
    labels = ["B", "B", "B", "A", "ctrl", "ctrl"]
    names, means = aggregate(features, labels, drop=["ctrl"])
    assert names.tolist() == ["A", "B"]
    np.testing.assert_allclose(means[:, 0], [1.0, 4.0])
    _, medians = aggregate(features, labels, method="median", drop=["ctrl"])
    np.testing.assert_allclose(medians[:, 0], [1.0, 2.0])


def test_tvn_with_n_components_whitens_a_table_wider_than_its_controls():
    from hf_cellmae.evaluation.align import tvn

    rng = np.random.default_rng(0)
    features = rng.standard_normal((60, 40)) @ rng.standard_normal((40, 40))
    is_control = np.arange(60) < 30  # 30 controls, 40 dimensions: plain TVN cannot whiten
    with pytest.warns(UserWarning, match="whitening the first 29 principal components"):
        reduced = tvn(features, is_control)
    assert reduced.shape == (60, 29)
    with pytest.raises(ValueError, match="n_components < 30"):
        tvn(features, is_control, n_components=35)
    out = tvn(features, is_control, n_components=10)
    assert out.shape == (60, 10)
    np.testing.assert_allclose(np.cov(out[is_control], rowvar=False, ddof=0), np.eye(10), atol=1e-8)
