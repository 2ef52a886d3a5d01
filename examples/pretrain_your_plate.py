"""Your own plate, end to end: images -> shards -> pre-train -> embed -> evaluate -> model card -> Hub.

    # no data at hand: a synthetic Cell-Painting-like screen with known biology (a few minutes on a CPU)
    python examples/pretrain_your_plate.py

    # your plate: one image file per channel, plus a table of what is in each well
    python examples/pretrain_your_plate.py --images /data/my_plate --metadata my_plate.csv \
        --channel-names DNA ER RNA AGP Mito --relationships my_pairs.csv --out runs/my_plate

    # ... and share it (log in first with `hf auth login`, or set HF_TOKEN)
    python examples/pretrain_your_plate.py --images /data/my_plate ... --repo-id my-org/cellmae-my-plate

Every step is one call of hf_cellmae's Python API; each has a `cellmae` command that does the same:

    1 shards      hf_cellmae.data.shard_folder              cellmae shard IMAGES OUT/shards --metadata CSV
    2 pre-train   hf_cellmae.training.pretrain              cellmae pretrain --config CFG --data OUT/shards --output-dir OUT/run
    3 embed       hf_cellmae.evaluation.embed.embed_dataset cellmae embed OUT/run/model OUT/shards OUT/embeddings/model
    4 evaluate    hf_cellmae.evaluation.evaluate_embeddings cellmae evaluate OUT/embeddings/model --out OUT/evaluation
    5 card        hf_cellmae.hub.write_model_card           cellmae card OUT/run/model
    6 push        hf_cellmae.hub.push_model_folder          cellmae push OUT/run/model ORG/NAME

The training recipe is a YAML file of `PretrainingArguments` (default: the CPU demo recipe, a tiny
ViT); for real runs use one of examples/configs/ and launch on GPUs with examples/accelerate/.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import hf_cellmae
from hf_cellmae.data import make_synthetic_screen, shard_folder
from hf_cellmae.evaluation import evaluate_embeddings, read_embeddings, relationship_files
from hf_cellmae.evaluation.embed import ModelFeaturizer, PixelStatsFeaturizer, embed_dataset
from hf_cellmae.evaluation.options import EvaluateOptions
from hf_cellmae.evaluation.relate import BENCHMARK_SOURCES
from hf_cellmae.hub import push_model_folder, write_model_card
from hf_cellmae.training import PretrainingArguments, pretrain
from hf_cellmae.training.arguments import read_config_file

DEMO_CONFIG = Path(hf_cellmae.__file__).resolve().parent / "configs" / "demo_cpu.yaml"
# The demo's plate: 2 plates (= 2 batches), 24 control wells each, so TVN (fitted on the control fields)
# sees more controls than the tiny model has embedding dimensions.
SYNTHETIC_PLATE = dict(num_plates=2, control_wells_per_plate=24, sites_per_well=2)
# --small-plate: seconds instead of minutes, for a smoke test (too few controls for TVN: use center_scale).
# 12 genes: the recall benchmark needs at least 10 perturbations for its null distribution.
SMALL_PLATE = dict(
    num_plates=2,
    field_size=64,
    num_pathways=2,
    complexes_per_pathway=2,
    genes_per_complex=3,
    control_wells_per_plate=4,
    sites_per_well=2,
)


def step(number: int | str, message: str) -> None:
    print(f"\n[{number}] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("your plate (default: a synthetic plate is generated)")
    data.add_argument(
        "--images", default=None, help="folder of images (RxRx, file-name pattern, TIFF stacks) or a load_data CSV"
    )
    data.add_argument(
        "--metadata", default=None, help="CSV/Parquet with plate, well(, site) and e.g. perturbation, is_control"
    )
    data.add_argument(
        "--layout", default="auto", help="auto | rxrx | pattern | load_data | stack (see `cellmae shard --help`)"
    )
    data.add_argument("--pattern", default=None, help="file-name regex or preset for --layout pattern")
    data.add_argument("--channel-names", nargs="+", default=None, help="stain of each channel, in channel-id order")
    data.add_argument(
        "--small-plate", action="store_true", help="generate a much smaller synthetic plate (smoke test)"
    )
    train = parser.add_argument_group("pre-training")
    train.add_argument(
        "--config", default=str(DEMO_CONFIG), help="YAML of PretrainingArguments (default: the CPU demo recipe)"
    )
    train.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    evaluation = parser.add_argument_group("evaluation (needs a perturbation column in the metadata)")
    evaluation.add_argument(
        "--relationships",
        nargs="+",
        default=None,
        help="CSV files of known related pairs (entity1,entity2); default: the synthetic plate's, "
        f"or the public benchmark sources {', '.join(BENCHMARK_SOURCES)}",
    )
    evaluation.add_argument("--perturbation-col", default="Metadata_perturbation")
    evaluation.add_argument("--batch-col", default="Metadata_plate", help="align each batch on its own controls")
    evaluation.add_argument("--alignment", default="tvn", choices=["tvn", "pca_center_scale", "center_scale", "none"])
    hub = parser.add_argument_group("sharing")
    hub.add_argument(
        "--repo-id", default=None, help="push the model folder to this Hub repo (default: stop after the card)"
    )
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--out", default="cellmae-my-plate", help="output folder (default: ./cellmae-my-plate)")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first if it holds an earlier run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images is None and (args.metadata or args.channel_names):
        parser.error("--metadata and --channel-names describe --images; pass --images too")
    return args


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: embeddings of an older model would be reused silently."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} already holds files; pass --overwrite to replace them, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    prepare_output(out, args.overwrite)
    start = time.perf_counter()

    # ---- 0. the plate: yours, or a synthetic one whose true gene relationships are known
    relationships = args.relationships
    if args.images is None:
        step(0, "no --images given: generating a synthetic Cell-Painting screen (known complexes and pathways)")
        plate = make_synthetic_screen(
            out / "plate", seed=args.seed, **(SMALL_PLATE if args.small_plate else SYNTHETIC_PLATE)
        )
        images, metadata, channel_names = plate["images"], plate["metadata"], plate["channels"]
        relationships = relationships or [str(p) for p in relationship_files(out / "plate").values()]
        print(f"    {plate['num_fields']} fields of {len(channel_names)} channels -> {images}")
    else:
        images, metadata, channel_names = args.images, args.metadata, args.channel_names

    # ---- 1. shards: every field once, metadata joined, bad files counted and reported (not dropped silently)
    step(1, f"writing streaming shards of {images}")
    manifest = shard_folder(
        images,
        out / "shards",
        layout=args.layout,
        pattern=args.pattern,
        channel_names=channel_names,
        metadata=metadata,
        seed=args.seed,
    )
    print(
        f"    {manifest['num_fields']} fields, channels {manifest['channels']}, {manifest['num_shards']} shard(s) "
        f"-> {out / 'shards'}"
    )
    if manifest["num_skipped"]:
        print(
            f"    skipped {manifest['num_skipped']} bad input(s), listed under 'skipped' in {out / 'shards' / 'manifest.json'}"
        )

    # ---- 2. pre-train: the recipe file, with the data and output folders filled in
    step(2, f"pre-training with {args.config}")
    values = read_config_file(args.config)
    values.update(data=str(out / "shards"), output_dir=str(out / "run"), seed=args.seed)
    if args.max_steps is not None:
        values["max_steps"] = args.max_steps
    summary = pretrain(PretrainingArguments(**values))
    model_dir = Path(summary["model_dir"])
    print(
        f"    {summary['global_step']} steps, final loss {summary['final_loss']:.4f} -> {model_dir} "
        f"(TensorBoard logs: {out / 'run' / 'logs'})"
    )

    # ---- 3. embed every field with the frozen encoder, and raw pixel statistics as a baseline
    step(3, "embedding every field (model, and pixel statistics as a baseline)")
    tables = {"model": out / "embeddings" / "model", "pixel_stats": out / "embeddings" / "pixel_stats"}
    embed_dataset(out / "shards", tables["model"], ModelFeaturizer(model_dir))
    embed_dataset(out / "shards", tables["pixel_stats"], PixelStatsFeaturizer())
    for name, table in tables.items():
        print(f"    {name}: {read_embeddings(table).shape[0]} rows -> {table}")

    # ---- 4. evaluate: align on controls, average per perturbation, recall of known relationships
    eval_json = None
    columns = read_embeddings(tables["model"]).columns
    if args.perturbation_col not in columns:
        step(
            4,
            f"evaluation skipped: the embeddings have no {args.perturbation_col} column "
            "(pass --metadata with a perturbation column to evaluate)",
        )
    else:
        step(4, f"evaluating ({args.alignment} alignment, recall of known relationships)")
        options = EvaluateOptions(
            sources=relationships or list(BENCHMARK_SOURCES),
            out=str(out / "evaluation"),
            perturbation_col=args.perturbation_col,
            batch_col=args.batch_col if args.batch_col in columns else None,
            alignment=args.alignment,
        )
        results = evaluate_embeddings(tables["model"], options, baselines={"pixel_stats": tables["pixel_stats"]})
        eval_json = out / "evaluation" / "eval_results.json"
        for source, metrics in results["sources"].items():
            baseline = results["baselines"]["pixel_stats"]["sources"][source]["recall_0.05_0.95"]
            print(
                f"    {source}: recall {metrics['recall_0.05_0.95']:.3f} (pixel statistics {baseline:.3f}, "
                f"chance {results['chance']['recall_0.05_0.95']:.3f})"
            )
        print(f"    -> {eval_json} (+ plots)")

    # ---- 5. model card: README.md written from the folder's own files (config, training, evaluation)
    step(5, "writing the model card")
    readme = write_model_card(model_dir, repo_id=args.repo_id, eval_results=eval_json)
    print(f"    -> {readme}")

    # ---- 6. push: one commit with weights, config, processor, model code and card
    if args.repo_id is None:
        step(6, "not pushed (pass --repo-id ORG/NAME to upload the model folder to the Hub)")
    else:
        step(6, f"pushing {model_dir} to {args.repo_id}")
        commit = push_model_folder(model_dir, args.repo_id, private=args.private)
        print(f"    -> {commit.commit_url}")

    print(f"\nDone in {time.perf_counter() - start:.0f} s. Load the model with:")
    print("    import hf_cellmae; from transformers import AutoModel")
    print(f"    model = AutoModel.from_pretrained({str(args.repo_id or model_dir)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
