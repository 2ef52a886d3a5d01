"""Configuration of the masked U-Net autoencoder (MU-Net) of Kraus et al. 2024, the convolutional family
the paper scales beside the ViT MAEs.

A MU-Net is fixed-channel: its first convolution mixes all `num_channels` stains, so it takes exactly the
channels it was built for (in any order, named by `channel_ids`) and no subset. Use a CA-MAE
(`CellMAEConfig`) for other channel sets.

This file imports only transformers, so it can be copied into a Hub repository and loaded with
``trust_remote_code=True``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

MASK_FILLS = ("learned", "zeros")
FOURIER_SCOPES = ("patch", "image")
CLASSIFIER_POOLINGS = ("mean", "attention")
CLASSIFIER_BATCH_NORMS = (None, "plate", "plate_center")

# Sizes. The paper (Kraus et al. 2024, arXiv 2404.10242) trains MU-Net-M and MU-Net-L; its text was not at hand
# when these were written, so `munet_m` and `munet_l` are APPROXIMATIONS: a five-level U-Net whose widths double
# per level, M at base width 64 and L at base width 128 (parameters are printed by scripts/benchmark_munet.py).
MUNET_PRESETS: dict[str, dict] = {
    # For unit tests and the CPU demo.
    "tiny": dict(image_size=64, patch_size=8, stage_channels=[16, 32, 64], blocks_per_stage=1, norm_num_groups=4),
    "munet_m": dict(image_size=256, patch_size=16, stage_channels=[64, 128, 256, 512, 1024], blocks_per_stage=2),
    "munet_l": dict(image_size=256, patch_size=16, stage_channels=[128, 256, 512, 1024, 2048], blocks_per_stage=2),
}


class CellMUNetConfig(PretrainedConfig):
    r"""Configuration of a masked U-Net autoencoder for fixed-channel microscopy crops.

    The input `(B, C, H, W)` is cut into `patch_size` x `patch_size` patches per channel, in the same
    channel-major order as CA-MAE's tokens; `mask_ratio` of them are replaced by a fill (a learned
    `(C, p, p)` pattern, or zeros) BEFORE the convolutions, and the U-Net reconstructs every pixel. The loss is
    CA-MAE's: MSE on the masked patches mixed with the Fourier-magnitude loss.

    Args:
        num_channels (`int`, defaults to 6): the stains the model takes, all of them, every time.
        channel_names (`list[str]`, *optional*): their names, in the model's channel order.
        image_size (`int`, defaults to 256): training crop side; any multiple of `patch_size` and of
            `2 ** (len(stage_channels) - 1)` works at inference.
        patch_size (`int`, defaults to 16): side of a masked patch, in pixels.
        stage_channels (`list[int]`): width of each U-Net level, shallow to deep; the last is the embedding width
            (`hidden_size`).
        blocks_per_stage (`int`, defaults to 2): residual blocks per level, in the encoder and in the decoder.
        norm_num_groups (`int`, defaults to 8): GroupNorm groups (capped by and dividing each width).
        mask_ratio (`float`, defaults to 0.75): fraction of the `C * tokens_per_channel` patches masked.
        mask_fill (`str`, defaults to `"learned"`): `"learned"` (a trained per-channel patch) or `"zeros"`.
        norm_pix_loss, fourier_loss_weight, fourier_loss_scope, mask_fourier_loss: as in `CellMAEConfig`.
        classifier_pooling (`str`, defaults to `"mean"`): read-out of `CellMUNetForImageClassification`:
            `"mean"` of the bottleneck, or `"attention"` (a learned query attending to its positions).
        classifier_batch_norm (`str`, *optional*): `None`, `"plate"` or `"plate_center"`: plate-wise normalisation
            of the pooled embedding before the classifier, as in `CellMAEConfig`.
        initializer_range (`float`, defaults to 0.02): std of the normal init of the mask fill and queries.
    """

    model_type = "cellmunet"

    def __init__(
        self,
        num_channels: int = 6,
        channel_names: list[str] | None = None,
        image_size: int = 256,
        patch_size: int = 16,
        stage_channels: list[int] | tuple[int, ...] = (64, 128, 256, 512, 1024),
        blocks_per_stage: int = 2,
        norm_num_groups: int = 8,
        mask_ratio: float = 0.75,
        mask_fill: str = "learned",
        norm_pix_loss: bool = False,
        fourier_loss_weight: float = 0.01,
        fourier_loss_scope: str = "patch",
        mask_fourier_loss: bool = True,
        classifier_pooling: str = "mean",
        classifier_batch_norm: str | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.image_size = image_size
        self.patch_size = patch_size
        self.stage_channels = [int(width) for width in stage_channels]
        self.blocks_per_stage = blocks_per_stage
        self.norm_num_groups = norm_num_groups
        self.mask_ratio = mask_ratio
        self.mask_fill = mask_fill
        self.norm_pix_loss = norm_pix_loss
        self.fourier_loss_weight = fourier_loss_weight
        self.fourier_loss_scope = fourier_loss_scope
        self.mask_fourier_loss = mask_fourier_loss
        self.classifier_pooling = classifier_pooling
        self.classifier_batch_norm = classifier_batch_norm
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        for name, allowed in (
            ("mask_fill", MASK_FILLS),
            ("fourier_loss_scope", FOURIER_SCOPES),
            ("classifier_pooling", CLASSIFIER_POOLINGS),
            ("classifier_batch_norm", CLASSIFIER_BATCH_NORMS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        if not self.stage_channels:
            raise ValueError("stage_channels must name at least one level width, e.g. [64, 128, 256].")
        if self.num_channels < 1:
            raise ValueError(f"num_channels={self.num_channels} must be at least 1.")
        if self.channel_names is not None and len(self.channel_names) != self.num_channels:
            raise ValueError(
                f"{len(self.channel_names)} channel_names for num_channels={self.num_channels}; a MU-Net is "
                "fixed-channel: name each of its channels once."
            )
        if self.image_size % self.patch_size or self.image_size % self.downsampling:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size} and of "
                f"{self.downsampling} (2 ** (levels - 1) for {len(self.stage_channels)} levels)."
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must be in [0, 1).")
        if not 0.0 <= self.fourier_loss_weight <= 1.0:
            raise ValueError(f"fourier_loss_weight={self.fourier_loss_weight} must be in [0, 1].")

    @property
    def hidden_size(self) -> int:
        """Width of the bottleneck: the size of the pooled embedding."""
        return self.stage_channels[-1]

    @property
    def downsampling(self) -> int:
        """Factor between the input and the bottleneck resolution."""
        return 2 ** (len(self.stage_channels) - 1)

    @property
    def max_channels(self) -> int:
        """The only channel count a MU-Net takes (the name CA-MAE code reads)."""
        return self.num_channels

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_channel(self) -> int:
        """Masking patches per channel of an `image_size` crop."""
        return self.grid_size**2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CellMUNetConfig:
        """A configuration of a named size (`"tiny"`, `"munet_m"`, `"munet_l"`), any field overridden by keyword."""
        if name not in MUNET_PRESETS:
            raise ValueError(f"Unknown MU-Net preset {name!r}; choose one of {sorted(MUNET_PRESETS)}.")
        return cls(**{**MUNET_PRESETS[name], **overrides})


__all__ = ["CellMUNetConfig", "MUNET_PRESETS"]
