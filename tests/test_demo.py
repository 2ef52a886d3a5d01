"""The README's main job, end to end: `cellmae demo` (shortened training) on the built-in synthetic plate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_writes_a_loadable_model_with_card_and_evaluation(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "hf_cellmae.cli", "demo", "--out", str(out), "--max-steps", "20"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    model_dir = out / "run" / "model"
    assert "AutoModel.from_pretrained(" in result.stdout and str(model_dir) in result.stdout
    assert "Recall of the simulator's true relationships" in result.stdout
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "modeling_cellmae.py",
        "README.md",
        "eval_results.json",
        "reconstruction.png",
        "training_args.json",
        "trainer_state.json",
    ):
        assert (model_dir / name).is_file(), name
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        assert len(list(weights.keys())) > 10
    report = json.loads((out / "demo_report.json").read_text())
    assert set(report["recall"]) == {"pretrained", "random_init", "pixel_stats", "cellprofiler", "chance"}
    assert set(report["recall"]["pretrained"]) == {"complexes", "pathways"}
    # the paper's suite, for the model and the three baselines, with a one-line reading
    assert set(report["suite"]) == {"pretrained", "random_init", "pixel_stats", "cellprofiler"}
    for metric in ("probe complex", "probe gene", "kNN complex", "gene-set recall complexes", "replicate mAP"):
        assert all(metric in row for row in report["suite"].values()), metric
    assert "CellProfiler R² (median)" in report["suite"]["pretrained"]
    assert "The paper's suite" in result.stdout and "Reading: " in result.stdout
    # the reading states this run's measured complex probe, not a sentence written in advance
    probe = {name: row["probe complex"] for name, row in report["suite"].items()}
    gain = probe["pretrained"] - probe["random_init"]
    assert (
        f"pre-trained {probe['pretrained']:.2f} vs random-init {probe['random_init']:.2f} complex-probe accuracy: "
        f"{gain:+.2f}"
    ) in result.stdout
    # where the time went, stage by stage, with the machine's load (the demo's 10 minutes are a budget)
    assert {"pretrain_s", "pretrain_steps_per_s", "embed_cellprofiler_s", "evaluate_s"} <= set(report["timings_s"])
    assert "pre-training" in result.stdout.split("Took ")[-1] and "load" in result.stdout.split("Took ")[-1]
    assert (out / "evaluation" / "suite.png").is_file()
    card = (model_dir / "README.md").read_text()
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert f"{results['sources']['complexes']['recall_0.05_0.95']:.3f}"[:4] in card

    from transformers import AutoModel

    import hf_cellmae  # noqa: F401

    assert AutoModel.from_pretrained(model_dir).config.channel_names == ["DNA", "ER", "RNA", "AGP", "Mito"]
    # The random-init baseline is the seed's initial weights (seed 0 by default), not whatever random state
    # training left behind: the same baseline for every recipe length.
    import torch

    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining

    torch.manual_seed(0)
    expected = CellMAEForPreTraining(CellMAEConfig.from_pretrained(model_dir)).state_dict()
    with safe_open(str(out / "random_init" / "model.safetensors"), framework="pt") as weights:
        assert all(torch.equal(weights.get_tensor(key), expected[key]) for key in weights.keys())


def test_small_recipe_is_the_demo_recipe_trained_longer():
    """`cellmae demo --recipe small` changes only the length of training (and its bookkeeping)."""
    from hf_cellmae.demo import RECIPES
    from hf_cellmae.training.arguments import read_config_file

    demo, small = read_config_file(RECIPES["demo"]), read_config_file(RECIPES["small"])
    assert small["max_steps"] == 2 * demo["max_steps"] == 3200
    bookkeeping = {"max_steps", "warmup_ratio", "save_steps", "logging_steps", "figure_steps"}
    assert {k: v for k, v in small.items() if k not in bookkeeping} == {
        k: v for k, v in demo.items() if k not in bookkeeping
    }


def test_unknown_demo_recipe_is_refused_with_the_choices(tmp_path):
    from hf_cellmae.demo import run_demo

    with pytest.raises(ValueError, match=r"'huge'.*\['demo', 'small'\]"):
        run_demo(tmp_path / "out", recipe="huge")
    assert not (tmp_path / "out").exists()
