"""The CA-MAE model: shapes, channel handling, masking, losses, saving/loading, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForPreTraining

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining, CellMAEImageProcessor, CellMAEModel, modeling_cellmae
from hf_cellmae.modeling_cellmae import fourier_loss, mse_loss, patchify, sincos_position_embedding, unpatchify


def tiny(**overrides) -> CellMAEConfig:
    """A few-thousand-parameter model on 32x32 crops (4x4 patches of 8 px)."""
    return CellMAEConfig.from_preset("tiny", image_size=32, **overrides)


def images(batch=2, channels=5, size=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("channels", range(1, 9))
def test_output_shapes_for_every_channel_count_up_to_max(channels):
    config = tiny()
    model = CellMAEForPreTraining(config).eval()
    tokens = channels * config.tokens_per_channel
    out = model(images(channels=channels), mask_seed=0)
    assert out.logits.shape == (2, tokens, config.patch_size**2)
    assert out.mask.shape == (2, tokens)
    assert int(out.mask[0].sum()) == tokens - int(tokens * (1 - config.mask_ratio))
    enc = model.cellmae(images(channels=channels), output_channelwise_embeddings=True)
    assert enc.last_hidden_state.shape == (2, 1 + tokens, config.hidden_size)
    assert enc.pooler_output.shape == (2, config.hidden_size)
    assert enc.channelwise_embeddings.shape == (2, channels, config.hidden_size)


def test_pooled_embedding_is_mean_of_patch_tokens_and_of_channelwise_embeddings():
    model = CellMAEModel(tiny()).eval()
    out = model(images(), output_channelwise_embeddings=True)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 1:].mean(1))
    torch.testing.assert_close(out.pooler_output, out.channelwise_embeddings.mean(1))


def test_other_image_sizes_use_a_position_code_for_their_own_grid():
    model = CellMAEForPreTraining(tiny()).eval()
    out = model(torch.randn(1, 3, 48, 80), mask_seed=0)  # 6 x 10 patches, not the 4 x 4 of image_size
    assert out.logits.shape == (1, 3 * 60, 64)
    code = sincos_position_embedding(6, 10, 64)
    assert code.shape == (60, 64)
    # Row i, column j: [sin(i w), cos(i w), sin(j w), cos(j w)] - patch (1, 2) is row 12.
    omega = 1.0 / 10000 ** (torch.arange(16) / 16)
    torch.testing.assert_close(
        code[12], torch.cat([(1 * omega).sin(), (1 * omega).cos(), (2 * omega).sin(), (2 * omega).cos()])
    )


def test_patchify_and_unpatchify_are_inverse_and_channel_major():
    x = images(channels=3)
    patches = patchify(x, 8)  # (2, 3*16, 64)
    assert torch.equal(patches[0, 16 + 5], x[0, 1, 8:16, 8:16].reshape(-1))  # channel 1, patch row 1, col 1
    assert torch.equal(unpatchify(patches, 3, 8), x)


# ------------------------------------------------------------------------------------ channel identity
def test_embeddings_do_not_depend_on_channel_order_when_channel_embeddings_off():
    model = CellMAEModel(tiny(use_channel_embeddings=False)).eval()
    x = images(channels=5)
    permuted = x[:, [3, 0, 4, 1, 2]]
    torch.testing.assert_close(model(x).pooler_output, model(permuted).pooler_output, atol=1e-5, rtol=1e-5)


def test_embeddings_depend_on_channel_order_when_channel_embeddings_on():
    model = CellMAEModel(tiny(use_channel_embeddings=True)).eval()
    x = images(channels=5)
    order = [3, 0, 4, 1, 2]
    moved = model(x[:, order]).pooler_output
    assert (model(x).pooler_output - moved).abs().max() > 1e-3
    # Telling the model which stain each channel is restores the embedding.
    told = model(x[:, order], channel_ids=order).pooler_output
    torch.testing.assert_close(model(x).pooler_output, told, atol=1e-5, rtol=1e-5)


def test_channel_names_map_to_channel_ids():
    config = tiny(channel_names=["DNA", "ER", "RNA", "AGP", "Mito"])
    assert config.channel_index(["RNA", "DNA"]) == [2, 0]
    with pytest.raises(ValueError, match="Unknown channel names \\['Actin'\\]"):
        config.channel_index(["Actin"])


# ---------------------------------------------------------------------------------------------- masking
def test_mask_is_reproducible_from_a_seed_and_differs_between_seeds():
    model = CellMAEForPreTraining(tiny()).eval()
    x = images()
    a, b, c = (model(x, mask_seed=s).mask for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_follows_an_explicit_noise_tensor():
    config = tiny()
    model = CellMAEForPreTraining(config).eval()
    length = 5 * config.tokens_per_channel
    noise = torch.rand(2, length)
    out = model(images(), noise=noise)
    keep = int(length * (1 - config.mask_ratio))
    visible = torch.argsort(noise, dim=1)[:, :keep]
    expected = torch.ones(2, length)
    expected.scatter_(1, visible, 0.0)
    assert torch.equal(out.mask, expected)


def test_pretraining_head_encodes_through_the_public_masked_encoder(monkeypatch):
    model = CellMAEForPreTraining(tiny()).eval()
    x, noise = images(), torch.rand(2, 5 * 16)
    encoded = model.cellmae.forward_masked(x, noise=noise)
    keep = int(5 * 16 * (1 - model.config.mask_ratio))
    assert encoded.last_hidden_state.shape == (2, 1 + keep, model.config.hidden_size)
    assert encoded.mask.shape == encoded.ids_restore.shape == (2, 5 * 16) and encoded.channel_ids.shape == (2, 5)
    calls = []
    original = model.cellmae.forward_masked
    monkeypatch.setattr(model.cellmae, "forward_masked", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = model(x, noise=noise)
    assert calls == [1]
    assert torch.equal(out.last_hidden_state, encoded.last_hidden_state)
    assert torch.equal(out.mask, encoded.mask) and torch.equal(out.ids_restore, encoded.ids_restore)


def test_masking_is_joint_over_channels():
    model = CellMAEForPreTraining(tiny()).eval()
    mask = model(images(batch=1, channels=4), mask_seed=3).mask.reshape(4, -1)
    # A location can be visible in one channel and masked in another.
    assert (mask.sum(0) % 4 != 0).any()


# ----------------------------------------------------------------------------------------------- losses
def hand_patches(x: np.ndarray, p: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C*N, p*p) with explicit loops: channel, patch row, patch column."""
    b, c, h, w = x.shape
    out = []
    for n in range(b):
        rows = []
        for ch in range(c):
            for i in range(h // p):
                for j in range(w // p):
                    rows.append(x[n, ch, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(-1))
        out.append(rows)
    return np.asarray(out)


def test_mse_loss_equals_hand_computation_over_masked_patches():
    model = CellMAEForPreTraining(tiny(fourier_loss_weight=0.0)).eval()
    x = images()
    out = model(x, mask_seed=1)
    target = hand_patches(x.numpy(), 8)
    pred, mask = out.logits.detach().numpy(), out.mask.numpy()
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    assert out.mse_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_mixes_the_mse_and_fourier_loss_functions():
    model = CellMAEForPreTraining(tiny(fourier_loss_weight=0.2)).eval()
    x = images()
    out = model(x, mask_seed=4)
    prediction, target = out.logits.detach(), patchify(x, 8)
    mse = mse_loss(prediction, target, out.mask)
    fourier = fourier_loss(prediction, target, out.mask, num_channels=5, patch_size=8, grid=(4, 4))
    torch.testing.assert_close(out.mse_loss.detach(), mse)
    torch.testing.assert_close(out.fourier_loss.detach(), fourier)
    torch.testing.assert_close(out.loss.detach(), 0.8 * mse + 0.2 * fourier)


def test_norm_pix_loss_standardises_each_target_patch():
    model = CellMAEForPreTraining(tiny(fourier_loss_weight=0.0, norm_pix_loss=True)).eval()
    x = images()
    out = model(x, mask_seed=1)
    target = hand_patches(x.numpy(), 8)
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((out.logits.detach().numpy() - target) ** 2).mean(-1)
    mask = out.mask.numpy()
    assert out.mse_loss.item() == pytest.approx((per_patch * mask).sum() / mask.sum(), rel=1e-5)


def test_patch_fourier_loss_equals_numpy_fft_of_each_masked_patch():
    model = CellMAEForPreTraining(tiny(fourier_loss_weight=0.3, fourier_loss_scope="patch")).eval()
    x = images()
    out = model(x, mask_seed=2)
    pred = out.logits.detach().numpy().reshape(2, -1, 8, 8)
    target = hand_patches(x.numpy(), 8).reshape(2, -1, 8, 8)
    per_patch = np.abs(np.abs(np.fft.fft2(pred)) - np.abs(np.fft.fft2(target))).mean(axis=(-2, -1))
    mask = out.mask.numpy()
    expected = (per_patch * mask).sum() / mask.sum()
    assert out.fourier_loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(0.7 * out.mse_loss.item() + 0.3 * expected, rel=1e-5)


def test_image_fourier_loss_equals_numpy_fft_of_whole_channels_with_visible_patches_from_target():
    model = CellMAEForPreTraining(tiny(fourier_loss_weight=0.5, fourier_loss_scope="image")).eval()
    x = images()
    out = model(x, mask_seed=2)
    mask = out.mask.numpy()[..., None]
    target = hand_patches(x.numpy(), 8)
    composite = mask * out.logits.detach().numpy() + (1 - mask) * target
    image = unpatchify(torch.from_numpy(composite).float(), 5, 8).numpy()
    expected = np.abs(np.abs(np.fft.fft2(image)) - np.abs(np.fft.fft2(x.numpy()))).mean()
    assert out.fourier_loss.item() == pytest.approx(expected, rel=1e-4)


def test_zero_mask_ratio_scores_every_token_instead_of_nan():
    model = CellMAEForPreTraining(tiny(mask_ratio=0.0)).eval()
    out = model(images(), mask_seed=0)
    assert out.mask.sum() == 0
    assert torch.isfinite(out.loss)
    # The same when a model trained with masking is asked for no masking at call time.
    overridden = CellMAEForPreTraining(tiny(mask_ratio=0.75)).eval()(images(), mask_seed=0, mask_ratio=0.0)
    assert overridden.mask.sum() == 0 and torch.isfinite(overridden.loss)


@pytest.mark.parametrize(
    "decoder_type,block_type", [("shared", "parallel"), ("shared", "prenorm"), ("per_channel", "parallel")]
)
def test_training_steps_reduce_the_loss_on_a_fixed_batch(decoder_type, block_type):
    config = tiny(decoder_type=decoder_type, block_type=block_type, decoder_num_channels=5)
    model = CellMAEForPreTraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = images()
    losses = []
    for _ in range(25):
        loss = model(x, mask_seed=0).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------- saving and loading
def test_save_and_load_round_trip_is_bit_exact_with_real_safetensors(tmp_path):
    model = CellMAEForPreTraining(tiny(use_channel_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "cellmae.embeddings.cls_token" in f.keys()
    loaded = CellMAEForPreTraining.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = images()
    assert torch.equal(model(x, mask_seed=0).logits, loaded(x, mask_seed=0).logits)


def test_auto_classes_load_a_checkpoint_when_the_package_is_imported(tmp_path):
    model = CellMAEForPreTraining(tiny()).eval()
    model.save_pretrained(tmp_path)
    CellMAEImageProcessor(image_size=32).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is CellMAEConfig
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert type(encoder) is CellMAEModel
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path)) is CellMAEForPreTraining
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is CellMAEImageProcessor and processor.image_size == 32
    x = images()
    assert torch.equal(encoder(x).pooler_output, model.cellmae(x).pooler_output)


@pytest.mark.slow
def test_trust_remote_code_loads_without_the_package_and_gives_identical_embeddings(tmp_path):
    model = CellMAEForPreTraining(tiny()).eval()
    model.save_pretrained(tmp_path / "model")
    CellMAEImageProcessor(image_size=32).save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_cellmae.CellMAEModel"
    raw = np.random.default_rng(0).integers(0, 65535, size=(2, 5, 40, 40), dtype=np.uint16)
    np.save(tmp_path / "raw.npy", raw)
    processor = CellMAEImageProcessor(image_size=32)
    expected = model.cellmae(**processor(raw)).pooler_output.detach().numpy()
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_cellmae"] = None  # the package cannot be imported
        import numpy as np, torch
        from transformers import AutoImageProcessor, AutoModel
        path = {str(tmp_path / "model")!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        raw = np.load({str(tmp_path / "raw.npy")!r})
        with torch.no_grad():
            got = model(**processor(raw)).pooler_output.numpy()
        assert np.array_equal(got, np.load({str(tmp_path / "expected.npy")!r})), np.abs(got - np.load({str(tmp_path / "expected.npy")!r})).max()
        print("REMOTE_OK", type(processor).__name__)
        """
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE_OK CellMAEImageProcessor" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------- execution
def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny(drop_path_rate=0.0)
    model = CellMAEForPreTraining(config)
    x = images()

    def grads():
        model.zero_grad()
        model(x, mask_seed=0).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.cellmae.encoder.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


def test_eager_and_sdpa_attention_give_the_same_embeddings():
    config = tiny()
    sdpa = CellMAEModel(config).eval()
    eager_config = tiny()
    eager_config._attn_implementation = "eager"
    eager = CellMAEModel(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    x = images()
    torch.testing.assert_close(sdpa(x).pooler_output, eager(x).pooler_output, atol=1e-5, rtol=1e-5)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__format__")


@contextmanager
def tensor_values_cannot_be_read_on_the_host(monkeypatch):
    """Every way Python code reads a tensor's values (each a host-device sync on a GPU) raises instead."""
    reads = []

    def refuse(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise AssertionError(f"Tensor.{name} called: the host would wait for the device")

        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        yield reads


@pytest.mark.parametrize("decoder_type", ["shared", "per_channel"])
def test_a_training_step_reads_no_tensor_value_on_the_host(monkeypatch, decoder_type):
    model = CellMAEForPreTraining(tiny(decoder_type=decoder_type, decoder_num_channels=5, drop_path_rate=0.1)).train()
    x = images()
    channel_ids = torch.tensor([[0, 1, 2, 3, 4], [3, 1, 4, 0, 2]])  # a device tensor, as the training loop passes
    with tensor_values_cannot_be_read_on_the_host(monkeypatch) as reads:
        for ids in (None, channel_ids):
            out = model(x, channel_ids=ids)
            out.loss.backward()
    assert reads == []
    assert all(p.grad is not None for p in model.decoder.parameters())
    # The check itself has teeth: asking the model to validate values reads them.
    with tensor_values_cannot_be_read_on_the_host(monkeypatch) as reads, pytest.raises(AssertionError):
        model(x, channel_ids=channel_ids, validate_inputs=True)
    assert reads


def test_embedding_forward_reads_no_tensor_value_on_the_host(monkeypatch):
    model = CellMAEModel(tiny(use_channel_embeddings=True)).eval()
    x = images()
    with tensor_values_cannot_be_read_on_the_host(monkeypatch) as reads, torch.no_grad():
        model(x, channel_ids=torch.tensor([4, 3, 2, 1, 0]), output_channelwise_embeddings=True)
    assert reads == []


def test_position_code_is_computed_once_per_grid_not_per_call(monkeypatch):
    modeling_cellmae.cached_position_embedding.cache_clear()
    calls = []
    original = modeling_cellmae.sincos_position_embedding
    monkeypatch.setattr(
        modeling_cellmae, "sincos_position_embedding", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    model = CellMAEForPreTraining(tiny(decoder_hidden_size=32)).eval()
    for _ in range(3):
        model(images(), mask_seed=0)
    assert sorted(calls) == [
        (4, 4, 32, torch.device("cpu")),
        (4, 4, 64, torch.device("cpu")),
    ]  # encoder, decoder widths


def test_per_channel_decoder_routes_a_channel_id_tensor_per_image():
    model = CellMAEForPreTraining(tiny(decoder_type="per_channel", decoder_num_channels=4)).eval()
    x, noise = images(channels=4), torch.rand(2, 4 * 16)
    orders = torch.tensor([[2, 0, 3, 1], [1, 3, 0, 2]])  # each image's own channel order, on the device
    together = model(x, channel_ids=orders, noise=noise).logits
    for b in range(2):  # the same image alone, its ids given as a list (routed on the host)
        alone = model(x[b : b + 1], channel_ids=orders[b].tolist(), noise=noise[b : b + 1]).logits
        torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"ids 0\.\.3 once each"):
        model(x, channel_ids=torch.tensor([0, 1, 1, 2]), validate_inputs=True)


def test_cpu_bf16_training_attends_with_explicit_matmuls_that_equal_the_fused_kernel(monkeypatch):
    q, k, v = (torch.randn(2, 4, 20, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(
        modeling_cellmae.matmul_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)
    )
    fused_calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **kw: fused_calls.append(1) or original(*a, **kw),
    )
    model = CellMAEForPreTraining(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images(), mask_seed=0).loss.backward()
    assert fused_calls == []
    model(images(), mask_seed=0)  # fp32 keeps the fused kernel
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images(), mask_seed=0)  # and so does inference
    assert len(fused_calls) == 2 * (model.config.num_hidden_layers + model.config.decoder_num_hidden_layers)


def test_stochastic_depth_is_active_in_training_and_off_in_eval():
    model = CellMAEModel(tiny(drop_path_rate=0.5, num_hidden_layers=8))
    x = images(batch=8)
    model.train()
    a, b = model(x).pooler_output, model(x).pooler_output
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x).pooler_output, model(x).pooler_output)


def test_bf16_autocast_forward_and_backward_give_finite_float32_losses():
    model = CellMAEForPreTraining(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(), mask_seed=0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "pixels,message",
    [
        (torch.randn(1, 9, 32, 32), "9 channels but config.max_channels is 8"),
        (torch.randn(1, 3, 36, 32), "36x32 is not divisible by patch_size=8"),
        (torch.randn(3, 32, 32), r"shape \(batch, channels, height, width\), got \(3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int32), "dtype torch.int32"),
        (np.zeros((1, 3, 32, 32), np.float32), "must be a torch.Tensor, got ndarray"),
    ],
)
def test_bad_pixel_values_raise_a_clear_error(pixels, message):
    model = CellMAEModel(tiny())
    with pytest.raises((ValueError, TypeError), match=message):
        model(pixels)


def test_the_processor_refuses_non_finite_pixels_with_a_clear_error():
    raw = np.random.default_rng(0).random((5, 40, 40)).astype(np.float32)
    raw[1, 10, 12] = np.nan
    raw[3, 20, 20] = np.inf
    with pytest.raises(
        ValueError, match=r"image 0 has 2 non-finite pixel\(s\) \(NaN or inf\) in channel\(s\) \[1, 3\]"
    ):
        CellMAEImageProcessor(image_size=32)(raw)
    batch = torch.rand(2, 2, 32, 32)
    batch[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"image 1 has 1 non-finite pixel\(s\) \(NaN or inf\) in channel\(s\) \[0\]"):
        CellMAEImageProcessor(image_size=32)(batch)


def test_the_model_checks_pixel_values_only_when_asked_to_validate_inputs():
    x = images()
    x[0, 1, 3, 4] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="2 non-finite values"):
        CellMAEForPreTraining(tiny())(x, validate_inputs=True)
    with pytest.raises(ValueError, match="2 non-finite values"):
        CellMAEModel(tiny(validate_inputs=True))(x)
    # By default the values are not read (that would make the host wait for the device): NaN reaches the loss.
    assert torch.isnan(CellMAEForPreTraining(tiny())(x, mask_seed=0).loss)


def test_bad_channel_ids_raise_a_clear_error():
    model = CellMAEModel(tiny(use_channel_embeddings=True))
    with pytest.raises(ValueError, match=r"channel_ids has shape \(4,\)"):
        model(images(channels=5), channel_ids=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        model(images(channels=2), channel_ids=[0, 8])  # Python ints: checked for free
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        model(images(channels=2), channel_ids=torch.tensor([0, 8]), validate_inputs=True)


def test_bad_configs_raise_a_clear_error():
    with pytest.raises(ValueError, match="image_size=100 is not divisible by patch_size=16"):
        CellMAEConfig(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="block_type='swin'"):
        CellMAEConfig(block_type="swin")
    with pytest.raises(ValueError, match="Unknown preset 'vit_h14'"):
        CellMAEConfig.from_preset("vit_h14")
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        CellMAEConfig(mask_ratio=1.0)


def test_per_channel_decoder_rejects_channels_it_has_no_stack_for():
    model = CellMAEForPreTraining(tiny(decoder_type="per_channel", decoder_num_channels=3))
    with pytest.raises(ValueError, match=r"exceed this per-channel decoder's 3 channels"):
        model(images(channels=4))
    # A subset of its channels, named by channel_ids, works.
    assert model(images(channels=2), channel_ids=[0, 2]).logits.shape[1] == 2 * 16


def test_presets_have_the_paper_sizes():
    sizes = {name: CellMAEConfig.from_preset(name) for name in ("vit_s16", "vit_b16", "vit_l16", "vit_l8")}
    assert [(c.hidden_size, c.num_hidden_layers, c.patch_size) for c in sizes.values()] == [
        (384, 12, 16),
        (768, 12, 16),
        (1024, 24, 16),
        (1024, 24, 8),
    ]
    assert sizes["vit_l8"].tokens_per_channel == (256 // 8) ** 2


def test_input_embeddings_are_the_shared_patch_embedding_for_every_head():
    """accelerate's FSDP2 preparation asks `get_input_embeddings()`; transformers' default raises."""
    from hf_cellmae import CellMAEForImageClassification

    config = CellMAEConfig.from_preset("tiny", num_labels=3)
    for model in (CellMAEModel(config), CellMAEForPreTraining(config), CellMAEForImageClassification(config)):
        base = model if isinstance(model, CellMAEModel) else model.cellmae
        assert model.get_input_embeddings() is base.embeddings.patch_embeddings


# ----------------------------------------------------------------------------------------------- keep_mask
def _encode_tokens_by_hand(model, pixel_values, kept_ids):
    """The encoder on exactly the given channel-major token ids of one image: embed, select, encode, mean."""
    tokens = model.embeddings(pixel_values[None], torch.arange(pixel_values.shape[0]))  # (1, C*N, D)
    hidden, _ = model._run_encoder(tokens[:, kept_ids], False)  # (1, 1 + K, D)
    return hidden[0, 1:]


@pytest.mark.parametrize("block_type", ["parallel", "prenorm"])
def test_keep_mask_encodes_only_the_kept_tokens_as_a_manual_selection_does(block_type):
    config = tiny(block_type=block_type)
    model = CellMAEModel(config).eval()
    pixels = images(batch=3, channels=2)
    n = config.tokens_per_channel
    keep = torch.zeros(3, n, dtype=torch.bool)
    keep[0, [0, 1, 5]] = True  # rows keep 3, 1 and 7 patches: padded to 7 in one batch
    keep[1, 10] = True
    keep[2, [2, 3, 4, 8, 9, 12, 15]] = True
    with torch.no_grad():
        out = model(pixels, keep_mask=keep, output_channelwise_embeddings=True)
        for row in range(3):
            patches = torch.nonzero(keep[row]).flatten()
            ids = torch.cat([patches, patches + n])  # the same patches of both channels, channel-major
            by_hand = _encode_tokens_by_hand(model, pixels[row], ids)  # (K, D)
            torch.testing.assert_close(out.pooler_output[row], by_hand.mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                out.channelwise_embeddings[row, 1], by_hand[len(patches) :].mean(0), atol=1e-5, rtol=1e-5
            )
            assert out.kept_token_ids[row, : len(ids)].tolist() == ids.tolist()
            assert (out.kept_token_ids[row, len(ids) :] == -1).all()
    assert out.last_hidden_state.shape == (3, 1 + 14, config.hidden_size)


def test_keep_mask_of_every_token_equals_the_plain_forward():
    model = CellMAEModel(tiny()).eval()
    pixels = images()
    with torch.no_grad():
        plain = model(pixels)
        kept = model(pixels, keep_mask=torch.ones(2, model.config.tokens_per_channel, dtype=torch.bool))
    torch.testing.assert_close(kept.pooler_output, plain.pooler_output, atol=1e-5, rtol=1e-5)


def test_keep_mask_hides_the_other_tokens_so_their_pixels_change_nothing():
    model = CellMAEModel(tiny()).eval()
    pixels = images(batch=1)
    keep = torch.zeros(1, model.config.tokens_per_channel, dtype=torch.bool)
    keep[0, :4] = True  # the top row of 8-px patches
    changed = pixels.clone()
    changed[..., 8:, :] = 100.0  # every other patch
    with torch.no_grad():
        a = model(pixels, keep_mask=keep).pooler_output
        b = model(changed, keep_mask=keep).pooler_output
        c = model(changed).pooler_output
    torch.testing.assert_close(a, b)
    assert not torch.allclose(model(pixels).pooler_output, c)


def test_keep_mask_errors_name_the_shape_and_the_empty_row():
    model = CellMAEModel(tiny())
    with pytest.raises(ValueError, match=r"expected \(2, 16\)"):
        model(images(), keep_mask=torch.ones(2, 5, dtype=torch.bool))
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[1] = False
    with pytest.raises(ValueError, match=r"no token in row\(s\) \[1\]"):
        model(images(), keep_mask=keep)
