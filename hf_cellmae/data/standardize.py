"""Per-image, per-channel standardisation: the model's input contract, without importing the model.

``x = pixels * rescale`` (uint8: 1/255, uint16: 1/65535, other integers: 1/dtype max, floats: 1.0), then
``x = (x - mean_HW) / sqrt(var_HW + eps)`` with the biased variance over the H*W pixels of each channel
(a constant channel becomes 0). It must equal
``hf_cellmae.image_processing_cellmae.standardize_channels`` (a test checks it).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def rescale_factor_for_dtype(dtype) -> float:
    """1 / (largest value of an integer dtype); 1.0 for floats (assumed to be in [0, 1] already)."""
    if not isinstance(dtype, np.dtype) and str(dtype).startswith("torch."):  # torch.uint16 -> numpy uint16
        dtype = str(dtype)[len("torch.") :]
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return 1.0 / float(np.iinfo(dtype).max)
    return 1.0


def standardize_channels(pixels, rescale_factor: float | None = None, eps: float = EPS):
    """Standardise every channel of every image: ``(..., C, H, W)`` -> float32 of the same shape.

    Args:
        pixels: numpy array or torch tensor, any leading batch dims, integer or float dtype.
        rescale_factor: multiplies the pixels first; default from the dtype (``rescale_factor_for_dtype``).
        eps: added to the variance (1e-5, as InstanceNorm2d); it is why the rescale matters.
    """
    if rescale_factor is None:
        rescale_factor = rescale_factor_for_dtype(pixels.dtype)
    if isinstance(pixels, np.ndarray) and pixels.ndim == 3:
        return standardize_field_inplace(to_float32_contiguous(pixels), rescale_factor, eps)
    if not isinstance(pixels, np.ndarray):  # torch tensor
        x = pixels.float() * rescale_factor
        mean = x.mean(dim=(-2, -1), keepdim=True)
        var = x.var(dim=(-2, -1), keepdim=True, unbiased=False)
        return (x - mean) / (var + eps).sqrt()
    x = pixels.astype(np.float32) * np.float32(rescale_factor)
    mean = x.mean(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(np.float32)
    x -= mean
    var = np.einsum("...hw,...hw->...", x, x, dtype=np.float64)[..., None, None] / (x.shape[-1] * x.shape[-2])
    x *= (1.0 / np.sqrt(var + eps)).astype(np.float32)
    return x


def contiguous_copy(pixels: np.ndarray, dtype=None, block: int = 32) -> np.ndarray:
    """``(C, H, W)`` view (possibly transposed / flipped by an augmentation) -> C-contiguous copy, as
    ``dtype`` (default: the input's).

    A transposed view is copied in ``block x block`` tiles, which keeps both sides in cache (about
    twice as fast as ``np.ascontiguousarray`` on a 256 x 256 crop).
    """
    out = np.empty(pixels.shape, dtype=pixels.dtype if dtype is None else dtype)
    if abs(pixels.strides[-1]) <= abs(pixels.strides[-2]):  # rows are contiguous-ish: one pass
        out[...] = pixels
        return out
    height, width = pixels.shape[-2:]
    for top in range(0, height, block):
        for left in range(0, width, block):
            out[:, top : top + block, left : left + block] = pixels[:, top : top + block, left : left + block]
    return out


def to_float32_contiguous(pixels: np.ndarray, block: int = 32) -> np.ndarray:
    """``contiguous_copy`` as float32 (the input of ``standardize_field_inplace``)."""
    return contiguous_copy(pixels, np.float32, block)


def standardize_field_inplace(x: np.ndarray, rescale_factor: float, eps: float = EPS) -> np.ndarray:
    """Standardise a float32 ``(C, H, W)`` array in place (pixels not yet rescaled) and return it.

    Uses ``(p*r - mean(p*r)) / sqrt(var(p*r) + eps) == (p - mean(p)) * r / sqrt(r^2 var(p) + eps)``.
    """
    pixels_per_channel = x.shape[-1] * x.shape[-2]
    flat = x.reshape(x.shape[0], pixels_per_channel)  # (C, H*W) view
    mean = flat.mean(axis=1)  # (C,) float32 pairwise summation
    flat -= mean[:, None]
    var = np.array([np.dot(row, row) for row in flat], dtype=np.float64) / pixels_per_channel  # (C,) BLAS dot
    flat *= (rescale_factor / np.sqrt(var * rescale_factor**2 + eps)).astype(np.float32)[:, None]
    return x
