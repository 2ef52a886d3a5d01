"""The options of ``cellmae embed``, ``cellmae evaluate`` and ``cellmae profiles``: one dataclass per command, the one
place their defaults live.

The commands' parsers are built from these fields (``hf_cellmae.options.add_dataclass_options``), and the library
functions the commands call take the dataclass whole (``embed_dataset``, ``evaluate_embeddings``, ``write_profiles``)
or their defaults from it (``ModelFeaturizer``, ``CellProfilerFeaturizer``). ``embed_options`` and
``evaluate_options`` turn the keywords those functions have always taken into the options. The alignment and
``--cells`` fields are shared: ``AlignOptions`` and ``CellLabelOptions``. numpy only, so ``cellmae --help`` stays fast.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from ..options import replace_options
from .align import tvn
from .relate import BENCHMARK_SOURCES, MIN_PERTURBATIONS, RECALL_THRESHOLDS

CELLPROFILER = "cellprofiler featuriser (MODEL = cellprofiler)"  # embed's argument group of the CellProfiler options
SINGLE_CELL = "single-cell embeddings (--single-cell; segmentation options: the cellprofiler group's)"
CELLS = "from cells (single-cell embeddings)"
SUITE = "the rest of the paper's suite (model and every baseline side by side)"  # evaluate's argument group
_TVN_CORAL_EPS = inspect.signature(tvn).parameters["coral_eps"].default  # the help states tvn's own default


@dataclass
class EmbedOptions:
    """``cellmae embed MODEL DATA OUT`` options (see each field's help)."""

    layout: str = field(
        default="auto", metadata={"help": "image folder layout: auto, rxrx, pattern, load_data, stack"}
    )
    pattern: str | None = field(default=None, metadata={"help": "file-name regex or preset for --layout pattern"})
    metadata: str | None = field(
        default=None, metadata={"help": "metadata table (CSV/Parquet) joined on plate/well/site"}
    )
    channels: str | None = field(
        default=None,
        metadata={
            "help": "image folders: the stain of each file channel, as FILE_TOKEN=NAME (e.g. w1=DNA,w2=ER,w3=RNA), as "
            "`cellmae shard --channels` (default: the names a per-file --metadata table gives, else the tokens; a shard "
            "folder's were named when sharding)"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "torch device, e.g. cpu, cuda, cuda:1 (default: auto, this process's GPU under `accelerate launch`, "
            "else a GPU if there is one, else the CPU)"
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "autocast dtype (default: auto, bfloat16 on CUDA, float32 elsewhere)",
            "choices": ("auto", "float32", "bfloat16", "float16"),
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "run the encoder through torch.compile (worth it on a GPU for a large screen)",
            "action": "store_true",
        },
    )
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes reading (and cropping) the next fields while the model runs, per "
            "process (default: on a GPU the cores per process minus one, at most 8; on a CPU 0, reading in the main process, "
            "since the model's threads use every core)"
        },
    )
    part: str | None = field(
        default=None,
        metadata={
            "help": "embed only share I of N of the parts (1-based, e.g. 2/3), for machines that share the OUT folder but "
            "no process group (SLURM arrays, cloud VMs); the last share to finish writes _embedding_info.json "
            "(default: all parts; under `accelerate launch` each process takes its share by itself)",
            "metavar": "I/N",
        },
    )
    storage_options: str | None = field(
        default=None,
        metadata={
            "help": "fsspec options (JSON) when DATA is a shard folder in object storage (s3://, gs://, az://, hf://), e.g. "
            "'{\"anon\": true}' (default: none)",
            "metavar": "JSON",
        },
    )
    min_field_size: int | None = field(
        default=None,
        metadata={
            "help": "image folders: smallest field height/width accepted, as `cellmae shard --min-field-size` "
            "(default: shard's)"
        },
    )
    batch_size: int = field(default=64, metadata={"help": "crops per forward pass"})
    fields_per_batch: int = field(default=16, metadata={"help": "fields read and embedded together"})
    fields_per_part: int = field(default=512, metadata={"help": "fields per output part for image folders"})
    crop_mode: str = field(
        default="tile",
        metadata={
            "help": "tile: average the model-sized crops of each field (default)",
            "choices": ("tile", "center", "none"),
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "crop size (default: the model's image_size)"})
    channelwise: bool = field(
        default=False,
        metadata={
            "help": "one vector per channel, concatenated (= --readout channelwise, the default)",
            "action": "store_true",
        },
    )
    readout: str | None = field(
        default=None,
        metadata={
            "help": "how a crop's tokens become one vector (default: channelwise, the mean token of each stain concatenated, "
            "C x D: the read-out the demo and docs/evidence.md evaluate, ahead of the pooled mean there; mean: OpenPhenom's "
            "pooled mean of every patch token, D; a MU-Net has only mean)",
            "choices": ("mean", "cls", "mean_std", "channelwise"),
        },
    )
    layer: int | None = field(
        default=None,
        metadata={
            "help": "read the tokens after this encoder block (1-based, negative from the end; default: the output)"
        },
    )
    by_position: bool = field(
        default=False,
        metadata={
            "help": "feed plate channel i as model channel i when the plate's channels are unnamed (w1...) and the model's "
            "are stains (default: refuse; name the channels with cellmae shard --channels instead)",
            "action": "store_true",
        },
    )
    nuclei_channel: str | None = field(
        default=None,
        metadata={"help": "name of the DNA/Hoechst channel (default: found by name)", "group": CELLPROFILER},
    )
    cell_channels: str | None = field(
        default=None,
        metadata={"help": "comma-separated stains filling the cell body (default: all others)", "group": CELLPROFILER},
    )
    feature_set: str = field(
        default="fast",
        metadata={
            "help": "fast (default): no Zernike, Feret, Costes/RWC/Manders; full: every cp-measure feature; "
            "intensity_shape: only the Intensity and AreaShape categories (a third of fast's cost)",
            "choices": ("fast", "full", "intensity_shape"),
            "group": CELLPROFILER,
        },
    )
    nucleus_diameter: int | None = field(
        default=None,
        metadata={"help": "typical nucleus diameter in pixels (default: field width / 12)", "group": CELLPROFILER},
    )
    measure_workers: int = field(
        default=1, metadata={"help": "processes measuring fields (0: all cores)", "group": CELLPROFILER}
    )
    single_cell: bool = field(
        default=False,
        metadata={
            "help": "one row per cell instead of per field: a crop of the model's size centred on each cell (classical "
            "segmentation, or --masks), embedding only the patch tokens over the cell (--cell-tokens)",
            "action": "store_true",
            "group": SINGLE_CELL,
        },
    )
    masks: str | None = field(
        default=None,
        metadata={
            "help": "folder of label images, one per field (0 = background; cellpose, StarDist, CellProfiler), matched by "
            "the plate, well and site in the file's path, e.g. Plate1/B02_s1_cp_masks.png (default: segment classically)",
            "metavar": "DIR",
            "group": SINGLE_CELL,
        },
    )
    cell_tokens: str = field(
        default="mask",
        metadata={
            "help": "mask (default): only the patches overlapping the cell's mask go into the encoder; all: the whole crop",
            "choices": ("mask", "all"),
            "group": SINGLE_CELL,
        },
    )
    mask_dilation: int = field(
        default=0,
        metadata={
            "help": "dilate each cell's mask by this many pixels before choosing its patches (default: 0)",
            "metavar": "PX",
            "group": SINGLE_CELL,
        },
    )
    cell_border: str = field(
        default="reflect",
        metadata={
            "help": "how a crop is padded where it passes the field's edge (default: reflect)",
            "choices": ("reflect", "zero"),
            "group": SINGLE_CELL,
        },
    )
    cell_objects: str = field(
        default="cells",
        metadata={
            "help": "segmentation objects to embed: cells (grown from the nuclei, default) or nuclei",
            "choices": ("cells", "nuclei"),
            "group": SINGLE_CELL,
        },
    )
    on_error: str = field(
        default="fail",
        metadata={
            "help": "a field that cannot be read (bad image, shard field failing its checksum): stop with one line naming it "
            "(fail, default) or skip it, count it and list it in _embedding_info.json",
            "choices": ("fail", "skip"),
        },
    )
    no_progress: bool = field(default=False, metadata={"action": "store_true"})


def embed_options(options: EmbedOptions | None = None, **settings) -> EmbedOptions:
    """``options`` (default: ``cellmae embed``'s defaults) with ``settings`` replacing fields: a field's name, or
    ``progress`` (the keyword ``embed_dataset`` has always taken)."""
    spellings = {"progress": lambda value: {"no_progress": not value}}
    return replace_options(options if options is not None else EmbedOptions(), settings, spellings)


@dataclass
class AlignOptions:
    """The batch correction of ``cellmae evaluate`` and ``cellmae profiles``: which rows are controls, and how the
    correction fitted on them is done (per ``batch_col`` value when given)."""

    perturbation_col: str = field(
        default="Metadata_perturbation",
        metadata={
            "help": "column naming what was done to each row (gene, compound...); rows with the same value are averaged "
            "into one profile and related pairs are looked up by these names"
        },
    )
    controls: list[str] | None = field(
        default=None,
        metadata={
            "help": "control labels of the perturbation column, e.g. non-targeting DMSO (default: use --control-col)"
        },
    )
    control_col: str | None = field(
        default=None,
        metadata={
            "help": "boolean control column (default: Metadata_is_control if present; needed unless --controls is given "
            "or --alignment none)"
        },
    )
    batch_col: str | None = field(
        default=None,
        metadata={"help": "batch column for per-batch alignment, e.g. Metadata_plate (default: one batch)"},
    )
    alignment: str = field(
        default="tvn",
        metadata={
            "help": "batch correction fitted on the controls; none uses no controls",
            "choices": ("tvn", "pca_center_scale", "center_scale", "none"),
        },
    )
    coral: bool = field(default=False, metadata={"help": "TVN: add the per-batch CORAL step", "action": "store_true"})
    coral_eps: float | None = field(
        default=None,
        metadata={"help": f"TVN + CORAL: ridge added to each batch covariance (default: {_TVN_CORAL_EPS})"},
    )
    no_scale_per_batch: bool = field(
        default=False,
        metadata={"help": "TVN: center-scale on all controls at once instead of per batch", "action": "store_true"},
    )
    n_components: int | None = field(
        default=None,
        metadata={
            "help": "tvn / pca_center_scale: principal components of the controls kept (tvn: at most; default: all)"
        },
    )

    def align_keywords(self) -> dict:
        """The keyword options of ``align.align`` these fields set (only those given, so every method accepts them)."""
        keywords: dict[str, bool | int | float] = {}
        if self.coral:
            keywords["coral"] = True
        if self.n_components is not None:
            keywords["n_components"] = self.n_components
        if self.coral_eps is not None:
            keywords["coral_eps"] = self.coral_eps
        if self.no_scale_per_batch:
            keywords["scale_per_batch"] = False
        return keywords


@dataclass
class CellLabelOptions:
    """``--cells``: a single-cell table labelled from a per-cell read-out, then aggregated per (well, perturbation)."""

    cells: str | None = field(
        default=None,
        metadata={
            "help": "single-cell embeddings (embed --single-cell): the per-cell read-out (CSV/Parquet: plate, well, site, "
            "cell_id or centroid_y/centroid_x, perturbation...; e.g. a pooled screen's barcodes) that labels each cell; "
            "the cells of each perturbation in each well are aggregated (--aggregation) into one row first "
            "(default: EMBEDDINGS rows are already labelled)",
            "metavar": "TABLE",
            "group": CELLS,
        },
    )
    cell_match: str = field(
        default="centroid",
        metadata={
            "help": "join the read-out by the nearest centroid in the field (default) or by cell_id (same label images)",
            "choices": ("centroid", "id"),
            "group": CELLS,
        },
    )
    max_cell_distance: float = field(
        default=8.0,
        metadata={
            "help": "--cell-match centroid: farthest read-out centroid (pixels) accepted for a cell",
            "metavar": "PX",
            "group": CELLS,
        },
    )
    min_cells: int = field(
        default=5,
        metadata={
            "help": "fewest labelled cells for a (well, perturbation) group to be kept (smaller groups are counted and "
            "left out)",
            "group": CELLS,
        },
    )


@dataclass
class EvaluateOptions(AlignOptions, CellLabelOptions):
    """``cellmae evaluate EMBEDDINGS`` options (see each field's help); ``--baseline NAME TABLE`` is written by hand."""

    out: str | None = field(default=None, metadata={"help": "output folder (default: the EMBEDDINGS path + '_eval')"})
    sources: list[str] = field(
        default_factory=lambda: list(BENCHMARK_SOURCES),
        metadata={
            "help": "relationship sources: names in the benchmark annotations (`cellmae annotations` fetches "
            "efaar-benchmarking 1.0's CORUM, HuMAP, Reactome, SIGNOR, StringDB) or CSV files with columns entity1,entity2"
        },
    )
    synthetic_plate: str | None = field(
        default=None,
        metadata={"help": "use this synthetic plate's relationships/*.csv as sources (default: --sources)"},
    )
    annotations: str | None = field(
        default=None,
        metadata={
            "help": "folder of named sources (default: efaar-benchmarking's, installed or fetched by `cellmae annotations`)"
        },
    )
    aggregation: str = field(
        default="mean",
        metadata={"help": "how the rows of a perturbation become its profile", "choices": ("mean", "median")},
    )
    thresholds: list[str] = field(
        default_factory=lambda: [f"{lo},{hi}" for lo, hi in RECALL_THRESHOLDS],
        metadata={
            "help": "recall counts a related pair whose similarity is below the LO or above the HI quantile of all pairs",
            "metavar": "LO,HI",
        },
    )
    min_perturbations: int = field(
        default=MIN_PERTURBATIONS, metadata={"help": "fewest perturbation profiles accepted for a meaningful null"}
    )
    null_samples: int | None = field(
        default=None, metadata={"help": "sample a null of this many pairs, for large maps (default: every pair)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampled null and the suite"})
    skip_unusable: bool = field(
        default=False, metadata={"help": "skip (and report) sources without usable pairs", "action": "store_true"}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "dataset name for the report (default: the EMBEDDINGS file name)"}
    )
    model_label: str = field(
        default="model",
        metadata={
            "help": "what the plots call the featuriser of EMBEDDINGS, e.g. pretrained (eval_results.json keeps the key model)"
        },
    )
    probe: list[str] = field(
        default_factory=list,
        metadata={
            "help": "linear probe + kNN of these metadata columns, leave one plate out, e.g. complex gene (default: none)",
            "metavar": "COLUMN",
            "group": SUITE,
        },
    )
    consistency_col: str | None = field(
        default=None,
        metadata={
            "help": "per-perturbation group column for consistency mAP, e.g. Metadata_complex (default: none)",
            "group": SUITE,
        },
    )
    cellprofiler: str | None = field(
        default=None,
        metadata={
            "help": "CellProfiler features of the same fields (cellmae embed cellprofiler ...): report ridge R² of predicting "
            "them (default: a --baseline named cellprofiler)",
            "metavar": "TABLE",
            "group": SUITE,
        },
    )
    no_suite: bool = field(
        default=False, metadata={"help": "only the known-relationship recall", "action": "store_true", "group": SUITE}
    )
    no_plots: bool = field(default=False, metadata={"help": "write eval_results.json only", "action": "store_true"})
    no_progress: bool = field(default=False, metadata={"help": "no progress bars", "action": "store_true"})

    def recall_thresholds(self) -> list[tuple[float, float]]:
        """``thresholds`` as ``[(0.05, 0.95), ...]``; a malformed pair is a one-line error."""
        pairs = []
        for value in self.thresholds:
            try:
                lo, hi = (float(part) for part in (value.split(",") if isinstance(value, str) else value))
            except ValueError:
                raise ValueError(
                    f"--thresholds {value!r} is not a pair LO,HI of quantiles; write e.g. 0.05,0.95"
                ) from None
            pairs.append((lo, hi))
        return pairs


# ``evaluate_embeddings(table, **settings)``: the Python spelling of a setting -> how it sets EvaluateOptions.
_EVALUATE_SETTINGS = {
    "out_dir": lambda value: {"out": None if value is None else str(value)},
    "on_unusable": lambda value: {"skip_unusable": value == "skip"},
    "plots": lambda value: {"no_plots": not value},
    "progress": lambda value: {"no_progress": not value},
    "suite": lambda value: {"no_suite": not value},
    "probe_labels": lambda value: {"probe": list(value)},
    "thresholds": lambda value: {
        "thresholds": [value if isinstance(value, str) else f"{value[0]},{value[1]}" for value in value]
    },
    "align_options": lambda value: _align_settings(value or {}),
}


def _align_settings(keywords) -> dict:
    """``align.align``'s keywords (``{"coral": True, "n_components": 8, "scale_per_batch": False}``) as
    AlignOptions fields."""
    fields = {
        "coral": bool(keywords.get("coral", False)),
        "coral_eps": keywords.get("coral_eps"),
        "n_components": keywords.get("n_components"),
        "no_scale_per_batch": not keywords.get("scale_per_batch", True),
    }
    unknown = set(keywords) - {"coral", "coral_eps", "n_components", "scale_per_batch"}
    if unknown:
        raise TypeError(
            f"align_options {sorted(unknown)} are not alignment options; known: coral, coral_eps, "
            "n_components, scale_per_batch"
        )
    return fields


def evaluate_options(options: EvaluateOptions | None = None, **settings) -> EvaluateOptions:
    """``options`` (default: ``cellmae evaluate``'s defaults) with ``settings`` in Python's spelling replacing fields.

    A setting is a field of EvaluateOptions (``batch_col="Metadata_plate"``) or one of the keywords
    ``evaluate_embeddings`` has always taken: ``out_dir``, ``on_unusable`` ("raise" or "skip"), ``plots``, ``progress``,
    ``suite``, ``probe_labels``, ``thresholds`` (pairs) and ``align_options`` (``align.align``'s keywords).
    """
    return replace_options(options if options is not None else EvaluateOptions(), settings, _EVALUATE_SETTINGS)


@dataclass
class ProfilesOptions(AlignOptions, CellLabelOptions):
    """``cellmae profiles EMBEDDINGS OUT`` options: the alignment and ``--cells`` options are ``cellmae evaluate``'s."""

    well_cols: list[str] = field(
        default_factory=lambda: ["Metadata_plate", "Metadata_well"],
        metadata={
            "help": "columns naming a well: the fields of each well are aggregated into one profile",
            "metavar": "COLUMN",
        },
    )
    aggregation: str = field(
        default="mean",
        metadata={
            "help": "how the fields of a well (and the wells of a perturbation) become one profile",
            "choices": ("mean", "median"),
        },
    )
    perturbations: bool = field(
        default=False,
        metadata={"help": "also write one profile per perturbation (control wells left out)", "action": "store_true"},
    )
    format: str = field(
        default="parquet",
        metadata={
            "help": "parquet (Metadata_* + feature columns; pycytominer, copairs, pandas) or h5ad (AnnData; scanpy; needs anndata)",
            "choices": ("parquet", "h5ad"),
        },
    )
    no_progress: bool = field(default=False, metadata={"help": "no progress bars", "action": "store_true"})
