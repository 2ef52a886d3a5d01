"""Load Recursion's OpenPhenom (Phenom-Beta CA-MAE ViT-S/16) weights into hf_cellmae.

OpenPhenom's `model.safetensors` is really a `torch.save` zip pickle of `{"state_dict": ...}`
(765 keys). `load_openphenom_state_dict` reads it safely (`weights_only=True`, never arbitrary
pickles) or a genuine safetensors file; `convert_openphenom_state_dict` is a pure `dict -> dict`
conversion into `CellMAEForPreTraining`'s layout (renamed keys; timm <= 1.0.24's `mlp_bias`, which
also biased q, k and v, split into ordinary `mlp_bias` and `qkv_bias`); `load_openphenom` returns a
ready model.

The weights are under Recursion's non-commercial licence and are not redistributed: bring your own copy.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .configuration_cellmae import CellMAEConfig
from .errors import ensure_writable_folder, untrusted_pickle_error
from .modeling_cellmae import CellMAEForPreTraining, legacy_timm_parallel_biases, sincos_position_embedding

# timm's ParallelScalingBlock changed where `mlp_bias` goes in 1.0.25; OpenPhenom was trained before that.
MLP_BIAS_LAYOUTS = ("legacy_timm", "current")

# OpenPhenom key (regex) -> hf_cellmae key (format string over the groups).
_RENAMES = [
    (r"encoder\.vit_backbone\.cls_token", "cellmae.embeddings.cls_token"),
    (r"encoder\.vit_backbone\.patch_embed\.proj\.(weight|bias)", "cellmae.embeddings.patch_embeddings.{0}"),
    (r"encoder\.vit_backbone\.blocks\.(\d+)\.in_norm\.(weight|bias)", "cellmae.encoder.layers.{0}.norm.{1}"),
    (r"encoder\.vit_backbone\.blocks\.(\d+)\.in_proj\.weight", "cellmae.encoder.layers.{0}.in_proj.weight"),
    (r"encoder\.vit_backbone\.blocks\.(\d+)\.(q_norm|k_norm)\.(weight|bias)", "cellmae.encoder.layers.{0}.{1}.{2}"),
    (r"encoder\.vit_backbone\.blocks\.(\d+)\.attn_out_proj\.(weight|bias)", "cellmae.encoder.layers.{0}.attn_out.{1}"),
    (r"encoder\.vit_backbone\.blocks\.(\d+)\.mlp_out_proj\.(weight|bias)", "cellmae.encoder.layers.{0}.mlp_out.{1}"),
    (r"encoder\.vit_backbone\.blocks\.(\d+)\.ls\.gamma", "cellmae.encoder.layers.{0}.layer_scale"),
    (r"encoder_decoder_proj\.(weight|bias)", "decoder.embed.{0}"),
    (r"decoder\.mask_token", "decoder.mask_token"),
    (r"decoder\.cross_attention\.q\.weight", "decoder.cross_q.weight"),
    (r"decoder\.cross_attention\.kv\.weight", "decoder.cross_kv.weight"),
    (r"decoder\.cross_attention\.proj\.(weight|bias)", "decoder.cross_proj.{0}"),
    (r"decoder\.(context_norm|query_norm|out_norm)\.(weight|bias)", "decoder.{0}.{1}"),
    (r"decoder\.mlp\.(fc1|fc2)\.(weight|bias)", "decoder.{0}.{1}"),
    (r"decoder\.decoders\.(\d+)\.(\d+)\.(norm1|norm2)\.(weight|bias)", "decoder.stacks.{0}.{1}.{2}.{3}"),
    (r"decoder\.decoders\.(\d+)\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", "decoder.stacks.{0}.{1}.{2}.{3}"),
    (r"decoder\.decoders\.(\d+)\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "decoder.stacks.{0}.{1}.{2}.{3}"),
    (r"decoder_pred\.(weight|bias)", "decoder.pred.{0}"),
]
_MODALITY_TOKEN = re.compile(r"decoder\.modality_tokens\.(\d+)")
_MLP_BIAS = re.compile(r"encoder\.vit_backbone\.blocks\.(\d+)\.mlp_bias")
# Fixed tables the model recomputes (checked against the recomputation), and weights `predict` never uses.
_FIXED_TABLES = {"encoder.vit_backbone.pos_embed", "decoder.pos_embeddings", "decoder.placeholder"}
_UNUSED = {"encoder.vit_backbone.fc_norm.weight", "encoder.vit_backbone.fc_norm.bias"}


def convert_openphenom_state_dict(
    state_dict: dict[str, torch.Tensor], mlp_bias_layout: str = "legacy_timm"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert an OpenPhenom `MAEModel` state dict into `CellMAEForPreTraining`'s layout.

    Each block's `mlp_bias` becomes `mlp_bias` and `qkv_bias`. With `mlp_bias_layout="legacy_timm"`
    (timm <= 1.0.24, what OpenPhenom was trained and published with) it was added to the LAST 1536 of
    the fused [MLP 1536 | q | k | v] outputs, so the first 1152 MLP units get 0 and q, k, v get its last
    1152 values; with `"current"` (timm >= 1.0.25) it is the MLP bias and q, k, v get none.

    Returns `(converted, dropped)`: `dropped` lists the keys not carried over (the fixed sin-cos tables
    and the zero placeholder, recomputed by hf_cellmae, and the encoder's unused `fc_norm`).
    Raises `KeyError` on a key it does not know, so no weight is ever lost silently.
    """
    if mlp_bias_layout not in MLP_BIAS_LAYOUTS:
        raise ValueError(f"mlp_bias_layout={mlp_bias_layout!r} is not one of {MLP_BIAS_LAYOUTS}.")
    converted: dict[str, torch.Tensor] = {}
    modality_tokens: dict[int, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in _FIXED_TABLES or key in _UNUSED:
            dropped.append(key)
            continue
        match = _MODALITY_TOKEN.fullmatch(key)
        if match:
            modality_tokens[int(match.group(1))] = tensor.reshape(-1)  # (1, 1, E) -> (E,)
            continue
        match = _MLP_BIAS.fullmatch(key)
        if match:
            block = match.group(1)
            prefix = f"cellmae.encoder.layers.{block}."
            fused_size = state_dict[f"encoder.vit_backbone.blocks.{block}.in_proj.weight"].shape[0]
            qkv_size = fused_size - tensor.numel()  # in_proj rows: [MLP | q | k | v]
            if mlp_bias_layout == "legacy_timm":
                mlp_bias, qkv_bias = legacy_timm_parallel_biases(tensor, qkv_size)
            else:
                mlp_bias, qkv_bias = tensor, tensor.new_zeros(qkv_size)
            converted[prefix + "mlp_bias"], converted[prefix + "qkv_bias"] = mlp_bias, qkv_bias
            continue
        for pattern, target in _RENAMES:
            match = re.fullmatch(pattern, key)
            if match:
                converted[target.format(*match.groups())] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(
            f"{len(unknown)} keys are not OpenPhenom MAEModel keys, e.g. {unknown[:5]}; is this an OpenPhenom checkpoint?"
        )
    if modality_tokens:
        converted["decoder.channel_tokens"] = torch.stack([modality_tokens[i] for i in sorted(modality_tokens)])
    return converted, dropped


def load_openphenom_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read OpenPhenom weights from a file or folder: the zip pickle published as `model.safetensors`
    (read with `torch.load(weights_only=True)`), a genuine safetensors file, or a `.pt`/`.ckpt`.

    A pickle asking for more than tensors is refused with `UntrustedFileError` (a `UserError`), never loaded."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "model.pt")]
        path = next((c for c in candidates if c.exists()), candidates[0])
    if not path.exists():
        raise FileNotFoundError(
            f"No OpenPhenom weights at {path}; download model.safetensors from the OpenPhenom repo."
        )
    with open(path, "rb") as handle:
        is_torch_zip = handle.read(4) == b"PK\x03\x04"  # torch.save's zip container, whatever the name
        handle.seek(0)
        # A file object, not the path: recent torch.load hands any "*.safetensors" path to safetensors.
        try:
            loaded = torch.load(handle, map_location="cpu", weights_only=True) if is_torch_zip else None
        except pickle.UnpicklingError as error:
            raise untrusted_pickle_error(
                path,
                error,
                "OpenPhenom's weights hold only tensors: download model.safetensors again from recursionpharma/OpenPhenom",
            ) from error
    if not is_torch_zip:
        from safetensors.torch import load_file

        loaded = load_file(str(path))
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(loaded).__name__}).")
    return state_dict


def check_fixed_tables(state_dict: dict[str, torch.Tensor], config: CellMAEConfig) -> None:
    """Check that the stored sin-cos tables are the ones hf_cellmae recomputes (same position code)."""
    for key, width in (
        ("encoder.vit_backbone.pos_embed", config.hidden_size),
        ("decoder.pos_embeddings", config.decoder_hidden_size),
    ):
        if key not in state_dict:
            continue
        stored = state_dict[key].reshape(-1, width)[1 : 1 + config.tokens_per_channel]  # first channel's grid
        expected = sincos_position_embedding(config.grid_size, config.grid_size, width)
        if not torch.allclose(stored.float(), expected, atol=1e-5):
            raise ValueError(
                f"{key} is not the standard 2-D sin-cos table; this checkpoint is not OpenPhenom-compatible."
            )


def load_openphenom(
    path: str | Path, mlp_bias_layout: str = "legacy_timm", **config_overrides
) -> CellMAEForPreTraining:
    """An hf_cellmae `CellMAEForPreTraining` with OpenPhenom's weights (config preset `"openphenom"`).

    `model.cellmae` is the encoder; `model.cellmae(pixels).pooler_output` equals OpenPhenom's `predict`.
    `mlp_bias_layout`: see `convert_openphenom_state_dict` (keep the default for OpenPhenom's weights).
    """
    state_dict = load_openphenom_state_dict(path)
    config = CellMAEConfig.from_preset("openphenom", **config_overrides)
    check_fixed_tables(state_dict, config)
    converted, _ = convert_openphenom_state_dict(state_dict, mlp_bias_layout)
    model = CellMAEForPreTraining(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_openphenom_folder(src: str | Path, dst: str | Path) -> Path:
    """Convert OpenPhenom weights at `src` into a loadable hf_cellmae folder at `dst` (weights in
    safetensors, config, image processor for 256 px crops, model code for `trust_remote_code`)."""
    from .image_processing_cellmae import CellMAEImageProcessor

    dst = ensure_writable_folder(dst, "the converted model")
    model = load_openphenom(src)
    model.save_pretrained(dst)
    CellMAEImageProcessor(image_size=model.config.image_size, crop_mode="tile").save_pretrained(dst)
    return dst


__all__ = [
    "convert_openphenom_folder",
    "convert_openphenom_state_dict",
    "load_openphenom",
    "load_openphenom_state_dict",
]
