"""OpenPhenom weights: conversion of the state dict and equality of embeddings with OpenPhenom's `predict`.

The reference is `tests/helpers/openphenom_reference.py`, an independent functional statement of OpenPhenom's
computation written from the specification, run on OpenPhenom-layout weights.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining, CellMAEImageProcessor, CellMAEModel
from hf_cellmae.openphenom import convert_openphenom_state_dict, load_openphenom
from tests.helpers.openphenom_reference import (
    openphenom_key_shapes,
    random_openphenom_state_dict,
    reference_predict,
    reference_pretraining_loss,
)

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
    assert sorted(dropped) == sorted(
        [
            "decoder.placeholder",
            "decoder.pos_embeddings",
            "encoder.vit_backbone.pos_embed",
            "encoder.vit_backbone.fc_norm.weight",
            "encoder.vit_backbone.fc_norm.bias",
        ]
    )


def test_conversion_refuses_keys_it_does_not_know(openphenom_weights):
    state_dict = dict(openphenom_weights[0])
    state_dict["encoder.vit_backbone.head.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match="head.weight"):
        convert_openphenom_state_dict(state_dict)


@pytest.mark.parametrize("channels", [3, 6, pytest.param(11, marks=pytest.mark.slow)])  # 11: 7 s on CI
def test_converted_model_gives_openphenom_embeddings(openphenom_weights, converted, channels):
    state_dict = openphenom_weights[0]
    pixels = torch.from_numpy(
        np.random.default_rng(channels).integers(0, 256, (1, channels, 256, 256), dtype=np.uint8)
    )
    processor = CellMAEImageProcessor(image_size=256)
    with torch.no_grad():
        out = converted.cellmae(**processor(pixels.numpy()), output_channelwise_embeddings=True)
        pooled_ref, channelwise_ref = reference_predict(state_dict, pixels)
    torch.testing.assert_close(out.pooler_output, pooled_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.channelwise_embeddings.reshape(1, -1), channelwise_ref, atol=1e-4, rtol=0)
    # The embedding is not trivially small: the parity check has teeth.
    assert pooled_ref.abs().max() > 0.1


def encoder_only(converted_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `CellMAEModel` keys of a converted `CellMAEForPreTraining` state dict."""
    return {k.removeprefix("cellmae."): v for k, v in converted_state_dict.items() if k.startswith("cellmae.")}


def test_timm_1_0_24_mlp_bias_becomes_ordinary_mlp_and_qkv_biases(openphenom_weights, converted):
    raw = openphenom_weights[0]["encoder.vit_backbone.blocks.5.mlp_bias"]  # (1536,) added to fused outputs 1152:2688
    block = converted.cellmae.encoder.layers[5]
    assert torch.equal(block.mlp_bias[:1152], torch.zeros(1152)) and torch.equal(block.mlp_bias[1152:], raw[:384])
    assert torch.equal(block.qkv_bias, raw[384:])
    assert converted.config.parallel_mlp_bias_layout == "current" and converted.config.qkv_bias


def test_reading_the_bias_in_timm_1_0_25s_layout_would_break_parity(openphenom_weights, converted):
    current, _ = convert_openphenom_state_dict(openphenom_weights[0], mlp_bias_layout="current")
    other = CellMAEModel(CellMAEConfig.from_preset("openphenom")).eval()
    other.load_state_dict(encoder_only(current))
    inputs = CellMAEImageProcessor(image_size=256)(
        np.random.default_rng(1).integers(0, 256, (1, 256, 256), dtype=np.uint8)
    )
    with torch.no_grad():
        assert (converted.cellmae(**inputs).pooler_output - other(**inputs).pooler_output).abs().max() > 1e-3


def test_a_folder_saved_in_the_old_legacy_bias_layout_still_loads_with_openphenom_embeddings(
    openphenom_weights, tmp_path
):
    """hf_cellmae used to keep OpenPhenom's raw `mlp_bias` and switch on `parallel_mlp_bias_layout` in every
    forward; folders it saved (e.g. by `convert-openphenom`) hold no `qkv_bias`."""
    state_dict = openphenom_weights[0]
    converted_sd, _ = convert_openphenom_state_dict(state_dict)
    old = {k: v for k, v in encoder_only(converted_sd).items() if not k.endswith("qkv_bias")}
    for i in range(12):
        old[f"encoder.layers.{i}.mlp_bias"] = state_dict[f"encoder.vit_backbone.blocks.{i}.mlp_bias"]
    save_file(
        {k: v.contiguous() for k, v in old.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"}
    )
    config = CellMAEConfig.from_preset("openphenom").to_dict()
    config.update(qkv_bias=False, parallel_mlp_bias_layout="legacy_timm", architectures=["CellMAEModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))

    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (1, 2, 256, 256), dtype=np.uint8))
    with torch.no_grad():
        pooled = model.eval()(**CellMAEImageProcessor(image_size=256)(pixels.numpy())).pooler_output
        torch.testing.assert_close(pooled, reference_predict(state_dict, pixels)[0], atol=1e-4, rtol=0)
    # Saved again, it is in the current layout and loads to the same model.
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["parallel_mlp_bias_layout"] == "current"
    again = CellMAEModel.from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_converted_model_reconstruction_and_losses_equal_openphenoms(openphenom_weights, converted):
    pixels = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (1, 6, 256, 256), dtype=np.uint8))
    noise = torch.rand(1, 6 * 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = converted(**CellMAEImageProcessor(image_size=256)(pixels.numpy()), noise=noise)
        expected = reference_pretraining_loss(openphenom_weights[0], pixels, noise)
    assert torch.equal(out.mask, expected["mask"])
    torch.testing.assert_close(out.logits, expected["logits"], atol=1e-4, rtol=0)
    for name, ours in (("loss", out.loss), ("mse", out.mse_loss), ("fourier", out.fourier_loss)):
        torch.testing.assert_close(ours, expected[name], atol=1e-4, rtol=1e-4, msg=name)
    assert expected["logits"].abs().max() > 0.1


def test_a_genuine_safetensors_copy_loads_the_same(openphenom_weights, converted, tmp_path):
    save_file(openphenom_weights[0], str(tmp_path / "model.safetensors"))
    again = load_openphenom(tmp_path)
    for (name, a), (_, b) in zip(converted.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
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
    for output in (
        folder / "out",
        Path("/sys/cellmae-read-only-test"),
    ):  # root ignores folder modes; /sys is not writable
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
