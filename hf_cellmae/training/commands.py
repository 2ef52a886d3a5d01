"""`cellmae pretrain`."""

from __future__ import annotations


def register(subparsers) -> None:
    pretrain = subparsers.add_parser(
        "pretrain",
        help="pre-train a CA-MAE / MU-Net (--objective mae), a weakly supervised baseline (wsl) or fine-tune (classify) on a shard folder",
        description="Pre-train a channel-agnostic MAE, train the weakly supervised baseline (--objective wsl) or fine-tune a "
        "pre-trained model on labelled wells (--objective classify --init-from MODEL). Arguments come from --config (YAML/JSON) and are "
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
    if "holdout_evaluation" in summary:
        result = summary["holdout_evaluation"]
        print(f"Accuracy on held-out plates {result['plates']}: {result['accuracy']:.4f} ({result['num_samples']} crops).")
    print(f"Load it with: AutoModel.from_pretrained({summary['model_dir']!r})  (after `import hf_cellmae`)")
    return 0
