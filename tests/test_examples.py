"""The scripts in examples/ run end to end, as a user would run them (a subprocess each), with small flags.

- ``embed_in_one_line.py``: a real 16-bit BBBC022 site (skipped when ../shared/data is absent) and the
  synthetic fallback, with a random tiny model or one given with ``--model``.
- ``pretrain_your_plate.py``: synthetic plate -> shards -> pre-train -> embed -> evaluate -> card, and the
  push to a local Hub fake (``fake_hub.FakeHub``) only when ``--repo-id`` is given.
- ``linear_probe.py``: a well-split linear probe on the pre-trained run's embeddings and on pixel statistics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.fake_hub import FakeHub

pytestmark = pytest.mark.slow  # every test runs an example script in a new process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BBBC022 = ROOT.parent / "shared" / "data" / "cellpainting_bbbc022" / "images"
TOKEN = "hf_" + "Examp1eToken" * 3
# Two pre-training steps on the small synthetic plate; its few controls call for center-scale alignment.
SMALL_RUN = ["--small-plate", "--max-steps", "2", "--alignment", "center_scale"]


def example_env(hf_home: Path, **extra) -> dict:
    """No inherited Hub settings or token; a private cache; offline unless a Hub endpoint is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", TQDM_DISABLE="1", **extra)
    if "HF_ENDPOINT" not in extra:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run_example(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        cwd=env["HF_HOME"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


# ---------------------------------------------------------------- embed_in_one_line.py


@pytest.fixture(scope="module")
def real_site_run(tmp_path_factory):
    if not BBBC022.is_dir():
        pytest.skip(f"real BBBC022 images not found: {BBBC022}")
    tmp = tmp_path_factory.mktemp("embed_real")
    result = run_example(
        "embed_in_one_line.py", "--out", str(tmp / "out"), "--save", str(tmp / "embedding.npz"), env=example_env(tmp)
    )
    return tmp, result.stdout


@pytest.fixture(scope="module")
def given_model_run(tmp_path_factory):
    """``--model`` pointing at a 32-wide model, and ``--data-dir`` pointing nowhere (the synthetic fallback)."""
    from hf_cellmae import CellMAEConfig, CellMAEImageProcessor, CellMAEModel

    tmp = tmp_path_factory.mktemp("embed_given")
    config = CellMAEConfig.from_preset("tiny", hidden_size=32, decoder_hidden_size=32)
    torch.manual_seed(0)
    CellMAEModel(config).save_pretrained(tmp / "model")
    CellMAEImageProcessor(image_size=config.image_size, crop_mode="tile").save_pretrained(tmp / "model")
    result = run_example(
        "embed_in_one_line.py",
        "--model",
        str(tmp / "model"),
        "--data-dir",
        str(tmp / "no_data"),
        "--out",
        str(tmp / "out"),
        "--save",
        str(tmp / "embedding.npz"),
        env=example_env(tmp),
    )
    return tmp, result.stdout


def test_embed_example_embeds_the_real_16bit_bbbc022_site_at_full_channel_count(real_site_run):
    tmp, output = real_site_run
    assert "Image: BBBC022 plate1_A14_site1, (5, 520, 696) uint16" in output
    assert "Crops: (80, 5, 64, 64)" in output  # 8 x 10 tiles of 64 px
    assert "Embedding shape: (64,)" in output
    assert "Channelwise embedding shape: (5, 64)" in output
    saved = np.load(tmp / "embedding.npz")
    assert saved["embedding"].shape == (64,) and saved["channelwise"].shape == (5, 64)
    assert np.isfinite(saved["embedding"]).all()


def test_embed_example_without_model_writes_and_announces_a_random_tiny_model(real_site_run):
    tmp, output = real_site_run
    assert "RANDOMLY INITIALISED tiny model" in output
    assert (tmp / "out" / "random-tiny-model" / "model.safetensors").is_file()
    assert (tmp / "out" / "random-tiny-model" / "preprocessor_config.json").is_file()


def test_embed_example_pipeline_gives_the_same_embedding(real_site_run):
    assert "gives the same embedding: True" in real_site_run[1]


def test_embed_example_uses_the_model_given_with_model_flag(given_model_run):
    tmp, output = given_model_run
    assert "RANDOMLY INITIALISED" not in output
    assert "Embedding shape: (32,)" in output
    assert "Channelwise embedding shape: (5, 32)" in output
    assert not (tmp / "out").exists()  # nothing written when a model is given


def test_embed_example_falls_back_to_a_synthetic_field_when_the_real_data_is_absent(given_model_run):
    tmp, output = given_model_run
    assert "BBBC022 site not found" in output and str(tmp / "no_data") in output
    assert "Image: synthetic field, (5, 128, 128) uint16" in output  # twice the model's 64 px crops
    assert np.load(tmp / "embedding.npz")["embedding"].shape == (32,)


# ---------------------------------------------------------------- pretrain_your_plate.py


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory, hub):
    """The whole chain without --repo-id, with a Hub endpoint and token available that it must not use."""
    tmp = tmp_path_factory.mktemp("plate_run")
    result = run_example(
        "pretrain_your_plate.py",
        *SMALL_RUN,
        "--out",
        str(tmp / "run"),
        env=example_env(tmp, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN),
    )
    return tmp / "run", result.stdout, list(hub.requests)


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, hub, plate_run):
    tmp = tmp_path_factory.mktemp("pushed_run")
    result = run_example(
        "pretrain_your_plate.py",
        *SMALL_RUN,
        "--out",
        str(tmp / "run"),
        "--repo-id",
        "org/my-plate",
        env=example_env(tmp, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN),
    )
    return tmp / "run", result.stdout


def test_pretrain_example_prints_every_step_and_its_output_folder(plate_run):
    out, output, _ = plate_run
    for number, where in (
        (0, out / "plate" / "images"),
        (1, out / "shards"),
        (2, out / "run" / "model"),
        (3, out / "embeddings" / "model"),
        (4, out / "evaluation" / "eval_results.json"),
        (5, out / "run" / "model" / "README.md"),
    ):
        assert f"[{number}]" in output
        assert str(where) in output
    assert "112 fields, channels ['DNA', 'ER', 'RNA', 'AGP', 'Mito']" in output


def test_pretrain_example_model_folder_loads_with_automodel(plate_run):
    from transformers import AutoModel

    import hf_cellmae  # noqa: F401

    model = AutoModel.from_pretrained(plate_run[0] / "run" / "model")
    assert type(model).__name__ == "CellMAEModel"
    state = json.loads((plate_run[0] / "run" / "model" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_pretrain_example_embeds_every_field_with_the_model_and_pixel_statistics(plate_run):
    from hf_cellmae.evaluation import read_embeddings

    model = read_embeddings(plate_run[0] / "embeddings" / "model")
    pixels = read_embeddings(plate_run[0] / "embeddings" / "pixel_stats")
    assert len(model) == len(pixels) == 112
    features = [c for c in model.columns if not c.startswith("Metadata_")]
    assert len(features) == 5 * 64 and features[0].endswith("_feature_000")  # channel-wise: embed's default read-out


def test_pretrain_example_evaluates_against_the_synthetic_plates_true_relationships(plate_run):
    results = json.loads((plate_run[0] / "evaluation" / "eval_results.json").read_text())
    assert set(results["sources"]) == {"complexes", "pathways"}
    assert set(results["baselines"]) == {"pixel_stats"}
    assert results["n_perturbations"] == 12


def test_pretrain_example_card_carries_the_evaluation(plate_run):
    readme = (plate_run[0] / "run" / "model" / "README.md").read_text()
    assert "model-index" in readme and "complexes" in readme


def test_pretrain_example_does_not_push_without_repo_id(plate_run):
    _, output, requests = plate_run
    assert "[6] not pushed" in output
    assert requests == []  # the Hub endpoint was never contacted


def test_pretrain_example_pushes_the_model_folder_when_given_a_repo_id(pushed_run, hub):
    out, output = pushed_run
    files = hub.files("org/my-plate")
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_cellmae.py", "README.md"} <= set(
        files
    )
    assert files["model.safetensors"] == (out / "run" / "model" / "model.safetensors").read_bytes()
    assert b"org/my-plate" in files["README.md"]  # the card's loading snippets name the repo
    assert "pushing" in output and "org/my-plate" in output


def test_pretrain_example_refuses_an_output_folder_that_holds_a_run(plate_run):
    # In-process (the check comes before any work): embeddings of an older model must not be reused silently.
    spec = importlib.util.spec_from_file_location("pretrain_your_plate", EXAMPLES / "pretrain_your_plate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = sorted(p.name for p in plate_run[0].iterdir())
    with pytest.raises(SystemExit, match="already holds files; pass --overwrite"):
        script.main([*SMALL_RUN, "--out", str(plate_run[0])])
    assert sorted(p.name for p in plate_run[0].iterdir()) == before


# ---------------------------------------------------------------- linear_probe.py


@pytest.fixture(scope="module")
def probe_run(plate_run, tmp_path_factory):
    """The probe on the pre-trained run's model and shards (labels: the synthetic complexes)."""
    tmp = tmp_path_factory.mktemp("probe")
    out = plate_run[0]
    result = run_example(
        "linear_probe.py",
        "--model",
        str(out / "run" / "model"),
        "--data",
        str(out / "shards"),
        "--out",
        str(tmp / "probe"),
        env=example_env(tmp),
    )
    return json.loads((tmp / "probe" / "probe_results.json").read_text()), result.stdout


def test_linear_probe_on_pixel_statistics_beats_chance(probe_run):
    results, output = probe_run
    assert results["classes"] == ["CPLXA", "CPLXB", "CPLXC", "CPLXD"]
    assert results["chance"]["uniform"] == 0.25
    assert results["probes"]["pixel_stats"]["test_accuracy"] > results["chance"]["majority"] + 0.15
    assert "pixel statistics" in output and "chance (majority class)" in output


def test_linear_probe_reports_the_frozen_encoder_probe(probe_run):
    results, output = probe_run
    assert results["model_is_random_init"] is False
    assert results["probes"]["model"]["dim"] == 5 * 64  # channel-wise, embed's default read-out
    assert 0.0 <= results["probes"]["model"]["test_accuracy"] <= 1.0
    assert "frozen encoder" in output


def test_linear_probe_splits_by_well_and_counts_unlabelled_fields(probe_run):
    results, _ = probe_run
    assert results["train_wells"] and results["test_wells"]
    assert not set(results["train_wells"]) & set(results["test_wells"])
    assert results["train_fields"] + results["test_fields"] == 96
    assert results["unlabelled_fields_left_out"] == 16  # the control fields have no complex
