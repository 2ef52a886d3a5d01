"""Optimisers (Lion, AdamW) with weight decay only on weight matrices, and learning-rate schedules."""

from __future__ import annotations

import math
import re

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
            grads = [
                torch.where(keep > 0, g, 0) for g in grads
            ]  # a skipped step's NaN gradients must not reach the momentum
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


def encoder_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the input embedding (a CA-MAE's patch embedding and
    class/channel tokens, a MU-Net's stem), `i + 1` for encoder block `i` (a MU-Net level, with the downsampling
    that leads into it), `num_layers + 1` for everything after the encoder (final norm, pooling, classifier)."""
    if name.startswith("cellmae.embeddings.") or name.startswith("munet.encoder.stem."):
        return 0
    block = re.match(r"(?:cellmae\.encoder\.layers|munet\.encoder\.stages)\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    downsample = re.match(r"munet\.encoder\.downsample\.(\d+)\.", name)  # downsample i leads into level i + 1
    if downsample:
        return int(downsample.group(1)) + 2
    return num_layers + 1


def encoder_num_layers(model: nn.Module) -> int:
    """Blocks of a CA-MAE encoder (`num_hidden_layers`) or levels of a MU-Net (`len(stage_channels)`)."""
    config = model.config
    return len(config.stage_channels) if hasattr(config, "stage_channels") else config.num_hidden_layers


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups for layer-wise learning-rate decay (BEiT, MAE fine-tuning): a parameter at depth `d`
    (`encoder_depth`) of an encoder of `D` blocks trains at `lr * layer_decay ** (D + 1 - d)`, so the head and
    final norm get `lr`, the last block `lr * layer_decay`, the patch embedding `lr * layer_decay ** (D + 1)`:
    the early, generic features move least. Each group also says its `depth` and `lr_scale`; weight decay is
    split as in `parameter_groups`."""
    num_layers = encoder_num_layers(model)
    names = {id(param): name for name, param in model.named_parameters()}
    groups: dict[tuple[int, float], dict] = {}
    for group in parameter_groups(model, weight_decay):
        for param in group["params"]:
            depth = encoder_depth(names[id(param)], num_layers)
            scale = layer_decay ** (num_layers + 1 - depth)
            key = (depth, group["weight_decay"])
            groups.setdefault(
                key,
                {
                    "params": [],
                    "weight_decay": group["weight_decay"],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "depth": depth,
                },
            )
            groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def adamw_kernel(device_type: str) -> dict:
    """`{"fused": True}` where torch has a fused AdamW kernel for `device_type` (CUDA, CPU, ...), else `{"foreach": True}`."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return {"fused": True} if device_type in _get_fused_kernels_supported_devices() else {"foreach": True}


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str = "cpu",
    layer_decay: float | None = None,
):
    """Lion (foreach kernels) or AdamW (fused where torch has the kernel, foreach elsewhere) for parameters on `device_type`;
    with `layer_decay`, one group per encoder depth (`layer_decay_groups`)."""
    groups = (
        parameter_groups(model, weight_decay)
        if layer_decay is None
        else layer_decay_groups(model, lr, weight_decay, layer_decay)
    )
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
            optimizer,
            max_lr=max_lrs,
            total_steps=max_steps + 1,
            pct_start=max(warmup_ratio, 1e-6),
            anneal_strategy="cos",
            cycle_momentum=False,
        )
    if name == "cosine":
        return get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    if name == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    raise ValueError(f"lr_scheduler={name!r} is not one of one_cycle, cosine, constant.")
