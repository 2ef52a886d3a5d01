"""An independent, functional re-statement of OpenPhenom's `predict` and of its masked-autoencoder
loss, written from OpenPhenom's public code (github.com/recursionpharma/maes_microscopy: `huggingface_mae.py`,
`mae_modules.py`, `vit.py`, `loss.py`) and its Hub card (recursionpharma/OpenPhenom), operating directly on
OpenPhenom's own state-dict keys. hf_cellmae's converted model must match it; nothing
here is shared with the package. `scripts/benchmark_model.py` also times it against hf_cellmae.

Also builds randomly initialised state dicts with OpenPhenom's exact key names and shapes (the released checkpoint's 765 keys).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIM, DEPTH, HEADS, MLP, PATCH, GRID, MAX_CHANNELS = 384, 12, 6, 1536, 16, 16, 11
DEC_DIM, DEC_DEPTH, DEC_MLP, DEC_CHANNELS = 512, 8, 2048, 6


def sincos_table(width: int, repeats: int) -> torch.Tensor:
    """`(1, 1 + repeats * 256, width)`: a zero row for the class token, then the 16x16 grid code repeated."""
    quarter = width // 4
    omega = (1.0 / 10000 ** (np.arange(quarter, dtype=np.float32) / np.float32(quarter))).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(GRID, dtype=np.float32), np.arange(GRID, dtype=np.float32), indexing="ij")
    a, b = np.outer(rows.ravel(), omega), np.outer(cols.ravel(), omega)
    grid = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1).astype(np.float32)
    table = np.concatenate([np.zeros((1, width), np.float32)] + [grid] * repeats)
    return torch.from_numpy(table)[None]


def openphenom_key_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of OpenPhenom's MAEModel state dict with its shape (765 keys)."""
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.vit_backbone.cls_token": (1, 1, DIM),
        "encoder.vit_backbone.pos_embed": (1, 1 + MAX_CHANNELS * GRID * GRID, DIM),
        "encoder.vit_backbone.patch_embed.proj.weight": (DIM, 1, PATCH, PATCH),
        "encoder.vit_backbone.patch_embed.proj.bias": (DIM,),
    }
    for i in range(DEPTH):
        p = f"encoder.vit_backbone.blocks.{i}."
        shapes.update(
            {
                p + "mlp_bias": (MLP,),
                p + "in_norm.weight": (DIM,),
                p + "in_norm.bias": (DIM,),
                p + "in_proj.weight": (MLP + 3 * DIM, DIM),
                p + "q_norm.weight": (DIM // HEADS,),
                p + "q_norm.bias": (DIM // HEADS,),
                p + "k_norm.weight": (DIM // HEADS,),
                p + "k_norm.bias": (DIM // HEADS,),
                p + "attn_out_proj.weight": (DIM, DIM),
                p + "attn_out_proj.bias": (DIM,),
                p + "mlp_out_proj.weight": (DIM, MLP),
                p + "mlp_out_proj.bias": (DIM,),
                p + "ls.gamma": (DIM,),
            }
        )
    shapes.update(
        {
            "encoder.vit_backbone.fc_norm.weight": (DIM,),
            "encoder.vit_backbone.fc_norm.bias": (DIM,),
            "decoder.mask_token": (1, 1, DEC_DIM),
            "decoder.placeholder": (1, 1, DEC_DIM),
            "decoder.pos_embeddings": (1, 1 + DEC_CHANNELS * GRID * GRID, DEC_DIM),
        }
    )
    for m in range(DEC_CHANNELS):
        shapes[f"decoder.modality_tokens.{m}"] = (1, 1, DEC_DIM)
    shapes.update(
        {
            "decoder.cross_attention.q.weight": (DEC_DIM, DEC_DIM),
            "decoder.cross_attention.kv.weight": (2 * DEC_DIM, DEC_DIM),
            "decoder.cross_attention.proj.weight": (DEC_DIM, DEC_DIM),
            "decoder.cross_attention.proj.bias": (DEC_DIM,),
            "decoder.mlp.fc1.weight": (DEC_MLP, DEC_DIM),
            "decoder.mlp.fc1.bias": (DEC_MLP,),
            "decoder.mlp.fc2.weight": (DEC_DIM, DEC_MLP),
            "decoder.mlp.fc2.bias": (DEC_DIM,),
        }
    )
    for m in range(DEC_CHANNELS):
        for j in range(DEC_DEPTH):
            p = f"decoder.decoders.{m}.{j}."
            shapes.update(
                {
                    p + "norm1.weight": (DEC_DIM,),
                    p + "norm1.bias": (DEC_DIM,),
                    p + "attn.qkv.weight": (3 * DEC_DIM, DEC_DIM),
                    p + "attn.qkv.bias": (3 * DEC_DIM,),
                    p + "attn.proj.weight": (DEC_DIM, DEC_DIM),
                    p + "attn.proj.bias": (DEC_DIM,),
                    p + "norm2.weight": (DEC_DIM,),
                    p + "norm2.bias": (DEC_DIM,),
                    p + "mlp.fc1.weight": (DEC_MLP, DEC_DIM),
                    p + "mlp.fc1.bias": (DEC_MLP,),
                    p + "mlp.fc2.weight": (DEC_DIM, DEC_MLP),
                    p + "mlp.fc2.bias": (DEC_DIM,),
                }
            )
    for name in ("context_norm", "query_norm", "out_norm"):
        shapes[f"decoder.{name}.weight"] = (DEC_DIM,)
        shapes[f"decoder.{name}.bias"] = (DEC_DIM,)
    shapes.update(
        {
            "encoder_decoder_proj.weight": (DEC_DIM, DIM),
            "encoder_decoder_proj.bias": (DEC_DIM,),
            "decoder_pred.weight": (PATCH * PATCH, DEC_DIM),
            "decoder_pred.bias": (PATCH * PATCH,),
        }
    )
    return shapes


def random_openphenom_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in OpenPhenom's layout, scaled so that every block changes the embedding."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in openphenom_key_shapes().items():
        if key.endswith("pos_embed"):
            out[key] = sincos_table(DIM, MAX_CHANNELS)
        elif key == "decoder.pos_embeddings":
            out[key] = sincos_table(DEC_DIM, DEC_CHANNELS)
        elif key == "decoder.placeholder":
            out[key] = torch.zeros(shape)
        elif "norm" in key and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("ls.gamma"):
            out[key] = 0.05 + 0.3 * torch.rand(shape, generator=g)
        elif key.endswith("bias") or key.endswith("mlp_bias"):
            out[key] = 0.05 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.05 * torch.randn(shape, generator=g)
    return out


def standardize(pixels: torch.Tensor) -> torch.Tensor:
    """Section 2.1: x / 255, then per image and channel (x - mean) / sqrt(biased var + 1e-5)."""
    x = pixels.float() / 255.0
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def encoder_tokens(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 2.2-2.3: standardised `(N, C, 256, 256)` -> class token `(N, 1, D)` and patch tokens
    `(N, C*256, D)`, each with its position code added (the class token's is zero)."""
    n, c = x.shape[:2]
    w = sd["encoder.vit_backbone.patch_embed.proj.weight"]
    b = sd["encoder.vit_backbone.patch_embed.proj.bias"]
    per_channel = [F.conv2d(x[:, i : i + 1], w, b, stride=PATCH) for i in range(c)]  # (N, D, 16, 16) each
    tokens = torch.stack(per_channel, dim=2).flatten(2).transpose(1, 2)  # (N, C*256, D)
    pos = sd["encoder.vit_backbone.pos_embed"]
    cls = sd["encoder.vit_backbone.cls_token"].expand(n, -1, -1) + pos[:, :1]
    return cls, tokens + pos[:, 1 : 1 + c * GRID * GRID]


def encoder_blocks(sd: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Section 2.4: the 12 parallel-scaling blocks, timm <= 1.0.24 `mlp_bias` layout, no final norm."""
    n = h.shape[0]
    hd = DIM // HEADS
    for i in range(DEPTH):
        p = f"encoder.vit_backbone.blocks.{i}."
        y = F.layer_norm(h, (DIM,), sd[p + "in_norm.weight"], sd[p + "in_norm.bias"], 1e-6)
        y = y @ sd[p + "in_proj.weight"].T
        y = y + torch.cat([torch.zeros(3 * DIM), sd[p + "mlp_bias"]])  # timm <= 1.0.24 layout
        m, q, k, v = torch.split(y, [MLP, DIM, DIM, DIM], dim=-1)
        q, k, v = (t.reshape(n, -1, HEADS, hd).transpose(1, 2) for t in (q, k, v))
        q = F.layer_norm(q, (hd,), sd[p + "q_norm.weight"], sd[p + "q_norm.bias"], 1e-6)
        k = F.layer_norm(k, (hd,), sd[p + "k_norm.weight"], sd[p + "k_norm.bias"], 1e-6)
        attn = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(n, -1, DIM)
        out = F.linear(attn, sd[p + "attn_out_proj.weight"], sd[p + "attn_out_proj.bias"])
        out = out + F.linear(F.gelu(m), sd[p + "mlp_out_proj.weight"], sd[p + "mlp_out_proj.bias"])
        h = h + sd[p + "ls.gamma"] * out
    return h


def reference_predict(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenPhenom `predict` on 0..255 pixels `(N, C, 256, 256)`: pooled `(N, 384)` and channelwise `(N, C*384)`."""
    n, c = pixels.shape[:2]
    cls, tokens = encoder_tokens(sd, standardize(pixels))
    h = encoder_blocks(sd, torch.cat([cls, tokens], 1))
    patch_tokens = h[:, 1:]
    return patch_tokens.mean(1), patch_tokens.reshape(n, c, GRID * GRID, DIM).mean(2).reshape(n, c * DIM)


def _timm_block(sd: dict[str, torch.Tensor], p: str, z: torch.Tensor, eps: float) -> torch.Tensor:
    """timm `Block` (pre-norm, qkv bias, 16 heads, fused attention, no LayerScale)."""
    n, t = z.shape[:2]
    y = F.layer_norm(z, (DEC_DIM,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
    qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
    q, k, v = qkv.reshape(n, t, 3, 16, DEC_DIM // 16).permute(2, 0, 3, 1, 4)  # (N, 16, T, 32) each
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, DEC_DIM)
    z = z + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    y = F.layer_norm(z, (DEC_DIM,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
    y = F.linear(
        F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
        sd[p + "mlp.fc2.weight"],
        sd[p + "mlp.fc2.bias"],
    )
    return z + y


def reference_pretraining_loss(
    sd: dict[str, torch.Tensor],
    pixels: torch.Tensor,
    noise: torch.Tensor,
    mask_ratio: float = 0.75,
    fourier_weight: float = 0.01,
    decoder_eps: float = 1e-5,
) -> dict[str, torch.Tensor]:
    """OpenPhenom's MAE forward and `compute_MAE_loss` on 0..255 pixels `(N, 6, 256, 256)` (sections 2.5-2.7).

    `noise (N, 6*256)`: the tokens with the smallest noise stay visible. Decoder LayerNorm eps 1e-5 as in
    the HF wrapper. Returns loss, mse, fourier, logits `(N, 1536, 256)` and mask `(N, 1536)`.
    """
    n, c = pixels.shape[:2]
    x = standardize(pixels)
    cls, tokens = encoder_tokens(sd, x)
    length = tokens.shape[1]
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    keep = int(length * (1 - mask_ratio))
    kept = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, DIM))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    latent = encoder_blocks(sd, torch.cat([cls, kept], 1))  # (N, 1 + keep, D)

    z = F.linear(latent, sd["encoder_decoder_proj.weight"], sd["encoder_decoder_proj.bias"])
    filled = torch.cat([z[:, 1:], sd["decoder.mask_token"].expand(n, length - keep, -1)], 1)
    filled = torch.gather(filled, 1, restore[:, :, None].expand(-1, -1, DEC_DIM))
    z = torch.cat([z[:, :1], filled], 1)  # (N, 1 + L, E)
    modality = torch.cat(
        [sd["decoder.placeholder"]]
        + [sd[f"decoder.modality_tokens.{m}"].expand(-1, GRID * GRID, -1) for m in range(c)],
        1,
    )
    z = z + sd["decoder.pos_embeddings"][:, : 1 + length] + modality
    ctx = z[:, 1:]
    heads, hd = 8, DEC_DIM // 8
    decoded = []
    for m in range(c):
        zm = ctx[:, m * GRID * GRID : (m + 1) * GRID * GRID]
        # Cross-attention written out per channel, key/value over all tokens recomputed each time (as OpenPhenom).
        qm = F.layer_norm(zm, (DEC_DIM,), sd["decoder.query_norm.weight"], sd["decoder.query_norm.bias"], decoder_eps)
        cm = F.layer_norm(
            ctx, (DEC_DIM,), sd["decoder.context_norm.weight"], sd["decoder.context_norm.bias"], decoder_eps
        )
        q = F.linear(qm, sd["decoder.cross_attention.q.weight"]).reshape(n, -1, heads, hd).transpose(1, 2)
        kv = (
            F.linear(cm, sd["decoder.cross_attention.kv.weight"])
            .reshape(n, length, 2, heads, hd)
            .permute(2, 0, 3, 1, 4)
        )
        weights = torch.softmax(q @ kv[0].transpose(-2, -1) * hd**-0.5, dim=-1)
        zm = F.linear(
            (weights @ kv[1]).transpose(1, 2).reshape(n, -1, DEC_DIM),
            sd["decoder.cross_attention.proj.weight"],
            sd["decoder.cross_attention.proj.bias"],
        )
        y = F.layer_norm(zm, (DEC_DIM,), sd["decoder.out_norm.weight"], sd["decoder.out_norm.bias"], decoder_eps)
        zm = zm + F.linear(
            F.gelu(F.linear(y, sd["decoder.mlp.fc1.weight"], sd["decoder.mlp.fc1.bias"])),
            sd["decoder.mlp.fc2.weight"],
            sd["decoder.mlp.fc2.bias"],
        )
        for j in range(DEC_DEPTH):
            zm = _timm_block(sd, f"decoder.decoders.{m}.{j}.", zm, decoder_eps)
        decoded.append(zm)
    logits = F.linear(torch.cat(decoded, 1), sd["decoder_pred.weight"], sd["decoder_pred.bias"])  # (N, L, 256)

    target = x.reshape(n, c, GRID, PATCH, GRID, PATCH).permute(0, 1, 2, 4, 3, 5).reshape(n, length, PATCH * PATCH)
    mse = ((((logits - target) ** 2).mean(-1)) * mask).sum() / mask.sum()
    spectra = [torch.fft.fft2(t.reshape(n, length, PATCH, PATCH)).abs() for t in (logits, target)]
    fourier = (((spectra[0] - spectra[1]).abs().mean(dim=(-2, -1))) * mask).sum() / mask.sum()
    loss = (1 - fourier_weight) * mse + fourier_weight * fourier
    return {"loss": loss, "mse": mse, "fourier": fourier, "logits": logits, "mask": mask}
