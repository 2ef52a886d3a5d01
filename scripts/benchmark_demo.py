"""`cellmae demo` over several seeds: mean and spread of every figure it prints.

One seed proves nothing on the demo plate (36 complex pairs: one pair moves recall by 0.028), so
the figures in docs/evidence.md are means over seeds, each seed a new synthetic screen, new
weights and a new data order. Runs the demo as a user would (same function, same defaults).

    python scripts/benchmark_demo.py --out /tmp/demo-seeds --seeds 3 4 5
    python scripts/benchmark_demo.py --out /tmp/demo-seeds --summarize   # table of finished seeds
    python scripts/benchmark_demo.py --out /tmp/small-seeds --recipe small --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def summarize(out: Path) -> str:
    reports = {
        int(p.parent.name.removeprefix("seed")): json.loads(p.read_text())
        for p in sorted(out.glob("seed*/demo_report.json"))
    }
    if not reports:
        raise SystemExit(f"no finished seed under {out}")
    first = next(iter(reports.values()))
    featurizers = list(first["suite"])
    rows = {}
    for name in featurizers:
        for source in first["recall"]["pretrained"]:
            rows.setdefault(f"recall {source} (0.05, 0.95)", {})[name] = [
                r["recall"][name][source] for r in reports.values()
            ]
        for metric in first["suite"][name]:
            rows.setdefault(metric, {})[name] = [r["suite"][name].get(metric, np.nan) for r in reports.values()]
    lines = [
        f"Seeds {sorted(reports)}; steps {first['steps']}; read-out {first.get('readout', 'mean')}; "
        f"demo wall time {np.mean([r['timings_s']['total_s'] for r in reports.values()]):.0f} s (mean).",
        "",
        "| metric | " + " | ".join(featurizers) + " |",
        "|---|" + "---|" * len(featurizers),
    ]
    for metric, by_name in rows.items():
        cells = []
        for name in featurizers:
            values = np.array(by_name.get(name, [np.nan]), dtype=float)
            cells.append(
                "—"
                if np.isnan(values).all()
                else f"{np.nanmean(values):.3f} ± {np.nanstd(values, ddof=1) if len(values) > 1 else 0:.3f}"
            )
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    gains = [
        r["suite"]["pretrained"]["probe complex"] - r["suite"]["random_init"]["probe complex"]
        for r in reports.values()
    ]
    lines += ["", f"Pre-trained minus random-init, complex probe, per seed: {', '.join(f'{g:+.3f}' for g in gains)}."]
    lines.append(
        f"Chance: probe complex {first['probe_chance']['complex']:.3f}, probe gene {first['probe_chance']['gene']:.3f}, "
        f"recall 0.100."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--recipe", choices=["demo", "small"], default="demo", help="the demo's pre-training recipe")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--summarize", action="store_true", help="print the table of finished seeds and exit")
    args = parser.parse_args()
    if not args.summarize:
        from hf_cellmae.demo import run_demo

        for seed in args.seeds:
            if not (args.out / f"seed{seed}" / "demo_report.json").is_file():
                run_demo(args.out / f"seed{seed}", max_steps=args.max_steps, seed=seed, recipe=args.recipe)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
