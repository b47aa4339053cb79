"""LiteRT itself: converting a Keras model to a ``.tflite`` flatbuffer, checking it, running it.

Used by :mod:`model_store.engine`, which decides when to convert, caches the result and falls back
to TensorFlow; see there and docs/engine.md.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["LiteRTRunner", "converter_version", "convert", "cosines", "probe_input"]


class LiteRTRunner:
    """One LiteRT interpreter with a resizable batch dimension (call under the FrozenModel's lock)."""

    def __init__(self, content: bytes, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=content, num_threads=threads)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self.input, self.output = inputs[0]["index"], outputs[0]["index"]
        shape = [int(d) for d in inputs[0]["shape"]]
        if len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"expected an (N, h, w, 3) input, got {shape}")
        self.input_size = (shape[1], shape[2])
        self.batch: int | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self.batch:
            self.interpreter.resize_tensor_input(self.input, [len(x), *self.input_size, 3])
            self.interpreter.allocate_tensors()
            self.batch = len(x)
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output)


def probe_input(input_size: tuple[int, int], n: int = 2) -> np.ndarray:
    """The fixed input a conversion is checked on: float32 ``(n, h, w, 3)``, smooth RGB 0..255 patterns."""
    h, w = input_size
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        chans = [np.sin((k + 1 + c) * 3.0 * xx + (c + 2) * 2.0 * yy + c) for c in range(3)]
        img = (np.stack(chans, axis=-1) * 0.5 + 0.5) * 200 + rng.uniform(0, 55, (h, w, 3))
        out.append(img)
    return np.stack(out).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair of ``a`` and ``b`` (any shapes ``(N, ...)``), float64 ``(N,)``."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-30)


def convert(model) -> bytes:
    """Convert a Keras model to a float32 ``.tflite`` flatbuffer with a dynamic batch dimension.

    Through a temporary SavedModel export (what ``TFLiteConverter.from_keras_model`` does for a
    Keras 3 model, without its printout); builtin LiteRT ops only, no quantisation.

    Raises:
        Exception: whatever the export or the converter raises for an unsupported model.
    """
    import tensorflow as tf

    tmp = Path(tempfile.mkdtemp(prefix="labelgram-convert-"))
    try:
        model.export(str(tmp / "saved_model"), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp / "saved_model"))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return converter.convert()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converter_version() -> str:
    """The installed TensorFlow version (the converter's), or ``"unknown"``."""
    try:
        return importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
