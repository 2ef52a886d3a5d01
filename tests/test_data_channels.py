"""Channel identity comes from the data (a per-file metadata table, load_data columns) or from an explicit
``token=name`` mapping, never silently from position (issue 10, item 1)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hf_cellmae.data.shards import shard_folder
from hf_cellmae.errors import UserError
from tests.helpers.data_fixtures import make_rxrx_plate, shared_folder

JUMP_STAINS = ["AGP", "DNA", "ER", "Mito", "RNA"]  # w1..w5, as the folder's metadata.csv says
README_ORDER = "DNA,ER,RNA,AGP,Mito"  # RxRx's order, which the README once gave for every plate


def _shard(source, out, **options):
    return shard_folder(source, out, num_workers=1, progress=False, **options)


def _per_file_table(path, fields: dict, stains: list[str]) -> None:
    """A JUMP-style table: one row per file, with the stain of each file in ``compartment``."""
    rows = []
    for field_id in sorted(fields):
        experiment, plate, well, site = field_id.split("/")
        for channel, stain in enumerate(stains, start=1):
            rows.append(
                {
                    "file": f"{experiment}/{plate}/{well}_{site}_w{channel}.png",
                    "plate": plate,
                    "well": well,
                    "site": site[1:],
                    "channel": channel,
                    "compartment": stain,
                }
            )
    pd.DataFrame(rows).to_csv(path, index=False)


@pytest.fixture
def plate(tmp_path):
    """A 3-channel RxRx plate whose per-file table says w1 = Mito, w2 = DNA, w3 = ER."""
    fields = make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=2)
    _per_file_table(tmp_path / "metadata.csv", fields, ["Mito", "DNA", "ER"])
    return tmp_path / "images", tmp_path / "metadata.csv"


def test_jump_shards_name_each_channel_as_the_folders_metadata_does(tmp_path):
    source = shared_folder("cellpainting_jump_rab30")
    manifest = _shard(source, tmp_path / "shards", metadata=source / "metadata.csv")
    assert manifest["channels"] == JUMP_STAINS
    assert manifest["channel_map"] == {"w1": "AGP", "w2": "DNA", "w3": "ER", "w4": "Mito", "w5": "RNA"}
    assert "compartment" in manifest["channels_named_by"]
    written = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert written["channels"] == JUMP_STAINS and written["channel_map"]["w1"] == "AGP"


def test_jump_readme_channel_order_is_refused_with_both_mappings_and_the_fix(tmp_path):
    source = shared_folder("cellpainting_jump_rab30")
    with pytest.raises(UserError) as refused:
        _shard(source, tmp_path / "shards", metadata=source / "metadata.csv", channel_names=README_ORDER.split(","))
    message = str(refused.value)
    assert "w1=DNA,w2=ER,w3=RNA,w4=AGP,w5=Mito" in message  # what the positional list would have recorded
    assert "w1=AGP,w2=DNA,w3=ER,w4=Mito,w5=RNA" in message  # what the metadata says, and the fix
    assert "--channels w1=AGP,w2=DNA,w3=ER,w4=Mito,w5=RNA" in message
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_cli_shard_refuses_the_contradicting_order_without_a_traceback(tmp_path, capsys):
    from hf_cellmae.cli import main

    source = shared_folder("cellpainting_jump_rab30")
    code = main(
        [
            "shard",
            str(source),
            str(tmp_path / "shards"),
            "--metadata",
            str(source / "metadata.csv"),
            "--channels",
            README_ORDER,
            "--quiet",
            "--num-workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "w1=DNA" in err and "w1=AGP" in err


def test_cli_shard_takes_token_equals_name_in_any_order(tmp_path, capsys):
    from hf_cellmae.cli import main

    source = shared_folder("cellpainting_jump_rab30")
    code = main(
        [
            "shard",
            str(source),
            str(tmp_path / "shards"),
            "--channels",
            "w5=RNA,w1=AGP,w2=DNA,w4=Mito,w3=ER",
            "--quiet",
            "--num-workers",
            "1",
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["channels"] == JUMP_STAINS and manifest["channels_named_by"] == "--channels TOKEN=NAME"


def test_per_file_table_names_the_channels_without_channels_option(plate, tmp_path):
    images, metadata = plate
    manifest = _shard(images, tmp_path / "shards", metadata=metadata)
    assert manifest["channels"] == ["Mito", "DNA", "ER"]


def test_positional_names_that_agree_with_the_table_are_accepted(plate, tmp_path):
    images, metadata = plate
    manifest = _shard(images, tmp_path / "shards", metadata=metadata, channel_names="mito,DNA,ER")
    assert manifest["channels"] == ["mito", "DNA", "ER"]


def test_positional_names_are_used_when_the_data_names_no_channel(tmp_path):
    make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=1)
    manifest = _shard(tmp_path / "images", tmp_path / "shards", channel_names=["DNA", "ER", "RNA"])
    assert manifest["channels"] == ["DNA", "ER", "RNA"]
    assert manifest["channel_map"] == {"w1": "DNA", "w2": "ER", "w3": "RNA"}


def test_explicit_mapping_overrides_the_table_to_rename(plate, tmp_path):
    images, metadata = plate
    manifest = _shard(
        images, tmp_path / "shards", metadata=metadata, channel_names="w1=MitoTracker,w2=Hoechst,w3=ConA"
    )
    assert manifest["channels"] == ["MitoTracker", "Hoechst", "ConA"]


@pytest.mark.parametrize(
    "channels, words",
    [
        ("w1=DNA,w2=ER,w9=RNA", ["'w9'", "w1, w2, w3"]),
        ("w1=DNA,w2=ER", ["w3", "every one of w1, w2, w3"]),
        ("w1=DNA,ER,RNA", ["mixes TOKEN=NAME and plain names"]),
        ("DNA,ER", ["2 channel names", "3 channels"]),
    ],
)
def test_malformed_channels_option_is_refused_naming_the_value_and_the_fix(tmp_path, channels, words):
    make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=1)
    with pytest.raises(UserError) as refused:
        _shard(tmp_path / "images", tmp_path / "shards", channel_names=channels)
    for word in words:
        assert word in str(refused.value)


def test_table_that_names_one_token_two_ways_is_refused(plate, tmp_path):
    images, metadata = plate
    table = pd.read_csv(metadata)
    table.loc[0, "compartment"] = "RNA"  # w1 of the first site only
    table.to_csv(metadata, index=False)
    with pytest.raises(UserError, match="names file channel w1 both Mito and RNA"):
        _shard(images, tmp_path / "shards", metadata=metadata)


def test_load_data_columns_name_the_channels_and_refuse_a_contradicting_order(tmp_path):
    import numpy as np
    import tifffile

    rows = []
    for site in (1, 2):
        row = {"Metadata_Plate": "P1", "Metadata_Well": "A01", "Metadata_Site": site}
        for stain in ("OrigAGP", "OrigDNA"):
            tifffile.imwrite(tmp_path / f"s{site}_{stain}.tif", np.zeros((40, 40), np.uint16))
            row[f"FileName_{stain}"] = f"s{site}_{stain}.tif"
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    assert _shard(tmp_path / "load_data.csv", tmp_path / "ok", channel_names="AGP,DNA")["channels"] == ["AGP", "DNA"]
    with pytest.raises(UserError, match="OrigAGP=DNA,OrigDNA=AGP"):
        _shard(tmp_path / "load_data.csv", tmp_path / "bad", channel_names="DNA,AGP")


def test_explicit_mapping_is_used_even_when_the_table_names_a_token_two_ways(plate, tmp_path):
    images, metadata = plate
    table = pd.read_csv(metadata)
    table.loc[0, "compartment"] = "RNA"
    table.to_csv(metadata, index=False)
    manifest = _shard(images, tmp_path / "shards", metadata=metadata, channel_names="w1=Mito,w2=DNA,w3=ER")
    assert manifest["channels"] == ["Mito", "DNA", "ER"]


def test_channel_column_of_tokens_links_a_table_without_file_names(tmp_path):
    fields = make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=1)
    experiment, plate, well, site = sorted(fields)[0].split("/")
    pd.DataFrame(
        {"plate": plate, "well": well, "site": 1, "channel": ["w1", "w2", "w3"], "channel_name": ["ER", "RNA", "DNA"]}
    ).to_csv(tmp_path / "channels.csv", index=False)
    assert _shard(tmp_path / "images", tmp_path / "shards", metadata=tmp_path / "channels.csv")["channels"] == [
        "ER",
        "RNA",
        "DNA",
    ]


def test_explicit_mapping_that_swaps_the_tables_stains_is_refused_with_both_mappings(tmp_path):
    """The RxRx map on JUMP (issue 24): every name is one the table uses, for another file channel."""
    source = shared_folder("cellpainting_jump_rab30")
    with pytest.raises(UserError) as refused:
        _shard(
            source,
            tmp_path / "shards",
            metadata=source / "metadata.csv",
            channel_names="w1=DNA,w2=ER,w3=RNA,w4=AGP,w5=Mito",
        )
    message = str(refused.value)
    assert "--channels gives:  w1=DNA,w2=ER,w3=RNA,w4=AGP,w5=Mito" in message
    assert "says:  w1=AGP,w2=DNA,w3=ER,w4=Mito,w5=RNA" in message
    assert "--channels w1=AGP,w2=DNA,w3=ER,w4=Mito,w5=RNA" in message  # the fix
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_metadata_table_at_the_plate_folders_root_is_used_without_metadata_option(tmp_path, capsys):
    source = shared_folder("cellpainting_jump_rab30")
    manifest = _shard(source, tmp_path / "shards")
    assert manifest["channels"] == JUMP_STAINS
    assert (
        manifest["metadata"]["source"] == str(source / "metadata.csv")
        and manifest["metadata"]["found_in_plate_folder"]
    )
    assert manifest["metadata"]["fields_without_metadata"] == 0
    assert f"using the metadata table {source / 'metadata.csv'} found in the plate folder" in capsys.readouterr().err


def test_a_folder_without_a_table_at_its_root_is_sharded_without_metadata(tmp_path, capsys):
    make_rxrx_plate(tmp_path / "images", plates=1, wells=("A01",), sites=1)
    manifest = _shard(tmp_path / "images", tmp_path / "shards")
    assert "metadata" not in manifest and "found in the plate folder" not in capsys.readouterr().err


def test_one_rule_matches_a_channel_to_a_vocabulary_the_identical_name_first_then_the_same_stain():
    from hf_cellmae.data.channels import ChannelVocabulary

    vocabulary = ChannelVocabulary(["DNA", "ER", "RNA", "dna"])
    assert vocabulary.index("DNA") == 0 and vocabulary.index("dna") == 3  # the identical name wins
    assert vocabulary.index("OrigER") == 1 and vocabulary.index("rna") == 2  # CellProfiler's Orig prefix, any case
    assert vocabulary.index("Actin") is None
