"""Evaluation-stage benchmarks; prints figures.

1. Known-relationship recall on 20,000 perturbations x 384 dims against all five efaar sources
   (target <= 30 s on 2 cores; the full null is 2e8 cosines computed in row blocks into one buffer).
2. Peak memory of `cellmae embed` (tiny model) on N and 10 N fields: it should stay flat.

    python3 scripts/benchmark_eval.py [--perturbations 20000] [--dim 384] [--fields 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import peak_mib_of, report_peak_and_exit  # scripts/_bench.py: the peak memory of every measurement


def benchmark_recall(n: int, dim: int) -> None:
    from hf_cellmae.evaluation.relate import BENCHMARK_SOURCES, known_relationship_recall, load_relationships

    genes = []
    for source in BENCHMARK_SOURCES:
        pairs = load_relationships(source)
        genes += pairs.entity1.tolist() + pairs.entity2.tolist()
    genes = list(dict.fromkeys(genes))[:n]
    labels = genes + [f"UNANNOTATED_{i}" for i in range(n - len(genes))]
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    start = time.perf_counter()
    result = known_relationship_recall(vectors, labels, BENCHMARK_SOURCES, progress=False)
    seconds = time.perf_counter() - start
    print(
        f"recall: {n} perturbations x {dim} dims (float32), {len(BENCHMARK_SOURCES)} sources, "
        f"null {result['null']['size']:,} pairs: {seconds:.1f} s (includes reading the 5 pair files)"
    )
    for name, metrics in result["sources"].items():
        print(
            f"  {name:<9} query {metrics['query_size']:>6}  recall@.05/.95 {metrics['recall_0.05_0.95']:.3f}  "
            f"recall@.10/.90 {metrics['recall_0.10_0.90']:.3f}  (random vectors: chance 0.10 / 0.20)"
        )
    start = time.perf_counter()
    known_relationship_recall(vectors, labels, BENCHMARK_SOURCES, null_samples=1_000_000, progress=False)
    print(f"recall with a sampled null of 1e6 pairs: {time.perf_counter() - start:.1f} s")


def _write_fields(root: Path, count: int, size: int = 128) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    for k in range(count):
        well = f"{'ABCDEFGHIJKLMNOP'[k // 24 % 16]}{k % 24 + 1:02d}"
        for channel in range(1, 6):
            plate = f"plate{k // 384 + 1}"
            tifffile.imwrite(
                root / f"{plate}_{well}_site1_Ch{channel}.tif", rng.integers(0, 4000, (size, size), dtype=np.uint16)
            )


def _peak_rss_of_embed(model: Path, data: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time of `cellmae embed` run in its own process (this script's `--one` mode): the
    larger of its main process and its largest DataLoader worker."""
    embed = ["embed", str(model), str(data), str(out), "--fields-per-part", "16", "--no-progress"]
    main_mib, worker_mib, seconds = peak_mib_of([sys.executable, __file__, "--one", *embed])
    return max(main_mib, worker_mib), seconds


def benchmark_embed_memory(fields: int) -> None:
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        CellMAEForPreTraining(CellMAEConfig.from_preset("tiny")).save_pretrained(model)
        print("embed peak RSS (tiny model, 5 x 128 x 128 uint16 fields -> 4 tiles of 64 px each, 2 cores):")
        for count in (fields, 10 * fields):
            data = tmp / f"fields_{count}"
            data.mkdir()
            _write_fields(data, count)
            peak, seconds = _peak_rss_of_embed(model, data, tmp / f"emb_{count}")
            print(
                f"  {count:>5} fields: peak RSS {peak:.0f} MiB, {seconds:.1f} s ({count / seconds:.1f} fields/s incl. start-up)"
            )


def main() -> None:
    if sys.argv[1:2] == ["--one"]:  # the measured child: `cellmae` with the arguments after --one, nothing else
        from hf_cellmae.cli import main as cli

        report_peak_and_exit(cli(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perturbations", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--fields", type=int, default=40, help="N for the embed memory test (10 N also run)")
    parser.add_argument("--skip-embed", action="store_true")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores")
    benchmark_recall(args.perturbations, args.dim)
    if not args.skip_embed:
        benchmark_embed_memory(args.fields)


if __name__ == "__main__":
    main()
