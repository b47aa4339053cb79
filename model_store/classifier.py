"""Serve the current model: top-k labels for images, reloading when a new version is promoted.

The label_image.py successor. A version's model (backbone + head + softmax) runs on the engine
of ``model_store.engine``:

* a version written by a training run on LiteRT holds its backbone's LiteRT conversion
  (``litert-backbone.tflite`` + ``.json``, a copy of the backbone's cache, so no conversion is
  spent per training): the backbone runs on LiteRT (XNNPACK) and the small head
  (``head.keras``) plus the softmax in NumPy from the head's weights (:class:`NumpyHead`; a head
  with layers other than Dense / Dropout on a compiled ``tf.function``), so no TensorFlow call is
  on the serving path;
* otherwise (a version trained before the engine existed, or that copy unusable) the whole
  ``model.keras`` is converted once and cached in the version folder (``litert.tflite``);
* the compiled ``tf.function`` path over ``model.keras`` (no ``model.predict()`` per image: that
  costs ~50 ms of fixed overhead on 2 CPU cores) when the configuration asks for it or the
  conversion fails.

Several images are classified in one forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store.bottlenecks import DECODE_SIDE, decode_for_model
from model_store.engine import EngineSettings, FrozenModel, open_cached, open_frozen
from model_store.errors import ModelProblem, NoModelError
from model_store.images import to_model_input
from model_store.registry import ModelRegistry, ModelVersion

log = logging.getLogger(__name__)


#: file stem of a version's converted model (``<version>/litert.tflite`` and ``litert.json``).
SERVING_CACHE_NAME = "litert"
#: file stem of the copy of the backbone's conversion in a version folder.
BACKBONE_CACHE_NAME = "litert-backbone"


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float32 ``(N, C)`` logits (max subtracted first, so no overflow)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class NumpyHead:
    """A head made only of Dense layers (linear or ReLU) and Dropout, run in NumPy from its weights.

    ``train_head`` builds exactly such heads (an optional hidden ReLU layer, dropout, the logits
    layer). Inference is ``x @ W + b`` per Dense layer (ReLU where the layer has it; Dropout is the
    identity at inference), then the softmax: the same arithmetic as Keras in float32, without a
    ``tf.function`` dispatch per request and without TensorFlow on the serving path.

    Args:
        dense: ``(kernel float32 (D_in, D_out), bias float32 (D_out,) or None, relu)`` per Dense
            layer, in order.
    """

    def __init__(self, dense: list[tuple[np.ndarray, np.ndarray | None, bool]]):
        self.dense = [
            (np.ascontiguousarray(k, np.float32), None if b is None else np.asarray(b, np.float32), relu)
            for k, b, relu in dense
        ]

    @classmethod
    def from_keras(cls, head) -> NumpyHead | None:
        """The NumPy version of a Keras head, or None when it has other layers or activations.

        Only a plain chain is accepted: the layers in order, each Dense layer's input width equal to
        the previous one's output width (the caller also compares outputs with Keras on a probe).
        """
        import keras

        dense = []
        width = int(head.input_shape[-1])
        for layer in head.layers:
            if isinstance(layer, keras.layers.InputLayer | keras.layers.Dropout):
                continue
            if not isinstance(layer, keras.layers.Dense):
                return None
            act = keras.activations.serialize(layer.activation)
            act = act if isinstance(act, str) else (act or {}).get("config", {}).get("name", act)
            if act not in ("linear", "relu"):
                return None
            kernel = np.asarray(layer.kernel.numpy(), np.float32)
            bias = np.asarray(layer.bias.numpy(), np.float32) if layer.use_bias else None
            if kernel.ndim != 2 or kernel.shape[0] != width:
                return None
            width = kernel.shape[1]
            dense.append((kernel, bias, act == "relu"))
        if not dense or width != int(head.output_shape[-1]):
            return None
        return cls(dense)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32 ``(N, C)`` logits for float32 ``(N, D)`` bottlenecks."""
        x = np.asarray(features, np.float32)
        for kernel, bias, relu in self.dense:
            x = x @ kernel
            if bias is not None:
                x += bias
            if relu:
                np.maximum(x, 0, out=x)
        return x

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """float32 ``(N, C)`` softmax probabilities for float32 ``(N, D)`` bottlenecks."""
        return _softmax(self.logits(features))


#: largest difference of probabilities between the NumPy head and Keras on the probe for the
#: NumPy head to be used (float32 rounding is ~1e-7).
NUMPY_HEAD_TOLERANCE = 1e-5


class _BackbonePlusHead:
    """The backbone on LiteRT, then the head and the softmax in NumPy (:class:`NumpyHead`) or, for
    a head with other layers, on a compiled ``tf.function``."""

    def __init__(self, backbone: FrozenModel, head_path: Path):
        import keras

        head = keras.models.load_model(head_path, compile=False)
        self.backbone = backbone
        self.engine, self.input_size, self.description = (
            backbone.engine,
            backbone.input_size,
            backbone.description,
        )
        self._head = self._numpy_head(head) or self._tf_head(head)

    @staticmethod
    def _numpy_head(head):
        """A :class:`NumpyHead` checked against Keras on a fixed probe, or None."""
        numpy_head = NumpyHead.from_keras(head)
        if numpy_head is None:
            return None
        probe = np.random.default_rng(0).uniform(0, 4, (4, int(head.input_shape[-1]))).astype(np.float32)
        ref = np.asarray(head(probe, training=False), np.float32)
        ref = _softmax(ref.astype(np.float64)).astype(np.float32)
        got = numpy_head(probe)
        if got.shape != ref.shape or not np.abs(got - ref).max() <= NUMPY_HEAD_TOLERANCE:
            log.warning("the head's NumPy form disagrees with Keras; using TensorFlow for it")
            return None
        return numpy_head

    @staticmethod
    def _tf_head(head):
        import tensorflow as tf

        fn = tf.function(
            lambda f: tf.nn.softmax(head(f, training=False), axis=-1),
            input_signature=[tf.TensorSpec([None, int(head.input_shape[-1])], tf.float32)],
        )
        return lambda feats: fn(feats).numpy()

    @property
    def head_engine(self) -> str:
        """``"numpy"`` or ``"tensorflow"``: what runs the head."""
        return "numpy" if isinstance(self._head, NumpyHead) else "tensorflow"

    def __call__(self, batch: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        feats = self.backbone(batch, batch_size=batch_size)
        return np.asarray(self._head(feats), np.float32)


def _open_backbone_plus_head(version_dir: Path, settings: EngineSettings | None):
    """The version's backbone copy on LiteRT + its head, or None when the version has no usable copy.

    Raises:
        ValueError: the version's ``model.keras`` is not a sound Keras archive (the version is
            broken even if this path would not need it).
    """
    head = version_dir / "head.keras"
    if not head.is_file() or not (version_dir / f"{BACKBONE_CACHE_NAME}.json").is_file():
        return None
    try:
        with zipfile.ZipFile(version_dir / "model.keras") as archive:
            bad = archive.testzip()  # reads every member, checking its CRC
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"model.keras of {version_dir.name} is not a Keras archive ({exc})") from exc
    if bad is not None:
        raise ValueError(f"model.keras of {version_dir.name} is damaged ({bad})")
    try:
        metrics = json.loads((version_dir / "metrics.json").read_text(encoding="utf-8"))
        key = metrics["backbone"]["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    backbone = open_cached(version_dir, key=key, name=BACKBONE_CACHE_NAME, settings=settings)
    if backbone is None:
        return None
    try:
        return _BackbonePlusHead(backbone, head)
    except Exception as exc:  # an unreadable head.keras: the whole model.keras may still serve
        log.warning("head of %s cannot be loaded (%s); using model.keras", version_dir.name, exc)
        return None


def open_serving_model(version_dir: Path, settings: EngineSettings | None = None):
    """A version's model (backbone + head + softmax) on the configured engine.

    On LiteRT: the version's copy of its backbone's conversion (:data:`BACKBONE_CACHE_NAME`) plus
    its head, when it has one; else ``model.keras`` converted once and cached in the version folder
    (:data:`SERVING_CACHE_NAME`, keyed by the digest of ``model.keras``; kept in memory only when
    the folder is read-only).

    Args:
        version_dir: the version folder.
        settings: engine and threads (default ``EngineSettings()``: LiteRT, all cores).

    Returns:
        A callable ``(batch, *, batch_size) -> float32 (N, C)`` probabilities for float32
        ``(N, h, w, 3)`` RGB 0..255, with ``.engine``, ``.description`` and ``.input_size``
        (an ``engine.FrozenModel`` or the backbone + head pair).
    """
    version_dir = Path(version_dir)
    composed = _open_backbone_plus_head(version_dir, settings)
    if composed is not None:
        return composed
    path = version_dir / "model.keras"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def load():
        import keras

        return keras.models.load_model(path, compile=False)

    return open_frozen(
        load,  # loaded only when needed: for a conversion or the TensorFlow path
        key=f"model.keras-{digest}",
        cache_dir=version_dir,
        name=SERVING_CACHE_NAME,
        settings=settings,
    )


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
        # Run once now (TensorFlow traces, LiteRT allocates), so the first request does not pay for it.
        self.model(np.zeros((len(self.crops), *self.input_size, 3), np.float32))


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
    ) -> list[list[tuple[str, float]]]:
        """Top-k labels for each image.

        Args:
            images: decoded uint8 ``(H, W, 3)`` RGB arrays (see ``images.decode_image``), raw
                image bytes (decoded here; an undecodable one raises for the whole call), or the
                results of :meth:`prepare` (re-prepared here if the serving version changed meanwhile).
            top_k: labels per image (capped at the number of labels).

        Returns:
            Per image, ``[(label, probability), ...]`` best first; probabilities are the mean of
            the softmax outputs over the version's crops, in 0..1, summing to 1 over all labels.

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
        flat = loaded.model(batch, batch_size=self.max_batch * v)
        probs = flat.reshape(len(inputs), v, -1).mean(axis=1)
        k = max(1, min(top_k, len(loaded.labels)))
        out = []
        for row in probs:
            idx = np.argsort(-row)[:k]
            out.append([(loaded.labels[j], float(row[j])) for j in idx])
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
