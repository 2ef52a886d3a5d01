"""`cellmae embed` on many processes: two real CPU processes over gloo (`accelerate launch`), and `--part I/N` shares
for machines without a process group, each give the very table one process writes; a killed share resumes.

Every run goes through the same environment (`cpu_launch_env`: one thread per process), so the values can be
compared exactly: the model sees the same batches whichever process embeds a part.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from hf_cellmae.evaluation.report import read_embeddings
from tests.helpers.launching import TWO_CPU_PROCESSES, cpu_launch_env, run_all_or_kill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    """24 synthetic fields (5 stains, 64 px) in 4 shards of 6 fields (row groups of 2), and a tiny model."""
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import make_synthetic_screen

    root = tmp_path_factory.mktemp("four_shards")
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
        seed=3,
    )
    manifest = shard_folder(
        plate["images"],
        root / "shards",
        metadata=plate["metadata"],
        channel_names=plate["channels"],
        progress=False,
        fields_per_row_group=2,
        target_shard_size=6 * 5 * 64 * 64 * 2,
        num_workers=1,
    )
    assert len(manifest["shards"]) == 4  # 6 fields of 5 x 64 x 64 uint16 each
    config = CellMAEConfig.from_preset("tiny", image_size=32, channel_names=plate["channels"])
    CellMAEForPreTraining(config).save_pretrained(root / "model")
    return root / "shards", root / "model", len(manifest["shards"])


def embed_command(model, shards, out, *extra: str) -> list[str]:
    return [
        "-m",
        "hf_cellmae.cli",
        "embed",
        str(model),
        str(shards),
        str(out),
        "--no-progress",
        "--fields-per-batch",
        "4",
        *extra,
    ]


def run_one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=cpu_launch_env(), timeout=300)


def run_two_processes(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *TWO_CPU_PROCESSES, *args]
    return run_all_or_kill(command, cpu_launch_env(), 300, "the 2-process embed did not end")


def info(out) -> dict:
    return json.loads((out / "_embedding_info.json").read_text())


def test_two_processes_write_the_table_one_process_writes_and_a_killed_process_resumes(four_shards, tmp_path):
    shards, model, num_shards = four_shards
    single = run_one_process(*embed_command(model, shards, tmp_path / "one", "--num-workers", "1"))
    assert single.returncode == 0, single.stderr[-3000:]
    expected = read_embeddings(tmp_path / "one")
    assert len(expected) == 24 and expected["Metadata_field_id"].is_unique

    two = run_two_processes(*embed_command(model, shards, tmp_path / "two", "--num-workers", "1"))
    assert two.returncode == 0, two.stderr[-3000:]
    output = two.stdout + two.stderr
    assert f"process 0 of 2 (share 1 of 2: {num_shards // 2} of {num_shards} parts)" in output
    assert f"process 1 of 2 (share 2 of 2: {num_shards // 2} of {num_shards} parts)" in output
    pd.testing.assert_frame_equal(read_embeddings(tmp_path / "two"), expected)  # same rows, same values
    written = info(tmp_path / "two")
    assert written["complete"] and written["num_rows"] == 24 and written["parts"] == info(tmp_path / "one")["parts"]

    # Process 1 killed before it wrote its parts (every odd part) and the info: the same command finishes its share.
    for k in range(1, num_shards, 2):
        (tmp_path / "two" / f"shard-{k:05d}.parquet").unlink()
    (tmp_path / "two" / "_embedding_info.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*.parquet")}
    again = run_two_processes(*embed_command(model, shards, tmp_path / "two", "--num-workers", "0"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"resuming (share 1 of 2: {num_shards // 2} of {num_shards} parts), {num_shards // 2} of {num_shards // 2} parts"
        in again.stdout + again.stderr
    )
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*.parquet") if p.name in kept} == kept
    pd.testing.assert_frame_equal(read_embeddings(tmp_path / "two"), expected)  # and 0 workers change nothing
    assert info(tmp_path / "two")["complete"]


def test_part_shares_without_a_process_group_end_in_the_one_table(four_shards, tmp_path):
    shards, model, num_shards = four_shards
    reference = run_one_process(*embed_command(model, shards, tmp_path / "one"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    first = run_one_process(*embed_command(model, shards, tmp_path / "parts", "--part", "2/3"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "share 2/3 done" in first.stdout and "still to be written by the other shares" in first.stdout
    assert info(tmp_path / "parts")["complete"] is False
    for share in ("3/3", "1/3"):
        result = run_one_process(*embed_command(model, shards, tmp_path / "parts", "--part", share))
        assert result.returncode == 0, result.stderr[-3000:]
    assert info(tmp_path / "parts")["complete"] and info(tmp_path / "parts")["num_rows"] == 24
    pd.testing.assert_frame_equal(read_embeddings(tmp_path / "parts"), read_embeddings(tmp_path / "one"))

    bad = run_one_process(*embed_command(model, shards, tmp_path / "bad", "--part", "4/3"))
    assert bad.returncode != 0 and "part 4/3 (--part I/N): I must be between 1 and N" in bad.stderr
