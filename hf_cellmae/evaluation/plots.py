"""PNG plots of an evaluation: recall per source vs chance, a complex's cosine heatmap, a 2-D PCA map.

Each function takes plain arrays and a path, writes one PNG (matplotlib ``Figure``, no pyplot state) and returns
the path. Groups of genes come from a relationship pair list (its connected components), so the
same plots work for CORUM and for the synthetic plate's true relationships.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: the user's interactive backend is left alone
from matplotlib.patches import Rectangle

from .relate import unit_rows


def plot_recall(
    sources: Mapping[str, Mapping[str, float]],
    path: str | Path,
    chance: Mapping[str, float],
    baselines: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    title: str = "Recall of known relationships",
    model_label: str = "model",
) -> Path:
    """Grouped bars: recall per source for the model (and baselines), one panel per threshold pair.

    Args:
        sources: ``{source: {recall_key: value, ...}}`` of the model.
        chance: ``{recall_key: value}``, drawn as a dashed line in its own panel and written on it.
        baselines: ``{baseline_name: {source: {recall_key: value}}}``.
        model_label: the model's name in the legend (the demo's "pretrained").
    """
    return _save(recall_figure(sources, chance, baselines, title, model_label), path)


def recall_figure(
    sources, chance, baselines=None, title: str = "Recall of known relationships", model_label: str = "model"
) -> Figure:
    """The figure :func:`plot_recall` writes."""
    runs = {model_label: sources, **(baselines or {})}
    names = list(sources)
    keys = list(chance)
    fig = Figure(figsize=(1.2 + 1.1 * len(names) * len(keys) + 2, 3.6))
    axes = fig.subplots(1, len(keys), squeeze=False)
    width = 0.8 / len(runs)
    colours = colormaps["tab10"]
    for ax, key in zip(axes[0], keys):
        for k, (run, metrics) in enumerate(runs.items()):
            values = [metrics.get(name, {}).get(key, np.nan) for name in names]
            positions = np.arange(len(names)) + (k - (len(runs) - 1) / 2) * width
            bars = ax.bar(positions, values, width, label=run, color=colours(k))
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        # Each panel has its own chance (the share of pairs its thresholds keep): named in its own title.
        ax.axhline(chance[key], color="black", linestyle="--", linewidth=1, label="chance (each panel's)")
        ax.set_xticks(np.arange(len(names)), names, rotation=20)
        lo, hi = key.split("_")[1:]
        ax.set_title(f"percentile <= {lo} or >= {hi} (chance {chance[key]:.2f})", fontsize=10)
        ax.set_ylabel("recall")
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def relationship_groups(pairs: pd.DataFrame, labels) -> list[list[str]]:
    """Connected components (size >= 2) of the pair graph restricted to ``labels``, largest first."""
    present = set(labels)
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in pairs[["entity1", "entity2"]].itertuples(index=False):
        if a in present and b in present:
            parent[root(a)] = root(b)
    components: dict[str, list[str]] = {}
    for node in parent:
        components.setdefault(root(node), []).append(node)
    groups = [sorted(members) for members in components.values() if len(members) >= 2]
    return sorted(groups, key=lambda members: (-len(members), members[0]))


def pick_complex(pairs: pd.DataFrame, labels, max_genes: int = 24) -> list[str]:
    """Genes of one known complex present in the map: the largest group of at most ``max_genes``,
    else the best-connected gene and its partners (a giant component is not one complex)."""
    groups = relationship_groups(pairs, labels)
    for members in groups:
        if len(members) <= max_genes:
            return members
    if not groups:
        return []
    present = set(labels)
    inside = pairs[pairs.entity1.isin(present) & pairs.entity2.isin(present)]
    degree = pd.concat([inside.entity1, inside.entity2]).value_counts()
    hub = degree.index[0]
    partners = set(inside.entity2[inside.entity1 == hub]) | set(inside.entity1[inside.entity2 == hub])
    ranked = [gene for gene in degree.index if gene in partners][: max_genes - 1]
    return sorted([hub, *ranked])


def plot_complex_heatmap(
    labels,
    vectors: np.ndarray,
    complex_genes: list[str],
    path: str | Path,
    n_others: int | None = None,
    seed: int = 0,
    title: str = "Cosine similarity",
) -> Path:
    """Cosine heatmap of a complex's genes, followed by as many random other genes for contrast."""
    labels = list(labels)
    row_of = {name: i for i, name in enumerate(labels)}
    complex_genes = [gene for gene in complex_genes if gene in row_of]
    if len(complex_genes) < 2:
        raise ValueError(f"a complex heatmap needs at least 2 of its genes in the map, got {complex_genes}")
    others = [gene for gene in labels if gene not in set(complex_genes)]
    n_others = min(len(others), len(complex_genes) if n_others is None else n_others)
    others = sorted(np.random.default_rng(seed).choice(others, size=n_others, replace=False).tolist())
    shown = complex_genes + others
    unit = unit_rows(np.asarray(vectors, dtype=np.float64)[[row_of[g] for g in shown]])
    cosine = unit @ unit.T  # (G, G)
    size = 2.5 + 0.22 * len(shown)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.add_patch(Rectangle((-0.5, -0.5), len(complex_genes), len(complex_genes), fill=False, edgecolor="black", lw=2))
    ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), shown, fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(
        f"{title}\n(boxed: {len(complex_genes)} related genes; then {len(others)} random others)", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_projection(
    labels,
    vectors: np.ndarray,
    groups: list[list[str]],
    path: str | Path,
    max_groups: int = 10,
    title: str = "Perturbation embeddings (PCA)",
) -> Path:
    """2-D PCA of the perturbation vectors (cosine geometry: rows scaled to unit norm first),
    coloured by the first ``max_groups`` groups; everything else grey."""
    unit = unit_rows(np.asarray(vectors, dtype=np.float64))
    centred = unit - unit.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T  # (P, 2)
    explained = singular[:2] ** 2 / max((singular**2).sum(), 1e-30)
    row_of = {name: i for i, name in enumerate(labels)}
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.subplots()
    coloured = np.zeros(len(coords), dtype=bool)
    colours = colormaps["tab10"]
    for k, members in enumerate(groups[:max_groups]):
        rows = [row_of[gene] for gene in members if gene in row_of]
        coloured[rows] = True
        name = ", ".join(members[:3]) + ("..." if len(members) > 3 else "")
        ax.scatter(coords[rows, 0], coords[rows, 1], s=28, color=colours(k % 10), label=f"{name} ({len(rows)})")
    ax.scatter(coords[~coloured, 0], coords[~coloured, 1], s=10, color="lightgrey", label="other", zorder=0)
    ax.set_xlabel(f"PC1 ({explained[0]:.0%})")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%})" if len(explained) > 1 else "PC2")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    return path


__all__ = [
    "plot_recall",
    "recall_figure",
    "plot_complex_heatmap",
    "plot_projection",
    "relationship_groups",
    "pick_complex",
]
