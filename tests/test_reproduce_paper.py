"""scripts/reproduce_paper.py: each claim's code path runs end to end on a tiny screen, and spikes are counted as
docs/claims.md defines them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_paper.py"
# 24 genes in 6 complexes on 2 plates of 64 px fields: the smallest screen whose held-out half supports recall
TINY_SCREEN = {
    "num_plates": 2,
    "num_pathways": 3,
    "complexes_per_pathway": 2,
    "genes_per_complex": 4,
    "field_size": 64,
    "sites_per_well": 1,
    "control_wells_per_plate": 8,
}


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_spike_is_a_non_finite_loss_or_one_above_twice_the_median_of_the_20_before_it():
    count_spikes = _script().count_spikes
    flat = [1.0] * 30
    assert count_spikes(flat) == 0
    assert count_spikes(flat[:25] + [2.5] + flat[:4]) == 1
    assert count_spikes(flat[:25] + [1.9] + flat[:4]) == 0
    assert count_spikes([5.0] + flat[:19]) == 0  # the first 20 steps have no window to be judged against
    assert count_spikes(flat[:5] + [float("nan")] + flat[:5]) == 1


def test_the_held_out_half_holds_half_of_every_complex_and_depends_on_the_seed(tmp_path):
    script = _script()
    plate = tmp_path / "plate"
    plate.mkdir()
    genes = [{"gene": f"C{c}G{g}", "complex": f"C{c}"} for c in range(3) for g in range(4)]
    (plate / "synthetic_config.json").write_text(json.dumps({"genes": genes}))
    train, held_out = script.split_genes(plate, 0)
    assert len(train) == len(held_out) == 6 and not set(train) & set(held_out)
    assert all(sum(g.startswith(f"C{c}G") for g in held_out) == 2 for c in range(3))
    assert any(script.split_genes(plate, seed)[1] != held_out for seed in (1, 2, 3))


@pytest.mark.slow
def test_every_claim_runs_end_to_end_with_tiny_settings(tmp_path):
    script = _script()
    out = tmp_path / "out"
    script.main(
        [
            "--claim",
            "all",
            "--out",
            str(out),
            "--seeds",
            "0",
            "--max-steps",
            "2",
            "--encoders",
            "xs",
            "tiny",
            "--plates",
            "2",
            "--pilot-lrs",
            "1e-1",
            "--tvn-components",
            "8",
            "--figures",
            str(tmp_path / "figs"),
            "--screen-overrides",
            json.dumps(TINY_SCREEN),
        ]
    )
    wsl = json.loads((out / "wsl.json").read_text())
    assert {row["model"] for row in wsl["rows"]} == {"MAE", "WSL", "random init"}
    assert all(0 <= row["recall_complexes"] <= 1 and row["n_held_out_genes"] == 12 for row in wsl["rows"])
    scaling = json.loads((out / "scaling.json").read_text())
    assert {(row["axis"], row["encoder"], row["plates"]) for row in scaling["rows"]} == {
        ("model", "xs", 2),
        ("model", "tiny", 2),
        ("data", "tiny", 2),
    }  # tiny on 2 plates: Finding 1's runs
    assert set(scaling["change"]) == {"model/MAE", "model/WSL"}
    assert wsl["verdict"]["demo_cpu"]["recall_complexes"]["word"] in ("reproduced", "not reproduced")
    fourier = json.loads((out / "fourier.json").read_text())
    assert fourier["pilot"][0]["learning_rate"] == 0.1 and len(fourier["pilot"][0]["mse_loss"]) == 2
    assert np.isfinite(fourier["pilot"][0]["spikes"])
    assert sorted(path.name for path in (tmp_path / "figs").iterdir()) == [
        "claim_fourier.png",
        "claim_scaling.png",
        "claim_wsl.png",
    ]
