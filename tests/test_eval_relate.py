"""Known-relationship recall: the worked case, an independent O(n^2) check, efaar_benchmarking 1.0 itself."""

import importlib
import importlib.util
import itertools
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest

from hf_cellmae.evaluation.annotations import annotations_dir, cached_wheel
from hf_cellmae.evaluation.relate import (
    chance_recall,
    compute_recall,
    known_relationship_recall,
    load_relationships,
)


def _random_map(n=40, width=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = [f"G{i:03d}" for i in range(n)]
    vectors = rng.standard_normal((n, width))
    vectors[5] = vectors[4]  # an exact tie (cosine 1) ...
    vectors[7] = 0.0  # ... and a zero vector (cosine 0 with everything)
    vectors[8] = 0.0
    return vectors, labels


def _random_pairs(labels, n_pairs=80, seed=1):
    rng = np.random.default_rng(seed)
    pairs = rng.choice(labels + ["NOT_IN_MAP"], size=(n_pairs, 2))
    pairs = np.vstack(
        [pairs, [["G005", "G004"], ["G007", "G008"], ["G001", "G001"], ["G002", "G003"], ["G003", "G002"]]]
    )
    return pd.DataFrame(pairs, columns=["entity1", "entity2"])


def test_worked_case_recall():
    null, query = np.array([1.0, 2, 3, 4, 5]), np.array([1.0, 5])
    assert compute_recall(null, query, [(0.1, 0.9)]) == {"recall_0.10_0.90": 0.0}
    assert compute_recall(null, query, [(0.2, 0.8)]) == {"recall_0.20_0.80": 1.0}


def test_chance_recall_is_the_mass_beyond_the_thresholds():
    assert chance_recall() == {"recall_0.05_0.95": 0.1, "recall_0.10_0.90": 0.2}


def test_pairs_are_canonicalised_without_self_pairs_or_duplicates(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("entity1,entity2\nB,A\nA,B\nC,C\nA,C\n")
    assert load_relationships(path).values.tolist() == [["A", "B"], ["A", "C"]]


def test_recall_matches_independent_quadratic_computation():
    vectors, labels = _random_map()
    pairs = _random_pairs(labels)
    result = known_relationship_recall(
        vectors, labels, {"toy": pairs}, thresholds=[(0.05, 0.95), (0.2, 0.8)], progress=False
    )

    # Independent: plain Python cosines, every pair, counting by comparison.
    def cosine(u, v):
        nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
        return 0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv)

    rows = {name: list(map(float, row)) for name, row in zip(labels, vectors)}
    null = [cosine(rows[a], rows[b]) for a, b in itertools.combinations(labels, 2)]
    unique_pairs = {tuple(sorted(p)) for p in pairs.values.tolist() if p[0] != p[1] and p[0] in rows and p[1] in rows}
    query = [cosine(rows[a], rows[b]) for a, b in unique_pairs]
    expected = {}
    for lo, hi in [(0.05, 0.95), (0.2, 0.8)]:
        hits = 0
        for q in query:
            at_or_below = sum(v <= q + 1e-12 for v in null) / len(null)
            below = sum(v < q - 1e-12 for v in null) / len(null)
            hits += at_or_below <= lo or below >= hi
        expected[f"recall_{lo:.2f}_{hi:.2f}"] = hits / len(query)
    got = result["sources"]["toy"]
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert got["null_size"] == len(null) and got["query_size"] == len(query)


def _import_efaar_benchmarking(monkeypatch):
    """efaar_benchmarking.benchmarking with stand-ins for whichever heavy imports are missing.

    Its recall path only needs sklearn's cosine_similarity (rows / L2 norm, zero rows kept, then a
    dot product) and Bunch; geomloss, joblib and scipy.stats are used by other benchmarks.
    """
    if importlib.util.find_spec("efaar_benchmarking") is None:
        wheel = cached_wheel()  # kept by `cellmae annotations`: a pure-Python wheel imports from the zip
        if not wheel.is_file():
            pytest.skip(
                "efaar-benchmarking's code is not here: run `cellmae annotations` (or pip install --no-deps efaar-benchmarking==1.0)"
            )
        monkeypatch.syspath_prepend(str(wheel))
        monkeypatch.delitem(sys.modules, "efaar_benchmarking", raising=False)

    def stub(name, **attributes):
        try:
            importlib.import_module(name)
            return  # the real module is there: use it
        except ImportError:
            pass
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            module_name = ".".join(parts[:depth])
            if depth == len(parts) or module_name not in sys.modules:
                monkeypatch.setitem(sys.modules, module_name, types.ModuleType(module_name))
        for key, value in attributes.items():
            setattr(sys.modules[name], key, value)

    def cosine_similarity(x, y=None):
        def unit(a):
            a = np.asarray(a)
            a = a if a.dtype == np.float32 else a.astype(np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", a, a))
            norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
            return a / norms[:, None]

        return unit(x) @ unit(x if y is None else y).T

    class Bunch(dict):
        def __getattr__(self, key):
            return self[key]

    stub("sklearn.metrics.pairwise", cosine_similarity=cosine_similarity)
    stub("sklearn.utils", Bunch=Bunch)
    stub("geomloss", SamplesLoss=None)
    stub("joblib", Parallel=None, delayed=None)
    stub("scipy.stats", hypergeom=None, ks_2samp=None)
    for name in ("efaar_benchmarking.benchmarking", "efaar_benchmarking.constants"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("efaar_benchmarking.benchmarking")
    monkeypatch.delitem(sys.modules, "efaar_benchmarking.benchmarking")
    return module


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_recall_equals_efaar_benchmarking_on_its_own_annotations(monkeypatch, tmp_path, dtype):
    efaar = _import_efaar_benchmarking(monkeypatch)
    from efaar_benchmarking import constants

    # The first rows of each shipped file, as shipped (efaar's row-wise filter is slow on all of them).
    genes = set()
    for source in constants.BENCHMARK_SOURCES:
        head = pd.read_csv(annotations_dir() / f"{source}.txt", nrows=1500)  # efaar's own files, however installed
        head.to_csv(tmp_path / f"{source}.txt", index=False)
        genes |= set(head.entity1[:150]) | set(head.entity2[:150])
    genes = sorted(genes)[:200] + ["NOT_A_GENE"]
    rng = np.random.default_rng(7)
    # Some genes share a direction, so recall is well above chance and both tails matter.
    vectors = rng.standard_normal((len(genes), 16)) + 2.0 * (np.arange(len(genes)) % 5 == 0)[:, None]
    vectors = vectors.astype(dtype)
    vectors[3] = 0.0
    theirs = efaar.known_relationship_benchmark(
        efaar.Bunch(features=pd.DataFrame(vectors), metadata=pd.DataFrame({"gene": genes})),
        pert_col="gene",
        benchmark_data_dir=str(tmp_path),
    ).set_index("source")
    ours = known_relationship_recall(vectors, genes, annotations=tmp_path, progress=False, on_unusable="skip")
    assert len(theirs) >= 3 and set(ours["sources"]) == set(theirs.index)
    for source, row in theirs.iterrows():
        got = ours["sources"][source]
        assert got["recall_0.05_0.95"] == row["recall_0.05_0.95"]
        assert got["recall_0.10_0.90"] == row["recall_0.1_0.9"]
        assert (got["null_size"], got["query_size"]) == (row["null_distribution_size"], row["query_distribution_size"])


def test_sampled_null_is_seeded_and_close_to_full_null():
    vectors, labels = _random_map(n=120, seed=3)
    pairs = _random_pairs(labels, n_pairs=300)
    full = known_relationship_recall(vectors, labels, {"toy": pairs}, progress=False)["sources"]["toy"]
    a = known_relationship_recall(vectors, labels, {"toy": pairs}, null_samples=200_000, seed=1, progress=False)
    b = known_relationship_recall(vectors, labels, {"toy": pairs}, null_samples=200_000, seed=1, progress=False)
    assert a == b
    assert a["null"] == {"kind": "sampled", "size": 200_000, "seed": 1}
    assert a["sources"]["toy"]["recall_0.10_0.90"] == pytest.approx(full["recall_0.10_0.90"], abs=0.02)


def test_source_without_usable_pairs_raises_or_is_reported_when_skipped():
    vectors, labels = _random_map()
    unusable = pd.DataFrame({"entity1": ["X1"], "entity2": ["X2"]})
    usable = _random_pairs(labels)
    with pytest.raises(ValueError, match="'other' is unusable"):
        known_relationship_recall(vectors, labels, {"toy": usable, "other": unusable}, progress=False)
    result = known_relationship_recall(
        vectors, labels, {"toy": usable, "other": unusable}, on_unusable="skip", progress=False
    )
    assert list(result["sources"]) == ["toy"] and "other" in result["skipped_sources"]


def test_bad_maps_raise_clear_errors(tmp_path):
    vectors, labels = _random_map()
    pairs = {"toy": _random_pairs(labels)}
    with pytest.raises(ValueError, match="duplicated: \\['G000'\\]"):
        known_relationship_recall(vectors, ["G000"] + labels[1:-1] + ["G000"], pairs, progress=False)
    with pytest.raises(ValueError, match="the map has 5 perturbations"):
        known_relationship_recall(vectors[:5], labels[:5], pairs, progress=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("gene_a,gene_b\nA,B\n")
    with pytest.raises(ValueError, match="needs columns entity1,entity2"):
        known_relationship_recall(vectors, labels, [bad], progress=False)
    with pytest.raises(FileNotFoundError, match="no relationship source 'NOPE'"):
        known_relationship_recall(vectors, labels, ["NOPE"], annotations=tmp_path, progress=False)
