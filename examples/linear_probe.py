"""How much does a frozen CA-MAE embedding know? A linear probe, split by well, against two baselines.

    # a model you pre-trained (e.g. with examples/pretrain_your_plate.py) on its own shards
    python examples/linear_probe.py --model cellmae-my-plate/run/model --data cellmae-my-plate/shards

    # no arguments: a synthetic screen and a randomly initialised tiny encoder (a baseline, not a result)
    python examples/linear_probe.py

    # any metadata column can be the label, e.g. the pathway instead of the protein complex
    python examples/linear_probe.py --model MODEL --data SHARDS --label pathway

What it does:
  1. embeds every field with the frozen encoder (tiles averaged per field) and, as a baseline, with
     per-channel pixel statistics (mean, std, percentiles), via `hf_cellmae.evaluation.embed_dataset`;
  2. removes plate effects: each plate's features are centred and scaled on its control wells;
  3. splits by WELL (all sites of a well on one side, so the probe cannot memorise a well), stratified by label;
  4. fits a multinomial logistic regression (one `torch.nn.Linear`, L-BFGS, L2 penalty) on the training wells;
  5. reports test accuracy next to chance (the most common training label; 1 / number of classes).

Fields without a label (e.g. control wells have no protein complex) are left out and counted.
Results go to OUT/probe_results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_cellmae import CellMAEConfig, CellMAEImageProcessor, CellMAEModel
from hf_cellmae.data import make_synthetic_screen, shard_folder
from hf_cellmae.evaluation import align, read_embeddings
from hf_cellmae.evaluation.embed import ModelFeaturizer, PixelStatsFeaturizer, embed_dataset

# The demo's synthetic screen: 24 genes in 6 protein complexes, 16 wells per complex over 2 plates.
SYNTHETIC_PLATE = dict(num_plates=2, control_wells_per_plate=24, sites_per_well=2)
# --small-plate: 4 complexes of 3 genes, 64 px fields, for a smoke test in seconds.
SMALL_PLATE = dict(
    num_plates=2,
    field_size=64,
    num_pathways=2,
    complexes_per_pathway=2,
    genes_per_complex=3,
    control_wells_per_plate=4,
    sites_per_well=2,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: a random-init tiny encoder)")
    parser.add_argument("--data", default=None, help="shard folder or image folder (default: a synthetic screen)")
    parser.add_argument(
        "--metadata", default=None, help="metadata table for an image folder (joined on plate/well/site)"
    )
    parser.add_argument("--layout", default="auto", help="image folder layout (see `cellmae shard --help`)")
    parser.add_argument(
        "--small-plate", action="store_true", help="generate a much smaller synthetic screen (smoke test)"
    )
    parser.add_argument("--label", default="complex", help="metadata column to predict (default: complex)")
    parser.add_argument(
        "--well-cols", nargs="+", default=["plate", "well"], help="columns naming a well (the split unit)"
    )
    parser.add_argument("--batch-col", default="plate", help="features are centred and scaled on controls per batch")
    parser.add_argument("--control-col", default="is_control", help="boolean column marking control wells")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="share of each label's wells held out")
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="L2 penalty on the probe's weights")
    parser.add_argument("--max-iter", type=int, default=200, help="L-BFGS iterations")
    parser.add_argument("--out", default="cellmae-linear-probe", help="output folder (embeddings, results)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test-fraction must be between 0 and 1, got {args.test_fraction}")
    return args


def column(name: str) -> str:
    """Embedding tables prefix metadata columns with `Metadata_`."""
    return name if name.startswith("Metadata_") else f"Metadata_{name}"


def random_tiny_model(folder: Path, seed: int) -> Path:
    """A randomly initialised tiny encoder: what a linear probe finds with no pre-training at all."""
    torch.manual_seed(seed)
    config = CellMAEConfig.from_preset("tiny")
    CellMAEModel(config).save_pretrained(folder)
    CellMAEImageProcessor(image_size=config.image_size, crop_mode="tile").save_pretrained(folder)
    return folder


def split_by_well(wells: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """`(n,)` bool, True for fields of held-out wells: per label, `test_fraction` of its wells (at least one,
    and at least one left for training). A label found in a single well cannot be tested and stays in training."""
    rng = np.random.default_rng(seed)
    label_of_well: dict[str, str] = {}
    for well, label in zip(wells, labels):
        label_of_well.setdefault(well, label)
    test_wells: set[str] = set()
    for label in sorted(set(label_of_well.values())):
        members = sorted(w for w, l in label_of_well.items() if l == label)
        if len(members) < 2:
            print(f"    label {label!r} is in one well only ({members[0]}): it is used for training, not tested")
            continue
        count = min(max(1, round(test_fraction * len(members))), len(members) - 1)
        test_wells.update(rng.permutation(members)[:count].tolist())
    return np.array([well in test_wells for well in wells])


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int, seed: int
) -> nn.Linear:
    """Multinomial logistic regression: `(n, D)` features, `(n,)` class ids -> a fitted `Linear(D, K)`."""
    torch.manual_seed(seed)
    probe = nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_features(table, split: dict, args, classes: list[str]) -> dict:
    """Align, standardise on the training wells, fit the probe, and score it on the held-out wells."""
    features = table[[c for c in table.columns if not str(c).startswith("Metadata_")]].to_numpy(np.float64)  # (n, D)
    control, batch = column(args.control_col), column(args.batch_col)
    if control in table.columns:
        is_control = table[control].fillna(False).astype(bool).to_numpy()
        features = align(
            features, is_control, table[batch].to_numpy() if batch in table.columns else None, method="center_scale"
        )
    keep, test = split["labelled"], split["test"]
    x, y = features[keep], torch.tensor(split["class_id"][keep])
    train = ~test[keep]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6  # statistics of the training wells only
    x = torch.tensor((x - mean) / std, dtype=torch.float32)
    probe = fit_linear_probe(x[train], y[train], len(classes), args.weight_decay, args.max_iter, args.seed)
    with torch.no_grad():
        predicted = probe(x).argmax(1)
    correct = (predicted == y).numpy()
    return {
        "dim": int(x.shape[1]),
        "train_accuracy": float(correct[train].mean()),
        "test_accuracy": float(correct[~train].mean()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = args.data
    if data is None:
        print("[1] no --data given: generating a synthetic screen with known protein complexes")
        plate = make_synthetic_screen(
            out / "plate", seed=args.seed, **(SMALL_PLATE if args.small_plate else SYNTHETIC_PLATE)
        )
        shard_folder(plate["images"], out / "shards", metadata=plate["metadata"], channel_names=plate["channels"])
        data = out / "shards"
    else:
        print(f"[1] data: {data}")

    model = args.model
    if model is None:
        model = random_tiny_model(out / "random_init_model", args.seed)
        print(
            f"    no --model given: using a RANDOMLY INITIALISED tiny encoder ({model}); pass --model with a "
            "pre-trained folder or Hub id for a real result"
        )

    print("[2] embedding every field (frozen encoder; per-channel pixel statistics as a baseline)")
    tables = {}
    for name, featurizer in (("model", ModelFeaturizer(model)), ("pixel_stats", PixelStatsFeaturizer())):
        embed_dataset(data, out / "embeddings" / name, featurizer, metadata=args.metadata, layout=args.layout)
        tables[name] = read_embeddings(out / "embeddings" / name).sort_values("Metadata_field_id", ignore_index=True)

    first = tables["model"]
    label_col = column(args.label)
    missing = [c for c in [label_col] + [column(c) for c in args.well_cols] if c not in first.columns]
    if missing:
        available = sorted(c.removeprefix("Metadata_") for c in first.columns if c.startswith("Metadata_"))
        raise SystemExit(f"the embeddings have no column(s) {missing}; choose --label / --well-cols among {available}")
    labels = first[label_col].astype("string")
    labelled = (labels.notna() & (labels.str.strip() != "")).to_numpy()
    print(
        f"[3] label {args.label!r}: {int(labelled.sum())} labelled fields, {int((~labelled).sum())} without a label left out"
    )
    wells = first[[column(c) for c in args.well_cols]].astype(str).agg("/".join, axis=1).to_numpy()
    test = np.zeros(len(first), dtype=bool)
    test[labelled] = split_by_well(
        wells[labelled], labels.to_numpy()[labelled].astype(str), args.test_fraction, args.seed
    )
    classes = sorted(set(labels[labelled].tolist()))
    if len(classes) < 2:
        raise SystemExit(
            f"label {args.label!r} has {len(classes)} class(es) among the labelled fields; a probe needs at least 2"
        )
    class_ids = {name: index for index, name in enumerate(classes)}
    for table in tables.values():
        if not (table["Metadata_field_id"].to_numpy() == first["Metadata_field_id"].to_numpy()).all():
            raise RuntimeError("the model and pixel-statistics tables list different fields; delete --out and re-run")
    class_id = np.array([class_ids[label] if ok else -1 for label, ok in zip(labels.fillna("").tolist(), labelled)])
    split = {"labelled": labelled, "test": test, "class_id": class_id}
    train_labels = labels[labelled & ~test]
    test_labels = labels[labelled & test]
    majority = train_labels.value_counts().idxmax()
    print(
        f"    {len(classes)} classes; split by well: {len(set(wells[labelled & ~test]))} training wells "
        f"({len(train_labels)} fields), {len(set(wells[labelled & test]))} test wells ({len(test_labels)} fields)"
    )

    print("[4] fitting a linear probe (logistic regression) on each feature set")
    results = {
        "label": args.label,
        "classes": classes,
        "model": str(model),
        "model_is_random_init": args.model is None,
        "data": str(data),
        "unlabelled_fields_left_out": int((~labelled).sum()),
        "train_fields": int(len(train_labels)),
        "test_fields": int(len(test_labels)),
        "train_wells": sorted(set(wells[labelled & ~test])),
        "test_wells": sorted(set(wells[labelled & test])),
        "chance": {"majority": float((test_labels == majority).mean()), "uniform": 1.0 / len(classes)},
        "probes": {name: probe_features(table, split, args, classes) for name, table in tables.items()},
    }
    model_name = "random-init encoder" if args.model is None else "frozen encoder"
    print(f"\n    {'features':<28}{'dim':>6}{'train acc':>12}{'test acc':>12}")
    for name, label in (("model", model_name), ("pixel_stats", "pixel statistics")):
        probe = results["probes"][name]
        print(f"    {label:<28}{probe['dim']:>6}{probe['train_accuracy']:>12.3f}{probe['test_accuracy']:>12.3f}")
    print(f"    {'chance (majority class)':<28}{'':>6}{'':>12}{results['chance']['majority']:>12.3f}")
    print(f"    {'chance (1 / classes)':<28}{'':>6}{'':>12}{results['chance']['uniform']:>12.3f}")
    (out / "probe_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWrote {out / 'probe_results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
