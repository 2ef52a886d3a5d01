"""scripts/benchmark_model.py --openphenom: which OpenPhenom it times against. Nothing is timed here, and
neither timm nor the network is needed (OpenPhenom's own code is only imported from a user's checkout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_model.py"


@pytest.fixture(scope="module")
def script():
    return load_script("benchmark_model")


class Stop(Exception):
    pass


def test_without_reference_the_restatement_is_used_with_a_warning_that_it_overstates_the_speed(
    script, monkeypatch, capsys
):
    from tests.helpers import openphenom_reference

    def stop(*args, **kwargs):  # the benchmark's first real work: stop there
        raise Stop

    monkeypatch.setattr(openphenom_reference, "random_openphenom_state_dict", stop)
    monkeypatch.setattr(sys, "argv", ["benchmark_model.py", "--openphenom"])
    with pytest.raises(Stop):
        script.main()
    out = capsys.readouterr().out
    assert out.startswith("WARNING: no --reference given")
    for words in (
        "unfused",
        "overstates",
        "fused scaled_dot_product_attention",
        "--reference PATH",
        "github.com/recursionpharma/maes_microscopy",
        "pip install timm",
    ):
        assert words in out, words
    assert isinstance(script.openphenom_reference(None, {}), script.RestatedOpenPhenom)


@pytest.mark.slow
def test_reference_that_is_not_a_maes_microscopy_checkout_fails_in_one_line(tmp_path):
    (tmp_path / "vit.py").write_text("")  # a folder, but not the code
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--openphenom", "--reference", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"--reference {tmp_path}: not a checkout of https://github.com/recursionpharma/maes_microscopy"
    )


@pytest.mark.parametrize("inner", ["", "maes_microscopy"])
def test_a_checkout_is_found_at_its_root_or_in_its_package_folder(script, tmp_path, inner):
    folder = tmp_path / inner
    folder.mkdir(exist_ok=True)
    for name in ("mae_modules.py", "vit.py", "loss.py", "mae_utils.py"):
        (folder / name).write_text("")
    assert script.find_maes_microscopy(tmp_path) == folder


def test_reference_goes_with_openphenom(script, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["benchmark_model.py", "--reference", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.main()
    assert "--reference goes with --openphenom" in capsys.readouterr().err
