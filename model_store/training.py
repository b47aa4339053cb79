"""Train the final softmax layer on cached bottlenecks, and evaluate it (retrain.py parity, Keras 3).

* :func:`assign_split`: a deterministic train / validation / test split by content hash, as
  retrain.py's ``which_set`` did (there: SHA-1 of the file name; here: the image's SHA-256, so a
  renamed file keeps its split). Adding images never moves an existing image, except the one
  image per small label that is moved so every label with enough images has at least one
  validation and one test image.
* :func:`train_head`: a Keras softmax classifier (optionally one hidden ReLU layer) on the
  bottlenecks, Adam, cross-entropy on logits, early stopping on validation loss.
* :func:`evaluate`: accuracy, per-label precision / recall / F1, confusion matrix, misclassified
  images.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model_store.labels import label_key

log = logging.getLogger(__name__)

TRAINING, VALIDATION, TESTING = "training", "validation", "testing"


@dataclass
class TrainConfig:
    """Retraining settings; names follow retrain.py's flags where one exists.

    The field names are also the ``[training]`` keys of the bot's config file
    (``bot.config.TrainingConfig.TRAIN_CONFIG_KEYS``) and the ``python -m bot retrain`` flags; the
    defaults below are the only ones (the config and the CLI take theirs from here).

    Attributes:
        epochs: passes over the training bottlenecks (upper bound; early stopping may end sooner).
        how_many_training_steps: retrain.py's step count; when set, overrides ``epochs`` as
            ``ceil(steps * train_batch_size / n_train_examples)``.
        learning_rate: Adam learning rate. Default 4e-3 with batch 256: the linear scaling rule
            (Goyal et al., "Accurate, Large Minibatch SGD", 2017) from 1e-3 at batch 64; measured
            on clothing-small: same test accuracy (0.904-0.916 vs 0.900-0.904), training about
            half as long (fewer steps per epoch).
        train_batch_size: bottlenecks per gradient step.
        validation_percentage / testing_percentage: share of images (0..100) per split.
        min_images_per_label: labels with fewer images are left out of training and named in the
            report (retrain.py warned below 20 and failed below 1; 2 makes one test + one train
            image possible, 5 gives each label a training, validation and test image).
        flip_left_right: augment with the cached bottlenecks of mirror images (retrain.py's
            ``--flip_left_right``, done on cached features so the cache stays useful).
        crop_fractions: centre crops the head is trained on (each a cached view) and whose
            softmax outputs are averaged at test and serving time (multi-crop evaluation as in
            Szegedy et al., "Going deeper with convolutions", 2014, reduced to two scales). The
            default (0.875, 1.0) was chosen by 5-fold cross-validation on clothing-small:
            0.894 mean accuracy vs 0.881 for the single 0.875 crop with mirror images; adding
            mirrors to the two crops gave 0.895 for twice the bottleneck time, so
            ``flip_left_right`` is off by default (see docs/accuracy.md). Re-measured on the
            EfficientNet-Lite1 default: 0.903 vs 0.886 for the single crop; mirrors, a third
            crop, an MLP head or one head per crop all within the seed-to-seed noise.
        hidden_units: 0 for retrain.py's single softmax layer, otherwise one ReLU layer first.
        dropout: dropout rate before each dense layer.
        label_smoothing: cross-entropy label smoothing.
        early_stopping_patience: epochs without validation-loss improvement before stopping.
        seed: random seed for weight initialisation and shuffling.
        accuracy_floor: a new version is promoted only with test accuracy >= this.
        max_accuracy_drop: ... and at most this much below the current model on the same images.
        keep_versions: model versions kept on disk (the current one always is).
        summaries_dir: TensorBoard log folder (retrain.py ``--summaries_dir``), or None.
        export_savedmodel / export_tflite: also write ``saved_model/`` and ``model.tflite``.
        print_misclassified_test_images: log every misclassified test image.
    """

    epochs: int = 60
    how_many_training_steps: int | None = None
    learning_rate: float = 4e-3
    train_batch_size: int = 256
    validation_percentage: float = 10.0
    testing_percentage: float = 10.0
    min_images_per_label: int = 5
    flip_left_right: bool = False
    crop_fractions: tuple[float, ...] = (0.875, 1.0)
    hidden_units: int = 0
    dropout: float = 0.2
    label_smoothing: float = 0.0
    early_stopping_patience: int = 10
    seed: int = 0
    accuracy_floor: float = 0.5
    max_accuracy_drop: float = 0.02
    keep_versions: int = 5
    summaries_dir: str | None = None
    export_savedmodel: bool = False
    export_tflite: bool = False
    print_misclassified_test_images: bool = False

    def to_dict(self) -> dict:
        """JSON-safe dict of every setting."""
        d = asdict(self)
        d["crop_fractions"] = list(self.crop_fractions)
        return d

    def eval_views(self) -> list[str]:
        """Cached views whose predictions are averaged at test / serving time (one per crop)."""
        from model_store.bottlenecks import view_name

        return [view_name(f) for f in self.crop_fractions]

    def train_views(self) -> list[str]:
        """Cached views the head is trained on: every crop, and its mirror image if flipping."""
        from model_store.bottlenecks import view_name

        flips = (False, True) if self.flip_left_right else (False,)
        return [view_name(f, flip) for f in self.crop_fractions for flip in flips]


def hash_percentage(sha256: str) -> float:
    """Position 0..100 of an image in the split, from its content hash.

    Args:
        sha256: 64 hex characters.

    Returns:
        float in [0, 100): the first 40 bits of the hash, scaled.
    """
    # 40 bits: the product below is exact in float64 and the division by 2**40 too, so the
    # result is strictly below 100.
    return int(sha256[:10], 16) * 100 / 16**10


def assign_split(
    items: Sequence[tuple[str, str]],
    *,
    validation_percentage: float,
    testing_percentage: float,
    min_images_per_label: int = 5,
) -> tuple[list[str], list[str]]:
    """Deterministic train / validation / test split by content hash.

    An image is ``testing`` when its :func:`hash_percentage` is below ``testing_percentage``,
    ``validation`` when below ``testing_percentage + validation_percentage``, else ``training``
    (retrain.py's ``which_set`` rule). Then, for each label with at least
    ``min_images_per_label`` images that still lacks a test (resp. validation) image, its
    training image with the smallest hash percentage is moved there. Labels below the minimum are
    excluded.

    Args:
        items: ``(sha256, label)`` per image.
        validation_percentage / testing_percentage: 0..100 each, summing below 100.
        min_images_per_label: smaller labels are excluded (split ``"excluded"``).

    Returns:
        ``(splits, excluded_labels)``: one of ``"training" | "validation" | "testing" |
        "excluded"`` per item, and the sorted excluded label names.

    Raises:
        ValueError: percentages out of range.
    """
    if not (0 <= validation_percentage < 100 and 0 <= testing_percentage < 100) or (
        validation_percentage + testing_percentage >= 100
    ):
        raise ValueError("validation and testing percentages must be in 0..100 and sum below 100")
    splits: list[str] = []
    by_label: dict[str, list[int]] = {}
    for i, (sha, label) in enumerate(items):
        p = hash_percentage(sha)
        splits.append(
            TESTING
            if p < testing_percentage
            else VALIDATION
            if p < testing_percentage + validation_percentage
            else TRAINING
        )
        by_label.setdefault(label, []).append(i)
    excluded = []
    for label, idx in by_label.items():
        if len(idx) < min_images_per_label:
            excluded.append(label)
            for i in idx:
                splits[i] = "excluded"
            continue
        # Every label needs a training image, then (with 2+ images) a test image, then (3+) a
        # validation image. A missing one is taken from the largest other split (training first),
        # the image with the smallest hash position, so the same image is picked on every run.
        for wanted in (TRAINING, TESTING, VALIDATION)[: min(3, len(idx))]:
            counts = Counter(splits[i] for i in idx)
            if counts[wanted]:
                continue
            donors = [s for s in (TRAINING, VALIDATION, TESTING) if s != wanted and counts[s] > 1]
            if not donors:
                continue
            donor = max(donors, key=lambda s: (s == TRAINING, counts[s]))
            pool = [i for i in idx if splits[i] == donor]
            splits[min(pool, key=lambda i: hash_percentage(items[i][0]))] = wanted
    return splits, sorted(excluded, key=label_key)


def _epochs_for(config: TrainConfig, n_train: int) -> int:
    if config.how_many_training_steps:
        return max(1, math.ceil(config.how_many_training_steps * config.train_batch_size / max(1, n_train)))
    return config.epochs


def build_head(feature_dim: int, num_labels: int, config: TrainConfig):
    """The trainable final layers: bottleneck ``(N, D)`` float32 -> logits ``(N, num_labels)``.

    Softmax is applied outside (in the inference model), so the head outputs logits.
    """
    import keras

    inp = keras.Input((feature_dim,), dtype="float32", name="bottleneck")
    x = inp
    if config.hidden_units:
        if config.dropout:
            x = keras.layers.Dropout(config.dropout, name="dropout_in")(x)
        x = keras.layers.Dense(config.hidden_units, activation="relu", name="hidden")(x)
    if config.dropout:
        x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    logits = keras.layers.Dense(num_labels, name="logits")(x)
    return keras.Model(inp, logits, name="head")


def train_head(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_labels: int,
    config: TrainConfig,
    *,
    on_epoch: Callable[[int, int], None] | None = None,
    log_dir: Path | None = None,
):
    """Train the softmax head on bottlenecks.

    Args:
        train_x: float32 ``(N, D)`` training bottlenecks (augmented views already included).
        train_y: int ``(N,)`` label indices.
        val_x / val_y: validation bottlenecks ``(M, D)`` and labels ``(M,)``; M may be 0, in which
            case early stopping watches the training loss.
        num_labels: number of classes.
        config: :class:`TrainConfig`.
        on_epoch: called as ``on_epoch(epoch_done, epochs)``.
        log_dir: TensorBoard summaries folder, or None.

    Returns:
        ``(head, history)``: the trained ``keras.Model`` (bottleneck -> logits) with the weights of
        its best epoch, and the Keras history dict (loss, accuracy, val_loss, val_accuracy).
    """
    import keras

    keras.utils.set_random_seed(config.seed)
    head = build_head(train_x.shape[1], num_labels, config)
    head.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    epochs = _epochs_for(config, len(train_x))
    has_val = len(val_x) > 0
    callbacks: list = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss" if has_val else "loss",
            patience=config.early_stopping_patience,
            restore_best_weights=True,
        )
    ]
    if on_epoch:
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: on_epoch(e + 1, epochs)))
    if log_dir is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False))
    history = head.fit(
        train_x,
        train_y,
        validation_data=(val_x, val_y) if has_val else None,
        epochs=epochs,
        batch_size=config.train_batch_size,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
    )
    return head, {k: [float(v) for v in vs] for k, vs in history.history.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float logits ``(N, C)`` -> probabilities ``(N, C)`` float32."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


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
    for i in np.nonzero(pred != y_true)[0]:
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
    not run it as a formula. Written with ``registry.write_atomic`` (temp file, fsync, rename).

    Returns:
        ``path``.
    """
    import csv
    import io

    from model_store.registry import write_atomic

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
    import os
    import tempfile

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
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
            os.close(fd)
            try:
                fig.savefig(tmp, format="png")
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        finally:
            plt.close(fig)
    return path
