"""The MU-Net (masked U-Net autoencoder): shapes, masking, the shared loss, saving/loading, the fixed-channel
refusal, learning, and pre-training through the `cellmae pretrain` loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from hf_cellmae import (
    CellMAEConfig,
    CellMAEForPreTraining,
    CellMAEImageProcessor,
    CellMUNetConfig,
    CellMUNetForImageClassification,
    CellMUNetForPreTraining,
    CellMUNetModel,
)
from hf_cellmae.modeling_munet import reconstruction_loss


def tiny(**overrides) -> CellMUNetConfig:
    """A three-level U-Net of a few tens of thousands of parameters on 32 px, 5-channel crops (4x4 patches of 8 px)."""
    return CellMUNetConfig.from_preset("tiny", num_channels=5, image_size=32, **overrides)


def images(batch=2, channels=5, size=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------- shapes
def test_pretraining_outputs_have_ca_mae_token_layout():
    config = tiny()
    out = CellMUNetForPreTraining(config)(images(), mask_seed=0)
    tokens = 5 * config.tokens_per_channel
    assert out.logits.shape == (2, tokens, config.patch_size**2)
    assert out.mask.shape == (2, tokens)
    assert int(out.mask[0].sum()) == tokens - int(tokens * (1 - config.mask_ratio))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_encoder_gives_a_pooled_embedding_and_one_feature_map_per_level():
    config = tiny()
    out = CellMUNetModel(config).eval()(images())
    assert out.pooler_output.shape == (2, config.hidden_size)
    assert [tuple(f.shape) for f in out.hidden_states] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(dim=(2, 3)))


def test_the_same_noise_masks_the_same_patches_as_ca_mae():
    noise = torch.rand(2, 5 * 16, generator=torch.Generator().manual_seed(1))
    munet = CellMUNetForPreTraining(tiny())(images(), noise=noise)
    camae = CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", image_size=32))(images(), noise=noise)
    assert torch.equal(munet.mask, camae.mask)


# ---------------------------------------------------------------------------------------------- the loss
def test_loss_is_ca_mae_loss_on_the_same_prediction():
    munet = CellMUNetForPreTraining(tiny(fourier_loss_weight=0.3))
    camae = CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", image_size=32, fourier_loss_weight=0.3))
    out = munet(images(), mask_seed=0)
    expected = camae.compute_loss(out.logits, images(), out.mask, (4, 4), 0.75)
    for got, want in zip((out.loss, out.mse_loss, out.fourier_loss), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mask_fill", ["learned", "zeros"])
@torch.no_grad()
def test_loss_does_not_depend_on_the_pixels_of_visible_patches_target(mask_fill):
    """Only masked patches are scored: changing the target pixels of visible patches leaves the loss alone."""
    model = CellMUNetForPreTraining(tiny(mask_fill=mask_fill)).eval()
    x = images()
    out = model(x, mask_seed=0)
    visible = 1 - out.mask  # (B, L)
    target = model.patchify(x)
    changed = model.unpatchify(target + 5.0 * visible.unsqueeze(-1), 5)  # visible patches' pixels shifted
    again = reconstruction_loss(model.config, out.logits, changed, out.mask, (4, 4), 0.75)
    assert [float(v) for v in again] == pytest.approx(
        [float(out.loss), float(out.mse_loss), float(out.fourier_loss)], rel=1e-6
    )


def test_masked_patches_reach_the_convolutions_as_the_fill_only():
    """The pixels of a masked patch do not change the encoder's input: they are replaced before the first conv."""
    model = CellMUNetForPreTraining(tiny()).eval()
    x = images()
    out = model(x, mask_seed=0)
    masked = out.mask.unsqueeze(-1)
    y = model.unpatchify(model.patchify(x) + 7.0 * masked, 5)  # only masked patches change
    assert torch.equal(model.mask_pixels(x, out.mask, (4, 4)), model.mask_pixels(y, out.mask, (4, 4)))
    torch.testing.assert_close(model(y, mask_seed=0).logits, out.logits)


# ------------------------------------------------------------------------------------------ channels
def test_a_wrong_channel_count_is_refused_naming_both_counts():
    model = CellMUNetModel(tiny(channel_names=["DNA", "ER", "RNA", "AGP", "Mito"]))
    with pytest.raises(
        ValueError, match=r"pixel_values has 3 channels but this MU-Net was built for exactly 5 \(DNA, ER"
    ):
        model(images(channels=3))
    with pytest.raises(ValueError, match="exactly 5"):
        CellMUNetForPreTraining(tiny())(images(channels=6))


def test_channel_ids_reorder_the_input_into_the_model_order_and_refuse_subsets():
    model = CellMUNetModel(tiny()).eval()
    x = images()
    order = [3, 0, 4, 1, 2]  # input channel i is model channel order[i]
    shuffled = x[:, order]
    torch.testing.assert_close(model(shuffled, channel_ids=order).pooler_output, model(x).pooler_output)
    with pytest.raises(ValueError, match="exactly once"):
        model(x, channel_ids=[0, 0, 1, 2, 3])


# ------------------------------------------------------------------------------------- saving / loading
def test_save_load_round_trip_through_auto_classes_with_safetensors(tmp_path):
    model = CellMUNetForPreTraining(tiny()).eval()
    model.save_pretrained(tmp_path)
    CellMAEImageProcessor(image_size=32).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert "mask_token" in weights.keys() and any(k.startswith("decoder.") for k in weights.keys())
    assert {"configuration_munet.py", "modeling_munet.py", "modeling_cellmae.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert type(AutoConfig.from_pretrained(tmp_path)) is CellMUNetConfig
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is CellMAEImageProcessor
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(reloaded) is CellMUNetForPreTraining
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(encoder) is CellMUNetModel and not info["missing_keys"]
    torch.testing.assert_close(encoder.eval()(images()).pooler_output, model.munet(images()).pooler_output)
    assert (
        type(AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3))
        is CellMUNetForImageClassification
    )


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package_and_gives_identical_embeddings(tmp_path):
    model = CellMUNetForPreTraining(tiny()).eval()
    model.save_pretrained(tmp_path / "model")
    CellMAEImageProcessor(image_size=32).save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_munet.CellMUNetModel"
    raw = np.random.default_rng(0).integers(0, 65535, size=(2, 5, 32, 32), dtype=np.uint16)
    np.save(tmp_path / "raw.npy", raw)
    with torch.no_grad():
        expected = model.munet(**CellMAEImageProcessor(image_size=32)(raw)).pooler_output.numpy()
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_cellmae"] = None  # the package cannot be imported
        import numpy as np, torch
        from transformers import AutoImageProcessor, AutoModel, AutoModelForPreTraining
        path = {str(tmp_path / "model")!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        raw = np.load({str(tmp_path / "raw.npy")!r})
        with torch.no_grad():
            got = model(**processor(raw)).pooler_output.numpy()
            loss = AutoModelForPreTraining.from_pretrained(path, trust_remote_code=True)(**processor(raw), mask_seed=0).loss
        assert np.array_equal(got, np.load({str(tmp_path / "expected.npy")!r}))
        print("REMOTE_OK", type(model).__name__, type(processor).__name__, bool(torch.isfinite(loss)))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE_OK CellMUNetModel CellMAEImageProcessor True" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------- learning
def test_a_few_optimisation_steps_decrease_the_loss_on_a_fixed_batch():
    model = CellMUNetForPreTraining(tiny())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = images(batch=4)
    losses = []
    for _ in range(8):
        loss = model(x, mask_seed=0).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients():
    model = CellMUNetForPreTraining(tiny())

    def grads():
        model.zero_grad()
        model(images(), mask_seed=0).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------- the loop, embed
def test_pretrain_with_model_type_munet_checkpoints_resumes_and_embeds(synthetic_shards, tmp_path):
    from hf_cellmae.evaluation import read_embeddings
    from hf_cellmae.evaluation.embed import ModelFeaturizer, embed_dataset
    from hf_cellmae.training.arguments import parse_pretraining_arguments
    from hf_cellmae.training.checkpoints import list_checkpoints
    from hf_cellmae.training.loop import pretrain

    def args(max_steps, **extra):
        values = dict(
            data=str(synthetic_shards),
            output_dir=str(tmp_path / "run"),
            model_type="munet",
            model_overrides=json.dumps({"image_size": 32}),
            max_steps=max_steps,
            per_device_train_batch_size=2,
            save_steps=2,
            logging_steps=1,
            figure_steps=0,
            report_to="none",
            progress_bar=False,
            optimizer="adamw",
            learning_rate=1e-3,
            lr_scheduler="constant",
            **extra,
        )
        return parse_pretraining_arguments([f"--{k}={v}" for k, v in values.items()])

    first = pretrain(args(2))
    assert [c.name for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-2"]
    resumed = pretrain(args(3, resume_from_checkpoint="latest"))
    assert resumed["global_step"] == 3 and first["global_step"] == 2
    model_dir = tmp_path / "run" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "cellmunet" and config["num_channels"] == 5
    assert type(AutoModelForPreTraining.from_pretrained(model_dir)) is CellMUNetForPreTraining
    featurizer = ModelFeaturizer(model_dir, batch_size=8)
    info = embed_dataset(synthetic_shards, tmp_path / "embeddings", featurizer, progress=False)
    table = read_embeddings(tmp_path / "embeddings")
    features = [c for c in table.columns if c.startswith("feature_")]
    assert info["num_rows"] == len(table) > 0 and len(features) == config["stage_channels"][-1]
    assert np.isfinite(table[features].to_numpy()).all()


def test_pretrain_refuses_a_channel_subset_for_a_fixed_channel_munet(synthetic_shards, tmp_path):
    from hf_cellmae.errors import UserError
    from hf_cellmae.training.arguments import PretrainingArguments
    from hf_cellmae.training.loop import pretrain

    with pytest.raises((UserError, ValueError), match="channel_subset"):
        pretrain(
            PretrainingArguments(
                data=str(synthetic_shards),
                output_dir=str(tmp_path),
                model_type="munet",
                channel_subset=3,
                max_steps=1,
                report_to="none",
                progress_bar=False,
            )
        )
