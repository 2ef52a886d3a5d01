"""Retrieval metrics on perturbation profiles: gene-set recall (the paper's pooled-screen evaluation)
and mean average precision with ``copairs`` (the JUMP consortium's metric).

- :func:`gene_set_recall`: for each gene with annotated partners (genes sharing a complex, pathway or
  any pair list in the ``entity1,entity2`` format), the share of its partners among its ``k`` nearest
  genes by cosine similarity, ``k`` = its number of partners; averaged over genes, with the chance
  level ``k / (n_genes - 1)`` averaged the same way.
- :func:`replicate_map`: copairs mAP of retrieving a perturbation's other replicate wells against the
  control wells ("phenotypic activity"), and the share of perturbations whose mAP is significant.
- :func:`consistency_map`: copairs mAP of retrieving genes of the same annotated group (e.g. complex)
  among the other perturbations' profiles ("phenotypic consistency").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pandas as pd


def partners_from_pairs(pairs: Iterable[tuple[str, str]], genes: Iterable[str]) -> dict[str, set[str]]:
    """``{gene: partners}`` from unordered pairs, restricted to ``genes`` (self-pairs ignored)."""
    present = set(genes)
    partners: dict[str, set[str]] = defaultdict(set)
    for first, second in pairs:
        if first != second and first in present and second in present:
            partners[first].add(second)
            partners[second].add(first)
    return dict(partners)


def gene_set_recall(profiles: np.ndarray, genes: list[str], pairs: Iterable[tuple[str, str]]) -> dict:
    """Share of each gene's annotated partners among its nearest neighbours.

    Args:
        profiles: ``(n_genes, D)`` one aggregated (batch-corrected) profile per gene.
        genes: the ``n_genes`` names, unique.
        pairs: annotated relationships (gene pairs).

    Returns:
        ``{"recall", "chance", "n_genes_scored", "per_gene": {gene: recall}}``.
    """
    if len(set(genes)) != len(genes):
        raise ValueError("gene_set_recall needs one profile per gene; aggregate the table per gene first")
    partners = partners_from_pairs(pairs, genes)
    if not partners:
        raise ValueError("no annotated pair has both genes among the profiles; check the gene names and sources")
    x = np.asarray(profiles, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    similarity = x @ x.T  # (n, n) cosine
    np.fill_diagonal(similarity, -np.inf)
    index = {gene: i for i, gene in enumerate(genes)}
    per_gene, chance = {}, []
    for gene, mates in sorted(partners.items()):
        k = len(mates)
        nearest = np.argsort(-similarity[index[gene]], kind="stable")[:k]
        per_gene[gene] = len({genes[j] for j in nearest} & mates) / k
        chance.append(k / (len(genes) - 1))
    return {
        "recall": float(np.mean(list(per_gene.values()))),
        "chance": float(np.mean(chance)),
        "n_genes_scored": len(per_gene),
        "per_gene": per_gene,
    }


def _copairs_map(
    meta: pd.DataFrame,
    features: np.ndarray,
    pos_sameby,
    pos_diffby,
    neg_sameby,
    neg_diffby,
    group_col: str,
    null_size: int,
    threshold: float,
    seed: int,
) -> dict:
    from copairs import map as copairs_map

    meta = meta.reset_index(drop=True)
    ap = copairs_map.average_precision(
        meta,
        features,
        pos_sameby=pos_sameby,
        pos_diffby=pos_diffby,
        neg_sameby=neg_sameby,
        neg_diffby=neg_diffby,
        progress_bar=False,
    )
    ap = ap.dropna(subset=["average_precision"])
    if ap.empty:
        raise ValueError(f"copairs found no positive pairs for {group_col}: each group needs at least two profiles")
    maps = copairs_map.mean_average_precision(
        ap, [group_col], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False
    )
    return {
        "mean_map": float(maps["mean_average_precision"].mean()),
        "fraction_significant": float(maps["below_corrected_p"].mean()),
        "n_groups": int(len(maps)),
        "per_group": dict(zip(maps[group_col].astype(str), maps["mean_average_precision"].astype(float))),
    }


def replicate_map(
    metadata: pd.DataFrame,
    features: np.ndarray,
    perturbation_col: str,
    control_mask: np.ndarray,
    well_cols: tuple[str, ...] = ("Metadata_plate", "Metadata_well"),
    null_size: int = 1000,
    threshold: float = 0.05,
    seed: int = 0,
) -> dict:
    """Phenotypic activity: mAP of retrieving a perturbation's replicate wells against control wells.

    Args:
        metadata: one row per well profile (aggregate fields to wells first).
        features: ``(n_wells, D)`` aligned features.
        perturbation_col: the perturbation column.
        control_mask: ``(n_wells,)`` True for control wells (the negatives).
    """
    # (a well named by its perturbation too, as rows from cells are, lists that column once)
    meta = metadata[[perturbation_col, *[c for c in well_cols if c in metadata.columns and c != perturbation_col]]]
    meta = meta.astype(str).copy()
    meta[perturbation_col] = np.where(control_mask, "__control__", meta[perturbation_col])
    meta["_is_control"] = np.asarray(control_mask, dtype=bool)
    # copairs scores groups by pos_sameby; controls must not be positives of each other
    meta["_query"] = np.where(
        meta["_is_control"], [f"__control_{i}" for i in range(len(meta))], meta[perturbation_col]
    )
    return _copairs_map(
        meta,
        np.asarray(features, dtype=np.float64),
        pos_sameby=["_query"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["_is_control"],
        group_col="_query",
        null_size=null_size,
        threshold=threshold,
        seed=seed,
    ) | {"metric": "replicate retrieval against controls"}


def consistency_map(
    profiles: np.ndarray,
    genes: list[str],
    groups: list[str],
    null_size: int = 1000,
    threshold: float = 0.05,
    seed: int = 0,
) -> dict:
    """Phenotypic consistency: mAP of retrieving same-group genes (e.g. one complex) among all genes.

    Args:
        profiles: ``(n_genes, D)``, one profile per gene.
        genes, groups: gene names and their group (empty/None: not in any group, a negative only).
    """
    meta = pd.DataFrame(
        {"gene": genes, "group": [g if isinstance(g, str) and g else f"__none_{i}" for i, g in enumerate(groups)]}
    )
    return _copairs_map(
        meta,
        np.asarray(profiles, dtype=np.float64),
        pos_sameby=["group"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["group"],
        group_col="group",
        null_size=null_size,
        threshold=threshold,
        seed=seed,
    ) | {"metric": "same-group retrieval among genes"}
