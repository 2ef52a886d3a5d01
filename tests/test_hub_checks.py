"""Checks a model folder passes before ``cellmae push`` uploads it (``hf_cellmae.hub.folder_checks``)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from hf_cellmae import CellMAEConfig, CellMAEForPreTraining
from hf_cellmae.cli import main
from hf_cellmae.hub import FolderCheckError, check_model_folder, push_model_folder
from hf_cellmae.image_processing_cellmae import CellMAEImageProcessor

FAKE_TOKEN = "hf_" + "Zq7" * 12


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    torch.manual_seed(0)
    CellMAEForPreTraining(CellMAEConfig.from_preset("tiny")).save_pretrained(folder)
    CellMAEImageProcessor(image_size=64).save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps({"learning_rate": 1e-3, "hub_token": None}))
    return folder


@pytest.fixture
def folder(saved_folder, tmp_path) -> Path:
    return Path(shutil.copytree(saved_folder, tmp_path / "model"))


def refusal(folder: Path, **kwargs) -> str:
    with pytest.raises(FolderCheckError) as caught:
        check_model_folder(folder, **kwargs)
    return str(caught.value)


def test_saved_model_folder_passes_and_lists_its_files(folder):
    report = check_model_folder(folder)
    assert report.architecture == "CellMAEForPreTraining"
    assert report.weight_files == ["model.safetensors"]
    assert {"configuration_cellmae.py", "modeling_cellmae.py"} <= set(report.remote_code_files)
    assert set(report.files) == {p.name for p in folder.iterdir()}


def test_folder_with_a_torch_pickle_is_refused(folder):
    torch.save({"step": 3}, folder / "optimizer.pt")
    message = refusal(folder)
    assert "optimizer.pt is (or may be) a pickle file" in message


def test_pickle_is_found_by_content_whatever_its_name(folder):
    (folder / "extra_state.dat").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert "extra_state.dat is (or may be) a pickle file" in refusal(folder)


def test_excluded_files_are_neither_checked_nor_uploaded(folder):
    torch.save({"step": 3}, folder / "optimizer.pt")
    report = check_model_folder(folder, exclude=["optimizer.pt"])
    assert "optimizer.pt" not in report.files


def test_folder_whose_weights_do_not_match_its_config_is_refused(folder):
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    assert "missing keys" in refusal(folder)


def test_folder_with_corrupt_weights_is_refused(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "does not load as CellMAEForPreTraining" in refusal(folder)


def test_folder_without_safetensors_weights_is_refused(folder):
    (folder / "model.safetensors").unlink()
    message = refusal(folder)
    assert "no model.safetensors" in message


def test_folder_without_the_model_code_for_remote_loading_is_refused(folder):
    (folder / "modeling_cellmae.py").unlink()
    assert "modeling_cellmae.py (needed by trust_remote_code loading) is missing" in refusal(folder)


def test_model_code_that_differs_from_the_installed_package_is_refused_naming_the_file(folder):
    with (folder / "modeling_cellmae.py").open("a") as source:
        source.write("\n# edited by hand\n")
    message = refusal(folder)
    assert (
        "modeling_cellmae.py differs from the installed hf_cellmae" in message and "--allow-modified-code" in message
    )
    assert "configuration_cellmae.py" not in message


def test_python_files_that_are_not_hf_cellmaes_are_refused_naming_them(folder):
    (folder / "helpers.py").write_text("print('hello')\n")
    assert "helpers.py is not part of hf_cellmae" in refusal(folder)


def test_edited_model_code_passes_with_a_warning_when_allowed(folder):
    with (folder / "modeling_cellmae.py").open("a") as source:
        source.write("\n# edited by hand\n")
    report = check_model_folder(folder, allow_modified_code=True)
    assert [w for w in report.warnings if w.startswith("modeling_cellmae.py differs")]
    assert list(report.modified_code) == ["modeling_cellmae.py"]


def test_folder_without_processor_config_is_refused(folder):
    (folder / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json is missing" in refusal(folder)


def test_access_token_written_in_training_arguments_is_refused(folder):
    (folder / "training_args.json").write_text(json.dumps({"learning_rate": 1e-3, "hub_token": FAKE_TOKEN}))
    assert "training_args.json contains what looks like a Hugging Face access token" in refusal(folder)


def test_secret_named_setting_with_a_value_is_refused(folder):
    (folder / "training_args.json").write_text(json.dumps({"logging": {"wandb_api_key": "0123abcd"}}))
    assert "sets logging.wandb_api_key to a non-empty value" in refusal(folder)


def test_file_holding_the_current_token_is_refused_whatever_its_format(folder):
    (folder / "notes.txt").write_text("pushed with my-private-token-value")
    assert "notes.txt contains your Hub access token" in refusal(folder, token="my-private-token-value")


def test_push_without_a_token_says_how_to_log_in(folder, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PermissionError, match="hf auth login"):
        push_model_folder(folder, "org/name")


def test_push_command_refuses_with_every_reason_on_one_line_and_exit_code_2(folder, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    torch.save({"step": 3}, folder / "optimizer.pt")
    (folder / "modeling_cellmae.py").unlink()
    assert main(["push", str(folder), "org/name"]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("cellmae push: error:")]) == 1, err
    assert "refusing to push" in err and "2 problem(s)" in err
    assert "optimizer.pt" in err and "modeling_cellmae.py" in err
    assert FAKE_TOKEN not in err
    assert not (folder / "README.md").exists()  # a refused folder is left as it was
