"""scripts/gpu_check.py, the one-run GPU check, on the CPU at the tiny preset: it trains, resumes bit-exactly from
its half-way checkpoint, embeds, and prints its table, so the script a GPU machine runs is known to work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.launching import cpu_launch_env

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_passes_on_the_cpu_at_the_tiny_preset(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--out", str(tmp_path / "check")],
        capture_output=True,
        text=True,
        env=cpu_launch_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "gpu_check: all checks passed" in result.stdout
    figures = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert figures["checks"] == {"loss decreases": True, "resume is bit-exact": True, "every field embedded": True}
    assert figures["loss_last"] < figures["loss_first"] and figures["max_weight_diff"] == 0.0
    assert 0 < figures["mfu"] < 1 and figures["embed_fields_per_s"] > 0 and figures["model_only_fields_per_s"] > 0
    for row in (
        "| training | tiny, 8 steps x 4 images",
        "| resume | checkpoint-4 -> 8: weights bit-exact, loss history identical",
        "| embedding |",
        "MFU",
    ):
        assert row in result.stdout
