"""The model of a run, from its arguments: one config, built in one place for every objective.

`model_config` is what the loop trains and what the memory estimate measures: a preset with the run's overrides
(`PretrainingArguments.overrides`: decoder preset, `model_overrides`, `--mask-ratio`) and the shards' channels, or
the config of `--init-from` with the same overrides on top, for every objective. `build_model` makes the model
of that config: random weights, or those of `--init-from`.
"""

from __future__ import annotations

from ..configuration_cellmae import PRESETS, CellMAEConfig
from ..data.labels import LabelVocabulary
from ..errors import UserError
from .arguments import PretrainingArguments


def classifier_head(args: PretrainingArguments, labels: LabelVocabulary) -> dict:
    """The config fields of a `wsl`/`classify` head: its classes and the plate-wise normalisation."""
    return dict(
        num_labels=len(labels.labels),
        id2label=labels.id2label,
        label2id=labels.label2id,
        classifier_batch_norm=args.batch_norm,
    )


def model_config(args: PretrainingArguments, manifest: dict, labels: LabelVocabulary | None = None):
    """The config of the run's model: that of `init_from`, else the preset's with the shards' channels, with the
    run's overrides on top (and, with `labels`, a `wsl`/`classify` head's fields)."""
    overrides = args.overrides
    if labels is not None and args.objective != "mae":
        overrides.update(classifier_head(args, labels))
    channels = list(manifest["channels"])
    if args.model_type == "munet" and args.channel_subset:
        raise UserError(
            f"channel_subset={args.channel_subset} trains on random channel subsets, but a MU-Net is fixed-channel "
            f"(built for all {len(channels)} channels of the shards); drop --channel-subset or use --model-type cellmae"
        )
    if args.init_from:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(args.init_from, **overrides)
    if args.model_type == "munet":
        from ..configuration_munet import CellMUNetConfig

        return CellMUNetConfig.from_preset(
            args.model_preset, **{"channel_names": channels, "num_channels": len(channels), **overrides}
        )
    overrides.setdefault("channel_names", channels)
    preset_max = PRESETS.get(args.model_preset, {}).get("max_channels", CellMAEConfig().max_channels)
    overrides.setdefault("max_channels", max(preset_max, len(overrides["channel_names"])))
    return CellMAEConfig.from_preset(args.model_preset, **overrides)


def build_model(args: PretrainingArguments, manifest: dict, labels: LabelVocabulary | None = None):
    """The run's model for `model_config`: a CA-MAE or MU-Net to pre-train (`mae`), or an image classifier over
    `labels` (`wsl`: all weights random; `classify`: the encoder of `init_from`, its decoder dropped, a new head)."""
    config = model_config(args, manifest, labels)
    if args.objective == "classify":
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(args.init_from, config=config)
    model_class = _model_class(args.model_type, supervised=args.objective != "mae")
    if args.init_from:
        return model_class.from_pretrained(args.init_from, config=config)
    return model_class(config)


def _model_class(model_type: str, supervised: bool):
    if model_type == "munet":
        from ..modeling_munet import CellMUNetForImageClassification, CellMUNetForPreTraining

        return CellMUNetForImageClassification if supervised else CellMUNetForPreTraining
    from ..modeling_cellmae import CellMAEForPreTraining
    from ..modeling_cellmae_heads import CellMAEForImageClassification

    return CellMAEForImageClassification if supervised else CellMAEForPreTraining
