"""Supervised objectives of the training loop: the weakly supervised baseline (`--objective wsl`) and
fine-tuning (`--objective classify`): labels in the batch, plate-wise normalisation, layer-wise lr decay,
held-out plates, exact resume, and embedding a classifier's folder like an MAE's."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_cellmae import CellMAEConfig, CellMAEForImageClassification, CellMAEForPreTraining
from hf_cellmae.training.arguments import parse_pretraining_arguments
from hf_cellmae.training.loop import pretrain

TINY = {
    "image_size": 32,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
}


@pytest.fixture(scope="module")
def two_plates(tmp_path_factory) -> Path:
    """Two synthetic plates (64 px fields, 5 channels): 4 genes + 2 control wells per plate, 2 sites each."""
    from hf_cellmae.data.shards import shard_folder
    from hf_cellmae.data.synthetic import make_synthetic_screen

    root = tmp_path_factory.mktemp("two_plates")
    plate = make_synthetic_screen(
        root / "plate",
        num_plates=2,
        field_size=64,
        num_pathways=1,
        complexes_per_pathway=2,
        genes_per_complex=2,
        replicates_per_plate=1,
        control_wells_per_plate=2,
        sites_per_well=2,
        num_workers=1,
        progress=False,
    )
    shard_folder(
        plate["images"],
        root / "shards",
        metadata=plate["metadata"],
        channel_names=plate["channels"],
        progress=False,
        fields_per_row_group=2,
    )
    return root / "shards"


def run_args(shards, out, **overrides):
    values = dict(
        data=str(shards),
        output_dir=str(out),
        model_overrides=json.dumps(TINY),
        max_steps=8,
        per_device_train_batch_size=8,
        save_steps=4,
        logging_steps=1,
        figure_steps=0,
        report_to="none",
        progress_bar=False,
        optimizer="adamw",
        learning_rate=3e-3,
        lr_scheduler="constant",
        warmup_ratio=0,
    )
    values.update(overrides)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", *value] if isinstance(value, list) else [f"--{key}={value}"]
    return parse_pretraining_arguments(argv)


@pytest.fixture(scope="module")
def wsl_run(two_plates, tmp_path_factory) -> tuple[Path, dict]:
    """8 WSL steps on Plate1, Plate2 held out and evaluated; checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("wsl")
    summary = pretrain(run_args(two_plates, run, objective="wsl", holdout_plates=["Plate2"]))
    return run, summary


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mae") / "model"
    torch.manual_seed(0)
    CellMAEForPreTraining(
        CellMAEConfig.from_preset("tiny", **TINY, channel_names=["DNA", "ER", "RNA", "AGP", "Mito"])
    ).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ labels
def test_labels_and_plates_reach_the_batch_as_ids_of_the_sorted_vocabulary(two_plates):
    from hf_cellmae.data.labels import label_vocabulary
    from hf_cellmae.data.streaming import stream_fields
    from hf_cellmae.training.loop import collate

    labels = label_vocabulary(two_plates, "perturbation")
    assert (
        labels.labels == sorted(labels.labels)
        and "non-targeting" in labels.labels
        and labels.plates == ["Plate1", "Plate2"]
    )
    samples = list(
        stream_fields(two_plates, image_size=32, num_epochs=1, standardize=False, metadata_fields=["perturbation"])
    )
    batch = collate(samples, labels=labels)
    assert batch["labels"].tolist() == [labels.labels.index(s["perturbation"]) for s in samples]
    assert batch["plate_ids"].tolist() == [int(s["plate"] == "Plate2") for s in samples]


def test_a_missing_label_column_is_refused_naming_the_columns(two_plates, tmp_path):
    from hf_cellmae.errors import UserError

    with pytest.raises(UserError, match=r"label column 'compound' is not in .*'perturbation'.*--label-col"):
        pretrain(run_args(two_plates, tmp_path, objective="wsl", label_col="compound"))


def _labelled_shards(root: Path, genes: list[str]) -> Path:
    """Eight 32 x 40 fields (2 plates x 2 wells x 2 sites) whose `gene` is `genes[i]` ("" = no value)."""
    from hf_cellmae.data.shards import shard_folder
    from tests.helpers.data_fixtures import make_rxrx_plate

    fields = make_rxrx_plate(root / "images", plates=2, wells=("A01", "A02"), sites=2)
    lines = ["experiment,plate,well,site,gene"]
    lines += [
        f"{fid.split('/')[0]},{fid.split('/')[1]},{fid.split('/')[2]},{fid.split('/')[3][1:]},{gene}"
        for fid, gene in zip(sorted(fields), genes)
    ]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    shard_folder(
        root / "images", root / "shards", layout="rxrx", metadata=root / "metadata.csv", num_workers=1, progress=False
    )
    return root / "shards"


def test_fields_without_a_label_are_refused_naming_the_count_and_the_flag(tmp_path):
    shards = _labelled_shards(tmp_path, ["A", "B", "", "A", "B", "A", "", "B"])
    with pytest.raises(ValueError, match=r"label column 'gene' has no value in 2 of 8 fields.*--drop-missing-labels"):
        pretrain(run_args(shards, tmp_path / "run", objective="wsl", label_col="gene", max_steps=1))


def test_fields_without_a_label_are_left_out_and_counted_with_drop_missing_labels(tmp_path, capsys):
    from hf_cellmae.data.labels import label_vocabulary
    from hf_cellmae.training.loop import training_stream

    shards = _labelled_shards(tmp_path, ["A", "B", "", "A", "B", "A", "", "B"])
    args = run_args(shards, tmp_path / "run", objective="wsl", label_col="gene", max_steps=2, drop_missing_labels=True)
    pretrain(args)
    assert "left out 2 of 8 fields without a value in label column 'gene'" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert sorted(config["label2id"]) == ["A", "B"]
    stream = training_stream(args, CellMAEConfig(**TINY), ["w1", "w2", "w3"], 0, 1)
    genes = [sample["gene"] for _, sample in zip(range(24), stream)]
    assert set(genes) == {"A", "B"}  # four passes over the six labelled fields, no empty label among them
    assert label_vocabulary(shards, "gene").missing == 2


def test_a_label_column_with_fewer_than_two_classes_is_refused(tmp_path):
    shards = _labelled_shards(tmp_path, ["A"] * 8)
    with pytest.raises(ValueError, match=r"label column 'gene' has 1 class \(A\).*at least 2"):
        pretrain(run_args(shards, tmp_path / "run", objective="wsl", label_col="gene", max_steps=1))


def test_classes_with_few_examples_are_warned_about(tmp_path):
    from hf_cellmae.data.labels import label_vocabulary, label_warnings

    shards = _labelled_shards(tmp_path, ["A", "A", "A", "A", "A", "A", "A", "B"])
    (warning,) = label_warnings(label_vocabulary(shards, "gene"), min_examples=5)
    assert "1 class(es) of label column 'gene' have fewer than 5 fields" in warning and "B (1)" in warning


# ------------------------------------------------------------------------------- plate-wise normalisation
def test_plate_wise_normalisation_makes_logits_blind_to_an_offset_shared_by_a_plate():
    torch.manual_seed(0)
    model = CellMAEForImageClassification(
        CellMAEConfig.from_preset("tiny", **TINY, num_labels=3, classifier_batch_norm="plate")
    ).eval()
    pixels, plates = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 0, 1, 1, 1])
    offset = {"on": False}

    def add_plate_offset(module, inputs, out):  # the embeddings of plate 1 all move by one vector
        if offset["on"]:
            out.pooler_output = out.pooler_output + (plates == 1)[:, None] * torch.linspace(
                -3, 5, out.pooler_output.shape[1]
            )
        return out

    model.cellmae.register_forward_hook(add_plate_offset)
    with torch.no_grad():
        before = model(pixels, plate_ids=plates).logits
        offset["on"] = True
        after = model(pixels, plate_ids=plates).logits
        model.config.classifier_batch_norm = None
        unnormalised = model(pixels, plate_ids=plates).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(unnormalised[3:], before[3:], atol=1e-2)


# ------------------------------------------------------------------------------------------ the WSL run
def test_wsl_loss_decreases_and_the_run_reports_loss_and_accuracy(wsl_run):
    run, summary = wsl_run
    history = json.loads((run / "model" / "trainer_state.json").read_text())["log_history"]
    losses = [record["loss"] for record in history]
    assert len(losses) == 8 and all("accuracy" in r and "mse_loss" not in r for r in history)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architectures"] == ["CellMAEForImageClassification"] and config["classifier_batch_norm"] == "plate"
    assert config["label2id"]["non-targeting"] == sorted(config["label2id"]).index("non-targeting")
    assert not (run / "figures").exists() or not list((run / "figures").glob("*.png"))


def test_held_out_plates_are_never_trained_on_and_are_evaluated_at_the_end(two_plates, wsl_run):
    from hf_cellmae.configuration_cellmae import CellMAEConfig as Config
    from hf_cellmae.training.loop import training_stream

    run, summary = wsl_run
    args = run_args(two_plates, run, objective="wsl", holdout_plates=["Plate2"])
    stream = training_stream(args, Config.from_preset("tiny", **TINY), ["DNA", "ER", "RNA", "AGP", "Mito"], 0, 1, 0)
    plates = {sample["plate"] for sample, _ in zip(stream, range(40))}  # more than three epochs of Plate1
    assert plates == {"Plate1"}
    evaluation = summary["holdout_evaluation"]
    assert evaluation["plates"] == ["Plate2"] and evaluation["num_samples"] == 12 and 0 <= evaluation["accuracy"] <= 1
    state = json.loads((run / "model" / "trainer_state.json").read_text())
    assert state["holdout_evaluation"] == evaluation


def test_a_resumed_wsl_run_ends_with_the_same_weights(two_plates, wsl_run, tmp_path):
    run, _ = wsl_run
    shutil.copytree(run / "checkpoints" / "checkpoint-4", tmp_path / "checkpoints" / "checkpoint-4")
    pretrain(
        run_args(two_plates, tmp_path, objective="wsl", holdout_plates=["Plate2"], resume_from_checkpoint="latest")
    )
    expected = load_file(str(run / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_wsl_model_folder_embeds_like_an_mae(two_plates, wsl_run, tmp_path):
    from hf_cellmae.evaluation import read_embeddings
    from hf_cellmae.evaluation.embed import ModelFeaturizer, embed_dataset

    run, _ = wsl_run
    featurizer = ModelFeaturizer(run / "model", batch_size=8)
    info = embed_dataset(two_plates, tmp_path / "embeddings", featurizer, progress=False)
    table = read_embeddings(tmp_path / "embeddings")
    features = [c for c in table.columns if not c.startswith("Metadata_")]
    assert (
        info["num_rows"] == len(table) == 24 and len(features) == 5 * TINY["hidden_size"]
    )  # channel-wise, the default
    assert np.isfinite(table[features].to_numpy()).all()


# ------------------------------------------------------------------------------------------- fine-tuning
def test_fine_tuning_starts_from_the_pretrained_encoder_with_a_new_head(two_plates, mae_folder, tmp_path):
    from hf_cellmae.data.labels import label_vocabulary
    from hf_cellmae.data.shards import load_manifest
    from hf_cellmae.training.loop import build_model

    args = run_args(two_plates, tmp_path, objective="classify", init_from=str(mae_folder), model_overrides="{}")
    labels = label_vocabulary(two_plates, "perturbation")
    model = build_model(args, load_manifest(two_plates), labels)
    source = load_file(str(mae_folder / "model.safetensors"))
    weights = model.state_dict()
    encoder = [k for k in source if k.startswith("cellmae.")]
    assert encoder and all(torch.equal(weights[k], source[k]) for k in encoder)
    assert not any(k.startswith("decoder.") for k in weights)
    assert type(model) is CellMAEForImageClassification and model.classifier.out_features == len(labels.labels)
    assert model.config.id2label == labels.id2label and model.config.classifier_batch_norm is None


def test_layer_decay_gives_each_depth_the_documented_learning_rate(mae_folder):
    from hf_cellmae.training.optimization import build_optimizer

    model = CellMAEForImageClassification.from_pretrained(mae_folder, num_labels=3)
    depth = model.config.num_hidden_layers  # D = 2: embedding at 0, blocks at 1..2, head at 3
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.05, (0.9, 0.95), layer_decay=0.5)
    lr = {
        name: group["lr"]
        for group in optimizer.param_groups
        for param in group["params"]
        for name, p in model.named_parameters()
        if p is param
    }
    assert lr["cellmae.embeddings.patch_embeddings.weight"] == pytest.approx(1e-3 * 0.5 ** (depth + 1))
    assert lr["cellmae.embeddings.cls_token"] == pytest.approx(1e-3 * 0.5 ** (depth + 1))
    assert lr["cellmae.encoder.layers.0.in_proj.weight"] == pytest.approx(1e-3 * 0.5**depth)
    assert lr[f"cellmae.encoder.layers.{depth - 1}.in_proj.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr["classifier.weight"] == lr["cellmae.layernorm.weight"] == pytest.approx(1e-3)
    assert len(lr) == len(list(model.parameters()))


def test_a_fine_tuning_run_with_layer_decay_resumes_to_the_same_weights(two_plates, mae_folder, tmp_path):
    options = dict(
        objective="classify",
        init_from=str(mae_folder),
        model_overrides="{}",
        layer_decay=0.75,
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        holdout_plates=["Plate1"],
    )
    straight = pretrain(run_args(two_plates, tmp_path / "straight", **options))
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "checkpoint-2", tmp_path / "resumed" / "checkpoints" / "checkpoint-2"
    )
    resumed = pretrain(run_args(two_plates, tmp_path / "resumed", resume_from_checkpoint="latest", **options))
    expected = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert straight["holdout_evaluation"] == resumed["holdout_evaluation"]
    assert straight["holdout_evaluation"]["num_samples"] == 12


def test_a_munet_wsl_run_trains_a_munet_classifier_that_embeds(two_plates, tmp_path):
    from hf_cellmae.evaluation.embed import ModelFeaturizer, embed_dataset

    summary = pretrain(
        run_args(
            two_plates,
            tmp_path / "run",
            objective="wsl",
            model_type="munet",
            model_overrides=json.dumps({"image_size": 32}),
            max_steps=2,
            save_steps=2,
            per_device_train_batch_size=4,
        )
    )
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert (
        config["architectures"] == ["CellMUNetForImageClassification"] and config["classifier_batch_norm"] == "plate"
    )
    assert np.isfinite(summary["final_loss"])
    info = embed_dataset(
        two_plates, tmp_path / "embeddings", ModelFeaturizer(tmp_path / "run" / "model", batch_size=8), progress=False
    )
    assert info["num_rows"] == 24


def test_holdout_plates_flag_takes_several_whole_plate_names():
    """`--holdout-plates Plate2 Plate3` is two plates (not the letters of one string)."""
    from hf_cellmae.training.arguments import parse_pretraining_arguments

    args = parse_pretraining_arguments(
        ["--data", "shards", "--objective", "wsl", "--holdout-plates", "Plate2", "Plate3"]
    )
    assert args.holdout_plates == ["Plate2", "Plate3"]


# ------------------------------------------------------------------------------- unlabeled fields, baselines
def test_fields_without_a_label_are_no_class_but_counted_unless_a_class_is_named_for_them(two_plates):
    from hf_cellmae.data.labels import label_vocabulary

    labels = label_vocabulary(two_plates, "complex")  # control wells have no complex
    assert "" not in labels.labels and "None" not in labels.labels and "nan" not in labels.labels
    assert labels.num_unlabeled == 8 and labels.num_fields == 24  # 2 control wells x 2 sites x 2 plates
    named = label_vocabulary(two_plates, "complex", unlabeled_class="control")
    assert named.labels == sorted(labels.labels + ["control"]) and named.label_of(None) == "control"


def test_a_classification_run_leaves_unlabeled_fields_out_and_reports_majority_and_chance_beside_accuracy(
    two_plates, tmp_path, capsys
):
    summary = pretrain(
        run_args(
            two_plates,
            tmp_path,
            objective="wsl",
            label_col="complex",
            holdout_plates=["Plate2"],
            max_steps=2,
            drop_missing_labels=True,
        )
    )
    evaluation = summary["holdout_evaluation"]
    assert evaluation["num_samples"] == 8  # Plate2's 4 gene wells x 2 sites; its 2 control wells left out
    assert evaluation["num_classes"] == 2 and evaluation["chance_rate"] == 0.5
    assert evaluation["majority_class_rate"] == 0.5  # each complex holds 2 of the 4 genes
    out = capsys.readouterr().out
    assert "left out 8 of 24 fields without a value in label column 'complex' (--drop-missing-labels)" in out
    assert "complex accuracy" in out and "always answering the most frequent" in out and "chance: 0.5000" in out


def test_the_cli_prints_majority_and_chance_beside_held_out_accuracy(two_plates, tmp_path, capsys):
    from hf_cellmae.cli import main

    argv = [
        f"--{k}={v}"
        for k, v in dict(
            data=two_plates,
            output_dir=tmp_path,
            model_overrides=json.dumps(TINY),
            max_steps=1,
            per_device_train_batch_size=4,
            figure_steps=0,
            report_to="none",
            progress_bar=False,
            objective="wsl",
            label_col="complex",
            unlabeled_class="control",
        ).items()
    ]
    assert main(["pretrain", *argv, "--holdout-plates", "Plate2"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Held-out evaluation:"))
    assert "on 12 crops" in line and "3 classes" in line and "chance: 0.3333" in line  # controls are a class here
    assert re.search(r"most frequent, '\w+': 0.3333;", line), line  # 4 fields of each of the 3 classes
