"""The CA-MAE claim, measured: a model pre-trained on 5 stains embeds a plate imaged with 3 of them.

A channel-agnostic MAE tokenises every channel with one shared patch embedding plus a learned
embedding of the stain's identity, so it can embed a plate with fewer stains, in another order,
without retraining. This script takes models pre-trained on the demo's 5-stain synthetic screen
(`scripts/investigate_pretraining.py` writes them), rebuilds each seed's plate with only 3 stains
in a new order (Mito, DNA, RNA as w1, w2, w3), and scores the embeddings with the test used in
docs/evidence.md: a logistic-regression probe of the protein complex and of the gene, leave one
plate out, on well profiles centred/scaled on each plate's controls, plus kNN. Beside it: the same
model on all 5 stains, the random-init encoder on 3 stains, and pixel statistics of the 3 stains.

    python scripts/investigate_pretraining.py --out /tmp/inv --seeds 0 1 2 --experiments steps_0 small
    python scripts/channel_transfer.py --inv /tmp/inv --seeds 0 1 2 --experiment small
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SUBSET = {"w1": "Mito", "w2": "DNA", "w3": "RNA"}  # new token -> stain (a subset, in another order)
LABELS = ("complex", "gene")


def subset_plate(plate_dir: Path, out: Path) -> Path:
    """Link the images of 3 of the 5 stains into a new RxRx-style folder, renumbered w1..w3."""
    config = (
        json.loads((plate_dir / "synthetic_config.json").read_text())
        if (plate_dir / "synthetic_config.json").is_file()
        else {}
    )
    stains = list(config.get("channels") or ["DNA", "ER", "RNA", "AGP", "Mito"])
    source_token = {stain: f"w{i + 1}" for i, stain in enumerate(stains)}
    images = plate_dir / "images"
    for path in sorted(images.rglob("*.png")):
        stem, token = path.stem.rsplit("_", 1)
        for new_token, stain in SUBSET.items():
            if token == source_token[stain]:
                target = out / path.relative_to(images).parent / f"{stem}_{new_token}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.symlink_to(path)
    return out


def score(table_dir: Path, plate_dir: Path) -> dict:
    """Probe (section 1 of docs/evidence.md) and recall of the plate's relationships after TVN (the demo's)."""
    from hf_cellmae.demo import TVN_COMPONENTS
    from hf_cellmae.evaluation import probe_embeddings, read_embeddings
    from hf_cellmae.evaluation.report import evaluate_synthetic

    table = read_embeddings(table_dir)
    scores = {f"probe_{label}": probe_embeddings(table, label)["accuracy"] for label in LABELS}
    scores["knn_complex"] = probe_embeddings(table, "complex", classifier="knn")["accuracy"]
    scores["chance_complex"] = probe_embeddings(table, "complex")["chance_uniform"]
    recall = evaluate_synthetic(
        table,
        plate_dir,
        None,
        batch_col="Metadata_plate",
        align_options={"n_components": TVN_COMPONENTS},
        progress=False,
        suite=False,
        plots=False,
    )
    scores.update({f"recall_{source}": value["recall_0.05_0.95"] for source, value in recall["sources"].items()})
    return scores


def run(inv: Path, out: Path, seeds: list[int], experiment: str, readout: str) -> list[dict]:
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.evaluation.embed import ModelFeaturizer, PixelStatsFeaturizer, embed_dataset

    rows = []
    for seed in seeds:
        root, work = inv / f"seed{seed}", out / f"seed{seed}"
        shards3 = work / "shards_3stains"
        if not (shards3 / "manifest.json").is_file():
            images = subset_plate(root / "plate", work / "images_3stains")
            shard_folder(
                images, shards3, metadata=root / "plate" / "metadata.csv", channel_names=dict(SUBSET), progress=False
            )
        manifest = json.loads((shards3 / "manifest.json").read_text())
        assert manifest["channels"] == list(SUBSET.values()), manifest["channels"]
        trained = root / experiment / "run" / "model"
        random_init = root / "steps_0" / "model"
        runs = {
            ("pre-trained", 5): (root / "shards", ModelFeaturizer(trained, readout=readout)),
            ("pre-trained", 3): (shards3, ModelFeaturizer(trained, readout=readout)),
            ("random init", 3): (shards3, ModelFeaturizer(random_init, readout=readout)),
            ("pixel statistics", 3): (shards3, PixelStatsFeaturizer()),
        }
        for (name, stains), (data, featurizer) in runs.items():
            table = work / f"{name.replace(' ', '_')}_{stains}"
            embed_dataset(data, table, featurizer, progress=False)
            row = {"seed": seed, "features": name, "stains": stains, **score(table, root / "plate")}
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def summarize(rows: list[dict], experiment: str, readout: str) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows)
    metrics = ["probe_complex", "probe_gene", "knn_complex", "recall_complexes", "recall_pathways"]
    grouped = frame.groupby(["features", "stains"], sort=False)[metrics]
    mean, std = grouped.mean(), grouped.std().fillna(0)
    lines = [
        f"Model: `{experiment}` run, {readout} read-out; seeds {sorted(int(s) for s in frame['seed'].unique())}; "
        f"mean ± sd over seeds. Chance: complex {frame['chance_complex'].iloc[0]:.3f}, gene {1 / 24:.3f}, recall 0.100.",
        "",
        "| features | stains | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for key in mean.index:
        lines.append(
            f"| {key[0]} | {key[1]} | "
            + " | ".join(f"{mean.loc[key, m]:.3f} ± {std.loc[key, m]:.3f}" for m in metrics)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inv", type=Path, required=True, help="output folder of scripts/investigate_pretraining.py")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: INV/channel_transfer)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experiment", default="small", help="which pre-training run of the investigation to use")
    parser.add_argument("--readout", default="channelwise", choices=["mean", "channelwise"])
    args = parser.parse_args()
    out = args.out or args.inv / f"channel_transfer_{args.experiment}_{args.readout}"
    rows = run(args.inv, out, args.seeds, args.experiment, args.readout)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(summarize(rows, args.experiment, args.readout))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
