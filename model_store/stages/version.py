"""Version stages of a retraining run: write the version folder (model, head, labels, metrics,
confusion matrix, optional exports), then promote it or refuse it.

See :mod:`model_store.stages` for the order.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from model_store.backbones import Backbone
from model_store.bottlenecks import PREPROCESSING_MODE, BottleneckCache
from model_store.contract import TrainingStatus
from model_store.engine import EngineSettings, copy_cache, inference_function
from model_store.errors import TrainingError
from model_store.evaluation import Evaluation, plot_confusion_matrix
from model_store.openset import OpenSet
from model_store.registry import ModelVersion
from model_store.serving import BACKBONE_CACHE_NAME
from model_store.stages.data import Bottlenecks, Snapshot, Split, Trained
from model_store.stages.gate import Evaluated, Gate
from model_store.training import TrainConfig
from model_store.workspace import Workspace

log = logging.getLogger(__name__)


def build_inference_model(backbone: Backbone, head):
    """Backbone + head + softmax as one Keras model.

    Returns:
        ``keras.Model``: float32 ``(N, h, w, 3)`` RGB 0..255 -> float32 ``(N, C)`` probabilities.
    """
    import keras

    h, w = backbone.input_size
    inp = keras.Input((h, w, 3), dtype="float32", name="rgb_0_255")
    feats = backbone.model(inp, training=False)
    probs = keras.layers.Softmax(name="probabilities")(head(feats))
    return keras.Model(inp, probs, name="labelgram_classifier")


#: extra room kept free beyond the estimated size of the files a training writes
_OUTPUT_SLACK_BYTES = 16 * 1024 * 1024


def check_output_space(ws: Workspace, backbone: Backbone, config: TrainConfig) -> None:
    """Refuse to start writing a version when the disk cannot hold it.

    The estimate: the model file holds the backbone's float32 weights (4 bytes per parameter) plus
    the head, once more for a SavedModel and once more for a TFLite export, plus 16 MB of slack and
    the store's free-space floor (``ImageStore.min_free_bytes``).

    Raises:
        TrainingError: not enough free space (the message gives the figures).
    """
    try:
        params = int(backbone.model.count_params())
    except Exception:  # a backbone without a Keras model: fall back to the current version's size
        params = 0
    copies = 1 + int(bool(config.export_savedmodel)) + int(bool(config.export_tflite))
    need = copies * params * 4 + _OUTPUT_SLACK_BYTES + int(getattr(ws.store, "min_free_bytes", 0))
    free = shutil.disk_usage(ws.registry.root).free
    if free < need:
        log.error("not enough disk space to write a model version: %d bytes free, %d needed", free, need)
        raise TrainingError(
            f"Not enough free disk space to save the new model: {free / 1e6:.0f} MB free, about "
            f"{need / 1e6:.0f} MB needed. Free some space on the store's disk and train again; the "
            "current model keeps serving."
        )


def version_metrics(
    name: str,
    backbone: Backbone,
    config: TrainConfig,
    snap: Snapshot,
    bn: Bottlenecks,
    split: Split,
    trained: Trained,
    evaluated: Evaluated,
    gate: Gate,
    timings: dict[str, float],
) -> dict:
    """The version's ``metrics.json`` content (``timings`` is the caller's dict, filled until written)."""
    ev, y, labels = evaluated.evaluation, bn.y, snap.labels
    counts = {x: int((y[split.train | split.val | split.test] == n).sum()) for n, x in enumerate(labels)}
    return {
        "version": name,
        "created_at": time.time(),
        "accuracy": ev.accuracy,
        "validation_accuracy": evaluated.validation_accuracy,
        "test_images": ev.count,
        "train_images": int(split.train.sum()),
        "validation_images": int(split.val.sum()),
        "images_per_label": counts,
        "labels": labels,
        "per_label": ev.per_label,
        "confusion_matrix": ev.confusion_matrix,
        "misclassified": ev.misclassified,
        "excluded_labels": snap.excluded,
        "skipped_images": bn.skipped,
        "store_fingerprint": snap.fingerprint,
        "backbone": {
            "id": backbone.id,
            "name": backbone.name,
            "input_size": list(backbone.input_size),
            "feature_dim": backbone.feature_dim,
        },
        "engine": {"bottlenecks": backbone.engine.description if backbone.engine else None},
        "preprocessing": {
            "mode": PREPROCESSING_MODE,
            "crop_fractions": list(config.crop_fractions),
            "input": "float32 RGB 0..255",
            "combine": "mean of the softmax outputs over the crops",
        },
        "config": config.to_dict(),
        "history": trained.history,
        "epochs_run": len(trained.history.get("loss", [])),
        "bottleneck_cache": bn.cache_stats,
        "gate": {"passed": gate.passed, "reasons": gate.reasons, "comparison": evaluated.comparison},
        "open_set": dict(evaluated.open_set_metrics or {"method": None}),
        "timings": timings,
    }


def write_version(
    ws: Workspace,
    backbone: Backbone,
    config: TrainConfig,
    engine: EngineSettings,
    cache: BottleneckCache,
    head,
    evaluation: Evaluation,
    labels: list[str],
    metrics_for: Callable[[str], dict],
    timings: dict[str, float],
    t0: float,
    open_set: OpenSet | None = None,
) -> tuple[ModelVersion, dict]:
    """Write a new version folder (temp name, renamed when complete; see ``registry.commit``).

    ``metrics_for(name)`` builds its metrics; the serving engine and the saving / total timings
    are added before ``metrics.json`` is written last. ``open_set`` (``stages.gate.fit_open_set``)
    is saved as ``openset.npz`` (``model_store.openset``), its size in ``metrics["open_set"]["file_bytes"]``.

    Returns:
        The committed version and its metrics.

    Raises:
        TrainingError: not enough disk space (checked again before writing).
    """
    t = time.perf_counter()
    check_output_space(ws, backbone, config)
    name, tmp = ws.registry.new_version_dir()
    try:
        metrics = metrics_for(name)
        head.save(tmp / "head.keras")
        build_inference_model(backbone, head).save(tmp / "model.keras")
        metrics["engine"]["serving"] = serving_engine(backbone, cache, engine, tmp)
        (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        if open_set is not None:
            metrics.setdefault("open_set", {})["file_bytes"] = open_set.save(tmp)
        plot_confusion_matrix(
            evaluation,
            tmp / "confusion_matrix.png",
            title=f"{name}: test accuracy {evaluation.accuracy:.1%} ({evaluation.count} images)",
        )
        if config.export_savedmodel:
            build_inference_model(backbone, head).export(str(tmp / "saved_model"), verbose=False)
        if config.export_tflite:
            export_tflite(backbone, head, tmp / "model.tflite")
        timings["saving_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False), encoding="utf-8")
        version = ws.registry.commit(name, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version, metrics


def promote_or_refuse(
    ws: Workspace, version: ModelVersion, gate: Gate, evaluation: Evaluation, snap: Snapshot, config: TrainConfig
) -> tuple[TrainingStatus, str]:
    """Promote the version if the gate passed. Returns ``(status, message)`` for the report."""
    name = version.name
    if gate.passed:
        ws.registry.promote(version)
        status = TrainingStatus.PROMOTED
        message = (
            f"New model {name} is serving: test accuracy {evaluation.accuracy:.1%} on {evaluation.count} images, "
            f"{len(snap.labels)} labels."
        )
    else:
        status = TrainingStatus.REFUSED
        message = f"New model {name} was not promoted: {'; '.join(gate.reasons)}. The current model keeps serving."
    if snap.excluded:
        message += (
            f" Left out for having fewer than {config.min_images_per_label} images: {', '.join(snap.excluded)}."
        )
    return status, message


def serving_engine(backbone: Backbone, cache: BottleneckCache, engine: EngineSettings, version_dir: Path) -> str:
    """Give the new version its backbone's LiteRT conversion (a copy, ``serving.BACKBONE_CACHE_NAME``).

    No conversion is spent here when the backbone's is cached (the bottleneck step converted it
    once per backbone); the serving path runs it with the version's head. Without a copy (the
    TensorFlow engine, a backbone LiteRT cannot run, an unwritable cache) the bot falls back to
    converting ``model.keras`` itself, once.

    Returns:
        The engine's description for the metrics and the report.
    """
    if engine.engine != "litert":
        return "TensorFlow"
    if backbone.engine is None:
        backbone.use_engine(engine, cache_dir=cache.dir)
    frozen = backbone.engine
    assert frozen is not None  # use_engine set it
    record = getattr(frozen, "cache_record", None)
    if record is not None:
        try:
            copy_cache(record, version_dir, BACKBONE_CACHE_NAME)
        except OSError as exc:
            log.warning("could not copy the backbone's LiteRT model into the version: %s", exc)
    return frozen.description


def export_tflite(backbone: Backbone, head, path: Path) -> None:
    """Convert the inference model to TFLite (float32) at ``path``."""
    import tensorflow as tf

    model = build_inference_model(backbone, head)
    h, w = backbone.input_size
    fn = inference_function(model, [1, h, w, 3])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    path.write_bytes(converter.convert())
