"""`cellmae demo`: the whole pipeline on the built-in synthetic plate, on a CPU, with no download.

    synthetic plate -> shards -> pre-train a tiny CA-MAE -> model folder
      -> embeddings (pre-trained, random-init encoder, pixel statistics, CellProfiler features)
      -> TVN -> recall of the simulator's true relationships + the paper's suite (linear probe,
         kNN, gene-set recall, copairs mAP, CellProfiler-feature prediction) -> model card

It sits above every stage (it is an orchestrator, like the CLI), so it may import all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_cpu.yaml"
# The pre-training recipes the demo can run: the default (1,600 steps, sized to fill the demo's 10 minutes on 2 idle
# CPU cores; DEMO_TIME) and `small`, the same recipe 2x longer (3,200 steps; docs/evidence.md).
RECIPES = {"demo": DEMO_CONFIG, "small": DEMO_CONFIG.with_name("small_cpu.yaml")}
# The CellProfiler baseline measures only its two cheapest categories, Intensity and AreaShape (a third of the
# "fast" set's cost, evaluation/cellprofiler.py), so that the demo's minutes go to pre-training (issue 25).
DEMO_CELLPROFILER_FEATURES = "intensity_shape"
# Enough control wells that TVN (fitted on control fields) sees more controls than embedding dims.
DEMO_PLATE = dict(num_plates=2, control_wells_per_plate=24, sites_per_well=2)


def _say(message: str) -> None:
    print(f"[cellmae demo] {message}", flush=True)


def run_demo(
    out: str | Path = "cellmae-demo",
    max_steps: int | None = None,
    seed: int = 0,
    cellprofiler: bool = True,
    recipe: str = "demo",
) -> dict:
    """Run the demo into `out` and return a summary (also written to `out/demo_report.json`).

    Args:
        out: output folder.
        max_steps: pre-training steps (default: the recipe's).
        seed: seed of the synthetic screen, the weights and the data order.
        cellprofiler: also featurise with classical segmentation + CellProfiler measurements (Intensity and
            AreaShape only: ``DEMO_CELLPROFILER_FEATURES``).
        recipe: ``"demo"`` (1,600 steps; the whole demo: ``DEMO_TIME``) or ``"small"`` (the same recipe for
            3,200 steps).
    """
    import torch

    from .configuration_cellmae import CellMAEConfig
    from .data.shards import shard_folder
    from .data.synthetic import make_synthetic_screen
    from .evaluation.embed import DEFAULT_READOUT, ModelFeaturizer, PixelStatsFeaturizer, embed_dataset
    from .evaluation.report import evaluate_synthetic
    from .hub.model_card import write_model_card
    from .modeling_cellmae import CellMAEForPreTraining
    from .training.arguments import PretrainingArguments, read_config_file
    from .training.loop import pretrain

    if recipe not in RECIPES:
        raise ValueError(f"Unknown demo recipe {recipe!r}; choose one of {sorted(RECIPES)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()

    _say("1/5 rendering the synthetic screen (2 plates, Cell-Painting-like, known complexes and pathways)")
    plate = make_synthetic_screen(out / "plate", seed=seed, **DEMO_PLATE)
    timings["synthetic_s"] = time.perf_counter() - start

    _say("2/5 writing streaming shards")
    step_start = time.perf_counter()
    shards = out / "shards"
    shard_folder(plate["images"], shards, metadata=plate["metadata"], channel_names=plate["channels"])
    timings["shard_s"] = time.perf_counter() - step_start

    values = read_config_file(RECIPES[recipe])
    _say(f"3/5 pre-training a tiny CA-MAE on CPU (recipe {recipe!r}, {max_steps or values['max_steps']} steps)")
    step_start = time.perf_counter()
    values.update(data=str(shards), output_dir=str(out / "run"), seed=seed)
    if max_steps is not None:
        values["max_steps"] = max_steps
    args = PretrainingArguments(**values)
    summary = pretrain(args)
    model_dir = Path(summary["model_dir"])
    timings["pretrain_s"] = time.perf_counter() - step_start
    timings["pretrain_steps_per_s"] = summary["global_step"] / timings["pretrain_s"]

    _say("4/5 embedding every field; evaluating the model and three baselines with the paper's suite")
    step_start = time.perf_counter()
    random_dir = out / "random_init"
    # Same architecture, initial weights drawn from the demo's seed (not from the random state training left
    # behind), so that the baseline of a seed is the same whatever the recipe's length.
    torch.manual_seed(seed)
    random_model = CellMAEForPreTraining(CellMAEConfig.from_pretrained(model_dir))
    random_model.save_pretrained(random_dir)
    shutil.copy(model_dir / "preprocessor_config.json", random_dir / "preprocessor_config.json")
    featurizers = {
        "pretrained": ModelFeaturizer(model_dir, readout=DEFAULT_READOUT),
        "random_init": ModelFeaturizer(random_dir, readout=DEFAULT_READOUT),
        "pixel_stats": PixelStatsFeaturizer(),
    }
    if cellprofiler:
        from .evaluation.cellprofiler import CellProfilerFeaturizer

        featurizers["cellprofiler"] = CellProfilerFeaturizer(
            nuclei_channel="DNA", feature_set=DEMO_CELLPROFILER_FEATURES, num_workers=0
        )
    tables = {}
    for name, featurizer in featurizers.items():
        embed_start = time.perf_counter()
        tables[name] = out / "embeddings" / name
        embed_dataset(shards, tables[name], featurizer)
        if hasattr(featurizer, "close"):
            featurizer.close()
        timings[f"embed_{name}_s"] = time.perf_counter() - embed_start
    embed_end = time.perf_counter()
    results = evaluate_synthetic(
        tables["pretrained"],
        out / "plate",
        out / "evaluation",
        baselines={name: path for name, path in tables.items() if name != "pretrained"},
        batch_col="Metadata_plate",
        probe_labels=PROBE_LABELS,
        consistency_col="complex",
        align_options={"n_components": TVN_COMPONENTS},
        progress=False,
        model_label="pretrained",
    )
    timings["evaluate_s"] = time.perf_counter() - embed_end

    _say("5/5 writing the model card")
    step_start = time.perf_counter()
    readme = write_model_card(model_dir, eval_results=out / "evaluation" / "eval_results.json")
    timings["card_s"] = time.perf_counter() - step_start
    timings["total_s"] = time.perf_counter() - start

    recall = _recall_table(results)
    report = {
        "model_dir": str(model_dir),
        "model_card": str(readme),
        "reconstruction_figure": str(model_dir / "reconstruction.png"),
        "evaluation": str(out / "evaluation" / "eval_results.json"),
        "final_loss": summary["final_loss"],
        "steps": summary["global_step"],
        "recipe": recipe,
        "readout": DEFAULT_READOUT,
        "recall": recall,
        "suite": _suite_table(results),
        "probe_chance": {
            label: results["suite"]["featurizers"]["model"]["probe"][f"Metadata_{label}"]["chance"]
            for label in PROBE_LABELS
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        # the machine's 1-minute load average at the start and end: timings under load are not idle timings
        "load_average": [round(load, 2) for load in (load_at_start, *os.getloadavg()[:1])]
        if load_at_start is not None
        else None,
        "cpu_count": os.cpu_count(),
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report)
    return report


PROBE_LABELS = ("complex", "gene")
# The TVN width the demo uses (see docs/evidence.md for why). Its read-out is `cellmae embed`'s default
# (embed.DEFAULT_READOUT): one mean token per stain, concatenated, not one mean over every stain's tokens.
TVN_COMPONENTS = 64  # every featuriser whitened in at most 64 principal components of its controls


def _suite_table(results: dict) -> dict:
    """``{featuriser: {metric: value}}`` with the demo's names (the model is "pretrained")."""
    from .evaluation.suite import suite_rows

    rows = suite_rows(results["suite"])
    return {("pretrained" if name == "model" else name): row for name, row in rows.items()}


def _recall_table(results: dict) -> dict:
    """`{model: {source: recall at (0.05, 0.95)}}` for the pre-trained model and the baselines."""
    key = "recall_0.05_0.95"
    table = {"pretrained": {s: v[key] for s, v in results["sources"].items()}}
    for name, baseline in (results.get("baselines") or {}).items():
        table[name] = {s: v[key] for s, v in baseline["sources"].items()}
    table["chance"] = {s: results["chance"][key] for s in results["sources"]}
    return table


def _print_report(report: dict) -> None:
    recall = report["recall"]
    sources = list(recall["pretrained"])
    print()
    print("Recall of the simulator's true relationships at (0.05, 0.95), after TVN:")
    print(f"  {'model':<14}" + "".join(f"{s:>12}" for s in sources))
    for name, row in recall.items():
        print(f"  {name:<14}" + "".join(f"{row[s]:>12.3f}" for s in sources))
    print()
    print("The paper's suite (probe/kNN: leave one plate out; gene-set recall; copairs mAP; CellProfiler R²):")
    suite = report["suite"]
    metrics = list(dict.fromkeys(m for row in suite.values() for m in row))
    print(f"  {'metric':<28}" + "".join(f"{name:>14}" for name in suite))
    for metric in metrics:
        print(
            f"  {metric:<28}"
            + "".join(f"{row[metric]:>14.3f}" if metric in row else f"{'-':>14}" for row in suite.values())
        )
    print(
        f"  chance: probe complex {report['probe_chance']['complex']:.3f}, probe gene {report['probe_chance']['gene']:.3f}"
    )
    print()
    print(_reading(report))
    print()
    print(f"Wrote {report['model_dir']} (weights, config, processor, model code, model card README.md)")
    print(f"      {report['reconstruction_figure']}")
    print(f"      {report['evaluation']} (+ plots)")
    print(_timing_line(report))
    print("Load the model with:")
    print(
        f"  import hf_cellmae; from transformers import AutoModel; model = AutoModel.from_pretrained({report['model_dir']!r})"
    )


def _reading(report: dict) -> str:
    """One line that states this run's measured complex probe (pre-trained vs random weights, vs the baselines)."""
    suite = report["suite"]
    probe = {name: row["probe complex"] for name, row in suite.items()}
    gain = probe["pretrained"] - probe["random_init"]
    measured = (
        f"pre-trained {probe['pretrained']:.2f} vs random-init {probe['random_init']:.2f} complex-probe "
        f"accuracy: {gain:+.2f}"
    )
    if gain >= 0.10:
        verdict = f"{measured}, pre-training learned what the random weights do not show"
    elif gain > 0:
        verdict = f"{measured}, pre-training helped a little; train longer (cellmae demo --recipe small)"
    else:
        verdict = f"{measured}, pre-training has not helped on this seed; train longer (cellmae demo --recipe small)"
    others = [f"pixel statistics {probe['pixel_stats']:.2f}"]
    if "cellprofiler" in probe:
        others.append(f"CellProfiler features {probe['cellprofiler']:.2f}")
    return (
        f"Reading: {verdict}; {', '.join(others)} (chance {report['probe_chance']['complex']:.2f}; one seed: "
        "see docs/evidence.md for the spread over seeds)."
    )


def _timing_line(report: dict) -> str:
    """Where the run's time went, stage by stage, with the machine's load (timings under load are not idle ones)."""
    t = report["timings_s"]
    embeds = ", ".join(f"{k[len('embed_') : -len('_s')]} {v:.0f}" for k, v in t.items() if k.startswith("embed_"))
    load = report.get("load_average")
    where = f"{report.get('cpu_count')} CPUs, 1-min load {load[0]} at start, {load[1]} at end" if load else ""
    return (
        f"Took {t['total_s']:.0f} s: synthetic {t['synthetic_s']:.0f}, shards {t['shard_s']:.0f}, pre-training "
        f"{t['pretrain_s']:.0f} ({t['pretrain_steps_per_s']:.2f} steps/s), embeddings ({embeds}), evaluation "
        f"{t['evaluate_s']:.0f}, card {t['card_s']:.0f} ({where})."
    )


# How long `cellmae demo` takes (the README says the same): one default run timed on 2 idle CPU cores (seed 31,
# docs/evidence.md, section 11); each run prints its stages' times and the machine's load.
DEMO_TIME = (
    "8 min 42 s on 2 idle CPU cores (516 s in the demo, 490 s of it pre-training at 3.3 steps/s); "
    "the 400-step demo before it took 493 s"
)


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the whole pipeline on a built-in synthetic plate: generate, shard, pre-train, evaluate, card",
        description=f"Runs on a CPU with no download and writes a loadable model folder: {DEMO_TIME}.",
    )
    demo.add_argument("--out", default="cellmae-demo", help="output folder (default: ./cellmae-demo)")
    demo.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="demo",
        help="demo: 1,600 steps (default; the whole demo: 8 min 42 s on 2 idle cores); "
        "small: 3,200 steps (827 s on 2 idle cores with --no-cellprofiler)",
    )
    demo.add_argument(
        "--max-steps", type=int, default=None, help="pre-training steps (default: the recipe's: 1,600 or 3,200)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--no-cellprofiler",
        action="store_true",
        help="skip the CellProfiler-features baseline (Intensity and AreaShape measurements of every "
        "field: about a third of the 360 s the full-category baseline took on 2 idle cores)",
    )
    demo.set_defaults(func=_run_from_command_line)


def _run_from_command_line(args) -> int:
    run_demo(
        args.out, max_steps=args.max_steps, seed=args.seed, cellprofiler=not args.no_cellprofiler, recipe=args.recipe
    )
    return 0
