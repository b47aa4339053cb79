"""Opening a model version for inference: the serving model :class:`~model_store.classifier.Classifier` runs.

A version's model (backbone + head + softmax) runs on the engine of ``model_store.engine``:

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from model_store.engine import EngineSettings, FrozenModel, inference_function, open_cached, open_frozen

__all__ = ["BACKBONE_CACHE_NAME", "NUMPY_HEAD_TOLERANCE", "SERVING_CACHE_NAME", "NumpyHead", "open_serving_model"]

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
        fn = inference_function(head, [None, int(head.input_shape[-1])], softmax=True)
        return lambda feats: fn(feats).numpy()

    @property
    def head_engine(self) -> str:
        """``"numpy"`` or ``"tensorflow"``: what runs the head."""
        return "numpy" if isinstance(self._head, NumpyHead) else "tensorflow"

    def __call__(self, batch: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        return self.features_and_probabilities(batch, batch_size=batch_size)[1]

    def features_and_probabilities(self, batch: np.ndarray, *, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(N, D)`` bottlenecks and ``(N, C)`` probabilities of float32 ``(N, h, w, 3)`` RGB
        0..255 (one backbone pass: the open-set score uses the bottlenecks, ``model_store.openset``)."""
        feats = np.asarray(self.backbone(batch, batch_size=batch_size), np.float32)
        return feats, np.asarray(self._head(feats), np.float32)


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
        (an ``engine.FrozenModel`` or the backbone + head pair; only the latter has
        ``features_and_probabilities``, which the open-set score needs).
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
