"""Linear probe and kNN classification of any metadata column from an embeddings table.

How much of a label (protein complex, gene, pathway, compound...) can be read off frozen features?
The split never puts one well, or one plate, on both sides:

1. features are centred and scaled on each batch's control wells (``center_scale``; on all its rows
   when there are no controls), so plate offsets cannot help or hurt;
2. fields are averaged per well (the unit of replication; ``unit_cols``);
3. folds: leave one plate out when there are at least two plates (``group_col``), otherwise
   ``GroupKFold`` over wells; each class must be seen in training to be scored;
4. each fold standardises on its training wells and fits a multinomial logistic regression
   (scikit-learn, L2) or a cosine k-nearest-neighbour vote.

``probe_embeddings(table, "Metadata_complex")`` returns accuracy per fold, their mean and spread, and
chance (uniform and majority class); ``plot_probe`` draws the per-class confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .align import center_scale
from .tables import METADATA_PREFIX, metadata_column, split_table, well_profiles

CLASSIFIERS = ("logistic", "knn")


def _labelled(values: pd.Series) -> np.ndarray:
    text = values.astype("string")
    return (text.notna() & (text.str.strip() != "")).to_numpy()


def labelled_wells(
    metadata: pd.DataFrame,
    features: np.ndarray,
    label_col: str,
    unit_cols: Sequence[str] = ("Metadata_plate", "Metadata_well"),
    batch_col: str | None = "Metadata_plate",
    control_col: str | None = "Metadata_is_control",
) -> tuple[pd.DataFrame, np.ndarray]:
    """Control-aligned features averaged per well (``tables.well_profiles``): ``(unit metadata, (n_units, D))`` for
    labelled units.

    Args:
        metadata: ``Metadata_*`` columns, one row per field.
        features: ``(n_fields, D)``.
        label_col: the column to predict; rows without a label (e.g. controls) are left out after alignment.
        unit_cols: columns naming one well (the unit that is never split).
        batch_col: per-batch alignment (skipped when absent from the table).
        control_col: boolean control column (when absent or all False, each batch is scaled on all its rows).
    """
    missing = [c for c in (label_col, *unit_cols) if c not in metadata.columns]
    if missing:
        available = sorted(c for c in metadata.columns if c.startswith(METADATA_PREFIX))
        raise ValueError(f"the embeddings have no column(s) {missing}; choose among {available}")
    features = np.asarray(features, dtype=np.float64)
    batches = metadata[batch_col].astype(str).to_numpy() if batch_col and batch_col in metadata.columns else None
    if control_col and control_col in metadata.columns and metadata[control_col].fillna(False).astype(bool).any():
        controls = metadata[control_col].fillna(False).astype(bool).to_numpy()
    else:
        controls = np.ones(len(metadata), dtype=bool)
    aligned = center_scale(features, controls, batches)
    keep = _labelled(metadata[label_col])
    return well_profiles(metadata.loc[keep], aligned[keep], unit_cols)


def _folds(groups: np.ndarray, units: np.ndarray, max_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    if len(np.unique(groups)) >= 2:
        return list(LeaveOneGroupOut().split(units, groups=groups))
    splitter = GroupKFold(n_splits=min(max_folds, len(np.unique(units))), shuffle=True, random_state=seed)
    return list(splitter.split(units, groups=units))


def probe_embeddings(
    table: pd.DataFrame,
    label_col: str,
    classifier: str = "logistic",
    unit_cols: Sequence[str] = ("Metadata_plate", "Metadata_well"),
    group_col: str | None = "Metadata_plate",
    batch_col: str | None = "Metadata_plate",
    control_col: str | None = "Metadata_is_control",
    regularization: float = 1.0,
    k: int = 5,
    max_folds: int = 5,
    seed: int = 0,
) -> dict:
    """Cross-validated accuracy of predicting ``label_col`` from the features of an embeddings table.

    Args:
        table: ``Metadata_*`` columns + numeric feature columns (``cellmae embed`` output).
        label_col: metadata column to predict (``Metadata_`` prefix optional).
        classifier: ``"logistic"`` (multinomial logistic regression, inverse L2 strength
            ``regularization``) or ``"knn"`` (cosine ``k``-nearest-neighbour vote).
        unit_cols: columns naming a well: fields of one well are averaged and never split.
        group_col: leave-one-group-out folds when it has at least two values (plates); otherwise up to
            ``max_folds`` folds over wells.
        batch_col, control_col: alignment on each batch's controls before averaging.
        seed: fold shuffling (well folds only).

    Returns:
        ``{"label", "classifier", "accuracy" (mean over folds), "accuracy_std", "folds": [{"held_out",
        "accuracy", "n_train", "n_test"}], "chance_uniform", "chance_majority", "n_units", "n_classes",
        "split", "confusion": {"classes", "matrix"}}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier={classifier!r} is not one of {CLASSIFIERS}")
    label_col = metadata_column(label_col)
    metadata, features = split_table(table)
    units, x = labelled_wells(metadata, features, label_col, unit_cols, batch_col, control_col)
    y = units[label_col].astype(str).to_numpy()
    classes = sorted(set(y))
    if len(classes) < 2:
        raise ValueError(f"{label_col} has {len(classes)} class(es) among labelled wells; a probe needs at least 2")
    unit_names = units[list(unit_cols)].astype(str).agg("/".join, axis=1).to_numpy()
    by_group = group_col is not None and group_col in units.columns and units[group_col].nunique() >= 2
    groups = units[group_col].astype(str).to_numpy() if by_group else unit_names
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    index = {c: i for i, c in enumerate(classes)}
    folds = []
    for train, test in _folds(groups if by_group else np.zeros(len(y)), unit_names, max_folds, seed):
        test = test[np.isin(y[test], y[train])]  # a class never seen in training cannot be predicted
        if len(test) == 0 or len(set(y[train])) < 2:
            continue
        scaler = StandardScaler().fit(x[train])
        x_train, x_test = scaler.transform(x[train]), scaler.transform(x[test])
        if classifier == "logistic":
            model = LogisticRegression(C=regularization, max_iter=2000)
        else:
            model = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine")
        predicted = model.fit(x_train, y[train]).predict(x_test)
        for truth, guess in zip(y[test], predicted):
            confusion[index[truth], index[guess]] += 1
        majority = pd.Series(y[train]).value_counts().idxmax()
        folds.append(
            {
                "held_out": sorted(set(groups[test])) if by_group else f"{len(test)} wells",
                "accuracy": float((predicted == y[test]).mean()),
                "n_train": int(len(train)),
                "n_test": int(len(test)),
                "majority_accuracy": float((y[test] == majority).mean()),
            }
        )
    if not folds:
        raise ValueError(f"no fold could be scored for {label_col}: each class needs wells on both sides of the split")
    accuracies = np.array([f["accuracy"] for f in folds])
    return {
        "label": label_col,
        "classifier": classifier,
        "accuracy": float(accuracies.mean()),
        "accuracy_std": float(accuracies.std()),
        "folds": folds,
        "chance_uniform": 1.0 / len(classes),
        "chance_majority": float(np.mean([f["majority_accuracy"] for f in folds])),
        "n_units": int(len(y)),
        "n_classes": len(classes),
        "split": (
            f"leave one {group_col.removeprefix(METADATA_PREFIX)} out"
            if by_group
            else f"{len(folds)} folds over wells"
        ),
        "confusion": {"classes": classes, "matrix": confusion.tolist()},
    }


def plot_probe(results: dict, path, title: str | None = None):
    """The probe's confusion matrix (rows: true class, columns: predicted), accuracy in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = results["confusion"]["classes"]
    matrix = np.array(results["confusion"]["matrix"], dtype=float)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        title
        or f"{results['classifier']} probe of {results['label'].removeprefix(METADATA_PREFIX)}: "
        f"{results['accuracy']:.2f} (chance {results['chance_uniform']:.2f})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
