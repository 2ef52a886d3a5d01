"""`cellmae pretrain`."""

from __future__ import annotations


def register(subparsers) -> None:
    pretrain = subparsers.add_parser(
        "pretrain",
        help="pre-train a CA-MAE on a shard folder (runs on many GPUs under `accelerate launch`)",
        description="Pre-train a channel-agnostic MAE. Arguments come from --config (YAML/JSON) and are "
        "overridden by flags; run `cellmae pretrain --help-all` for every flag.",
        add_help=False,
    )
    pretrain.set_defaults(func=_pretrain, passthrough=True)


def _pretrain(args) -> int:
    from .arguments import parse_pretraining_arguments
    from .loop import pretrain

    rest = ["--help"] if any(flag in args.rest for flag in ("--help-all", "-h", "--help")) else args.rest
    summary = pretrain(parse_pretraining_arguments(rest))
    print(f"Model written to {summary['model_dir']} after {summary['global_step']} steps (loss {summary['final_loss']}).")
    print(f"Load it with: AutoModel.from_pretrained({summary['model_dir']!r})  (after `import hf_cellmae`)")
    return 0
