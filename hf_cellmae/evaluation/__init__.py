"""Evaluation stage: embeddings -> batch correction -> known-relationship recall -> report.

- ``embed``: fields of view -> Parquet table of ``Metadata_*`` + feature columns (``cellmae embed``).
- ``align``: control-based batch correction (center-scale, PCA-center-scale, TVN + CORAL) and aggregation.
- ``relate``: recall of known relationships, identical to efaar_benchmarking 1.0.
- ``tables``: an embeddings table read, split into metadata and features, its controls, aligned on them (once).
- ``report``: the evaluation JSON and plots (``cellmae evaluate``); ``evaluate_synthetic`` for the demo.
- ``pixel_stats``: per-channel pixel statistics, the baseline featuriser.
- ``probe``: linear probe / kNN of any metadata column, split by plate (or well).
- ``retrieval``: gene-set recall and copairs mean average precision.
- ``cellprofiler``: classical segmentation + cp-measure features (a baseline featuriser) and
  cross-validated ridge R² of predicting them from embeddings.
- ``profiles``: fields -> wells -> aligned -> perturbations, written as Parquet or h5ad (``cellmae profiles``);
  ``evaluate`` uses its aggregation and alignment steps.
- ``single_cell``: one row per cell (``cellmae embed --single-cell``): cell crops, only the cell's patch tokens.
- ``cells``: per-cell read-out joined to cells, cells -> (well, perturbation) rows (``--cells`` of evaluate/profiles).
- ``suite``: all of the above for a model and its baselines side by side (``cellmae evaluate``).
- ``options``: the options of ``cellmae embed``, ``cellmae evaluate`` and ``cellmae profiles``, one dataclass
  each (their defaults), passed whole into ``embed_dataset``, ``evaluate_embeddings`` and ``write_profiles``.

Only ``embed`` imports the model (lazily); the rest needs numpy, pandas and matplotlib.
"""

from ..lazy_exports import lazy_exports

# numpy only; eager because the function `align` shares its module's name.
from .align import aggregate, align, center_scale, pca_center_scale, tvn

# Public names and the module defining each: imported on first use, so `cellmae --help`
# (which imports every stage's commands module) stays fast.
_EXPORTS = {
    "pixel_statistic_names": ".pixel_stats",
    "pixel_statistics": ".pixel_stats",
    "BENCHMARK_SOURCES": ".relate",
    "RECALL_THRESHOLDS": ".relate",
    "chance_recall": ".relate",
    "compute_recall": ".relate",
    "known_relationship_recall": ".relate",
    "load_relationships": ".relate",
    "plot_probe": ".probe",
    "probe_embeddings": ".probe",
    "aligned_profiles": ".tables",
    "read_embeddings": ".tables",
    "split_table": ".tables",
    "evaluate_embeddings": ".report",
    "evaluate_synthetic": ".report",
    "relationship_files": ".report",
    "consistency_map": ".retrieval",
    "gene_set_recall": ".retrieval",
    "replicate_map": ".retrieval",
    "group_profiles": ".profiles",
    "write_profiles": ".profiles",
    "SingleCellFeaturizer": ".single_cell",
    "CellOptions": ".single_cell",
    "join_cell_labels": ".cells",
    "aggregate_cells": ".cells",
    "evaluate_suite": ".suite",
    "plot_suite": ".suite",
    "suite_rows": ".suite",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "BENCHMARK_SOURCES",
    "CellOptions",
    "SingleCellFeaturizer",
    "aggregate_cells",
    "join_cell_labels",
    "RECALL_THRESHOLDS",
    "aggregate",
    "align",
    "aligned_profiles",
    "center_scale",
    "chance_recall",
    "compute_recall",
    "evaluate_embeddings",
    "evaluate_suite",
    "evaluate_synthetic",
    "known_relationship_recall",
    "load_relationships",
    "pca_center_scale",
    "pixel_statistic_names",
    "pixel_statistics",
    "plot_probe",
    "probe_embeddings",
    "consistency_map",
    "gene_set_recall",
    "group_profiles",
    "replicate_map",
    "plot_suite",
    "read_embeddings",
    "relationship_files",
    "split_table",
    "suite_rows",
    "tvn",
    "write_profiles",
]
