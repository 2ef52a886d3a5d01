"""Evaluation stage: embeddings -> batch correction -> known-relationship recall -> report.

- ``embed``: fields of view -> Parquet table of ``Metadata_*`` + feature columns (``cellmae embed``).
- ``align``: control-based batch correction (center-scale, PCA-center-scale, TVN + CORAL) and aggregation.
- ``relate``: recall of known relationships, identical to efaar_benchmarking 1.0.
- ``report``: the evaluation JSON and plots (``cellmae evaluate``); ``evaluate_synthetic`` for the demo.
- ``pixel_stats``: per-channel pixel statistics, the baseline featuriser.
- ``probe``: linear probe / kNN of any metadata column, split by plate (or well).
- ``retrieval``: gene-set recall and copairs mean average precision.
- ``cellprofiler``: classical segmentation + cp-measure features (a baseline featuriser) and
  cross-validated ridge R² of predicting them from embeddings.
- ``suite``: all of the above for a model and its baselines side by side (``cellmae evaluate``).

Only ``embed`` imports the model (lazily); the rest needs numpy, pandas and matplotlib.
"""

from .align import aggregate, align, center_scale, pca_center_scale, tvn
from .pixel_stats import pixel_statistic_names, pixel_statistics
from .relate import (
    BENCHMARK_SOURCES,
    RECALL_THRESHOLDS,
    chance_recall,
    compute_recall,
    known_relationship_recall,
    load_relationships,
)
from .probe import plot_probe, probe_embeddings
from .report import build_map, evaluate_embeddings, evaluate_synthetic, read_embeddings, relationship_files
from .retrieval import consistency_map, gene_set_recall, replicate_map
from .suite import evaluate_suite, plot_suite, suite_rows

__all__ = [
    "BENCHMARK_SOURCES",
    "RECALL_THRESHOLDS",
    "aggregate",
    "align",
    "build_map",
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
    "replicate_map",
    "plot_suite",
    "read_embeddings",
    "relationship_files",
    "suite_rows",
    "tvn",
]
