"""Optimisers (Lion, AdamW) with weight decay only on weight matrices, and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds of an FSDP2 `DTensor` (elementwise updates need no communication), else `tensor`."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), the paper's optimiser.

    `update = sign(beta1 * m + (1 - beta1) * g)`; `p -= lr * (update + weight_decay * p)`;
    `m = beta2 * m + (1 - beta2) * g`. Use a learning rate 3-10x smaller than AdamW's.

    One `torch._foreach_*` kernel per operation over all parameters of a group (on FSDP2 shards, their
    local part). Like torch's fused Adam, it reads an optional `found_inf` attribute, a 0-dim float
    tensor on the parameters' device: when it holds 1 the step leaves parameters and momentum exactly
    as they were, decided on the device without the host reading the flag.
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
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if not with_grad:
                continue
            for param in with_grad:
                if not self.state[param]:
                    self.state[param]["exp_avg"] = torch.zeros_like(param)
            params = [_local(p) for p in with_grad]
            grads = [_local(p.grad) for p in with_grad]
            momenta = [_local(self.state[p]["exp_avg"]) for p in with_grad]
            beta1, beta2 = group["betas"]
            lr, decay = group["lr"], group["lr"] * group["weight_decay"]
            if found_inf is None:
                torch._foreach_mul_(params, 1 - decay)
                updates = torch._foreach_mul(momenta, beta1)
                torch._foreach_add_(updates, grads, alpha=1 - beta1)
                torch._foreach_sign_(updates)
                torch._foreach_add_(params, updates, alpha=-lr)
                torch._foreach_mul_(momenta, beta2)
                torch._foreach_add_(momenta, grads, alpha=1 - beta2)
                continue
            keep = 1 - found_inf.to(params[0].device, torch.float32)  # 0-dim: 1 steps, 0 leaves everything as it was
            grads = [torch.where(keep > 0, g, 0) for g in grads]  # a skipped step's NaN gradients must not reach the momentum
            torch._foreach_mul_(params, 1 - decay * keep)
            updates = torch._foreach_mul(momenta, beta1)
            torch._foreach_add_(updates, grads, alpha=1 - beta1)
            torch._foreach_sign_(updates)
            torch._foreach_mul_(updates, lr * keep)
            torch._foreach_sub_(params, updates)
            steps = torch._foreach_sub(grads, momenta)  # m += (1 - beta2) * (g - m)
            torch._foreach_mul_(steps, (1 - beta2) * keep)
            torch._foreach_add_(momenta, steps)
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


def adamw_kernel(device_type: str) -> dict:
    """`{"fused": True}` where torch has a fused AdamW kernel for `device_type` (CUDA, CPU, ...), else `{"foreach": True}`."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return {"fused": True} if device_type in _get_fused_kernels_supported_devices() else {"foreach": True}


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float], device_type: str = "cpu"):
    """Lion (foreach kernels) or AdamW (fused where torch has the kernel, foreach elsewhere) for parameters on `device_type`."""
    groups = parameter_groups(model, weight_decay)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **adamw_kernel(device_type))
    raise ValueError(f"optimizer={name!r} is not 'lion' or 'adamw'.")


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` honours a `found_inf` flag on the device (our Lion, torch's fused Adam/AdamW)."""
    return isinstance(optimizer, Lion) or bool(optimizer.defaults.get("fused"))


def skip_step_if(optimizer, found_inf: torch.Tensor) -> None:
    """Make the next `optimizer.step()` a no-op where the 0-dim `found_inf` holds 1 (read on the device, no host wait)."""
    optimizer.found_inf = found_inf.float()


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
