"""Masked U-Net autoencoder (MU-Net) for fixed-channel multi-channel microscopy.

Kraus et al., "Masked Autoencoders for Microscopy are Scalable Learners of Cellular Biology" (CVPR 2024,
arXiv 2404.10242) scale two MAE families: ViTs (CA-MAE, `modeling_cellmae`) and U-Nets (MU-Net, here).
A MU-Net masks patches of the input by replacing their pixels (with a learned fill or zeros) BEFORE the
convolutions, then reconstructs the whole image with a U-Net; the loss is CA-MAE's (masked-patch MSE mixed
with a Fourier-magnitude loss), computed with the same functions. The encoder half gives a pooled bottleneck
embedding and multi-scale feature maps.

Fixed-channel by construction: the first convolution mixes all `config.num_channels` stains, so a MU-Net takes
exactly those channels (any order, named by `channel_ids`) and refuses any other count.

This file imports only torch, transformers and, relatively, `configuration_munet`, `modeling_cellmae` (masking,
patch and loss functions: the same loss and masking noise as CA-MAE's) and `modeling_cellmae_heads` (the
classifier's read-out and plate-wise normalisation), so `save_pretrained` copies them next to the weights and
`trust_remote_code=True` loads it anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .configuration_munet import CellMUNetConfig
from .modeling_cellmae import (
    from_pretrained_refusing_pickles,
    masking_noise,
    patchify,
    random_masking,
    reconstruction_loss,
    unpatchify,
)
from .modeling_cellmae_heads import CellMAEAttentionPool, classifier_input

# Written into config.json by save_pretrained so that one checkpoint loads through every Auto class.
AUTO_MAP = {
    "AutoConfig": "configuration_munet.CellMUNetConfig",
    "AutoModel": "modeling_munet.CellMUNetModel",
    "AutoModelForPreTraining": "modeling_munet.CellMUNetForPreTraining",
    "AutoModelForImageClassification": "modeling_munet.CellMUNetForImageClassification",
}


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
@dataclass
class CellMUNetModelOutput(ModelOutput):
    """Encoder output.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, D, H / s, W / s)`): the bottleneck feature map
            (`D = config.hidden_size`, `s = config.downsampling`).
        pooler_output (`torch.FloatTensor` of shape `(B, D)`): its spatial mean: the image embedding.
        hidden_states (`tuple(torch.FloatTensor)`): the multi-scale feature maps, one per level, shallow to deep:
            `(B, stage_channels[i], H / 2**i, W / 2**i)`; the last is `last_hidden_state`.
    """

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CellMUNetForPreTrainingOutput(ModelOutput):
    """Masked-autoencoder output, laid out like `CellMAEForPreTrainingOutput`.

    Args:
        loss, mse_loss, fourier_loss (`torch.FloatTensor`, scalars): as CA-MAE's.
        logits (`torch.FloatTensor` of shape `(B, C * N, patch_size**2)`): the reconstruction, patchified in
            CA-MAE's channel-major token order (`unpatchify` gives `(B, C, H, W)`), channels in model order.
        mask (`torch.FloatTensor` of shape `(B, C * N)`): 1 for masked (filled, reconstructed) patches.
        last_hidden_state (`torch.FloatTensor` of shape `(B, D, H / s, W / s)`): bottleneck of the masked input.
    """

    loss: torch.Tensor | None = None
    mse_loss: torch.Tensor | None = None
    fourier_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------
def group_norm(width: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `width`."""
    groups = min(groups, width)
    while width % groups:
        groups -= 1
    return nn.GroupNorm(groups, width)


def patch_mask_to_pixels(mask: torch.Tensor, channels: int, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """`(B, C * N)` patch mask (channel-major, row-major patches) -> `(B, C, H, W)` pixel mask."""
    pixel_mask = mask.reshape(mask.shape[0], channels, *grid)  # (B, C, rows, cols)
    return pixel_mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class CellMUNetResidualBlock(GradientCheckpointingLayer):
    """`x + conv(act(norm(conv(act(norm(x))))))`, 3x3 convolutions, width kept."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(width, groups)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = group_norm(width, groups)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(self.act(self.norm1(hidden_states)))
        return hidden_states + self.conv2(self.act(self.norm2(residual)))


class CellMUNetEncoder(nn.Module):
    """Stem, then per level: (a stride-2 downsampling between levels) and residual blocks."""

    def __init__(self, config: CellMUNetConfig):
        super().__init__()
        widths, groups = config.stage_channels, config.norm_num_groups
        self.stem = nn.Conv2d(config.num_channels, widths[0], 3, padding=1)
        self.downsample = nn.ModuleList(
            nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1) for i in range(1, len(widths))
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(CellMUNetResidualBlock(width, groups) for _ in range(config.blocks_per_stage))
            for width in widths
        )
        self.norm = group_norm(widths[-1], groups)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(B, C, H, W)` -> one feature map per level, `(B, stage_channels[i], H / 2**i, W / 2**i)`."""
        hidden = self.stem(pixel_values)
        features = []
        for level, blocks in enumerate(self.stages):
            if level > 0:
                hidden = self.downsample[level - 1](hidden)
            for block in blocks:  # type: ignore[attr-defined]  # torch types a ModuleList item as Module
                hidden = block(hidden)
            features.append(hidden)
        features[-1] = self.norm(features[-1])
        return tuple(features)


class CellMUNetDecoder(nn.Module):
    """Per level, deep to shallow: 2x transposed-convolution upsampling, concatenation with the encoder's
    feature map of that level (skip connection), a 1x1 fusion and residual blocks; a 1x1 head to pixels."""

    def __init__(self, config: CellMUNetConfig):
        super().__init__()
        widths, groups = config.stage_channels, config.norm_num_groups
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(len(widths) - 1))
        )
        self.fuse = nn.ModuleList(nn.Conv2d(2 * widths[i], widths[i], 1) for i in reversed(range(len(widths) - 1)))
        self.stages = nn.ModuleList(
            nn.ModuleList(CellMUNetResidualBlock(widths[i], groups) for _ in range(config.blocks_per_stage))
            for i in reversed(range(len(widths) - 1))
        )
        self.norm = group_norm(widths[0], groups)
        self.act = nn.SiLU()
        self.head = nn.Conv2d(widths[0], config.num_channels, 1)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Encoder feature maps (shallow to deep) -> `(B, C, H, W)` reconstruction."""
        hidden = features[-1]
        for upsample, fuse, blocks, skip in zip(self.upsample, self.fuse, self.stages, reversed(features[:-1])):
            hidden = fuse(torch.cat([upsample(hidden), skip], dim=1))  # (B, w_i, H / 2**i, W / 2**i)
            for block in blocks:  # type: ignore[attr-defined]  # torch types a ModuleList item as Module
                hidden = block(hidden)
        return self.head(self.act(self.norm(hidden)))


# ----------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------
class CellMUNetPreTrainedModel(PreTrainedModel):
    config_class = CellMUNetConfig
    config: CellMUNetConfig
    base_model_prefix = "munet"
    main_input_name = "pixel_values"
    input_modalities = ["image"]
    supports_gradient_checkpointing = True
    _no_split_modules = ["CellMUNetResidualBlock"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; pickled weights that torch refuses (they could run code) raise a
        one-line ``OSError``."""
        return from_pretrained_refusing_pickles(super().from_pretrained, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CellMUNetForPreTraining) and module.mask_token is not None:
            init.normal_(module.mask_token, std=std)
        elif isinstance(module, CellMAEAttentionPool):
            init.normal_(module.query, std=std)
        if isinstance(module, CellMUNetResidualBlock):
            # Each residual branch starts as the identity: deep U-Nets train from the first step.
            init.zeros_(module.conv2.weight)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors), config and, for `trust_remote_code`, the model code files; the config's
        `auto_map` names every Auto class, so one folder serves the encoder, pre-training and classification."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


def validate_pixel_values(pixel_values, config: CellMUNetConfig) -> None:
    """Raise a clear error for input the model cannot take (above all, another channel count)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; "
            "prepare images with CellMAEImageProcessor(...)(images, return_tensors='pt')."
        )
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values has dtype {pixel_values.dtype}; run raw images through CellMAEImageProcessor first."
        )
    _, channels, height, width = pixel_values.shape
    if channels != config.num_channels:
        names = f" ({', '.join(config.channel_names)})" if config.channel_names else ""
        raise ValueError(
            f"pixel_values has {channels} channels but this MU-Net was built for exactly {config.num_channels}{names}: "
            "a MU-Net is fixed-channel. Give it all of its channels, or use a channel-agnostic CA-MAE for other channel sets."
        )
    multiple = max(config.patch_size, config.downsampling)
    if (
        height % config.patch_size
        or width % config.patch_size
        or height % config.downsampling
        or width % config.downsampling
    ):
        raise ValueError(
            f"image size {height}x{width} must be a multiple of patch_size={config.patch_size} and of the U-Net's "
            f"downsampling {config.downsampling}; crop or tile to a multiple of {multiple}."
        )


def to_model_channel_order(pixel_values: torch.Tensor, channel_ids, config: CellMUNetConfig) -> torch.Tensor:
    """Put input channel i at model channel `channel_ids[i]`; `channel_ids` (`(C,)` or `(B, C)`) must name every
    model channel once. `None` keeps the order."""
    if channel_ids is None:
        return pixel_values
    batch, channels = pixel_values.shape[:2]
    given = torch.as_tensor(channel_ids, device=pixel_values.device, dtype=torch.long)
    ids = given.expand(batch, -1) if given.ndim == 1 else given  # (B, C)
    expected = torch.arange(config.num_channels, device=ids.device)
    if ids.shape != (batch, channels) or not torch.equal(ids.sort(dim=1).values, expected.expand(batch, -1)):
        raise ValueError(
            f"channel_ids {given.tolist()} must name each of this MU-Net's {config.num_channels} channels exactly once "
            "(a MU-Net is fixed-channel: no subsets or repeats)."
        )
    index = ids[:, :, None, None].expand_as(pixel_values)
    return torch.empty_like(pixel_values).scatter_(1, index, pixel_values)  # (B, C, H, W) in model order


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class CellMUNetModel(CellMUNetPreTrainedModel):
    """The MU-Net encoder: image -> multi-scale feature maps -> pooled bottleneck embedding.

    Example:
        >>> model = CellMUNetModel(CellMUNetConfig.from_preset("tiny", num_channels=5))
        >>> out = model(torch.randn(2, 5, 64, 64))
        >>> out.pooler_output.shape, [f.shape[1] for f in out.hidden_states]
        (torch.Size([2, 64]), [16, 32, 64])
    """

    # A pre-training checkpoint also holds the decoder and mask fill; the encoder alone loads it quietly.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^mask_token$", r"^classifier\.", r"^pool\."]

    def __init__(self, config: CellMUNetConfig):
        super().__init__(config)
        self.encoder = CellMUNetEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        channel_ids=None,
        output_hidden_states: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | CellMUNetModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): standardised pixels, exactly
                `config.num_channels` channels.
            channel_ids (`(C,)` or `(B, C)` ints, *optional*): the model channel of each input channel (a permutation
                of `0..C-1`); default: the input is in model order.
            output_hidden_states (`bool`, defaults to `True`): return the multi-scale feature maps.
        """
        validate_pixel_values(pixel_values, self.config)
        pixel_values = to_model_channel_order(pixel_values, channel_ids, self.config)
        features = self.encoder(pixel_values.to(self.encoder.stem.weight.dtype))
        bottleneck = features[-1]  # (B, D, H / s, W / s)
        output = CellMUNetModelOutput(
            last_hidden_state=bottleneck,
            pooler_output=bottleneck.mean(dim=(2, 3)),
            hidden_states=features if output_hidden_states else None,
        )
        return output if return_dict is not False else output.to_tuple()


class CellMUNetForPreTraining(CellMUNetPreTrainedModel):
    """MU-Net encoder + decoder + CA-MAE's reconstruction losses for self-supervised pre-training.

    Example:
        >>> model = CellMUNetForPreTraining(CellMUNetConfig.from_preset("tiny", num_channels=5))
        >>> out = model(torch.randn(2, 5, 64, 64), mask_seed=0)
        >>> out.loss, out.logits.shape  # (2, 5 * 64, 64), like CA-MAE
    """

    def __init__(self, config: CellMUNetConfig):
        super().__init__(config)
        self.munet = CellMUNetModel(config)
        self.decoder = CellMUNetDecoder(config)
        patch = config.patch_size
        # The fill of a masked patch: one learned p x p pattern per channel (or zeros).
        self.mask_token = (
            nn.Parameter(torch.zeros(config.num_channels, patch, patch)) if config.mask_fill == "learned" else None
        )
        self.post_init()

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` -> `(B, C * N, patch_size**2)` in CA-MAE's token order."""
        return patchify(pixel_values, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor, num_channels: int, grid: tuple[int, int] | None = None):
        """`(B, C * N, patch_size**2)` (e.g. `logits`) -> `(B, C, H, W)` images."""
        return unpatchify(patches, num_channels, self.config.patch_size, grid)

    def mask_pixels(self, pixel_values: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Replace the masked patches' pixels by the fill: `(B, C, H, W)`, `(B, C * N)` -> `(B, C, H, W)`."""
        channels = pixel_values.shape[1]
        pixel_mask = patch_mask_to_pixels(mask, channels, grid, self.config.patch_size).to(pixel_values.dtype)
        if self.mask_token is None:
            return pixel_values * (1 - pixel_mask)
        fill = self.mask_token.to(pixel_values.dtype).repeat(1, *grid)  # (C, H, W): the pattern tiled
        return pixel_values * (1 - pixel_mask) + fill * pixel_mask

    def forward(
        self,
        pixel_values: torch.Tensor,
        channel_ids=None,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        mask_seed: int | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | CellMUNetForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): standardised pixels, `C = config.num_channels`.
            channel_ids (`(C,)` or `(B, C)` ints, *optional*): model channel of each input channel (a permutation).
            mask_ratio (`float`, *optional*): overrides `config.mask_ratio`.
            noise (`torch.FloatTensor` of shape `(B, C * N)`, *optional*): masking noise; the patches with the smallest
                values stay visible (the same rule as CA-MAE, so the same noise masks the same patches).
            mask_seed (`int`, *optional*): seed for the masking noise when `noise` is not given.
        """
        validate_pixel_values(pixel_values, self.config)
        pixel_values = to_model_channel_order(pixel_values, channel_ids, self.config).to(
            self.munet.encoder.stem.weight.dtype
        )
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        batch, channels, height, width = pixel_values.shape
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        length = channels * grid[0] * grid[1]
        noise = masking_noise(batch, length, pixel_values.device, noise, mask_seed)  # (B, L)
        # random_masking on dummy (B, L, 1) tokens: CA-MAE's mask for the same noise and ratio.
        _, mask, _ = random_masking(noise.new_zeros(batch, length, 1), ratio, noise)  # (B, L)
        mask = mask.to(pixel_values.dtype)
        features = self.munet.encoder(self.mask_pixels(pixel_values, mask, grid))
        reconstruction = self.decoder(features)  # (B, C, H, W)
        logits = self.patchify(reconstruction)  # (B, L, p*p)
        loss, mse, fourier = reconstruction_loss(self.config, logits, pixel_values, mask, grid, ratio)
        output = CellMUNetForPreTrainingOutput(
            loss=loss,
            mse_loss=mse,
            fourier_loss=fourier,
            logits=logits,
            mask=mask,
            last_hidden_state=features[-1],
            hidden_states=features if output_hidden_states else None,
        )
        return output if return_dict is not False else output.to_tuple()


class CellMUNetForImageClassification(CellMUNetPreTrainedModel):
    """MU-Net encoder + a linear classifier on the bottleneck, read out by its mean (`config.classifier_pooling
    = "mean"`, default) or by attention pooling over its positions (`"attention"`). `labels` give the
    cross-entropy loss (or MSE / multi-label BCE following `config.problem_type`, as in transformers); loading a
    pre-training folder keeps the encoder, drops the decoder and mask fill, and initialises only the head."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^mask_token$"]

    def __init__(self, config: CellMUNetConfig):
        super().__init__(config)
        num_labels = config.num_labels
        assert num_labels is not None  # PretrainedConfig.__init__ always sets id2label
        self.num_labels = num_labels
        self.munet = CellMUNetModel(config)
        width = config.hidden_size
        heads = width // 64 if width % 64 == 0 else 1
        self.pool = CellMAEAttentionPool(width, heads) if config.classifier_pooling == "attention" else None
        self.classifier = nn.Linear(width, num_labels) if num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        channel_ids=None,
        plate_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): standardised pixels, `C = config.num_channels`.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices in `[0, num_labels)`.
            plate_ids (`torch.LongTensor` of shape `(B,)`, *optional*): plate of each sample, for
                `config.classifier_batch_norm` (see `plate_batch_norm`).
        """
        out = self.munet(pixel_values, channel_ids=channel_ids, output_hidden_states=output_hidden_states)
        if self.pool is None:
            pooled = out.pooler_output  # (B, D)
        else:
            pooled = self.pool(out.last_hidden_state.flatten(2).transpose(1, 2))  # (B, h*w, D) -> (B, D)
        logits = self.classifier(classifier_input(pooled, self.config, plate_ids))  # (B, num_labels)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "CellMUNetForImageClassification",
    "CellMUNetForPreTraining",
    "CellMUNetForPreTrainingOutput",
    "CellMUNetModel",
    "CellMUNetModelOutput",
    "CellMUNetPreTrainedModel",
]
