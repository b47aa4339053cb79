"""Scoring a trained head on the test split: accuracy, per-label precision / recall / F1, the
confusion matrix, and its plot (PNG) and CSV.

Precision, recall and F1 as scikit-learn's ``classification_report`` (``zero_division=0``); the
confusion matrix as ``sklearn.metrics.confusion_matrix`` (rows: true label, columns: predicted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model_store.fs import atomic_path, write_atomic

__all__ = [
    "PLOT_LABEL_CHARS",
    "PLOT_MAX_LABELS",
    "Evaluation",
    "evaluate",
    "most_confused",
    "plot_confusion_matrix",
    "write_confusion_csv",
]


@dataclass
class Evaluation:
    """Test-split results.

    Attributes:
        accuracy: share of test images whose top-1 label is right (0..1).
        per_label: ``{label: {"precision", "recall", "f1", "support"}}``.
        confusion_matrix: ``matrix[true][predicted]`` counts, rows/cols in ``labels`` order.
        labels: class names in index order.
        misclassified: ``[{"sha256", "path", "label", "predicted", "probability"}]``.
        count: number of test images.
    """

    accuracy: float
    per_label: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    labels: list[str]
    misclassified: list[dict] = field(default_factory=list)
    count: int = 0

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return asdict(self)


def evaluate(
    probabilities: np.ndarray,
    y_true: np.ndarray,
    labels: Sequence[str],
    *,
    sha256s: Sequence[str] = (),
    paths: Sequence[str] = (),
) -> Evaluation:
    """Score predictions against true labels.

    Args:
        probabilities: float ``(N, C)`` class probabilities (or logits; only argmax is used,
            plus the top probability for the misclassified list).
        y_true: int ``(N,)`` true label indices.
        labels: C class names in index order.
        sha256s / paths: per-image identifiers for the misclassified list (optional).

    Returns:
        :class:`Evaluation`. Precision of a label never predicted is 0 (as scikit-learn's
        ``zero_division=0``).
    """
    n, c = len(y_true), len(labels)
    pred = probabilities.argmax(axis=1) if n else np.zeros(0, int)
    cm = np.zeros((c, c), dtype=int)
    for t, p in zip(y_true, pred, strict=True):
        cm[int(t), int(p)] += 1
    per_label = {}
    for k, name in enumerate(labels):
        tp = int(cm[k, k])
        predicted, support = int(cm[:, k].sum()), int(cm[k, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    mis = []
    for i in np.nonzero(pred != y_true)[0].tolist():
        mis.append(
            {
                "sha256": sha256s[i] if len(sha256s) else None,
                "path": str(paths[i]) if len(paths) else None,
                "label": labels[int(y_true[i])],
                "predicted": labels[int(pred[i])],
                "probability": float(probabilities[i, pred[i]]),
            }
        )
    acc = float((pred == y_true).mean()) if n else 0.0
    return Evaluation(acc, per_label, cm.tolist(), list(labels), mis, n)


#: Largest number of labels drawn as a full confusion matrix; above it the plot shows the
#: labels most involved in confusions and the full matrix goes to a CSV file next to the PNG.
PLOT_MAX_LABELS = 30
#: Tick labels longer than this are shortened with "…" (the layout stays readable).
PLOT_LABEL_CHARS = 28


def _short(label: str) -> str:
    label = " ".join(label.split())  # newlines, tabs
    return label if len(label) <= PLOT_LABEL_CHARS else label[: PLOT_LABEL_CHARS - 1] + "…"


def most_confused(matrix: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` labels most involved in confusions, in label order.

    A label's score is the number of its test images predicted as another label plus the number
    of other labels' images predicted as it (the off-diagonal sums of its row and column); ties
    keep the lower index.

    Args:
        matrix: ``(C, C)`` integer counts, ``matrix[true][predicted]``.
        k: how many to keep (all if ``k >= C``).

    Returns:
        Sorted list of at most ``k`` indices.
    """
    off = matrix - np.diag(np.diag(matrix))
    score = off.sum(axis=0) + off.sum(axis=1)
    order = np.argsort(-score, kind="stable")[: max(0, k)]
    return sorted(int(i) for i in order)


def write_confusion_csv(evaluation: Evaluation, path: Path) -> Path:
    """Write the full confusion matrix as CSV (first row and column: the labels; rows: true label).

    Labels are written as they are (the csv module quotes commas, quotes and newlines); a label
    starting with ``=``, ``+``, ``-`` or ``@`` gets a leading apostrophe so that spreadsheets do
    not run it as a formula. Written with ``fs.write_atomic`` (temp file, fsync, rename).

    Returns:
        ``path``.
    """
    import csv
    import io

    def cell(label: str) -> str:
        return "'" + label if label[:1] in ("=", "+", "-", "@") else label

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true \\ predicted", *(cell(lb) for lb in evaluation.labels)])
    for label, row in zip(evaluation.labels, evaluation.confusion_matrix, strict=True):
        writer.writerow([cell(label), *row])
    write_atomic(path, buf.getvalue().encode("utf-8"))
    return path


def plot_confusion_matrix(evaluation: Evaluation, path: Path, *, title: str = "") -> Path:
    """Write the confusion matrix (row-normalised colours, counts in the cells) as a PNG.

    Labels and the title are drawn as plain text (matplotlib's mathtext and TeX are off, so a
    label such as ``price $5_$10`` is shown as typed, never parsed). The figure size is bounded
    whatever the number of labels: up to :data:`PLOT_MAX_LABELS` labels the full matrix is drawn
    (at most ~2000x1800 px); with more, only the :data:`PLOT_MAX_LABELS` labels most involved in
    confusions (:func:`most_confused`) are drawn, and the full matrix is written next to the
    PNG as ``<name>.csv`` (:func:`write_confusion_csv`). Long labels are shortened to
    :data:`PLOT_LABEL_CHARS` characters.

    Args:
        evaluation: from :func:`evaluate`.
        path: output file (``.png``); written temp-file-then-rename.
        title: plot title (e.g. the version and accuracy).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(evaluation.confusion_matrix, dtype=np.int64).reshape(len(evaluation.labels), -1)
    labels = list(evaluation.labels)
    subset = len(labels) > PLOT_MAX_LABELS
    if subset:
        keep = most_confused(cm, PLOT_MAX_LABELS)
        write_confusion_csv(evaluation, path.with_suffix(".csv"))
    else:
        keep = list(range(len(labels)))
    norm_full = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    shown = cm[np.ix_(keep, keep)]
    norm = norm_full[np.ix_(keep, keep)]
    names = [_short(labels[i]) for i in keep]
    n = len(keep)
    heading = title or f"test accuracy {evaluation.accuracy:.1%} on {evaluation.count} images"
    if subset:
        heading += f"\n{n} of {len(labels)} labels (most confused); full matrix: {path.with_suffix('.csv').name}"
    size = min(20.0, max(4.0, 0.55 * n + 3.5))
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
        try:
            ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(n), names, rotation=45, ha="right")
            ax.set_yticks(range(n), names)
            ax.set_xlabel("predicted label")
            ax.set_ylabel("true label")
            for i in range(n):
                for j in range(n):
                    if shown[i, j]:
                        ax.text(
                            j,
                            i,
                            str(shown[i, j]),
                            ha="center",
                            va="center",
                            color="white" if norm[i, j] > 0.5 else "black",
                            fontsize=8,
                        )
            ax.set_title(heading, fontsize=10)
            fig.tight_layout()
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, format="png")
        finally:
            plt.close(fig)
    return path
