"""Classification heads (CellMAEForImageClassification, CellMUNetForImageClassification): transformers'
conventions (labels -> cross-entropy, id2label/label2id), mean or attention read-out, loading from a
pre-training folder with only the head newly initialised, Auto classes and remote code."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification

from hf_cellmae import (
    CellMAEConfig,
    CellMAEForImageClassification,
    CellMAEForPreTraining,
    CellMUNetConfig,
    CellMUNetForImageClassification,
    CellMUNetForPreTraining,
)

LABELS = {"id2label": {0: "control", 1: "geneA", 2: "geneB"}, "label2id": {"control": 0, "geneA": 1, "geneB": 2}}


def camae(**overrides) -> CellMAEConfig:
    return CellMAEConfig.from_preset("tiny", image_size=32, **overrides)


def munet(**overrides) -> CellMUNetConfig:
    return CellMUNetConfig.from_preset("tiny", num_channels=5, image_size=32, **overrides)


FAMILIES = {
    "cellmae": (camae, CellMAEForPreTraining, CellMAEForImageClassification, "cellmae"),
    "munet": (munet, CellMUNetForPreTraining, CellMUNetForImageClassification, "munet"),
}


def images(batch=4, seed=0) -> torch.Tensor:
    return torch.randn(batch, 5, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_give_the_cross_entropy_of_the_logits(family, pooling):
    config, _, head, _ = FAMILIES[family]
    model = head(config(classifier_pooling=pooling, **LABELS)).eval()
    labels = torch.tensor([0, 2, 1, 1])
    out = model(images(), labels=labels)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model(images()).loss is None


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_read_out_is_the_pooled_embedding(family):
    config, _, head, prefix = FAMILIES[family]
    model = head(config(**LABELS)).eval()
    encoder = getattr(model, prefix)
    torch.testing.assert_close(model(images()).logits, model.classifier(encoder(images()).pooler_output))


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loading_a_pretraining_folder_drops_the_decoder_and_initialises_only_the_head(family, pooling, tmp_path):
    config, pretraining, head, prefix = FAMILIES[family]
    pretrained = pretraining(config()).eval()
    pretrained.save_pretrained(tmp_path)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not propagate to the root
    try:
        model, info = head.from_pretrained(
            tmp_path, num_labels=3, classifier_pooling=pooling, output_loading_info=True, **LABELS
        )
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    head_keys = {"classifier.weight", "classifier.bias"}
    if pooling == "attention":
        head_keys |= {name for name, _ in model.named_parameters() if name.startswith("pool.")}
    assert set(info["missing_keys"]) == head_keys
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    report = "\n".join(messages)
    reported = set(re.findall(r"^(\S+)\s+\|\s+MISSING", report, flags=re.M))
    assert reported == head_keys, report  # the load report names the new head, nothing else
    assert "decoder" not in report
    for name, value in getattr(pretrained, prefix).state_dict().items():
        assert torch.equal(getattr(model, prefix).state_dict()[name], value), name
    assert model.config.id2label[2] == "geneB" and model.config.label2id["geneA"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_keeps_the_head_and_the_labels(family, tmp_path):
    config, _, head, _ = FAMILIES[family]
    model = head(config(classifier_pooling="attention", **LABELS)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is head
    assert reloaded.config.id2label == LABELS["id2label"] and reloaded.config.classifier_pooling == "attention"
    torch.testing.assert_close(reloaded(images()).logits, model(images()).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_class_builds_the_head_on_a_pretraining_folder(family, tmp_path):
    config, pretraining, head, _ = FAMILIES[family]
    pretraining(config()).save_pretrained(tmp_path)
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3)) is head


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_decrease_the_classification_loss(family):
    config, _, head, _ = FAMILIES[family]
    model = head(config(**LABELS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, labels = images(batch=6), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for _ in range(8):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_heads_load_with_trust_remote_code_without_the_package(tmp_path):
    expected = {}
    for family, (config, _, head, _) in FAMILIES.items():
        model = head(config(classifier_pooling="attention", **LABELS)).eval()
        model.save_pretrained(tmp_path / family)
        saved = json.loads((tmp_path / family / "config.json").read_text())
        assert saved["auto_map"]["AutoModelForImageClassification"].endswith(f".{head.__name__}")
        with torch.no_grad():
            expected[family] = model(images()).logits.numpy()
        np.save(tmp_path / f"{family}.npy", expected[family])
    torch.save(images(), tmp_path / "images.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_cellmae"] = None  # the package cannot be imported
        import numpy as np, torch
        from transformers import AutoModelForImageClassification
        x = torch.load({str(tmp_path / "images.pt")!r})
        for family in {list(FAMILIES)!r}:
            model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r} + "/" + family, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                got = model(x).logits.numpy()
            np.testing.assert_allclose(got, np.load({str(tmp_path)!r} + f"/{{family}}.npy"), rtol=1e-5, atol=1e-6)
            print("REMOTE_OK", type(model).__name__, model.config.id2label[2])
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE_OK CellMAEForImageClassification geneB" in result.stdout, result.stderr[-3000:]
    assert "REMOTE_OK CellMUNetForImageClassification geneB" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_a_pretraining_folder_loads_as_a_new_classifier_with_trust_remote_code_without_the_package(tmp_path):
    """Fine-tuning a shared CA-MAE checkpoint needs no hf_cellmae: the folder's auto_map names the head."""
    pretrained = CellMAEForPreTraining(camae())
    pretrained.save_pretrained(tmp_path / "mae")
    torch.save(pretrained.cellmae.embeddings.patch_embeddings.weight.detach(), tmp_path / "patch.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_cellmae"] = None  # the package cannot be imported
        import torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "mae")!r}, trust_remote_code=True, num_labels=3)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.testing.assert_close(model.cellmae.embeddings.patch_embeddings.weight, torch.load({str(tmp_path / "patch.pt")!r}))
        print("REMOTE_OK", type(model).__name__, model.classifier.out_features)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE_OK CellMAEForImageClassification 3" in result.stdout, result.stderr[-3000:]
