"""OpenPhenom weights: conversion of the state dict and equality of embeddings with OpenPhenom's `predict`.

The reference is `tests/openphenom_reference.py`, an independent functional statement of OpenPhenom's
computation written from the specification, run on OpenPhenom-layout weights.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining, CellMAEImageProcessor
from hf_cellmae.openphenom import convert_openphenom_state_dict, load_openphenom

from openphenom_reference import openphenom_key_shapes, random_openphenom_state_dict, reference_predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def openphenom_weights(tmp_path_factory):
    """Random weights saved exactly as OpenPhenom ships them: a torch zip pickle named model.safetensors."""
    state_dict = random_openphenom_state_dict(seed=0)
    folder = tmp_path_factory.mktemp("openphenom")
    torch.save({"state_dict": state_dict}, folder / "model.safetensors")
    return state_dict, folder


@pytest.fixture(scope="module")
def converted(openphenom_weights):
    return load_openphenom(openphenom_weights[1] / "model.safetensors")


def test_reference_layout_has_openphenoms_765_keys():
    assert len(openphenom_key_shapes()) == 765


def test_conversion_fills_every_parameter_of_the_openphenom_preset_and_lists_what_it_drops(openphenom_weights):
    converted, dropped = convert_openphenom_state_dict(openphenom_weights[0])
    expected = CellMAEForPreTraining(CellMAEConfig.from_preset("openphenom")).state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert sorted(dropped) == sorted([
        "decoder.placeholder", "decoder.pos_embeddings", "encoder.vit_backbone.pos_embed",
        "encoder.vit_backbone.fc_norm.weight", "encoder.vit_backbone.fc_norm.bias"])


def test_conversion_refuses_keys_it_does_not_know(openphenom_weights):
    state_dict = dict(openphenom_weights[0])
    state_dict["encoder.vit_backbone.head.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match="head.weight"):
        convert_openphenom_state_dict(state_dict)


@pytest.mark.parametrize("channels", [3, 6, 11])
def test_converted_model_gives_openphenom_embeddings(openphenom_weights, converted, channels):
    state_dict = openphenom_weights[0]
    pixels = torch.from_numpy(np.random.default_rng(channels).integers(0, 256, (1, channels, 256, 256), dtype=np.uint8))
    processor = CellMAEImageProcessor(image_size=256)
    with torch.no_grad():
        out = converted.cellmae(**processor(pixels.numpy()), output_channelwise_embeddings=True)
        pooled_ref, channelwise_ref = reference_predict(state_dict, pixels)
    torch.testing.assert_close(out.pooler_output, pooled_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.channelwise_embeddings.reshape(1, -1), channelwise_ref, atol=1e-4, rtol=0)
    # The embedding is not trivially small: the parity check has teeth.
    assert pooled_ref.abs().max() > 0.1


def test_timm_bias_layout_switch_is_needed_for_parity(converted):
    inputs = CellMAEImageProcessor(image_size=256)(np.random.default_rng(1).integers(0, 256, (3, 256, 256), dtype=np.uint8))
    with torch.no_grad():
        legacy_out = converted.cellmae(**inputs).pooler_output
        converted.config.parallel_mlp_bias_layout = "current"
        try:
            current_out = converted.cellmae(**inputs).pooler_output
        finally:
            converted.config.parallel_mlp_bias_layout = "legacy_timm"
    assert (legacy_out - current_out).abs().max() > 1e-3


def test_converted_model_reconstructs_six_channel_images(converted):
    out = converted(torch.randn(1, 6, 256, 256), mask_seed=0)
    assert out.logits.shape == (1, 6 * 256, 256) and torch.isfinite(out.loss)


def test_a_genuine_safetensors_copy_loads_the_same(openphenom_weights, converted, tmp_path):
    save_file(openphenom_weights[0], str(tmp_path / "model.safetensors"))
    again = load_openphenom(tmp_path)
    for (name, a), (_, b) in zip(converted.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_convert_script_writes_a_folder_auto_model_loads(openphenom_weights, converted, tmp_path, capsys):
    script = runpy.run_path(str(REPO / "scripts" / "convert_openphenom.py"))
    assert script["main"]([str(openphenom_weights[1]), str(tmp_path / "out")]) == 0
    assert "AutoModel.from_pretrained" in capsys.readouterr().out
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    pixels = np.random.default_rng(2).integers(0, 256, (3, 512, 512), dtype=np.uint8)
    inputs = processor(pixels)
    assert inputs["pixel_values"].shape == (4, 3, 256, 256)  # RxRx3-core recipe: 4 crops of a 512 px field
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).pooler_output, converted.cellmae(**inputs).pooler_output)


class _CreatesMarkerWhenUnpickled:
    """A pickled object that creates `path` when loaded: what a crafted weights file could do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_pickle_is_refused_in_one_line_without_running_or_advising_an_unsafe_load(tmp_path, capsys):
    from hf_cellmae.cli import main

    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"payload": _CreatesMarkerWhenUnpickled(marker)}}, tmp_path / "model.safetensors")
    assert main(["convert-openphenom", str(tmp_path / "model.safetensors"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / 'model.safetensors'} is not trusted: it asks for io.open" in err
    assert "weights_only=False" not in err and "OpenPhenom" in err


def test_a_read_only_output_folder_is_refused_before_the_weights_are_read(openphenom_weights, tmp_path, capsys):
    from hf_cellmae.cli import main

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for output in (folder / "out", Path("/sys/cellmae-read-only-test")):  # root ignores folder modes; /sys is not writable
        try:
            output.mkdir()
        except OSError:
            break
        output.rmdir()
    else:
        pytest.skip("no read-only folder available on this machine")
    assert main(["convert-openphenom", str(openphenom_weights[1]), str(output)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"cannot write the converted model to {output}" in err, err
