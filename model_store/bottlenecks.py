"""Bottleneck cache: backbone feature vectors keyed by (backbone id, view, image content hash).

As in retrain.py, the expensive part of retraining is running every image through the frozen
backbone; the result (the *bottleneck*) is cached on disk so a later retraining only computes the
bottlenecks of images it has not seen. Augmentation is done with cached *views* of each image
(centre crops at two scales and their mirror images), so it keeps the cache useful instead of defeating it as
retrain.py's random distortions did.

Layout: ``<root>/<backbone id>/<preprocessing>-<view>/<sha256[:2]>/<sha256>.npy``, each a float32 ``(D,)`` array,
written with ``fs.write_atomic`` (fsync file, ``os.replace``, fsync folder);
``<root>/<backbone id>/litert.tflite`` (+ ``.json``) is the backbone converted for the LiteRT engine
(``model_store.engine``). An entry that cannot be read or has the wrong shape, dtype
or non-finite values is treated as missing and recomputed.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from model_store.backbones import Backbone
from model_store.engine import EngineSettings
from model_store.errors import LabelgramError
from model_store.fs import TMP_PREFIX, write_atomic
from model_store.images import decode_image
from model_store.preprocessing import to_model_input

log = logging.getLogger(__name__)

#: concurrent cache writers per computed batch (see ``BottleneckCache._store_many``)
_WRITERS = 8

#: The eval transform of every backbone input (``preprocessing.to_model_input`` mode): scale so the shorter
#: side covers size / crop_fraction and centre-crop (the transform the shipped backbone was checked
#: with, BACKBONE_NOTICE.md). Measured on clothing-small (251 test images, plain softmax head):
#: 0.888 test accuracy with a 0.875 centre crop vs 0.841 when squashing the photo to 224x224.
PREPROCESSING_MODE = "center_crop"

Progress = Callable[[int, int], None]

#: Longer side, in pixels, down to which an image may be reduced while decoding for the backbone
#: (4x a 224 crop's source size: every crop is then resampled from at least that much detail).
DECODE_SIDE = 1024
_DECODE_HAS_MAX_SIDE = "max_side" in inspect.signature(decode_image).parameters


def decode_for_model(data: bytes) -> np.ndarray:
    """Decode image bytes for the backbone: ``images.decode_image``, reduced while decoding when it can.

    When ``decode_image`` takes ``max_side`` (JPEG DCT scaling + integer box reduction), the image
    is decoded no larger than needed while its longer side stays at least :data:`DECODE_SIDE`; a
    ``decode_image`` without it decodes at full size. Training (bottlenecks) and serving
    (``Classifier``) both decode through here, so they see the same pixels.

    Returns:
        uint8 ``(H, W, 3)`` RGB array.

    Raises:
        ImageDecodeError: bytes that are not a readable image.
    """
    if _DECODE_HAS_MAX_SIDE:
        return decode_image(data, max_side=DECODE_SIDE)
    return decode_image(data)


def view_name(crop_fraction: float, flip: bool = False) -> str:
    """Cache name of a view: ``"crop875"`` for a 0.875 centre crop, ``"crop1000-flip"`` for a mirrored full crop."""
    return f"crop{round(crop_fraction * 1000)}" + ("-flip" if flip else "")


def parse_view(name: str) -> tuple[float, bool]:
    """Inverse of :func:`view_name`: ``(crop_fraction, flip)``. Raises ValueError for other names."""
    base, _, suffix = name.partition("-")
    if not base.startswith("crop") or suffix not in ("", "flip") or not base[4:].isdigit():
        raise ValueError(f"unknown view {name!r}; expected e.g. 'crop875' or 'crop1000-flip'")
    fraction = int(base[4:]) / 1000
    if not 0 < fraction <= 1:
        raise ValueError(f"view {name!r}: crop fraction must be in (0, 1]")
    return fraction, suffix == "flip"


def make_views(rgb: np.ndarray, size: tuple[int, int], views: Sequence[str]) -> list[np.ndarray]:
    """Model inputs for the requested views of one decoded image.

    Args:
        rgb: uint8 ``(H, W, 3)`` RGB image.
        size: backbone input ``(height, width)``.
        views: names from :func:`view_name`, e.g. ``("crop875", "crop875-flip", "crop1000")``.

    Returns:
        One float32 ``(h, w, 3)`` array (RGB 0..255) per view, in the order given.

    Raises:
        ValueError: an unknown view name.
    """
    crops: dict[float, np.ndarray] = {}
    out = []
    for v in views:
        fraction, flip = parse_view(v)
        if fraction not in crops:
            crops[fraction] = to_model_input(rgb, size, mode=PREPROCESSING_MODE, crop_fraction=fraction)
        base = crops[fraction]
        out.append(np.ascontiguousarray(base[:, ::-1]) if flip else base)
    return out


class BottleneckCache:
    """On-disk cache of bottlenecks for one backbone.

    Args:
        root: cache folder (e.g. ``<store>/bottlenecks``); created if missing.
        backbone: the feature extractor; its ``id`` namespaces the entries.
        batch_size: images per backbone forward pass (default 32, the throughput sweet spot
            measured on 2 CPU cores).
        decode_threads: threads decoding and resizing images while the backbone runs.
        engine: how the backbone runs (``engine.EngineSettings``; default LiteRT on all cores),
            applied when the first bottleneck has to be computed unless the backbone already has
            an engine (:meth:`Backbone.use_engine`). The converted backbone is cached in this
            backbone's folder (``litert.tflite``), so it goes with its bottlenecks.
    """

    def __init__(
        self,
        root: Path | str,
        backbone: Backbone,
        *,
        batch_size: int = 32,
        decode_threads: int = 2,
        engine: EngineSettings | None = None,
    ):
        self.root = Path(root)
        self.backbone = backbone
        self.batch_size = batch_size
        self.decode_threads = decode_threads
        self.engine = engine or EngineSettings()
        self.dir = self.root / backbone.id
        #: counters of the last :meth:`get` call: computed, loaded from cache, recomputed as corrupt.
        self.stats = {"computed": 0, "cached": 0, "corrupt": 0}

    def path(self, sha256: str, view: str) -> Path:
        """File holding one bottleneck (it may not exist)."""
        return self.dir / f"{PREPROCESSING_MODE}-{view}" / sha256[:2] / f"{sha256}.npy"

    def _load(self, sha256: str, view: str) -> np.ndarray | None:
        p = self.path(sha256, view)
        if not p.exists():
            return None
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception:  # truncated / garbage file: recompute
            arr = None
        if (
            arr is None
            or arr.dtype != np.float32
            or arr.shape != (self.backbone.feature_dim,)
            or not np.isfinite(arr).all()
        ):
            log.warning("bottleneck cache entry %s is corrupt; recomputing", p.name)
            self.stats["corrupt"] += 1
            return None
        return arr

    def _store(self, sha256: str, view: str, vec: np.ndarray) -> None:
        p = self.path(sha256, view)
        p.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, vec.astype(np.float32), allow_pickle=False)
        write_atomic(p, buf.getvalue())  # fsync file, os.replace, fsync folder

    def _store_many(self, entries: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """:meth:`_store` each ``(sha256, view, vector)``, several at once.

        Each write is durable (fsync file, rename, fsync folder); run concurrently, the file
        system's journal commits the fsyncs together, so durability does not slow the bottleneck
        stage down (figures: ``benchmarks/bench_durable_writes.py``).

        Raises:
            OSError: a write failed (the first error; the other entries may have been written).
        """
        if len(entries) <= 1:
            for sha, view, vec in entries:
                self._store(sha, view, vec)
            return
        with ThreadPoolExecutor(min(_WRITERS, len(entries))) as pool:
            for _ in pool.map(lambda e: self._store(*e), entries):
                pass

    def prune(self, keep: set[str]) -> int:
        """Delete the entries of images not in ``keep`` and leftovers of interrupted writes.

        Only this backbone's folder is touched. Call it while no other process writes to the
        same cache (the training lock), with the content hashes of every stored image.

        Args:
            keep: sha256 hex digests whose entries stay.

        Returns:
            The number of files deleted.
        """
        removed = 0
        if not self.dir.is_dir():
            return removed
        for view_dir in self.dir.iterdir():
            if not view_dir.is_dir():
                if view_dir.name.startswith(TMP_PREFIX):  # an interrupted engine-cache write
                    view_dir.unlink(missing_ok=True)
                    removed += 1
                continue
            for shard in view_dir.iterdir():
                if not shard.is_dir():
                    continue
                for entry in shard.iterdir():
                    if entry.name.startswith(TMP_PREFIX) or (entry.suffix == ".npy" and entry.stem not in keep):
                        entry.unlink(missing_ok=True)
                        removed += 1
                with contextlib.suppress(OSError):
                    shard.rmdir()  # only if now empty
        if removed:
            log.info("bottleneck cache: removed %d entries of images no longer stored", removed)
        return removed

    def get(
        self,
        items: Sequence[tuple[str, Path | bytes]],
        *,
        views: Sequence[str] = ("crop875",),
        progress: Progress | None = None,
    ) -> tuple[np.ndarray, list[int]]:
        """Bottlenecks of many images, computing only the missing ones.

        Args:
            items: ``(sha256, source)`` pairs; ``source`` is the image file path or its bytes.
            views: which views to return (names from :func:`view_name`).
            progress: called as ``progress(done, to_compute)`` after each computed batch
                (and once with ``(0, to_compute)`` before starting).

        Returns:
            ``(features, failed)``: float32 array ``(N, len(views), D)``; ``failed`` lists the
            indices of items that could not be read or decoded (their rows are zeros).
        """
        self.stats = {"computed": 0, "cached": 0, "corrupt": 0}
        n, d = len(items), self.backbone.feature_dim
        out = np.zeros((n, len(views), d), np.float32)
        todo: list[int] = []
        missing_views: dict[int, list[int]] = {}
        for i, (sha, _) in enumerate(items):
            miss = []
            for j, v in enumerate(views):
                vec = self._load(sha, v)
                if vec is None:
                    miss.append(j)
                else:
                    out[i, j] = vec
            if miss:
                todo.append(i)
                missing_views[i] = miss
        self.stats["cached"] = n - len(todo)
        failed: list[int] = []
        if progress:
            progress(0, len(todo))
        if not todo:
            return out, failed

        if self.backbone.engine is None:
            self.backbone.use_engine(self.engine, cache_dir=self.dir)
        size = self.backbone.input_size

        def prepare(i: int):
            _, src = items[i]
            try:
                data = src if isinstance(src, bytes | bytearray) else Path(src).read_bytes()
                rgb = decode_for_model(bytes(data))
            except (OSError, LabelgramError) as exc:
                log.warning("cannot read image %s for bottlenecks: %s", items[i][0][:12], exc)
                return i, None
            return i, make_views(rgb, size, [views[j] for j in missing_views[i]])

        done = 0
        chunks = [todo[k : k + self.batch_size] for k in range(0, len(todo), self.batch_size)]
        with ThreadPoolExecutor(self.decode_threads) as pool:
            # Decode the next chunk while the backbone works on the current one; at most two
            # chunks of decoded pixels are held in memory at once.
            queue = deque(pool.map(prepare, c) for c in chunks[:2])
            for k in range(len(chunks)):
                prepared = list(queue.popleft())
                if k + 2 < len(chunks):
                    queue.append(pool.map(prepare, chunks[k + 2]))
                batch, where = [], []
                for i, arrs in prepared:
                    if arrs is None:
                        failed.append(i)
                        continue
                    for j, arr in zip(missing_views[i], arrs, strict=True):
                        batch.append(arr)
                        where.append((i, j))
                if batch:
                    feats = self.backbone.features(np.stack(batch), batch_size=self.batch_size)
                    for (i, j), vec in zip(where, feats, strict=True):
                        out[i, j] = vec
                    self._store_many([(items[i][0], views[j], out[i, j]) for i, j in where])
                done += len(prepared)
                self.stats["computed"] += len(prepared)
                if progress:
                    progress(done, len(todo))
        return out, sorted(failed)
