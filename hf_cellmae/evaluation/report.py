"""From an embeddings table to the evaluation JSON and its plots.

An embeddings table (``cellmae embed`` writes one) has metadata columns prefixed ``Metadata_``
(pycytominer / copairs convention) and one numeric column per feature. ``evaluate_embeddings``
aligns it on controls (TVN by default), aggregates to one vector per perturbation, runs the
known-relationship recall benchmark, and writes ``eval_results.json``::

    {"dataset": str, "alignment": "tvn", "aggregation": "mean", "n_perturbations": int,
     "embedding_dim": int,
     "sources": {"CORUM": {"recall_0.05_0.95": f, "recall_0.10_0.90": f, "null_size": int, "query_size": int}, ...},
     "chance": {"recall_0.05_0.95": 0.10, "recall_0.10_0.90": 0.20},
     "baselines": {"random_init": {"sources": {...}}, "pixel_stats": {"sources": {...}}},   # when given
     "plots": {"recall": "recall.png", "heatmap": "complex_heatmap.png", "projection": "projection.png"},
     "skipped_sources": {name: reason}}                                                     # when any

``evaluate_synthetic`` does the same against a synthetic plate's own ``relationships/*.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError, ensure_writable_folder
from .options import EvaluateOptions
from .plots import pick_complex, plot_complex_heatmap, plot_projection, plot_recall, relationship_groups
from .relate import BENCHMARK_SOURCES, MIN_PERTURBATIONS, RECALL_THRESHOLDS, chance_recall, known_relationship_recall, load_relationships

METADATA_PREFIX = "Metadata_"
RESULTS_NAME = "eval_results.json"
PLOT_NAMES = {"recall": "recall.png", "heatmap": "complex_heatmap.png", "projection": "projection.png"}


def read_embeddings(path: str | Path) -> pd.DataFrame:
    """An embeddings table from a Parquet file or folder of parts, or a CSV file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"embeddings {path} not found; write them with `cellmae embed MODEL DATA {path}`")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.is_dir():  # a `cellmae embed` folder: its parts in order (hidden/temporary files excluded)
        parts = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not parts:
            raise FileNotFoundError(f"no Parquet part in {path}; is it a `cellmae embed` output folder?")
        return pd.concat([pd.read_parquet(part) for part in parts], ignore_index=True)
    return pd.read_parquet(path)


def split_table(table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """``Metadata_*`` columns and the (n, D) float feature matrix (every other column)."""
    metadata_columns = [c for c in table.columns if str(c).startswith(METADATA_PREFIX)]
    feature_columns = [c for c in table.columns if not str(c).startswith(METADATA_PREFIX)]
    if not feature_columns:
        raise ValueError(f"the table has no feature columns (only {metadata_columns}); is it an embeddings table?")
    not_numeric = [c for c in feature_columns if not pd.api.types.is_numeric_dtype(table[c])]
    if not_numeric:
        raise ValueError(
            f"feature columns must be numeric; {not_numeric[:5]} are not. Prefix metadata columns with "
            f"'{METADATA_PREFIX}' so they are not read as features"
        )
    return table[metadata_columns].reset_index(drop=True), table[feature_columns].to_numpy()


def control_mask(
    metadata: pd.DataFrame,
    perturbation_col: str,
    controls: Sequence[str] | None = None,
    control_col: str | None = None,
    required: bool = True,
) -> np.ndarray:
    """Which rows are controls: ``controls`` labels of the perturbation column, or a boolean column
    (``control_col``, default ``Metadata_is_control`` when present).

    With ``required=False`` (``alignment="none"``: nothing is fitted on controls) a table that names no
    controls has none: every row is a perturbation. Otherwise that is an error saying how to name them.
    """
    if controls:
        mask = metadata[perturbation_col].astype(str).isin([str(c) for c in controls]).to_numpy()
        if not mask.any():
            seen = metadata[perturbation_col].astype(str).value_counts().index[:8].tolist()
            raise ValueError(f"no row of {perturbation_col} is one of the controls {list(controls)}; values include {seen}")
        return mask
    control_col = control_col or (f"{METADATA_PREFIX}is_control" if f"{METADATA_PREFIX}is_control" in metadata else None)
    if control_col is None:
        if not required:
            return np.zeros(len(metadata), dtype=bool)
        raise ValueError(
            "say which rows are controls (the alignment is fitted on them; --alignment none needs none): --controls LABEL [LABEL ...] (values of the perturbation column) "
            f"or --control-col COLUMN (a boolean column such as {METADATA_PREFIX}is_control)"
        )
    _require_columns(metadata, [control_col])
    values = metadata[control_col]
    if values.dtype != bool:
        values = values.astype(str).str.lower().map({"true": True, "1": True, "false": False, "0": False})
        if values.isna().any():
            raise ValueError(f"{control_col} must hold booleans (True/False, 1/0); found {metadata[control_col].unique()[:5]}")
    return values.to_numpy(dtype=bool)


def _require_columns(metadata: pd.DataFrame, columns) -> None:
    missing = [c for c in columns if c is not None and c not in metadata.columns]
    if missing:
        raise ValueError(f"column(s) {missing} not in the table; metadata columns are {list(metadata.columns)}")


@dataclass
class ProfileMap:
    """One aligned vector per perturbation: ``labels`` (P,), ``vectors`` (P, D)."""

    labels: np.ndarray
    vectors: np.ndarray
    embedding_dim: int


def build_map(
    table: pd.DataFrame,
    perturbation_col: str = EvaluateOptions.perturbation_col,
    controls: Sequence[str] | None = None,
    control_col: str | None = None,
    batch_col: str | None = None,
    alignment: str = EvaluateOptions.alignment,
    aggregation: str = EvaluateOptions.aggregation,
    align_options: Mapping | None = None,
) -> ProfileMap:
    """Align the units of an embeddings table on its controls and aggregate per perturbation
    (``profiles.align_rows`` then ``profiles.perturbation_profiles``, as ``cellmae profiles``)."""
    from .profiles import align_rows, perturbation_profiles

    metadata, features = split_table(table)
    aligned, is_control = align_rows(metadata, features, perturbation_col, controls, control_col, batch_col,
                                     alignment, align_options)
    profiles = perturbation_profiles(metadata, aligned, is_control, perturbation_col, method=aggregation)
    return ProfileMap(profiles.keys.astype(str), profiles.vectors, features.shape[1])


# Metadata columns that may name a perturbation (offered when the perturbation column is missing).
_PERTURBATION_WORDS = ("perturbation", "gene", "compound", "treatment", "sirna", "orf", "pert", "broad_sample", "drug")


def missing_for_benchmark(table: pd.DataFrame, perturbation_col: str, controls, control_col, alignment: str,
                          min_perturbations: int) -> list[str]:
    """What the table lacks for the recall benchmark (empty when it can run), each with the flag that fixes it.

    A plate that cannot support the benchmark (one gene, no controls, no perturbation column) is then
    refused in one line that names every missing piece, not by the first check that trips.
    """
    metadata = table[[c for c in table.columns if str(c).startswith(METADATA_PREFIX)]]
    missing = []
    if perturbation_col not in metadata.columns:
        candidates = [c for c in metadata.columns if any(w in c.lower() for w in _PERTURBATION_WORDS)]
        missing.append(
            f"a perturbation column ({perturbation_col} is not in the table; "
            + (f"pass --perturbation-col {candidates[0]}" + (f" or one of {candidates[1:]}" if candidates[1:] else "")
               if candidates else "its metadata names no perturbation: add one per well to the table given to "
               "`cellmae shard --metadata`")
            + ")"
        )
        labels = metadata[candidates[0]] if candidates else None
    else:
        labels = metadata[perturbation_col]
    if labels is None:
        if alignment != "none":
            missing.append(f"control wells (alignment {alignment} is fitted on them; --alignment none needs none)")
        return missing
    frame = metadata.assign(**{perturbation_col: labels})
    try:
        is_control, why = control_mask(frame, perturbation_col, controls, control_col, required=False), ""
    except ValueError as error:  # named controls that are not in the table
        is_control, why = np.zeros(len(frame), dtype=bool), f"{error}; "
    if alignment != "none" and not is_control.any():
        missing.append(f"control wells ({why}alignment {alignment} is fitted on them: say which rows are controls with "
                       "--controls LABEL or --control-col COLUMN; --alignment none needs none)")
    treated = labels[~np.isin(labels, labels[is_control])]
    if treated.nunique() < min_perturbations:
        shown = ", ".join(map(str, treated.unique()[:5]))
        missing.append(f"perturbations: it has {treated.nunique()} ({shown}) where the null needs min_perturbations="
                       f"{min_perturbations} (--min-perturbations N for a coarse estimate)")
    return missing


def evaluate_embeddings(
    embeddings: str | Path | pd.DataFrame,
    sources: Sequence | Mapping = BENCHMARK_SOURCES,
    out_dir: str | Path | None = None,
    dataset: str | None = None,
    baselines: Mapping[str, str | Path | pd.DataFrame] | None = None,
    perturbation_col: str = EvaluateOptions.perturbation_col,
    controls: Sequence[str] | None = None,
    control_col: str | None = None,
    batch_col: str | None = None,
    alignment: str = EvaluateOptions.alignment,
    aggregation: str = EvaluateOptions.aggregation,
    align_options: Mapping | None = None,
    thresholds=RECALL_THRESHOLDS,
    null_samples: int | None = None,
    seed: int = EvaluateOptions.seed,
    on_unusable: str = "raise",
    annotations: str | Path | None = None,
    min_perturbations: int = MIN_PERTURBATIONS,
    plots: bool = True,
    progress: bool = True,
    suite: bool = True,
    probe_labels: Sequence[str] = (),
    consistency_col: str | None = None,
    cellprofiler: str | Path | pd.DataFrame | None = None,
    model_label: str = "model",
    well_cols: Sequence[str] | None = None,
) -> dict:
    """Evaluate an embeddings table (and optional baseline tables) and return the metrics dict.

    ``well_cols`` (suite): the columns naming a replicate unit (default: plate and well; rows from cells name it
    by plate, well and perturbation, since a pooled well holds every perturbation).

    Args:
        embeddings: table, or path to Parquet (file or folder) / CSV.
        sources: relationship sources (names in efaar_benchmarking's annotations, CSV paths, or a
            mapping name -> path/DataFrame).
        out_dir: where to write ``eval_results.json`` and the PNG plots (None: write nothing).
        dataset: dataset name for the report (default: the embeddings file name).
        baselines: ``{name: table or path}`` evaluated the same way (same sources, controls, alignment).
        perturbation_col, controls, control_col, batch_col: see ``build_map``/``control_mask``.
        alignment: "tvn" (default), "pca_center_scale", "center_scale" or "none".
        aggregation: "mean" or "median".
        align_options: extra options of the alignment (e.g. ``{"coral": True}``).
        thresholds, null_samples, seed, on_unusable, annotations, min_perturbations: see
            ``known_relationship_recall``.
        plots: write the PNG plots (needs ``out_dir``).
        suite: also run the rest of the paper's suite on the model and every baseline
            (``suite.evaluate_suite``: gene-set recall, replicate mAP, and with the options below a
            linear probe / kNN, consistency mAP and CellProfiler-feature prediction).
        probe_labels: metadata columns to probe, e.g. ``["complex", "gene"]``.
        consistency_col: per-perturbation group column for consistency mAP.
        cellprofiler: CellProfiler features of the same fields (table or path), the target of the
            CellProfiler-feature prediction (default: a baseline named ``"cellprofiler"``, if any).
        model_label: what the plots call the embeddings' featuriser (the demo's ``"pretrained"``); the
            results keep the key ``"model"``.

    Returns:
        The ``eval_results.json`` dict (see the module docstring).
    """
    options = dict(
        perturbation_col=perturbation_col, controls=controls, control_col=control_col, batch_col=batch_col,
        alignment=alignment, aggregation=aggregation, align_options=align_options,
    )
    recall_options = dict(
        thresholds=thresholds, null_samples=null_samples, seed=seed, on_unusable=on_unusable,
        annotations=annotations, min_perturbations=min_perturbations, progress=progress,
    )
    if out_dir is not None:
        ensure_writable_folder(out_dir, "evaluation results")  # before any work, not after it
    table = embeddings if isinstance(embeddings, pd.DataFrame) else read_embeddings(embeddings)
    missing = missing_for_benchmark(table, perturbation_col, controls, control_col, alignment, min_perturbations)
    if missing:
        name = "the table" if isinstance(embeddings, pd.DataFrame) else str(embeddings)
        raise UserError(f"{name} cannot support the benchmark; it lacks " + "; ".join(missing))
    named_sources = _named_sources(sources, annotations)
    profile = build_map(table, **options)
    recall = known_relationship_recall(profile.vectors, profile.labels, named_sources, **recall_options)
    if dataset is None:
        dataset = Path(embeddings).stem if not isinstance(embeddings, pd.DataFrame) else "embeddings"
    results = {
        "dataset": dataset,
        "alignment": alignment,
        "aggregation": aggregation,
        "n_perturbations": recall["n_perturbations"],
        "embedding_dim": profile.embedding_dim,
        "sources": recall["sources"],
        "chance": chance_recall(thresholds),
    }
    baseline_tables = {name: baseline if isinstance(baseline, pd.DataFrame) else read_embeddings(baseline)
                       for name, baseline in (baselines or {}).items()}
    if baseline_tables:
        results["baselines"] = {}
        for name, baseline_table in baseline_tables.items():
            baseline_map = build_map(baseline_table, **options)
            baseline_recall = known_relationship_recall(baseline_map.vectors, baseline_map.labels, named_sources, **recall_options)
            results["baselines"][name] = {"sources": baseline_recall["sources"]}
    if recall["skipped_sources"]:
        results["skipped_sources"] = recall["skipped_sources"]
    if suite:
        from .suite import evaluate_suite

        tables = {"model": table, **baseline_tables}
        if cellprofiler is None and "cellprofiler" in tables:
            cellprofiler = tables["cellprofiler"]
        elif cellprofiler is not None and not isinstance(cellprofiler, pd.DataFrame):
            cellprofiler = read_embeddings(cellprofiler)
        usable = {name: named_sources[name] for name in recall["sources"]}
        results["suite"] = evaluate_suite(
            tables, usable, probe_labels=probe_labels, consistency_col=consistency_col, cellprofiler=cellprofiler,
            perturbation_col=perturbation_col, controls=controls, control_col=control_col, batch_col=batch_col,
            alignment=alignment, align_options=align_options, seed=seed,
            out_dir=Path(out_dir) if (out_dir is not None and plots) else None, model_label=model_label,
            **({} if well_cols is None else {"well_cols": tuple(well_cols)}),
        )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if plots:
            results["plots"] = _write_plots(results, profile, named_sources, annotations, out_dir, model_label)
            for kind, key in (("suite", "plot"), ("cellprofiler", "cellprofiler_plot")):
                if key in results.get("suite", {}):
                    results["plots"][kind] = results["suite"][key]
        (out_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _named_sources(sources, annotations) -> dict:
    """Sources as an ordered mapping name -> canonical pair DataFrame (each file read once)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not isinstance(sources, Mapping):
        sources = {Path(s).stem if Path(s).suffix else str(s): s for s in sources}
    return {name: load_relationships(spec, annotations) for name, spec in sources.items()}


def _write_plots(results: dict, profile: ProfileMap, sources: Mapping[str, pd.DataFrame], annotations, out_dir: Path,
                 model_label: str = "model") -> dict:
    baselines = {name: entry["sources"] for name, entry in results.get("baselines", {}).items()}
    alignment = results["alignment"]
    plot_recall(results["sources"], out_dir / PLOT_NAMES["recall"], results["chance"], baselines,
                title=f"Recall of known relationships: {results['dataset']} ({alignment})", model_label=model_label)
    written = {"recall": PLOT_NAMES["recall"]}
    for name in results["sources"]:  # the first source with a usable complex
        pairs = sources[name]
        members = pick_complex(pairs, profile.labels)
        if len(members) >= 2:
            plot_complex_heatmap(profile.labels, profile.vectors, members, out_dir / PLOT_NAMES["heatmap"],
                                 title=f"Cosine similarity of {model_label} profiles after {alignment}, "
                                       f"{name} group around {members[0]}")
            plot_projection(profile.labels, profile.vectors, relationship_groups(pairs, profile.labels),
                            out_dir / PLOT_NAMES["projection"],
                            title=f"{model_label} profiles after {alignment} (PCA), coloured by {name} group")
            written.update(heatmap=PLOT_NAMES["heatmap"], projection=PLOT_NAMES["projection"])
            break
    return written


def relationship_files(plate_dir: str | Path) -> dict[str, Path]:
    """The synthetic plate's true relationships: ``{stem: path}`` of ``relationships/*.csv``."""
    folder = Path(plate_dir) / "relationships"
    files = {path.stem: path for path in sorted(folder.glob("*.csv"))}
    if not files:
        raise FileNotFoundError(
            f"no relationship files in {folder}; generate a synthetic plate with `cellmae synthetic {plate_dir}`"
        )
    return files


def evaluate_synthetic(
    embeddings: str | Path | pd.DataFrame,
    plate_dir: str | Path,
    out_dir: str | Path | None = None,
    baselines: Mapping[str, str | Path | pd.DataFrame] | None = None,
    **options,
) -> dict:
    """``evaluate_embeddings`` against a synthetic plate's own relationship files.

    The demo calls it with the pre-trained model's embeddings and, as ``baselines``, the tables of
    a randomly initialised encoder and of ``pixel_statistics`` (both written by ``embed_dataset``).
    Options are those of ``evaluate_embeddings`` (dataset defaults to the plate folder name).
    """
    options.setdefault("dataset", f"synthetic:{Path(plate_dir).name}")
    return evaluate_embeddings(embeddings, relationship_files(plate_dir), out_dir, baselines=baselines, **options)
