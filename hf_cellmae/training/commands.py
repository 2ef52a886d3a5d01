"""`cellmae pretrain`."""

from __future__ import annotations


def register(subparsers) -> None:
    pretrain = subparsers.add_parser(
        "pretrain",
        help="pre-train a CA-MAE / MU-Net (--objective mae), a weakly supervised baseline (wsl) or fine-tune (classify) on a shard folder",
        description="Pre-train a channel-agnostic MAE, train the weakly supervised baseline (--objective wsl) or fine-tune a "
        "pre-trained model on labelled wells (--objective classify --init-from MODEL). Arguments come from --config (a YAML/JSON "
        "file or a shipped config's name) and are overridden by flags; run `cellmae pretrain --help` for every flag.",
        add_help=False,
    )
    pretrain.set_defaults(func=_pretrain, passthrough=True)


def _pretrain(args) -> int:
    from .arguments import parse_pretraining_arguments

    # --help and --list-configs exit inside the parser, before torch or transformers are imported.
    training_args = parse_pretraining_arguments(args.rest)
    if training_args.check_memory:
        from .memory import check_training_memory

        check_training_memory(training_args)
    from .loop import pretrain

    summary = pretrain(training_args)
    print(f"Model written to {summary['model_dir']} after {summary['global_step']} steps (loss {summary['final_loss']}).")
    if summary.get("skipped_fields"):
        print(f"Skipped {len(summary['skipped_fields'])} corrupt field(s) (--on-error skip); re-run the same `cellmae shard` "
              "command to rewrite the damaged shards.")
    if "holdout_evaluation" in summary:
        result = summary["holdout_evaluation"]
        print(f"Accuracy on held-out plates {result['plates']}: {result['accuracy']:.4f} ({result['num_samples']} crops).")
    print(f"Load it with: AutoModel.from_pretrained({summary['model_dir']!r})  (after `import hf_cellmae`)")
    return 0
