"""Peak memory of ``cellmae embed`` against the number of fields: it should stay flat.

Writes ``--fields`` small RxRx-layout fields (and shards them), then runs ``cellmae embed`` on the image folder and
on the shard folder in a fresh process each, and prints each run's peak resident memory (``ru_maxrss``) of the
main process and of its largest DataLoader worker (the default worker count of this machine).

    python scripts/measure_embed_memory.py [--fields 100 2000] [--model pixel_stats|tiny] [--workdir DIR]

``--model tiny`` embeds with an untrained ``CellMAEConfig.from_preset("tiny")`` model (torch loaded, as in real use).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from _bench import peak_mib_of, report_peak_and_exit  # scripts/_bench.py: the peak memory of every measurement

FIELD_SIZE = 64
CHANNELS = 3


def write_fields(root: Path, count: int) -> None:
    """``count`` random 3 x 64 x 64 uint16 fields as 16-bit PNGs, 384 per plate."""
    import imagecodecs

    rng = np.random.default_rng(0)
    for index in range(count):
        plate, well = index // 384 + 1, index % 384
        name = f"{'ABCDEFGHIJKLMNOP'[well // 24]}{well % 24 + 1:02d}_s1"
        folder = root / "exp" / f"Plate{plate}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 4000, size=(CHANNELS, FIELD_SIZE, FIELD_SIZE), dtype=np.uint16)
        for c in range(CHANNELS):
            (folder / f"{name}_w{c + 1}.png").write_bytes(imagecodecs.png_encode(pixels[c], level=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fields", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--model", default="pixel_stats", help="pixel_stats, or tiny (an untrained tiny CA-MAE)")
    parser.add_argument("--input", choices=["images", "shards", "both"], default="both")
    parser.add_argument("--workdir", help="keep the inputs here (default: a temporary folder)")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the measured child: nothing else in this process; its largest child is a DataLoader worker
        from hf_cellmae.cli import main as cli

        report_peak_and_exit(cli(["embed", *args.one, "--no-progress", "--fields-per-part", "256"]))

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cellmae-embed-mem-"))
    try:
        model = args.model
        if model == "tiny":
            from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

            model = str(workdir / "tiny")
            CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", image_size=FIELD_SIZE)).save_pretrained(model)
        from hf_cellmae.data.shards import shard_folder

        print(f"cellmae embed {args.model}, {CHANNELS} x {FIELD_SIZE} x {FIELD_SIZE} uint16 fields, one process each")
        for count in args.fields:
            images, shards = workdir / f"images-{count}", workdir / f"shards-{count}"
            if not images.is_dir():
                write_fields(images, count)
            kinds = ["images", "shards"] if args.input == "both" else [args.input]
            for kind in kinds:
                data = images
                if kind == "shards":
                    if not shards.is_dir():
                        shard_folder(
                            images, shards, layout="rxrx", num_workers=1, progress=False, target_shard_size="4MB"
                        )
                    data = shards
                out = workdir / f"emb-{kind}-{count}"
                shutil.rmtree(out, ignore_errors=True)
                peak, worker, _ = peak_mib_of([sys.executable, __file__, "--one", model, str(data), str(out)])
                print(
                    f"{kind:>6}, {count:5d} fields: peak {peak:7.1f} MiB (main process), {worker:7.1f} MiB (largest worker)"
                )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
