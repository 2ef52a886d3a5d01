"""The paper's findings (Kraus et al., CVPR 2024) as experiments: one command per claim, designs in docs/claims.md.

    python scripts/reproduce_paper.py --claim wsl --out DIR            # Finding 1: MAE vs WSL on held-out genes
    python scripts/reproduce_paper.py --claim scaling --out DIR        # Finding 2: model and data size
    python scripts/reproduce_paper.py --claim fourier --out DIR        # Finding 3: spikes without the Fourier term
    python scripts/reproduce_paper.py --claim all --out DIR --device cuda   # the larger grid, on a GPU

Every claim runs on one screen, ``cellmae synthetic --size screen`` (240 genes, 30 complexes, 10 pathways,
4 plates), rendered once into ``DIR/screen``. WSL is trained on the wells of a random half of each complex's
genes (plus the controls); the MAE on every field, without labels; both are scored on the other half's genes
only: recall of their true pairs after TVN, gene-set recall and a leave-one-plate-out complex probe.

Finished runs are reused (a model folder, an embeddings table, a scored row in ``DIR/results.jsonl``), so an
interrupted command resumes. Each claim writes ``DIR/<claim>.json`` (every per-seed figure) and a figure,
``docs/claim_<claim>.png`` by default (``--figures``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

CLAIMS = ("wsl", "scaling", "fourier")
TVN_COMPONENTS = 64  # as the demo: every featuriser whitened in at most 64 principal components of its controls
RECALL = "recall_0.05_0.95"
# Grids per device: what runs by default. The CPU grids are sized for a few hours on 2 cores in all
# (docs/claims.md says what was run); the CUDA grids go further.
GRIDS = {
    "cpu": {
        "wsl": {"seeds": [0, 1, 2], "recipes": ["demo_cpu"]},
        "scaling": {"seeds": [0], "max_steps": 400, "plates": [1, 2, 4], "encoders": ["xs", "tiny", "s"]},
        "fourier": {"seeds": [0, 1, 2], "pilot_lrs": [1e-2, 3e-2, 1e-1], "max_steps": 300, "batch_size": 16},
    },
    "cuda": {
        "wsl": {"seeds": [0, 1, 2], "recipes": ["demo_cpu", "small_cpu"]},
        "scaling": {
            "seeds": [0, 1, 2],
            "max_steps": 3200,
            "plates": [1, 2, 4],
            "encoders": ["tiny", "vit_s16", "vit_b16"],
        },
        "fourier": {
            "seeds": [0, 1, 2],
            "pilot_lrs": [1e-3, 3e-3, 1e-2, 3e-2],
            "max_steps": 2000,
            "batch_size": 64,
            "encoder": "vit_b16",
        },
    },
}
# Encoder sizes of the scaling grid, as `model_preset` + CellMAEConfig overrides (decoders stay `tiny`'s).
ENCODERS = {
    "xs": ("tiny", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}),
    "tiny": ("tiny", {}),
    "s": ("tiny", {"hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4}),
    "vit_s16": ("tiny", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 16}),
    "vit_b16": ("tiny", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16}),
}
SPIKE_FACTOR, SPIKE_WINDOW = 2.0, 20  # a spike: loss > 2x the median of the previous 20 logged losses (or non-finite)


# ---------------------------------------------------------------- the screen and its subsets


def prepare_screen(out: Path, screen_overrides: dict) -> tuple[Path, Path]:
    """Render ``--size screen`` (seed 0) and shard it, once: (plate folder, shard folder)."""
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import SCREEN_SIZES, make_synthetic_screen

    plate, shards = out / "screen" / "plate", out / "screen" / "shards"
    if not (plate / "synthetic_config.json").is_file():
        make_synthetic_screen(plate, seed=0, progress=False, **{**SCREEN_SIZES["screen"], **screen_overrides})
    if not (shards / "manifest.json").is_file():
        made = json.loads((plate / "synthetic_config.json").read_text())
        shard_folder(
            plate / "images", shards, metadata=plate / "metadata.csv", channel_names=made["channels"], progress=False
        )
    return plate, shards


def split_genes(plate: Path, seed: int) -> tuple[list[str], list[str]]:
    """(training half, held-out half): half of every complex's genes, drawn with ``seed``."""
    genes = json.loads((plate / "synthetic_config.json").read_text())["genes"]
    rng = np.random.default_rng([seed, 25])
    train, held_out = [], []
    for complex_name in sorted({g["complex"] for g in genes}):
        members = sorted(g["gene"] for g in genes if g["complex"] == complex_name)
        chosen = set(rng.choice(members, size=len(members) // 2, replace=False).tolist())
        train += [g for g in members if g in chosen]
        held_out += [g for g in members if g not in chosen]
    return train, held_out


def subset_shards(plate: Path, out: Path, genes: list[str] | None, num_plates: int | None) -> Path:
    """Shards of the wells of ``genes`` (None: every gene) plus the controls, on the first ``num_plates`` plates."""
    import pandas as pd

    from hf_cellmae.data.shards import shard_folder

    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    metadata = pd.read_csv(plate / "metadata.csv", keep_default_na=False)
    plates = sorted(metadata["plate"].unique(), key=lambda name: int(name.removeprefix("Plate")))[:num_plates]
    keep = metadata["plate"].isin(plates)
    if genes is not None:
        keep &= metadata["is_control"].astype(str).eq("True") | metadata["gene"].isin(genes)
    metadata = metadata[keep]
    images = out / "images"
    for row in metadata.itertuples():
        folder = plate / "images" / row.experiment / row.plate
        target = images / row.experiment / row.plate
        target.mkdir(parents=True, exist_ok=True)
        for source in folder.glob(f"{row.well}_s{row.site}_w*.png"):
            if not (target / source.name).exists():
                (target / source.name).symlink_to(source)
    metadata.to_csv(out / "metadata.csv", index=False)
    channels = json.loads((plate / "synthetic_config.json").read_text())["channels"]
    shard_folder(images, shards, metadata=out / "metadata.csv", channel_names=channels, progress=False)
    return shards


# ---------------------------------------------------------------- training, embedding, scoring


def training_values(recipe: str, data: Path, out: Path, seed: int, **changes) -> dict:
    """PretrainingArguments fields: a shipped recipe with ``changes`` (``model_overrides`` merged)."""
    from hf_cellmae.training.arguments import read_config_file

    values = read_config_file(recipe)
    overrides = {**(values.get("model_overrides") or {}), **changes.pop("model_overrides", {})}
    values.update(
        data=str(data),
        output_dir=str(out),
        seed=seed,
        report_to="none",
        figure_steps=0,
        progress_bar=False,
        model_overrides=overrides,
        **changes,
    )
    return values


def train(values: dict) -> Path:
    """Train (or reuse) a model; returns its folder. ``max_steps`` 0: the random-init encoder of ``seed``."""
    import torch

    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
    from hf_cellmae.training.arguments import PretrainingArguments
    from hf_cellmae.training.loop import pretrain

    model_dir = Path(values["output_dir"]) / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    if values["max_steps"] == 0:
        torch.manual_seed(values["seed"])
        config = CellMAEConfig.from_preset(values["model_preset"], **values["model_overrides"])
        CellMAEForPreTraining(config).save_pretrained(model_dir)
        return model_dir
    start = time.perf_counter()
    summary = pretrain(PretrainingArguments(**values))
    (Path(values["output_dir"]) / "wall_s.json").write_text(
        json.dumps({"train_s": round(time.perf_counter() - start, 1), "load_1min": os.getloadavg()[0]})
    )
    return Path(summary["model_dir"])


def embed(model_dir: Path, shards: Path, out: Path, device: str) -> Path:
    from hf_cellmae.evaluation.embed import ModelFeaturizer, embed_dataset

    if not (out / "embedding_info.json").is_file() and not any(out.glob("*.parquet")):
        embed_dataset(shards, out, ModelFeaturizer(model_dir, device=device, readout="channelwise"), progress=False)
    return out


def held_out_pairs(plate: Path, held_out: list[str]) -> dict:
    """The true pairs among held-out genes: ``{"complexes": DataFrame, "pathways": DataFrame}``."""
    import pandas as pd

    keep = set(held_out)
    pairs = {}
    for name in ("complexes", "pathways"):
        frame = pd.read_csv(plate / "relationships" / f"{name}.csv", dtype=str)
        pairs[name] = frame[frame["entity1"].isin(keep) & frame["entity2"].isin(keep)].reset_index(drop=True)
    return pairs


def score(table_dir: Path, plate: Path, held_out: list[str], tvn_components: int = TVN_COMPONENTS) -> dict:
    """Recall, gene-set recall and the complex probe over the held-out genes (and the controls) only."""
    from hf_cellmae.evaluation.report import evaluate_embeddings, read_embeddings

    table = read_embeddings(table_dir)
    is_control = table["Metadata_is_control"].astype(str).eq("True")
    table = table[is_control | table["Metadata_gene"].isin(held_out)].reset_index(drop=True)
    pairs = held_out_pairs(plate, held_out)
    results = evaluate_embeddings(
        table,
        sources=pairs,
        batch_col="Metadata_plate",
        probe_labels=("complex",),
        align_options={"n_components": tvn_components},
        plots=False,
        progress=False,
    )
    suite = results["suite"]["featurizers"]["model"]
    row = {f"recall_{name}": results["sources"][name][RECALL] for name in pairs}
    row.update({f"gene_set_recall_{name}": suite["gene_set_recall"][name]["recall"] for name in pairs})
    row["probe_complex"] = suite["probe"]["Metadata_complex"]["logistic"]
    row["pairs"] = {name: len(frame) for name, frame in pairs.items()}
    row["n_held_out_genes"] = len(held_out)
    return row


class Results:
    """``DIR/results.jsonl``: one scored row per (claim, key); finished rows are not recomputed."""

    def __init__(self, path: Path):
        self.path = path
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        self.rows = {row["key"]: row for row in rows}

    def get(self, key: str, compute) -> dict:
        if key not in self.rows:
            row = {"key": key, **compute()}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.rows[key] = row
        return self.rows[key]


def run_folder(out: Path, recipe: str, model: str, encoder: str, plates: int, steps: int, seed: int) -> Path:
    """One folder per distinct training run, named by what it computes, so claims share runs (Finding 1's
    demo-compute models are Finding 2's `tiny`, 4-plate points)."""
    return out / "runs" / f"{recipe}_{model.replace(' ', '_')}_{encoder}_p{plates}_steps{steps}_s{seed}"


def trained_and_scored(values: dict, shards: Path, plate: Path, held_out: list[str], grid: dict, device: str) -> dict:
    """Train (or reuse) the run of ``values``, embed every field of ``shards``, score the held-out genes."""
    run = Path(values["output_dir"])
    table = embed(train(values), shards, run / "embeddings", device)
    return {**score(table, plate, held_out, grid["tvn_components"]), **_wall(run)}


def _wall(run: Path) -> dict:
    path = run / "wall_s.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# ---------------------------------------------------------------- Finding 1: MAE vs WSL on held-out genes


def claim_wsl(out: Path, plate: Path, shards: Path, grid: dict, device: str, changes: dict, results: Results) -> dict:
    from hf_cellmae.training.arguments import read_config_file

    rows = []
    for recipe in grid["recipes"]:
        for seed in grid["seeds"]:
            train_half, held_out = split_genes(plate, seed)
            wsl_shards = subset_shards(
                plate, out / "subsets" / f"train_half_seed{seed}_plates{_num_plates(plate)}", train_half, None
            )
            steps = changes.get("max_steps") or read_config_file(recipe)["max_steps"]
            plates = _num_plates(plate)
            runs = {
                "MAE": training_values(
                    recipe, shards, run_folder(out, recipe, "MAE", "tiny", plates, steps, seed), seed, **changes
                ),
                "WSL": training_values(
                    recipe,
                    wsl_shards,
                    run_folder(out, recipe, "WSL", "tiny", plates, steps, seed),
                    seed,
                    objective="wsl",
                    label_col="perturbation",
                    **changes,
                ),
                "random init": training_values(
                    recipe,
                    shards,
                    run_folder(out, "none", "random", "tiny", 0, 0, seed),
                    seed,
                    **{**changes, "max_steps": 0},
                ),
            }
            for model, values in runs.items():
                if model not in grid.get("models", runs):
                    continue
                key = f"wsl/{recipe}/{model}/seed{seed}"

                def compute(values=values, held_out=held_out):
                    return trained_and_scored(values, shards, plate, held_out, grid, device)

                row = results.get(key, compute)
                rows.append({"recipe": recipe, "model": model, "seed": seed, **row})
                print(_line(rows[-1]), flush=True)
    return {
        "claim": "wsl",
        "rows": rows,
        "summary": _summarise(rows, ("recipe", "model")),
        "verdict": wsl_verdict(rows),
    }


def wsl_verdict(rows: list[dict]) -> dict:
    """The test of docs/claims.md: per recipe and metric, d = MAE - WSL per seed; reproduced iff mean d > sd(d) > 0
    (with one seed: mean d > 0, marked as such). The verdict of the finding is the one of recall of complexes."""
    verdicts = {}
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        by_seed = {}
        for row in rows:
            if row["recipe"] == recipe and row["model"] in ("MAE", "WSL"):
                by_seed.setdefault(row["seed"], {})[row["model"]] = row
        paired = [pair for pair in by_seed.values() if len(pair) == 2]
        if not paired:
            continue
        verdicts[recipe] = {}
        for metric in METRICS:
            d = np.array([pair["MAE"][metric] - pair["WSL"][metric] for pair in paired])
            sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
            verdicts[recipe][metric] = {
                "mae_minus_wsl_per_seed": d.tolist(),
                "mean": float(d.mean()),
                "sd": sd if len(d) > 1 else None,
                "word": "reproduced" if d.mean() > 0 and d.mean() > sd else "not reproduced",
                "wsl_ahead_beyond_spread": bool(d.mean() < 0 and -d.mean() > sd),
            }
    return verdicts


# ---------------------------------------------------------------- Finding 2: scaling


def claim_scaling(
    out: Path, plate: Path, shards: Path, grid: dict, device: str, changes: dict, results: Results
) -> dict:
    total_plates = _num_plates(plate)
    settings = [("model", name, total_plates) for name in grid["encoders"]]
    settings += [("data", "tiny", plates) for plates in grid["plates"] if plates <= total_plates]
    # the largest encoder last (the slowest), the point Finding 1 may already have trained just before it
    settings.sort(key=lambda s: (s[1] == grid["encoders"][-1], (s[1], s[2]) == ("tiny", total_plates)))
    rows = []
    for seed in grid["seeds"]:
        train_half, held_out = split_genes(plate, seed)
        for axis, encoder, plates in settings:
            preset, size = ENCODERS[encoder]
            for model in [m for m in ("MAE", "WSL") if m in grid.get("models", ("MAE", "WSL"))]:
                genes = None if model == "MAE" else train_half
                name = f"{'all' if genes is None else 'train_half'}_seed{seed if genes else 0}_plates{plates}"
                data = (
                    shards
                    if genes is None and plates == total_plates
                    else subset_shards(plate, out / "subsets" / name, genes, plates)
                )
                supervised = {} if model == "MAE" else {"objective": "wsl", "label_col": "perturbation"}
                run = run_folder(out, "demo_cpu", model, encoder, plates, grid["max_steps"], seed)
                values = training_values(
                    "demo_cpu",
                    data,
                    run,
                    seed,
                    **{
                        **changes,
                        **supervised,
                        "model_preset": preset,
                        "max_steps": grid["max_steps"],
                        "model_overrides": {**size, **changes.get("model_overrides", {})},
                    },
                )
                key = f"scaling/{model}/{encoder}/plates{plates}/steps{values['max_steps']}/seed{seed}"

                def compute(values=values, held_out=held_out):
                    return trained_and_scored(values, shards, plate, held_out, grid, device)

                row = results.get(key, compute)
                rows.append(
                    {
                        "axis": axis,
                        "model": model,
                        "encoder": encoder,
                        "plates": plates,
                        "seed": seed,
                        "parameters": _encoder_parameters(preset, size),
                        **row,
                    }
                )
                print(_line(rows[-1]), flush=True)
    summary = _summarise(rows, ("axis", "model", "encoder", "plates"))
    return {"claim": "scaling", "rows": rows, "summary": summary, "change": scaling_change(summary, grid)}


def scaling_change(summary: list[dict], grid: dict) -> dict:
    """Per axis, model and metric: the change from the smallest to the largest setting (docs/claims.md's Δ)."""
    order = {"model": list(grid["encoders"]), "data": list(grid["plates"])}
    change = {}
    for entry_axis, sizes in order.items():
        for model in ("MAE", "WSL"):
            entries = {
                e["encoder"] if entry_axis == "model" else e["plates"]: e
                for e in summary
                if e["axis"] == entry_axis and e["model"] == model
            }
            present = [size for size in sizes if size in entries]
            if len(present) < 2:
                continue
            small, large = entries[present[0]], entries[present[-1]]
            change[f"{entry_axis}/{model}"] = {
                "from": present[0],
                "to": present[-1],
                **{metric: large[metric]["mean"] - small[metric]["mean"] for metric in METRICS},
            }
    return change


def _num_plates(plate: Path) -> int:
    return json.loads((plate / "synthetic_config.json").read_text())["config"]["num_plates"]


def _encoder_parameters(preset: str, size: dict) -> int:
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    model = CellMAEForPreTraining(CellMAEConfig.from_preset(preset, **size))
    encoder = getattr(model, "encoder", None) or getattr(model, "cellmae", None) or model
    return int(sum(p.numel() for name, p in encoder.named_parameters() if "decoder" not in name))


# ---------------------------------------------------------------- Finding 3: Fourier loss and spikes


def count_spikes(losses: list[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> int:
    """Logged losses that are non-finite, or above ``factor`` x the median of the ``window`` before them."""
    spikes = 0
    for index, loss in enumerate(losses):
        if not np.isfinite(loss):
            spikes += 1
        elif index >= window:
            previous = np.asarray(losses[index - window : index], dtype=float)
            previous = previous[np.isfinite(previous)]
            spikes += bool(len(previous) and loss > factor * np.median(previous))
    return spikes


def fourier_run(out: Path, shards: Path, grid: dict, seed: int, lr: float, weight: float, changes: dict) -> dict:
    """One run of the Fourier grid: its logged MSE losses, spikes, and whether it diverged."""
    from hf_cellmae.training.loop import NonFiniteLossError

    run = out / "runs" / f"fourier_lr{lr:g}_w{weight:g}_s{seed}"
    model_overrides = {"fourier_loss_weight": weight, "mask_ratio": 0.75, **changes.get("model_overrides", {})}
    if grid.get("encoder"):
        model_overrides = {**ENCODERS[grid["encoder"]][1], **model_overrides}
    values = training_values(
        "demo_cpu",
        shards,
        run,
        seed,
        **{
            **changes,
            "max_steps": changes.get("max_steps", grid["max_steps"]),
            "learning_rate": lr,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": None,
            "logging_steps": 1,
            "per_device_train_batch_size": grid["batch_size"],
            "save_steps": 10**6,
            "model_overrides": model_overrides,
        },
    )
    diverged = False
    try:
        train(values)
    except NonFiniteLossError:
        diverged = True
    state_path = run / "model" / "trainer_state.json"
    history = json.loads(state_path.read_text())["log_history"] if state_path.is_file() else []
    mse = [float(record["mse_loss"]) for record in history]
    skipped = int(json.loads(state_path.read_text()).get("nonfinite_steps", 0)) if state_path.is_file() else 0
    return {
        "mse_loss": mse,
        "spikes": count_spikes(mse) + skipped,
        "nonfinite_steps": skipped,
        "diverged": diverged,
        "final_mse": mse[-1] if mse else None,
        **_wall(run),
    }


def claim_fourier(
    out: Path, plate: Path, shards: Path, grid: dict, device: str, changes: dict, results: Results
) -> dict:
    pilot, chosen = [], None
    for lr in grid["pilot_lrs"]:
        row = results.get(
            f"fourier/pilot/lr{lr:g}/w0/seed0", lambda lr=lr: fourier_run(out, shards, grid, 0, lr, 0.0, changes)
        )
        pilot.append({"learning_rate": lr, **row})
        print(f"pilot lr {lr:g}, MSE only, seed 0: {row['spikes']} spike(s), diverged {row['diverged']}", flush=True)
        if row["spikes"] or row["diverged"]:
            chosen = lr
            break
    rows = []
    if chosen is not None:
        for seed in grid["seeds"]:
            for weight in (0.0, 0.01):
                row = results.get(
                    f"fourier/lr{chosen:g}/w{weight:g}/seed{seed}",
                    lambda seed=seed, weight=weight: fourier_run(out, shards, grid, seed, chosen, weight, changes),
                )
                rows.append({"learning_rate": chosen, "fourier_weight": weight, "seed": seed, **row})
                print(
                    f"lr {chosen:g}, Fourier weight {weight:g}, seed {seed}: {row['spikes']} spike(s), "
                    f"diverged {row['diverged']}, final MSE {row['final_mse']}",
                    flush=True,
                )
    weights = (0.0, 0.01)
    spikes = {w: {row["seed"]: row["spikes"] for row in rows if row["fourier_weight"] == w} for w in weights}
    fewer = sum(spikes[0.01][seed] < spikes[0.0][seed] for seed in spikes[0.0] if seed in spikes[0.01])
    diverged = {w: any(row["diverged"] for row in rows if row["fourier_weight"] == w) for w in weights}
    fewer_in_total = sum(spikes[0.01].values()) < sum(spikes[0.0].values())
    if chosen is None:
        word = "not measurable here"
    elif (fewer_in_total and fewer >= 2) or (diverged[0.0] and not diverged[0.01]):
        word = "reproduced"
    else:
        word = "not reproduced"
    return {
        "claim": "fourier",
        "spike": f"MSE loss non-finite, or > {SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW} logged steps",
        "pilot": pilot,
        "learning_rate": chosen,
        "rows": rows,
        "verdict": {
            "spikes_mse_only": spikes[0.0],
            "spikes_fourier": spikes[0.01],
            "seeds_with_fewer": fewer,
            "diverged": {"mse_only": diverged[0.0], "fourier": diverged[0.01]},
            "word": word,
        },
    }


# ---------------------------------------------------------------- summaries and figures


METRICS = (
    "recall_complexes",
    "recall_pathways",
    "gene_set_recall_complexes",
    "gene_set_recall_pathways",
    "probe_complex",
)


def _line(row: dict) -> str:
    head = " ".join(str(row[k]) for k in ("recipe", "axis", "model", "encoder", "plates", "seed") if k in row)
    return (
        head
        + ": "
        + ", ".join(f"{m} {row[m]:.3f}" for m in METRICS if m in row)
        + (f" (train {row['train_s']} s, load {row['load_1min']:.1f})" if "train_s" in row else "")
    )


def _summarise(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean and sd over seeds of every metric, per group of ``keys``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    summary = []
    for group, members in groups.items():
        entry = dict(zip(keys, group), seeds=[m["seed"] for m in members])
        for metric in METRICS:
            values = np.array([m[metric] for m in members], dtype=float)
            entry[metric] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else None,
                "per_seed": values.tolist(),
            }
        summary.append(entry)
    return summary


def plot_claim(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claim = report["claim"]
    if claim == "wsl":
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4))
        models = list(dict.fromkeys(e["model"] for e in report["summary"]))
        recipes = list(dict.fromkeys(e["recipe"] for e in report["summary"]))
        for ax, metric in zip(axes, METRICS):
            for r, recipe in enumerate(recipes):
                for m, model in enumerate(models):
                    entry = next(e for e in report["summary"] if e["model"] == model and e["recipe"] == recipe)
                    x = r * (len(models) + 1) + m
                    ax.bar(
                        x,
                        entry[metric]["mean"],
                        yerr=entry[metric]["sd"] or 0,
                        color=f"C{m}",
                        label=model if r == 0 else None,
                        capsize=3,
                    )
                    seeds = entry[metric]["per_seed"]
                    ax.scatter([x] * len(seeds), seeds, color="k", s=8, zorder=3)
            ax.set_xticks([r * (len(models) + 1) + (len(models) - 1) / 2 for r in range(len(recipes))], recipes)
            ax.set_title(metric.replace("_", " "), fontsize=9)
        axes[0].legend(fontsize=8)
        fig.suptitle("Finding 1: held-out genes only (bars: mean ± sd over seeds; dots: seeds)", fontsize=10)
    elif claim == "scaling":
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for col, axis in enumerate(("model", "data")):
            for row, metric in enumerate(("recall_complexes", "probe_complex")):
                ax = axes[row, col]
                for m, model in enumerate(("MAE", "WSL")):
                    entries = [e for e in report["summary"] if e["axis"] == axis and e["model"] == model]
                    xs = [_size(report, e) if axis == "model" else e["plates"] for e in entries]
                    order = np.argsort(xs)
                    ys = [entries[i][metric]["mean"] for i in order]
                    errs = [entries[i][metric]["sd"] or 0 for i in order]
                    ax.errorbar(
                        [xs[i] for i in order], ys, yerr=errs, marker="o", color=f"C{m}", label=model, capsize=3
                    )
                ax.set_xscale("log")
                if axis == "data":
                    plates = sorted({e["plates"] for e in report["summary"] if e["axis"] == "data"})
                    ax.set_xticks(plates, [str(p) for p in plates])
                    ax.minorticks_off()
                ax.set_xlabel("encoder parameters" if axis == "model" else "training plates (fixed steps)")
                ax.set_ylabel(metric.replace("_", " ") + " (held-out genes)")
                ax.legend(fontsize=8)
        fig.suptitle("Finding 2: scaling model and data size", fontsize=10)
    else:
        fig, axes = plt.subplots(
            1, 2 if report["rows"] else 1, figsize=(11 if report["rows"] else 6, 3.8), squeeze=False
        )
        axes = axes[0]
        for row in report["pilot"]:
            axes[0].plot(row["mse_loss"], label=f"lr {row['learning_rate']:g}: {row['spikes']} spikes", lw=0.8)
        axes[0].set_title("pilot, MSE only, seed 0", fontsize=9)
        if not report["rows"]:
            axes[0].set_title(
                "pilot, MSE only, seed 0: no run spiked, so no Fourier comparison (not measurable)", fontsize=8
            )
        for row in report["rows"]:
            color = "C3" if row["fourier_weight"] == 0 else "C0"
            axes[1].plot(
                row["mse_loss"],
                color=color,
                lw=0.7,
                alpha=0.8,
                label=f"w={row['fourier_weight']:g} seed {row['seed']}: {row['spikes']} spikes",
            )
        if report["rows"]:
            axes[1].set_title(f"lr {report['learning_rate']}: MSE only (red) vs + Fourier 0.01 (blue)", fontsize=9)
        for ax in axes:
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("MSE loss (masked patches)")
            ax.legend(fontsize=7)
        fig.suptitle(f"Finding 3: spike = {report['spike']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _size(report: dict, entry: dict) -> int:
    return next(r["parameters"] for r in report["rows"] if r["encoder"] == entry["encoder"])


RUNNERS = {"wsl": claim_wsl, "scaling": claim_scaling, "fourier": claim_fourier}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claim", choices=[*CLAIMS, "all"], required=True)
    parser.add_argument(
        "--out", type=Path, required=True, help="work folder (screen, runs, results.jsonl, <claim>.json)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="which grid, and where to embed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the grid's seeds")
    parser.add_argument(
        "--recipes", nargs="+", default=None, help="wsl: override the grid's recipes (demo_cpu, small_cpu)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=["MAE", "WSL", "random init"],
        help="wsl, scaling: run only these models (default all; e.g. WSL in a second process beside MAE)",
    )
    parser.add_argument("--encoders", nargs="+", default=None, choices=list(ENCODERS), help="scaling: encoder sizes")
    parser.add_argument("--plates", type=int, nargs="+", default=None, help="scaling: training plate counts")
    parser.add_argument("--max-steps", type=int, default=None, help="override every run's steps (tests, smoke runs)")
    parser.add_argument("--pilot-lrs", type=float, nargs="+", default=None, help="fourier: pilot learning rates")
    parser.add_argument("--screen-overrides", default="{}", help="JSON of SyntheticScreenConfig fields (tests)")
    parser.add_argument("--tvn-components", type=int, default=TVN_COMPONENTS, help="TVN: at most this many components")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1: a shared machine)")
    parser.add_argument(
        "--figures",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs",
        help="where claim_<claim>.png goes (default docs/)",
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    plate, shards = prepare_screen(args.out, json.loads(args.screen_overrides))
    results = Results(args.out / "results.jsonl")
    changes = {} if args.max_steps is None else {"max_steps": args.max_steps}
    for claim in CLAIMS if args.claim == "all" else (args.claim,):
        grid = dict(GRIDS[args.device][claim], tvn_components=args.tvn_components)
        for name in ("seeds", "recipes", "models", "encoders", "plates", "pilot_lrs"):
            if getattr(args, name) is not None and (name in grid or name == "models"):
                grid[name] = getattr(args, name)
        if args.max_steps is not None and "max_steps" in grid:
            grid["max_steps"] = args.max_steps
        report = RUNNERS[claim](args.out, plate, shards, grid, args.device, changes, results)
        report.update(grid=grid, device=args.device, machine=_machine())
        (args.out / f"{claim}.json").write_text(json.dumps(report, indent=1) + "\n")
        if report.get("rows") or report.get("pilot"):
            figure = plot_claim(report, args.figures / f"claim_{claim}.png")
            print(f"{claim}: {args.out / f'{claim}.json'}; figure {figure}")


def _machine() -> dict:
    import platform

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
