"""``cellmae shard`` and ``cellmae synthetic``: the data stage's command-line entry points."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..options import add_dataclass_options, options_from_namespace
from .shards import ShardOptions
from .synthetic import SCREEN_SIZES, SyntheticScreenConfig

# `cellmae synthetic` flags -> (SyntheticScreenConfig field, help); defaults come from the dataclass.
SYNTHETIC_OPTIONS = {
    "--plates": ("num_plates", "plates, one batch each"),
    "--field-size": ("field_size", "field side in pixels"),
    "--sites": ("sites_per_well", "sites per well"),
    "--bit-depth": ("bit_depth", "PNG bit depth"),
    "--effect-size": ("effect_size", "phenotype strength (log units)"),
    "--penetrance": ("penetrance", "fraction of cells showing the phenotype"),
    "--cell-variability": ("cell_variability", "cell-to-cell variation"),
    "--batch-effect": ("batch_effect", "plate gain/illumination effect"),
    "--noise": ("noise", "camera read noise"),
    "--seed": ("seed", "seed"),
    "--pooled-wells": ("pooled_wells_per_plate", "--pooled: wells per plate, each holding the whole library"),
    "--pooled-control-fraction": ("pooled_control_fraction", "--pooled: fraction of cells carrying a control guide"),
}


def _shard(args: argparse.Namespace) -> int:
    from .shards import shard_folder

    options = options_from_namespace(ShardOptions, args)
    if options.merge:
        from .shards import merge_parts

        if options.part:
            raise UserError("--merge and --part go on different runs: --part I/N on each machine, then --merge once")
        manifest = merge_parts(args.output_dir)
        print(
            f"merged the parts' manifests: {manifest['num_fields']} fields in {manifest['num_shards']} shard(s) "
            f"-> {args.output_dir}/manifest.json"
        )
        return 0
    if options.part:
        from .shards import parse_part

        parse_part(options.part)  # a malformed --part is refused before any image is read
    manifest = shard_folder(args.input, args.output_dir, options)
    if "part" in manifest:
        index, count = manifest["part"]
        written = sum(shard["num_fields"] for shard in manifest["shards"])
        print(
            f"part {index}/{count}: wrote {written} fields into {len(manifest['shards'])} of the plan's "
            f"{manifest['num_shards_in_plan']} shard(s) in {args.output_dir} ({manifest['shards_reused']} reused)"
        )
        if "merged" not in manifest:
            print(
                f"part {index}/{count}: the last part to finish writes manifest.json (or run `cellmae shard ... --merge`)"
            )
            return 0
        manifest = manifest["merged"]
        print(f"part {index}/{count}: every part is done; merged their manifests into {args.output_dir}/manifest.json")
    print(
        f"wrote {manifest['num_fields']} fields ({', '.join(manifest['channels'])}; {manifest['dtypes']}) into "
        f"{manifest['num_shards']} shard(s) in {args.output_dir} ({manifest['shards_reused']} reused from an earlier run)"
    )
    if manifest["num_skipped"]:
        print(
            f"skipped {manifest['num_skipped']} input(s) (listed in {args.output_dir}/manifest.json under 'skipped'):"
        )
        for problem in manifest["skipped"][:20]:
            where = ", ".join(part for part in (problem["file"], problem["field"]) if part)
            print(f"  - {problem['reason']} ({where})")
    if options.verify:
        print("verified: every shard re-read, checksums match")
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_screen

    defaults = SyntheticScreenConfig()  # a flag left at its default keeps the --size's value
    given = {
        name: getattr(args, name)
        for name, _ in SYNTHETIC_OPTIONS.values()
        if getattr(args, name) != getattr(defaults, name)
    }
    result = make_synthetic_screen(
        args.output_dir,
        config=SyntheticScreenConfig(**SCREEN_SIZES[args.size]),
        num_workers=args.num_workers,
        progress=not args.quiet,
        pooled=args.pooled,
        **given,
    )
    print(
        f"wrote {result['num_fields']} synthetic fields ({', '.join(result['channels'])}, {args.bit_depth}-bit) to "
        f"{args.output_dir}; metadata: {result['metadata']}; relationships: {', '.join(result['relationships'].values())}"
    )
    if args.pooled:
        print(
            f"pooled: {result['num_cells']} cells, each with its own perturbation; barcode read-out: {result['cells']} "
            "(plate, well, site, cell_id, centroid_y, centroid_x, perturbation, ...)"
        )
    print(
        f"next: cellmae shard {result['images']} SHARD_DIR --layout rxrx --metadata {result['metadata']} "
        f"--channels {','.join(f'w{index}={name}' for index, name in enumerate(result['channels'], start=1))}"
    )
    return 0


def register(subparsers) -> None:
    """Add the ``shard`` and ``synthetic`` sub-commands to the ``cellmae`` parser."""
    shard = subparsers.add_parser(
        "shard",
        help="write plate images into streaming shards (Parquet + manifest)",
        description="Discover fields of view under INPUT, join a metadata table, and write Parquet shards that "
        "hf_cellmae.data.streaming.stream_fields streams. Re-runs reuse finished shards.",
    )
    shard.add_argument(
        "input",
        help="input folder or load_data CSV (--layout load_data); local or a URL (s3://bucket/plate/, "
        "gs://, az://, hf://; see --storage-options)",
    )
    shard.add_argument("output_dir", help="shard folder to write")
    add_dataclass_options(shard, ShardOptions)
    shard.set_defaults(func=_shard)

    synthetic = subparsers.add_parser(
        "synthetic",
        help="render a synthetic Cell Painting screen with known gene relationships",
        description="Render plates of synthetic 5-channel fields (RxRx layout), metadata.csv and the true "
        "relationships (relationships/*.csv, entity1,entity2). Deterministic from --seed.",
    )
    synthetic.add_argument("output_dir", help="folder to write")
    knobs = SyntheticScreenConfig()  # the one place the screen's defaults live
    for flag, (name, help_text) in SYNTHETIC_OPTIONS.items():
        default = getattr(knobs, name)
        synthetic.add_argument(
            flag,
            dest=name,
            type=type(default),
            default=default,
            choices=(8, 16) if name == "bit_depth" else None,
            help=f"{help_text} (default {default})",
        )
    synthetic.add_argument(
        "--size",
        choices=list(SCREEN_SIZES),
        default="demo",
        help="demo: 24 genes, 6 complexes, 3 pathways, 2 plates; screen: 240 genes, 30 complexes, "
        "10 pathways, 4 plates (the other flags change the rest; default demo)",
    )
    synthetic.add_argument(
        "--pooled",
        action="store_true",
        help="a pooled screen: every cell carries its own perturbation (a guide read from a barcode); "
        "writes cells.csv, the per-cell read-out, beside metadata.csv (default: arrayed, one per well)",
    )
    synthetic.add_argument("--num-workers", type=int, default=None, help="processes (default: all cores)")
    synthetic.add_argument("--quiet", action="store_true", help="no progress bar")
    synthetic.set_defaults(func=_synthetic)
