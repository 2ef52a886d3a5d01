"""Shared test setup: make helper modules in tests/ importable and locate the real images."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import pytest

DATA = TESTS.parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """A small synthetic plate (64 px fields, 5 channels, 16-bit) written as shards, once per session."""
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import make_synthetic_screen

    root = tmp_path_factory.mktemp("synthetic")
    plate = make_synthetic_screen(
        root / "plate", num_plates=1, field_size=64, num_pathways=1, complexes_per_pathway=2, genes_per_complex=2,
        control_wells_per_plate=4, sites_per_well=2, num_workers=1, progress=False,
    )
    shard_folder(plate["images"], root / "shards", metadata=plate["metadata"], channel_names=plate["channels"],
                 progress=False, fields_per_row_group=2)
    return root / "shards"
