"""Embed a real multi-channel microscopy image: one line to load the model, a few to embed.

    python examples/embed_in_one_line.py --model path/to/model       # or a Hub id, e.g. my-org/cellmae
    python examples/embed_in_one_line.py                             # no model: a random tiny one is made

The one line (after `import hf_cellmae`, which registers the model with transformers):

    model = AutoModel.from_pretrained("path/or/hub-id")
    # without installing hf_cellmae: the model code ships in the model folder / Hub repo
    # model = AutoModel.from_pretrained("path/or/hub-id", trust_remote_code=True)

The image is a 5-channel, 16-bit BBBC022 Cell Painting site (one TIFF per channel, read with tifffile)
from ../shared/data beside the repository when present, else a field of the built-in synthetic plate.
The processor tiles it into model-sized crops and standardises each channel (no RGB conversion, no
clipping to 8 bits); the crop embeddings are averaged into one vector per image.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import torch
from transformers import AutoImageProcessor, AutoModel, pipeline

import hf_cellmae  # noqa: F401  (registers CellMAE with the Auto classes and the pipeline)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BBBC022_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]  # Ch1..Ch5: Hoechst, ConA, SYTO14, WGA+phalloidin, MitoTracker


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: write a random tiny model)")
    parser.add_argument(
        "--data-dir", default=str(SHARED_DATA), help="folder holding cellpainting_bbbc022/ (default: ../shared/data)"
    )
    parser.add_argument(
        "--site", default="plate1_A14_site1", help="BBBC022 site: files {site}_Ch1.tif .. {site}_Ch5.tif"
    )
    parser.add_argument("--out", default="cellmae-embed-example", help="where the random tiny model is written")
    parser.add_argument("--save", default=None, help="also save the embeddings to this .npz file")
    return parser.parse_args(argv)


def random_tiny_model(folder: Path) -> str:
    """Weights that were never trained: the shapes are right, the numbers mean nothing."""
    config = hf_cellmae.CellMAEConfig.from_preset("tiny", channel_names=BBBC022_CHANNELS)
    hf_cellmae.CellMAEModel(config).save_pretrained(folder)
    hf_cellmae.CellMAEImageProcessor(image_size=config.image_size, crop_mode="tile").save_pretrained(folder)
    return str(folder)


def read_bbbc022_site(data_dir: Path, site: str) -> np.ndarray | None:
    """`(5, 520, 696)` uint16, channels DNA, ER, RNA, AGP, Mito; None (with the reason printed) when absent."""
    files = [data_dir / "cellpainting_bbbc022" / "images" / f"{site}_Ch{c}.tif" for c in range(1, 6)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"BBBC022 site not found ({missing[0]} is missing): using a synthetic field instead")
        return None
    return np.stack([tifffile.imread(f) for f in files])


def synthetic_field(image_size: int) -> np.ndarray:
    """One 5-channel 16-bit field of the built-in synthetic plate, twice the model's crop size."""
    from hf_cellmae.data import discover_fields, make_synthetic_screen
    from hf_cellmae.data.image_io import read_field

    with tempfile.TemporaryDirectory() as folder:
        plate = make_synthetic_screen(
            folder,
            num_plates=1,
            field_size=2 * image_size,
            num_pathways=1,
            complexes_per_pathway=1,
            genes_per_complex=1,
            control_wells_per_plate=1,
            sites_per_well=1,
            num_workers=1,
            progress=False,
        )
        return read_field(discover_fields(plate["images"])[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    model_path = args.model
    if model_path is None:
        model_path = random_tiny_model(Path(args.out) / "random-tiny-model")
        print(
            f"No --model given: wrote a RANDOMLY INITIALISED tiny model to {model_path} (no weights can be downloaded "
            "here); its embeddings have the right shapes but no meaning. Pass --model with a trained folder or Hub id."
        )

    # ---- the one line
    model = AutoModel.from_pretrained(model_path).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)

    image = read_bbbc022_site(Path(args.data_dir), args.site)
    source = f"BBBC022 {args.site}"
    if image is None:
        image, source = synthetic_field(model.config.image_size), "synthetic field"
    print(f"Image: {source}, {image.shape} {image.dtype}")  # (C, H, W), full bit depth

    inputs = processor(image, crop_mode="tile", return_tensors="pt")  # pixel_values (N, C, S, S), standardised
    with torch.no_grad():
        outputs = model(inputs["pixel_values"], output_channelwise_embeddings=True)
    embedding = outputs.pooler_output.mean(0)  # (D,): average of the N crop embeddings
    channelwise = outputs.channelwise_embeddings.mean(0)  # (C, D): one vector per channel
    print(f"Crops: {tuple(inputs['pixel_values'].shape)} (tiles of {processor.image_size} px)")
    print(f"Embedding shape: {tuple(embedding.shape)}")
    print(f"Channelwise embedding shape: {tuple(channelwise.shape)}")

    # The same in one call, with the cell-feature-extraction pipeline (it tiles and averages too).
    embed = pipeline("cell-feature-extraction", model=model, image_processor=processor)
    same = np.allclose(embed(image, crop_mode="tile"), embedding.numpy(), atol=1e-5)
    print(f"pipeline('cell-feature-extraction') gives the same embedding: {same}")

    if args.save:
        np.savez(args.save, embedding=embedding.numpy(), channelwise=channelwise.numpy())
        print(f"Saved {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
