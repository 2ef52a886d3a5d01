"""Single-cell evidence on the pooled synthetic screen (docs/evidence.md, section 10), one seed per run.

    python scripts/pooled_evidence.py OUT --seed 0      # then --seed 1, --seed 2; --summarise OUT/seed-*

Per seed: render a pooled screen, shard it, pre-train a tiny CA-MAE on it (the demo recipe), and featurise every
segmented cell five ways: (a) the pre-trained model on the cell's crop, only its own patch tokens; (b) the same
crops, every token; (c) the 64 px tile of the field that holds the cell (what field embedding gives a cell);
(d) CellProfiler features of the cell (cp-measure on the classical segmentation); (e) the randomly initialised
model, as (a). Cells are labelled from the barcode read-out by centroid, averaged per (well, perturbation),
aligned (TVN on the control groups, per plate) and averaged per perturbation; recall of the true complexes and
pathways (gene sets) is written to OUT/seed-S/results.json. The design is fixed before running (see the doc).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

SCREEN = dict(pooled=True, num_plates=2, field_size=128, sites_per_well=4, pooled_wells_per_plate=12)
ROWS = ("a_masked", "b_unmasked", "c_tile", "d_cellprofiler", "e_random_init")
METRIC = "recall_0.05_0.95"


def _fields(shards: Path):
    import pyarrow.parquet as pq

    from hf_cellmae.data.shards import decode_pixels

    for shard in sorted(shards.glob("shard-*.parquet")):
        for record in pq.read_table(shard).to_pylist():
            yield record, decode_pixels(record["pixels"], record["dtype"], record["shape"])


def tile_rows(model_dir: Path, shards: Path, cells: pd.DataFrame, size: int) -> pd.DataFrame:
    """(c): each cell gets the embedding of the ``size`` px tile of its field that holds its centroid."""
    from hf_cellmae.evaluation.embed import Field, ModelFeaturizer

    featurizer = ModelFeaturizer(model_dir, device="cpu", crop_mode="tile")
    pieces = []
    for record, pixels in tqdm(list(_fields(shards)), desc="tiles", leave=False):
        mine = cells[cells["Metadata_field_id"] == record["field_id"]]
        if mine.empty:
            continue
        grid = pixels.shape[-1] // size
        tiles = [
            pixels[:, r * size : (r + 1) * size, c * size : (c + 1) * size] for r in range(grid) for c in range(grid)
        ]
        fields = [Field(t, list(record["channels"]), {}) for t in tiles]
        features, _ = featurizer(fields)  # (tiles, F)
        which = (
            (
                np.minimum(mine["Metadata_centroid_y"] // size, grid - 1) * grid
                + np.minimum(mine["Metadata_centroid_x"] // size, grid - 1)
            )
            .astype(int)
            .to_numpy()
        )
        metadata = mine[[c for c in mine.columns if c.startswith("Metadata_")]].reset_index(drop=True)
        names = featurizer.feature_names(list(record["channels"]))
        pieces.append(pd.concat([metadata, pd.DataFrame(features[which], columns=names)], axis=1))
    return pd.concat(pieces, ignore_index=True)


def cellprofiler_rows(shards: Path) -> pd.DataFrame:
    """(d): cp-measure's features (fast set, position features dropped) of every segmented cell and its nucleus."""
    from cp_measure.featurizer import featurize

    from hf_cellmae.evaluation.cellprofiler import CellProfilerFeaturizer, segment_field
    from hf_cellmae.evaluation.single_cell import cells_of_labels

    cp = CellProfilerFeaturizer(nuclei_channel="DNA")
    pieces = []
    for record, pixels in tqdm(list(_fields(shards)), desc="cellprofiler", leave=False):
        channels = list(record["channels"])
        nuclei, cells = segment_field(pixels, channels.index("DNA"))
        if cells.max() == 0:
            continue
        columns = cp._measured_columns(channels)
        image = pixels.astype(np.float32)[None] / 65535.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            data, names, rows = featurize(image, np.stack([nuclei, cells])[None], cp._config(channels))
        keep = [names.index(c) for c in columns]
        by_object = {}
        for values, (_, obj, label) in zip(data[:, keep], rows):
            by_object.setdefault(int(label), {})[obj] = values
        found = cells_of_labels(cells)
        width = len(columns)
        features = np.stack(
            [
                np.concatenate([by_object.get(c["cell_id"], {}).get(o, np.zeros(width)) for o in ("nuclei", "cells")])
                for c in found
            ]
        )
        metadata = pd.DataFrame(
            {
                "Metadata_field_id": record["field_id"],
                "Metadata_plate": record["plate"],
                "Metadata_well": record["well"],
                "Metadata_site": record["site"],
                "Metadata_cell_id": [c["cell_id"] for c in found],
                "Metadata_centroid_y": [c["centroid_y"] for c in found],
                "Metadata_centroid_x": [c["centroid_x"] for c in found],
            }
        )
        names_out = [f"{o}_{c}" for o in ("Nuclei", "Cells") for c in columns]
        pieces.append(
            pd.concat([metadata, pd.DataFrame(np.nan_to_num(features, posinf=0, neginf=0), columns=names_out)], axis=1)
        )
    table = pd.concat(pieces, ignore_index=True)
    constant = [c for c in table.columns if not c.startswith("Metadata_") and table[c].std() == 0]
    return table.drop(columns=constant)


def evaluate_cells(table: pd.DataFrame, cells_csv: str, relationships: dict, out: Path) -> dict:
    from hf_cellmae.evaluation.cells import cells_to_groups
    from hf_cellmae.evaluation.options import EvaluateOptions
    from hf_cellmae.evaluation.report import evaluate_embeddings

    path, counts = cells_to_groups(table, out, EvaluateOptions(cells=cells_csv, min_cells=1))
    results = evaluate_embeddings(
        str(path),
        sources=relationships,
        out_dir=out,
        batch_col="Metadata_plate",
        control_col="Metadata_is_control",
        alignment="tvn",
        plots=False,
        progress=False,
        well_cols=("Metadata_plate", "Metadata_well", "Metadata_perturbation"),
    )
    gene_sets = results["suite"]["featurizers"]["model"]["gene_set_recall"]
    return {
        "counts": counts,
        **{name: results["sources"][name][METRIC] for name in relationships},
        "chance": results["chance"][METRIC],
        **{f"gene_set_recall_{name}": gene_sets[name]["recall"] for name in relationships},
        "gene_set_chance": {name: gene_sets[name]["chance"] for name in relationships},
    }


def run_seed(out: Path, seed: int, max_steps: int) -> dict:
    import torch

    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import make_synthetic_screen
    from hf_cellmae.demo import RECIPES
    from hf_cellmae.evaluation.embed import ModelFeaturizer, embed_dataset
    from hf_cellmae.evaluation.report import read_embeddings
    from hf_cellmae.evaluation.single_cell import CellOptions, SingleCellFeaturizer
    from hf_cellmae.training.arguments import PretrainingArguments, read_config_file
    from hf_cellmae.training.loop import pretrain

    out.mkdir(parents=True, exist_ok=True)
    timings, start = {}, time.perf_counter()
    screen = make_synthetic_screen(out / "screen", seed=seed, progress=False, **SCREEN)
    shards = out / "shards"
    shard_folder(
        screen["images"], shards, metadata=screen["metadata"], channel_names=screen["channels"], progress=False
    )
    values = read_config_file(RECIPES["demo"])
    values.update(data=str(shards), output_dir=str(out / "run"), seed=seed, max_steps=max_steps, report_to="none")
    model_dir = Path(pretrain(PretrainingArguments(**values))["model_dir"])
    timings["screen_and_pretrain_s"] = time.perf_counter() - start
    torch.manual_seed(seed)
    random_dir = out / "random_init"
    CellMAEForPreTraining(CellMAEConfig.from_pretrained(model_dir)).save_pretrained(random_dir)
    shutil.copy(model_dir / "preprocessor_config.json", random_dir / "preprocessor_config.json")

    tables = {}
    for name, model, tokens in (
        ("a_masked", model_dir, "mask"),
        ("b_unmasked", model_dir, "all"),
        ("e_random_init", random_dir, "mask"),
    ):
        featurizer = SingleCellFeaturizer(ModelFeaturizer(model, device="cpu"), CellOptions(cell_tokens=tokens))
        embed_dataset(shards, out / "cells" / name, featurizer, progress=False, num_workers=1)
        tables[name] = read_embeddings(out / "cells" / name)
    size = CellMAEConfig.from_pretrained(model_dir).image_size
    tables["c_tile"] = tile_rows(model_dir, shards, tables["a_masked"], size)
    tables["d_cellprofiler"] = cellprofiler_rows(shards)
    timings["featurise_s"] = time.perf_counter() - start - timings["screen_and_pretrain_s"]
    results = {
        name: evaluate_cells(tables[name], screen["cells"], screen["relationships"], out / "eval" / name)
        for name in ROWS
    }
    report = {
        "seed": seed,
        "screen": SCREEN,
        "max_steps": max_steps,
        "num_cells_drawn": screen["num_cells"],
        "rows": results,
        "timings": timings,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    return report


def summarise(folders: list[Path]) -> str:
    reports = [json.loads((f / "results.json").read_text()) for f in folders]
    keys = ("complexes", "pathways", "gene_set_recall_complexes", "gene_set_recall_pathways")
    lines = [
        f"| row | recall complexes ({METRIC}) | recall pathways ({METRIC}) | gene-set recall, complexes | "
        "gene-set recall, pathways |",
        "|---|---|---|---|---|",
    ]
    for name in ROWS:
        cells = []
        for source in keys:
            values = np.array([r["rows"][name][source] for r in reports])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f} ({', '.join(f'{v:.2f}' for v in values)})")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    first = reports[0]["rows"]["a_masked"]
    lines.append(
        f"\nseeds {[r['seed'] for r in reports]}; recall chance {first['chance']}; gene-set recall chance "
        f"{first['gene_set_chance']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--summarise", nargs="+", default=None, help="seed folders to summarise instead of running")
    args = parser.parse_args()
    if args.summarise:
        print(summarise([Path(f) for f in args.summarise]))
        return
    report = run_seed(Path(args.out) / f"seed-{args.seed}", args.seed, args.max_steps)
    print(json.dumps({name: {k: v for k, v in row.items() if k != "counts"} for name, row in report["rows"].items()}))
    print(json.dumps(report["timings"]))


if __name__ == "__main__":
    main()
