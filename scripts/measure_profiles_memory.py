"""Peak memory of ``cellmae profiles`` on a large embeddings table: it should stay well below the table's size.

Writes a synthetic ``cellmae embed``-like folder (``--rows`` fields x ``--features`` float32 columns, 9 fields per
well, parts of ``--rows-per-part`` rows, in well order as ``cellmae embed`` writes them), then in a fresh process
each: ``cellmae profiles`` (mean, then median) and, for comparison, reading the whole table into pandas (what
``cellmae evaluate`` does). Prints each run's peak resident memory (``ru_maxrss``) and wall time.

    python scripts/measure_profiles_memory.py [--rows 1000000] [--features 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from _bench import peak_mib_of, report_peak_and_exit  # scripts/_bench.py: the peak memory of every measurement

FIELDS_PER_WELL = 9
WELLS_PER_PLATE = 384


def write_table(folder: Path, rows: int, features: int, rows_per_part: int) -> None:
    """``rows`` fields of random float32 features in parts; one well in 8 of each plate is a control."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, start in enumerate(range(0, rows, rows_per_part)):
        index = np.arange(start, min(start + rows_per_part, rows))
        well = index // FIELDS_PER_WELL
        columns = {
            "Metadata_plate": pa.array([f"P{p:04d}" for p in well // WELLS_PER_PLATE]),
            "Metadata_well": pa.array([f"W{w:03d}" for w in well % WELLS_PER_PLATE]),
            "Metadata_site": pa.array(index % FIELDS_PER_WELL + 1),
            "Metadata_perturbation": pa.array(
                np.where(well % 8 == 0, "ctrl", np.char.add("g", (well % 500).astype(str)))
            ),
        }
        values = rng.standard_normal((len(index), features), dtype=np.float32)
        columns.update({f"emb_{i:04d}": pa.array(values[:, i]) for i in range(features)})
        pq.write_table(pa.table(columns), folder / f"part-{part:05d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--rows-per-part", type=int, default=50_000)
    parser.add_argument("--workdir", help="keep the table here (default: a temporary folder)")
    if sys.argv[1:2] == ["--one"]:  # the measured child: nothing else in this process
        one, code = sys.argv[2:], 0
        if one[0] == "pandas":
            from hf_cellmae.evaluation.report import read_embeddings

            print(f"rows {len(read_embeddings(one[1]))}")
        else:
            from hf_cellmae.cli import main as cli

            code = cli(
                [
                    "profiles",
                    *one,
                    "--no-progress",
                    "--controls",
                    "ctrl",
                    "--alignment",
                    "center_scale",
                    "--batch-col",
                    "Metadata_plate",
                    "--perturbations",
                ]
            )
        report_peak_and_exit(code)
    args = parser.parse_args()

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cellmae-profiles-mem-"))
    table = workdir / f"emb-{args.rows}x{args.features}"
    try:
        if not table.is_dir():
            write_table(table, args.rows, args.features, args.rows_per_part)
        size = args.rows * args.features * 4 / 2**20
        print(
            f"cellmae profiles on {args.rows:,} fields x {args.features} float32 features "
            f"({size:.0f} MiB of features, {args.rows // FIELDS_PER_WELL:,} wells), one process each"
        )
        runs = {
            "profiles, mean": [str(table), str(workdir / "mean")],
            "profiles, median": [str(table), str(workdir / "median"), "--aggregation", "median"],
            "whole table in pandas": ["pandas", str(table)],
        }
        for name, one in runs.items():
            peak, _, seconds = peak_mib_of([sys.executable, __file__, "--one", *one])
            print(f"{name:>22}: peak {peak:7.1f} MiB, {seconds:6.1f} s")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
