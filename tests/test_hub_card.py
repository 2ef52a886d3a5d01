"""Model cards rendered from a model folder's own files (``hf_cellmae.hub.model_card``, ``cellmae card``)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors import safe_open

from hf_cellmae.cli import main
from hf_cellmae.hub import render_model_card, template_path
from hf_cellmae.hub.model_card import GENERATED_MARKER
from tests.helpers.fake_hub import FakeHub, make_trained_model_folder

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory) -> Path:
    return make_trained_model_folder(tmp_path_factory.mktemp("trained") / "model")


@pytest.fixture
def folder(trained_folder, tmp_path) -> Path:
    """A fresh copy of the trained folder that a test may change."""
    return Path(shutil.copytree(trained_folder, tmp_path / "model"))


def bare_folder(folder: Path) -> Path:
    """Only what save_pretrained writes: no training, evaluation or processor files."""
    for name in ("training_args.json", "trainer_state.json", "eval_results.json", "preprocessor_config.json"):
        (folder / name).unlink()
    return folder


def test_card_metadata_passes_hub_yaml_validation(folder, monkeypatch):
    card = render_model_card(folder, repo_id="org/cellmae-tiny")
    with FakeHub() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
        card.validate()  # raises ValueError when the (fake) Hub rejects the YAML
    assert hub.requests == ["POST /api/validate-yaml"]
    reparsed = ModelCard(str(card), ignore_metadata_errors=False).data
    assert reparsed.library_name == "transformers"
    assert reparsed.pipeline_tag == "image-feature-extraction"
    assert {"microscopy", "cell-painting", "masked-autoencoder", "biology"} <= set(reparsed.tags)


def test_card_model_index_metrics_equal_the_evaluation_json(folder):
    results = json.loads((folder / "eval_results.json").read_text())
    card = ModelCard(str(render_model_card(folder)), ignore_metadata_errors=False)
    from_card = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    from_json = {
        (source, metric): value
        for source, values in results["sources"].items()
        for metric, value in values.items()
        if metric.startswith("recall")
    }
    assert from_card == from_json


def test_card_evaluation_table_shows_recall_chance_and_baseline_from_the_json(folder):
    results = json.loads((folder / "eval_results.json").read_text())
    text = str(render_model_card(folder))
    corum, baseline = results["sources"]["CORUM"], results["baselines"]["random_init"]["sources"]["CORUM"]
    row = next(line for line in text.splitlines() if line.startswith("| CORUM |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "CORUM",
        f"{corum['recall_0.05_0.95']:.6g}",
        f"{baseline['recall_0.05_0.95']:.6g}",
        f"{corum['recall_0.10_0.90']:.6g}",
        f"{baseline['recall_0.10_0.90']:.6g}",
        str(corum["null_size"]),
        str(corum["query_size"]),
    ]
    assert f"(chance {results['chance']['recall_0.05_0.95']:.6g})" in text


def test_card_training_and_compute_numbers_come_from_the_run_files(folder):
    state = json.loads((folder / "trainer_state.json").read_text())
    state.update(global_step=123457, images_seen=987655, train_runtime_s=3725.5)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    args = json.loads((folder / "training_args.json").read_text())
    args["learning_rate"] = 0.000321
    (folder / "training_args.json").write_text(json.dumps(args))
    text = str(render_model_card(folder))
    assert "| optimizer steps | 123,457 |" in text
    assert "| images seen | 987,655 |" in text
    assert "| training time | 1 h 02 min 06 s (3725.5 s) |" in text
    assert f"| throughput | {987655 / 3725.5:.1f} images/s |" in text
    assert "| learning_rate | 0.000321 |" in text
    assert f"| final loss | {state['final_losses']['loss']:.6g} |" in text


def test_card_counts_parameters_from_the_safetensors_weights(folder):
    with safe_open(folder / "model.safetensors", "pt") as weights:
        total = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    assert f"| parameters (all tensors) | {total:,} |" in str(render_model_card(folder))


def test_card_lists_training_channels_by_recorded_name_and_infers_no_stain(folder):
    text = str(render_model_card(folder))
    assert "| 1 | DNA |" in text and "| 3 | Mito |" in text
    assert "Hoechst" not in text and "MitoTracker" not in text


def test_card_of_a_model_evaluated_on_the_simulated_screen_says_its_channels_are_simulated(folder):
    results = json.loads((folder / "eval_results.json").read_text())
    (folder / "eval_results.json").write_text(json.dumps({**results, "dataset": "synthetic:plate"}))
    text = str(render_model_card(folder))
    assert "simulated channels" in text and "Hoechst" not in text


def test_card_holds_no_machine_path_and_an_install_line_that_works(folder, tmp_path):
    machine = tmp_path / "home" / "alice" / "screens"
    args = json.loads((folder / "training_args.json").read_text())
    args.update(
        data=str(machine / "shards"),
        output_dir=str(machine / "runs" / "b16"),
        init_from=str(machine / "base"),
        resume_from_checkpoint=str(machine / "runs" / "b16" / "checkpoints" / "checkpoint-4"),
        model_preset="tiny",
    )
    (folder / "training_args.json").write_text(json.dumps(args))
    state = json.loads((folder / "trainer_state.json").read_text())
    state["dataset"] = {"name": "shards", "path": str(machine / "shards"), "num_fields": 2, "channels": ["DNA", "ER"]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    text = str(render_model_card(folder))
    assert str(tmp_path) not in text and "alice" not in text and str(folder) not in text
    assert "| data | shards |" in text and "| output_dir | b16 |" in text
    assert "pip install hf-cellmae" not in text and "`pip install -e .`\nin the clone's folder" in text


def test_card_is_named_after_the_run_not_the_generic_model_folder(folder, tmp_path):
    assert folder.name == "model"
    args = json.loads((folder / "training_args.json").read_text())
    (folder / "training_args.json").write_text(
        json.dumps({**args, "output_dir": "runs/camae-b16-jump", "model_preset": "tiny"})
    )
    assert str(render_model_card(folder)).splitlines()[0] == "---"
    assert "\n# camae-b16-jump\n" in str(render_model_card(folder))
    (folder / "training_args.json").write_text(json.dumps({**args, "output_dir": "run", "model_preset": "tiny"}))
    assert "\n# cellmae-tiny\n" in str(render_model_card(folder))
    assert "\n# cellmae-vit-s\n" in str(render_model_card(folder, repo_id="org/cellmae-vit-s"))


def test_card_for_a_folder_without_training_or_evaluation_files_says_what_is_unknown(folder):
    text = str(render_model_card(bare_folder(folder)))
    assert "Not evaluated: no `eval_results.json`" in text
    assert "Training configuration: unknown" in text
    assert "Unknown: no `trainer_state.json`" in text
    assert "`preprocessor_config.json` is missing" in text
    assert "model-index" not in text


def test_card_embeds_the_evaluation_plot_and_the_loss_curve(folder):
    text = str(render_model_card(folder))
    assert "![recall](plots/recall.png)" in text
    assert "![training loss](training_loss.png)" in text
    assert (folder / "training_loss.png").stat().st_size > 0


def test_card_reports_a_plot_named_by_the_evaluation_json_but_missing(folder):
    (folder / "plots" / "recall.png").unlink()
    text = str(render_model_card(folder))
    assert "![recall]" not in text
    assert "The recall plot `plots/recall.png` named by `eval_results.json` is not in the folder." in text


def test_licence_defaults_to_apache_and_is_configurable(folder):
    assert ModelCard(str(render_model_card(folder))).data.license == "apache-2.0"
    assert ModelCard(str(render_model_card(folder, license="mit"))).data.license == "mit"


def test_openphenom_derived_weights_keep_recursions_non_commercial_licence(folder):
    config = json.loads((folder / "config.json").read_text())
    config["source_checkpoint"] = "openphenom"
    (folder / "config.json").write_text(json.dumps(config))
    card = ModelCard(str(render_model_card(folder, license="apache-2.0")))
    assert card.data.license == "other"
    assert card.data.license_name == "recursion-openphenom-non-commercial"
    assert card.data.base_model == "recursionpharma/OpenPhenom"
    assert "Non-Commercial End User License Agreement" in card.text


def test_card_snippet_returns_the_channelwise_read_out_embed_writes_by_default_as_numpy(folder):
    """The card's embedding snippet, run as written on the folder's own model: the read-out `cellmae embed`
    gives by default, as numpy (the snippet runs under inference mode, so .numpy() works)."""
    import re

    import numpy as np
    from transformers import AutoImageProcessor, AutoModel

    import hf_cellmae  # noqa: F401  (registers the Auto classes, as the card's first snippet does)
    from hf_cellmae.evaluation.embed import DEFAULT_READOUT

    text = str(render_model_card(folder))
    snippet = re.search(r"Embed an image.*?```python\n(.*?)```", text, re.S).group(1)
    model, processor = AutoModel.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    channels = 3
    image = np.random.default_rng(0).integers(0, 4000, (channels, 64, 64), dtype=np.uint16)
    namespace = {"model": model, "processor": processor, "image": image}
    exec(snippet, namespace)
    assert DEFAULT_READOUT == "channelwise" and "cellmae embed --readout mean" in text
    assert namespace["embedding"].shape == (channels * model.config.hidden_size,)
    assert namespace["pooled"].shape == (model.config.hidden_size,)


def test_loading_snippets_use_the_repo_id(folder):
    text = str(render_model_card(folder, repo_id="org/cellmae-tiny"))
    assert 'AutoModel.from_pretrained("org/cellmae-tiny", trust_remote_code=True)' in text
    assert 'AutoImageProcessor.from_pretrained("org/cellmae-tiny", trust_remote_code=True)' in text


def test_packaged_template_is_the_model_cards_template():
    packaged = template_path()
    assert REPO_ROOT / "hf_cellmae" in packaged.parents or "site-packages" in str(packaged)
    assert packaged.read_bytes() == (REPO_ROOT / "model_cards" / "cellmae_model_card.md").read_bytes()


def test_card_command_writes_readme(folder):
    assert main(["card", str(folder), "--repo-id", "org/cellmae-tiny"]) == 0
    readme = (folder / "README.md").read_text()
    assert readme.startswith("---\n") and GENERATED_MARKER in readme and "org/cellmae-tiny" in readme


def test_card_command_keeps_a_hand_written_readme_unless_forced(folder, capsys):
    (folder / "README.md").write_text("# my own notes\n")
    assert main(["card", str(folder)]) == 2
    assert "written by hand" in capsys.readouterr().err.splitlines()[0]
    assert (folder / "README.md").read_text() == "# my own notes\n"
    assert main(["card", str(folder), "--force"]) == 0
    assert GENERATED_MARKER in (folder / "README.md").read_text()


def test_card_command_copies_evaluation_results_and_plots_into_the_folder(folder, tmp_path):
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    shutil.move(folder / "eval_results.json", evaluation / "eval_results.json")
    shutil.move(folder / "plots", evaluation / "plots")
    assert main(["card", str(folder), "--eval-results", str(evaluation / "eval_results.json")]) == 0
    assert (folder / "plots" / "recall.png").is_file()
    assert json.loads((folder / "eval_results.json").read_text()) == json.loads(
        (evaluation / "eval_results.json").read_text()
    )
    assert "![recall](plots/recall.png)" in (folder / "README.md").read_text()


def test_card_command_explains_a_folder_without_config(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err.splitlines()[0]


def test_card_labels_synthetic_results_as_synthetic_and_shows_the_suite(tmp_path):
    """Numbers from the simulated screen are never published as a benchmark on real data."""
    import json

    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
    from hf_cellmae.hub.model_card import write_model_card

    model_dir = tmp_path / "model"
    CellMAEForPreTraining(CellMAEConfig.from_preset("tiny")).save_pretrained(model_dir)
    sources = {"complexes": {"recall_0.05_0.95": 0.4, "recall_0.10_0.90": 0.5, "null_size": 10, "query_size": 5}}
    suite = {
        "featurizers": {
            "model": {"probe": {"Metadata_complex": {"logistic": 0.61, "knn": 0.5, "chance": 0.25}}},
            "pixel_stats": {"probe": {"Metadata_complex": {"logistic": 0.42, "knn": 0.3, "chance": 0.25}}},
        }
    }
    for dataset, expected in (
        ("synthetic:plate", "Recall of simulated relationships"),
        ("rxrx3-core", "Known-relationship recall (EFAAR benchmark)"),
    ):
        results = {
            "dataset": dataset,
            "alignment": "tvn",
            "aggregation": "mean",
            "n_perturbations": 5,
            "embedding_dim": 64,
            "sources": sources,
            "chance": {"recall_0.05_0.95": 0.1},
            "suite": suite,
        }
        (model_dir / "eval_results.json").write_text(json.dumps(results))
        card = write_model_card(model_dir).read_text()
        header, body = card.split("---", 2)[1:]
        assert expected in header
        assert ("**Synthetic data.**" in body) == dataset.startswith("synthetic:")
        assert "EFAAR benchmark" not in header or not dataset.startswith("synthetic:")
        assert "| probe complex | 0.610 | 0.420 |" in body


def test_card_command_in_a_read_only_folder_is_one_line_with_the_fix(folder, monkeypatch, capsys):
    def read_only(model_dir, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(model_dir) / "README.md"))

    monkeypatch.setattr("hf_cellmae.hub.model_card.write_model_card", read_only)
    assert main(["card", str(folder)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cellmae card")]
    assert len(lines) == 1 and f"cannot write the model card into {folder}: Permission denied" in lines[0], lines
    assert "writable" in lines[0]
