"""The paper's evaluation suite on any set of embedding tables, side by side.

Kraus et al. (2024) judge a representation by more than one number. ``evaluate_suite`` runs, for a
model's table and each baseline table (random-init encoder, pixel statistics, CellProfiler features):

* **linear probe / kNN** of metadata columns, leave one plate out (``probe.probe_embeddings``);
* **gene-set recall**: for each perturbation, the share of its annotated partners among its nearest
  neighbours, on the aligned per-perturbation profiles (``retrieval.gene_set_recall``);
* **replicate mAP**: copairs mean average precision of retrieving a perturbation's replicate wells
  against control wells (phenotypic activity), and, with ``consistency_col``, of retrieving
  same-group perturbations (phenotypic consistency; ``retrieval``);
* **CellProfiler-feature prediction**: cross-validated ridge R² per CellProfiler category
  (``cellprofiler.cellprofiler_prediction``), when a CellProfiler table of the same fields is given.

It returns ``{"featurizers": {name: {"probe": {label: {"logistic", "knn", ...}}, "gene_set_recall":
{source: {"recall", "chance"}}, "replicate_map": {...}, "consistency_map": {...},
"cellprofiler_prediction": {...}}}, "plot": "suite.png", "cellprofiler_plot": "cellprofiler_r2.png"}`` (see ``evaluate_embeddings``, which
embeds it under ``"suite"`` in ``eval_results.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .options import EvaluateOptions
from .tables import (
    METADATA_PREFIX,
    WELL_COLUMNS,
    AlignedTable,
    aligned_profiles,
    control_mask,
    metadata_column,
    well_profiles,
)

SUITE_PLOT = "suite.png"
CELLPROFILER_PLOT = "cellprofiler_r2.png"  # median R² per CellProfiler category, one bar per featuriser


def evaluate_suite(
    tables: Mapping[str, pd.DataFrame],
    pairs: Mapping[str, pd.DataFrame] | None = None,
    options: EvaluateOptions | None = None,
    cellprofiler: pd.DataFrame | None = None,
    well_cols: Sequence[str] = WELL_COLUMNS,
    null_size: int = 1000,
    out_dir: str | Path | None = None,
    aligned: Mapping[str, AlignedTable] | None = None,
) -> dict:
    """Every evaluation of the suite for each table in ``tables`` (``{featuriser name: table}``).

    Args:
        tables: embedding tables (``Metadata_*`` + feature columns), the model's first.
        pairs: ``{source: DataFrame with entity1, entity2}`` known relationships for gene-set recall.
        options: ``cellmae evaluate``'s; the suite reads the alignment (``tables.align_rows``), ``probe`` (metadata
            columns to probe, ``Metadata_`` prefix optional), ``consistency_col`` (per-perturbation group column
            for consistency mAP), ``seed`` and ``model_label``.
        cellprofiler: CellProfiler features of the same fields (``cellmae embed cellprofiler``), the
            target of the prediction; a table that *is* this one is not scored against itself.
        well_cols: columns naming a well (the replicate unit); a table without all of them (already one row per
            well, or per replicate) is used as is.
        null_size: copairs null distribution (with ``options.seed``).
        out_dir: where to write the comparison plot ``suite.png`` (None: no plot).
        aligned: ``{name: tables.aligned_profiles(table, options)}`` already computed (``evaluate_embeddings``
            aligns each table once for the recall and the suite); the others are aligned here.
    """
    from .cellprofiler import cellprofiler_prediction
    from .probe import probe_embeddings
    from .retrieval import consistency_map, gene_set_recall, replicate_map

    options = options or EvaluateOptions()
    perturbation_col, seed, model_label = options.perturbation_col, options.seed, options.model_label
    results = {}
    for name, table in tables.items():
        rows = (aligned or {}).get(name) or aligned_profiles(table, options)
        metadata = rows.metadata
        entry: dict = {}
        if options.probe:
            entry["probe"] = {}
            for label in options.probe:
                logistic = probe_embeddings(
                    table,
                    label,
                    batch_col=options.batch_col or "Metadata_plate",
                    control_col=options.control_col or "Metadata_is_control",
                )
                knn = probe_embeddings(
                    table,
                    label,
                    classifier="knn",
                    batch_col=options.batch_col or "Metadata_plate",
                    control_col=options.control_col or "Metadata_is_control",
                )
                entry["probe"][logistic["label"]] = {
                    "logistic": logistic["accuracy"],
                    "logistic_std": logistic["accuracy_std"],
                    "knn": knn["accuracy"],
                    "knn_std": knn["accuracy_std"],
                    "chance": logistic["chance_uniform"],
                    "n_classes": logistic["n_classes"],
                    "n_wells": logistic["n_units"],
                    "split": logistic["split"],
                }
        treated = ~np.isin(rows.labels(), rows.control_labels())
        genes, profiles = rows.perturbations()
        if pairs:
            entry["gene_set_recall"] = {}
            for source, frame in pairs.items():
                try:
                    scored = gene_set_recall(profiles, list(genes), zip(frame["entity1"], frame["entity2"]))
                except ValueError as error:  # no pair among these perturbations
                    entry["gene_set_recall"][source] = {"skipped": str(error)}
                    continue
                entry["gene_set_recall"][source] = {k: scored[k] for k in ("recall", "chance", "n_genes_scored")}
        if all(c in metadata.columns for c in well_cols):
            wells, well_vectors = well_profiles(metadata, rows.aligned, well_cols)
        else:
            wells, well_vectors = metadata, rows.aligned
        well_controls = control_mask(
            wells, perturbation_col, options.controls, options.control_col, required=options.alignment != "none"
        )
        if well_controls.any() and (~well_controls).any():
            entry["replicate_map"] = replicate_map(
                wells,
                well_vectors,
                perturbation_col,
                well_controls,
                well_cols=tuple(well_cols),
                null_size=null_size,
                seed=seed,
            )
        if options.consistency_col:
            column = metadata_column(options.consistency_col)
            group_of = metadata[treated].groupby(perturbation_col)[column].first()
            entry["consistency_map"] = consistency_map(
                profiles, list(genes), [group_of.get(g) for g in genes], null_size=null_size, seed=seed
            )
        if cellprofiler is not None and table is not cellprofiler:
            entry["cellprofiler_prediction"] = cellprofiler_prediction(table, cellprofiler, seed=seed)
            entry["cellprofiler_prediction"].pop(
                "per_feature"
            )  # thousands of numbers; the categories are the read-out
        results[name] = entry
    report = {"featurizers": results}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_suite(report, out_dir / SUITE_PLOT, model_label=model_label, alignment=options.alignment)
        report["plot"] = SUITE_PLOT
        predicted = {
            (model_label if name == "model" else name): entry["cellprofiler_prediction"]
            for name, entry in results.items()
            if "cellprofiler_prediction" in entry
        }
        if predicted:
            from .cellprofiler import plot_cellprofiler_prediction

            plot_cellprofiler_prediction(predicted, out_dir / CELLPROFILER_PLOT)
            report["cellprofiler_plot"] = CELLPROFILER_PLOT
    return report


def suite_rows(report: dict) -> dict[str, dict[str, float]]:
    """One flat row of headline numbers per featuriser: ``{name: {metric: value}}`` (for tables and plots)."""
    rows = {}
    for name, entry in report["featurizers"].items():
        row = {}
        for label, probe in entry.get("probe", {}).items():
            short = label.removeprefix(METADATA_PREFIX)
            row[f"probe {short}"] = probe["logistic"]
            row[f"kNN {short}"] = probe["knn"]
        for source, scored in entry.get("gene_set_recall", {}).items():
            if "recall" in scored:
                row[f"gene-set recall {source}"] = scored["recall"]
        if "replicate_map" in entry:
            row["replicate mAP"] = entry["replicate_map"]["mean_map"]
        if "consistency_map" in entry:
            row["consistency mAP"] = entry["consistency_map"]["mean_map"]
        if "cellprofiler_prediction" in entry:
            row["CellProfiler R² (median)"] = entry["cellprofiler_prediction"]["median_r2"]
        rows[name] = row
    return rows


def suite_spread(report: dict) -> dict[str, dict[str, float]]:
    """The standard deviation beside each headline number that has one (the probes' over their folds), as `suite_rows`."""
    spread = {}
    for name, entry in report["featurizers"].items():
        row = {}
        for label, probe in entry.get("probe", {}).items():
            short = label.removeprefix(METADATA_PREFIX)
            row[f"probe {short}"] = probe.get("logistic_std", np.nan)
            row[f"kNN {short}"] = probe.get("knn_std", np.nan)
        spread[name] = row
    return spread


def suite_chance(report: dict) -> dict[str, float]:
    """The chance level of each headline metric that has one: probes and kNN (1 / classes), gene-set recall."""
    first = next(iter(report["featurizers"].values()), {})
    chances = {}
    for label, probe in first.get("probe", {}).items():
        short = label.removeprefix(METADATA_PREFIX)
        chances[f"probe {short}"] = chances[f"kNN {short}"] = probe["chance"]
    chances.update(
        {f"gene-set recall {s}": v["chance"] for s, v in first.get("gene_set_recall", {}).items() if "chance" in v}
    )
    return chances


def plot_suite(report: dict, path: str | Path, model_label: str = "model", alignment: str | None = None) -> Path:
    """Grouped bars, one group per metric, one bar per featuriser, with the spread where there is one (error bars)
    and chance where it is defined (dashed); `model_label` names the model, `alignment` goes into the title."""
    fig = suite_figure(report, model_label, alignment)
    fig.savefig(path, dpi=120)
    return Path(path)


def suite_figure(report: dict, model_label: str = "model", alignment: str | None = None):
    """The figure :func:`plot_suite` writes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows, spread, chances = suite_rows(report), suite_spread(report), suite_chance(report)
    names = list(rows)
    metrics = list(dict.fromkeys(m for row in rows.values() for m in row))
    fig = Figure(figsize=(max(6.0, 1.0 * len(metrics) * max(1, len(names)) * 0.45 + 2), 4.4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        values = [rows[name].get(m, np.nan) for m in metrics]
        errors = [spread[name].get(m, np.nan) for m in metrics]
        positions = np.arange(len(metrics)) + (k - (len(names) - 1) / 2) * width
        bars = ax.bar(
            positions, values, width, label=model_label if name == "model" else name, color=colormaps["tab10"](k)
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        spread_at = [i for i, error in enumerate(errors) if np.isfinite(error)]
        if spread_at:
            ax.errorbar(
                positions[spread_at],
                np.asarray(values)[spread_at],
                yerr=np.asarray(errors)[spread_at],
                fmt="none",
                ecolor="black",
                elinewidth=0.8,
                capsize=2,
            )
    for i, metric in enumerate(metrics):
        if metric in chances:
            ax.hlines(
                chances[metric],
                i - 0.45,
                i + 0.45,
                colors="black",
                linestyles="--",
                linewidth=1,
                label="chance" if i == min(j for j, m in enumerate(metrics) if m in chances) else None,
            )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(np.arange(len(metrics)), metrics, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("score")
    after = f"; recall and mAP after {alignment}" if alignment else ""
    ax.set_title(
        f"Evaluation suite: {model_label} and baselines side by side{after}\n"
        "dashed: chance; error bars: ± sd of the probes over their held-out folds",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["evaluate_suite", "plot_suite", "suite_chance", "suite_figure", "suite_rows", "suite_spread"]
