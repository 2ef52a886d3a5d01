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
    import dataclasses
    import sys

    from .arguments import config_hardware, parse_command_line

    # --help and --list-configs exit inside the parser, before torch or transformers are imported.
    parsed = parse_command_line(args.rest)
    training_args = parsed.args
    from .device_defaults import cpus_of_this_process, settings_for_a_cpu, training_device_type

    on_cpu = training_device_type() == "cpu"
    if on_cpu and parsed.config is not None:
        cpus = cpus_of_this_process()
        changes = settings_for_a_cpu(parsed.config_values, parsed.typed, cpus)
        if changes:
            said = ", ".join(f"{name}={parsed.config_values[name]} -> {value}" for name, value in changes.items())
            print(
                f"cellmae pretrain: no CUDA GPU, so {parsed.config.stem}'s {said} (a CPU trains in fp32 and eager, "
                f"with at most {max(0, cpus - 1)} DataLoader worker(s) on its {cpus} core(s)); options typed on the command "
                "line are kept",
                file=sys.stderr,
            )
            training_args = dataclasses.replace(training_args, **changes)
    if training_args.check_memory:
        from .memory import check_training_memory

        check_training_memory(training_args)
    if (
        on_cpu
        and parsed.config is not None
        and "max_steps" not in parsed.typed
        and "gpu" in config_hardware(parsed.config).lower()
    ):
        from .memory import check_cpu_run_length

        check_cpu_run_length(training_args, parsed.config.stem, config_hardware(parsed.config))
    from .loop import pretrain

    summary = pretrain(training_args)
    print(
        f"Model written to {summary['model_dir']} after {summary['global_step']} steps (loss {summary['final_loss']})."
    )
    if summary.get("skipped_fields"):
        print(
            f"Skipped {len(summary['skipped_fields'])} corrupt field(s) (--on-error skip); re-run the same `cellmae shard` "
            "command to rewrite the damaged shards."
        )
    if "holdout_evaluation" in summary:
        from .loop import holdout_line

        print(f"Held-out evaluation: {holdout_line(summary['holdout_evaluation'])}")
    print(f"Load it with: AutoModel.from_pretrained({summary['model_dir']!r})  (after `import hf_cellmae`)")
    return 0
