"""One retraining run, end to end (retrain.py's main(), as a library call).

snapshot the labelled images -> compute only the missing bottlenecks -> hash split -> train the
softmax head -> evaluate on the test split -> gate (accuracy floor; not worse than the serving model
on the same test images) -> write a new version (model, labels, metrics with the gate's decision,
confusion matrix PNG) -> promote atomically if the gate passed -> prune old versions and the
bottlenecks of images no longer stored. The stages live in :mod:`model_store.stages`; this module
runs them (``_retrain``) under the store's training lock and turns expected failures into a
:class:`RetrainReport` (built in one place, ``_report``).

A crash anywhere before the promotion leaves the serving model untouched; a crash during it leaves
either the old or the new pointer (see ``registry``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from model_store.backbones import Backbone, load_backbone
from model_store.contract import RetrainReport, TrainingStatus
from model_store.engine import EngineSettings
from model_store.errors import LabelgramError, TrainingError
from model_store.fs import DISK_FULL_ERRNOS, LockHeld, file_lock
from model_store.stages.data import Progress, compute_bottlenecks, make_split, prune, take_snapshot, train
from model_store.stages.gate import decide_gate, evaluate_head
from model_store.stages.version import check_output_space, promote_or_refuse, version_metrics, write_version
from model_store.training import TrainConfig, split_percentages_problem
from model_store.workspace import Workspace

__all__ = ["DISK_FULL_MESSAGE", "Progress", "RetrainReport", "is_disk_full", "retrain", "training_lock"]

log = logging.getLogger(__name__)


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
        return _report(TrainingStatus.FAILED, exc.message)
    except Exception as exc:  # ENOSPC, also wrapped (h5py, TensorFlow): not a crash
        if not is_disk_full(exc):
            raise
        log.error("retrain failed: the disk is full (%s)", exc)
        return _report(TrainingStatus.FAILED, DISK_FULL_MESSAGE)


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


def _check_config(config: TrainConfig) -> None:
    """Refuse impossible settings before any work (raises TrainingError naming the setting)."""
    problem = split_percentages_problem(config.validation_percentage, config.testing_percentage)
    if problem:
        raise TrainingError(problem)
    if not config.crop_fractions or not all(0 < f <= 1 for f in config.crop_fractions):
        raise TrainingError("crop_fractions must be one or more numbers in (0, 1].")
    if config.train_batch_size < 1 or config.epochs < 1 or config.learning_rate <= 0:
        raise TrainingError("train_batch_size and epochs must be at least 1 and learning_rate above 0.")


@contextlib.contextmanager
def training_lock(ws: Workspace) -> Iterator[None]:
    """Hold the store's training lock (``<store>/.train.lock``, :func:`model_store.fs.file_lock`) for one run.

    One training per store at a time, across processes (the bot's scheduler, ``/retrain`` and a
    CLI run): ``prune`` deletes unfinished version folders, which is only safe while no other run
    writes one.

    Raises:
        TrainingError: another process holds the lock.
    """
    lock = file_lock(ws.root / ".train.lock", blocking=False)
    try:
        lock.acquire()
    except LockHeld:
        raise TrainingError(
            "Another training is already running on this store; try again when it has finished."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _report(status: TrainingStatus, message: str, **fields: Any) -> RetrainReport:
    """The one place a :class:`RetrainReport` is built (``status``, ``message``, the rest by name)."""
    return RetrainReport(status, message, **fields)


def _retrain(
    ws: Workspace,
    config: TrainConfig,
    backbone: Backbone | str | None,
    weights: str | None,
    progress: Progress | None,
    engine: EngineSettings,
) -> RetrainReport:
    """The body of :func:`retrain`, run under the training lock with a checked config: the stages in order."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def step(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)

    if not isinstance(backbone, Backbone):
        backbone = load_backbone(backbone, weights=weights)
    check_output_space(ws, backbone, config)  # before hours of work, and again before writing
    snap = take_snapshot(ws, config)
    timings["load_backbone_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    bn = compute_bottlenecks(ws, backbone, config, engine, snap, step)
    timings["bottlenecks_s"] = time.perf_counter() - t
    split = make_split(bn)

    t = time.perf_counter()
    trained = train(config, bn, split, len(snap.labels), step)
    timings["training_s"] = time.perf_counter() - t

    t = time.perf_counter()
    step("evaluating", 0, 1)
    evaluated = evaluate_head(ws, backbone, config, bn, split, trained.head, snap.labels)
    timings["evaluating_s"] = time.perf_counter() - t
    step("evaluating", 1, 1)
    gate = decide_gate(config, evaluated)

    step("saving", 0, 1)
    version, metrics = write_version(
        ws,
        backbone,
        config,
        engine,
        bn.cache,
        trained.head,
        evaluated.evaluation,
        snap.labels,
        lambda name: version_metrics(name, backbone, config, snap, bn, split, trained, evaluated, gate, timings),
        timings,
        t0,
        open_set=evaluated.open_set,
    )
    step("saving", 1, 1)

    status, message = promote_or_refuse(ws, version, gate, evaluated.evaluation, snap, config)
    prune(ws, config, backbone, bn.cache, snap)
    log.info("retrain finished: %s (%s)", status, message)
    return _report(
        status,
        message,
        version=version.name,
        metrics=metrics,
        confusion_png=version.path / "confusion_matrix.png",
        excluded_labels=snap.excluded,
        skipped_images=bn.skipped,
    )
