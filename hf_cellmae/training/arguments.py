"""Every knob of a pre-training run, in one dataclass saved beside each checkpoint.

Load from YAML/JSON and override on the command line:

    cellmae pretrain --config examples/configs/demo_cpu.yaml --max-steps 500 --learning-rate 3e-4

(``--max_steps`` is accepted too: every option has a dashed and an underscored spelling.)
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OPTIMIZERS = ("adamw", "lion")
SCHEDULERS = ("one_cycle", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
MODEL_TYPES = ("cellmae", "munet")
OBJECTIVES = ("mae", "wsl", "classify")
CLASSIFIER_BATCH_NORMS = ("auto", "none", "plate", "plate_center")


@dataclass
class PretrainingArguments:
    """Arguments of `cellmae pretrain` (see each field's help)."""

    # ---- data
    data: str = field(default=None, metadata={"help": "shard folder written by `cellmae shard` (local path or fsspec URL)"})
    crops_per_field: int = field(default=1, metadata={"help": "random crops drawn from each field per epoch"})
    channel_subset: int | None = field(default=None, metadata={"help": "train on this many randomly chosen channels per sample (channel-agnostic training); default all"})
    augment: bool = field(default=True, metadata={"help": "random flips and 90-degree rotations"})
    dataloader_num_workers: int | None = field(default=None, metadata={"help": "DataLoader worker processes per rank (>0 needs torchdata for exact resume); default: CPU cores per rank - 1 (at most 8) on a GPU, 0 on a CPU"})
    # ---- objective
    objective: str = field(default="mae", metadata={"help": "mae (masked-autoencoder pre-training) | wsl (weakly supervised baseline: classify --label-col from scratch) | classify (fine-tune the encoder of --init-from on --label-col)"})
    label_col: str = field(default="perturbation", metadata={"help": "wsl/classify: the shard metadata column (or plate/well/experiment) whose values are the classes"})
    classifier_batch_norm: str = field(default="auto", metadata={"help": "wsl/classify: plate (standardise the pooled embedding by its plate's statistics in the batch) | plate_center (centre only) | none; auto: plate for wsl, none for classify"})
    layer_decay: float | None = field(default=None, metadata={"help": "classify: layer-wise learning-rate decay; depth d of D+1 (0: patch embedding, D+1: head) trains at lr * layer_decay ** (D + 1 - d)"})
    holdout_plates: list[str] | None = field(default=None, metadata={"help": "wsl/classify: plates left out of training and evaluated (accuracy) at the end"})
    # ---- model
    model_type: str = field(default="cellmae", metadata={"help": "cellmae (channel-agnostic ViT MAE) | munet (fixed-channel masked U-Net)"})
    model_preset: str = field(default="tiny", metadata={"help": "cellmae: tiny | vit_s16 | vit_b16 | vit_l16 | vit_l8 | openphenom; munet: tiny | munet_m | munet_l"})
    model_overrides: str | None = field(default=None, metadata={"help": 'JSON of CellMAEConfig (or CellMUNetConfig) fields, e.g. \'{"image_size": 128, "fourier_loss_weight": 0.01}\''})
    init_from: str | None = field(default=None, metadata={"help": "start from this model folder or Hub id instead of random weights"})
    # ---- optimisation
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to train for"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "images per rank per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    optimizer: str = field(default="lion", metadata={"help": "lion (the paper) | adamw"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (paper: 1e-4 up to ViT-B, 3e-5 for ViT-L, with Lion)"})
    weight_decay: float = field(default=0.05, metadata={"help": "decoupled weight decay; never applied to norms, biases and tokens"})
    adam_beta1: float = field(default=0.9, metadata={"help": "first beta (Lion and AdamW)"})
    adam_beta2: float = field(default=0.95, metadata={"help": "second beta (Lion and AdamW)"})
    lr_scheduler: str = field(default="one_cycle", metadata={"help": "one_cycle (paper: warm-up then cosine anneal) | cosine (with warm-up) | constant"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of max_steps spent warming up"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip the gradient norm to this; None disables"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast with fp32 master weights on a CUDA GPU, no elsewhere) | no | bf16 | fp16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute block activations in the backward pass"})
    torch_compile: bool | None = field(default=None, metadata={"help": "true | false: compile the model with torch.compile; default on with CUDA, off on CPU (falls back to eager, saying why, where it cannot run)"})
    max_nonfinite_steps: int = field(default=10, metadata={"help": "skip optimizer steps whose gradients are NaN/inf (a skipped step still counts as a step); abort after this many in a row (checked every logging_steps)"})
    seed: int = field(default=0, metadata={"help": "seed of weights, data order, crops and masks"})
    # ---- checkpoints and output
    output_dir: str = field(default="outputs/pretrain", metadata={"help": "run folder: checkpoints/, model/, logs/, figures/"})
    save_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N optimizer steps"})
    save_total_limit: int = field(default=3, metadata={"help": "keep the newest K checkpoints"})
    save_model_with_checkpoints: bool = field(default=False, metadata={"help": "also write a loadable model folder inside every checkpoint"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder to continue from"})
    # ---- logging
    logging_steps: int = field(default=10, metadata={"help": "log losses, lr, grad norm and throughput every N steps"})
    figure_steps: int = field(default=200, metadata={"help": "save a reconstruction figure of a fixed field every N steps (0: only at the end)"})
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker: tensorboard | wandb | all | none"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm bar on the main process"})

    def __post_init__(self) -> None:
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")

        choice("optimizer", OPTIMIZERS)
        choice("lr_scheduler", SCHEDULERS)
        choice("mixed_precision", MIXED_PRECISION)
        choice("model_type", MODEL_TYPES)
        choice("objective", OBJECTIVES)
        choice("classifier_batch_norm", CLASSIFIER_BATCH_NORMS)
        if self.objective == "mae" and (self.holdout_plates or self.layer_decay is not None):
            raise ValueError("holdout_plates and layer_decay apply to --objective wsl or classify, not mae.")
        if self.objective == "wsl" and self.init_from:
            raise ValueError(f"--objective wsl trains an encoder from scratch; to start from {self.init_from}, use --objective classify.")
        if self.objective == "classify" and not self.init_from:
            raise ValueError("--objective classify fine-tunes a pre-trained model: pass --init-from MODEL_FOLDER (or use --objective wsl to train from scratch).")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay={self.layer_decay} must lie in (0, 1].")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.model_overrides is not None and isinstance(self.model_overrides, str):
            try:
                json.loads(self.model_overrides)
            except json.JSONDecodeError as error:
                raise ValueError(f"model_overrides is not valid JSON ({error}): {self.model_overrides!r}") from None

    @property
    def overrides(self) -> dict:
        if not self.model_overrides:
            return {}
        return dict(json.loads(self.model_overrides)) if isinstance(self.model_overrides, str) else dict(self.model_overrides)

    @property
    def batch_norm(self) -> str | None:
        """The model's `classifier_batch_norm` for this objective (`"auto"` resolved)."""
        if self.classifier_batch_norm == "auto":
            return "plate" if self.objective == "wsl" else None
        return None if self.classifier_batch_norm == "none" else self.classifier_batch_norm

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON file of PretrainingArguments fields (unknown keys are an error)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Training config {path} does not exist.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if isinstance(values.get("model_overrides"), dict):
        values["model_overrides"] = json.dumps(values["model_overrides"])
    known = {f.name for f in fields(PretrainingArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; valid keys are the PretrainingArguments fields (cellmae pretrain --help).")
    return values


def parse_pretraining_arguments(argv: list[str] | None = None) -> PretrainingArguments:
    """`--config FILE` (YAML/JSON) gives the defaults; any `--field value` on the command line overrides them."""
    from transformers import HfArgumentParser

    from ..cli import accept_both_spellings

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(PretrainingArguments, prog="cellmae pretrain", description="Pre-train a CA-MAE on a shard folder.")
    parser.add_argument("--config", default=None, help="YAML or JSON file of these arguments; command-line flags override it")
    accept_both_spellings(parser)  # --output-dir (shown) and --output_dir (accelerate's spelling)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config))
    namespace = parser.parse_args(argv)
    values = {k: v for k, v in vars(namespace).items() if k != "config"}
    if values.get("data") is None:
        parser.error("--data is required (a shard folder from `cellmae shard`), on the command line or in --config")
    return PretrainingArguments(**values)
