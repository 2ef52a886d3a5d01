"""End to end on a local Hub fake: ``cellmae push`` a trained tiny model, then load it by its Hub id.

The Hub cannot be reached from test machines; ``fake_hub.FakeHub`` answers the endpoints
huggingface_hub uses, on 127.0.0.1. Whatever must talk to it through huggingface_hub's import-time
``HF_ENDPOINT`` runs in a subprocess with a private ``HF_HOME``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file

from hf_cellmae import CellMAEModel
from hf_cellmae.cli import main
from hf_cellmae.hub import push_model_folder
from hf_cellmae.image_processing_cellmae import CellMAEImageProcessor
from tests.helpers.fake_hub import FakeHub, make_trained_model_folder, real_image_or_none

REPO_ID = "org/cellmae-tiny"
TOKEN = "hf_" + "Fake7oken" * 4


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return make_trained_model_folder(tmp_path_factory.mktemp("trained") / "cellmae-tiny")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


def hub_env(endpoint: str, hf_home: Path, **extra) -> dict:
    """The environment of a subprocess that talks to ``endpoint`` with its own cache and no inherited token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def run_python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result


@dataclass
class PushRun:
    exit_code: int
    output: str  # stdout + stderr
    logs: str  # every record of the hf_cellmae, huggingface_hub and transformers loggers, DEBUG and up


@pytest.fixture(scope="module")
def pushed(hub, model_folder) -> PushRun:
    """``cellmae push MODEL_DIR org/cellmae-tiny``, token from HF_TOKEN, with all output and logs captured."""
    stream, logs = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    loggers = [logging.getLogger(name) for name in ("hf_cellmae", "huggingface_hub", "transformers")]
    levels = [logger.level for logger in loggers]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)
        patch.setenv("HF_TOKEN", TOKEN)
        for logger in loggers:
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                code = main(["push", str(model_folder), REPO_ID, "--commit-message", "First tiny model"])
        finally:
            for logger, level in zip(loggers, levels):
                logger.removeHandler(handler)
                logger.setLevel(level)
    return PushRun(code, stream.getvalue(), logs.getvalue())


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """A real 5-channel JUMP site when ../shared/data is present, else random uint16 pixels."""
    array = real_image_or_none()
    if array is None:
        array = np.random.default_rng(0).integers(0, 65535, size=(5, 384, 384), dtype=np.uint16)
    path = tmp_path_factory.mktemp("image") / "image.npy"
    np.save(path, array)
    return path


REMOTE_EMBED = """
    import sys
    sys.modules["hf_cellmae"] = None  # the package must not be importable: only the Hub's code may run
    import numpy as np, torch
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    inputs = processor([np.load(sys.argv[2])], return_tensors="pt")
    with torch.no_grad():
        embedding = model(pixel_values=inputs["pixel_values"]).pooler_output
    np.save(sys.argv[3], embedding.numpy())
    print(type(model).__module__, type(processor).__module__)
"""


def local_embedding(model_folder: Path, image: Path) -> np.ndarray:
    model = CellMAEModel.from_pretrained(model_folder).eval()
    processor = CellMAEImageProcessor.from_pretrained(model_folder)
    with torch.no_grad():
        return model(
            pixel_values=processor([np.load(image)], return_tensors="pt")["pixel_values"]
        ).pooler_output.numpy()


@pytest.fixture(scope="module")
def remote_load(pushed, hub, hf_home, image, tmp_path_factory):
    """Load the pushed repo by id with trust_remote_code in a process where hf_cellmae cannot be imported."""
    out = tmp_path_factory.mktemp("remote") / "embedding.npy"
    result = run_python(REMOTE_EMBED, hub_env(hub.url, hf_home), REPO_ID, str(image), str(out))
    return result, np.load(out)


def test_push_uploads_the_model_folder_in_one_commit(pushed, hub, model_folder):
    assert pushed.exit_code == 0, pushed.output
    repo = hub.repos[REPO_ID]
    assert list(repo.messages.values()) == ["initial commit", "First tiny model"]
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_cellmae.py",
        "modeling_cellmae.py",
        "image_processing_cellmae.py",
        "training_args.json",
        "trainer_state.json",
        "eval_results.json",
        "plots/recall.png",
        "training_loss.png",
    }
    assert expected <= set(hub.files(REPO_ID))
    assert hub.files(REPO_ID)["model.safetensors"] == (model_folder / "model.safetensors").read_bytes()


def test_pushed_card_loads_the_model_by_its_repo_id(pushed, hub):
    readme = hub.files(REPO_ID)["README.md"].decode()
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in readme


@pytest.mark.slow
def test_remote_code_load_without_hf_cellmae_gives_the_local_folders_embeddings(remote_load, model_folder, image):
    result, remote = remote_load
    model_module, processor_module = result.stdout.split()
    assert model_module.startswith("transformers_modules.") and processor_module.startswith("transformers_modules.")
    np.testing.assert_allclose(remote, local_embedding(model_folder, image), rtol=0, atol=1e-6)


def test_token_is_used_but_never_written_to_disk_logs_or_card(pushed, hub, model_folder):
    assert TOKEN in hub.tokens_seen
    assert "POST /api/models/org/cellmae-tiny/commit/main" in hub.requests
    assert TOKEN not in pushed.output and TOKEN not in pushed.logs
    secret = TOKEN.encode()
    assert not [p for p in model_folder.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not [name for name, content in hub.files(REPO_ID).items() if secret in content]


# -- in-process pushes: push_model_folder builds its HfApi at call time, so patching the endpoint suffices --


@pytest.fixture
def local_hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def test_private_flag_creates_a_private_repo(local_hub, model_folder):
    push_model_folder(model_folder, "org/private-model", private=True)
    assert local_hub.repos["org/private-model"].private


def test_revision_commits_to_a_new_branch_and_leaves_main_alone(local_hub, model_folder):
    push_model_folder(model_folder, "org/branched", revision="experiment-1")
    assert "model.safetensors" in local_hub.files("org/branched", "experiment-1")
    assert set(local_hub.files("org/branched", "main")) == {".gitattributes"}


def test_large_weights_are_pushed_as_safetensors_shards_with_an_index(local_hub, model_folder):
    push_model_folder(model_folder, "org/sharded", max_shard_size="300KB")
    files = local_hub.files("org/sharded")
    shards = sorted(name for name in files if name.startswith("model-") and name.endswith(".safetensors"))
    index = json.loads(files["model.safetensors.index.json"])
    assert len(shards) > 1 and "model.safetensors" not in files
    assert set(index["weight_map"].values()) == set(shards)
    rebuilt = {k: v for shard in shards for k, v in load(files[shard]).items()}
    original = load_file(model_folder / "model.safetensors")
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert (model_folder / "model.safetensors").is_file()  # the local folder keeps its single file


def test_pushing_again_replaces_stale_weight_shards(local_hub, model_folder):
    push_model_folder(model_folder, "org/repushed", max_shard_size="300KB")
    push_model_folder(model_folder, "org/repushed")
    weights = sorted(name for name in local_hub.files("org/repushed") if "safetensors" in name)
    assert weights == ["model.safetensors"]


def test_push_to_an_unreachable_hub_is_one_line_naming_the_endpoint(model_folder, tmp_path, monkeypatch, capsys):
    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = main(["push", str(folder), "org/unreachable"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cellmae push")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert f"cannot reach the Hub at {endpoint}" in lines[0] and "HF_ENDPOINT" in lines[0]
    assert TOKEN not in err


def test_edited_model_code_is_pushed_only_when_allowed_and_then_named_in_a_warning(
    local_hub, model_folder, tmp_path, caplog, capsys
):
    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    edited = (folder / "modeling_cellmae.py").read_text() + "\n# edited by hand after training\n"
    (folder / "modeling_cellmae.py").write_text(edited)
    assert main(["push", str(folder), "org/edited"]) == 2
    assert "modeling_cellmae.py differs from the installed hf_cellmae" in capsys.readouterr().err
    assert "org/edited" not in local_hub.repos
    with caplog.at_level(logging.WARNING, logger="hf_cellmae"):
        assert main(["push", str(folder), "org/edited", "--allow-modified-code"]) == 0
    assert "modeling_cellmae.py differs from the installed hf_cellmae" in caplog.text
    assert "configuration_cellmae.py" not in caplog.text
    assert local_hub.files("org/edited")["modeling_cellmae.py"].decode() == edited


def test_a_model_folder_where_the_card_cannot_be_written_is_one_line_with_the_fix(
    local_hub, model_folder, tmp_path, monkeypatch, capsys
):
    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    (folder / "README.md").unlink(missing_ok=True)

    def read_only(model_dir, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(model_dir) / "README.md"))

    monkeypatch.setattr("hf_cellmae.hub.push.write_model_card", read_only)
    code = main(["push", str(folder), "org/read-only"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cellmae push")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert (
        f"cannot write the model card {folder / 'README.md'}: Permission denied" in lines[0]
        and "--no-card" in lines[0]
    )
    assert "org/read-only" not in local_hub.repos


@pytest.mark.slow
def test_model_push_to_hub_gives_the_same_model_files(pushed, hub, hf_home, model_folder):
    """``model.push_to_hub`` + ``processor.push_to_hub`` (transformers' own path) give the same model repo."""
    code = """
        import sys
        from hf_cellmae import CellMAEForPreTraining
        from hf_cellmae.image_processing_cellmae import CellMAEImageProcessor
        CellMAEForPreTraining.from_pretrained(sys.argv[1]).push_to_hub("org/via-python")
        CellMAEImageProcessor.from_pretrained(sys.argv[1]).push_to_hub("org/via-python")
    """
    run_python(code, hub_env(hub.url, hf_home, HF_TOKEN=TOKEN), str(model_folder))
    via_cli, via_python = hub.files(REPO_ID), hub.files("org/via-python")
    for name in ("configuration_cellmae.py", "modeling_cellmae.py", "image_processing_cellmae.py"):
        assert via_python[name] == via_cli[name], name
    for name in ("config.json", "preprocessor_config.json"):
        assert json.loads(via_python[name]) == json.loads(via_cli[name]), name
    cli_weights, python_weights = load(via_cli["model.safetensors"]), load(via_python["model.safetensors"])
    assert cli_weights.keys() == python_weights.keys()
    assert all(torch.equal(cli_weights[k], python_weights[k]) for k in cli_weights)


@pytest.mark.slow
def test_offline_load_from_the_cache_after_the_hub_stops(remote_load, hub, hf_home, image, tmp_path):
    _, online = remote_load
    stopped_url = hub.url
    hub.stop()  # last test of the module: the module's hub is gone from here on
    out = tmp_path / "offline.npy"
    run_python(REMOTE_EMBED, hub_env(stopped_url, hf_home, HF_HUB_OFFLINE="1"), REPO_ID, str(image), str(out))
    np.testing.assert_array_equal(np.load(out), online)
