"""Configuration of the channel-agnostic ViT-MAE (CA-MAE) of Kraus et al. 2024 and OpenPhenom.

This file imports only transformers, so it can be copied into a Hub repository and loaded with
``trust_remote_code=True``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

BLOCK_TYPES = ("parallel", "prenorm")
DECODER_TYPES = ("shared", "per_channel")
FOURIER_SCOPES = ("patch", "image")
MLP_BIAS_LAYOUTS = ("current", "legacy_timm")
CLASSIFIER_POOLINGS = ("mean", "attention")
CLASSIFIER_BATCH_NORMS = (None, "plate", "plate_center")

# Encoder/decoder sizes of the paper's models (Kraus et al. 2024, table 1) and of OpenPhenom.
# Every entry is a set of CellMAEConfig keyword arguments; `CellMAEConfig.from_preset` applies them.
PRESETS: dict[str, dict] = {
    # For unit tests and the CPU demo: a few seconds per hundred steps on a laptop core.
    "tiny": dict(
        image_size=64,
        patch_size=8,
        max_channels=8,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        drop_path_rate=0.0,
    ),
    "vit_s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=16),
    "vit_b16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16),
    "vit_l16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16),
    "vit_l8": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=8),
    # OpenPhenom (Phenom-Beta CA-MAE ViT-S/16) exactly as released: per-channel decoder for 6 channels,
    # no final encoder norm, decoder LayerNorm eps 1e-5 (as in OpenPhenom's public code). timm <= 1.0.24 added its
    # `mlp_bias` partly to q, k and v: `openphenom.py` converts that into ordinary mlp/qkv biases.
    "openphenom": dict(
        image_size=256,
        patch_size=16,
        max_channels=11,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4.0,
        block_type="parallel",
        qkv_bias=True,
        qk_norm=True,
        layer_scale_init=1e-4,
        drop_path_rate=0.1,
        layer_norm_eps=1e-6,
        final_layer_norm=False,
        decoder_type="per_channel",
        decoder_num_channels=6,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        decoder_cross_attention_heads=8,
        decoder_layer_norm_eps=1e-5,
        mask_ratio=0.75,
        fourier_loss_weight=0.01,
        fourier_loss_scope="patch",
        source_checkpoint="openphenom",
    ),
}

# Decoder sizes (the `"shared"` decoder), chosen with `decoder=` in `CellMAEConfig.from_preset` or
# `cellmae pretrain --decoder-preset`. `light` is the default (CellMAEConfig's own decoder sizes);
# `mae` is MAE's and the paper's 512 x 8, with 6x its FLOPs (docs/decoder.md measures both: FLOPs,
# step time, reconstruction loss, probe and recall).
DECODER_PRESETS: dict[str, dict] = {
    "mae": dict(decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16),
    "light": dict(decoder_hidden_size=256, decoder_num_hidden_layers=4, decoder_num_attention_heads=8),
}


class CellMAEConfig(PretrainedConfig):
    r"""Configuration of a channel-agnostic masked autoencoder for multi-channel microscopy.

    Every channel of a `(B, C, H, W)` image is cut into `patch_size` x `patch_size` patches by one
    shared patch embedding, giving `C * tokens_per_channel` tokens in channel-major order.

    Args:
        image_size (`int`, defaults to 256): side of the square crops the model is trained on. Other
            sizes divisible by `patch_size` work at inference (position codes are computed per grid).
        patch_size (`int`, defaults to 16): side of a square patch, in pixels.
        max_channels (`int`, defaults to 11): most channels one image may have; also the size of the
            channel-identity tables.
        channel_names (`list[str]`, *optional*): names of the stains the model was trained on, in the
            order of `channel_ids` (e.g. `["DNA", "ER", "RNA", "AGP", "Mito"]`).
        hidden_size, num_hidden_layers, num_attention_heads, mlp_ratio: encoder ViT size.
        block_type (`str`, defaults to `"parallel"`): `"parallel"` is the paper's timm-style parallel
            scaling block (attention and MLP from one fused input projection); `"prenorm"` the standard
            pre-norm ViT block.
        qkv_bias (`bool`), qk_norm (`bool`): bias on the query/key/value projections; LayerNorm on
            queries and keys per head.
        layer_scale_init (`float` or `None`, defaults to 1e-4): initial LayerScale value; `None` disables it.
        drop_path_rate (`float`): stochastic depth at the last block (linearly increasing from 0).
        layer_norm_eps (`float`): encoder LayerNorm epsilon.
        final_layer_norm (`bool`, defaults to `True`): LayerNorm after the last encoder block
            (OpenPhenom has none).
        parallel_mlp_bias_layout (`str`): layout of `mlp_bias` in saved weights. `"current"`: added to the
            MLP hidden units. `"legacy_timm"` is read from folders saved by older hf_cellmae (timm <= 1.0.24's
            layout, OpenPhenom's): it implies `qkv_bias`, and `from_pretrained` converts the weights into
            the current layout once.
        use_channel_embeddings (`bool`, defaults to `False`): add a learned channel-identity embedding
            (selected by `channel_ids`) to the encoder tokens.
        decoder_type (`str`, defaults to `"shared"`): `"shared"` runs one decoder over all tokens with a
            learned channel-identity embedding (any channel set); `"per_channel"` is OpenPhenom's decoder
            (shared cross-attention, then one block stack per channel, exactly `decoder_num_channels`).
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads, decoder_mlp_ratio,
            decoder_layer_norm_eps: decoder size; by default `DECODER_PRESETS["light"]`, 256 wide x 4 blocks
            (0.20x OpenPhenom's decoder FLOPs; as good as MAE's 512 x 8 in probe and recall on the demo
            plate, docs/decoder.md). `DECODER_PRESETS["mae"]` is MAE's and the paper's 512 x 8.
        decoder_num_channels (`int`, defaults to 6): channels of a `"per_channel"` decoder.
        decoder_cross_attention_heads (`int`, defaults to 8): heads of its shared cross-attention.
        mask_ratio (`float`, defaults to 0.75): fraction of the `C * tokens_per_channel` tokens masked.
        norm_pix_loss (`bool`, defaults to `False`): standardise each target patch before the loss.
        fourier_loss_weight (`float`, defaults to 0.01): `w` in `(1 - w) * mse + w * fourier`.
        fourier_loss_scope (`str`, defaults to `"patch"`): `"patch"` is OpenPhenom's (FFT of each
            16x16 patch, masked patches only); `"image"` takes the FFT of each whole channel, with the
            visible patches taken from the target.
        mask_fourier_loss (`bool`, defaults to `True`): average the patch-scope Fourier loss over masked
            patches only.
        initializer_range (`float`, defaults to 0.02): std of the normal init of tokens and embeddings.
        validate_inputs (`bool`, defaults to `False`): make `forward` also check input values (non-finite
            pixels, channel ids out of range). Off because reading values makes the host wait for the
            device every step; `CellMAEImageProcessor` and the shard writer check pixels where data enters.
        source_checkpoint (`str`, *optional*): where converted weights came from (e.g. `"openphenom"`).
        classifier_pooling (`str`, defaults to `"mean"`): read-out of `CellMAEForImageClassification`: `"mean"` of
            the patch tokens (the pooled embedding) or `"attention"` (a learned query attending to them). The
            classes are the usual `num_labels` / `id2label` / `label2id`.
        classifier_batch_norm (`str`, *optional*): `"plate"` standardises each pooled embedding by the mean and
            standard deviation, per feature, of the embeddings of the same plate in the batch (`plate_ids` in
            `forward`) before the classifier; `"plate_center"` only subtracts that mean; `None` (default) does
            neither. A weakly supervised model otherwise learns to recognise plates (batch effects) along with
            perturbations; see `plate_batch_norm`.
    """

    model_type = "cellmae"

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        max_channels: int = 11,
        channel_names: list[str] | None = None,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        mlp_ratio: float = 4.0,
        block_type: str = "parallel",
        qkv_bias: bool = False,
        qk_norm: bool = True,
        layer_scale_init: float | None = 1e-4,
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = 1e-6,
        final_layer_norm: bool = True,
        parallel_mlp_bias_layout: str = "current",
        use_channel_embeddings: bool = False,
        decoder_type: str = "shared",
        decoder_hidden_size: int = 256,
        decoder_num_hidden_layers: int = 4,
        decoder_num_attention_heads: int = 8,
        decoder_mlp_ratio: float = 4.0,
        decoder_layer_norm_eps: float = 1e-6,
        decoder_num_channels: int = 6,
        decoder_cross_attention_heads: int = 8,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        fourier_loss_weight: float = 0.01,
        fourier_loss_scope: str = "patch",
        mask_fourier_loss: bool = True,
        initializer_range: float = 0.02,
        validate_inputs: bool = False,
        source_checkpoint: str | None = None,
        classifier_pooling: str = "mean",
        classifier_batch_norm: str | None = None,
        **kwargs,
    ):
        if parallel_mlp_bias_layout == "legacy_timm":
            qkv_bias = True  # part of the legacy mlp_bias becomes a q/k/v bias when converted
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_channels = max_channels
        self.channel_names = list(channel_names) if channel_names is not None else None
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.block_type = block_type
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.layer_scale_init = layer_scale_init
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.final_layer_norm = final_layer_norm
        self.parallel_mlp_bias_layout = parallel_mlp_bias_layout
        self.use_channel_embeddings = use_channel_embeddings
        self.decoder_type = decoder_type
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_mlp_ratio = decoder_mlp_ratio
        self.decoder_layer_norm_eps = decoder_layer_norm_eps
        self.decoder_num_channels = decoder_num_channels
        self.decoder_cross_attention_heads = decoder_cross_attention_heads
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.fourier_loss_weight = fourier_loss_weight
        self.fourier_loss_scope = fourier_loss_scope
        self.mask_fourier_loss = mask_fourier_loss
        self.initializer_range = initializer_range
        self.validate_inputs = validate_inputs
        self.source_checkpoint = source_checkpoint
        self.classifier_pooling = classifier_pooling
        self.classifier_batch_norm = classifier_batch_norm
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        def choice(name: str, allowed: tuple[str | None, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}.")

        choice("block_type", BLOCK_TYPES)
        choice("decoder_type", DECODER_TYPES)
        choice("fourier_loss_scope", FOURIER_SCOPES)
        choice("parallel_mlp_bias_layout", MLP_BIAS_LAYOUTS)
        choice("classifier_pooling", CLASSIFIER_POOLINGS)
        choice("classifier_batch_norm", CLASSIFIER_BATCH_NORMS)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                f"use an image_size that is a multiple of {self.patch_size}."
            )
        for width, heads, prefix in (
            (self.hidden_size, self.num_attention_heads, ""),
            (self.decoder_hidden_size, self.decoder_num_attention_heads, "decoder_"),
        ):
            if width % heads:
                raise ValueError(
                    f"{prefix}hidden_size={width} is not divisible by {prefix}num_attention_heads={heads}."
                )
            if width % 4:
                raise ValueError(
                    f"{prefix}hidden_size={width} must be a multiple of 4 for the 2-D sin-cos position code."
                )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must be in [0, 1).")
        if not 0.0 <= self.fourier_loss_weight <= 1.0:
            raise ValueError(f"fourier_loss_weight={self.fourier_loss_weight} must be in [0, 1].")
        if self.channel_names is not None and len(self.channel_names) > self.max_channels:
            raise ValueError(
                f"{len(self.channel_names)} channel_names but max_channels={self.max_channels}; "
                "raise max_channels or name fewer channels."
            )

    @property
    def grid_size(self) -> int:
        """Patches along one side of an `image_size` crop."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_channel(self) -> int:
        """Tokens one channel of an `image_size` crop becomes."""
        return self.grid_size**2

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def decoder_intermediate_size(self) -> int:
        return int(self.decoder_hidden_size * self.decoder_mlp_ratio)

    @classmethod
    def from_preset(cls, name: str, decoder: str | None = None, **overrides) -> CellMAEConfig:
        """A configuration of a named size (`"tiny"`, `"vit_s16"`, `"vit_b16"`, `"vit_l16"`,
        `"vit_l8"`, `"openphenom"`), with the decoder of `DECODER_PRESETS[decoder]` (default: the
        preset's) and any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        if decoder is not None and decoder not in DECODER_PRESETS:
            raise ValueError(f"Unknown decoder preset {decoder!r}; choose one of {sorted(DECODER_PRESETS)}.")
        decoder_fields = DECODER_PRESETS[decoder] if decoder is not None else {}
        return cls(**{**PRESETS[name], **decoder_fields, **overrides})

    def channel_index(self, names: list[str]) -> list[int]:
        """The `channel_ids` of stains given by name, from `channel_names`."""
        if self.channel_names is None:
            raise ValueError("This config has no channel_names; pass channel_ids as integers instead.")
        missing = [n for n in names if n not in self.channel_names]
        if missing:
            raise ValueError(f"Unknown channel names {missing}; this model knows {self.channel_names}.")
        return [self.channel_names.index(n) for n in names]


__all__ = ["CellMAEConfig", "DECODER_PRESETS", "PRESETS"]
