"""The training stream: crops, augmentation, standardisation, rank x worker sharding, exact resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_cellmae.data.shards import shard_folder
from hf_cellmae.data.standardize import standardize_channels
from hf_cellmae.data.streaming import count_samples, stream_fields
from tests.helpers.data_fixtures import make_rxrx_plate, write_plate_metadata

CROPS = 3
SIZE = 16


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    """12 random 3 x 32 x 40 uint16 fields in 4 shards of row groups of 2 fields, with metadata."""
    root = tmp_path_factory.mktemp("plate")
    fields = make_rxrx_plate(root / "images")
    write_plate_metadata(root / "metadata.csv", fields)
    shards = root / "shards"
    shard_folder(
        root / "images",
        shards,
        metadata=root / "metadata.csv",
        target_shard_size=3 * 32 * 40 * 2 * 3,
        fields_per_row_group=2,
        num_workers=1,
        progress=False,
    )
    return {"fields": fields, "shards": str(shards)}


def _keys(samples) -> list[tuple[str, int]]:
    return [(s["field_id"], s["crop_index"]) for s in samples]


def _undo_nothing_crop(field: np.ndarray, sample: dict) -> np.ndarray:
    """The crop a sample should hold, recomputed from the original field and the sample's crop/transform."""
    y, x, t = sample["crop_y"], sample["crop_x"], sample["transform"]
    crop = np.rot90(field[:, y : y + SIZE, x : x + SIZE], k=t % 4, axes=(-2, -1))
    return crop[..., ::-1] if t >= 4 else crop


def _collect(loader) -> list[tuple[str, int]]:
    keys = []
    for batch in loader:
        keys += list(zip(batch["field_id"], batch["crop_index"].tolist()))
    return keys


def test_two_ranks_two_workers_cover_every_sample_once(plate):
    seen = []
    for rank in range(2):
        stream = stream_fields(
            plate["shards"], image_size=SIZE, crops_per_field=CROPS, rank=rank, world_size=2, num_workers=2
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
        keys = _collect(loader)
        assert len(keys) == count_samples(plate["shards"], CROPS, rank=rank, world_size=2, num_workers=2)
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1])
    everything = Counter(seen[0] + seen[1])
    assert everything == Counter((field_id, c) for field_id in plate["fields"] for c in range(CROPS))
    assert abs(len(seen[0]) - len(seen[1])) <= 2


def test_accelerate_style_shard_gives_disjoint_cover(plate):
    """accelerate (dispatch_batches=False) calls stream.shard(num_shards=world_size, index=rank)."""
    full = stream_fields(plate["shards"], image_size=SIZE, crops_per_field=CROPS, world_size=2, num_workers=2)
    per_rank = [_keys(full.shard(num_shards=2, index=rank)) for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(_keys(full))
    assert len(per_rank[0]) + len(per_rank[1]) == len(plate["fields"]) * CROPS


def test_stream_resumes_at_exact_sample(plate):
    stream = stream_fields(plate["shards"], image_size=SIZE, crops_per_field=CROPS, seed=3)
    iterator = iter(stream)
    for _ in range(13):
        next(iterator)
    state = stream.state_dict()
    rest = list(iterator)
    resumed = stream_fields(plate["shards"], image_size=SIZE, crops_per_field=CROPS, seed=3)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert _keys(again) == _keys(rest) and len(rest) == len(plate["fields"]) * CROPS - 13
    for a, b in zip(again, rest):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])


def test_order_is_deterministic_per_seed_and_epoch(plate):
    def run(seed, epoch):
        samples = list(stream_fields(plate["shards"], image_size=SIZE, crops_per_field=CROPS, seed=seed, epoch=epoch))
        return _keys(samples), [(s["crop_y"], s["crop_x"], s["transform"]) for s in samples]

    first, again, next_epoch = run(0, 0), run(0, 0), run(0, 1)
    assert first == again
    assert first[0] != next_epoch[0] and sorted(first[0]) == sorted(next_epoch[0])
    assert first[1] != next_epoch[1]


def test_crops_are_the_original_pixels_after_the_reported_transform(plate):
    stream = stream_fields(plate["shards"], image_size=SIZE, crops_per_field=CROPS, standardize=False, augment=True)
    samples = list(stream)
    assert {s["transform"] for s in samples} != {0}
    for sample in samples:
        assert sample["pixel_values"].dtype == np.uint16 and sample["pixel_values"].shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(
            sample["pixel_values"], _undo_nothing_crop(plate["fields"][sample["field_id"]], sample)
        )


def test_uncopied_views_hold_the_same_pixels_as_contiguous_copies(plate):
    options = dict(image_size=SIZE, crops_per_field=CROPS, standardize=False, augment=True)
    copies = list(stream_fields(plate["shards"], **options))
    views = list(stream_fields(plate["shards"], contiguous=False, **options))
    assert all(c["pixel_values"].flags["C_CONTIGUOUS"] for c in copies)
    assert not all(v["pixel_values"].flags["C_CONTIGUOUS"] for v in views)
    for copy, view in zip(copies, views):
        np.testing.assert_array_equal(copy["pixel_values"], view["pixel_values"])


def test_standardised_pixels_follow_the_normalisation_contract(plate):
    raw = list(stream_fields(plate["shards"], image_size=SIZE, crops_per_field=CROPS, standardize=False))
    standardised = list(stream_fields(plate["shards"], image_size=SIZE, crops_per_field=CROPS))
    for r, s in zip(raw, standardised):
        assert s["pixel_values"].dtype == np.float32
        np.testing.assert_allclose(s["pixel_values"], standardize_channels(r["pixel_values"]), atol=1e-5)
        np.testing.assert_allclose(s["pixel_values"].mean(axis=(1, 2)), 0.0, atol=1e-4)


def test_channel_subset_picks_channels_and_reports_their_ids(plate):
    samples = list(stream_fields(plate["shards"], image_size=SIZE, channel_subset=2, standardize=False, augment=False))
    assert len({tuple(s["channel_ids"]) for s in samples}) > 1  # subsets vary between samples
    for sample in samples:
        field = plate["fields"][sample["field_id"]]
        crop = field[:, sample["crop_y"] : sample["crop_y"] + SIZE, sample["crop_x"] : sample["crop_x"] + SIZE]
        np.testing.assert_array_equal(sample["pixel_values"], crop[sample["channel_ids"]])


def test_channel_ids_follow_a_given_vocabulary(plate):
    (sample, *_) = stream_fields(plate["shards"], image_size=SIZE, channel_vocabulary=["x", "w3", "w2", "w1"])
    assert list(sample["channel_ids"]) == [3, 2, 1]


def test_the_stream_matches_channels_to_the_vocabulary_by_the_rule_embed_uses(plate):
    """One resolver (data.channels.ChannelVocabulary): the same name in another case is the same channel."""
    (sample, *_) = stream_fields(plate["shards"], image_size=SIZE, channel_vocabulary=["x", "W3", "W2", "W1"])
    assert list(sample["channel_ids"]) == [3, 2, 1]
    with pytest.raises(ValueError, match="is not in the channel vocabulary"):
        next(iter(stream_fields(plate["shards"], image_size=SIZE, channel_vocabulary=["w1", "w2"])))


def test_metadata_fields_are_carried_into_samples(plate):
    samples = list(stream_fields(plate["shards"], image_size=SIZE))
    controls = {s["field_id"] for s in samples if s["is_control"]}
    assert controls and all(s["perturbation"] == "non-targeting" for s in samples if s["field_id"] in controls)
    assert all(s["perturbation"].startswith("GENE") for s in samples if s["field_id"] not in controls)


def test_batches_collate_into_tensors(plate):
    loader = torch.utils.data.DataLoader(
        stream_fields(plate["shards"], image_size=SIZE, crops_per_field=2), batch_size=5
    )
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (5, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["channel_ids"].shape == (5, 3) and len(batch["plate"]) == 5


def test_num_epochs_runs_each_epoch_in_full(plate):
    samples = list(stream_fields(plate["shards"], image_size=SIZE, num_epochs=2, epoch=5))
    by_epoch = Counter(s["epoch"] for s in samples)
    assert by_epoch == {5: len(plate["fields"]), 6: len(plate["fields"])}


def test_endless_stream_rejects_a_worker_count_it_was_not_built_for(plate):
    stream = stream_fields(plate["shards"], image_size=SIZE, num_epochs=None, num_workers=2)
    with pytest.raises(ValueError, match="num_workers=2"):
        next(iter(stream))


def test_crop_larger_than_field_is_a_clear_error(plate):
    with pytest.raises(ValueError, match="image_size=64 is larger than field"):
        next(iter(stream_fields(plate["shards"], image_size=64)))


def test_a_relative_shard_path_read_from_another_folder_streams_that_folders_fields(tmp_path, monkeypatch):
    # One process (a notebook, or the README test): the same relative "shards/" names two different folders.
    seen = []
    for name, wells in (("first", ("A01",)), ("second", ("B01", "B02", "C01"))):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        make_rxrx_plate(Path("images"), plates=1, wells=wells, sites=1)
        shard_folder("images", "shards", num_workers=1, progress=False)
        stream = stream_fields(
            "shards", image_size=16, augment=False, shuffle=False, num_epochs=1, standardize=False, metadata_fields=[]
        )
        seen.append(sorted(sample["well"] for sample in stream))
    assert seen == [["A01"], ["B01", "B02", "C01"]]
