"""Evaluation and gate stages of a retraining run: score the new head on the test split, compare
it with the serving model on the same images, decide.

See :mod:`model_store.stages` for the order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from model_store.backbones import Backbone
from model_store.bottlenecks import PREPROCESSING_MODE
from model_store.errors import LabelgramError
from model_store.evaluation import Evaluation, evaluate
from model_store.images import decode_image
from model_store.labels import label_key
from model_store.openset import OpenSet
from model_store.preprocessing import to_model_input
from model_store.stages.data import Bottlenecks, Split
from model_store.training import TrainConfig, softmax
from model_store.workspace import Workspace

log = logging.getLogger(__name__)


def predict(head, feats: np.ndarray) -> np.ndarray:
    """Mean softmax of ``head`` over views: feats ``(N, V, D)`` -> probabilities ``(N, C)`` float32."""
    if len(feats) == 0:
        return np.zeros((0, head.output_shape[-1]), np.float32)
    return np.mean(
        [softmax(np.asarray(head(feats[:, v], training=False))) for v in range(feats.shape[1])], axis=0
    )


def gate_against_current(
    ws: Workspace,
    backbone: Backbone,
    test_feats: np.ndarray,
    test_records: list,
    new_probs: np.ndarray,
    labels: list[str],
) -> dict | None:
    """Accuracy of the serving model and of the new one on the same test images.

    Only test images whose label the serving model knows are compared. Uses the serving version's
    head on the cached bottlenecks ``test_feats`` (N, V, D), averaged over the V eval crops, when the
    backbone is the same; else its full model on the 0.875 centre crop.

    Test images that can no longer be read (deleted by ``/delete`` while the training ran) are
    left out of the comparison; ``missing_images`` says how many.

    Returns:
        ``{"version", "images", "missing_images", "current_accuracy", "new_accuracy"}`` or None
        without a serving model.
    """
    current = ws.registry.current()
    if current is None:
        return None
    import keras

    cur_labels = current.labels
    cur_keys = [label_key(x) for x in cur_labels]
    keep = [i for i, r in enumerate(test_records) if label_key(r.label) in cur_keys]
    if not keep:
        return {"version": current.name, "images": 0, "current_accuracy": None, "new_accuracy": None}
    missing = 0
    same_backbone = current.metrics.get("backbone", {}).get("id") == backbone.id
    if same_backbone and (current.path / "head.keras").exists():
        head = keras.models.load_model(current.path / "head.keras", compile=False)
        cur_pred = predict(head, test_feats[keep]).argmax(1)
    else:
        model = keras.models.load_model(current.model_path, compile=False)
        size = (int(model.input_shape[1]), int(model.input_shape[2]))
        inputs, readable = [], []
        for i in keep:
            try:  # a /delete or /rename during the training removes test images under our feet
                data = test_records[i].path.read_bytes()
                inputs.append(to_model_input(decode_image(data), size, mode=PREPROCESSING_MODE))
                readable.append(i)
            except (OSError, LabelgramError) as exc:
                log.debug("gate: test image %s skipped: %s", test_records[i].path.name, exc)
        missing = len(keep) - len(readable)
        if missing:
            log.warning(
                "gate: %d of %d test images could not be read (deleted during the training?); "
                "comparing on the other %d",
                missing,
                len(keep),
                len(readable),
            )
        keep = readable
        if not keep:
            return {
                "version": current.name,
                "images": 0,
                "missing_images": missing,
                "current_accuracy": None,
                "new_accuracy": None,
            }
        x = np.stack(inputs)
        cur_pred = np.concatenate(
            [np.asarray(model(x[j : j + 32], training=False)) for j in range(0, len(x), 32)]
        ).argmax(1)
    truth = [label_key(test_records[i].label) for i in keep]
    cur_acc = float(np.mean([cur_keys[p] == t for p, t in zip(cur_pred, truth, strict=True)]))
    new_keys = [label_key(x) for x in labels]
    new_acc = float(
        np.mean([new_keys[p] == t for p, t in zip(new_probs[keep].argmax(1), truth, strict=True)])
    )
    return {
        "version": current.name,
        "images": len(keep),
        "missing_images": missing,
        "current_accuracy": cur_acc,
        "new_accuracy": new_acc,
    }


@dataclass(frozen=True)
class Evaluated:
    """The new head on the test split, and the serving model on the same images.

    Attributes:
        evaluation: ``evaluation.evaluate`` on the test split.
        validation_accuracy: accuracy on the validation split (None without one).
        comparison: ``gate_against_current`` (None without a serving model).
        open_set: the "none of my labels" scorer fitted on the training photos and calibrated on
            the validation split (:func:`fit_open_set`; None when it could not be calibrated).
        open_set_metrics: its figures for ``metrics["open_set"]`` (:func:`fit_open_set`).
    """

    evaluation: Evaluation
    validation_accuracy: float | None
    comparison: dict | None
    open_set: OpenSet | None = None
    open_set_metrics: dict | None = None


def head_weights(head) -> tuple[np.ndarray, np.ndarray] | None:
    """``(kernel (D, C), bias (C,))`` of a linear head's logits layer (``training.build_head`` with
    no hidden layer: dropout is the identity when serving), or None for a head with a hidden layer."""
    if any(layer.name == "hidden" for layer in head.layers):
        return None
    kernel, bias = head.get_layer("logits").get_weights()
    return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)


def fit_open_set(bn: Bottlenecks, split: Split, head=None) -> tuple[OpenSet | None, dict]:
    """Fit the open-set scorer on the training photos' eval views, calibrate its thresholds on the
    validation split (:data:`model_store.openset.PASS_RATE` pass; with fewer than
    ``MIN_CALIBRATION_IMAGES`` validation photos, ``openset.fit_calibrated``'s small-store rule)
    and count the test photos it rejects.

    With a linear ``head`` the scorer is the served combination (``openset.METHOD``: kNN distance
    and max-softmax); without one, or with a hidden layer, the kNN distance alone.
    Without any photo to calibrate on, returns ``(None, {"method": None, "reason": ...})`` and the
    version serves without the unknown-photo check.

    Returns:
        ``(scorer, metrics)``; metrics: ``method``, ``k``, ``threshold``, ``pass_rate``,
        ``knn_threshold`` and ``msp_threshold`` (combined method), ``calibration`` (what it was
        calibrated on), ``calibration_images``, ``validation_images``, ``validation_passed``,
        ``test_images``, ``test_rejected``, ``test_rejected_share``, ``bank_images`` and later
        (``stages.version``) ``file_bytes``.
    """
    from model_store.openset import fit_calibrated

    feats = bn.feats[:, bn.eval_idx]
    weights = head_weights(head) if head is not None else None
    try:
        scorer, calibration, n_calibration = fit_calibrated(
            feats[split.train], bn.y[split.train], feats[split.val], head_weights=weights
        )
    except ValueError as exc:
        return None, {"method": None, "reason": str(exc)}
    val_unknown = scorer.is_unknown(scorer.score(feats[split.val]))
    test_unknown = scorer.is_unknown(scorer.score(feats[split.test]))
    n_test = int(split.test.sum())
    extra = {}
    if weights is not None:
        msp_threshold = scorer.msp_threshold
        # infinite when there was no validation photo to calibrate the softmax part on (not used)
        extra = {"knn_threshold": scorer.knn_threshold,
                 "msp_threshold": None if msp_threshold is None or np.isinf(msp_threshold) else msp_threshold}
    return scorer, {
        "method": scorer.method,
        "k": scorer.k,
        "threshold": scorer.threshold,
        "pass_rate": scorer.pass_rate,
        **extra,
        "calibration": calibration,
        "calibration_images": n_calibration,
        "validation_images": int(split.val.sum()),
        "validation_passed": int((~val_unknown).sum()),
        "test_images": n_test,
        "test_rejected": int(test_unknown.sum()),
        "test_rejected_share": float(test_unknown.mean()) if n_test else 0.0,
        "bank_images": len(scorer.bank),
    }


def evaluate_head(
    ws: Workspace,
    backbone: Backbone,
    config: TrainConfig,
    bn: Bottlenecks,
    split: Split,
    head,
    labels: list[str],
) -> Evaluated:
    """Evaluate the head on the test split (mean softmax over the eval views) and compare it with
    the serving model on the same test images."""
    feats, y, eval_idx = bn.feats, bn.y, bn.eval_idx
    test_recs = [r for r, m in zip(bn.records, split.test, strict=True) if m]
    test_probs = predict(head, feats[split.test][:, eval_idx])
    ev = evaluate(
        test_probs,
        y[split.test],
        labels,
        sha256s=[r.sha256 for r in test_recs],
        paths=[str(r.path) for r in test_recs],
    )
    val_acc = None
    if split.val.any():
        val_acc = float((predict(head, feats[split.val][:, eval_idx]).argmax(1) == y[split.val]).mean())
    if config.print_misclassified_test_images:
        for m in ev.misclassified:
            log.info(
                "misclassified test image %s: %s -> %s (%.2f)",
                m["path"],
                m["label"],
                m["predicted"],
                m["probability"],
            )
    comparison = gate_against_current(ws, backbone, feats[split.test][:, eval_idx], test_recs, test_probs, labels)
    open_set, open_set_metrics = fit_open_set(bn, split, head)
    return Evaluated(ev, val_acc, comparison, open_set, open_set_metrics)


@dataclass(frozen=True)
class Gate:
    """The gate's decision: ``passed``, else the ``reasons`` (human phrases) it refused."""

    passed: bool
    reasons: list[str]


def decide_gate(config: TrainConfig, evaluated: Evaluated) -> Gate:
    """Accuracy floor, and no larger drop than ``max_accuracy_drop`` below the serving model."""
    ev, comparison = evaluated.evaluation, evaluated.comparison
    reasons = []
    if ev.accuracy < config.accuracy_floor:
        reasons.append(f"test accuracy {ev.accuracy:.1%} is below the floor of {config.accuracy_floor:.1%}")
    if comparison and comparison["current_accuracy"] is not None:
        drop = comparison["current_accuracy"] - comparison["new_accuracy"]
        if drop > config.max_accuracy_drop:
            reasons.append(
                f"on the same {comparison['images']} test images it scores {comparison['new_accuracy']:.1%}, "
                f"{drop:.1%} below the serving model's {comparison['current_accuracy']:.1%} "
                f"(allowed drop {config.max_accuracy_drop:.1%})"
            )
    return Gate(not reasons, reasons)
