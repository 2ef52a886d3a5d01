"""The image processor and the `cell-feature-extraction` pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

from hf_cellmae import CellMAEConfig, CellMAEImageProcessor, CellMAEModel
from hf_cellmae.image_processing_cellmae import crop_boxes, standardize_channels

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_uint8_standardisation_is_openphenoms_divide_by_255_and_instance_norm():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    expected = torch.nn.InstanceNorm2d(3, eps=1e-5)(torch.from_numpy(pixels).float() / 255)
    torch.testing.assert_close(torch.from_numpy(standardize_channels(pixels)), expected, atol=1e-5, rtol=1e-5)


def test_numpy_and_torch_inputs_standardise_identically():
    pixels = np.random.default_rng(1).integers(0, 65535, (3, 20, 20)).astype(np.uint16)
    from_numpy = standardize_channels(pixels)
    from_torch = standardize_channels(torch.from_numpy(pixels.astype(np.int32)), rescale_factor=1 / 65535)
    np.testing.assert_allclose(from_numpy, from_torch.numpy(), atol=1e-5)


def test_sixteen_bit_values_are_kept_not_clipped_to_255():
    pixels = np.zeros((1, 8, 8), np.uint16)
    pixels[0, :4] = 1000
    pixels[0, 4:] = 50000  # far above 255: a clipping processor would flatten both halves to 255
    out = standardize_channels(pixels)
    assert out[0, 0, 0] == pytest.approx(-1.0, abs=1e-3) and out[0, 7, 0] == pytest.approx(1.0, abs=1e-3)


def test_constant_channel_becomes_zeros():
    pixels = np.full((2, 8, 8), 77, np.uint8)
    assert np.array_equal(standardize_channels(pixels), np.zeros((2, 8, 8), np.float32))


def test_center_crop_and_tiles_cover_the_field_as_documented():
    assert crop_boxes(520, 696, 256, "center") == [(132, 220)]
    assert crop_boxes(512, 512, 256, "tile") == [(0, 0), (0, 256), (256, 0), (256, 256)]
    assert crop_boxes(520, 696, 256, "tile") == [(4, 92), (4, 348), (260, 92), (260, 348)]


def test_tiles_carry_the_index_of_their_source_image():
    processor = CellMAEImageProcessor(image_size=32, crop_mode="tile")
    fields = [np.random.default_rng(i).integers(0, 255, (4, 64, 96), dtype=np.uint8) for i in range(2)]
    out = processor(fields)
    assert out["pixel_values"].shape == (12, 4, 32, 32)
    assert out["image_index"].tolist() == [0] * 6 + [1] * 6
    expected = standardize_channels(fields[1][:, 32:64, 64:96])
    np.testing.assert_allclose(out["pixel_values"][-1].numpy(), expected, atol=1e-6)


def test_batched_and_single_images_and_2d_images_are_accepted():
    processor = CellMAEImageProcessor(image_size=16)
    batch = np.random.default_rng(0).random((3, 2, 16, 16)).astype(np.float32)
    assert processor(batch)["pixel_values"].shape == (3, 2, 16, 16)
    assert processor(batch[0])["pixel_values"].shape == (1, 2, 16, 16)
    assert processor(batch[0, 0])["pixel_values"].shape == (1, 1, 16, 16)
    assert isinstance(processor(batch, return_tensors="np")["pixel_values"], np.ndarray)


@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((3, 10, 10), np.uint8), "smaller than image_size=16"),
        ([np.zeros((3, 16, 16)), np.zeros((4, 16, 16))], "image 1 has 4 channels but image 0 has 3"),
        (np.zeros((1, 1, 3, 16, 16)), "5 dimensions"),
        ("image.png", "must be numpy arrays or torch tensors"),
    ],
)
def test_bad_images_raise_a_clear_error(images, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CellMAEImageProcessor(image_size=16)(images)


def test_processor_round_trips_through_save_pretrained(tmp_path):
    CellMAEImageProcessor(
        image_size=48, crop_mode="tile", rescale_factor=1 / 4095, channel_names=["DNA", "ER"]
    ).save_pretrained(tmp_path)
    loaded = CellMAEImageProcessor.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.crop_mode, loaded.rescale_factor, loaded.channel_names) == (
        48,
        "tile",
        1 / 4095,
        ["DNA", "ER"],
    )


def test_pipeline_returns_the_mean_embedding_of_an_images_crops():
    model = CellMAEModel(CellMAEConfig.from_preset("tiny", image_size=32)).eval()
    processor = CellMAEImageProcessor(image_size=32, crop_mode="tile")
    embed = pipeline("cell-feature-extraction", model=model, image_processor=processor)
    field = np.random.default_rng(0).integers(0, 65535, (5, 64, 64)).astype(np.uint16)
    with torch.no_grad():
        crops = model(**processor(field)).pooler_output  # 4 crops
    np.testing.assert_allclose(embed(field), crops.mean(0).numpy(), atol=1e-6)
    assert embed(field, channelwise=True).shape == (5, model.config.hidden_size)


def test_pipeline_embeds_a_real_16_bit_five_channel_cell_painting_site():
    folder = DATA / "cellpainting_bbbc022" / "images"
    if not folder.exists():
        pytest.skip(f"real images not found: {folder}")
    import tifffile

    site = np.stack([tifffile.imread(folder / f"plate1_A14_site1_Ch{c}.tif") for c in range(1, 6)])
    assert site.dtype == np.uint16 and site.shape == (5, 520, 696)
    model = CellMAEModel(CellMAEConfig.from_preset("tiny")).eval()
    embed = pipeline(
        "cell-feature-extraction", model=model, image_processor=CellMAEImageProcessor(image_size=64, crop_mode="tile")
    )
    vector = embed(site)
    assert vector.shape == (model.config.hidden_size,) and np.isfinite(vector).all()


def test_pipeline_loads_a_model_folder_by_path_without_asking_about_remote_code(tmp_path, monkeypatch):
    model = CellMAEModel(CellMAEConfig.from_preset("tiny", image_size=32)).eval()
    model.save_pretrained(tmp_path)
    CellMAEImageProcessor(image_size=32).save_pretrained(tmp_path)

    questions = []
    monkeypatch.setattr("builtins.input", lambda *args, **kwargs: questions.append(args) or "n")
    embed = pipeline("cell-feature-extraction", model=str(tmp_path))
    assert questions == []
    assert embed(np.zeros((3, 32, 32), np.uint8) + np.arange(32, dtype=np.uint8)).shape == (model.config.hidden_size,)
