"""Image processor for multi-channel microscopy: crop or tile, then standardise every channel.

No RGB conversion and no clipping: 8-bit, 16-bit and float images with any number of channels pass
through unchanged in content. This file imports only numpy, torch and transformers, so it can be
copied into a Hub repository and loaded with `trust_remote_code=True`.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

CROP_MODES = ("center", "tile", "none")


def default_rescale_factor(dtype) -> float:
    """Factor that maps a dtype's full range to [0, 1]: 1/255 for uint8, 1/65535 for uint16, 1/max for
    other integers; 1.0 for floats (taken to be in [0, 1] already)."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return 1.0
        return 1.0 / torch.iinfo(dtype).max
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return 1.0
    if np.issubdtype(dtype, np.integer):
        return 1.0 / np.iinfo(dtype).max
    raise TypeError(f"Unsupported pixel dtype {dtype}; pass integer or float images.")


def standardize_channels(images, rescale_factor: float | None = None, eps: float = 1e-5):
    """Per image and per channel standardisation (OpenPhenom's input normalisation).

    `x = pixels * rescale_factor`, then `(x - mean) / sqrt(var + eps)` with the biased variance over the
    last two (H, W) axes. For uint8 input this is exactly OpenPhenom's `x / 255` + `InstanceNorm2d`.

    Args:
        images: numpy array or torch tensor `(..., C, H, W)` of any integer or float dtype.
        rescale_factor: defaults to `default_rescale_factor(images.dtype)`.
        eps: added to the variance; a constant channel becomes all zeros.

    Returns:
        float32 array/tensor of the same shape and kind as `images`.
    """
    scale = default_rescale_factor(images.dtype) if rescale_factor is None else rescale_factor
    if isinstance(images, torch.Tensor):
        x = images.to(torch.float32) * scale
        mean = x.mean(dim=(-2, -1), keepdim=True)
        var = x.var(dim=(-2, -1), keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + eps)
    x = np.asarray(images).astype(np.float32) * np.float32(scale)
    mean = x.mean(axis=(-2, -1), keepdims=True)
    var = x.var(axis=(-2, -1), keepdims=True)
    return ((x - mean) / np.sqrt(var + np.float32(eps))).astype(np.float32, copy=False)


def check_finite(image, index: int) -> None:
    """Raise a clear error if a `(C, H, W)` float image holds NaN or inf (they would spread through the
    channel's standardisation and the whole embedding). The model does not look for them by default:
    here, where data enters on the host, the check costs no wait on the device."""
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            return
        finite = torch.isfinite(image).cpu().numpy()
    else:
        if not np.issubdtype(np.asarray(image).dtype, np.floating):
            return
        finite = np.isfinite(image)
    if not finite.all():
        channels = np.flatnonzero(~finite.all(axis=(-2, -1))).tolist()
        raise ValueError(
            f"image {index} has {int((~finite).sum())} non-finite pixel(s) (NaN or inf) in channel(s) {channels}; "
            "fix or drop that image."
        )


def crop_boxes(height: int, width: int, size: int, mode: str) -> list[tuple[int, int]]:
    """Top-left corners of the `size` x `size` crops taken from a `height` x `width` field.

    `"center"`: one centred crop. `"tile"`: the largest grid of non-overlapping crops, centred (as
    RxRx3-core's four 256px crops of a 512px image). `"none"`: the whole field.
    """
    if mode == "none":
        return [(0, 0)]
    if height < size or width < size:
        raise ValueError(
            f"image of {height}x{width} pixels is smaller than image_size={size}; use a smaller image_size, "
            "crop_mode='none', or pad the image."
        )
    if mode == "center":
        return [((height - size) // 2, (width - size) // 2)]
    rows, cols = height // size, width // size
    top, left = (height - rows * size) // 2, (width - cols * size) // 2
    return [(top + r * size, left + c * size) for r in range(rows) for c in range(cols)]


class CellMAEImageProcessor(BaseImageProcessor):
    r"""Prepares multi-channel microscopy images for `CellMAEModel`.

    Steps: (1) take a centred crop, a grid of non-overlapping crops (`"tile"`), or the whole field
    (`"none"`) of side `image_size`; (2) standardise each crop's channels (`standardize_channels`).

    Args:
        image_size (`int`, defaults to 256): side of the crops.
        crop_mode (`str`, defaults to `"center"`): `"center"`, `"tile"` or `"none"`.
        rescale_factor (`float`, *optional*): pixel scale before standardising; by default from the dtype
            (uint8 1/255, uint16 1/65535, floats 1.0). Use 1/255 for floats on a 0..255 scale.
        epsilon (`float`, defaults to 1e-5): added to each channel's variance.
        channel_names (`list[str]`, *optional*): stains of the channels, in order (documentation only).

    Call it with one image `(C, H, W)`, a batch `(B, C, H, W)` or a list of `(C, H, W)` images
    (numpy or torch, channels first; a 2-D image is one channel). Returns a `BatchFeature` with
    `pixel_values` `(N, C, image_size, image_size)` float32 and `image_index` `(N,)`: which input
    image each crop came from (average the crop embeddings per image with it).

    Example:
        >>> processor = CellMAEImageProcessor(image_size=256, crop_mode="tile")
        >>> inputs = processor(field_uint16_6x512x512, return_tensors="pt")  # 4 crops
        >>> inputs["pixel_values"].shape
        torch.Size([4, 6, 256, 256])
    """

    model_input_names = ["pixel_values"]
    rescale_factor = None

    def __init__(
        self,
        image_size: int = 256,
        crop_mode: str = "center",
        rescale_factor: float | None = None,
        epsilon: float = 1e-5,
        channel_names: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode={crop_mode!r} is not one of {CROP_MODES}.")
        self.image_size = image_size
        self.crop_mode = crop_mode
        self.rescale_factor = rescale_factor
        self.epsilon = epsilon
        self.channel_names = list(channel_names) if channel_names is not None else None

    @staticmethod
    def _as_image_list(images) -> list:
        """Split the input into a list of channels-first `(C, H, W)` arrays/tensors."""
        if isinstance(images, (list, tuple)):
            items = list(images)
        elif isinstance(images, (np.ndarray, torch.Tensor)):
            if images.ndim == 4:
                items = list(images)
            elif images.ndim in (2, 3):
                items = [images]
            else:
                raise ValueError(
                    f"images have {images.ndim} dimensions (shape {tuple(images.shape)}); pass (H, W), (C, H, W) "
                    "or (B, C, H, W), channels first."
                )
        else:
            raise TypeError(
                f"images must be numpy arrays or torch tensors (channels first), got {type(images).__name__}. "
                "PIL images hold at most 4 channels and clip 16-bit data: read microscopy files with tifffile."
            )
        prepared = []
        for index, image in enumerate(items):
            if not isinstance(image, (np.ndarray, torch.Tensor)):
                image = np.asarray(image)
            if image.ndim == 2:
                image = image[None]
            if image.ndim != 3:
                raise ValueError(f"image {index} has shape {tuple(image.shape)}; expected (C, H, W) or (H, W).")
            prepared.append(image)
        return prepared

    def preprocess(
        self,
        images,
        image_size: int | None = None,
        crop_mode: str | None = None,
        rescale_factor: float | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Crop/tile and standardise `images`; see the class docstring."""
        size = image_size or self.image_size
        mode = crop_mode or self.crop_mode
        if mode not in CROP_MODES:
            raise ValueError(f"crop_mode={mode!r} is not one of {CROP_MODES}.")
        factor = rescale_factor if rescale_factor is not None else self.rescale_factor
        crops, image_index = [], []
        image_list = self._as_image_list(images)
        channels = image_list[0].shape[0] if image_list else 0
        for index, image in enumerate(image_list):
            if image.shape[0] != channels:
                raise ValueError(
                    f"image {index} has {image.shape[0]} channels but image 0 has {channels}; "
                    "process images with different channel sets in separate calls."
                )
            height, width = image.shape[-2:]
            crop_size = None if mode == "none" else size
            for top, left in crop_boxes(height, width, size, mode):
                crop = image if crop_size is None else image[:, top : top + crop_size, left : left + crop_size]
                check_finite(crop, index)
                standardized = standardize_channels(crop, factor, self.epsilon)
                if isinstance(standardized, np.ndarray):
                    standardized = torch.from_numpy(np.ascontiguousarray(standardized))
                crops.append(standardized)
                image_index.append(index)
        if not crops:
            raise ValueError("No images were given to the processor.")
        shapes = {tuple(c.shape) for c in crops}
        if len(shapes) > 1:
            raise ValueError(
                f"crops have different shapes {sorted(shapes)}; use crop_mode='center' or 'tile' to batch "
                "images of different sizes."
            )
        data = {"pixel_values": torch.stack(crops), "image_index": torch.tensor(image_index, dtype=torch.long)}
        batch = BatchFeature(data=data)
        if return_tensors == "np":
            batch = BatchFeature(data={k: v.numpy() for k, v in data.items()})
        return batch

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = ["CellMAEImageProcessor", "crop_boxes", "default_rescale_factor", "standardize_channels"]
