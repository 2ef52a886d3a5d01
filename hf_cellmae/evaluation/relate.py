"""Recall of known biological relationships, as in Recursion's efaar_benchmarking 1.0.

Given one vector per perturbation (gene), the benchmark asks how often pairs of genes known to be
related (same protein complex, pathway, interaction) are unusually similar, or unusually
dissimilar, compared with all gene pairs:

1. cosine similarity between all perturbation vectors (rows scaled to unit norm; a zero row has
   cosine 0 with everything, as scikit-learn's ``cosine_similarity``);
2. null distribution = the cosines of all distinct pairs (upper triangle), ``P*(P-1)/2`` values;
3. per source: canonicalise the pairs (sorted by name), drop self-pairs and duplicates, keep the
   pairs whose genes are both in the map; query = their cosines;
4. a query pair is recalled at (lo, hi) if ``#{null <= q}/|null| <= lo`` or
   ``#{null < q}/|null| >= hi``. Recall = recalled / |query|. Chance is ``lo + (1 - hi)``.

This gives the same numbers as efaar_benchmarking 1.0's ``known_relationship_benchmark`` on the
same inputs (tested against it). The full null is computed in row blocks straight into one
preallocated upper-triangle buffer that is then sorted in place: no P x P matrix is ever held
(20,000 perturbations: 0.8 GB in float32 instead of 1.6 GB for the matrix plus copies).

For very large maps pass ``null_samples=K``: the null is then K pairs (i != j) drawn uniformly
with replacement by a seeded generator, and the recall is an estimate whose percentile error is
about ``sqrt(p*(1-p)/K)`` (0.0007 at p=0.05 with K=10^5). The reported ``null_size`` is K.

Pair lists: the CORUM, HuMAP, Reactome, SIGNOR and StringDB files shipped in the PyPI package
``efaar-benchmarking==1.0`` (``cellmae annotations`` fetches them without the package's heavy
dependencies; see ``annotations.py``), or any CSV file with columns
``entity1,entity2`` (the synthetic plate writes its true relationships in that format).
Licences differ per file (CORUM and SIGNOR are CC-BY-NC): see the LICENSE file next to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from tqdm.auto import tqdm

from .annotations import annotations_dir, check_annotation_file, is_efaar_folder

if TYPE_CHECKING:  # pandas is imported where it is used: `cellmae --help` (which reads BENCHMARK_SOURCES) stays fast
    import pandas as pd

BENCHMARK_SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
RECALL_THRESHOLDS = ((0.05, 0.95), (0.10, 0.90))
MIN_PERTURBATIONS = 10
# A full null larger than this (bytes) is refused with a pointer to null_samples.
MAX_FULL_NULL_BYTES = 16 * 2**30

SourceSpec = Union[str, Path, "pd.DataFrame"]


def recall_key(lo: float, hi: float) -> str:
    """Metric name of a threshold pair, e.g. ``recall_0.05_0.95``."""
    return f"recall_{lo:.2f}_{hi:.2f}"


def chance_recall(thresholds: Sequence[tuple[float, float]] = RECALL_THRESHOLDS) -> dict[str, float]:
    """Recall of a random map: the fraction of the null beyond the two thresholds."""
    return {recall_key(lo, hi): round(lo + (1.0 - hi), 10) for lo, hi in _check_thresholds(thresholds)}


def canonical_pairs(pairs: pd.DataFrame, origin: str = "pairs") -> pd.DataFrame:
    """Pairs sorted within each row by name, without self-pairs and duplicates (efaar's filter)."""
    import pandas as pd

    missing = {"entity1", "entity2"} - set(pairs.columns)
    if missing:
        raise ValueError(f"{origin} needs columns entity1,entity2; missing {sorted(missing)} in {list(pairs.columns)}")
    first = pairs["entity1"].astype(str).to_numpy(dtype=object)
    second = pairs["entity2"].astype(str).to_numpy(dtype=object)
    empty = (first == "") | (second == "")
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{origin} has {int(empty.sum())} rows with an empty entity (first at data row {row + 1})")
    swap = first > second
    canonical = pd.DataFrame({"entity1": np.where(swap, second, first), "entity2": np.where(swap, first, second)})
    canonical = canonical[canonical.entity1 != canonical.entity2].drop_duplicates()
    return canonical.reset_index(drop=True)


def relationship_source_file(source: str | Path, folder: str | Path | None = None) -> Path:
    """The file a source is read from, resolved: a path to a file as given, else ``folder/<name>.txt``.

    A path may lead anywhere (``../../x.csv`` is read if it exists); the caller can show the resolved
    path so the user sees which file was used. A name found in efaar-benchmarking's files (the default folder, or
    ``folder`` when it holds their complete set) is checked against the SHA-256 that ``cellmae annotations``
    verified (``UserError`` when it differs: :func:`~hf_cellmae.evaluation.annotations.check_annotation_file`).
    """
    path = Path(source)
    if not path.is_file():
        base = Path(folder) if folder is not None else annotations_dir()
        path = base / f"{source}.txt"
        if not path.is_file():
            known = sorted(p.stem for p in base.glob("*.txt"))
            raise FileNotFoundError(
                f"no relationship source {source!r}: {path} does not exist; known sources: {known}"
            )
        if folder is None or is_efaar_folder(base):
            check_annotation_file(path)
    return path.resolve()


def load_relationships(source: SourceSpec, folder: str | Path | None = None) -> pd.DataFrame:
    """Canonical pair list of a source: a name in ``folder`` (default: efaar's annotations) or a CSV path."""
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        return canonical_pairs(source)
    path = relationship_source_file(source, folder)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return canonical_pairs(table, origin=str(path))


def _check_thresholds(thresholds) -> list[tuple[float, float]]:
    checked = []
    for pair in thresholds:
        lo, hi = min(pair), max(pair)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"recall thresholds must satisfy 0 <= lo < hi <= 1, got {pair}")
        checked.append((float(lo), float(hi)))
    return checked


def compute_recall(
    null: np.ndarray, query: np.ndarray, thresholds=RECALL_THRESHOLDS, null_is_sorted: bool = False
) -> dict[str, float]:
    """Recall of ``query`` cosines against ``null`` cosines at each (lo, hi) threshold pair.

    Args:
        null: (M,) null values (sorted ascending if ``null_is_sorted``; never modified).
        query: (Q,) query values, Q >= 1.
        thresholds: (lo, hi) pairs.

    Returns:
        ``{recall_key(lo, hi): recall}``.
    """
    null, query = np.asarray(null), np.asarray(query)
    if len(null) == 0 or len(query) == 0:
        raise ValueError(f"recall needs a non-empty null and query, got {len(null)} and {len(query)} values")
    sorted_null = null if null_is_sorted else np.sort(null)
    at_or_below = np.searchsorted(sorted_null, query, side="right") / len(sorted_null)  # #{null <= q}/M
    below = np.searchsorted(sorted_null, query, side="left") / len(sorted_null)  # #{null < q}/M
    return {
        recall_key(lo, hi): float(np.count_nonzero((at_or_below <= lo) | (below >= hi)) / len(query))
        for lo, hi in _check_thresholds(thresholds)
    }


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; rows of (near) zero norm are left as they are (cosine 0)."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    return vectors / norms[:, None]


def _triangle_offsets(n: int) -> np.ndarray:
    """Start of row i's pairs (i, i+1..n-1) in the row-major upper triangle."""
    rows = np.arange(n, dtype=np.int64)
    return rows * n - rows * (rows + 1) // 2


def full_null(unit: np.ndarray, block_rows: int = 1024, progress: bool = False) -> np.ndarray:
    """Cosines of all distinct pairs (row-major upper triangle), computed in row blocks.

    Args:
        unit: (P, D) unit-norm rows.

    Returns:
        (P*(P-1)/2,) array, entry ``offset[i] + (j - i - 1)`` = cosine(i, j) for i < j (unsorted).
    """
    n = len(unit)
    null = np.empty(n * (n - 1) // 2, dtype=unit.dtype)
    offsets = _triangle_offsets(n)
    blocks = range(0, n, block_rows)
    for start in tqdm(blocks, desc="cosine null", unit="block", disable=not progress):
        stop = min(start + block_rows, n)
        similarities = unit[start:stop] @ unit[start:].T  # (rows, P - start)
        for row in range(stop - start):
            i = start + row
            null[offsets[i] : offsets[i] + n - i - 1] = similarities[row, row + 1 :]
    return null


def _pair_cosines(unit: np.ndarray, first: np.ndarray, second: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    out = np.empty(len(first), dtype=unit.dtype)
    for start in range(0, len(first), chunk):
        i, j = first[start : start + chunk], second[start : start + chunk]
        out[start : start + chunk] = np.einsum("ij,ij->i", unit[i], unit[j])
    return out


def sampled_null(unit: np.ndarray, n_samples: int, seed: int = 0) -> np.ndarray:
    """Cosines of ``n_samples`` pairs (i != j) drawn uniformly with replacement, seeded."""
    rng = np.random.default_rng(seed)
    n = len(unit)
    first = rng.integers(0, n, size=n_samples)
    second = rng.integers(0, n - 1, size=n_samples)
    second = second + (second >= first)  # uniform over j != i
    return _pair_cosines(unit, np.minimum(first, second), np.maximum(first, second))


def known_relationship_recall(
    vectors,
    labels: Sequence[str],
    sources: Sequence[SourceSpec] | Mapping[str, SourceSpec] = BENCHMARK_SOURCES,
    thresholds=RECALL_THRESHOLDS,
    null_samples: int | None = None,
    seed: int = 0,
    min_perturbations: int = MIN_PERTURBATIONS,
    on_unusable: str = "raise",
    annotations: str | Path | None = None,
    block_rows: int = 1024,
    progress: bool = True,
) -> dict:
    """Recall of known relationships for a map of one vector per perturbation.

    Args:
        vectors: (P, D) perturbation vectors (float32 is computed in float32, anything else in
            float64, as scikit-learn does).
        labels: (P,) unique perturbation names (gene symbols).
        sources: source names (files in ``annotations``, default efaar's), CSV paths, or a mapping
            name -> name/path/DataFrame of pairs.
        thresholds: (lo, hi) pairs; default (0.05, 0.95) and (0.10, 0.90).
        null_samples: None for the exact full null; K for a seeded sample of K pairs.
        seed: seed of the sampled null.
        min_perturbations: fewest perturbations accepted in the map.
        on_unusable: "raise" (default) or "skip" when a source has no pair with both genes in the
            map; skipped sources are listed in the result with the reason.
        annotations: folder of named sources (default: efaar_benchmarking's).
        block_rows: rows per block of the cosine computation (memory ~ block_rows * P values).
        progress: show a progress bar.

    Returns:
        ``{"sources": {name: {recall_key: f, ..., "null_size": int, "query_size": int}},
        "skipped_sources": {name: reason}, "null": {"kind": "full"|"sampled", "size": int, "seed": int|None},
        "n_perturbations": int}``.
    """
    import pandas as pd

    if on_unusable not in ("raise", "skip"):
        raise ValueError(f"on_unusable must be 'raise' or 'skip', got {on_unusable!r}")
    thresholds = _check_thresholds(thresholds)
    vectors = np.asarray(vectors)
    labels = np.asarray(labels, dtype=object)
    if vectors.ndim != 2 or len(vectors) != len(labels):
        raise ValueError(
            f"vectors must be (P, D) with one row per label; got {vectors.shape} for {len(labels)} labels"
        )
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or inf; fix the embeddings or the alignment before benchmarking")
    duplicated = pd.Index(labels)[pd.Index(labels).duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"labels must be unique (aggregate first); duplicated: {duplicated[:5]}")
    if len(labels) < min_perturbations:
        raise ValueError(
            f"the map has {len(labels)} perturbations; at least min_perturbations={min_perturbations} are needed "
            "for a meaningful null; lower it with --min-perturbations N (min_perturbations=N) if you accept a coarse estimate"
        )
    named = _name_sources(sources)
    index = pd.Index(labels)
    queries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for name, spec in named.items():
        pairs = load_relationships(spec, annotations)
        both = pairs.entity1.isin(index) & pairs.entity2.isin(index)
        if not both.any():
            reason = f"none of its {len(pairs)} pairs has both genes among the {len(labels)} perturbations of the map"
            if on_unusable == "raise":
                raise ValueError(
                    f"relationship source {name!r} is unusable: {reason}; give relationships that name your "
                    "perturbations (--sources FILE.csv with entity1,entity2 columns; a `cellmae synthetic` plate: "
                    "--synthetic-plate PLATE), or skip it with on_unusable='skip' (--skip-unusable)"
                )
            skipped[name] = reason
            continue
        a = index.get_indexer(pairs.entity1[both])
        b = index.get_indexer(pairs.entity2[both])
        queries[name] = (np.minimum(a, b), np.maximum(a, b))

    dtype = np.float32 if vectors.dtype == np.float32 else np.float64
    unit = unit_rows(vectors.astype(dtype, copy=False))
    n = len(unit)
    if null_samples is None:
        needed = n * (n - 1) // 2 * unit.itemsize
        if needed > MAX_FULL_NULL_BYTES:
            raise MemoryError(
                f"the full null for {n} perturbations needs {needed / 2**30:.1f} GiB; pass null_samples "
                "(e.g. 1_000_000; about 5 s per million pairs at D=384 on 2 cores) for a seeded sampled null"
            )
        null = full_null(unit, block_rows=block_rows, progress=progress)
        offsets = _triangle_offsets(n)
        # Query cosines are read from the very same buffer as the null, before sorting it.
        query_values = {name: null[offsets[i] + (j - i - 1)] for name, (i, j) in queries.items()}
        null_info = {"kind": "full", "size": int(len(null)), "seed": None}
    else:
        if null_samples < 1:
            raise ValueError(f"null_samples must be a positive number of pairs, got {null_samples}")
        null = sampled_null(unit, int(null_samples), seed)
        query_values = {name: _pair_cosines(unit, i, j) for name, (i, j) in queries.items()}
        null_info = {"kind": "sampled", "size": int(len(null)), "seed": int(seed)}
    null.sort()
    results = {}
    for name, values in query_values.items():
        metrics = compute_recall(null, values, thresholds, null_is_sorted=True)
        metrics.update(null_size=int(len(null)), query_size=int(len(values)))
        results[name] = metrics
    return {"sources": results, "skipped_sources": skipped, "null": null_info, "n_perturbations": int(n)}


def _name_sources(sources) -> dict[str, SourceSpec]:
    import pandas as pd

    if isinstance(sources, (str, Path, pd.DataFrame)):
        sources = [sources]
    if isinstance(sources, Mapping):
        named = dict(sources)
    else:
        named = {}
        for spec in sources:
            if isinstance(spec, pd.DataFrame):
                raise ValueError("pass DataFrame sources as a mapping name -> DataFrame")
            named[Path(spec).stem if Path(spec).suffix else str(spec)] = spec
    if not named:
        raise ValueError("no relationship source given; name at least one (e.g. CORUM) or a CSV path")
    return named
