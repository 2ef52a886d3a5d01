"""``cellmae shard --part I/N`` on many machines, then ``--merge``: the same shard folder as one run."""

from __future__ import annotations

import json

import pytest

from hf_cellmae.cli import main
from hf_cellmae.data.shards import part_of_plan
from tests.helpers.data_fixtures import make_rxrx_plate, write_plate_metadata


def _shard(tmp_path, out, *extra):
    return main(
        [
            "shard",
            str(tmp_path / "images"),
            str(out),
            "--layout",
            "rxrx",
            "--metadata",
            str(tmp_path / "meta.csv"),
            "--shard-size",
            "10KB",
            "--fields-per-row-group",
            "2",
            "--num-workers",
            "1",
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture
def plate(tmp_path):
    fields = make_rxrx_plate(tmp_path / "images", plates=2, wells=("A01", "A02", "B01"), sites=2)
    write_plate_metadata(tmp_path / "meta.csv", fields)
    return tmp_path


def _files(folder):
    return {
        path.name: path.read_bytes() for path in sorted(folder.iterdir()) if not path.name.startswith("manifest.part-")
    }


def test_three_parts_and_a_merge_write_the_same_shards_and_manifest_as_one_run_byte_for_byte(plate, capsys):
    assert _shard(plate, plate / "one") == 0
    for index in (3, 1, 2):  # any order: the machines of an array job finish when they finish
        assert _shard(plate, plate / "parts", "--part", f"{index}/3") == 0
    printed = capsys.readouterr().out
    assert "part 2/3: every part is done; merged" in printed  # the last part to finish wrote manifest.json
    assert _shard(plate, plate / "parts", "--merge") == 0
    one, parts = _files(plate / "one"), _files(plate / "parts")
    manifest = json.loads(one["manifest.json"])
    assert manifest["num_shards"] >= 3 and manifest["num_fields"] == 12
    assert parts.keys() == one.keys()
    assert [name for name in one if one[name] != parts[name]] == []


def test_the_parts_are_disjoint_blocks_that_cover_the_plan():
    for num_shards in (1, 2, 7, 10):
        blocks = [list(part_of_plan(num_shards, (index, 3))) for index in (1, 2, 3)]
        assert sorted(i for block in blocks for i in block) == list(range(num_shards))


def test_merge_refuses_in_one_line_naming_the_missing_parts(plate, capsys):
    assert _shard(plate, plate / "parts", "--part", "2/4") == 0
    assert "the last part to finish writes manifest.json" in capsys.readouterr().out
    assert _shard(plate, plate / "parts", "--merge") == 2
    error = capsys.readouterr().err
    assert "3 of 4 parts missing" in error and "1/4, 3/4, 4/4" in error and len(error.strip().splitlines()) == 1
    assert not (plate / "parts" / "manifest.json").exists()


def test_a_malformed_part_is_one_line_saying_how_to_write_it(plate, capsys):
    assert _shard(plate, plate / "parts", "--part", "4/3") == 2
    assert "part 4/3 (--part I/N): I must be between 1 and N=3" in capsys.readouterr().err
    assert not (plate / "parts").exists()  # refused before anything was read or written
