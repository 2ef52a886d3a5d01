"""`cell-feature-extraction`: a transformers pipeline from a multi-channel image array to its embedding.

The built-in `image-feature-extraction` pipeline converts images to RGB (a 6-channel array raises, a
16-bit image is clipped to 255); this one keeps every channel and the full bit depth.
"""

from __future__ import annotations

import numpy as np
from transformers import Pipeline


class CellFeatureExtractionPipeline(Pipeline):
    """Embed multi-channel microscopy images.

    Each input is a channels-first array `(C, H, W)` (numpy or torch, any integer or float dtype). The
    image processor crops (or tiles) and standardises it; the crop embeddings of one image are averaged.

    Args (per call):
        channelwise (`bool`, defaults to `False`): return `(C, D)` per-channel embeddings instead of `(D,)`.
        crop_mode (`str`, *optional*): override the processor's `"center"` / `"tile"` / `"none"`.

    Example:
        >>> import hf_cellmae
        >>> from transformers import pipeline
        >>> embed = pipeline("cell-feature-extraction", model="path/to/model")
        >>> embed(image_uint16_5x520x696).shape
        (384,)
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def _sanitize_parameters(self, channelwise=None, crop_mode=None, channel_ids=None, **kwargs):
        preprocess = {"crop_mode": crop_mode} if crop_mode is not None else {}
        forward = {"channelwise": bool(channelwise), "channel_ids": channel_ids}
        return preprocess, forward, {}

    def preprocess(self, image, crop_mode=None):
        kwargs = {"crop_mode": crop_mode} if crop_mode is not None else {}
        inputs = self.image_processor(image, return_tensors="pt", **kwargs)
        return {"pixel_values": inputs["pixel_values"].to(self.dtype)}

    def _forward(self, model_inputs, channelwise=False, channel_ids=None):
        outputs = self.model(
            model_inputs["pixel_values"], channel_ids=channel_ids, output_channelwise_embeddings=channelwise
        )
        features = outputs.channelwise_embeddings if channelwise else outputs.pooler_output  # (crops, [C,] D)
        return {"features": features.mean(0)}  # average over the crops of this image

    def postprocess(self, model_outputs):
        return model_outputs["features"].float().cpu().numpy().astype(np.float32)


__all__ = ["CellFeatureExtractionPipeline"]
