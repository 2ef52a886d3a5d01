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
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import UserError, ensure_writable_folder
from .options import EvaluateOptions, evaluate_options
from .plots import pick_complex, plot_complex_heatmap, plot_projection, plot_recall, relationship_groups
from .relate import chance_recall, known_relationship_recall, load_relationships
from .suite import evaluate_suite
from .tables import WELL_COLUMNS, aligned_profiles, control_mask, is_metadata, read_embeddings

RESULTS_NAME = "eval_results.json"
PLOT_NAMES = {"recall": "recall.png", "heatmap": "complex_heatmap.png", "projection": "projection.png"}


# Metadata columns that may name a perturbation (offered when the perturbation column is missing).
_PERTURBATION_WORDS = ("perturbation", "gene", "compound", "treatment", "sirna", "orf", "pert", "broad_sample", "drug")


def missing_for_benchmark(table: pd.DataFrame, options: EvaluateOptions) -> list[str]:
    """What the table lacks for the recall benchmark (empty when it can run), each with the flag that fixes it.

    A plate that cannot support the benchmark (one gene, no controls, no perturbation column) is then
    refused in one line that names every missing piece, not by the first check that trips.
    """
    perturbation_col, controls, control_col = options.perturbation_col, options.controls, options.control_col
    alignment, min_perturbations = options.alignment, options.min_perturbations
    metadata = table[[c for c in table.columns if is_metadata(c)]]
    missing = []
    if perturbation_col not in metadata.columns:
        candidates = [c for c in metadata.columns if any(w in c.lower() for w in _PERTURBATION_WORDS)]
        missing.append(
            f"a perturbation column ({perturbation_col} is not in the table; "
            + (
                f"pass --perturbation-col {candidates[0]}" + (f" or one of {candidates[1:]}" if candidates[1:] else "")
                if candidates
                else "its metadata names no perturbation: add one per well to the table given to "
                "`cellmae shard --metadata`"
            )
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
        missing.append(
            f"control wells ({why}alignment {alignment} is fitted on them: say which rows are controls with "
            "--controls LABEL or --control-col COLUMN; --alignment none needs none)"
        )
    treated = labels[~np.isin(labels, labels[is_control])]
    if treated.nunique() < min_perturbations:
        shown = ", ".join(map(str, treated.unique()[:5]))
        missing.append(
            f"perturbations: it has {treated.nunique()} ({shown}) where the null needs min_perturbations="
            f"{min_perturbations} (--min-perturbations N for a coarse estimate)"
        )
    return missing


def evaluate_embeddings(
    embeddings: str | Path | pd.DataFrame,
    options: EvaluateOptions | None = None,
    *,
    baselines: Mapping[str, str | Path | pd.DataFrame] | None = None,
    well_cols: Sequence[str] | None = None,
    **settings,
) -> dict:
    """Evaluate an embeddings table (and optional baseline tables) and return the metrics dict.

    Args:
        embeddings: table, or path to Parquet (file or folder) / CSV.
        options: ``cellmae evaluate``'s options, read whole (default: its defaults). ``sources`` are names in
            efaar_benchmarking's annotations, CSV paths, or (from Python) a mapping name -> path/DataFrame;
            ``synthetic_plate`` uses that plate's ``relationships/*.csv`` instead; ``out`` is where
            ``eval_results.json`` and the plots go (None: nothing is written); the suite (``suite.evaluate_suite``:
            gene-set recall, replicate mAP, and with ``probe``, ``consistency_col`` and ``cellprofiler`` a linear
            probe / kNN, consistency mAP and CellProfiler-feature prediction) runs unless ``no_suite``.
            ``cellprofiler`` may be a table (default: a baseline named ``"cellprofiler"``, if any).
        baselines: ``{name: table or path}`` evaluated the same way (same sources, controls, alignment).
        well_cols: the columns naming a replicate unit for the suite (default: plate and well; rows from cells name
            it by plate, well and perturbation, since a pooled well holds every perturbation).
        settings: options in Python's spelling (``evaluate_options``), replacing those of ``options``:
            ``batch_col="Metadata_plate"``, ``out_dir=...``, ``probe_labels=[...]``, ``align_options={...}``,
            ``progress=False``...

    Returns:
        The ``eval_results.json`` dict (see the module docstring).
    """
    if options is not None and not isinstance(options, EvaluateOptions):
        raise TypeError(
            f"evaluate_embeddings(table, options): options is an EvaluateOptions, not a "
            f"{type(options).__name__}; give relationship sources as sources=..."
        )
    options = evaluate_options(options, **settings)
    out_dir, thresholds = options.out, options.recall_thresholds()
    recall_options = dict(
        thresholds=thresholds,
        null_samples=options.null_samples,
        seed=options.seed,
        on_unusable="skip" if options.skip_unusable else "raise",
        annotations=options.annotations,
        min_perturbations=options.min_perturbations,
        progress=not options.no_progress,
    )
    if out_dir is not None:
        ensure_writable_folder(out_dir, "evaluation results")  # before any work, not after it
    table = embeddings if isinstance(embeddings, pd.DataFrame) else read_embeddings(embeddings)
    missing = missing_for_benchmark(table, options)
    if missing:
        name = "the table" if isinstance(embeddings, pd.DataFrame) else str(embeddings)
        raise UserError(f"{name} cannot support the benchmark; it lacks " + "; ".join(missing))
    sources = relationship_files(options.synthetic_plate) if options.synthetic_plate else options.sources
    named_sources = _named_sources(sources, options.annotations)
    aligned = {"model": aligned_profiles(table, options)}  # each table aligned once, for the recall and the suite
    labels, vectors = aligned["model"].perturbations(options.aggregation)
    recall = known_relationship_recall(vectors, labels, named_sources, **recall_options)
    dataset = options.dataset
    if dataset is None:
        dataset = Path(embeddings).stem if not isinstance(embeddings, pd.DataFrame) else "embeddings"
    results = {
        "dataset": dataset,
        "alignment": options.alignment,
        "aggregation": options.aggregation,
        "n_perturbations": recall["n_perturbations"],
        "embedding_dim": aligned["model"].embedding_dim,
        "sources": recall["sources"],
        "chance": chance_recall(thresholds),
    }
    baseline_tables = {
        name: baseline if isinstance(baseline, pd.DataFrame) else read_embeddings(baseline)
        for name, baseline in (baselines or {}).items()
    }
    if baseline_tables:
        results["baselines"] = {}
        for name, baseline_table in baseline_tables.items():
            baseline = aligned_profiles(baseline_table, options)
            if not options.no_suite:  # the suite reads it again; without the suite it is not kept
                aligned[name] = baseline
            baseline_labels, baseline_vectors = baseline.perturbations(options.aggregation)
            baseline_recall = known_relationship_recall(
                baseline_vectors, baseline_labels, named_sources, **recall_options
            )
            results["baselines"][name] = {"sources": baseline_recall["sources"]}
    if recall["skipped_sources"]:
        results["skipped_sources"] = recall["skipped_sources"]
    plots = not options.no_plots
    if not options.no_suite:
        tables = {"model": table, **baseline_tables}
        cellprofiler = options.cellprofiler
        if cellprofiler is None and "cellprofiler" in tables:
            cellprofiler = tables["cellprofiler"]
        elif cellprofiler is not None and not isinstance(cellprofiler, pd.DataFrame):
            cellprofiler = read_embeddings(cellprofiler)
        usable = {name: named_sources[name] for name in recall["sources"]}
        results["suite"] = evaluate_suite(
            tables,
            usable,
            options,
            cellprofiler=cellprofiler,
            well_cols=tuple(well_cols or WELL_COLUMNS),
            out_dir=Path(out_dir) if (out_dir is not None and plots) else None,
            aligned=aligned,
        )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if plots:
            results["plots"] = _write_plots(results, labels, vectors, named_sources, out_dir, options.model_label)
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


def _write_plots(
    results: dict,
    labels: np.ndarray,
    vectors: np.ndarray,
    sources: Mapping[str, pd.DataFrame],
    out_dir: Path,
    model_label: str = "model",
) -> dict:
    """The recall plot, and the heatmap and projection of the first source with a usable complex, from the model's
    per-perturbation profiles: ``labels`` (P,), ``vectors`` (P, D')."""
    baselines = {name: entry["sources"] for name, entry in results.get("baselines", {}).items()}
    alignment = results["alignment"]
    plot_recall(
        results["sources"],
        out_dir / PLOT_NAMES["recall"],
        results["chance"],
        baselines,
        title=f"Recall of known relationships: {results['dataset']} ({alignment})",
        model_label=model_label,
    )
    written = {"recall": PLOT_NAMES["recall"]}
    for name in results["sources"]:  # the first source with a usable complex
        pairs = sources[name]
        members = pick_complex(pairs, labels)
        if len(members) >= 2:
            plot_complex_heatmap(
                labels,
                vectors,
                members,
                out_dir / PLOT_NAMES["heatmap"],
                title=f"Cosine similarity of {model_label} profiles after {alignment}, "
                f"{name} group around {members[0]}",
            )
            plot_projection(
                labels,
                vectors,
                relationship_groups(pairs, labels),
                out_dir / PLOT_NAMES["projection"],
                title=f"{model_label} profiles after {alignment} (PCA), coloured by {name} group",
            )
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
    options: EvaluateOptions | None = None,
    **settings,
) -> dict:
    """``evaluate_embeddings`` against a synthetic plate's own relationship files.

    The demo calls it with the pre-trained model's embeddings and, as ``baselines``, the tables of
    a randomly initialised encoder and of ``pixel_statistics`` (both written by ``embed_dataset``).
    Options and settings are those of ``evaluate_embeddings`` (dataset defaults to the plate folder name).
    """
    options = evaluate_options(options, **settings)
    dataset = options.dataset or f"synthetic:{Path(plate_dir).name}"
    relationship_files(plate_dir)  # a plate without relationships is refused before any work
    where = {} if out_dir is None else {"out_dir": out_dir}
    return evaluate_embeddings(
        embeddings, options, baselines=baselines, dataset=dataset, synthetic_plate=str(plate_dir), **where
    )
