"""Channel-agnostic ViT masked autoencoder (CA-MAE) for multi-channel microscopy.

Kraus et al., "Masked Autoencoders for Microscopy are Scalable Learners of Cellular Biology"
(CVPR 2024, arXiv 2404.10242). Every channel of a `(B, C, H, W)` image is patchified by ONE shared
patch embedding, so a model sees any number of channels in any order; tokens are channel-major
(channel, patch row, patch column) and every channel gets the same 2-D sin-cos position code.

This file imports only torch, transformers and `configuration_cellmae` (relatively), so
`save_pretrained` copies it next to the weights and `trust_remote_code=True` loads it anywhere. The heads on
the encoder (the image classifier, plate-wise batch normalisation) are in `modeling_cellmae_heads.py`, copied
with it; MU-Net (`modeling_munet.py`) shares this file's patches, masking and loss.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_cellmae import CellMAEConfig

# Written into config.json by save_pretrained so that one checkpoint loads through every Auto class.
AUTO_MAP = {
    "AutoConfig": "configuration_cellmae.CellMAEConfig",
    "AutoModel": "modeling_cellmae.CellMAEModel",
    "AutoModelForPreTraining": "modeling_cellmae.CellMAEForPreTraining",
    # fine-tune any folder: the head lives in modeling_cellmae_heads.py, which save_pretrained copies beside this file
    "AutoModelForImageClassification": "modeling_cellmae_heads.CellMAEForImageClassification",
}


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
@dataclass
class CellMAEModelOutput(ModelOutput):
    """Encoder output.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, 1 + C * N, D)`): class token, then the
            patch tokens of every channel in channel-major order (N = patches per channel).
        pooler_output (`torch.FloatTensor` of shape `(B, D)`): mean of the patch tokens (class token
            excluded): the image embedding (OpenPhenom's `predict`).
        channelwise_embeddings (`torch.FloatTensor` of shape `(B, C, D)`, *optional*): mean of each
            channel's patch tokens; their mean over channels equals `pooler_output`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): input of every block and the final output.
        kept_token_ids (`torch.LongTensor` of shape `(B, K)`, *optional*): with `keep_mask`, the channel-major index
            (`channel * N + patch`) of each of the K patch tokens in `last_hidden_state[:, 1:]`, -1 for padding
            (rows keep different numbers of tokens; padding is attended to by no token and zeroed in the output).
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    channelwise_embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    kept_token_ids: torch.Tensor | None = None


@dataclass
class CellMAEMaskedEncoderOutput(ModelOutput):
    """Encoder output for a masked image (MAE pre-training).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, 1 + K, D)`): class token, then the K visible
            tokens in ascending-noise order.
        mask (`torch.FloatTensor` of shape `(B, C * N)`): 1 for masked (removed) tokens, 0 for visible.
        ids_restore (`torch.LongTensor` of shape `(B, C * N)`): inverse of the masking permutation.
        channel_ids (`torch.LongTensor` of shape `(B, C)`): the stain of each channel, as resolved.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): input of every block and the final output.
    """

    last_hidden_state: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.Tensor | None = None
    channel_ids: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CellMAEForPreTrainingOutput(ModelOutput):
    """Masked-autoencoder output.

    Args:
        loss (`torch.FloatTensor`, scalar): `(1 - w) * mse_loss + w * fourier_loss`.
        mse_loss (`torch.FloatTensor`, scalar): mean squared error over masked patches.
        fourier_loss (`torch.FloatTensor`, scalar): L1 distance of Fourier magnitudes.
        logits (`torch.FloatTensor` of shape `(B, C * N, patch_size**2)`): reconstruction of every
            patch in the standardised pixel space (see `unpatchify`).
        mask (`torch.FloatTensor` of shape `(B, C * N)`): 1 for masked (reconstructed) tokens, 0 for visible.
        ids_restore (`torch.LongTensor` of shape `(B, C * N)`): inverse of the masking permutation.
        last_hidden_state (`torch.FloatTensor` of shape `(B, 1 + K, D)`): encoder output for the class
            token and the K visible tokens.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): encoder hidden states.
    """

    loss: torch.Tensor | None = None
    mse_loss: torch.Tensor | None = None
    fourier_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------
def sincos_position_embedding(grid_height: int, grid_width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos position code, `(grid_height * grid_width, dim)`, rows in row-major patch order.

    Layout per patch (row i, column j): `[sin(i w), cos(i w), sin(j w), cos(j w)]` with
    `w_k = 10000 ** (-k / (dim // 4))`, computed in float32 (bit-identical to OpenPhenom's table).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (q,)
    rows = torch.arange(grid_height, dtype=torch.float32, device=device)
    cols = torch.arange(grid_width, dtype=torch.float32, device=device)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # (gh, gw) each
    angle_rows = grid_rows.reshape(-1, 1) * omega  # (gh*gw, q)
    angle_cols = grid_cols.reshape(-1, 1) * omega
    return torch.cat([angle_rows.sin(), angle_rows.cos(), angle_cols.sin(), angle_cols.cos()], dim=1)


@functools.lru_cache(maxsize=32)
def cached_position_embedding(grid_height: int, grid_width: int, dim: int, device: torch.device, dtype: torch.dtype):
    """`sincos_position_embedding` computed once per grid, width, device and dtype (a constant, never
    written to), so a forward pass does not rebuild it."""
    with torch.inference_mode(False), torch.no_grad():  # usable later outside inference mode too
        return sincos_position_embedding(grid_height, grid_width, dim, device).to(dtype)


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, C * N, patch_size**2)`: channel-major tokens, row-major pixels in a patch."""
    batch, channels, height, width = pixel_values.shape
    rows, cols = height // patch_size, width // patch_size
    x = pixel_values.reshape(batch, channels, rows, patch_size, cols, patch_size)
    x = x.permute(0, 1, 2, 4, 3, 5)  # (B, C, rows, cols, p, p)
    return x.reshape(batch, channels * rows * cols, patch_size * patch_size)


def unpatchify(patches: torch.Tensor, num_channels: int, patch_size: int, grid: tuple[int, int] | None = None):
    """Inverse of `patchify`: `(B, C * N, p*p)` -> `(B, C, rows * p, cols * p)` (square grid by default)."""
    batch, tokens, _ = patches.shape
    per_channel = tokens // num_channels
    rows, cols = grid if grid is not None else (math.isqrt(per_channel),) * 2
    if rows * cols != per_channel:
        raise ValueError(f"{per_channel} tokens per channel do not form a {rows}x{cols} grid; pass grid=(rows, cols).")
    x = patches.reshape(batch, num_channels, rows, cols, patch_size, patch_size)
    x = x.permute(0, 1, 2, 4, 3, 5)  # (B, C, rows, p, cols, p)
    return x.reshape(batch, num_channels, rows * patch_size, cols * patch_size)


def random_masking(tokens: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """MAE masking, jointly over all channels' tokens.

    Args:
        tokens: `(B, L, D)` patch tokens (no class token).
        mask_ratio: fraction of the L tokens to remove.
        noise: `(B, L)`; the tokens with the smallest noise are kept.

    Returns:
        kept `(B, K, D)` (in ascending-noise order), mask `(B, L)` (1 = removed), ids_restore `(B, L)`.
    """
    batch, length, dim = tokens.shape
    num_keep = int(length * (1 - mask_ratio))
    if num_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible token out of {length}; lower it.")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=tokens.device, dtype=tokens.dtype)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


def masked_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `(B, L)` values weighted by a `(B, L)` 0/1 mask, over the whole batch."""
    return (per_token * weights).sum() / weights.sum()


def fourier_magnitude_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the last two axes of `| |FFT2(prediction)| - |FFT2(target)| |` (float32)."""
    spectrum_pred = torch.fft.fft2(prediction.float()).abs()
    spectrum_target = torch.fft.fft2(target.float()).abs()
    return (spectrum_pred - spectrum_target).abs().mean(dim=(-2, -1))


def mse_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MAE's reconstruction loss: squared error per patch `(B, L)`, averaged over the patches weighted 1.

    `prediction`, `target`: `(B, L, p*p)`; `weights`: `(B, L)` (the mask, or ones to score every patch)."""
    return masked_mean(((prediction - target) ** 2).mean(dim=-1), weights)


def fourier_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    num_channels: int,
    patch_size: int,
    grid: tuple[int, int],
    scope: str = "patch",
    masked_only: bool = True,
) -> torch.Tensor:
    """L1 distance of Fourier magnitudes between reconstruction and target, `(B, L, p*p)` patches each.

    `scope="patch"` (OpenPhenom): FFT of every p x p patch, averaged over the patches weighted 1 by
    `weights` (`masked_only`) or over all. `scope="image"`: FFT of every whole channel, the visible
    patches (weight 0) taken from the target."""
    if scope == "patch":
        per_patch = fourier_magnitude_l1(
            prediction.reshape(*prediction.shape[:2], patch_size, patch_size),
            target.reshape(*target.shape[:2], patch_size, patch_size),
        )  # (B, L)
        return masked_mean(per_patch, weights) if masked_only else per_patch.mean()
    composite = target + weights.unsqueeze(-1) * (prediction - target)  # (B, L, p*p)
    return fourier_magnitude_l1(
        unpatchify(composite, num_channels, patch_size, grid), unpatchify(target, num_channels, patch_size, grid)
    ).mean()


def reconstruction_loss(config, logits, pixel_values, mask, grid, mask_ratio: float):
    """The MAE loss of CA-MAE and MU-Net: `(1 - w) * mse_loss + w * fourier_loss` over the masked patches, with
    `w = config.fourier_loss_weight`; returns (loss, mse, fourier).

    `logits (B, L, p*p)`, `pixel_values (B, C, H, W)`, `mask (B, L)`, `grid` the `(rows, cols)` of patches. With
    nothing masked (`mask_ratio` 0) every patch is scored instead of dividing by zero.
    """
    target = patchify(pixel_values, config.patch_size).float()  # (B, L, p*p)
    prediction = logits.float()
    if config.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    weights = mask if mask_ratio > 0 else torch.ones_like(mask)  # (B, L)
    mse = mse_loss(prediction, target, weights)
    fourier = fourier_loss(
        prediction,
        target,
        weights,
        pixel_values.shape[1],
        config.patch_size,
        grid,
        config.fourier_loss_scope,
        config.mask_fourier_loss,
    )
    weight = config.fourier_loss_weight
    return (1 - weight) * mse + weight * fourier, mse, fourier


def legacy_timm_parallel_biases(mlp_bias: torch.Tensor, qkv_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """timm <= 1.0.24's `ParallelScalingBlock` (OpenPhenom) adds `mlp_bias` (M values) to the LAST M outputs
    of the fused `[MLP hidden (M) | q | k | v]` projection. The same biases as ordinary `(mlp_bias (M,),
    qkv_bias (qkv_size,))`: the first `qkv_size` MLP units get zero."""
    fused = torch.cat([mlp_bias.new_zeros(qkv_size), mlp_bias])  # (M + qkv_size,) bias of the fused outputs
    return fused[: mlp_bias.numel()], fused[mlp_bias.numel() :]


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample with probability `drop_prob`."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention. `query/key/value`: `(B, heads, L, head_dim)`; returns `(B, L, heads, head_dim)`."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """`softmax(q k^T / sqrt(hd)) v` with explicit matmuls (softmax in float32): `(B, H, L, hd)` -> `(B, H, Lq, hd)`.
    `attn_mask`: `(B, 1, 1, Lk)` bool, True = the key may be attended to."""
    weights = torch.matmul(query * query.shape[-1] ** -0.5, key.transpose(-2, -1))  # (B, H, Lq, Lk)
    if attn_mask is not None:
        weights = weights.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(weights.softmax(dim=-1, dtype=torch.float32).to(value.dtype), value)


def cpu_reduced_precision_training(query: torch.Tensor) -> bool:
    """Whether to attend with explicit matmuls: on CPU (torch 2.13, measured on 2 cores) the flash-attention
    kernel's forward+backward in bf16 is 2-3x slower than matmuls at 256-385 tokens (equal at 1536);
    in fp32, and without grad, the kernel is as fast or faster."""
    if query.device.type != "cpu" or not (torch.is_grad_enabled() and query.requires_grad):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)
    return query.dtype in (torch.bfloat16, torch.float16)


def multi_head_attention(module, query, key, value, num_heads: int, q_norm=None, k_norm=None, key_mask=None):
    """`(B, Lq, D)` queries over `(B, Lk, D)` keys/values -> `(B, Lq, D)`. `F.scaled_dot_product_attention`
    for `config._attn_implementation == "sdpa"` (the default; explicit matmuls when training in reduced
    precision on CPU, see `cpu_reduced_precision_training`), else the backend it names (e.g. eager).
    `key_mask` `(B, Lk)` bool (optional): False keys (padding) are attended to by no query."""
    batch, q_len, dim = query.shape
    head_dim = dim // num_heads
    q = query.reshape(batch, q_len, num_heads, head_dim).transpose(1, 2)  # (B, H, Lq, hd)
    k = key.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)  # (B, H, Lk, hd)
    v = value.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    implementation = module.config._attn_implementation
    allowed = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, Lk)
    if implementation in (None, "sdpa"):
        attention = matmul_attention if cpu_reduced_precision_training(q) else F.scaled_dot_product_attention
        out = attention(q, k, v, attn_mask=allowed)  # (B, H, Lq, hd)
        return out.transpose(1, 2).reshape(batch, q_len, dim)
    interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    additive = (
        None
        if allowed is None
        else torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    )  # (B, 1, 1, Lk)
    out, _ = interface(module, q, k, v, additive, scaling=head_dim**-0.5, dropout=0.0)  # (B, Lq, H, hd)
    return out.reshape(batch, q_len, dim)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class CellMAEParallelBlock(GradientCheckpointingLayer):
    """The paper's ViT block (timm "parallel scaling"): one LayerNorm and one fused projection feed
    attention and MLP in parallel; `x + drop_path(layer_scale * (attn_out(a) + mlp_out(gelu(m))))`."""

    def __init__(self, config: CellMAEConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.config = config
        self.is_causal = False
        dim, hidden = config.hidden_size, config.intermediate_size
        head_dim = dim // config.num_attention_heads
        self.mlp_hidden_size = hidden
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=False)  # rows: [MLP hidden | q | k | v]
        self.mlp_bias = nn.Parameter(torch.zeros(hidden))
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim)) if config.qkv_bias else None
        self.q_norm = nn.LayerNorm(head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_out = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        use_scale = config.layer_scale_init is not None
        self.layer_scale = nn.Parameter(torch.ones(dim)) if use_scale else None
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        dim = hidden_states.shape[-1]
        if self.qkv_bias is None:
            bias = torch.cat([self.mlp_bias, self.mlp_bias.new_zeros(3 * dim)])  # (M + 3D,): q, k, v unbiased
        else:
            bias = torch.cat([self.mlp_bias, self.qkv_bias])  # (M + 3D,)
        # One GEMM with the bias folded in (addmm), rather than a second pass over the (B, L, M + 3D) output.
        fused = F.linear(self.norm(hidden_states), self.in_proj.weight, bias)  # (B, L, M + 3D)
        mlp_hidden, q, k, v = fused.split([self.mlp_hidden_size, dim, dim, dim], dim=-1)
        attended = multi_head_attention(
            self, q, k, v, self.config.num_attention_heads, self.q_norm, self.k_norm, key_mask
        )
        out = self.attn_out(attended) + self.mlp_out(self.act(mlp_hidden))  # (B, L, D)
        if self.layer_scale is not None:
            out = out * self.layer_scale
        return hidden_states + drop_path(out, self.drop_path_rate, self.training)


class CellMAEPreNormBlock(GradientCheckpointingLayer):
    """Standard pre-norm ViT block: `x += attn(LN(x))`, `x += mlp(LN(x))`, each optionally layer-scaled."""

    def __init__(
        self,
        config: CellMAEConfig,
        dim: int,
        num_heads: int,
        mlp_hidden_size: int,
        eps: float,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        layer_scale_init: float | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.config = config
        self.is_causal = False
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=eps) if qk_norm else None
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_hidden_size, dim)
        use_scale = layer_scale_init is not None
        self.layer_scale1 = nn.Parameter(torch.ones(dim)) if use_scale else None
        self.layer_scale2 = nn.Parameter(torch.ones(dim)) if use_scale else None
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(hidden_states)).chunk(3, dim=-1)  # (B, L, D) each
        attended = self.proj(multi_head_attention(self, q, k, v, self.num_heads, self.q_norm, self.k_norm, key_mask))
        if self.layer_scale1 is not None:
            attended = attended * self.layer_scale1
        hidden_states = hidden_states + drop_path(attended, self.drop_path_rate, self.training)
        mlp = self.fc2(self.act(self.fc1(self.norm2(hidden_states))))
        if self.layer_scale2 is not None:
            mlp = mlp * self.layer_scale2
        return hidden_states + drop_path(mlp, self.drop_path_rate, self.training)


def encoder_block(config: CellMAEConfig, drop_path_rate: float) -> nn.Module:
    if config.block_type == "parallel":
        return CellMAEParallelBlock(config, drop_path_rate)
    return CellMAEPreNormBlock(
        config,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
        qk_norm=config.qk_norm,
        layer_scale_init=config.layer_scale_init,
        drop_path_rate=drop_path_rate,
    )


def decoder_block(config: CellMAEConfig) -> CellMAEPreNormBlock:
    return CellMAEPreNormBlock(
        config,
        config.decoder_hidden_size,
        config.decoder_num_attention_heads,
        config.decoder_intermediate_size,
        config.decoder_layer_norm_eps,
        qkv_bias=True,
    )


# ----------------------------------------------------------------------------------------------
# Embeddings, encoder, decoders
# ----------------------------------------------------------------------------------------------
class CellMAEEmbeddings(nn.Module):
    """Channel-agnostic tokenisation: one 1-channel patch embedding shared by every channel,
    the same 2-D sin-cos position code for every channel, optional channel-identity embeddings."""

    def __init__(self, config: CellMAEConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = nn.Conv2d(1, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.channel_embeddings = (
            nn.Embedding(config.max_channels, config.hidden_size) if config.use_channel_embeddings else None
        )

    def forward(self, pixel_values: torch.Tensor, channel_ids: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` pixels and `(B, C)` channel ids -> `(B, C * N, D)` tokens (no class token)."""
        batch, channels, height, width = pixel_values.shape
        patch = self.config.patch_size
        rows, cols = height // patch, width // patch
        per_channel = pixel_values.reshape(batch * channels, 1, height, width)
        weight = self.patch_embeddings.weight
        tokens = self.patch_embeddings(per_channel.to(weight.dtype))  # (B*C, D, rows, cols)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B*C, N, D)
        position = cached_position_embedding(rows, cols, tokens.shape[-1], tokens.device, tokens.dtype)  # (N, D)
        tokens = tokens + position  # same spatial code for every channel
        if self.channel_embeddings is not None:
            tokens = tokens + self.channel_embeddings(channel_ids.reshape(-1)).unsqueeze(1)  # (B*C, 1, D)
        return tokens.reshape(batch, channels * rows * cols, -1)  # (B, C*N, D) channel-major


class CellMAEEncoder(nn.Module):
    def __init__(self, config: CellMAEConfig):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.layers = nn.ModuleList([encoder_block(config, rate) for rate in rates])

    def forward(self, hidden_states: torch.Tensor, output_hidden_states: bool = False, key_mask=None):
        all_states: tuple[torch.Tensor, ...] | None = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states) if key_mask is None else layer(hidden_states, key_mask=key_mask)
            if all_states is not None:
                all_states = all_states + (hidden_states,)
        return hidden_states, all_states


def unshuffle_with_mask_tokens(latent: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor):
    """`(B, 1 + K, E)` visible tokens -> `(B, L, E)` all tokens in channel-major order (class token dropped),
    masked positions filled with `mask_token`."""
    batch, length = ids_restore.shape
    visible = latent[:, 1:]
    fill = mask_token.to(visible.dtype).expand(batch, length - visible.shape[1], -1)
    tokens = torch.cat([visible, fill], dim=1)  # (B, L, E) in shuffled order
    return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class CellMAESharedDecoder(nn.Module):
    """One pre-norm transformer over all channels' tokens. A learned channel-identity embedding tells
    each mask token which stain to reconstruct, so it serves any channel set named by `channel_ids`."""

    def __init__(self, config: CellMAEConfig):
        super().__init__()
        self.config = config
        width = config.decoder_hidden_size
        self.embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.channel_embeddings = nn.Embedding(config.max_channels, width)
        self.layers = nn.ModuleList([decoder_block(config) for _ in range(config.decoder_num_hidden_layers)])
        self.norm = nn.LayerNorm(width, eps=config.decoder_layer_norm_eps)
        self.pred = nn.Linear(width, config.patch_size**2)

    def forward(self, latent, ids_restore, channel_ids, grid, channel_list=None, validate_inputs=False):
        """`latent (B, 1 + K, D)`, `ids_restore (B, L)`, `channel_ids (B, C)` -> `(B, L, p*p)`. Any channel
        set works, so `channel_list` and `validate_inputs` (see the per-channel decoder) are not needed."""
        batch, channels = channel_ids.shape
        tokens = unshuffle_with_mask_tokens(self.embed(latent), ids_restore, self.mask_token)  # (B, L, E)
        width = tokens.shape[-1]
        position = cached_position_embedding(*grid, width, tokens.device, tokens.dtype)  # (N, E)
        identity = self.channel_embeddings(channel_ids).to(tokens.dtype)  # (B, C, E)
        tokens = tokens.reshape(batch, channels, -1, width) + position + identity.unsqueeze(2)
        hidden = tokens.reshape(batch, -1, width)  # (B, L, E)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.pred(self.norm(hidden))


class CellMAEPerChannelDecoder(nn.Module):
    """OpenPhenom's CA-MAE decoder: a shared cross-attention (every channel's tokens attend to all
    tokens, no residual) and shared MLP, then a separate stack of blocks per channel. It decodes a
    fixed set of `decoder_num_channels` channels; `channel_ids` may select a subset of them."""

    def __init__(self, config: CellMAEConfig):
        super().__init__()
        self.config = config
        width, eps = config.decoder_hidden_size, config.decoder_layer_norm_eps
        self.is_causal = False
        self.embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.channel_tokens = nn.Parameter(torch.zeros(config.decoder_num_channels, width))
        self.query_norm = nn.LayerNorm(width, eps=eps)
        self.context_norm = nn.LayerNorm(width, eps=eps)
        self.cross_q = nn.Linear(width, width, bias=False)
        self.cross_kv = nn.Linear(width, 2 * width, bias=False)  # rows: [key | value]
        self.cross_proj = nn.Linear(width, width)
        self.out_norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, config.decoder_intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.decoder_intermediate_size, width)
        self.stacks = nn.ModuleList(
            nn.ModuleList([decoder_block(config) for _ in range(config.decoder_num_hidden_layers)])
            for _ in range(config.decoder_num_channels)
        )
        self.pred = nn.Linear(width, config.patch_size**2)

    def forward(self, latent, ids_restore, channel_ids, grid, channel_list=None, validate_inputs=False):
        """`latent (B, 1 + K, D)`, `ids_restore (B, L)`, `channel_ids (B, C)` -> `(B, L, p*p)`.

        Which block stack decodes a channel depends on its id. `channel_list` gives the ids as Python ints
        when the caller knows them (the same for every image). Without it, `decoder_num_channels` channels
        are taken to be an ordering of all the stacks and routed on the device (no host wait; checked only
        with `validate_inputs`); a subset of the channels is read back to the host once.
        """
        batch, channels = channel_ids.shape
        stacks = self.config.decoder_num_channels
        route_on_device = channel_list is None and channels == stacks
        if validate_inputs and route_on_device:
            expected = torch.arange(stacks, device=channel_ids.device)
            if not torch.equal(channel_ids.sort(dim=1).values, expected.expand(batch, -1)):
                raise ValueError(
                    f"channel_ids {channel_ids.tolist()} must give each image's {stacks} channels the ids "
                    f"0..{stacks - 1} once each, for this per-channel decoder's {stacks} stacks."
                )
        if channel_list is None and not route_on_device:
            rows = channel_ids.tolist()  # the stacks to run depend on the values: one host read
            if any(row != rows[0] for row in rows):
                raise ValueError("The per-channel decoder needs the same channel_ids for every image of a batch.")
            channel_list = rows[0]
        if channel_list is not None and max(channel_list) >= stacks:
            raise ValueError(
                f"channel_ids {list(channel_list)} exceed this per-channel decoder's {stacks} channels; "
                f"reconstruct with channel_ids below {stacks} or use decoder_type='shared'."
            )
        tokens = unshuffle_with_mask_tokens(self.embed(latent), ids_restore, self.mask_token)  # (B, L, E)
        width = tokens.shape[-1]
        position = cached_position_embedding(*grid, width, tokens.device, tokens.dtype)  # (N, E)
        identity = self.channel_tokens[channel_ids].to(tokens.dtype)  # (B, C, E)
        tokens = (tokens.reshape(batch, channels, -1, width) + position + identity.unsqueeze(2)).reshape(
            batch, -1, width
        )  # (B, L, E)
        # Cross-attention of every channel's tokens to all tokens = one attention over all queries.
        key, value = self.cross_kv(self.context_norm(tokens)).chunk(2, dim=-1)
        query = self.cross_q(self.query_norm(tokens))
        hidden = self.cross_proj(
            multi_head_attention(self, query, key, value, self.config.decoder_cross_attention_heads)
        )
        hidden = hidden + self.fc2(self.act(self.fc1(self.out_norm(hidden))))
        per_channel = hidden.reshape(batch, channels, -1, width)  # (B, C, N, E)
        if route_on_device:
            # Sort each image's channels by id so that position k goes through stack k, then sort back.
            order = channel_ids.argsort(dim=1)  # (B, C): position of the channel with id k
            by_id = torch.gather(per_channel, 1, order[:, :, None, None].expand_as(per_channel))
            decoded = torch.stack([self._decode(by_id[:, k], k) for k in range(stacks)], dim=1)  # (B, C, N, E)
            back = order.argsort(dim=1)[:, :, None, None].expand_as(decoded)
            decoded = torch.gather(decoded, 1, back)
        else:
            decoded = torch.stack([self._decode(per_channel[:, i], c) for i, c in enumerate(channel_list)], dim=1)
        return self.pred(decoded.reshape(batch, -1, width))

    def _decode(self, tokens: torch.Tensor, channel: int) -> torch.Tensor:
        """One channel's `(B, N, E)` tokens through that channel's block stack."""
        for layer in self.stacks[channel]:  # type: ignore[attr-defined]  # torch types ModuleList[i] as Module
            tokens = layer(tokens)
        return tokens


# ----------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------
def untrusted_weights_error(model: object, error: Exception) -> OSError:
    """The one-line refusal of a model folder whose pickled weights (``pytorch_model.bin``...) torch would not load
    with ``weights_only=True``: names the folder, its pickle files and the global asked for. torch's own text is
    dropped on purpose: it suggests retrying with ``weights_only=False``, which would run the code."""
    folder = Path(str(model))
    pickles = (
        sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if folder.is_dir()
        else []
    )
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    asked = f"they ask for {match.group(1)}" if match else "they hold objects other than tensors"
    return OSError(
        f"{model}: its pickled weights ({', '.join(pickles) or 'a .bin/.pt file'}) were not loaded: {asked}, which could "
        "run code; use a model folder with safetensors weights (model.safetensors, what save_pretrained writes) from a "
        "source you trust"
    )


def from_pretrained_refusing_pickles(from_pretrained, *args, **kwargs):
    """``from_pretrained(*args, **kwargs)``, with a crafted pickle's refusal (``pickle.UnpicklingError``) as one line."""
    try:
        return from_pretrained(*args, **kwargs)
    except pickle.UnpicklingError as error:
        model = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        raise untrusted_weights_error(model, error) from None


class CellMAEPreTrainedModel(PreTrainedModel):
    config_class = CellMAEConfig
    config: CellMAEConfig
    base_model_prefix = "cellmae"
    main_input_name = "pixel_values"
    input_modalities = ["image"]
    supports_gradient_checkpointing = True
    _no_split_modules = ["CellMAEParallelBlock", "CellMAEPreNormBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, CellMAEEmbeddings):
            init.normal_(module.cls_token, std=std)
        elif isinstance(module, CellMAESharedDecoder):
            init.normal_(module.mask_token, std=std)
        elif isinstance(module, CellMAEPerChannelDecoder):
            init.normal_(module.mask_token, std=std)
            init.normal_(module.channel_tokens, std=std)
        elif isinstance(module, CellMAEParallelBlock):
            init.zeros_(module.mlp_bias)
            if module.qkv_bias is not None:
                init.zeros_(module.qkv_bias)
        if isinstance(module, (CellMAEParallelBlock, CellMAEPreNormBlock)):
            # Only encoder blocks carry LayerScale (decoder blocks are built without it).
            for name in ("layer_scale", "layer_scale1", "layer_scale2"):
                scale = getattr(module, name, None)
                if scale is not None:
                    assert self.config.layer_scale_init is not None  # blocks carry LayerScale only when it is set
                    init.constant_(scale, self.config.layer_scale_init)

    def post_init(self):
        super().post_init()
        if self.config.parallel_mlp_bias_layout == "legacy_timm":
            # A folder in the old layout holds no qkv_bias: `from_pretrained` derives it from mlp_bias.
            assert isinstance(self._keys_to_ignore_on_load_missing, set)  # made a set by PreTrainedModel.post_init
            self._keys_to_ignore_on_load_missing.add(r"layers\.\d+\.qkv_bias$")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus: a folder whose config says
        `parallel_mlp_bias_layout="legacy_timm"` (saved by hf_cellmae before that layout was converted at
        load time, e.g. an older converted OpenPhenom) gets its biases turned into ordinary
        `mlp_bias`/`qkv_bias` here, once (`legacy_timm_parallel_biases`). Pickled weights that torch refuses to
        load (they could run code) raise a one-line ``OSError`` (`untrusted_weights_error`)."""
        loaded = from_pretrained_refusing_pickles(super().from_pretrained, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.parallel_mlp_bias_layout == "legacy_timm":
            model._convert_legacy_timm_biases()
        return loaded

    @torch.no_grad()
    def _convert_legacy_timm_biases(self) -> None:
        for block in self.modules():
            if isinstance(block, CellMAEParallelBlock):
                assert block.qkv_bias is not None  # the legacy layout implies qkv_bias (CellMAEConfig)
                mlp_bias, qkv_bias = legacy_timm_parallel_biases(block.mlp_bias, block.qkv_bias.numel())
                block.mlp_bias.copy_(mlp_bias)
                block.qkv_bias.copy_(qkv_bias)
        self.config.parallel_mlp_bias_layout = "current"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors), config and, for `trust_remote_code`, the model code files.
        The config's `auto_map` names every Auto class, so one folder serves `AutoModel` (encoder),
        `AutoModelForPreTraining` and `AutoModelForImageClassification` (a new head for fine-tuning). Weights in memory are always in the `"current"` bias layout."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        self.config.parallel_mlp_bias_layout = "current"
        return super().save_pretrained(save_directory, *args, **kwargs)


def validate_pixel_values(pixel_values, config: CellMAEConfig, check_values: bool = False) -> None:
    """Raise a clear error for input the model cannot take.

    Type, shape, dtype and channel count are metadata: always checked, free. Non-finite pixels are only
    looked for with `check_values`, because reading a device tensor's values makes the host wait for the
    device; `CellMAEImageProcessor` and the shard writer check them where the data enters instead."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; "
            "prepare images with CellMAEImageProcessor(...)(images, return_tensors='pt')."
        )
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}; "
            "add a batch axis with pixel_values[None] or use CellMAEImageProcessor."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}; the model takes standardised float pixels. "
            "Run raw images through CellMAEImageProcessor first."
        )
    _, channels, height, width = pixel_values.shape
    if not 1 <= channels <= config.max_channels:
        raise ValueError(
            f"pixel_values has {channels} channels but config.max_channels is {config.max_channels}; "
            "raise max_channels or drop channels."
        )
    patch = config.patch_size
    if height % patch or width % patch:
        raise ValueError(
            f"image size {height}x{width} is not divisible by patch_size={patch}; crop or tile to a multiple "
            f"of {patch} (CellMAEImageProcessor(image_size={config.image_size}) does this)."
        )
    if check_values and not torch.isfinite(pixel_values).all():
        bad = int((~torch.isfinite(pixel_values)).sum())
        raise ValueError(f"pixel_values contains {bad} non-finite values (NaN or inf); fix or drop those images.")


def resolve_channel_ids(
    channel_ids, batch: int, channels: int, config: CellMAEConfig, device, check_values: bool = False
) -> torch.Tensor:
    """`None`, a `(C,)` or a `(B, C)` sequence of ints -> `(B, C)` long tensor on `device`.

    The shape is always checked. The range is checked for ids given as Python ints (free), and for ids
    given as a tensor only with `check_values` (reading it would make the host wait for the device)."""
    if channel_ids is None:
        return torch.arange(channels, device=device).expand(batch, channels)
    given = torch.as_tensor(channel_ids, dtype=torch.long)  # a tensor stays where it is; a list is on the host
    ids = given.expand(batch, -1) if given.ndim == 1 else given
    if ids.shape != (batch, channels):
        raise ValueError(
            f"channel_ids has shape {tuple(given.shape)} but pixel_values has {batch} images of {channels} channels; "
            f"pass one id per channel, shape ({channels},) or ({batch}, {channels})."
        )
    if check_values or not isinstance(channel_ids, torch.Tensor):
        if int(ids.min()) < 0 or int(ids.max()) >= config.max_channels:
            raise ValueError(
                f"channel_ids {ids[0].tolist()} must lie in [0, {config.max_channels}) (config.max_channels)."
            )
    return ids.to(device)


def host_channel_list(channel_ids, channels: int) -> list[int] | None:
    """The channel ids as Python ints when they are known without reading a tensor (`None`: 0..C-1, or a
    list shared by every image); `None` for ids given as a tensor."""
    if channel_ids is None:
        return list(range(channels))
    if isinstance(channel_ids, torch.Tensor):
        return None
    rows = torch.as_tensor(channel_ids, dtype=torch.long).reshape(-1, channels).tolist()
    return rows[0] if all(row == rows[0] for row in rows) else None


def masking_noise(batch: int, length: int, device, noise: torch.Tensor | None = None, mask_seed: int | None = None):
    """`(B, L)` masking noise: `noise` as given (shape checked), else uniform, seeded by `mask_seed` if given."""
    if noise is not None:
        if noise.shape != (batch, length):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected ({batch}, {length}) = (B, C * N).")
        return noise.to(device)
    generator = None
    if mask_seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(mask_seed))
    return torch.rand(batch, length, device=device, generator=generator)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class CellMAEModel(CellMAEPreTrainedModel):
    """The CA-MAE encoder: image -> tokens -> embeddings.

    Example:
        >>> import torch, hf_cellmae
        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained("path/to/model")
        >>> out = model(torch.randn(2, 5, 256, 256))  # standardised 5-channel crops
        >>> out.pooler_output.shape
        torch.Size([2, 384])
    """

    # A pre-training checkpoint also holds the decoder, a classifier's its head; the encoder alone loads either quietly.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^classifier\.", r"^pool\."]

    def __init__(self, config: CellMAEConfig):
        super().__init__(config)
        self.embeddings = CellMAEEmbeddings(config)
        self.encoder = CellMAEEncoder(config)
        self.layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.final_layer_norm else None
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The shared patch embedding (a per-channel ``Conv2d``), as ViTMAE answers; FSDP shards it as one unit."""
        return self.embeddings.patch_embeddings

    def _run_encoder(self, tokens, output_hidden_states, key_mask=None):
        """Prepend the class token (zero position code), run the blocks, apply the final norm.
        `key_mask` `(B, K)` bool (optional): padding tokens (False) are attended to by no token."""
        cls = self.embeddings.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(len(key_mask), 1), key_mask], dim=1)  # (B, 1 + K)
        hidden, all_states = self.encoder(torch.cat([cls, tokens], dim=1), output_hidden_states, key_mask)
        if self.layernorm is not None:
            hidden = self.layernorm(hidden)
        return hidden, all_states

    def _checked_channel_ids(self, pixel_values, channel_ids, validate_inputs: bool | None) -> torch.Tensor:
        """Check `pixel_values` and return `channel_ids` as a `(B, C)` long tensor (see `validate_pixel_values`)."""
        check_values = self.config.validate_inputs if validate_inputs is None else validate_inputs
        validate_pixel_values(pixel_values, self.config, check_values)
        batch, channels = pixel_values.shape[:2]
        return resolve_channel_ids(channel_ids, batch, channels, self.config, pixel_values.device, check_values)

    def forward(
        self,
        pixel_values: torch.Tensor,
        channel_ids=None,
        output_channelwise_embeddings: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        validate_inputs: bool | None = None,
        keep_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | CellMAEModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): standardised pixels (see
                `CellMAEImageProcessor`); 1 <= C <= `config.max_channels`, H and W multiples of `patch_size`.
            channel_ids (`torch.LongTensor` of shape `(C,)` or `(B, C)`, *optional*): which stain each
                channel is (indices into `config.channel_names`); defaults to `0..C-1`. Only used when the
                model has channel embeddings.
            output_channelwise_embeddings (`bool`): also return the per-channel mean tokens `(B, C, D)`.
            output_hidden_states (`bool`): also return every block's hidden states.
            validate_inputs (`bool`, *optional*): also check the values (non-finite pixels, channel ids
                given as a tensor out of range); this makes the host wait for the device. Defaults to
                `config.validate_inputs` (off).
            keep_mask (`torch.BoolTensor` of shape `(B, N)` or `(B, C * N)`, *optional*): encode only these patch
                tokens (the model was trained to read a subset: MAE's visible tokens), e.g. the patches of one cell.
                `(B, N)` keeps the same patches of every channel. Rows may keep different numbers of tokens: the
                output is padded to the largest (see `kept_token_ids`), and the pooled and channel-wise embeddings
                are means over the kept tokens only. Each row must keep at least one token.
        """
        ids = self._checked_channel_ids(pixel_values, channel_ids, validate_inputs)
        batch, channels = pixel_values.shape[:2]
        tokens = self.embeddings(pixel_values, ids)  # (B, C*N, D)
        if keep_mask is not None:
            return self._forward_kept(
                tokens, keep_mask, channels, output_channelwise_embeddings, output_hidden_states, return_dict
            )
        hidden, all_states = self._run_encoder(tokens, output_hidden_states)  # (B, 1 + C*N, D)
        patch_tokens = hidden[:, 1:]
        channelwise = None
        if output_channelwise_embeddings:
            channelwise = patch_tokens.reshape(batch, channels, -1, patch_tokens.shape[-1]).mean(2)  # (B, C, D)
        output = CellMAEModelOutput(
            last_hidden_state=hidden,
            pooler_output=patch_tokens.mean(1),
            channelwise_embeddings=channelwise,
            hidden_states=all_states,
        )
        return output if return_dict is not False else output.to_tuple()

    def _forward_kept(
        self, tokens, keep_mask, channels, output_channelwise_embeddings, output_hidden_states, return_dict
    ):
        """`forward` on the tokens `keep_mask` keeps: gathered (in channel-major order), padded, encoded."""
        batch, length, dim = tokens.shape  # (B, C*N, D)
        per_channel = length // channels
        keep = keep_mask.to(tokens.device, torch.bool)
        if keep.shape == (batch, per_channel):
            keep = keep.repeat(1, channels)  # (B, C*N): the same patches of every channel
        if keep.shape != (batch, length):
            raise ValueError(
                f"keep_mask has shape {tuple(keep_mask.shape)}; expected ({batch}, {per_channel}) = (B, N) "
                f"or ({batch}, {length}) = (B, C * N)"
            )
        counts = keep.sum(1)  # (B,)
        if bool((counts == 0).any()):
            raise ValueError(
                f"keep_mask keeps no token in row(s) {torch.nonzero(counts == 0).flatten().tolist()}; "
                "keep at least one patch per image (or leave the image out)"
            )
        width = int(counts.max())
        # Kept tokens first, in their channel-major order (a stable sort of "not kept").
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # (B, K)
        valid = torch.arange(width, device=tokens.device)[None, :] < counts[:, None]  # (B, K)
        kept = torch.gather(tokens, 1, order.unsqueeze(-1).expand(-1, -1, dim))  # (B, K, D)
        hidden, all_states = self._run_encoder(kept, output_hidden_states, key_mask=valid)  # (B, 1 + K, D)
        weights = valid.to(hidden.dtype).unsqueeze(-1)  # (B, K, 1)
        hidden = torch.cat([hidden[:, :1], hidden[:, 1:] * weights], dim=1)  # padding zeroed
        patch_tokens = hidden[:, 1:]
        channelwise = None
        if output_channelwise_embeddings:
            channel_of = F.one_hot(order // per_channel, channels).to(hidden.dtype) * weights  # (B, K, C)
            sums = torch.einsum("bkc,bkd->bcd", channel_of, patch_tokens)  # (B, C, D)
            channelwise = sums / channel_of.sum(1).clamp(min=1).unsqueeze(-1)
        output = CellMAEModelOutput(
            last_hidden_state=hidden,
            pooler_output=patch_tokens.sum(1) / counts[:, None].to(hidden.dtype),
            channelwise_embeddings=channelwise,
            hidden_states=all_states,
            kept_token_ids=torch.where(valid, order, torch.full_like(order, -1)),
        )
        return output if return_dict is not False else output.to_tuple()

    def forward_masked(
        self,
        pixel_values: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        mask_seed: int | None = None,
        channel_ids=None,
        output_hidden_states: bool = False,
        validate_inputs: bool | None = None,
    ) -> CellMAEMaskedEncoderOutput:
        r"""MAE's masked encoding: embed every channel's patches, drop a random `mask_ratio` of the tokens
        (jointly over channels), encode the class token and the visible tokens.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): standardised pixels.
            mask_ratio (`float`, *optional*): fraction of the `C * N` tokens removed; `config.mask_ratio` by default.
            noise (`torch.FloatTensor` of shape `(B, C * N)`, *optional*): the tokens with the smallest noise
                stay visible; makes the mask exactly reproducible.
            mask_seed (`int`, *optional*): seed for the noise when `noise` is not given.
            channel_ids, output_hidden_states, validate_inputs: as in `forward`.
        """
        ids = self._checked_channel_ids(pixel_values, channel_ids, validate_inputs)
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        tokens = self.embeddings(pixel_values, ids)  # (B, L, D), L = C*N
        batch, length = tokens.shape[:2]
        noise = masking_noise(batch, length, tokens.device, noise, mask_seed)  # (B, L)
        visible, mask, ids_restore = random_masking(tokens, ratio, noise)  # (B, K, D), (B, L), (B, L)
        latent, all_states = self._run_encoder(visible, output_hidden_states)  # (B, 1 + K, D)
        return CellMAEMaskedEncoderOutput(
            last_hidden_state=latent, mask=mask, ids_restore=ids_restore, channel_ids=ids, hidden_states=all_states
        )


class CellMAEForPreTraining(CellMAEPreTrainedModel):
    """CA-MAE encoder + decoder + reconstruction losses (MSE and Fourier) for self-supervised pre-training.

    Example:
        >>> model = CellMAEForPreTraining(CellMAEConfig.from_preset("tiny"))
        >>> out = model(torch.randn(2, 5, 64, 64), mask_seed=0)
        >>> out.loss, out.mse_loss, out.fourier_loss, out.logits.shape  # (2, 5*64, 64)
    """

    def __init__(self, config: CellMAEConfig):
        super().__init__(config)
        self.cellmae = CellMAEModel(config)
        self.decoder: CellMAESharedDecoder | CellMAEPerChannelDecoder
        if config.decoder_type == "shared":
            self.decoder = CellMAESharedDecoder(config)
        else:
            self.decoder = CellMAEPerChannelDecoder(config)
        self.post_init()

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, C * N, patch_size**2)` in the model's token order."""
        return patchify(pixel_values, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor, num_channels: int, grid: tuple[int, int] | None = None):
        """`(B, C * N, patch_size**2)` (e.g. `logits`) -> `(B, C, H, W)` images."""
        return unpatchify(patches, num_channels, self.config.patch_size, grid)

    def compute_loss(self, logits, pixel_values, mask, grid, mask_ratio: float | None = None):
        """`reconstruction_loss` with this model's config (`mask_ratio` default: `config.mask_ratio`);
        returns (loss, mse, fourier)."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        return reconstruction_loss(self.config, logits, pixel_values, mask, grid, ratio)

    def forward(
        self,
        pixel_values: torch.Tensor,
        channel_ids=None,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        mask_seed: int | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        validate_inputs: bool | None = None,
        **kwargs,
    ) -> tuple | CellMAEForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): standardised pixels.
            channel_ids (`(C,)` or `(B, C)` ints, *optional*): stain of each channel (default `0..C-1`).
            mask_ratio (`float`, *optional*): overrides `config.mask_ratio`.
            noise (`torch.FloatTensor` of shape `(B, C * N)`, *optional*): masking noise; the tokens with
                the smallest values stay visible. Makes the mask exactly reproducible.
            mask_seed (`int`, *optional*): seed for the masking noise when `noise` is not given.
            validate_inputs (`bool`, *optional*): also check input values (see `CellMAEModel.forward`).
        """
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio  # read once: the mask and the loss use it
        encoded = self.cellmae.forward_masked(
            pixel_values, ratio, noise, mask_seed, channel_ids, output_hidden_states, validate_inputs
        )
        channels, height, width = pixel_values.shape[1:]
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        check_values = self.config.validate_inputs if validate_inputs is None else validate_inputs
        logits = self.decoder(
            encoded.last_hidden_state,
            encoded.ids_restore,
            encoded.channel_ids,
            grid,
            host_channel_list(channel_ids, channels),
            check_values,
        )  # (B, L, p*p)
        loss, mse, fourier = reconstruction_loss(self.config, logits, pixel_values, encoded.mask, grid, ratio)
        output = CellMAEForPreTrainingOutput(
            loss=loss,
            mse_loss=mse,
            fourier_loss=fourier,
            logits=logits,
            mask=encoded.mask,
            ids_restore=encoded.ids_restore,
            last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "CellMAEForPreTraining",
    "CellMAEMaskedEncoderOutput",
    "CellMAEForPreTrainingOutput",
    "CellMAEModel",
    "CellMAEModelOutput",
    "CellMAEPreTrainedModel",
]

# The heads live in modeling_cellmae_heads.py (they subclass this file's classes); `hf_cellmae.modeling_cellmae.X`
# still finds them. The relative import below is also what makes save_pretrained copy that file beside this one.
_HEADS = ("CellMAEAttentionPool", "CellMAEForImageClassification", "classifier_input", "plate_batch_norm")


def __getattr__(name: str):
    if name not in _HEADS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .modeling_cellmae_heads import (
        CellMAEAttentionPool,
        CellMAEForImageClassification,
        classifier_input,
        plate_batch_norm,
    )

    heads = (CellMAEAttentionPool, CellMAEForImageClassification, classifier_input, plate_batch_norm)
    return dict(zip(_HEADS, heads))[name]
