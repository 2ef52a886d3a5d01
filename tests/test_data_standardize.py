"""The data package's standardisation is the model's input contract."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from hf_cellmae.data.standardize import rescale_factor_for_dtype, standardize_channels


def _sample(dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    pixels = rng.integers(0, top // 4, size=(2, 3, 16, 16)).astype(dtype)
    pixels[1, 2] = 7  # a constant channel
    return pixels


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_matches_the_model_image_processor(dtype):
    if importlib.util.find_spec("hf_cellmae.image_processing_cellmae") is None:
        pytest.skip("hf_cellmae.image_processing_cellmae is not there yet (the model stage)")
    from hf_cellmae.image_processing_cellmae import standardize_channels as model_standardize

    pixels = _sample(dtype)
    np.testing.assert_allclose(standardize_channels(pixels), model_standardize(pixels), atol=2e-5)
    torch.testing.assert_close(
        standardize_channels(
            torch.from_numpy(pixels.astype(np.int32)), rescale_factor=rescale_factor_for_dtype(dtype)
        ),
        model_standardize(torch.from_numpy(pixels.astype(np.int32)), rescale_factor=rescale_factor_for_dtype(dtype)),
    )


def test_rescale_factor_follows_the_dtype():
    assert rescale_factor_for_dtype(np.uint8) == 1 / 255
    assert rescale_factor_for_dtype(np.uint16) == 1 / 65535
    assert rescale_factor_for_dtype(np.float32) == 1.0
    assert rescale_factor_for_dtype(torch.uint8) == 1 / 255


def test_constant_channel_becomes_zero_and_others_unit_variance():
    out = standardize_channels(_sample(np.uint16))
    assert np.all(out[1, 2] == 0)
    np.testing.assert_allclose(out[0].std(axis=(-2, -1)), 1.0, atol=1e-3)


def test_numpy_and_torch_paths_agree():
    pixels = _sample(np.uint8)
    np.testing.assert_allclose(
        standardize_channels(pixels), standardize_channels(torch.from_numpy(pixels)).numpy(), atol=1e-5
    )


def test_rescale_matters_through_eps():
    """OpenPhenom's /255 is only visible through eps: the same pixels as float32 (no rescale) differ."""
    pixels = _sample(np.uint8)
    assert not np.allclose(
        standardize_channels(pixels), standardize_channels(pixels.astype(np.float32) / 255 * 255), atol=1e-4
    )
