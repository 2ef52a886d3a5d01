"""BBBC022 per cell: classical segmentation counts per site, and a figure of cell crops with their kept tokens.

    python scripts/single_cell_bbbc022.py ../shared/data/cellpainting_bbbc022/images docs/single_cell_bbbc022.png

Prints, per site, the nuclei of the segmentation alone and the cells the single-cell mode embeds (one per label
of the cell segmentation), then draws ``--num-cells`` crops of the first site (``--image-size`` px, patches of
``--patch-size`` px): the cell's contour in white, its kept patch tokens (``--cell-tokens mask``) in yellow.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm.auto import tqdm

from hf_cellmae.data.image_io import read_field
from hf_cellmae.data.layouts import discover_fields
from hf_cellmae.evaluation.cellprofiler import segment_field
from hf_cellmae.evaluation.single_cell import cells_of_labels, plot_cell_crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", help="BBBC022 image folder (plate1_A14_site1_Ch1.tif ...)")
    parser.add_argument("figure", help="PNG to write")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--num-cells", type=int, default=5)
    parser.add_argument("--mask-dilation", type=int, default=0)
    args = parser.parse_args()

    records = discover_fields(args.images)
    first = None
    print(f"{'site':<28} {'nuclei (segmentation)':>22} {'cells embedded':>15}")
    for record in tqdm(records, desc="segment", unit="field", leave=False):
        pixels = read_field(record)  # (5, H, W): Ch1 = Hoechst (DNA)
        nuclei, cells = segment_field(pixels, 0)
        found = cells_of_labels(cells)
        print(f"{record.field_id:<28} {int(nuclei.max()):>22} {len(found):>15}")
        if first is None:
            first = (record, pixels, cells, found)
    record, pixels, cells, found = first
    # cells near the middle of the size range, spread over the site
    areas = np.array([c["area"] for c in found])
    typical = [c for c in found if np.percentile(areas, 25) <= c["area"] <= np.percentile(areas, 75)]
    chosen = typical[:: max(1, len(typical) // args.num_cells)][: args.num_cells]
    plot_cell_crops(
        pixels,
        cells,
        chosen,
        args.image_size,
        args.patch_size,
        args.figure,
        channels=(1, 3, 0),
        dilation=args.mask_dilation,
        title=f"BBBC022 {record.field_id}: ER / AGP / DNA; white: cell mask, yellow: patch tokens kept",
    )
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
