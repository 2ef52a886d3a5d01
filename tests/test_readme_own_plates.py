"""The README's "Your own plates" block, run as written on two real plates (JUMP cpg0016 RAB30, BBBC022).

The block's commands are read from README.md and run in a temporary folder, so its relative paths
(`shards/`, `runs/b16`, `embeddings/`, ...) are used as written. Only the placeholders change: `plates/`
and `plate_map.csv` become the real folder and its metadata table, and BBBC022 names its channel files
`Ch1..Ch5` instead of JUMP's `w1..w5`. `pretrain` runs the README's CPU line (`--config demo_cpu`) with 2 steps
instead of 400 and no logs or figures, nothing else changed; the push is skipped. The optional CellProfiler baseline runs on the
2-field JUMP folder only (on BBBC022's 10 larger fields it would take minutes on 2 cores), so there
`evaluate` runs without `--baseline`. Neither plate supports the recall benchmark, and `evaluate` must
say so in one line naming what is missing; the card is then written without `--eval-results`, as the
README says.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from hf_cellmae.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHORT_RUN = ["--max-steps", "2", "--report-to", "none", "--progress-bar", "false", "--figure-steps", "0"]

PLATES = {
    "jump": dict(
        folder="cellpainting_jump_rab30",
        images="",
        channels="w1=AGP,w2=DNA,w3=ER,w4=Mito,w5=RNA",
        stains=["AGP", "DNA", "ER", "Mito", "RNA"],
        cellprofiler=True,
        lacks=["--perturbation-col Metadata_gene", "control wells", "it has 1 (RAB30)"],
    ),
    "bbbc022": dict(
        folder="cellpainting_bbbc022",
        images="images",
        channels="Ch1=DNA,Ch2=ER,Ch3=RNA,Ch4=AGP,Ch5=Mito",
        stains=["DNA", "ER", "RNA", "AGP", "Mito"],
        cellprofiler=False,
        lacks=["its metadata names no perturbation", "control wells"],
    ),
}


def readme_block() -> list[list[str]]:
    """The commands of the first bash block under "## Your own plates", comments removed."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own plates") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def as_run_here(command: list[str], plate: dict, source: Path) -> list[str] | None:
    """The README command with the placeholders filled for `plate`; None for the commands this test skips."""
    words = [
        str(source / plate["images"])
        if w == "plates/"
        else str(source / "metadata.csv")
        if w == "plate_map.csv"
        else w
        for w in command
    ]
    if "--channels" in words:
        words[words.index("--channels") + 1] = plate["channels"]
    stage = words[1] if words[1] != "embed" else ("embed cellprofiler" if words[2] == "cellprofiler" else "embed")
    if stage in ("push", "annotations"):  # no Hub here; the annotations are fetched by the README's test command
        return None
    if stage == "pretrain":
        words += SHORT_RUN
    if stage == "embed cellprofiler" and not plate["cellprofiler"]:
        return None
    if stage == "evaluate" and not plate["cellprofiler"]:
        at = words.index("--baseline")
        del words[at : at + 3]
    return words[1:]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLATES))
def test_the_readme_own_plates_block_runs_as_written_on_a_real_plate(name, tmp_path, monkeypatch, capsys):
    plate = PLATES[name]
    source = DATA / plate["folder"]
    if not source.is_dir():
        pytest.skip(f"real plate not found: {source} (../shared/data beside the repository)")
    monkeypatch.chdir(tmp_path)
    commands = readme_block()
    assert [c[:2] for c in commands] == [
        ["cellmae", "shard"],
        ["cellmae", "pretrain"],
        ["cellmae", "embed"],
        ["cellmae", "embed"],
        ["cellmae", "annotations"],
        ["cellmae", "evaluate"],
        ["cellmae", "card"],
        ["cellmae", "push"],
    ]
    evaluated = False
    for command in commands:
        argv = as_run_here(command, plate, source)
        if argv is None:
            continue
        if argv[0] == "card" and not evaluated:  # the README: "without --eval-results when evaluate could not run"
            argv = argv[: argv.index("--eval-results")]
        code = main(argv)
        err = capsys.readouterr().err
        if argv[0] == "evaluate":
            assert code == 2, err
            lines = [line for line in err.splitlines() if "error:" in line]
            assert len(lines) == 1 and "cannot support the benchmark" in lines[0], err
            for missing in plate["lacks"]:
                assert missing in lines[0]
            continue
        assert code == 0, f"{' '.join(argv)}: {err[-2000:]}"

    stains = plate["stains"]
    manifest = json.loads(Path("shards/manifest.json").read_text())
    assert manifest["channels"] == stains
    assert list(manifest["channel_map"].values()) == stains
    config = json.loads(Path("runs/mae/model/config.json").read_text())
    assert config["channel_names"] == stains and config["image_size"] == 64  # demo_cpu: the tiny preset
    embeddings = pd.read_parquet("embeddings")
    assert len(embeddings) == manifest["num_fields"]
    assert all(list(row) == stains for row in embeddings["Metadata_compartment"])
    card = Path("runs/mae/model/README.md").read_text()
    assert "\n# mae\n" in card
    for index, stain in enumerate(stains):
        assert f"| {index} | {stain} |" in card
    assert str(tmp_path) not in card and str(DATA) not in card
    if plate["cellprofiler"]:
        assert len(pd.read_parquet("cp_features")) == manifest["num_fields"]


def test_the_readme_evaluate_line_runs_on_the_synthetic_plate(tmp_path, monkeypatch, capsys):
    """The same `cellmae evaluate` flags as the README block, on a plate that supports the benchmark (`cellmae
    synthetic`: 24 genes, controls, two plates), with its own relationships (`--synthetic-plate`). Pixel
    statistics stand in for the model and for the CellProfiler table: the flags are what is under test."""
    monkeypatch.chdir(tmp_path)
    assert main(["synthetic", "plate", "--field-size", "64", "--sites", "1", "--num-workers", "1", "--quiet"]) == 0
    assert main(["shard", "plate/images", "shards", "--metadata", "plate/metadata.csv", "--quiet"]) == 0
    assert main(["embed", "pixel_stats", "shards", "embeddings"]) == 0
    assert main(["embed", "pixel_stats", "shards", "cp_features"]) == 0
    evaluate = next(c for c in readme_block() if c[:2] == ["cellmae", "evaluate"])
    capsys.readouterr()
    assert main([*evaluate[1:], "--synthetic-plate", "plate"]) == 0, capsys.readouterr().err[-2000:]
    results = json.loads(Path("evaluation/eval_results.json").read_text())
    assert set(results["sources"]) == {"complexes", "pathways"} and "cellprofiler" in results["baselines"]
    assert "Metadata_perturbation" in results["suite"]["featurizers"]["model"]["probe"]
