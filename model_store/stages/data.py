"""Data stages of a retraining run: snapshot, bottlenecks, split, training the head, pruning.

See :mod:`model_store.stages` for the order.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store.backbones import Backbone
from model_store.bottlenecks import BottleneckCache
from model_store.dataset import ImageRecord
from model_store.engine import EngineSettings
from model_store.errors import TrainingError
from model_store.labels import label_key
from model_store.training import TESTING, TRAINING, VALIDATION, TrainConfig, assign_split, train_head
from model_store.workspace import Workspace

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)``; stage is one of "bottlenecks", "training", "evaluating", "saving".
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Snapshot:
    """The labelled images one run trains on, and how they split (``training.assign_split``).

    Attributes:
        records: every stored image (``ImageStore.snapshot()``), sorted.
        fingerprint: ``ImageStore.fingerprint_of(records)``.
        splits: ``"training" | "validation" | "testing" | "excluded"`` per record.
        excluded: labels left out for having fewer than ``min_images_per_label`` images.
        used: indices into ``records`` of the images not excluded.
        labels: the trained labels, sorted by ``label_key`` (class index order).
    """

    records: list[ImageRecord]
    fingerprint: str
    splits: list[str]
    excluded: list[str]
    used: list[int]
    labels: list[str]


def take_snapshot(ws: Workspace, config: TrainConfig) -> Snapshot:
    """Snapshot the store and split it by content hash.

    Raises:
        TrainingError: fewer than 2 labels with ``min_images_per_label`` images.
    """
    records = ws.store.snapshot()
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
    return Snapshot(records, ws.store.fingerprint_of(records), splits, excluded, used, labels)


@dataclass(frozen=True)
class Bottlenecks:
    """The readable images of a snapshot and their bottlenecks.

    Attributes:
        cache: the bottleneck cache (pruned at the end of the run).
        cache_stats: ``cache.stats`` right after computing (hits, misses, ...).
        feats: float32 ``(N, V, D)``: N readable images, V views (``config.train_views()``).
        records: the N images, in the same order.
        splits: their split names, str array ``(N,)``.
        y: their class indices into ``Snapshot.labels``, int64 ``(N,)``.
        skipped: ``[(sha256, reason)]`` images that could not be read.
        eval_idx: indices into the V views of the evaluation views (``config.eval_views()``).
    """

    cache: BottleneckCache
    cache_stats: dict
    feats: np.ndarray
    records: list[ImageRecord]
    splits: np.ndarray
    y: np.ndarray
    skipped: list[tuple[str, str]]
    eval_idx: list[int]


def compute_bottlenecks(
    ws: Workspace, backbone: Backbone, config: TrainConfig, engine: EngineSettings, snap: Snapshot, step: Progress
) -> Bottlenecks:
    """Compute the missing bottlenecks of the snapshot's used images (cached ones are read)."""
    cache = BottleneckCache(ws.bottleneck_dir, backbone, engine=engine)
    views = config.train_views()
    records, used = snap.records, snap.used
    feats, failed = cache.get(
        [(records[i].sha256, records[i].path) for i in used],
        views=views,
        progress=lambda d, n: step("bottlenecks", d, n),
    )
    failed_set = set(failed)
    rows = [k for k in range(len(used)) if k not in failed_set]
    recs = [records[used[k]] for k in rows]
    index = {label_key(x): n for n, x in enumerate(snap.labels)}
    return Bottlenecks(
        cache=cache,
        cache_stats=dict(cache.stats),
        feats=feats[rows],
        records=recs,
        splits=np.array([snap.splits[used[k]] for k in rows]),
        y=np.array([index[label_key(r.label)] for r in recs], dtype=np.int64),
        skipped=[(records[used[k]].sha256, "could not be read") for k in failed],
        eval_idx=[views.index(v) for v in config.eval_views()],
    )


@dataclass(frozen=True)
class Split:
    """Boolean masks ``(N,)`` over ``Bottlenecks.records``: training, validation, testing."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_split(bn: Bottlenecks) -> Split:
    """The split masks of the readable images.

    Raises:
        TrainingError: no training or no test image left.
    """
    split = Split(bn.splits == TRAINING, bn.splits == VALIDATION, bn.splits == TESTING)
    if not split.test.any() or not split.train.any():
        raise TrainingError("There are too few images to make a training and a test set; add more examples.")
    return split


@dataclass(frozen=True)
class Trained:
    """The trained head (``keras.Model``: bottleneck (N, D) -> logits (N, C)) and its Keras history."""

    head: Any
    history: dict


def train(config: TrainConfig, bn: Bottlenecks, split: Split, num_labels: int, step: Progress) -> Trained:
    """Train the head on every view of the training images, validating on the first eval view."""
    feats, y = bn.feats, bn.y
    train_x = feats[split.train].reshape(-1, feats.shape[2])  # (n_train * views, D): all views of each image
    train_y = np.repeat(y[split.train], feats.shape[1])
    log_dir = None
    if config.summaries_dir:
        log_dir = Path(config.summaries_dir) / time.strftime("%Y%m%d-%H%M%S")
    head, history = train_head(
        train_x,
        train_y,
        feats[split.val, bn.eval_idx[0]],
        y[split.val],
        num_labels,
        config,
        on_epoch=lambda e, n: step("training", e, n),
        log_dir=log_dir,
    )
    return Trained(head, history)


def prune(ws: Workspace, config: TrainConfig, backbone: Backbone, cache: BottleneckCache, snap: Snapshot) -> None:
    """Old versions (``registry.prune``), bottlenecks of images no longer stored, caches of other backbones."""
    ws.registry.prune(config.keep_versions)
    prune_bottlenecks(ws, cache, snap.records)
    prune_other_backbones(ws, backbone)


def prune_bottlenecks(ws: Workspace, cache: BottleneckCache, records: list) -> None:
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


def prune_other_backbones(ws: Workspace, backbone: Backbone) -> list[str]:
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
