"""The model factory (hf_cellmae/training/models.py): every objective's model gets the run's overrides."""

import json

import pytest
import torch

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
from hf_cellmae.training.arguments import PretrainingArguments, parse_pretraining_arguments, read_config_file
from hf_cellmae.training.models import build_model, model_config

TINY = dict(
    image_size=32,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    decoder_hidden_size=32,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
)
MANIFEST = {"channels": ["DNA", "RNA", "AGP"]}


@pytest.fixture
def mae_folder(tmp_path):
    torch.manual_seed(0)
    model = CellMAEForPreTraining(CellMAEConfig.from_preset("tiny", channel_names=MANIFEST["channels"], **TINY))
    model.save_pretrained(tmp_path / "mae")
    return tmp_path / "mae"


def test_model_overrides_reach_the_model_of_init_from_with_the_mae_objective(mae_folder):
    args = PretrainingArguments(
        data="shards", init_from=str(mae_folder), model_overrides={"mask_ratio": 0.5, "fourier_loss_weight": 0.0}
    )
    model = build_model(args, MANIFEST)
    assert model.config.mask_ratio == 0.5 and model.config.fourier_loss_weight == 0.0
    saved = CellMAEForPreTraining.from_pretrained(mae_folder)
    assert torch.equal(
        model.cellmae.embeddings.patch_embeddings.weight, saved.cellmae.embeddings.patch_embeddings.weight
    )


def test_mask_ratio_flag_wins_over_model_overrides_and_reaches_the_model():
    args = parse_pretraining_arguments(
        ["--data", "shards", "--model-overrides", json.dumps({**TINY, "mask_ratio": 0.6}), "--mask-ratio", "0.5"]
    )
    assert args.mask_ratio == 0.5 and args.overrides["mask_ratio"] == 0.5
    assert args.model_overrides["mask_ratio"] == 0.6  # the typed overrides stay as typed
    assert build_model(args, MANIFEST).config.mask_ratio == 0.5


def test_mask_ratio_flag_reaches_the_model_of_init_from(mae_folder):
    args = PretrainingArguments(data="shards", init_from=str(mae_folder), mask_ratio=0.25)
    assert model_config(args, MANIFEST).mask_ratio == 0.25


def test_mask_ratio_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        PretrainingArguments(data="shards", mask_ratio=1.0)


def test_model_overrides_are_a_mapping_from_a_config_file_the_command_line_and_an_old_training_args_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: shards\nmodel_overrides:\n  image_size: 32\n")
    typed = parse_pretraining_arguments(["--config", str(config), "--model-overrides", '{"mask_ratio": 0.5}'])
    assert typed.model_overrides == {"image_size": 32, "mask_ratio": 0.5}
    old = tmp_path / "training_args.json"  # written when model_overrides was a JSON string
    old.write_text(json.dumps({"data": "shards", "model_overrides": json.dumps({"image_size": 32})}))
    assert read_config_file(old)["model_overrides"] == {"image_size": 32}
    assert PretrainingArguments(data="shards", model_overrides='{"image_size": 32}').model_overrides == {
        "image_size": 32
    }


def test_model_overrides_that_are_not_a_json_object_are_refused_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        parse_pretraining_arguments(["--data", "shards", "--model-overrides", "[1, 2]"])
    assert "not a JSON object" in capsys.readouterr().err


def test_the_memory_estimate_and_the_loop_build_one_config(mae_folder):
    args = PretrainingArguments(data="shards", model_overrides=TINY, mask_ratio=0.5)
    assert model_config(args, MANIFEST).to_dict() == build_model(args, MANIFEST).config.to_dict()
    assert model_config(args, MANIFEST).channel_names == MANIFEST["channels"]


def test_the_memory_estimate_measures_init_from_with_its_overrides(mae_folder, tmp_path, monkeypatch):
    from hf_cellmae.data.shards import MANIFEST_NAME, SHARD_FORMAT
    from hf_cellmae.training import memory

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / MANIFEST_NAME).write_text(json.dumps({"format": SHARD_FORMAT, **MANIFEST}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the estimate is made on a CPU only
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 64 * 2**30)
    said = []
    args = PretrainingArguments(
        data=str(tmp_path / "shards"),
        init_from=str(mae_folder),
        model_overrides={"image_size": 64},
        per_device_train_batch_size=2,
    )
    memory.check_training_memory(args, announce=said.append)
    assert "3 x 64 x 64 px crops" in said[0]  # the override, not the 32 px of the saved config
