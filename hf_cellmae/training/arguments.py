"""Every knob of a pre-training run, in one dataclass saved beside each checkpoint.

Load from YAML/JSON, or a shipped config by name, and override on the command line:

    cellmae pretrain --config demo_cpu --data shards/ --max-steps 500 --learning-rate 3e-4
    cellmae pretrain --config my_run.yaml --data shards/

(``--max_steps`` is accepted too: every option has a dashed and an underscored spelling.) The shipped
configs live in ``hf_cellmae/configs/`` (``examples/configs/`` links to them); ``cellmae pretrain
--list-configs`` lists them with the hardware each is sized for.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OPTIMIZERS = ("adamw", "lion")
SCHEDULERS = ("one_cycle", "cosine", "constant")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
MODEL_TYPES = ("cellmae", "munet")
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# model_overrides keys that set the model's size: a --model-preset given on the command line replaces the
# config's values of these (unless --model-overrides sets them too).
SIZE_KEYS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_mlp_ratio",
    "stage_channels",
    "blocks_per_stage",  # MU-Net
)
DECODER_SIZE_KEYS = ("decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads")
OBJECTIVES = ("mae", "wsl", "classify")
# Arguments that change what a run computes (data, model, batch, optimisation, schedule, seed): resuming a checkpoint
# with other values would silently continue another run, so it is refused unless --allow-changed-args. The others
# (output, logging, saving, hardware: workers, precision, compile, checkpointing) only change how it runs.
RESULT_ARGUMENTS = (
    "data",
    "crops_per_field",
    "channel_subset",
    "augment",
    "objective",
    "label_col",
    "drop_missing_labels",
    "unlabeled_class",
    "classifier_batch_norm",
    "layer_decay",
    "holdout_plates",
    "model_type",
    "model_preset",
    "decoder_preset",
    "model_overrides",
    "mask_ratio",
    "init_from",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optimizer",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "lr_scheduler",
    "warmup_ratio",
    "max_grad_norm",
    "seed",
)
CLASSIFIER_BATCH_NORMS = ("auto", "none", "plate", "plate_center")


def json_object(text: str) -> dict:
    """`--model-overrides '{"image_size": 128}'`: the JSON object typed on the command line, as a dict."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object of model config fields: {text!r}")
    return value


@dataclass
class PretrainingArguments:
    """Arguments of `cellmae pretrain` (see each field's help)."""

    # ---- data
    data: str | None = field(
        default=None, metadata={"help": "shard folder written by `cellmae shard` (local path or fsspec URL)"}
    )
    crops_per_field: int = field(default=1, metadata={"help": "random crops drawn from each field per epoch"})
    channel_subset: int | None = field(
        default=None,
        metadata={
            "help": "train on this many randomly chosen channels per sample (channel-agnostic training); default all"
        },
    )
    augment: bool = field(default=True, metadata={"help": "random flips and 90-degree rotations"})
    on_error: str = field(
        default="fail",
        metadata={
            "help": "a shard field failing its CRC-32 check: fail (stop, naming shard and field) or skip (leave it out, warn, count it in the run summary)"
        },
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes per rank (>0 needs torchdata for exact resume); default: CPU cores per rank - 1 (at most 8) on a GPU, 0 on a CPU"
        },
    )
    # ---- objective
    objective: str = field(
        default="mae",
        metadata={
            "help": "mae (masked-autoencoder pre-training) | wsl (weakly supervised baseline: classify --label-col from scratch) | classify (fine-tune the encoder of --init-from on --label-col)"
        },
    )
    label_col: str = field(
        default="perturbation",
        metadata={
            "help": "wsl/classify: the shard metadata column (or plate/well/experiment) whose values are the classes"
        },
    )
    drop_missing_labels: bool = field(
        default=False,
        metadata={
            "help": "wsl/classify: leave out (and count) the fields whose --label-col has no value instead of refusing the run"
        },
    )
    classifier_batch_norm: str = field(
        default="auto",
        metadata={
            "help": "wsl/classify: plate (standardise the pooled embedding by its plate's statistics in the batch) | plate_center (centre only) | none; auto: plate for wsl, none for classify"
        },
    )
    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "classify: layer-wise learning-rate decay; depth d of D+1 (0: patch embedding, D+1: head) trains at lr * layer_decay ** (D + 1 - d)"
        },
    )
    unlabeled_class: str | None = field(
        default=None,
        metadata={
            "help": "wsl/classify: the class of fields whose --label-col is empty (e.g. control wells without a complex); default: none, such fields are refused unless --drop-missing-labels leaves them out"
        },
    )
    holdout_plates: list[str] | None = field(
        default=None,
        metadata={"help": "wsl/classify: plates left out of training and evaluated (accuracy) at the end"},
    )
    # ---- model
    model_type: str = field(
        default="cellmae", metadata={"help": "cellmae (channel-agnostic ViT MAE) | munet (fixed-channel masked U-Net)"}
    )
    model_preset: str = field(
        default="tiny",
        metadata={
            "help": "cellmae: tiny | vit_s16 | vit_b16 | vit_l16 | vit_l8 | openphenom; munet: tiny | munet_m | munet_l"
        },
    )
    decoder_preset: str | None = field(
        default=None,
        metadata={
            "help": "cellmae: the shared decoder's size, light (256 wide x 4 blocks) | mae (512 x 8, MAE's); default: the model preset's (docs/decoder.md)"
        },
    )
    model_overrides: dict | None = field(
        default=None,
        metadata={
            "type": json_object,
            "metavar": "JSON",
            "help": "CellMAEConfig (or CellMUNetConfig) fields set on the model, also over --init-from's config: a mapping in "
            'a config file, JSON on the command line, e.g. \'{"image_size": 128, "fourier_loss_weight": 0.01}\'',
        },
    )
    mask_ratio: float | None = field(
        default=None,
        metadata={
            "help": "share of each image's patch tokens hidden from the encoder (MAE's masking); overrides "
            "model_overrides' mask_ratio; default: the model's (its preset's or --init-from's)"
        },
    )
    init_from: str | None = field(
        default=None, metadata={"help": "start from this model folder or Hub id instead of random weights"}
    )
    # ---- optimisation
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps to train for"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "images per rank per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    optimizer: str = field(default="lion", metadata={"help": "lion (the paper) | adamw"})
    learning_rate: float = field(
        default=1e-4, metadata={"help": "peak learning rate (paper: 1e-4 up to ViT-B, 3e-5 for ViT-L, with Lion)"}
    )
    weight_decay: float = field(
        default=0.05, metadata={"help": "decoupled weight decay; never applied to norms, biases and tokens"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "first beta (Lion and AdamW)"})
    adam_beta2: float = field(default=0.95, metadata={"help": "second beta (Lion and AdamW)"})
    lr_scheduler: str = field(
        default="one_cycle",
        metadata={"help": "one_cycle (paper: warm-up then cosine anneal) | cosine (with warm-up) | constant"},
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of max_steps spent warming up"})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the gradient norm to this; None disables"}
    )
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 autocast with fp32 master weights on a CUDA GPU, no elsewhere) | no | bf16 | fp16"
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute block activations in the backward pass"}
    )
    torch_compile: bool | None = field(
        default=None,
        metadata={
            "help": "true | false: compile the model with torch.compile; default on with CUDA, off on CPU (falls back to eager, saying why, where it cannot run)"
        },
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "skip optimizer steps whose gradients are NaN/inf (a skipped step still counts as a step); abort after this many in a row (checked every logging_steps)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of weights, data order, crops and masks"})
    # ---- checkpoints and output
    output_dir: str = field(
        default="outputs/pretrain", metadata={"help": "run folder: checkpoints/, model/, logs/, figures/"}
    )
    save_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint every N optimizer steps"})
    save_total_limit: int = field(default=3, metadata={"help": "keep the newest K checkpoints"})
    save_model_with_checkpoints: bool = field(
        default=False, metadata={"help": "also write a loadable model folder inside every checkpoint"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to continue from"}
    )
    allow_changed_args: bool = field(
        default=False,
        metadata={
            "help": "resume even though arguments that change the result (RESULT_ARGUMENTS: data, model, batch, schedule, seed...) differ from the checkpoint's"
        },
    )
    # ---- logging
    logging_steps: int = field(default=10, metadata={"help": "log losses, lr, grad norm and throughput every N steps"})
    figure_steps: int = field(
        default=200,
        metadata={"help": "save a reconstruction figure of a fixed field every N steps (0: only at the end)"},
    )
    report_to: str = field(
        default="tensorboard", metadata={"help": "accelerate tracker: tensorboard | wandb | all | none"}
    )
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm bar on the main process"})
    check_memory: bool = field(
        default=True,
        metadata={
            "help": "on a CPU, refuse a batch whose estimated memory (hf_cellmae.training.memory) exceeds the available RAM"
        },
    )

    def __post_init__(self) -> None:
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")

        choice("optimizer", OPTIMIZERS)
        choice("on_error", ("fail", "skip"))
        choice("lr_scheduler", SCHEDULERS)
        choice("mixed_precision", MIXED_PRECISION)
        choice("model_type", MODEL_TYPES)
        choice("objective", OBJECTIVES)
        choice("classifier_batch_norm", CLASSIFIER_BATCH_NORMS)
        if self.objective == "mae" and (self.holdout_plates or self.layer_decay is not None):
            raise ValueError("holdout_plates and layer_decay apply to --objective wsl or classify, not mae.")
        if self.objective == "wsl" and self.init_from:
            raise ValueError(
                f"--objective wsl trains an encoder from scratch; to start from {self.init_from}, use --objective classify."
            )
        if self.objective == "classify" and not self.init_from:
            raise ValueError(
                "--objective classify fine-tunes a pre-trained model: pass --init-from MODEL_FOLDER (or use --objective wsl to train from scratch)."
            )
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay={self.layer_decay} must lie in (0, 1].")
        for name in (
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "save_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.decoder_preset is not None:
            from ..configuration_cellmae import DECODER_PRESETS

            if self.model_type != "cellmae":
                raise ValueError(f"--decoder-preset applies to --model-type cellmae, not {self.model_type}.")
            choice("decoder_preset", tuple(DECODER_PRESETS))
        if isinstance(self.model_overrides, str):  # JSON text: older training_args.json files hold it so
            try:
                self.model_overrides = json.loads(self.model_overrides)
            except json.JSONDecodeError as error:
                raise ValueError(f"model_overrides is not valid JSON ({error}): {self.model_overrides!r}") from None
        if self.model_overrides is not None and not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides={self.model_overrides!r} is not a mapping of model config fields.")
        if self.mask_ratio is not None and not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie in [0, 1).")

    @property
    def overrides(self) -> dict:
        """Model config fields set by this run (a new dict): the decoder preset's, then `model_overrides`, then
        `mask_ratio` (each wins over those before it)."""
        decoder = {}
        if self.decoder_preset is not None:
            from ..configuration_cellmae import DECODER_PRESETS

            decoder = DECODER_PRESETS[self.decoder_preset]
        flags = {} if self.mask_ratio is None else {"mask_ratio": self.mask_ratio}
        return {**decoder, **(self.model_overrides or {}), **flags}

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


def _comparable(name: str, value):
    """An argument's value as resume compares it (a trailing slash, JSON spelling and plate order do not count)."""
    if name == "data" and isinstance(value, str):
        return value.rstrip("/")
    if name == "model_overrides" and isinstance(value, str):
        return json.loads(value)
    if name == "holdout_plates" and value:
        return sorted(value)
    return value


def changed_result_arguments(saved: dict, args: PretrainingArguments) -> list[str]:
    """``["seed 0 -> 1", ...]``: the `RESULT_ARGUMENTS` whose value in `args` differs from `saved` (the arguments
    a checkpoint was written with; a field it lacks counts as its default), in field order. `max_steps` counts only
    for the `cosine` schedule: `constant` does not depend on it, and `one_cycle` refuses a change on its own (its
    shape is fixed by it, even with --allow-changed-args)."""
    changed = []
    for spec in fields(PretrainingArguments):
        name = spec.name
        if name not in RESULT_ARGUMENTS or (name == "max_steps" and args.lr_scheduler != "cosine"):
            continue
        old = _comparable(name, saved.get(name, spec.default))
        new = _comparable(name, getattr(args, name))
        if old != new:
            shown = [json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in (old, new)]
            changed.append(f"{name} {shown[0]} -> {shown[1]}")
    return changed


def shipped_configs() -> dict[str, Path]:
    """The configs shipped in the package, by name (file name without ``.yaml``)."""
    return {path.stem: path for path in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def config_hardware(path: str | Path) -> str:
    """The ``# Hardware:`` line of a config file (what it is sized for), or "not stated"."""
    for line in Path(path).read_text().splitlines():
        if line.lower().startswith("# hardware:"):
            return line.split(":", 1)[1].strip()
    return "not stated"


def resolve_config(spec: str | Path) -> Path:
    """A config file: a path that exists, else a shipped config's name (``camae_vit_b16_cellpainting``)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped and (path.parent == Path(".") or path.parent.name == "configs"):
        return shipped[name]
    raise FileNotFoundError(
        f"training config {spec} does not exist; pass a YAML/JSON file or the name of a shipped config: "
        f"{', '.join(shipped)} (cellmae pretrain --list-configs)"
    )


def read_config_file(path: str | Path) -> dict:
    """A YAML or JSON file of PretrainingArguments fields, or a shipped config's name (unknown keys are an error)."""
    path = resolve_config(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if isinstance(values.get("model_overrides"), str):  # a training_args.json written before it became a mapping
        values["model_overrides"] = json.loads(values["model_overrides"])
    known = {f.name for f in fields(PretrainingArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{path} has unknown keys {unknown}; valid keys are the PretrainingArguments fields (cellmae pretrain --help)."
        )
    return values


def build_pretraining_parser():
    """The `cellmae pretrain` argument parser: one option per PretrainingArguments field (standard library only)."""
    import argparse

    from ..options import ArgumentParser as _ArgumentParser
    from ..options import accept_both_spellings, add_dataclass_options

    parser = _ArgumentParser(
        prog="cellmae pretrain",
        description="Pre-train a CA-MAE on a shard folder. Options come from --config (a YAML/JSON file or a shipped "
        "config's name) and are overridden by flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="shipped configs (--config NAME):\n"
        + "\n".join(f"  {name:<30} {config_hardware(path)}" for name, path in shipped_configs().items()),
    )
    parser.add_argument(
        "--config", default=None, help="YAML/JSON file of these options, or a shipped config's name; flags override it"
    )
    parser.add_argument(
        "--list-configs",
        action="store_true",
        help="list the shipped configs and the hardware each is sized for, then exit",
    )
    add_dataclass_options(parser, PretrainingArguments)
    return accept_both_spellings(parser)  # --output-dir (shown) and --output_dir (accelerate's spelling)


_NOT_GIVEN = object()


def _given_on_command_line(parser, argv: list[str]) -> set[str]:
    """The options the user typed (argparse leaves an attribute it already holds alone unless the option is given)."""
    import argparse

    namespace = argparse.Namespace(**{a.dest: _NOT_GIVEN for a in parser._actions if a.dest != "help"})
    parsed, _ = parser.parse_known_args(argv, namespace=namespace)
    return {name for name, value in vars(parsed).items() if value is not _NOT_GIVEN}


def merge_model_overrides(config_values: dict, given: set[str], command_line: dict) -> tuple[dict, dict]:
    """The model overrides of a run: the config's, with the command line's on top.

    A `--model-preset` typed on the command line sets the model's size, so the config's size keys
    (`SIZE_KEYS`) are dropped unless `--model-overrides` sets them too; a `--decoder-preset` likewise
    drops the config's decoder sizes (`DECODER_SIZE_KEYS`). Returns the merged overrides
    and the dropped ones (to tell the user).
    """
    from_config = dict(config_values.get("model_overrides") or {})
    typed = dict(command_line.get("model_overrides") or {}) if "model_overrides" in given else {}
    dropped = {}
    replaced = SIZE_KEYS if "model_preset" in given else DECODER_SIZE_KEYS if "decoder_preset" in given else ()
    if replaced:
        dropped = {key: value for key, value in from_config.items() if key in replaced and key not in typed}
        from_config = {key: value for key, value in from_config.items() if key not in dropped}
    return {**from_config, **typed}, dropped


@dataclass
class ParsedCommandLine:
    """What `cellmae pretrain` was given: the arguments, the config file they started from, and what was typed."""

    args: PretrainingArguments
    config: Path | None
    config_values: dict
    typed: set[str]


def parse_pretraining_arguments(argv: list[str] | None = None) -> PretrainingArguments:
    """`--config FILE|NAME` (YAML/JSON) gives the defaults; any `--field value` on the command line overrides them.

    `model_overrides` merge key by key (the command line's win); a `--model-preset` on the command line
    drops the config's size overrides (`SIZE_KEYS`) it did not repeat, and says which on stderr.
    """
    return parse_command_line(argv).args


def parse_command_line(argv: list[str] | None = None) -> ParsedCommandLine:
    """:func:`parse_pretraining_arguments`, also returning the config file, its values and the options typed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_pretraining_parser()
    known, _ = parser.parse_known_args(argv)
    if known.list_configs:
        for name, path in shipped_configs().items():
            print(f"{name:<30} {config_hardware(path)}")
        parser.exit()
    config_values = read_config_file(known.config) if known.config else {}
    if config_values:
        parser.set_defaults(**config_values)
    namespace = parser.parse_args(argv)
    values = {k: v for k, v in vars(namespace).items() if k not in ("config", "list_configs")}
    given = _given_on_command_line(parser, argv)
    if config_values.get("model_overrides") or "model_overrides" in given:
        overrides, dropped = merge_model_overrides(config_values, given, values)
        values["model_overrides"] = overrides or None
        if dropped:
            preset = (
                f"--model-preset {values['model_preset']} sets the model size"
                if "model_preset" in given
                else f"--decoder-preset {values['decoder_preset']} sets the decoder size"
            )
            print(
                f"cellmae pretrain: {preset}, so the config's "
                f"model_overrides {', '.join(f'{k}={json.dumps(v)}' for k, v in dropped.items())} "
                f"were dropped (repeat them in --model-overrides to keep them)",
                file=sys.stderr,
            )
    if values.get("data") is None:
        parser.error("--data is required (a shard folder from `cellmae shard`), on the command line or in --config")
    config = resolve_config(known.config) if known.config else None
    return ParsedCommandLine(PretrainingArguments(**values), config, config_values, given)
