"""The README's "From object storage, on many machines, to profiles" block, run as written.

A synthetic screen (2 plates, control wells on each) is uploaded to an S3 API served on 127.0.0.1 by moto's
ThreadedMotoServer, as ``s3://my-bucket/screen/{images,metadata.csv}``. The block's commands then run with
their own paths; only the storage options change (they name the local endpoint) and ``--channels`` names
the synthetic plate's stains. ``cellmae embed pixel_stats shards/ embeddings/`` runs between the shard and
profiles lines (the README's main block embeds with a trained model).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_cellmae.cli import main

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
ROOT = Path(__file__).resolve().parents[1]


def readme_block() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From object storage, on many machines, to profiles") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [
        shlex.split(line, comments=True) for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


@pytest.fixture
def bucket(tmp_path):
    """``s3://my-bucket/screen/`` holding a synthetic screen; yields (storage options, its stains)."""
    import s3fs

    from hf_cellmae.data.synthetic import make_synthetic_screen

    plate = make_synthetic_screen(
        tmp_path / "screen",
        num_plates=2,
        field_size=48,
        num_pathways=1,
        complexes_per_pathway=2,
        genes_per_complex=2,
        control_wells_per_plate=4,
        sites_per_well=2,
        num_workers=1,
        progress=False,
    )
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": f"http://{host}:{port}",
    }  # moto refuses anonymous reads
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("my-bucket")
    fs.put(str(plate["images"]), "my-bucket/screen/images", recursive=True)
    fs.put(str(plate["metadata"]), "my-bucket/screen/metadata.csv")
    yield options, plate["channels"]
    server.stop()


def test_the_readme_cloud_block_runs_as_written(bucket, tmp_path, monkeypatch, capsys):
    options, stains = bucket
    monkeypatch.chdir(tmp_path)
    commands = readme_block()
    assert [c[1] for c in commands] == ["shard"] * 5 + ["profiles"] * 2
    for command in commands:
        words = [json.dumps(options) if w == '{"anon": true}' else w for w in command]
        if "--channels" in words:
            words[words.index("--channels") + 1] = ",".join(f"w{i}={name}" for i, name in enumerate(stains, start=1))
        if words[1] == "profiles" and not Path("embeddings").is_dir():
            assert main(["embed", "pixel_stats", "shards/", "embeddings/", "--no-progress"]) == 0
        assert main([*words[1:], "--quiet"] if words[1] == "shard" else [*words[1:], "--no-progress"]) == 0, words
    printed = capsys.readouterr().out
    assert "part 3/3: every part is done; merged" in printed

    one, three = Path("shards"), Path("shards_3")
    assert sorted(p.name for p in one.iterdir()) == sorted(
        p.name for p in three.iterdir() if not p.name.startswith("manifest.part-")
    )
    for path in one.iterdir():
        assert path.read_bytes() == (three / path.name).read_bytes(), path.name  # 3 machines == 1, byte for byte
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["source"] == "s3://my-bucket/screen/images/" and manifest["num_skipped"] == 0

    wells = pd.read_parquet("profiles/well_profiles.parquet")
    genes = pd.read_parquet("profiles/perturbation_profiles.parquet")
    assert len(wells) == manifest["num_fields"] // 2 and set(wells["Metadata_plate"]) == {"Plate1", "Plate2"}
    assert wells["Metadata_n_fields"].eq(2).all() and genes["Metadata_perturbation"].is_unique
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_h5ad("profiles_h5ad/well_profiles.h5ad")
    features = [c for c in wells.columns if not c.startswith("Metadata_")]
    np.testing.assert_allclose(adata.X, wells[features].to_numpy(), rtol=1e-6)
