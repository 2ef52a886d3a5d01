"""The README's "Load a model in one line" block, run as written on a real 16-bit Cell Painting site (BBBC022).

The block loads `cellmae-demo/run/model`; the test writes a tiny random model and its processor there (in a
temporary folder it runs from), so the block's paths are used as written, and gives it `field`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT.parent / "shared" / "data" / "cellpainting_bbbc022" / "images"


def readme_python_block(heading: str) -> str:
    """The first python block under `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def real_field():
    import tifffile

    files = [SITE / f"plate1_A14_site1_Ch{channel}.tif" for channel in range(1, 6)]  # one site, its 5 stains
    if not all(path.is_file() for path in files):
        pytest.skip(f"real BBBC022 images not found: {SITE} (../shared/data beside the repository)")
    return np.stack([tifffile.imread(path) for path in files])


def test_the_readme_load_snippet_runs_as_written_on_a_real_field(real_field, tmp_path, monkeypatch):
    from hf_cellmae import CellMAEConfig, CellMAEForPreTraining, CellMAEImageProcessor

    monkeypatch.chdir(tmp_path)
    config = CellMAEConfig.from_preset("tiny", channel_names=["DNA", "ER", "RNA", "AGP", "Mito"])
    torch.manual_seed(0)
    CellMAEForPreTraining(config).save_pretrained("cellmae-demo/run/model")
    CellMAEImageProcessor(image_size=config.image_size, crop_mode="tile").save_pretrained("cellmae-demo/run/model")
    assert real_field.dtype == np.uint16 and real_field.shape[0] == 5
    namespace = {"field": real_field}
    exec(readme_python_block("## Load a model in one line"), namespace)
    channels, width = 5, config.hidden_size
    embedding, pooled, per_stain = namespace["embedding"], namespace["pooled"], namespace["per_stain"]
    assert isinstance(embedding, np.ndarray) and embedding.shape == (channels * width,)
    assert isinstance(pooled, np.ndarray) and pooled.shape == (width,)
    np.testing.assert_allclose(per_stain, embedding.reshape(channels, width), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled, embedding.reshape(channels, width).mean(0), rtol=1e-4, atol=1e-5)
