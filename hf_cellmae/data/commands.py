"""``cellmae shard`` and ``cellmae synthetic``: the data stage's command-line entry points."""

from __future__ import annotations

import argparse

from .layouts import LAYOUTS, PATTERN_PRESETS
from .problems import ON_ERROR_CHOICES
from .shards import MAX_SKIPPED_SHARE, MIN_FIELD_SIZE
from .synthetic import SyntheticScreenConfig

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
}


def _shard(args: argparse.Namespace) -> int:
    from .shards import shard_folder

    manifest = shard_folder(
        args.input,
        args.output_dir,
        layout=args.layout,
        pattern=args.pattern,
        channel_names=args.channels,
        metadata=args.metadata,
        on_error=args.on_error,
        max_skipped_share=args.max_skipped_share,
        min_field_size=args.min_field_size,
        verify=args.verify,
        progress=not args.quiet,
        target_shard_size=args.shard_size,
        fields_per_row_group=args.fields_per_row_group,
        compression=args.compression,
        num_workers=args.num_workers,
        shuffle=not args.no_shuffle,
        seed=args.seed,
    )
    print(
        f"wrote {manifest['num_fields']} fields ({', '.join(manifest['channels'])}; {manifest['dtypes']}) into "
        f"{manifest['num_shards']} shard(s) in {args.output_dir} ({manifest['shards_reused']} reused from an earlier run)"
    )
    if manifest["num_skipped"]:
        print(f"skipped {manifest['num_skipped']} input(s) (listed in {args.output_dir}/manifest.json under 'skipped'):")
        for problem in manifest["skipped"][:20]:
            where = ", ".join(part for part in (problem["file"], problem["field"]) if part)
            print(f"  - {problem['reason']} ({where})")
    if args.verify:
        print("verified: every shard re-read, checksums match")
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_screen

    result = make_synthetic_screen(
        args.output_dir,
        num_workers=args.num_workers,
        progress=not args.quiet,
        **{name: getattr(args, name) for name, _ in SYNTHETIC_OPTIONS.values()},
    )
    print(
        f"wrote {result['num_fields']} synthetic fields ({', '.join(result['channels'])}, {args.bit_depth}-bit) to "
        f"{args.output_dir}; metadata: {result['metadata']}; relationships: {', '.join(result['relationships'].values())}"
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
    shard.add_argument("input", help="input folder, or a CellProfiler load_data CSV (--layout load_data)")
    shard.add_argument("output_dir", help="shard folder to write")
    shard.add_argument("--layout", choices=LAYOUTS, default="auto", help="how images are laid out (default: detect)")
    shard.add_argument(
        "--pattern",
        help=f"regex with named groups (channel, plate, well or row+col, site) or a preset: {', '.join(PATTERN_PRESETS)}",
    )
    shard.add_argument(
        "--channels",
        help="the stain of each file channel, as FILE_TOKEN=NAME (e.g. w1=AGP,w2=DNA,w3=ER,w4=Mito,w5=RNA for JUMP); "
        "default: the names a per-file --metadata table gives (column compartment/channel_name/stain), else the tokens. "
        "Plain names (DNA,ER,...) are taken in file-token order and refused when the metadata says otherwise",
    )
    shard.add_argument("--metadata", help="CSV/TSV/Parquet table joined on plate/well(/site)")
    shard.add_argument("--shard-size", default="256MB", help="target pixel bytes per shard (default 256MB)")
    shard.add_argument("--fields-per-row-group", type=int, default=8, help="fields per Parquet row group (default 8)")
    shard.add_argument("--compression", default="none", help="Parquet codec: none (fastest to stream), zstd, snappy...")
    shard.add_argument("--num-workers", type=int, default=None, help="processes reading images (default: all cores)")
    shard.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="skip", help="skip and count bad inputs, or fail on the first")
    shard.add_argument(
        "--max-skipped-share", type=float, default=MAX_SKIPPED_SHARE,
        help=f"fail (after writing the manifest) when more than this share of fields is skipped, or none written (default {MAX_SKIPPED_SHARE})",
    )
    shard.add_argument(
        "--min-field-size", type=int, default=MIN_FIELD_SIZE,
        help=f"skip fields narrower or shorter than this many pixels; set it to your crop size (default {MIN_FIELD_SIZE})",
    )
    shard.add_argument("--verify", action="store_true", help="re-read every shard and check checksums afterwards")
    shard.add_argument("--no-shuffle", action="store_true", help="keep the discovery order instead of mixing fields across shards")
    shard.add_argument("--seed", type=int, default=0, help="seed of the order of fields across shards")
    shard.add_argument("--quiet", action="store_true", help="no progress bars")
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
        synthetic.add_argument(flag, dest=name, type=type(default), default=default, choices=(8, 16) if name == "bit_depth" else None,
                               help=f"{help_text} (default {default})")
    synthetic.add_argument("--num-workers", type=int, default=None, help="processes (default: all cores)")
    synthetic.add_argument("--quiet", action="store_true", help="no progress bar")
    synthetic.set_defaults(func=_synthetic)
