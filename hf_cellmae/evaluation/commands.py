"""``cellmae embed``, ``cellmae evaluate``, ``cellmae profiles`` and ``cellmae annotations``."""

from __future__ import annotations

import argparse
import json

from ..options import add_dataclass_options, options_from_namespace
from .annotations import ANNOTATION_FILES, EFAAR_WHEEL, cached_annotations_dir
from .options import EmbedOptions, EvaluateOptions, ProfilesOptions


def register(subparsers) -> None:
    embed = subparsers.add_parser(
        "embed",
        help="embed fields of view (shards or an image folder) into a Parquet table",
        description="Embed every field of DATA with MODEL (or raw pixel statistics) into Parquet parts in OUT: "
        "Metadata_* columns + one column per feature. Re-running resumes, skipping finished parts.",
    )
    embed.add_argument(
        "model",
        metavar="MODEL",
        help="model folder or Hub id; 'pixel_stats' (pixel-statistics baseline) or 'cellprofiler' "
        "(classical segmentation + CellProfiler measurements with cp-measure)",
    )
    embed.add_argument("data", metavar="DATA", help="shard folder (cellmae shard) or image folder / load_data CSV")
    embed.add_argument("out", metavar="OUT", help="output folder")
    add_dataclass_options(embed, EmbedOptions)
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
    evaluate.add_argument(
        "embeddings", metavar="EMBEDDINGS", help="embeddings table (cellmae embed folder, Parquet or CSV)"
    )
    add_dataclass_options(evaluate, EvaluateOptions)
    evaluate.add_argument(
        "--baseline",
        nargs=2,
        action="append",
        metavar=("NAME", "TABLE"),
        default=[],
        help="also evaluate a baseline table (repeatable), e.g. --baseline pixel_stats px/ (default: none)",
    )
    evaluate.set_defaults(func=run_evaluate)

    profiles = subparsers.add_parser(
        "profiles",
        help="write batch-corrected well (and perturbation) profiles for pycytominer, copairs, scanpy",
        description="Average the fields of each well of EMBEDDINGS (streamed part by part), align the wells on the "
        "control wells (the alignment options of `cellmae evaluate`, per --batch-col value), optionally average the "
        "wells of each perturbation, and write OUT/well_profiles.parquet (and perturbation_profiles.parquet): "
        "Metadata_* columns + one column per feature; --format h5ad writes AnnData files (obs = metadata, X = features).",
    )
    profiles.add_argument(
        "embeddings", metavar="EMBEDDINGS", help="embeddings table (cellmae embed folder, Parquet or CSV)"
    )
    profiles.add_argument("out", metavar="OUT", help="output folder")
    add_dataclass_options(profiles, ProfilesOptions)
    profiles.set_defaults(func=run_profiles)

    annotations = subparsers.add_parser(
        "annotations",
        help="fetch the recall benchmark's gene-relationship files (CORUM, HuMAP, Reactome, SIGNOR, StringDB)",
        description="Download efaar-benchmarking 1.0's wheel with `pip download --no-deps` (none of its heavy "
        "dependencies), check each file's SHA-256 and extract the relationship lists into the cache, where "
        "`cellmae evaluate` finds them. Prints the folder. Licences differ per file (CORUM and SIGNOR: "
        "CC-BY-NC 4.0); read the LICENSE file next to them.",
    )
    annotations.add_argument(
        "--wheel", default=None, help=f"read this downloaded {EFAAR_WHEEL} instead of running pip download"
    )
    annotations.add_argument("--dest", default=None, help=f"folder to write (default: {cached_annotations_dir()})")
    annotations.set_defaults(func=run_annotations)


def _looks_like_a_local_path(model: str) -> bool:
    """A path the user means on this machine (not a Hub id ``org/name``): absolute, ./ ../ ~, or deeper than org/name."""
    return model.startswith(("/", ".", "~")) or model.endswith("/") or model.count("/") > 1


def run_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.channels import parse_channels_option
    from ..errors import UserError
    from .embed import ModelFeaturizer, PixelStatsFeaturizer, embed_dataset, parse_part, process_state

    options = options_from_namespace(EmbedOptions, args)
    parse_part(options.part)  # a malformed --part fails before the model loads
    parse_channels_option(options.channels)  # and so does a malformed --channels
    if (
        args.model not in ("pixel_stats", "cellprofiler")
        and _looks_like_a_local_path(args.model)
        and not Path(args.model).expanduser().exists()
    ):
        raise UserError(
            f"model folder {args.model} does not exist; pass the model/ folder a `cellmae pretrain` run wrote "
            "(RUN/model), a converted folder, or a Hub id org/name"
        )

    if args.model == "pixel_stats":
        featurizer = PixelStatsFeaturizer()
    elif args.model == "cellprofiler":
        from .cellprofiler import CellProfilerFeaturizer

        featurizer = CellProfilerFeaturizer(
            nuclei_channel=options.nuclei_channel,
            feature_set=options.feature_set,
            nucleus_diameter=options.nucleus_diameter,
            cell_channels=options.cell_channels.split(",") if options.cell_channels else None,
            num_workers=options.measure_workers,
        )
    else:
        featurizer = ModelFeaturizer.from_options(args.model, options)
    if options.single_cell:
        from .single_cell import CellOptions, SingleCellFeaturizer

        if not isinstance(featurizer, ModelFeaturizer):
            raise UserError(f"--single-cell embeds cells with a CA-MAE model; MODEL is {args.model!r}")
        featurizer = SingleCellFeaturizer(featurizer, CellOptions.from_options(options))
    elif options.masks is not None:
        raise UserError("--masks gives the cells of --single-cell; add --single-cell (or drop --masks)")
    state = process_state()  # under `accelerate launch`: joins the process group, so each process embeds its share
    try:
        info = embed_dataset(args.data, args.out, featurizer, options)
    finally:
        if state.use_distributed:
            # Destroyed while the interpreter still runs (left to its teardown, gloo can abort the ranks at exit).
            state.destroy_process_group()
    if not state.is_main_process:
        return 0
    if info.get("complete") is False:
        return 0  # the share's own line was printed; the last share writes the info
    rows = "cells" if options.single_cell else "fields"
    print(f"embed: {info['num_rows']} {rows} in {len(info['parts'])} parts -> {args.out}")
    if getattr(featurizer, "empty_fields", 0):
        print(
            f"embed: {featurizer.empty_fields} field(s) had no segmented nucleus (all-zero features, "
            "Metadata_num_crops 0); check --nuclei-channel / --nucleus-diameter"
        )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .relate import relationship_source_file
    from .report import RESULTS_NAME, evaluate_embeddings, relationship_files

    options = options_from_namespace(EvaluateOptions, args)
    sources = relationship_files(options.synthetic_plate) if options.synthetic_plate else options.sources
    options.out = options.out or str(Path(str(Path(args.embeddings)).rstrip("/") + "_eval"))
    options.recall_thresholds()  # a malformed --thresholds fails before any work
    out = Path(options.out)
    named = sources if isinstance(sources, dict) else {Path(s).stem if Path(s).suffix else s: s for s in sources}
    for name, source in named.items():  # a source may be any path (`--sources ../../x.csv`): say which file is read
        print(
            f"evaluate: relationship source {name} read from {relationship_source_file(source, options.annotations)}"
        )
    embeddings, baselines, well_cols = args.embeddings, dict(args.baseline), None
    if options.cells:  # single-cell tables -> one row per (well, perturbation), written next to the results
        embeddings = _cell_groups(embeddings, out, options)
        baselines = {name: _cell_groups(table, out / "baselines" / name, options) for name, table in baselines.items()}
        options.dataset = options.dataset or Path(args.embeddings).stem
        well_cols = ("Metadata_plate", "Metadata_well", options.perturbation_col)  # a pooled well holds them all
    results = evaluate_embeddings(embeddings, options, baselines=baselines, well_cols=well_cols)
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


def _cell_groups(embeddings, out, options) -> str:
    """``--cells``: label the single-cell table ``embeddings`` from the read-out and aggregate it per (well,
    perturbation) into ``out/cell_groups.parquet``; the path."""
    from .cells import cells_to_groups

    print(f"cells: {embeddings}")
    path, _ = cells_to_groups(embeddings, out, options)
    return str(path)


def run_profiles(args: argparse.Namespace) -> int:
    from .profiles import write_profiles

    options = options_from_namespace(ProfilesOptions, args)
    embeddings = args.embeddings
    if options.cells:  # one row per (well, perturbation) of labelled cells; a "well" is then that group
        from pathlib import Path

        embeddings = _cell_groups(embeddings, Path(args.out), options)
        options.well_cols = [*options.well_cols, options.perturbation_col]
    info = write_profiles(embeddings, args.out, options)
    print(
        f"profiles: {info['n_fields']} fields -> {info['n_wells']} wells ({info['n_control_wells']} control), "
        f"alignment {options.alignment}"
        + (f" -> {info['n_perturbations']} perturbations" if options.perturbations else "")
    )
    for column, why in info["left_out_columns"].items():
        print(f"profiles: left out {column} ({why})")
    for name in info["files"].values():
        print(f"profiles: wrote {args.out.rstrip('/')}/{name}")
    return 0


def run_annotations(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .annotations import fetch_annotations, installed_annotations_dir

    installed = installed_annotations_dir()
    if args.wheel is None and args.dest is None and installed is not None and installed.is_dir():
        print(f"annotations: efaar_benchmarking is installed; `cellmae evaluate` reads {installed}")
        return 0
    folder = fetch_annotations(wheel=args.wheel, dest=args.dest)
    print(
        f"annotations: {len(ANNOTATION_FILES) - 1} files checked in {folder} "
        f"(licences: {folder / 'LICENSE'}; CORUM and SIGNOR are CC-BY-NC 4.0)"
    )
    if args.dest is not None and Path(args.dest).expanduser() != cached_annotations_dir():
        print(f"annotations: pass --annotations {folder} to `cellmae evaluate`")
    return 0
