"""Serve the current model: top-k labels for images, reloading when a new version is promoted.

The label_image.py successor. The version's model is opened by
:func:`model_store.serving.open_serving_model` (LiteRT backbone + NumPy head, or the whole model
on LiteRT, or the TensorFlow path); this module decides when to (re)load it, prepares images
(decode, shrink, crops) and runs the forward passes.

Several images are classified in one forward pass. Beside the softmax, a version trained with
open-set data (``model_store.openset``) scores how unlike its training photos each image is, from
the same forward pass's bottlenecks: :class:`Predictions` carries ``unknown`` and ``unknown_score``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model_store.bottlenecks import DECODE_SIDE, decode_for_model
from model_store.engine import EngineSettings
from model_store.errors import ModelProblem, NoModelError
from model_store.openset import OpenSet, load_open_set
from model_store.preprocessing import to_model_input
from model_store.registry import ModelRegistry, ModelVersion
from model_store.serving import open_serving_model

log = logging.getLogger(__name__)


class _Loaded:
    def __init__(self, version: ModelVersion, settings: EngineSettings | None):
        self.version = version
        self.labels = version.labels
        self.model = open_serving_model(version.path, settings)
        self.input_size = self.model.input_size
        pre = version.metrics.get("preprocessing", {})
        self.mode = pre.get("mode", "center_crop")
        # Crops whose softmax outputs are averaged (multi-crop evaluation, as at test time).
        self.crops = [float(f) for f in pre.get("crop_fractions", [0.875])]
        self.spec = (self.input_size, self.mode, tuple(self.crops))
        # The "none of my labels" scorer: needs the bottlenecks, which only the backbone + head
        # path gives (a version converted whole, or on the TensorFlow path, serves without it).
        self.open_set: OpenSet | None = None
        if hasattr(self.model, "features_and_probabilities"):
            self.open_set = load_open_set(version.path)
        elif (version.path / "openset.npz").is_file():
            log.info("version %s: no bottlenecks on this engine; serving without the unknown-photo check", version.name)
        # Run once now (TensorFlow traces, LiteRT allocates), so the first request does not pay for it.
        self.model(np.zeros((len(self.crops), *self.input_size, 3), np.float32))


class Predictions(list[tuple[str, float]]):
    """One image's top-k ``[(label, probability), ...]`` (a plain list, best first), plus the open-set verdict.

    Attributes:
        unknown: True when the image is unlike everything the version was trained on (its
            ``unknown_score`` is above the version's calibrated threshold); None for a version
            without open-set data (trained before it existed, or served without bottlenecks).
        unknown_score: ``1 - cosine`` to the k-th nearest training photo, float in [0, 2]
            (``model_store.openset``), or None like ``unknown``.
        threshold: the version's threshold (None like ``unknown``).
        labels: every label of the version that classified it (shared, do not mutate).
    """

    def __init__(
        self,
        items: Sequence[tuple[str, float]] = (),
        *,
        unknown: bool | None = None,
        unknown_score: float | None = None,
        threshold: float | None = None,
        labels: Sequence[str] = (),
    ):
        super().__init__(items)
        self.unknown = unknown
        self.unknown_score = unknown_score
        self.threshold = threshold
        self.labels = labels


@dataclass(frozen=True)
class Prepared:
    """An image ready for :meth:`Classifier.classify` (see :meth:`Classifier.prepare`).

    Attributes:
        rgb: the decoded uint8 ``(H, W, 3)`` image, shrunk to at most :data:`KEEP_SIDE` pixels on
            its longer side (kept only to prepare it again if the serving version changes before
            the forward pass; a queued 40-megapixel photo would otherwise hold 120 MB).
        inputs: float32 ``(V, h, w, 3)`` model inputs, or None if no model was loaded.
        spec: the (input size, mode, crops) they were made for.
    """

    rgb: np.ndarray
    inputs: np.ndarray | None
    spec: tuple | None


class Classifier:
    """Top-k classification with the registry's current model.

    Args:
        registry: where versions live; the ``CURRENT`` pointer is re-checked (one ``stat``) on
            every call, and a newly promoted or rolled-back version is loaded without a restart.
        max_batch: images per forward pass (each image gives one model input per crop of the
            version's multi-crop evaluation; larger calls are split). Default 8: on 2 CPU cores
            8 images (16 inputs) per pass took 13.2 ms/image and 857 MiB RSS, 32 images
            23.6 ms/image and 1346 MiB (larger activations fall out of the caches).
        engine: how the model runs (``engine.EngineSettings``; default LiteRT on all cores).

    Thread-safe: calls may come from several threads; a reload swaps the model atomically, and
    forward passes are serialised (one LiteRT interpreter is used by one thread at a time).
    """

    def __init__(self, registry: ModelRegistry, *, max_batch: int = 8, engine: EngineSettings | None = None):
        self.registry = registry
        self.max_batch = max_batch
        self.engine = engine or EngineSettings()
        self._loaded: _Loaded | None = None
        self._pointer_stat: tuple | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str | None:
        """Name of the version being served (after :meth:`reload_if_changed`), or None."""
        self.reload_if_changed()
        return self._loaded.version.name if self._loaded else None

    @property
    def engine_description(self) -> str | None:
        """The engine of the loaded version, e.g. ``"LiteRT/XNNPACK, 2 threads"`` (None before any
        model is loaded). Does not load or reload anything."""
        loaded = self._loaded
        return loaded.model.description if loaded else None

    @property
    def labels(self) -> list[str]:
        """Labels of the serving version, in class-index order ([] before any model)."""
        self.reload_if_changed()
        return list(self._loaded.labels) if self._loaded else []

    def reload_if_changed(self) -> bool:
        """Load the current version if the ``CURRENT`` pointer changed since the last check.

        A version that fails to load is logged once (with its traceback) and the version already
        loaded keeps serving; the pointer is checked again only when it changes.

        Returns:
            True if a different version was loaded.
        """
        p = self.registry.pointer_path()
        try:
            st = os.stat(p)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._pointer_stat:
            return False
        with self._lock:
            if stamp == self._pointer_stat:
                return False
            current = self.registry.current()
            changed = False
            if current is None:
                changed = self._loaded is not None
                self._loaded = None
            elif self._loaded is None or self._loaded.version.name != current.name:
                log.info("loading model version %s", current.name)
                try:
                    self._loaded = _Loaded(current, self.engine)
                    changed = True
                except Exception:  # a version that cannot load must not stop the serving one
                    keep = self._loaded.version.name if self._loaded else None
                    log.exception(
                        "model version %s could not be loaded; %s",
                        current.name,
                        f"still serving {keep}" if keep else "serving no model",
                    )
            self._pointer_stat = stamp
            return changed

    def prepare(self, image: np.ndarray | bytes) -> Prepared:
        """Decode (if bytes) and crop/resize one image for the serving version's model.

        Call it from any thread (e.g. the one that decoded the photo), so that :meth:`classify`
        on the model's thread only runs the forward pass.

        Args:
            image: uint8 ``(H, W, 3)`` RGB array or raw image bytes.

        Returns:
            :class:`Prepared`: the model inputs, float32 ``(V, h, w, 3)`` RGB 0..255, one per crop
            of the version's multi-crop evaluation (None before any model exists), and the RGB image.

        Raises:
            ImageDecodeError: bytes that are not a readable image.
        """
        rgb = decode_for_model(image) if isinstance(image, bytes | bytearray) else image
        self.reload_if_changed()
        loaded = self._loaded
        if loaded is None:
            return Prepared(rgb, None, None)
        return Prepared(_shrunk(rgb), _model_inputs(rgb, loaded), loaded.spec)

    def classify(
        self, images: Sequence[np.ndarray | bytes | Prepared], top_k: int = 3
    ) -> list[Predictions]:
        """Top-k labels for each image, and whether it looks like none of them.

        Args:
            images: decoded uint8 ``(H, W, 3)`` RGB arrays (see ``images.decode_image``), raw
                image bytes (decoded here; an undecodable one raises for the whole call), or the
                results of :meth:`prepare` (re-prepared here if the serving version changed meanwhile).
            top_k: labels per image (capped at the number of labels).

        Returns:
            Per image, :class:`Predictions`: ``[(label, probability), ...]`` best first
            (probabilities are the mean of the softmax outputs over the version's crops, in 0..1,
            summing to 1 over all labels), with ``.unknown`` / ``.unknown_score`` (None for a
            version without open-set data).

        Raises:
            NoModelError: no model has been trained yet.
            ImageDecodeError: a bytes input is not a readable image.
        """
        self.reload_if_changed()
        loaded = self._loaded
        if loaded is None:
            raise NoModelError(reason=ModelProblem.NOT_TRAINED)
        if not images:
            return []
        inputs = []
        for im in images:
            if isinstance(im, Prepared) and im.spec == loaded.spec and im.inputs is not None:
                inputs.append(im.inputs)
            else:
                rgb = (
                    im.rgb
                    if isinstance(im, Prepared)
                    else decode_for_model(im)
                    if isinstance(im, bytes | bytearray)
                    else im
                )
                inputs.append(_model_inputs(rgb, loaded))
        v = len(loaded.crops)
        batch = np.concatenate(inputs)  # (N * V, h, w, 3): the V crops of image 0, then of image 1, ...
        open_set = loaded.open_set
        scores: np.ndarray | None = None
        if open_set is not None:
            feats, flat = loaded.model.features_and_probabilities(batch, batch_size=self.max_batch * v)
            scores = open_set.score(feats.reshape(len(inputs), v, -1))
        else:
            flat = loaded.model(batch, batch_size=self.max_batch * v)
        probs = flat.reshape(len(inputs), v, -1).mean(axis=1)
        k = max(1, min(top_k, len(loaded.labels)))
        out = []
        for n, row in enumerate(probs):
            idx = np.argsort(-row)[:k]
            top = [(loaded.labels[j], float(row[j])) for j in idx]
            if open_set is None or scores is None:
                out.append(Predictions(top, labels=loaded.labels))
            else:
                score = float(scores[n])
                out.append(
                    Predictions(
                        top,
                        unknown=bool(open_set.is_unknown(scores[n : n + 1])[0]),
                        unknown_score=score,
                        threshold=open_set.threshold,
                        labels=loaded.labels,
                    )
                )
        return out


#: Longer side, in pixels, of the copy a :class:`Prepared` keeps (4x a 224 crop's source size): the
#: side training decodes to (``bottlenecks.DECODE_SIDE``), so both see the same pixels.
KEEP_SIDE = DECODE_SIDE


def _shrunk(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` if its longer side is at most KEEP_SIDE, else a bicubic downscale to that size."""
    h, w = rgb.shape[:2]
    if max(h, w) <= KEEP_SIDE:
        return rgb
    from PIL import Image

    scale = KEEP_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def _model_inputs(rgb: np.ndarray, loaded: _Loaded) -> np.ndarray:
    """float32 ``(V, h, w, 3)``: the version's crops of one uint8 RGB image."""
    return np.stack(
        [to_model_input(rgb, loaded.input_size, mode=loaded.mode, crop_fraction=f) for f in loaded.crops]
    )
