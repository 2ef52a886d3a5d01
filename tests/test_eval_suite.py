"""The paper's suite on any embedding tables: probe, kNN, gene-set recall, mAP, CellProfiler prediction."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from hf_cellmae.cli import main
from hf_cellmae.evaluation.options import EvaluateOptions
from hf_cellmae.evaluation.report import evaluate_embeddings
from hf_cellmae.evaluation.suite import evaluate_suite, suite_rows

GROUPS, GENES = 4, 3


def screen(signal: float, seed: int = 0, width: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two plates x (each gene in 2 wells x 2 fields + 8 control wells); genes of a complex share a direction."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((GROUPS, width))
    rows, features = [], []
    for plate in ("P1", "P2"):
        shift = 4 * rng.standard_normal(width)  # plate effect, removed by alignment on controls
        wells = [(f"G{g}_{k}", f"C{g}", False) for g in range(GROUPS) for k in range(GENES) for _ in range(2)]
        wells += [("ctrl", "", True)] * 8
        for w, (gene, complex_, control) in enumerate(wells):
            for site in (1, 2):
                centre = 0 if control else signal * directions[int(complex_[1:])]
                features.append(shift + centre + rng.standard_normal(width))
                rows.append(
                    {
                        "Metadata_plate": plate,
                        "Metadata_well": f"W{w:02d}",
                        "Metadata_site": site,
                        "Metadata_field_id": f"{plate}-W{w:02d}-{site}",
                        "Metadata_perturbation": gene,
                        "Metadata_complex": complex_,
                        "Metadata_is_control": control,
                    }
                )
    table = pd.concat(
        [pd.DataFrame(rows), pd.DataFrame(np.array(features), columns=[f"f{i}" for i in range(width)])], axis=1
    )
    pairs = pd.DataFrame(
        [(f"G{g}_{a}", f"G{g}_{b}") for g in range(GROUPS) for a in range(GENES) for b in range(a + 1, GENES)],
        columns=["entity1", "entity2"],
    )
    return table, pairs


def test_every_evaluation_separates_a_signal_from_noise():
    model, pairs = screen(signal=2.0)
    noise, _ = screen(signal=0.0, seed=1)
    options = EvaluateOptions(probe=["complex"], consistency_col="complex", batch_col="Metadata_plate")
    report = evaluate_suite({"model": model, "noise": noise}, {"complexes": pairs}, options, null_size=200)
    rows = suite_rows(report)
    for metric in ("probe complex", "kNN complex", "gene-set recall complexes", "replicate mAP", "consistency mAP"):
        assert rows["model"][metric] > rows["noise"][metric] + 0.2, metric
    probe = report["featurizers"]["model"]["probe"]["Metadata_complex"]
    assert probe["split"] == "leave one plate out" and probe["chance"] == 1 / GROUPS


def test_cellprofiler_table_is_predicted_by_the_others_and_not_scored_against_itself():
    model, pairs = screen(signal=2.0)
    target = model.copy()
    target = target.rename(columns={f"f{i}": f"Cells_Intensity_Feature{i}__DNA" for i in range(12)})
    report = evaluate_suite(
        {"model": model, "cellprofiler": target},
        {"complexes": pairs},
        EvaluateOptions(batch_col="Metadata_plate"),
        cellprofiler=target,
        null_size=200,
    )
    assert report["featurizers"]["model"]["cellprofiler_prediction"]["per_category"]["Intensity"]["median_r2"] > 0.9
    assert "cellprofiler_prediction" not in report["featurizers"]["cellprofiler"]


def test_suite_writes_a_comparison_plot_and_a_per_category_cellprofiler_plot(tmp_path):
    model, pairs = screen(signal=2.0)
    target = model.rename(columns={f"f{i}": f"Cells_Intensity_Feature{i}__DNA" for i in range(12)})
    report = evaluate_suite(
        {"model": model, "cellprofiler": target},
        {"complexes": pairs},
        EvaluateOptions(batch_col="Metadata_plate"),
        cellprofiler=target,
        null_size=200,
        out_dir=tmp_path,
    )
    for key in ("plot", "cellprofiler_plot"):
        assert (tmp_path / report[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_evaluate_runs_the_suite_on_the_model_and_each_baseline(tmp_path, capsys):
    model, pairs = screen(signal=2.0)
    noise, _ = screen(signal=0.0, seed=1)
    model.to_parquet(tmp_path / "model.parquet")
    noise.to_parquet(tmp_path / "noise.parquet")
    pairs.to_csv(tmp_path / "complexes.csv", index=False)
    code = main(
        [
            "evaluate",
            str(tmp_path / "model.parquet"),
            "--sources",
            str(tmp_path / "complexes.csv"),
            "--batch-col",
            "Metadata_plate",
            "--baseline",
            "noise",
            str(tmp_path / "noise.parquet"),
            "--probe",
            "complex",
            "--consistency-col",
            "complex",
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert set(results["suite"]["featurizers"]) == {"model", "noise"}
    assert (tmp_path / "eval" / "suite.png").is_file()
    printed = capsys.readouterr().out
    assert "probe complex" in printed and "noise=" in printed


def test_no_suite_leaves_only_the_recall_benchmark(tmp_path):
    model, pairs = screen(signal=2.0)
    results = evaluate_embeddings(
        model, sources={"complexes": pairs}, batch_col="Metadata_plate", suite=False, progress=False
    )
    assert "suite" not in results
