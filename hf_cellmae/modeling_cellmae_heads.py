"""Heads on the CA-MAE encoder, in the style of transformers' ViTForImageClassification: the image classifier
(fine-tuning with `--objective classify`, the weakly supervised baseline with `wsl`), its attention-pooled
read-out and plate-wise batch normalisation (MU-Net's classifier uses them too).

A model file like modeling_cellmae.py: it imports only torch, transformers and the model files beside it (relative
imports), so `save_pretrained` copies it next to the weights and `trust_remote_code=True` loads it without
hf_cellmae. Every CA-MAE folder's `auto_map` names `CellMAEForImageClassification` here, so any pre-training
folder can be fine-tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_cellmae import CellMAEConfig
from .modeling_cellmae import CellMAEModel, CellMAEPreTrainedModel


class CellMAEAttentionPool(nn.Module):
    """A learned query attends to the tokens: `(B, L, D)` -> `(B, D)` (attention-pooled read-out)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention pooling width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        head_dim = dim // self.num_heads
        key, value = self.key_value(self.norm(tokens)).chunk(2, dim=-1)  # (B, L, D) each
        query = self.query.to(tokens.dtype).expand(batch, -1, -1)  # (B, 1, D)
        q = query.reshape(batch, 1, self.num_heads, head_dim).transpose(1, 2)  # (B, H, 1, hd)
        k = key.reshape(batch, length, self.num_heads, head_dim).transpose(1, 2)  # (B, H, L, hd)
        v = value.reshape(batch, length, self.num_heads, head_dim).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, hd)
        return self.proj(pooled.transpose(1, 2).reshape(batch, dim))


def plate_batch_norm(embeddings: torch.Tensor, plate_ids: torch.Tensor | None, scale: bool = True, eps: float = 1e-5):
    """Plate-wise batch normalisation: each embedding minus the mean (and, with `scale`, over the standard
    deviation), per feature, of the embeddings of the same plate in this batch.

    Why: a model trained to classify perturbations (weak supervision) can lower its loss by recognising the
    plate a crop comes from, since plates differ in staining and illumination (batch effects) and not every
    label is on every plate. Statistics taken per plate remove whatever all samples of a plate share, so the
    classifier sees only how a sample differs from its plate-mates; this is the idea behind the per-plate /
    per-experiment batch statistics of weakly supervised cell-image models (e.g. the RxRx1 baselines). Because
    the statistics come from the batch, train and embed with several samples of each plate per batch; a plate
    with a single sample in the batch gets a zero embedding.

    Args:
        embeddings: `(B, D)` pooled embeddings.
        plate_ids: `(B,)` integer plate of each sample; `None` treats the whole batch as one plate.
        scale: also divide by the plate's standard deviation (`"plate"`); `False` only centres (`"plate_center"`).
    Returns:
        `(B, D)`, computed with a `(B, B)` same-plate matrix (no host synchronisation, unlike `torch.unique`).
    """
    if plate_ids is None:
        plate_ids = torch.zeros(embeddings.shape[0], dtype=torch.long, device=embeddings.device)
    same = (plate_ids[:, None] == plate_ids[None, :]).to(embeddings.dtype)  # (B, B) 1 where same plate
    share = same / same.sum(dim=1, keepdim=True)  # (B, B) rows average over one's plate-mates
    centred = embeddings - share @ embeddings  # (B, D)
    if not scale:
        return centred
    variance = share @ centred.square()  # (B, D): a plate's mates share its mean, so this is the plate's variance
    return centred * torch.rsqrt(variance + eps)


def classifier_input(pooled: torch.Tensor, config, plate_ids: torch.Tensor | None) -> torch.Tensor:
    """The pooled embedding as the classifier sees it: plate-wise normalised where `config.classifier_batch_norm` says."""
    mode = getattr(config, "classifier_batch_norm", None)
    if mode is None:
        return pooled
    return plate_batch_norm(pooled, plate_ids, scale=mode == "plate")


class CellMAEForImageClassification(CellMAEPreTrainedModel):
    """CA-MAE encoder + a linear classifier on the pooled patch tokens, for fine-tuning on labelled images.

    `config.num_labels`, `config.id2label` and `config.label2id` describe the classes; `labels` give the
    cross-entropy loss (or MSE / multi-label BCE following `config.problem_type`, as in transformers).
    `config.classifier_pooling` chooses the read-out: `"mean"` of the patch tokens (the pooled embedding,
    default) or `"attention"` (a learned query attending to them). Loading a pre-training folder keeps the
    encoder, drops the decoder, and initialises only the head:

        >>> model = CellMAEForImageClassification.from_pretrained(
        ...     "path/to/pretrained", num_labels=3, id2label={0: "control", 1: "geneA", 2: "geneB"})
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: CellMAEConfig):
        super().__init__(config)
        num_labels = config.num_labels
        assert num_labels is not None  # PretrainedConfig.__init__ always sets id2label
        self.num_labels = num_labels
        self.cellmae = CellMAEModel(config)
        self.pool = (
            CellMAEAttentionPool(config.hidden_size, config.num_attention_heads, config.layer_norm_eps)
            if config.classifier_pooling == "attention"
            else None
        )
        self.classifier = nn.Linear(config.hidden_size, num_labels) if num_labels > 0 else nn.Identity()
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CellMAEAttentionPool):
            init.normal_(module.query, std=self.config.initializer_range)

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
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): standardised pixels.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): class indices in `[0, num_labels)`.
            channel_ids (`(C,)` or `(B, C)` ints, *optional*): stain of each channel (default `0..C-1`).
            plate_ids (`torch.LongTensor` of shape `(B,)`, *optional*): plate of each sample, for
                `config.classifier_batch_norm` (without them the batch counts as one plate).
        """
        out = self.cellmae(pixel_values, channel_ids=channel_ids, output_hidden_states=output_hidden_states)
        pooled = out.pooler_output if self.pool is None else self.pool(out.last_hidden_state[:, 1:])  # (B, D)
        logits = self.classifier(classifier_input(pooled, self.config, plate_ids))  # (B, num_labels)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return output if return_dict is not False else output.to_tuple()


__all__ = ["CellMAEAttentionPool", "CellMAEForImageClassification", "classifier_input", "plate_batch_norm"]
