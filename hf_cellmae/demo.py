"""`cellmae demo`: the whole pipeline on the built-in synthetic plate, on a CPU, with no download.

    synthetic plate -> shards -> pre-train a tiny CA-MAE -> model folder
      -> embeddings (pre-trained, random-init encoder, pixel statistics) -> TVN -> recall of the
         simulator's true relationships -> model card

It sits above every stage (it is an orchestrator, like the CLI), so it may import all of them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_cpu.yaml"
# Enough control wells that TVN (fitted on control fields) sees more controls than embedding dims.
DEMO_PLATE = dict(num_plates=2, control_wells_per_plate=24, sites_per_well=2)


def _say(message: str) -> None:
    print(f"[cellmae demo] {message}", flush=True)


def run_demo(out: str | Path = "cellmae-demo", max_steps: int | None = None, seed: int = 0) -> dict:
    """Run the demo into `out` and return a summary (also written to `out/demo_report.json`)."""
    from .data.shards import shard_folder
    from .data.synthetic import make_synthetic_screen
    from .evaluation.embed import ModelFeaturizer, PixelStatsFeaturizer, embed_dataset
    from .evaluation.report import evaluate_synthetic
    from .hub.model_card import write_model_card
    from .configuration_cellmae import CellMAEConfig
    from .modeling_cellmae import CellMAEForPreTraining
    from .training.arguments import PretrainingArguments, read_config_file
    from .training.loop import pretrain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()

    _say("1/5 rendering the synthetic screen (2 plates, Cell-Painting-like, known complexes and pathways)")
    plate = make_synthetic_screen(out / "plate", seed=seed, **DEMO_PLATE)
    timings["synthetic_s"] = time.perf_counter() - start

    _say("2/5 writing streaming shards")
    step_start = time.perf_counter()
    shards = out / "shards"
    shard_folder(plate["images"], shards, metadata=plate["metadata"], channel_names=plate["channels"])
    timings["shard_s"] = time.perf_counter() - step_start

    _say("3/5 pre-training a tiny CA-MAE on CPU")
    step_start = time.perf_counter()
    values = read_config_file(DEMO_CONFIG)
    values.update(data=str(shards), output_dir=str(out / "run"), seed=seed)
    if max_steps is not None:
        values["max_steps"] = max_steps
    args = PretrainingArguments(**values)
    summary = pretrain(args)
    model_dir = Path(summary["model_dir"])
    timings["pretrain_s"] = time.perf_counter() - step_start

    _say("4/5 embedding every field and measuring recall of the true relationships (with two baselines)")
    step_start = time.perf_counter()
    random_dir = out / "random_init"
    random_model = CellMAEForPreTraining(CellMAEConfig.from_pretrained(model_dir))  # same architecture, initial weights
    random_model.save_pretrained(random_dir)
    shutil.copy(model_dir / "preprocessor_config.json", random_dir / "preprocessor_config.json")
    tables = {}
    for name, featurizer in (
        ("pretrained", ModelFeaturizer(model_dir)),
        ("random_init", ModelFeaturizer(random_dir)),
        ("pixel_stats", PixelStatsFeaturizer()),
    ):
        tables[name] = out / "embeddings" / name
        embed_dataset(shards, tables[name], featurizer)
    results = evaluate_synthetic(
        tables["pretrained"], out / "plate", out / "evaluation",
        baselines={"random_init": tables["random_init"], "pixel_stats": tables["pixel_stats"]},
        batch_col="Metadata_plate",
    )
    probes = _probe_table(tables)
    (out / "evaluation" / "probe_results.json").write_text(json.dumps(probes, indent=2) + "\n")
    timings["evaluate_s"] = time.perf_counter() - step_start

    _say("5/5 writing the model card")
    readme = write_model_card(model_dir, eval_results=out / "evaluation" / "eval_results.json")
    timings["total_s"] = time.perf_counter() - start

    recall = _recall_table(results)
    report = {
        "model_dir": str(model_dir),
        "model_card": str(readme),
        "reconstruction_figure": str(model_dir / "reconstruction.png"),
        "evaluation": str(out / "evaluation" / "eval_results.json"),
        "final_loss": summary["final_loss"],
        "steps": summary["global_step"],
        "recall": recall,
        "probe": {name: {label: row[label]["accuracy"] for label in PROBE_LABELS} for name, row in probes.items()},
        "probe_chance": {label: probes["pretrained"][label]["chance_uniform"] for label in PROBE_LABELS},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report)
    return report


PROBE_LABELS = ("complex", "gene")


def _probe_table(tables: dict) -> dict:
    """Logistic-regression probe, leave one plate out, of each label from each feature table."""
    from .evaluation import probe_embeddings, read_embeddings

    return {name: {label: probe_embeddings(read_embeddings(path), label) for label in PROBE_LABELS}
            for name, path in tables.items()}


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
    print("Linear probe (logistic regression on well profiles, leave one plate out), accuracy:")
    print(f"  {'model':<14}" + "".join(f"{label:>12}" for label in PROBE_LABELS))
    for name, row in report["probe"].items():
        print(f"  {name:<14}" + "".join(f"{row[label]:>12.3f}" for label in PROBE_LABELS))
    print(f"  {'chance':<14}" + "".join(f"{report['probe_chance'][label]:>12.3f}" for label in PROBE_LABELS))
    print()
    print(f"Wrote {report['model_dir']} (weights, config, processor, model code, model card README.md)")
    print(f"      {report['reconstruction_figure']}")
    print(f"      {report['evaluation']} (+ plots)")
    print(f"Took {report['timings_s']['total_s']:.0f} s. Load the model with:")
    print(f"  import hf_cellmae; from transformers import AutoModel; model = AutoModel.from_pretrained({report['model_dir']!r})")


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the whole pipeline on a built-in synthetic plate: generate, shard, pre-train, evaluate, card",
        description="Runs on a CPU in a few minutes with no download and writes a loadable model folder.",
    )
    demo.add_argument("--out", default="cellmae-demo", help="output folder (default: ./cellmae-demo)")
    demo.add_argument("--max-steps", type=int, default=None, help="pre-training steps (default: the demo config's 400)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_run_from_command_line)


def _run_from_command_line(args) -> int:
    run_demo(args.out, max_steps=args.max_steps, seed=args.seed)
    return 0
