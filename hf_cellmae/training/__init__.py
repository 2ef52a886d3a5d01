"""Pre-training: arguments, optimisers and schedules, the Accelerate loop, checkpoints, the demo."""

from ..lazy_exports import lazy_exports

# Public names and the module defining each: imported on first use, so `cellmae --help`
# (which imports every stage's commands module) stays fast.
_EXPORTS = {
    "PretrainingArguments": ".arguments",
    "parse_pretraining_arguments": ".arguments",
    "pretrain": ".loop",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["PretrainingArguments", "parse_pretraining_arguments", "pretrain"]
