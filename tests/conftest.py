"""Fixtures shared by the test files (their helper modules are in tests/helpers/)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """A small synthetic plate (64 px fields, 5 channels, 16-bit) written as shards, once per session."""
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import make_synthetic_screen

    root = tmp_path_factory.mktemp("synthetic")
    plate = make_synthetic_screen(
        root / "plate",
        num_plates=1,
        field_size=64,
        num_pathways=1,
        complexes_per_pathway=2,
        genes_per_complex=2,
        control_wells_per_plate=4,
        sites_per_well=2,
        num_workers=1,
        progress=False,
    )
    shard_folder(
        plate["images"],
        root / "shards",
        metadata=plate["metadata"],
        channel_names=plate["channels"],
        progress=False,
        fields_per_row_group=2,
    )
    return root / "shards"
