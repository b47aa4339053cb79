"""Fast CPU inference for the frozen part of a model: LiteRT (XNNPACK), with the TensorFlow path as fallback.

The Keras model stays the source of truth (training, the ``.keras`` / SavedModel / TFLite exports);
this module only *runs* a frozen Keras model mapping float32 ``(N, h, w, 3)`` to float32 ``(N, ...)``:

* ``engine="litert"`` (default): the model is converted once to a float32 ``.tflite`` flatbuffer
  (``tf.lite.TFLiteConverter`` from a SavedModel export, builtin ops only) and run by the LiteRT
  interpreter (PyPI ``ai-edge-litert``, the successor of ``tf.lite.Interpreter``) whose default CPU
  delegate is XNNPACK. The conversion is checked against the Keras model on a fixed probe input and
  cached on disk (``<cache_dir>/<name>.tflite`` + ``<name>.json``, each written temp-file-then-
  ``os.replace``), keyed by a caller-given string (a backbone id, a digest of a version's
  ``model.keras``): another key means another model, which is converted again.
* ``engine="tensorflow"``: a compiled ``tf.function`` over the Keras model (the path used before
  LiteRT). It is also the fallback when LiteRT is missing, the conversion fails (e.g. a user-supplied
  backbone with ops LiteRT lacks) or the converted model disagrees with Keras; the reason is logged
  once per model and process, shown by :attr:`FrozenModel.description`, and a failed conversion is
  remembered in the cache so it is not retried on every run.

Variable batch sizes are handled by resizing the interpreter's input (``resize_tensor_input`` +
``allocate_tensors``, which LiteRT makes cheap; padding to a fixed batch cost as much as the
padding images). An interpreter is not thread-safe: each :class:`FrozenModel` serialises its
calls with a lock. Converting, checking and running LiteRT itself is :mod:`model_store.litert`;
this module chooses the engine, caches conversions and falls back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store.fs import write_atomic
from model_store.litert import LiteRTRunner, convert, converter_version, cosines, probe_input

log = logging.getLogger(__name__)

ENGINES = ("litert", "tensorflow")
#: bumped when the conversion recipe changes, so caches written by an older recipe are redone.
FORMAT = 1
#: smallest cosine similarity between LiteRT and Keras outputs on the probe input for a conversion to be used.
MIN_PROBE_COSINE = 0.999
#: most inputs per LiteRT forward pass (larger calls are split). XNNPACK is as efficient per image at
#: batch 1-8 as at 32, and larger batches' activations fall out of the caches: see docs/engine.md.
LITERT_MAX_BATCH = 8

_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineSettings:
    """How frozen models are run.

    Attributes:
        engine: ``"litert"`` (LiteRT/XNNPACK, falling back to TensorFlow when needed) or
            ``"tensorflow"`` (always the compiled ``tf.function`` path).
        threads: CPU threads for LiteRT; 0 or None = every core the process may use
            (:func:`available_cores`).
    """

    engine: str = "litert"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"threads must be 0 (all cores) or more, not {self.threads}")

    @property
    def num_threads(self) -> int:
        """The thread count to use (``threads``, or all available cores when 0/None)."""
        return self.threads or available_cores()


class FrozenModel:
    """A frozen model ready to run: float32 ``(N, h, w, 3)`` -> float32 ``(N, ...)``.

    Build it with :func:`open_frozen`. Calls are serialised by a lock (safe from any thread, one
    forward pass at a time).

    Attributes:
        engine: ``"litert"`` or ``"tensorflow"`` (the engine actually used).
        threads: LiteRT threads (None for TensorFlow, which uses its own thread pools).
        fallback_reason: why TensorFlow is used although LiteRT was asked for, else None.
        input_size: ``(h, w)`` of the model input.
        cache_record: the on-disk record (``<name>.json``) this model was loaded from or written
            to, or None (converted in memory, or TensorFlow by configuration).
        max_pass: most inputs per forward pass whatever ``batch_size`` a caller asks for
            (:data:`LITERT_MAX_BATCH` on LiteRT, None = no cap on TensorFlow, which gains from
            large batches).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        engine: str,
        input_size: tuple[int, int],
        threads: int | None = None,
        fallback_reason: str | None = None,
        cache_record: Path | None = None,
    ):
        self._run = run
        self.cache_record = cache_record
        self._lock = threading.Lock()
        self.engine = engine
        self.threads = threads
        self.fallback_reason = fallback_reason
        self.input_size = input_size
        self.max_pass = LITERT_MAX_BATCH if engine == "litert" else None

    @property
    def description(self) -> str:
        """Human name of the engine, e.g. ``"LiteRT/XNNPACK, 2 threads"`` or ``"TensorFlow (fallback: ...)"``."""
        if self.engine == "litert":
            return f"LiteRT/XNNPACK, {self.threads} thread{'s' if self.threads != 1 else ''}"
        if self.fallback_reason:
            return f"TensorFlow (fallback: {self.fallback_reason})"
        return "TensorFlow"

    def __call__(self, batch: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Outputs of the model for ``batch``.

        Args:
            batch: float32 ``(N, h, w, 3)`` (other dtypes are converted).
            batch_size: inputs per forward pass (bounds memory); larger batches are split (on
                LiteRT also at :attr:`max_pass`).

        Returns:
            float32 array ``(N, ...)``; ``(0, ...)`` inputs are not run.
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = max(1, int(batch_size))
        if self.max_pass:
            step = min(step, self.max_pass)
        with self._lock:
            outs = [self._run(batch[i : i + step]) for i in range(0, len(batch), step)]
        out = outs[0] if len(outs) == 1 else np.concatenate(outs)
        return out.astype(np.float32, copy=False)


def inference_function(model, input_shape: Sequence[int | None] | None = None, *, softmax: bool = False):
    """``model(x, training=False)`` (then a softmax over the last axis if ``softmax``) compiled as one
    ``tf.function`` with a fixed float32 input signature: the project's only ``tf.function``.

    Args:
        model: a Keras model (or layer) called on float32 input.
        input_shape: the signature's shape; None: ``(None, *model.input_shape[1:])``, so one trace
            serves any batch size.
        softmax: apply ``tf.nn.softmax`` to the output (a head that outputs logits).

    Returns:
        The ``tf.function`` (call it on a float32 array; ``.get_concrete_function()`` for a converter).
    """
    import tensorflow as tf

    shape = list(input_shape) if input_shape is not None else [None, *[int(d) for d in model.input_shape[1:]]]

    def call(x):
        out = model(x, training=False)
        return tf.nn.softmax(out, axis=-1) if softmax else out

    return tf.function(call, input_signature=[tf.TensorSpec(shape, tf.float32)])


def _tensorflow_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    """The compiled ``tf.function`` path: one trace for any batch size."""
    fn = inference_function(model)
    return lambda x: fn(x).numpy()


def _write_cache_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def _log_once(key: str, level: int, msg: str, *args) -> None:
    with _logged_lock:
        if (key, msg % args) in _logged:
            return
        _logged.add((key, msg % args))
    log.log(level, msg, *args)


def cache_paths(cache_dir: Path, name: str) -> tuple[Path, Path]:
    """``(<cache_dir>/<name>.tflite, <cache_dir>/<name>.json)``: the converted model and its record."""
    return cache_dir / f"{name}.tflite", cache_dir / f"{name}.json"


def _read_record(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def open_frozen(
    model,
    *,
    key: str,
    cache_dir: Path | str | None = None,
    name: str = "litert",
    settings: EngineSettings | None = None,
) -> FrozenModel:
    """Open a frozen model on the configured engine, converting (once) and caching as needed.

    Args:
        model: the ``keras.Model`` (float32 ``(N, h, w, 3)`` in), or a zero-argument callable
            returning it (called only when needed: for a conversion or the TensorFlow path).
        key: identifies the model's content (a backbone id, a digest of a ``model.keras``); a
            cache written for another key is converted again.
        cache_dir: folder of the cache (created if missing); None converts in memory every time.
        name: cache file stem inside ``cache_dir``.
        settings: engine choice and threads (default :class:`EngineSettings`).

    Returns:
        A :class:`FrozenModel`. Never raises for a model LiteRT cannot run: it falls back to
        TensorFlow and logs the reason once (a warning).

    Raises:
        Exception: only what loading the Keras model itself raises.
    """
    settings = settings or EngineSettings()
    loaded: list = []

    def keras_model():
        if not loaded:
            loaded.append(model() if callable(model) and not hasattr(model, "input_shape") else model)
        return loaded[0]

    def fallback(reason: str | None) -> FrozenModel:
        m = keras_model()
        if reason:
            _log_once(key, logging.WARNING, "LiteRT cannot run %s (%s); using TensorFlow", key, reason)
        return FrozenModel(
            _tensorflow_runner(m),
            engine="tensorflow",
            input_size=(int(m.input_shape[1]), int(m.input_shape[2])),
            fallback_reason=reason,
        )

    if settings.engine == "tensorflow":
        return fallback(None)
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError as exc:
        return fallback(f"ai-edge-litert is not installed ({exc})")

    threads = settings.num_threads
    tflite_path = record_path = None
    if cache_dir is not None:
        tflite_path, record_path = cache_paths(Path(cache_dir), name)
        cached, failed = _from_cache(Path(cache_dir), name, key, threads)
        if cached is not None:
            return cached
        if failed is not None:
            fm = fallback(failed)
            fm.cache_record = record_path
            return fm

    m = keras_model()  # a model that cannot load raises here: no conversion record is written
    try:
        content = convert(m)
        runner = LiteRTRunner(content, threads)
        probe = probe_input(runner.input_size)
        ref = np.asarray(m(probe, training=False), dtype=np.float32)
        got = runner(probe)
        cos = float(cosines(ref, got).min()) if ref.shape == got.shape else float("nan")
        if not cos >= MIN_PROBE_COSINE:
            raise ValueError(
                f"the converted model disagrees with the Keras model (output {got.shape} vs {ref.shape}, "
                f"cosine {cos:.4f} < {MIN_PROBE_COSINE})"
            )
    except Exception as exc:  # unsupported ops, export errors, a wrong conversion
        reason = f"conversion failed: {type(exc).__name__}: {_first_line(exc)}"
        # Remembered, so the next run does not spend the conversion again; a full disk or memory
        # shortage may pass, so those are tried again next time.
        if record_path is not None and not isinstance(exc, OSError | MemoryError):
            record = {"key": key, "format": FORMAT, "converter": converter_version(), "failed": reason}
            with contextlib.suppress(OSError):
                _write_cache_file(record_path, json.dumps(record).encode())
                fm = fallback(reason)
                fm.cache_record = record_path
                return fm
        return fallback(reason)

    if tflite_path is not None and record_path is not None:
        record = {
            "key": key,
            "format": FORMAT,
            "converter": converter_version(),
            "sha256": hashlib.sha256(content).hexdigest(),
            "probe_cosine": cos,
        }
        try:
            _write_cache_file(tflite_path, content)
            _write_cache_file(record_path, json.dumps(record).encode())
        except OSError as exc:
            _log_once(key, logging.WARNING, "could not cache the LiteRT model at %s (%s)", tflite_path, exc)
            record_path = None
    log.info("converted %s to LiteRT (probe cosine %.6f)", key, cos)
    return FrozenModel(
        runner, engine="litert", input_size=runner.input_size, threads=threads, cache_record=record_path
    )


def _from_cache(cache_dir: Path, name: str, key: str, threads: int) -> tuple[FrozenModel | None, str | None]:
    """``(model, None)`` from a valid cache, ``(None, reason)`` for a remembered failure, else ``(None, None)``.

    A cache that cannot be used (wrong checksum, a file LiteRT refuses) is logged once and
    reported as missing, so the caller converts again.
    """
    tflite_path, record_path = cache_paths(cache_dir, name)
    record = _read_record(record_path)
    if not record or record.get("key") != key or record.get("format") != FORMAT:
        return None, None
    if record.get("failed"):
        if record.get("converter") == converter_version():
            return None, str(record["failed"])
        return None, None  # another TensorFlow: try again
    try:
        content = tflite_path.read_bytes()
        if hashlib.sha256(content).hexdigest() != record.get("sha256"):
            raise ValueError("checksum mismatch")
        runner = LiteRTRunner(content, threads)
    except Exception as exc:  # truncated / garbage / unreadable file: convert again
        _log_once(
            key, logging.WARNING, "LiteRT cache %s is unusable (%s); converting again", tflite_path, exc
        )
        return None, None
    return (
        FrozenModel(
            runner, engine="litert", input_size=runner.input_size, threads=threads, cache_record=record_path
        ),
        None,
    )


def open_cached(
    cache_dir: Path | str, *, key: str, name: str = "litert", settings: EngineSettings | None = None
) -> FrozenModel | None:
    """A LiteRT model from a valid cache written by :func:`open_frozen`, without any conversion.

    Returns:
        The :class:`FrozenModel`, or None when the cache is missing, written for another key,
        unusable, records a failed conversion, or the settings ask for TensorFlow.
    """
    settings = settings or EngineSettings()
    if settings.engine != "litert":
        return None
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return None
    model, _ = _from_cache(Path(cache_dir), name, key, settings.num_threads)
    return model


def copy_cache(record: Path, dst_dir: Path | str, name: str) -> None:
    """Copy a cache entry (its ``.tflite`` if any, then its ``.json`` record) to ``<dst_dir>/<name>.*``.

    Each file is written temp-file-then-``os.replace``; the record goes last, so a reader never
    sees a record without its model.

    Raises:
        OSError: a file cannot be read or written.
    """
    data = record.read_bytes()
    tflite, dst_record = cache_paths(Path(dst_dir), name)
    source = record.with_suffix(".tflite")
    if source.exists():
        _write_cache_file(tflite, source.read_bytes())
    _write_cache_file(dst_record, data)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first informative line of an exception message, shortened (converter errors are long)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # the converter's message names the unsupported ops on a line starting with "tf."
    picked = next(
        (ln for ln in lines if "not supported" in ln or ln.startswith("tf.")), lines[0] if lines else ""
    )
    return picked[:limit]
