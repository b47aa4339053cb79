"""One retraining run, end to end (retrain.py's main(), as a library call).

snapshot the labelled images -> compute only the missing bottlenecks -> hash split -> train the
softmax head -> evaluate on the test split -> write a new version (model, labels, metrics, confusion
matrix PNG) -> gate (accuracy floor; not worse than the serving model on the same test images) ->
promote atomically -> prune old versions and the bottlenecks of images no longer stored.

A crash anywhere before the promotion leaves the serving model untouched; a crash during it leaves
either the old or the new pointer (see ``registry``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from model_store.backbones import Backbone, load_backbone
from model_store.bottlenecks import PREPROCESSING_MODE, BottleneckCache
from model_store.classifier import BACKBONE_CACHE_NAME
from model_store.contract import RetrainReport
from model_store.dataset import DISK_FULL_ERRNOS
from model_store.engine import EngineSettings, copy_cache
from model_store.errors import LabelgramError, TrainingError
from model_store.images import decode_image, to_model_input
from model_store.labels import label_key
from model_store.training import (
    TESTING,
    TRAINING,
    VALIDATION,
    TrainConfig,
    assign_split,
    evaluate,
    plot_confusion_matrix,
    softmax,
    train_head,
)
from model_store.workspace import Workspace

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)``; stage is one of "bottlenecks", "training", "evaluating", "saving".
Progress = Callable[[str, int, int], None]


def _predict(head, feats: np.ndarray) -> np.ndarray:
    """Mean softmax of ``head`` over views: feats ``(N, V, D)`` -> probabilities ``(N, C)`` float32."""
    if len(feats) == 0:
        return np.zeros((0, head.output_shape[-1]), np.float32)
    return np.mean(
        [softmax(np.asarray(head(feats[:, v], training=False))) for v in range(feats.shape[1])], axis=0
    )


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


def _gate_against_current(
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
        cur_pred = _predict(head, test_feats[keep]).argmax(1)
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


def retrain(
    ws: Workspace,
    config: TrainConfig | None = None,
    *,
    backbone: Backbone | str | None = None,
    weights: str | None = "imagenet",
    progress: Progress | None = None,
    engine: EngineSettings | None = None,
) -> RetrainReport:
    """Retrain the final layer on the workspace's labelled images and promote it if it is good enough.

    Args:
        ws: the store folder.
        config: training settings (defaults: :class:`TrainConfig`).
        backbone: a loaded :class:`Backbone`, a spec for ``load_backbone`` or None for the default.
        weights: weights for a keras.applications backbone spec (see ``load_backbone``).
        progress: ``progress(stage, done, total)`` callback.
        engine: how the frozen backbone runs for the bottlenecks; on LiteRT the new version also
            gets a copy of the backbone's conversion for serving (``engine.EngineSettings``;
            default LiteRT, all cores).

    Returns:
        :class:`RetrainReport`. Expected failures (too few labels or images, a backbone that cannot be
        loaded) come back as ``status="failed"`` with a message rather than an exception.
    """
    config = config or TrainConfig()
    try:
        _check_config(config)
        with training_lock(ws):
            return _retrain(ws, config, backbone, weights, progress, engine or EngineSettings())
    except LabelgramError as exc:
        log.warning("retrain failed: %s", exc.message)
        return RetrainReport("failed", exc.message)
    except Exception as exc:  # ENOSPC, also wrapped (h5py, TensorFlow): not a crash
        if not is_disk_full(exc):
            raise
        log.error("retrain failed: the disk is full (%s)", exc)
        return RetrainReport("failed", DISK_FULL_MESSAGE)


DISK_FULL_MESSAGE = (
    "The training stopped because the disk is full (no space left to write its files). Free some "
    "space on the store's disk and train again; the current model keeps serving."
)


# TensorFlow's file system (SavedModel export, tf.io.gfile) turns ENOSPC into a
# ResourceExhaustedError whose message ends in "<path>; No space left on device" (no errno).
_DISK_FULL_TEXTS = tuple(os.strerror(e) for e in sorted(DISK_FULL_ERRNOS))


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is ENOSPC / EDQUOT.

    An ``OSError`` by its errno; any other exception (TensorFlow's ``ResourceExhaustedError``
    when ``Model.export`` fills the disk) by the C library's text for those errors in its message.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if not (isinstance(current, OSError) and current.errno is not None):
            if any(text in str(current) for text in _DISK_FULL_TEXTS):
                return True
        current = current.__cause__ or current.__context__
    return False


#: extra room kept free beyond the estimated size of the files a training writes
_OUTPUT_SLACK_BYTES = 16 * 1024 * 1024


def _check_output_space(ws: Workspace, backbone: Backbone, config: TrainConfig) -> None:
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


def _check_config(config: TrainConfig) -> None:
    """Refuse impossible settings before any work (raises TrainingError naming the setting)."""
    v, t = config.validation_percentage, config.testing_percentage
    if not (0 <= v < 100 and 0 <= t < 100 and v + t < 100):
        raise TrainingError(
            f"validation_percentage ({v:g}) and testing_percentage ({t:g}) must each be in 0..100 "
            "and add up to less than 100."
        )
    if not config.crop_fractions or not all(0 < f <= 1 for f in config.crop_fractions):
        raise TrainingError("crop_fractions must be one or more numbers in (0, 1].")
    if config.train_batch_size < 1 or config.epochs < 1 or config.learning_rate <= 0:
        raise TrainingError("train_batch_size and epochs must be at least 1 and learning_rate above 0.")


@contextlib.contextmanager
def training_lock(ws: Workspace) -> Iterator[None]:
    """Hold the store's training lock (``<store>/.train.lock``, fcntl.flock) for one run.

    One training per store at a time, across processes (the bot's scheduler, ``/retrain`` and a
    CLI run): ``prune`` deletes unfinished version folders, which is only safe while no other run
    writes one.

    Raises:
        TrainingError: another process holds the lock.
    """
    path = ws.root / ".train.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(
                "Another training is already running on this store; try again when it has finished."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _retrain(
    ws: Workspace,
    config: TrainConfig,
    backbone: Backbone | str | None,
    weights: str | None,
    progress: Progress | None,
    engine: EngineSettings,
) -> RetrainReport:
    """The body of :func:`retrain`, run under the training lock with a checked config."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def step(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)

    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone, weights=weights)
    _check_output_space(ws, backbone, config)  # before hours of work, and again before writing
    records = ws.store.snapshot()
    fingerprint = ws.store.fingerprint_of(records)
    splits, excluded = assign_split(
        [(r.sha256, r.label) for r in records],
        validation_percentage=config.validation_percentage,
        testing_percentage=config.testing_percentage,
        min_images_per_label=config.min_images_per_label,
    )
    used = [i for i, s in enumerate(splits) if s != "excluded"]
    labels = sorted({records[i].label for i in used}, key=label_key)
    if len(labels) < 2:
        raise TrainingError(
            f"I need at least 2 labels with {config.min_images_per_label} or more images each to train; "
            f"I have {len(labels)}" + (f" (too few images: {', '.join(excluded)})." if excluded else ".")
        )
    timings["load_backbone_s"] = time.perf_counter() - t0

    # 1. bottlenecks (only the missing ones are computed)
    t = time.perf_counter()
    cache = BottleneckCache(ws.bottleneck_dir, backbone, engine=engine)
    views = config.train_views()
    eval_idx = [views.index(v) for v in config.eval_views()]
    feats, failed = cache.get(
        [(records[i].sha256, records[i].path) for i in used],
        views=views,
        progress=lambda d, n: step("bottlenecks", d, n),
    )
    timings["bottlenecks_s"] = time.perf_counter() - t
    cache_stats = dict(cache.stats)
    failed_set = set(failed)
    skipped = [(records[used[k]].sha256, "could not be read") for k in failed]
    rows = [k for k in range(len(used)) if k not in failed_set]
    recs = [records[used[k]] for k in rows]
    feats = feats[rows]
    split = np.array([splits[used[k]] for k in rows])
    index = {label_key(x): n for n, x in enumerate(labels)}
    y = np.array([index[label_key(r.label)] for r in recs], dtype=np.int64)
    tr, va, te = split == TRAINING, split == VALIDATION, split == TESTING
    if not te.any() or not tr.any():
        raise TrainingError("There are too few images to make a training and a test set; add more examples.")

    # 2. train the head on training bottlenecks (+ mirrored views)
    t = time.perf_counter()
    train_x = feats[tr].reshape(-1, feats.shape[2])  # (n_train * views, D): all views of each image
    train_y = np.repeat(y[tr], feats.shape[1])
    log_dir = None
    if config.summaries_dir:
        log_dir = Path(config.summaries_dir) / time.strftime("%Y%m%d-%H%M%S")
    head, history = train_head(
        train_x,
        train_y,
        feats[va, eval_idx[0]],
        y[va],
        len(labels),
        config,
        on_epoch=lambda e, n: step("training", e, n),
        log_dir=log_dir,
    )
    timings["training_s"] = time.perf_counter() - t

    # 3. evaluate on the test split
    t = time.perf_counter()
    step("evaluating", 0, 1)
    test_recs = [r for r, m in zip(recs, te, strict=True) if m]
    test_probs = _predict(head, feats[te][:, eval_idx])
    ev = evaluate(
        test_probs,
        y[te],
        labels,
        sha256s=[r.sha256 for r in test_recs],
        paths=[str(r.path) for r in test_recs],
    )
    val_acc = float((_predict(head, feats[va][:, eval_idx]).argmax(1) == y[va]).mean()) if va.any() else None
    if config.print_misclassified_test_images:
        for m in ev.misclassified:
            log.info(
                "misclassified test image %s: %s -> %s (%.2f)",
                m["path"],
                m["label"],
                m["predicted"],
                m["probability"],
            )
    comparison = _gate_against_current(ws, backbone, feats[te][:, eval_idx], test_recs, test_probs, labels)
    timings["evaluating_s"] = time.perf_counter() - t
    step("evaluating", 1, 1)

    # 4. gate decision
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
    passed = not reasons

    # 5. write the version (temp dir, renamed when complete)
    t = time.perf_counter()
    step("saving", 0, 1)
    _check_output_space(ws, backbone, config)
    name, tmp = ws.registry.new_version_dir()
    try:
        counts = {x: int((y[tr | va | te] == n).sum()) for n, x in enumerate(labels)}
        metrics = {
            "version": name,
            "created_at": time.time(),
            "accuracy": ev.accuracy,
            "validation_accuracy": val_acc,
            "test_images": ev.count,
            "train_images": int(tr.sum()),
            "validation_images": int(va.sum()),
            "images_per_label": counts,
            "labels": labels,
            "per_label": ev.per_label,
            "confusion_matrix": ev.confusion_matrix,
            "misclassified": ev.misclassified,
            "excluded_labels": excluded,
            "skipped_images": skipped,
            "store_fingerprint": fingerprint,
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
            "history": history,
            "epochs_run": len(history.get("loss", [])),
            "bottleneck_cache": cache_stats,
            "gate": {"passed": passed, "reasons": reasons, "comparison": comparison},
            "timings": timings,
        }
        head.save(tmp / "head.keras")
        build_inference_model(backbone, head).save(tmp / "model.keras")
        metrics["engine"]["serving"] = _serving_engine(backbone, cache, engine, tmp)
        (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        plot_confusion_matrix(
            ev,
            tmp / "confusion_matrix.png",
            title=f"{name}: test accuracy {ev.accuracy:.1%} ({ev.count} images)",
        )
        if config.export_savedmodel:
            build_inference_model(backbone, head).export(str(tmp / "saved_model"), verbose=False)
        if config.export_tflite:
            _export_tflite(backbone, head, tmp / "model.tflite")
        timings["saving_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False), encoding="utf-8")
        version = ws.registry.commit(name, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step("saving", 1, 1)

    # 6. promote or refuse; prune
    if passed:
        ws.registry.promote(version)
        status = "promoted"
        message = f"New model {name} is serving: test accuracy {ev.accuracy:.1%} on {ev.count} images, {len(labels)} labels."
    else:
        status = "refused"
        message = f"New model {name} was not promoted: {'; '.join(reasons)}. The current model keeps serving."
    if excluded:
        message += (
            f" Left out for having fewer than {config.min_images_per_label} images: {', '.join(excluded)}."
        )
    ws.registry.prune(config.keep_versions)
    _prune_bottlenecks(ws, cache, records)
    _prune_other_backbones(ws, backbone)
    log.info("retrain finished: %s (%s)", status, message)
    return RetrainReport(
        status, message, name, metrics, version.path / "confusion_matrix.png", excluded, skipped
    )


def _prune_bottlenecks(ws: Workspace, cache: BottleneckCache, records: list) -> None:
    """Drop cached bottlenecks of images no longer stored, so the cache never outgrows the store.

    Only the store's own cache (``<store>/bottlenecks``) is pruned: a ``--bottleneck_dir`` given on
    the command line may be shared with other stores. A failure is logged, never fatal.
    """
    if ws.bottleneck_dir.resolve() != (ws.root / "bottlenecks").resolve():
        return
    try:
        keep = {r.sha256 for r in records} | {r.sha256 for r in ws.store.snapshot()}
        cache.prune(keep)
    except OSError as exc:
        log.warning("could not prune the bottleneck cache: %s", exc)


def _serving_engine(backbone: Backbone, cache: BottleneckCache, engine: EngineSettings, version_dir: Path) -> str:
    """Give the new version its backbone's LiteRT conversion (a copy, ``classifier.BACKBONE_CACHE_NAME``).

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
    record = getattr(backbone.engine, "cache_record", None)
    if record is not None:
        try:
            copy_cache(record, version_dir, BACKBONE_CACHE_NAME)
        except OSError as exc:
            log.warning("could not copy the backbone's LiteRT model into the version: %s", exc)
    return backbone.engine.description


def _prune_other_backbones(ws: Workspace, backbone: Backbone) -> list[str]:
    """Delete the caches of backbones no longer in use: every ``<store>/bottlenecks/<id>`` folder
    (bottlenecks and the converted LiteRT backbone) but the one of ``backbone``.

    Only the store's own cache is pruned (a ``--bottleneck_dir`` may be shared with other stores).
    Model versions keep their own converted model and go with their folder (``registry.prune``).
    A failure is logged, never fatal.

    Returns:
        The names of the deleted folders.
    """
    root = ws.bottleneck_dir
    if root.resolve() != (ws.root / "bottlenecks").resolve() or not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if p.name == backbone.id:
            continue
        try:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except OSError as exc:
            log.warning("could not remove the cache of an unused backbone %s: %s", p.name, exc)
    if removed:
        log.info("removed the caches of backbones no longer in use: %s", ", ".join(sorted(removed)))
    return removed


def _export_tflite(backbone: Backbone, head, path: Path) -> None:
    """Convert the inference model to TFLite (float32) at ``path``."""
    import tensorflow as tf

    model = build_inference_model(backbone, head)
    h, w = backbone.input_size
    fn = tf.function(
        lambda x: model(x, training=False), input_signature=[tf.TensorSpec([1, h, w, 3], tf.float32)]
    )
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    path.write_bytes(converter.convert())
