"""`cellmae evaluate`: embeddings table -> eval_results.json (the model-card contract) + PNG plots."""

import json

import numpy as np
import pandas as pd
import pytest

from hf_cellmae.cli import main
from hf_cellmae.evaluation.report import evaluate_embeddings, evaluate_synthetic

CONTRACT_KEYS = {
    "dataset",
    "alignment",
    "aggregation",
    "n_perturbations",
    "embedding_dim",
    "sources",
    "chance",
    "plots",
}


def _table(signal, seed=0, groups=5, genes=4, fields_per_plate=3, width=8, controls_per_plate=30):
    """Units on two plates with a plate shift; genes of a group share a direction scaled by ``signal``."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((groups, width))
    rows, meta = [], []
    for plate in ("P1", "P2"):
        shift = 3 * rng.standard_normal(width)
        for g in range(groups):
            for k in range(genes):
                for _ in range(fields_per_plate):
                    rows.append(signal * directions[g] + rng.standard_normal(width) + shift)
                    meta.append((f"G{g}_{k}", False, plate))
        for _ in range(controls_per_plate):
            rows.append(rng.standard_normal(width) + shift)
            meta.append(("non-targeting", True, plate))
    table = pd.DataFrame(meta, columns=["Metadata_perturbation", "Metadata_is_control", "Metadata_plate"])
    features = pd.DataFrame(np.array(rows, dtype=np.float32), columns=[f"feature_{i:03d}" for i in range(width)])
    pairs = pd.DataFrame(
        [(f"G{g}_{a}", f"G{g}_{b}") for g in range(groups) for a in range(genes) for b in range(a + 1, genes)],
        columns=["entity1", "entity2"],
    )
    return pd.concat([table, features], axis=1), pairs


def test_results_follow_the_contract_and_plots_are_pngs(tmp_path):
    table, pairs = _table(signal=1.5)
    noise, _ = _table(signal=0.0, seed=1)
    results = evaluate_embeddings(
        table,
        sources={"complexes": pairs},
        out_dir=tmp_path,
        dataset="toy",
        baselines={"random_init": noise},
        batch_col="Metadata_plate",
        progress=False,
    )
    written = json.loads((tmp_path / "eval_results.json").read_text())
    assert written == results
    assert set(written) == CONTRACT_KEYS | {"baselines", "suite"}
    assert set(written["suite"]["featurizers"]) == {"model", "random_init"}
    assert written["chance"] == {"recall_0.05_0.95": 0.1, "recall_0.10_0.90": 0.2}
    assert set(written["sources"]["complexes"]) == {"recall_0.05_0.95", "recall_0.10_0.90", "null_size", "query_size"}
    assert (written["n_perturbations"], written["embedding_dim"]) == (20, 8)
    assert set(written["baselines"]["random_init"]) == {"sources"}
    for name in ("recall", "heatmap", "projection"):
        assert (tmp_path / written["plots"][name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / written["suite"]["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_related_genes_are_recalled_above_chance_and_above_a_signal_free_baseline():
    table, pairs = _table(signal=1.5)
    noise, _ = _table(signal=0.0, seed=1)
    results = evaluate_embeddings(
        table, sources={"complexes": pairs}, baselines={"noise": noise}, batch_col="Metadata_plate", progress=False
    )
    model = results["sources"]["complexes"]["recall_0.10_0.90"]
    assert model > 0.5
    assert model > results["baselines"]["noise"]["sources"]["complexes"]["recall_0.10_0.90"] + 0.2


def test_evaluate_synthetic_reads_the_plate_relationship_files(tmp_path):
    table, pairs = _table(signal=1.0)
    (tmp_path / "plate" / "relationships").mkdir(parents=True)
    pairs.to_csv(tmp_path / "plate" / "relationships" / "complexes.csv", index=False)
    results = evaluate_synthetic(table, tmp_path / "plate", batch_col="Metadata_plate", progress=False)
    assert list(results["sources"]) == ["complexes"] and results["dataset"] == "synthetic:plate"
    with pytest.raises(FileNotFoundError, match="no relationship files"):
        evaluate_synthetic(table, tmp_path / "empty", progress=False)


def test_cli_evaluate_writes_results_from_a_table_file(tmp_path, capsys):
    table, pairs = _table(signal=1.0)
    table.drop(columns="Metadata_is_control").to_parquet(tmp_path / "emb.parquet")
    pairs.to_csv(tmp_path / "complexes.csv", index=False)
    code = main(
        [
            "evaluate",
            str(tmp_path / "emb.parquet"),
            "--sources",
            str(tmp_path / "complexes.csv"),
            "--controls",
            "non-targeting",
            "--batch-col",
            "Metadata_plate",
            "--alignment",
            "pca_center_scale",
            "--out",
            str(tmp_path / "eval"),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["alignment"] == "pca_center_scale" and "complexes" in results["sources"]
    assert "complexes" in capsys.readouterr().out


def test_cli_evaluate_names_the_file_each_relationship_source_was_read_from(tmp_path, capsys, monkeypatch):
    table, pairs = _table(signal=1.0)
    (tmp_path / "work" / "annotations").mkdir(parents=True)
    table.to_parquet(tmp_path / "work" / "emb.parquet")
    pairs.to_csv(tmp_path / "outside.csv", index=False)  # outside --annotations, reached with ../..
    pairs.to_csv(tmp_path / "work" / "annotations" / "CORUM.txt", index=False)
    monkeypatch.chdir(tmp_path / "work" / "annotations")
    code = main(
        [
            "evaluate",
            "../emb.parquet",
            "--sources",
            "../../outside.csv",
            "CORUM",
            "--annotations",
            ".",
            "--batch-col",
            "Metadata_plate",
            "--out",
            "../eval",
            "--no-plots",
            "--no-progress",
            "--no-suite",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"relationship source outside read from {tmp_path / 'outside.csv'}" in out
    assert f"relationship source CORUM read from {tmp_path / 'work' / 'annotations' / 'CORUM.txt'}" in out


def test_a_plate_that_cannot_support_the_benchmark_is_refused_in_one_line_naming_all_it_lacks(tmp_path, capsys):
    table, _ = _table(signal=1.0)
    one_gene = table.drop(columns=["Metadata_perturbation", "Metadata_is_control"]).assign(Metadata_gene="RAB30")
    one_gene.to_parquet(tmp_path / "emb.parquet")
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "emb.parquet"),
                "--batch-col",
                "Metadata_plate",
                "--out",
                str(tmp_path / "eval"),
                "--no-plots",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot support the benchmark" in err
    assert "--perturbation-col Metadata_gene" in err and "control wells" in err and "it has 1 (RAB30)" in err


def test_missing_control_definition_and_text_features_raise(tmp_path):
    table, pairs = _table(signal=1.0)
    with pytest.raises(
        ValueError, match="cannot support the benchmark; it lacks control wells .*say which rows are controls"
    ):
        evaluate_embeddings(table.drop(columns="Metadata_is_control"), sources={"c": pairs}, progress=False)
    with pytest.raises(ValueError, match="no row of Metadata_perturbation is one of the controls"):
        evaluate_embeddings(table, sources={"c": pairs}, controls=["DMSO"], progress=False)
    with pytest.raises(ValueError, match="feature columns must be numeric; \\['well'\\]"):
        evaluate_embeddings(table.assign(well="A01"), sources={"c": pairs}, progress=False)


def test_cli_evaluate_with_alignment_none_needs_no_controls(tmp_path, capsys):
    table, pairs = _table(signal=1.5, controls_per_plate=0)
    table.drop(columns="Metadata_is_control").to_parquet(tmp_path / "emb.parquet")
    pairs.to_csv(tmp_path / "complexes.csv", index=False)
    code = main(
        [
            "evaluate",
            str(tmp_path / "emb.parquet"),
            "--sources",
            str(tmp_path / "complexes.csv"),
            "--alignment",
            "none",
            "--out",
            str(tmp_path / "eval"),
            "--no-plots",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["alignment"] == "none" and results["n_perturbations"] == 20


def test_cli_evaluate_min_perturbations_flag_reaches_the_benchmark(tmp_path, capsys):
    table, pairs = _table(signal=1.5, groups=2, genes=4)  # 8 perturbations, below the default minimum of 10
    table.to_parquet(tmp_path / "emb.parquet")
    pairs.to_csv(tmp_path / "complexes.csv", index=False)
    command = [
        "evaluate",
        str(tmp_path / "emb.parquet"),
        "--sources",
        str(tmp_path / "complexes.csv"),
        "--out",
        str(tmp_path / "eval"),
        "--no-plots",
        "--no-progress",
        "--no-suite",
        "--alignment",
        "center_scale",
    ]
    assert main(command) == 2
    assert "--min-perturbations" in capsys.readouterr().err
    assert main([*command, "--min-perturbations", "8"]) == 0
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["n_perturbations"] == 8


def test_every_setting_of_evaluate_embeddings_is_a_cellmae_evaluate_option():
    import argparse
    import dataclasses
    import inspect

    from hf_cellmae.cli import build_parser
    from hf_cellmae.evaluation.options import EvaluateOptions, evaluate_options

    parser = build_parser()
    evaluate = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["evaluate"]
    destinations = {action.dest for action in evaluate._actions}
    assert {f.name for f in dataclasses.fields(EvaluateOptions)} <= destinations
    # the parameters beside the options: --baseline NAME TABLE, and the replicate unit --cells implies
    beside = {"baselines": "baseline", "well_cols": "cells"}
    parameters = set(inspect.signature(evaluate_embeddings).parameters) - {"embeddings", "options", "settings"}
    assert parameters == set(beside) and set(beside.values()) <= destinations
    # the Python spelling of a setting (progress=False, align_options=...) sets the option of the same meaning
    spelled = {
        "out_dir": ("/tmp/x", "out", "/tmp/x"),
        "on_unusable": ("skip", "skip_unusable", True),
        "plots": (False, "no_plots", True),
        "progress": (False, "no_progress", True),
        "suite": (False, "no_suite", True),
        "probe_labels": (("complex",), "probe", ["complex"]),
        "thresholds": ([(0.1, 0.9)], "thresholds", ["0.1,0.9"]),
        "align_options": ({"scale_per_batch": False}, "no_scale_per_batch", True),
    }
    for setting, (value, option, expected) in spelled.items():
        assert getattr(evaluate_options(**{setting: value}), option) == expected, setting
    with pytest.raises(TypeError, match="not a setting of EvaluateOptions"):
        evaluate_options(probes=["complex"])


def test_evaluate_embeddings_takes_the_options_whole_and_refuses_sources_in_their_place():
    from hf_cellmae.evaluation.options import EvaluateOptions

    table, pairs = _table(signal=1.5)
    options = EvaluateOptions(
        sources={"complexes": pairs}, batch_col="Metadata_plate", no_suite=True, no_progress=True
    )
    assert evaluate_embeddings(table, options) == evaluate_embeddings(
        table, sources={"complexes": pairs}, batch_col="Metadata_plate", suite=False, progress=False
    )
    with pytest.raises(TypeError, match="options is an EvaluateOptions, not a dict"):
        evaluate_embeddings(table, {"complexes": pairs})


def test_cellmae_evaluate_help_states_each_default():
    import argparse

    from hf_cellmae.cli import build_parser

    parser = build_parser()
    evaluate = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["evaluate"]
    help_text = " ".join(evaluate.format_help().split())
    assert "default: Metadata_perturbation" in help_text and "perturbation" in help_text
    for action in evaluate._actions:
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            assert action.help and "default" in action.help, f"{action.option_strings[0]} does not state its default"


# ------------------------------------------------------------------------ what the figures say (issue 24)
def test_recall_figure_names_the_chance_of_each_panel_and_the_model_by_its_label():
    from hf_cellmae.evaluation.plots import recall_figure

    sources = {"complexes": {"recall_0.05_0.95": 0.3, "recall_0.10_0.90": 0.4}}
    fig = recall_figure(
        sources,
        {"recall_0.05_0.95": 0.1, "recall_0.10_0.90": 0.2},
        baselines={"random_init": sources},
        model_label="pretrained",
    )
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["percentile <= 0.05 or >= 0.95 (chance 0.10)", "percentile <= 0.10 or >= 0.90 (chance 0.20)"]
    legend = [text.get_text() for text in fig.axes[-1].get_legend().get_texts()]
    assert "pretrained" in legend and "random_init" in legend and "model" not in legend
    assert not any("0.20" in label or "0.10" in label for label in legend)  # one panel's chance is not the other's


def test_suite_figure_draws_chance_for_every_probe_and_the_probes_spread(tmp_path):
    from matplotlib.container import ErrorbarContainer

    from hf_cellmae.evaluation.suite import suite_chance, suite_figure

    table, pairs = _table(signal=1.5)
    noise, _ = _table(signal=0.0, seed=1)
    for frame in (table, noise):
        frame["Metadata_complex"] = table["Metadata_perturbation"].str.split("_").str[0]
        frame["Metadata_well"] = [f"W{row}" for row in range(len(frame))]  # each field its own well
    results = evaluate_embeddings(
        table,
        sources={"complexes": pairs},
        dataset="toy",
        baselines={"random_init": noise},
        batch_col="Metadata_plate",
        probe_labels=["complex"],
        progress=False,
    )
    report = results["suite"]
    assert set(suite_chance(report)) == {"probe complex", "kNN complex", "gene-set recall complexes"}
    fig = suite_figure(report, model_label="pretrained", alignment="tvn")
    ax = fig.axes[0]
    assert "pretrained and baselines" in ax.get_title() and "after tvn" in ax.get_title() and "± sd" in ax.get_title()
    assert len(ax.collections) >= 3  # a dashed chance segment per metric that has one (errorbars add theirs)
    errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(errorbars) == 2  # one per featuriser, at its two probe bars
    probe = report["featurizers"]["model"]["probe"]["Metadata_complex"]
    segments = errorbars[0].lines[2][0].get_segments()
    assert len(segments) == 2 and np.isclose(segments[0][1][1] - segments[0][0][1], 2 * probe["logistic_std"])


def test_heatmap_and_projection_name_the_featuriser_and_the_alignment(tmp_path, monkeypatch):
    from hf_cellmae.evaluation import report

    titles = {}
    for name in ("plot_complex_heatmap", "plot_projection"):
        real = getattr(report, name)
        monkeypatch.setattr(
            report,
            name,
            lambda *a, _real=real, _name=name, **k: (titles.__setitem__(_name, k["title"]), _real(*a, **k))[1],
        )
    table, pairs = _table(signal=1.5)
    evaluate_embeddings(
        table,
        sources={"complexes": pairs},
        out_dir=tmp_path,
        dataset="toy",
        batch_col="Metadata_plate",
        alignment="center_scale",
        progress=False,
        suite=False,
        model_label="pretrained",
    )
    for title in titles.values():
        assert "pretrained profiles after center_scale" in title
    assert set(titles) == {"plot_complex_heatmap", "plot_projection"}


def test_evaluate_into_an_unwritable_folder_fails_in_one_line_before_the_work(tmp_path, capsys, monkeypatch):
    from hf_cellmae.evaluation import report

    table, pairs = _table(signal=1.0)
    table.to_parquet(tmp_path / "emb.parquet")
    pairs.to_csv(tmp_path / "complexes.csv", index=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # unwritable for every user, root included

    def no_work(*args, **kwargs):
        raise AssertionError("the embeddings were read before the output folder was checked")

    monkeypatch.setattr(report, "read_embeddings", no_work)
    code = main(
        [
            "evaluate",
            str(tmp_path / "emb.parquet"),
            "--sources",
            str(tmp_path / "complexes.csv"),
            "--batch-col",
            "Metadata_plate",
            "--out",
            str(blocker / "eval"),
            "--no-plots",
            "--no-progress",
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert f"cannot write evaluation results to {blocker / 'eval'}" in error
