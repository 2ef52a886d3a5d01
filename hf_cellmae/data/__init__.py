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

from ..lazy_exports import lazy_exports

# Public names and the module defining each: imported on first use, so `cellmae --help`
# (which imports every stage's commands module) stays fast.
_EXPORTS = {
    "discover_fields": ".layouts",
    "join_metadata": ".metadata",
    "BadInputError": ".problems",
    "ProblemLog": ".problems",
    "FieldRecord": ".records",
    "decode_pixels": ".shards",
    "load_manifest": ".shards",
    "shard_folder": ".shards",
    "verify_shards": ".shards",
    "write_shards": ".shards",
    "rescale_factor_for_dtype": ".standardize",
    "standardize_channels": ".standardize",
    "count_samples": ".streaming",
    "stream_fields": ".streaming",
    "SyntheticScreenConfig": ".synthetic",
    "make_synthetic_screen": ".synthetic",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


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
