"""Pre-training: arguments, optimisers and schedules, the Accelerate loop, checkpoints, the demo."""

import importlib

# Public names and the module defining each: imported on first use, so `cellmae --help`
# (which imports every stage's commands module) stays fast.
_EXPORTS = {
    "PretrainingArguments": ".arguments",
    "parse_pretraining_arguments": ".arguments",
    "pretrain": ".loop",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PretrainingArguments", "parse_pretraining_arguments", "pretrain"]
