"""The data stage: plate images -> Parquet shards -> a streaming ``datasets.IterableDataset`` of crops.

- :mod:`~hf_cellmae.data.layouts`: find fields of view (RxRx, file-name patterns, load_data CSV, TIFF stacks).
- :mod:`~hf_cellmae.data.metadata`: join a metadata table (perturbation, batch, control flag...).
- :mod:`~hf_cellmae.data.channels`: which stain each file channel holds (metadata table or ``w1=AGP``, not position).
- :mod:`~hf_cellmae.data.shards`: write / verify shards with a manifest (``cellmae shard``).
- :mod:`~hf_cellmae.data.streaming`: :func:`stream_fields`, the training stream (ranks, workers, exact resume).
- :mod:`~hf_cellmae.data.standardize`: the per-channel standardisation the model expects.
- :mod:`~hf_cellmae.data.synthetic`: a synthetic screen with known biology (``cellmae synthetic``).

This package never imports the model.
"""

from .layouts import discover_fields
from .metadata import join_metadata
from .problems import BadInputError, ProblemLog
from .records import FieldRecord
from .shards import decode_pixels, load_manifest, shard_folder, verify_shards, write_shards
from .standardize import rescale_factor_for_dtype, standardize_channels
from .streaming import count_samples, stream_fields
from .synthetic import SyntheticScreenConfig, make_synthetic_screen

__all__ = [
    "BadInputError",
    "FieldRecord",
    "ProblemLog",
    "SyntheticScreenConfig",
    "count_samples",
    "decode_pixels",
    "discover_fields",
    "join_metadata",
    "load_manifest",
    "make_synthetic_screen",
    "rescale_factor_for_dtype",
    "shard_folder",
    "standardize_channels",
    "stream_fields",
    "verify_shards",
    "write_shards",
]
