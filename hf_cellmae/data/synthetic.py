"""A synthetic high-content screen with known biology: the built-in default dataset.

:func:`make_synthetic_screen` renders Cell-Painting-like fields of view (5 channels: ``DNA`` nuclei with
chromatin texture, ``ER`` perinuclear reticulum, ``RNA`` cytoplasm + nucleoli, ``AGP`` membranes and
actin fibres, ``Mito`` punctate mitochondria) on 384-well plates, and writes:

- the RxRx layout ``OUT/images/{experiment}/Plate{n}/{well}_s{site}_w{channel}.png`` (16-bit, or 8-bit;
  channel ``w1..w5`` = ``CHANNELS`` in order);
- ``OUT/metadata.csv``: one row per site with ``experiment, plate, well, site, perturbation, gene,
  complex, pathway, is_control, batch, num_cells`` (controls: ``perturbation="non-targeting"``,
  ``is_control=True``, empty ``gene``/``complex``/``pathway``);
- ``OUT/relationships/complexes.csv`` and ``OUT/relationships/pathways.csv``: the true gene pairs, header
  ``entity1,entity2`` (the EFAAR benchmark annotation format);
- ``OUT/synthetic_config.json``: every knob, so a dataset can be re-made bit for bit.

Pooled (``pooled=True``, ``cellmae synthetic --pooled``): ``pooled_wells_per_plate`` wells per plate each hold
the whole library; every cell draws its own perturbation (a control guide with probability
``pooled_control_fraction``, else one of the genes, uniformly), with the same genes, complexes, pathways and
relationship files as the arrayed screen. ``OUT/cells.csv`` is the barcode read-out: one row per cell drawn
with ``plate, well, site, cell_id, centroid_y, centroid_x, perturbation, gene, complex, pathway,
is_control`` (``metadata.csv`` then says ``perturbation="pooled"`` per site). Field-wide textures (the
mitochondrial puncta frequency) follow no perturbation in a pooled field; every per-cell parameter does.

The biology (see ``docs/synthetic_screen.md`` for the reasoning): 16 parameters per cell. As in real
Cell Painting, a perturbation's phenotype is mostly *morphology* (nucleus and cell size, elongation,
nuclear irregularity, density), *texture and granularity* (chromatin condensation, mitochondrial
fragmentation into puncta, actin fibres vs cortical membrane), *spatial organisation* (ER and
mitochondria gathered around the nucleus) and *relative stain levels within a channel* (nucleolar vs
cytoplasmic RNA); the absolute amount of each stain moves only weakly (``absolute_intensity_weight``),
while plate, well and field staining/illumination variation (``batch_effect``, ``well_effect``,
``field_effect``) dominate absolute intensity. Each pathway has a random direction in that space; each
complex (a group of genes) inside a pathway has its own direction mixed with its pathway's; each gene
applies its complex's phenotype at a gene-specific strength plus a small gene-specific deviation. So
genes of the same complex look alike, genes of the same pathway look somewhat alike, and the
relationship files list exactly those pairs. Controls have no phenotype.

Signal-to-noise knobs (:class:`SyntheticScreenConfig`), from easiest to hardest to learn:

- ``effect_size`` (0.6): size of a complex's phenotype, in log units of the morphology parameters.
- ``penetrance`` (0.8): fraction of a perturbed well's cells that show the phenotype.
- ``gene_specificity`` (0.35): a gene's own deviation from its complex, relative to ``effect_size``.
- ``absolute_intensity_weight`` (0.25): how much of a phenotype moves the absolute amount of a stain
  (``*_intensity`` parameters), relative to the other parameters.
- ``cell_variability`` (0.25): cell-to-cell log-scale variation of every parameter (biological noise).
- ``batch_effect`` (0.3): per plate and channel, gain spread (log sd), illumination gradient and
  background offset; plates are the batches, so TVN/control-based correction is needed.
- ``well_effect`` (0.2) and ``field_effect`` (0.1): per well and per field, per-channel gain spread
  (log sd): staining, seeding and focus differences that control wells cannot correct.
- ``noise`` (0.01): camera read noise (fraction of a typical signal) on top of shot noise.

Everything is deterministic from ``seed`` (each field has its own seed, so workers change nothing).
"""

from __future__ import annotations

import itertools
import json
import os
import string
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ensure_writable_folder

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
PARAMETERS = (
    "nucleus_radius",
    "cell_radius",
    "density",
    "elongation",
    "nuclear_irregularity",
    "chromatin_condensation",
    "dna_intensity",
    "er_intensity",
    "er_perinuclear",
    "rna_intensity",
    "nucleoli",
    "agp_intensity",
    "membrane_vs_fibres",
    "mito_intensity",
    "mito_puncta",
    "mito_perinuclear",
)
# The absolute amount of a stain: weakly moved by phenotypes (``absolute_intensity_weight``).
INTENSITY_PARAMETERS = ("dna_intensity", "er_intensity", "rna_intensity", "agp_intensity", "mito_intensity")
_BASE = {
    "nucleus_radius": 5.5,
    "cell_radius": 12.0,
    "density": 1.0,
    "elongation": 1.3,
    "nuclear_irregularity": 1.0,
    "chromatin_condensation": 1.0,
    "dna_intensity": 1.0,
    "er_intensity": 0.8,
    "er_perinuclear": 1.0,
    "rna_intensity": 0.6,
    "nucleoli": 1.0,
    "agp_intensity": 0.8,
    "membrane_vs_fibres": 1.0,
    "mito_intensity": 0.9,
    "mito_puncta": 1.0,
    "mito_perinuclear": 1.0,
}
CONTROL = "non-targeting"
_ROWS, _COLS = 16, 24  # 384-well plate
# Named sizes of the screen (`cellmae synthetic --size`): how many genes, complexes, pathways, plates and wells.
# Only the counts differ; every gene's phenotype is drawn by the same model (``design_screen``).
# "demo": the defaults, 24 genes in 6 complexes and 3 pathways, 2 plates (36 complex pairs).
# "screen": 240 genes in 30 complexes of 8 and 10 pathways of 3 complexes, on 4 plates, one well per gene per plate
# (840 complex pairs, 2,760 pathway pairs), so that recall is a share of hundreds of pairs.
SCREEN_SIZES = {
    "demo": {},
    "screen": {
        "num_plates": 4,
        "num_pathways": 10,
        "complexes_per_pathway": 3,
        "genes_per_complex": 8,
        "replicates_per_plate": 1,
        "control_wells_per_plate": 24,
    },
}


@dataclass
class SyntheticScreenConfig:
    """Knobs of the synthetic screen (defaults: the ~20 s, 2-plate demo dataset; `SCREEN_SIZES` for larger ones)."""

    num_plates: int = 2
    field_size: int = 128
    sites_per_well: int = 2
    num_pathways: int = 3
    complexes_per_pathway: int = 2
    genes_per_complex: int = 4
    replicates_per_plate: int = 2
    control_wells_per_plate: int = 12
    cells_per_field: float = 14.0  # mean for a 128 x 128 field; scales with the area
    bit_depth: int = 16
    effect_size: float = 0.6
    penetrance: float = 0.8
    gene_specificity: float = 0.35
    absolute_intensity_weight: float = 0.25
    cell_variability: float = 0.25
    batch_effect: float = 0.3
    well_effect: float = 0.2
    field_effect: float = 0.1
    noise: float = 0.01
    seed: int = 0
    experiment: str = "synthetic"
    pooled: bool = False  # each cell carries its own perturbation (a pooled screen); see make_synthetic_screen
    pooled_wells_per_plate: int = 8
    pooled_control_fraction: float = 0.15

    def __post_init__(self) -> None:
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth={self.bit_depth} is not supported; use 8 or 16")
        if self.field_size < 32:
            raise ValueError(f"field_size={self.field_size} is too small to hold cells; use 32 or more")
        if not 0 <= self.pooled_control_fraction < 1:
            raise ValueError(f"pooled_control_fraction={self.pooled_control_fraction} must be in [0, 1)")
        wells = (
            self.pooled_wells_per_plate
            if self.pooled
            else self.num_genes * self.replicates_per_plate + self.control_wells_per_plate
        )
        if wells > _ROWS * _COLS:
            raise ValueError(
                f"{wells} wells per plate do not fit a 384-well plate; lower replicates_per_plate or the number of genes"
            )

    @property
    def num_genes(self) -> int:
        return self.num_pathways * self.complexes_per_pathway * self.genes_per_complex


def complex_label(index: int) -> str:
    """``CPLXA`` .. ``CPLXZ``, then ``CPLXAA``, ``CPLXAB``, ... (spreadsheet-column letters of ``index``)."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = string.ascii_uppercase[remainder] + letters
    return f"CPLX{letters}"


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def design_screen(config: SyntheticScreenConfig) -> dict:
    """Genes, their complexes/pathways and phenotype vectors (log-multipliers of ``PARAMETERS``)."""
    rng = np.random.default_rng([config.seed, 1])
    dims = len(PARAMETERS)
    scale = config.effect_size * np.sqrt(3.0)  # as if ~3 parameters each moved by effect_size
    # Phenotypes live mostly in morphology, texture and organisation: the stain amounts get a small weight.
    weight = np.array(
        [config.absolute_intensity_weight if name in INTENSITY_PARAMETERS else 1.0 for name in PARAMETERS]
    )

    def direction() -> np.ndarray:
        return _unit(weight * rng.standard_normal(dims))

    genes = []
    for p in range(config.num_pathways):
        pathway_direction = direction()
        pathway = f"PATH{p + 1}"
        for c in range(config.complexes_per_pathway):
            complex_name = complex_label(p * config.complexes_per_pathway + c)
            complex_direction = _unit(0.6 * pathway_direction + 0.8 * direction())
            for g in range(config.genes_per_complex):
                strength = rng.uniform(0.7, 1.3)
                own = config.gene_specificity * direction()
                genes.append(
                    {
                        "gene": f"{complex_name}{g + 1}",
                        "complex": complex_name,
                        "pathway": pathway,
                        "phenotype": scale * (strength * complex_direction + own),
                    }
                )
    return {"genes": genes}


def _plate_layout(config: SyntheticScreenConfig, genes: list[dict], plate: int) -> list[tuple[str, dict | None]]:
    """[(well, gene or None for control)] at random positions of the plate."""
    rng = np.random.default_rng([config.seed, 2, plate])
    wells = [f"{string.ascii_uppercase[r]}{c + 1:02d}" for r in range(_ROWS) for c in range(_COLS)]
    if config.pooled:  # every well holds the whole library
        chosen = rng.choice(len(wells), size=config.pooled_wells_per_plate, replace=False)
        return sorted([(wells[i], None) for i in chosen], key=lambda item: item[0])
    contents: list[dict | None] = [g for g in genes for _ in range(config.replicates_per_plate)]
    contents += [None] * config.control_wells_per_plate
    chosen = rng.choice(len(wells), size=len(contents), replace=False)
    layout = [(wells[i], content) for i, content in zip(chosen, contents)]
    return sorted(layout, key=lambda item: item[0])


def _plate_effects(config: SyntheticScreenConfig, plate: int) -> dict:
    """Per plate and channel: gain, background and an illumination field (the batch effect)."""
    rng = np.random.default_rng([config.seed, 3, plate])
    size = config.field_size
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5  # (S, S) each, in [-0.5, 0.5]
    illumination = []
    for _ in CHANNELS:
        a, b = rng.standard_normal(2)
        vignette = 1.0 - config.batch_effect * abs(rng.normal(1.0, 0.3)) * (x**2 + y**2)
        illumination.append(np.clip(vignette + config.batch_effect * 0.5 * (a * x + b * y), 0.2, None))
    return {
        "gain": np.exp(config.batch_effect * rng.standard_normal(len(CHANNELS))),
        "background": 0.03 + 0.05 * config.batch_effect * np.abs(rng.standard_normal(len(CHANNELS))),
        "illumination": np.stack(illumination).astype(np.float32),  # (C, S, S)
    }


def _bandpass_noise(rng: np.random.Generator, size: int, frequency: float, width: float) -> np.ndarray:
    """Unit-variance noise concentrated around a spatial frequency (cycles per pixel)."""
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    filtered = np.fft.irfft2(np.fft.rfft2(white) * np.exp(-(((radius - frequency) / width) ** 2)), s=(size, size))
    return (filtered / (filtered.std() + 1e-12)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def well_gain(config: SyntheticScreenConfig, plate: int, well: str) -> np.ndarray:
    """Per-channel staining gain of one well (log sd ``well_effect``): technical, not biological."""
    rng = np.random.default_rng([config.seed, 5, plate, int(well[1:]) + 100 * (ord(well[0]) - 64)])
    return np.exp(config.well_effect * rng.standard_normal(len(CHANNELS)))


def render_field(
    config: SyntheticScreenConfig,
    phenotype: np.ndarray | None,
    effects: dict,
    field_seed: list[int],
    gain: np.ndarray | None = None,
    library: list[dict] | None = None,
    cells: list[dict] | None = None,
) -> tuple[np.ndarray, int]:
    """Render one field of view: ``(C, S, S)`` at the configured bit depth, and its number of cells.

    ``gain`` (C,) is the well's staining gain (:func:`well_gain`); each field adds its own (``field_effect``).
    Pooled (``library``, the genes): each cell is a control with probability ``pooled_control_fraction``, else
    carries a gene drawn uniformly from the library, and its phenotype is that gene's; ``cells`` receives one
    record per cell drawn (``cell_id`` in drawing order, from 1; ``centroid_y``, ``centroid_x``; ``gene``, or None
    for a control), the barcode read-out. Field-wide textures (puncta frequency) then follow no perturbation.
    """
    rng = np.random.default_rng(field_seed)
    size = config.field_size
    dims = len(PARAMETERS)
    base = np.array([_BASE[name] for name in PARAMETERS])
    shift = np.zeros(dims) if phenotype is None else phenotype
    mean_params = dict(zip(PARAMETERS, base * np.exp(shift * (config.penetrance if phenotype is not None else 0.0))))
    num_cells = int(rng.poisson(config.cells_per_field * (size / 128) ** 2 * mean_params["density"]))
    # per-cell stain maps: DNA nucleus, plain nucleus, membrane, perinuclear ER, nucleoli, fibres,
    # cytoplasmic ER, cytoplasmic RNA, cytoplasmic mitochondria, condensed chromatin
    maps = np.zeros((10, size, size), dtype=np.float32)
    for cell_index in range(num_cells):
        if library is not None:  # pooled: this cell's own perturbation
            is_control, pick = rng.random() < config.pooled_control_fraction, int(rng.integers(len(library)))
            gene = None if is_control else library[pick]
            phenotype = None if gene is None else np.asarray(gene["phenotype"])
            shift = np.zeros(dims) if phenotype is None else phenotype
        affected = phenotype is not None and rng.random() < config.penetrance
        log_params = np.log(base) + (shift if affected else 0.0) + config.cell_variability * rng.standard_normal(dims)
        p = dict(zip(PARAMETERS, np.exp(log_params)))
        cell_radius = max(p["cell_radius"], p["nucleus_radius"] * 1.3)
        elongation = max(p["elongation"], 1.0)
        half = int(np.ceil(cell_radius * np.sqrt(elongation) * 1.3)) + 2
        cy, cx = rng.uniform(0, size, 2)
        if cells is not None:
            cells.append(
                {
                    "cell_id": cell_index + 1,
                    "centroid_y": float(cy),
                    "centroid_x": float(cx),
                    "gene": None if library is None or gene is None else gene,
                }
            )
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, size)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]  # (h, 1)
        dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]  # (1, w)
        angle = rng.uniform(0, np.pi)
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / np.sqrt(elongation)
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) * np.sqrt(elongation)
        radius = np.sqrt(u**2 + v**2)
        theta = np.arctan2(v, u)
        wobble = 1.0 + 0.12 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
        # irregular (lobed, blebbed) nuclei: a 5-fold boundary ripple whose depth is the parameter
        nuclear_wobble = 1.0 + 0.1 * p["nuclear_irregularity"] * np.sin(5 * theta + rng.uniform(0, 2 * np.pi))
        nucleus = _sigmoid((1.0 - radius * nuclear_wobble / p["nucleus_radius"]) * 6.0)
        body = _sigmoid((1.0 - radius * wobble / cell_radius) * 5.0)
        cytoplasm = np.clip(body - nucleus, 0.0, None)
        membrane = np.exp(-(((radius * wobble - cell_radius) / 1.3) ** 2))
        beyond_nucleus = np.clip(radius - p["nucleus_radius"], 0, None)
        perinuclear = cytoplasm * np.exp(-beyond_nucleus / (cell_radius * 0.3 * p["er_perinuclear"]))
        # mitochondria spread through the cytoplasm or gathered around the nucleus (higher = closer)
        mito_spread = cytoplasm * np.exp(-beyond_nucleus / (cell_radius * 0.6 / p["mito_perinuclear"]))
        nucleoli = np.zeros_like(nucleus)
        for _ in range(rng.poisson(2.0 * p["nucleoli"])):
            ny, nx = rng.normal(0, p["nucleus_radius"] * 0.35, 2)
            nucleoli += np.exp(-((u - nx) ** 2 + (v - ny) ** 2) / 2.0)
        window = (slice(None), slice(y0, y1), slice(x0, x1))
        maps[window] += np.stack(
            [
                p["dna_intensity"] * nucleus,
                nucleus,
                p["agp_intensity"] * p["membrane_vs_fibres"] * membrane,
                p["er_intensity"] * perinuclear,
                p["rna_intensity"] * nucleoli * nucleus,
                p["agp_intensity"] * cytoplasm / p["membrane_vs_fibres"],
                p["er_intensity"] * cytoplasm,
                p["rna_intensity"] * cytoplasm,
                p["mito_intensity"] * mito_spread,
                p["dna_intensity"] * p["chromatin_condensation"] * nucleus,
            ]
        ).astype(np.float32)
    dna, nucleus, membrane, perinuclear, nucleoli, fibres, er_cytoplasm, rna_cytoplasm, mito_cytoplasm, condensed = (
        maps
    )
    chromatin = _bandpass_noise(rng, size, 0.15, 0.08)  # condensed chromatin: texture whose depth is per cell
    reticulum = np.clip(1.0 + 0.6 * _bandpass_noise(rng, size, 0.12, 0.06), 0.0, None)
    puncta_frequency = float(np.clip(0.22 * mean_params["mito_puncta"], 0.05, 0.45))
    puncta = np.clip(_bandpass_noise(rng, size, puncta_frequency, 0.05), 0.0, None) ** 1.5
    fibre_texture = np.clip(1.0 + 0.8 * _bandpass_noise(rng, size, 0.1, 0.04), 0.0, None)
    signal = np.stack(
        [
            dna + 0.3 * condensed * chromatin,
            (0.25 * er_cytoplasm + perinuclear) * reticulum,
            0.35 * rna_cytoplasm + 0.15 * nucleus + 0.8 * nucleoli,
            membrane + 0.4 * fibres * fibre_texture,
            mito_cytoplasm * puncta,
        ]
    )  # (C, S, S)
    field_gain = np.exp(config.field_effect * rng.standard_normal(len(CHANNELS)))
    gain = effects["gain"] * field_gain * (1.0 if gain is None else gain)  # (C,) plate x well x field
    image = signal * gain[:, None, None] * effects["illumination"] + effects["background"][:, None, None]
    full_scale = 12000.0 if config.bit_depth == 16 else 110.0
    counts = image * full_scale
    # shot noise (~2000 photons at a typical signal) and camera read noise, as one Gaussian draw
    per_photon = full_scale / 2000.0
    sigma = np.sqrt(np.clip(counts, 0, None) * per_photon + (config.noise * full_scale) ** 2)
    counts = counts + sigma * rng.standard_normal(counts.shape, dtype=np.float32)
    dtype = np.uint16 if config.bit_depth == 16 else np.uint8
    return np.clip(np.rint(counts), 0, np.iinfo(dtype).max).astype(dtype), num_cells


def _render_plate_wells(task: dict) -> list[dict]:
    """Render and write the fields of some wells (runs in a worker)."""
    import imagecodecs

    config = SyntheticScreenConfig(**task["config"])
    effects = _plate_effects(config, task["plate"])
    rows = []
    plate = f"Plate{task['plate'] + 1}"
    library = task["genes"] if config.pooled else None
    for well, gene in task["wells"]:
        phenotype = None if gene is None else np.asarray(gene["phenotype"])
        for site in range(1, config.sites_per_well + 1):
            field_seed = [config.seed, 4, task["plate"], int(well[1:]) + 100 * (ord(well[0]) - 64), site]
            cells = [] if config.pooled else None
            pixels, num_cells = render_field(
                config,
                phenotype,
                effects,
                field_seed,
                gain=well_gain(config, task["plate"], well),
                library=library,
                cells=cells,
            )
            for index, plane in enumerate(pixels, start=1):
                path = Path(task["plate_dir"]) / f"{well}_s{site}_w{index}.png"
                path.write_bytes(imagecodecs.png_encode(plane, level=1))
            if config.pooled:
                rows.append(
                    {
                        "experiment": config.experiment,
                        "plate": plate,
                        "well": well,
                        "site": site,
                        "perturbation": "pooled",
                        "is_control": False,
                        "batch": f"batch{task['plate'] + 1}",
                        "num_cells": num_cells,
                        "cells": [_cell_row(config, plate, well, site, c) for c in cells],
                    }
                )
                continue
            rows.append(
                {
                    "experiment": config.experiment,
                    "plate": plate,
                    "well": well,
                    "site": site,
                    "perturbation": CONTROL if gene is None else gene["gene"],
                    "gene": "" if gene is None else gene["gene"],
                    "complex": "" if gene is None else gene["complex"],
                    "pathway": "" if gene is None else gene["pathway"],
                    "is_control": gene is None,
                    "batch": f"batch{task['plate'] + 1}",
                    "num_cells": num_cells,
                }
            )
    return rows


def _cell_row(config: SyntheticScreenConfig, plate: str, well: str, site: int, cell: dict) -> dict:
    """One row of a pooled screen's barcode read-out (``cells.csv``)."""
    gene = cell["gene"]
    return {
        "experiment": config.experiment,
        "plate": plate,
        "well": well,
        "site": site,
        "cell_id": cell["cell_id"],
        "centroid_y": round(cell["centroid_y"], 2),
        "centroid_x": round(cell["centroid_x"], 2),
        "perturbation": CONTROL if gene is None else gene["gene"],
        "gene": "" if gene is None else gene["gene"],
        "complex": "" if gene is None else gene["complex"],
        "pathway": "" if gene is None else gene["pathway"],
        "is_control": gene is None,
    }


def make_synthetic_screen(
    output_dir: str | Path,
    config: SyntheticScreenConfig | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Render a synthetic screen into ``output_dir`` (layout described in the module docstring).

    Args:
        output_dir: created if needed; existing images of the same names are overwritten.
        config: the knobs; ``overrides`` (e.g. ``num_plates=1, bit_depth=8``) replace single fields.
        num_workers: processes rendering wells (default: all cores; 1 = this process).
        progress: show a tqdm bar (wells).

    Returns:
        ``{"output_dir", "images" (the folder to shard), "num_fields", "channels", "metadata", "relationships": {name: path}, "config"}``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    config = config or SyntheticScreenConfig()
    if overrides:
        config = SyntheticScreenConfig(**{**asdict(config), **overrides})
    output_dir = ensure_writable_folder(output_dir, "the synthetic screen")  # before any field is rendered
    design = design_screen(config)
    genes = [{**g, "phenotype": g["phenotype"].tolist()} for g in design["genes"]]
    tasks = []
    for plate in range(config.num_plates):
        plate_dir = output_dir / "images" / config.experiment / f"Plate{plate + 1}"
        plate_dir.mkdir(parents=True, exist_ok=True)
        layout = _plate_layout(config, genes, plate)
        for start in range(0, len(layout), 8):
            tasks.append(
                {
                    "config": asdict(config),
                    "plate": plate,
                    "plate_dir": str(plate_dir),
                    "wells": layout[start : start + 8],
                    "genes": genes,
                }
            )
    rows: list[dict] = []
    bar = tqdm(total=sum(len(t["wells"]) for t in tasks), unit="well", desc="rendering", disable=not progress)
    workers = min(num_workers or os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        for task in tasks:
            rows += _render_plate_wells(task)
            bar.update(len(task["wells"]))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for task, result in zip(tasks, pool.map(_render_plate_wells, tasks)):
                rows += result
                bar.update(len(task["wells"]))
    bar.close()
    cell_rows = [cell for row in rows for cell in row.pop("cells", [])]
    metadata = pd.DataFrame(rows).sort_values(["plate", "well", "site"]).reset_index(drop=True)
    metadata.to_csv(output_dir / "metadata.csv", index=False)
    extra = {}
    if config.pooled:
        cells = pd.DataFrame(cell_rows).sort_values(["plate", "well", "site", "cell_id"]).reset_index(drop=True)
        cells.to_csv(output_dir / "cells.csv", index=False)
        extra = {"cells": str(output_dir / "cells.csv"), "num_cells": len(cells)}
    relationships = write_relationships(output_dir / "relationships", design["genes"])
    (output_dir / "synthetic_config.json").write_text(
        json.dumps({"config": asdict(config), "channels": list(CHANNELS), "genes": genes}, indent=1)
    )
    return {
        "output_dir": str(output_dir),
        "images": str(output_dir / "images"),
        "num_fields": len(metadata),
        "channels": list(CHANNELS),
        "metadata": str(output_dir / "metadata.csv"),
        "relationships": relationships,
        "config": asdict(config),
        **extra,
    }


def true_relationships(genes: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """``{"complexes": pairs in one complex, "pathways": pairs in one pathway}``, each pair sorted."""
    pairs = {}
    for level in ("complex", "pathway"):
        found = []
        for first, second in itertools.combinations(genes, 2):
            if first[level] == second[level]:
                found.append(tuple(sorted((first["gene"], second["gene"]))))
        pairs[level.replace("complex", "complexes").replace("pathway", "pathways")] = sorted(found)
    return pairs


def write_relationships(folder: Path, genes: list[dict]) -> dict[str, str]:
    """Write the true pairs as ``{folder}/{complexes,pathways}.csv`` with header ``entity1,entity2``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in true_relationships(genes).items():
        path = folder / f"{name}.csv"
        path.write_text("entity1,entity2\n" + "".join(f"{a},{b}\n" for a, b in pairs))
        paths[name] = str(path)
    return paths
