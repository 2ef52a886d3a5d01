"""``cellmae embed`` and ``cellmae evaluate``."""

from __future__ import annotations

import argparse
import inspect
import json

from .align import tvn
from .relate import BENCHMARK_SOURCES, MIN_PERTURBATIONS, RECALL_THRESHOLDS

_TVN_DEFAULTS = inspect.signature(tvn).parameters  # the help states tvn's own defaults


def register(subparsers) -> None:
    embed = subparsers.add_parser(
        "embed",
        help="embed fields of view (shards or an image folder) into a Parquet table",
        description="Embed every field of DATA with MODEL (or raw pixel statistics) into Parquet parts in OUT: "
        "Metadata_* columns + one column per feature. Re-running resumes, skipping finished parts.",
    )
    embed.add_argument("model", metavar="MODEL",
                       help="model folder or Hub id; 'pixel_stats' (pixel-statistics baseline) or 'cellprofiler' "
                       "(classical segmentation + CellProfiler measurements with cp-measure)")
    embed.add_argument("data", metavar="DATA", help="shard folder (cellmae shard) or image folder / load_data CSV")
    embed.add_argument("out", metavar="OUT", help="output folder")
    embed.add_argument("--layout", default="auto", help="image folder layout: auto, rxrx, pattern, load_data, stack")
    embed.add_argument("--pattern", default=None, help="file-name regex or preset for --layout pattern")
    embed.add_argument("--metadata", default=None, help="metadata table (CSV/Parquet) joined on plate/well/site")
    embed.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    embed.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    embed.add_argument("--batch-size", type=int, default=64, help="crops per forward pass (default: 64)")
    embed.add_argument("--fields-per-batch", type=int, default=16, help="fields read and embedded together (default: 16)")
    embed.add_argument("--fields-per-part", type=int, default=512, help="fields per output part for image folders")
    embed.add_argument("--crop-mode", default="tile", choices=["tile", "center", "none"],
                       help="tile: average the model-sized crops of each field (default)")
    embed.add_argument("--image-size", type=int, default=None, help="crop size (default: the model's image_size)")
    embed.add_argument("--channelwise", action="store_true", help="one vector per channel, concatenated (= --readout channelwise)")
    embed.add_argument("--readout", default="mean", choices=["mean", "cls", "mean_std", "channelwise"],
                       help="how a crop's tokens become one vector (default: mean of the patch tokens, OpenPhenom's)")
    embed.add_argument("--layer", type=int, default=None,
                       help="read the tokens after this encoder block (1-based, negative from the end; default: the output)")
    cp = embed.add_argument_group("cellprofiler featuriser (MODEL = cellprofiler)")
    cp.add_argument("--nuclei-channel", default=None, help="name of the DNA/Hoechst channel (default: found by name)")
    cp.add_argument("--cell-channels", default=None, help="comma-separated stains filling the cell body (default: all others)")
    cp.add_argument("--feature-set", default="fast", choices=["fast", "full"],
                    help="fast (default): no Zernike, Feret, Costes/RWC/Manders; full: every cp-measure feature")
    cp.add_argument("--nucleus-diameter", type=int, default=None, help="typical nucleus diameter in pixels")
    cp.add_argument("--num-workers", type=int, default=1, help="processes measuring fields (0: all cores)")
    embed.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                       help="a field that cannot be read (bad image, shard field failing its checksum): stop with "
                       "one line naming it (fail, default) or skip it, count it and list it in _embedding_info.json")
    embed.add_argument("--no-progress", action="store_true")
    embed.set_defaults(func=run_embed)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="batch-correct embeddings, aggregate per perturbation, recall known relationships",
        description="Align EMBEDDINGS on control rows (--alignment; 'none' needs no controls), average the rows "
        "of each perturbation into one profile, measure how often known related pairs (--sources) are among the "
        "most similar profiles, and write eval_results.json + PNG plots into --out. Metadata columns are the "
        "table's Metadata_* columns: a metadata table's 'perturbation' column becomes Metadata_perturbation in "
        "`cellmae embed`'s output.",
    )
    evaluate.add_argument("embeddings", metavar="EMBEDDINGS", help="embeddings table (cellmae embed folder, Parquet or CSV)")
    evaluate.add_argument("--out", default=None, help="output folder (default: the EMBEDDINGS path + '_eval')")
    evaluate.add_argument("--sources", nargs="+", default=list(BENCHMARK_SOURCES),
                          help="relationship sources: names in efaar-benchmarking's annotations (pip install efaar-benchmarking) "
                          "or CSV files with columns entity1,entity2 (default: %(default)s)")
    evaluate.add_argument("--synthetic-plate", default=None,
                          help="use this synthetic plate's relationships/*.csv as sources (default: --sources)")
    evaluate.add_argument("--annotations", default=None, help="folder of named sources (default: efaar-benchmarking's)")
    evaluate.add_argument("--perturbation-col", default="Metadata_perturbation",
                          help="column naming what was done to each row (gene, compound...); rows with the same value are "
                          "averaged into one profile and related pairs are looked up by these names (default: %(default)s)")
    evaluate.add_argument("--controls", nargs="+", default=None,
                          help="control labels of the perturbation column, e.g. non-targeting DMSO (default: use --control-col)")
    evaluate.add_argument("--control-col", default=None,
                          help="boolean control column (default: Metadata_is_control if present; needed unless --controls "
                          "is given or --alignment none)")
    evaluate.add_argument("--batch-col", default=None,
                          help="batch column for per-batch alignment, e.g. Metadata_plate (default: one batch)")
    evaluate.add_argument("--alignment", default="tvn", choices=["tvn", "pca_center_scale", "center_scale", "none"],
                          help="batch correction fitted on the controls; none uses no controls (default: %(default)s)")
    evaluate.add_argument("--coral", action="store_true", help="TVN: add the per-batch CORAL step")
    evaluate.add_argument("--coral-eps", type=float, default=None,
                          help=f"TVN + CORAL: ridge added to each batch covariance (default: {_TVN_DEFAULTS['coral_eps'].default})")
    evaluate.add_argument("--no-scale-per-batch", action="store_true",
                          help="TVN: center-scale on all controls at once instead of per batch")
    evaluate.add_argument("--n-components", type=int, default=None,
                          help="tvn / pca_center_scale: principal components of the controls kept (tvn: at most; default: all)")
    evaluate.add_argument("--aggregation", default="mean", choices=["mean", "median"],
                          help="how the rows of a perturbation become its profile (default: %(default)s)")
    evaluate.add_argument("--thresholds", nargs="+", default=[f"{lo},{hi}" for lo, hi in RECALL_THRESHOLDS], metavar="LO,HI",
                          help="recall counts a related pair whose similarity is below the LO or above the HI quantile of "
                          "all pairs (default: %(default)s)")
    evaluate.add_argument("--min-perturbations", type=int, default=MIN_PERTURBATIONS,
                          help="fewest perturbation profiles accepted for a meaningful null (default: %(default)s)")
    evaluate.add_argument("--baseline", nargs=2, action="append", metavar=("NAME", "TABLE"), default=[],
                          help="also evaluate a baseline table (repeatable), e.g. --baseline pixel_stats px/ (default: none)")
    evaluate.add_argument("--null-samples", type=int, default=None,
                          help="sample a null of this many pairs, for large maps (default: every pair)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the sampled null and the suite (default: %(default)s)")
    evaluate.add_argument("--skip-unusable", action="store_true", help="skip (and report) sources without usable pairs")
    evaluate.add_argument("--dataset", default=None, help="dataset name for the report (default: the EMBEDDINGS file name)")
    suite = evaluate.add_argument_group("the rest of the paper's suite (model and every baseline side by side)")
    suite.add_argument("--probe", nargs="+", default=[], metavar="COLUMN",
                       help="linear probe + kNN of these metadata columns, leave one plate out, e.g. complex gene (default: none)")
    suite.add_argument("--consistency-col", default=None,
                       help="per-perturbation group column for consistency mAP, e.g. Metadata_complex (default: none)")
    suite.add_argument("--cellprofiler", default=None, metavar="TABLE",
                       help="CellProfiler features of the same fields (cellmae embed cellprofiler ...): report "
                       "ridge R² of predicting them (default: a --baseline named cellprofiler)")
    suite.add_argument("--no-suite", action="store_true", help="only the known-relationship recall")
    evaluate.add_argument("--no-plots", action="store_true", help="write eval_results.json only")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=run_evaluate)


def _looks_like_a_local_path(model: str) -> bool:
    """A path the user means on this machine (not a Hub id ``org/name``): absolute, ./ ../ ~, or deeper than org/name."""
    return model.startswith(("/", ".", "~")) or model.endswith("/") or model.count("/") > 1


def run_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UserError
    from .embed import ModelFeaturizer, PixelStatsFeaturizer, embed_dataset

    if args.model not in ("pixel_stats", "cellprofiler") and _looks_like_a_local_path(args.model) \
            and not Path(args.model).expanduser().exists():
        raise UserError(
            f"model folder {args.model} does not exist; pass the model/ folder a `cellmae pretrain` run wrote "
            "(RUN/model), a converted folder, or a Hub id org/name"
        )

    if args.model == "pixel_stats":
        featurizer = PixelStatsFeaturizer()
    elif args.model == "cellprofiler":
        from .cellprofiler import CellProfilerFeaturizer

        featurizer = CellProfilerFeaturizer(
            nuclei_channel=args.nuclei_channel, feature_set=args.feature_set, nucleus_diameter=args.nucleus_diameter,
            cell_channels=args.cell_channels.split(",") if args.cell_channels else None, num_workers=args.num_workers,
        )
    else:
        featurizer = ModelFeaturizer(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                     crop_mode=args.crop_mode, channelwise=args.channelwise, image_size=args.image_size,
                                     readout=args.readout, layer=args.layer)
    info = embed_dataset(args.data, args.out, featurizer, layout=args.layout, pattern=args.pattern,
                         metadata=args.metadata, fields_per_batch=args.fields_per_batch,
                         fields_per_part=args.fields_per_part, progress=not args.no_progress, on_error=args.on_error)
    print(f"embed: {info['num_rows']} fields in {len(info['parts'])} parts -> {args.out}")
    if getattr(featurizer, "empty_fields", 0):
        print(f"embed: {featurizer.empty_fields} field(s) had no segmented nucleus (all-zero features, "
              "Metadata_num_crops 0); check --nuclei-channel / --nucleus-diameter")
    return 0


def _thresholds(values: list[str]) -> list[tuple[float, float]]:
    """``["0.05,0.95", ...]`` -> ``[(0.05, 0.95), ...]``; a malformed pair is a one-line error."""
    pairs = []
    for value in values:
        try:
            lo, hi = (float(part) for part in value.split(","))
        except ValueError:
            raise ValueError(f"--thresholds {value!r} is not a pair LO,HI of quantiles; write e.g. 0.05,0.95") from None
        pairs.append((lo, hi))
    return pairs


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .relate import relationship_source_file
    from .report import RESULTS_NAME, evaluate_embeddings, relationship_files

    sources = relationship_files(args.synthetic_plate) if args.synthetic_plate else args.sources
    align_options = {}
    if args.coral:
        align_options["coral"] = True
    if args.n_components is not None:
        align_options["n_components"] = args.n_components
    if args.coral_eps is not None:
        align_options["coral_eps"] = args.coral_eps
    if args.no_scale_per_batch:
        align_options["scale_per_batch"] = False
    out = Path(args.out) if args.out else Path(str(Path(args.embeddings)).rstrip("/") + "_eval")
    named = sources if isinstance(sources, dict) else {Path(s).stem if Path(s).suffix else s: s for s in sources}
    for name, source in named.items():  # a source may be any path (`--sources ../../x.csv`): say which file is read
        print(f"evaluate: relationship source {name} read from {relationship_source_file(source, args.annotations)}")
    results = evaluate_embeddings(
        args.embeddings, sources, out_dir=out, dataset=args.dataset, baselines=dict(args.baseline),
        perturbation_col=args.perturbation_col, controls=args.controls, control_col=args.control_col,
        batch_col=args.batch_col, alignment=args.alignment, aggregation=args.aggregation, align_options=align_options,
        thresholds=_thresholds(args.thresholds), min_perturbations=args.min_perturbations,
        null_samples=args.null_samples, seed=args.seed, on_unusable="skip" if args.skip_unusable else "raise",
        annotations=args.annotations, plots=not args.no_plots, progress=not args.no_progress,
        suite=not args.no_suite, probe_labels=args.probe, consistency_col=args.consistency_col,
        cellprofiler=args.cellprofiler,
    )
    print(f"evaluate: {results['n_perturbations']} perturbations, alignment {results['alignment']}")
    for name, metrics in results["sources"].items():
        cells = "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("recall"))
        print(f"  {name:<12} {cells}  (query {metrics['query_size']}, null {metrics['null_size']})")
    print(f"  chance       {json.dumps(results['chance'])}")
    if "suite" in results:
        from .suite import suite_rows

        rows = suite_rows(results["suite"])
        metrics = list(dict.fromkeys(m for row in rows.values() for m in row))
        print("evaluate: the suite (model and baselines)")
        for metric in metrics:
            cells = "  ".join(f"{name}={row[metric]:.3f}" for name, row in rows.items() if metric in row)
            print(f"  {metric:<28} {cells}")
    print(f"evaluate: wrote {out / RESULTS_NAME}")
    return 0
