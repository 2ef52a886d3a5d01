"""Optimisers (Lion, AdamW) with weight decay only on weight matrices, and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), the paper's optimiser.

    `update = sign(beta1 * m + (1 - beta1) * g)`; `p -= lr * (update + weight_decay * p)`;
    `m = beta2 * m + (1 - beta2) * g`. Use a learning rate 3-10x smaller than AdamW's.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion learning rate must be positive, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                exp_avg = state["exp_avg"]
                param.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(param.grad, alpha=1 - beta1).sign_()
                param.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(param.grad, alpha=1 - beta2)
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and convolution kernels only: never on norms, biases, LayerScale,
    class/mask/channel tokens or embeddings tables of identities (1-D tensors and named tokens)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_token = any(key in name for key in ("cls_token", "mask_token", "channel_tokens", "channel_embeddings"))
        (no_decay if param.ndim < 2 or is_token else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float]):
    groups = parameter_groups(model, weight_decay)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"optimizer={name!r} is not 'lion' or 'adamw'.")


def build_scheduler(optimizer, name: str, max_steps: int, warmup_ratio: float):
    """`one_cycle`: torch's OneCycleLR (linear-in-cosine warm-up for `warmup_ratio`, cosine anneal; the
    paper's schedule); `cosine`: transformers' cosine with linear warm-up; `constant`: warm-up then flat."""
    from transformers import get_scheduler

    warmup = int(math.ceil(warmup_ratio * max_steps))
    if name == "one_cycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lrs, total_steps=max_steps + 1, pct_start=max(warmup_ratio, 1e-6),
            anneal_strategy="cos", cycle_momentum=False,
        )
    if name == "cosine":
        return get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    if name == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    raise ValueError(f"lr_scheduler={name!r} is not one of one_cycle, cosine, constant.")
