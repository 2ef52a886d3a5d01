"""Pre-training: arguments, optimisers and schedules, the Accelerate loop, checkpoints, the demo."""

from .arguments import PretrainingArguments, parse_pretraining_arguments
from .loop import pretrain

__all__ = ["PretrainingArguments", "parse_pretraining_arguments", "pretrain"]
