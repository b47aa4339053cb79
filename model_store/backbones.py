"""Frozen, ImageNet-pretrained feature extractors ("backbones") that turn images into bottlenecks.

Every backbone takes float32 RGB pixels in 0..255, shape ``(N, h, w, 3)``, does its own
normalisation inside the model, and returns one feature vector (the *bottleneck*) per image,
shape ``(N, D)`` float32. Because normalisation lives in the model, training and serving can never
disagree on preprocessing.

Three kinds of backbone, all reached through :func:`load_backbone`:

* the shipped ones, stored in ``model_store/assets/`` (licence notice in
  ``assets/BACKBONE_NOTICE.md``), needing no download: the default ``efficientnet_lite1``
  (EfficientNet-Lite1, 240x240 input, the more accurate) and ``efficientnet_lite0``
  (EfficientNet-Lite0, 224x224, the fast choice); docs/accuracy.md has the measurements;
* a ``keras.applications`` network by name (``mobilenet_v2``, ``mobilenet_v3_small``,
  ``mobilenet_v3_large``, ``efficientnet_b0``, ``inception_v3``, ``xception``, and retrain.py's own
  ``--architecture`` spellings such as ``mobilenet_0.50_224``), with ``weights="imagenet"``
  (Keras downloads and caches them under ``~/.keras``) or a local weights file;
* any local Keras 3 ``.keras`` file or TensorFlow SavedModel directory that maps
  ``(N, h, w, 3)`` float32 0..255 to ``(N, D)``.

Each backbone has a stable :attr:`Backbone.id` that keys the bottleneck cache: the same id means
the same features for the same image.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model_store.errors import BackboneUnavailableError

if TYPE_CHECKING:
    from model_store.engine import FrozenModel

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: Feature extractors shipped in ``assets/`` (converted by tools/convert_backbone.py; licence notice,
#: sources and parity figures in ``assets/BACKBONE_NOTICE.md``), by backbone spec name.
SHIPPED_BACKBONES: dict[str, Path] = {
    "efficientnet_lite0": ASSETS_DIR / "efficientnet_lite0_imagenet_features.keras",
    "efficientnet_lite1": ASSETS_DIR / "efficientnet_lite1_imagenet_features.keras",
}
DEFAULT_BACKBONE = "efficientnet_lite1"
SHIPPED_BACKBONE_FILE = SHIPPED_BACKBONES[DEFAULT_BACKBONE]


@dataclass
class Backbone:
    """A frozen feature extractor.

    Attributes:
        id: stable identifier, e.g. ``"efficientnet_lite0-imagenet-ca8f9c88"``; part of every
            bottleneck cache key.
        name: the spec it was loaded from (name or path), for reports.
        input_size: ``(height, width)`` in pixels the model expects.
        feature_dim: length D of the bottleneck vector.
        model: a ``keras.Model`` mapping float32 ``(N, h, w, 3)`` RGB 0..255 to float32 ``(N, D)``.
        engine: the ``engine.FrozenModel`` :meth:`features` runs on (set by :meth:`use_engine`),
            or None for the TensorFlow path.
    """

    id: str
    name: str
    input_size: tuple[int, int]
    feature_dim: int
    model: Any  # keras.Model (Keras ships no type stubs)
    engine: FrozenModel | None = field(default=None, repr=False)
    _tf: FrozenModel | None = field(default=None, repr=False)

    def use_engine(self, settings=None, *, cache_dir: Path | str | None = None) -> str:
        """Run :meth:`features` on the configured engine from now on (see ``model_store.engine``).

        Args:
            settings: an ``engine.EngineSettings`` (default: LiteRT, all cores).
            cache_dir: folder of the converted model's cache, keyed by :attr:`id`
                (None: convert in memory).

        Returns:
            The engine's description, e.g. ``"LiteRT/XNNPACK, 2 threads"``.
        """
        from model_store.engine import open_frozen

        self.engine = open_frozen(self.model, key=self.id, cache_dir=cache_dir, settings=settings)
        return self.engine.description

    def features(self, batch: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Bottlenecks for a batch of model inputs.

        Runs on the engine chosen with :meth:`use_engine`; without one, on the TensorFlow path.

        Args:
            batch: float32 array ``(N, h, w, 3)``, RGB 0..255, ``(h, w) == input_size``.
            batch_size: images per forward pass (bounds memory).

        Returns:
            float32 array ``(N, feature_dim)``.
        """
        engine = self.engine
        if engine is None:
            if self._tf is None:
                from model_store.engine import EngineSettings, open_frozen

                self._tf = open_frozen(self.model, key=self.id, settings=EngineSettings("tensorflow"))
            engine = self._tf
        batch = np.asarray(batch, dtype=np.float32)
        if len(batch) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        return engine(batch, batch_size=batch_size)


@dataclass(frozen=True)
class _KerasApp:
    ctor: str  # attribute name in keras.applications
    size: int
    preprocess: str  # "tf" = x/127.5 - 1 inside the model; "builtin" = the network normalises itself
    kwargs: tuple = ()


# keras.applications networks; "tf" preprocessing is what their preprocess_input does
# (keras.applications.mobilenet_v2.preprocess_input etc.: scale to -1..1).
KERAS_APPLICATIONS: dict[str, _KerasApp] = {
    "mobilenet_v2": _KerasApp("MobileNetV2", 224, "tf"),
    "mobilenet_v3_small": _KerasApp("MobileNetV3Small", 224, "builtin"),
    "mobilenet_v3_large": _KerasApp("MobileNetV3Large", 224, "builtin"),
    "efficientnet_b0": _KerasApp("EfficientNetB0", 224, "builtin"),
    "inception_v3": _KerasApp("InceptionV3", 299, "tf"),
    "xception": _KerasApp("Xception", 299, "tf"),
}

# retrain.py's --architecture spelling: mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128>[_quantized]
_RETRAIN_MOBILENET = re.compile(r"^mobilenet_(1\.0|0\.75|0\.50?|0\.25)_(224|192|160|128)(_quantized)?$")


def available_backbones() -> list[str]:
    """Names accepted by :func:`load_backbone` besides a file path (for help texts)."""
    others = [n for n in SHIPPED_BACKBONES if n != DEFAULT_BACKBONE]
    return [DEFAULT_BACKBONE, *others, *KERAS_APPLICATIONS, "mobilenet_<1.0|0.75|0.50|0.25>_<224|192|160|128>"]


def _file_digest(path: Path) -> str:
    """sha256 hex of a file, or of every file under a directory (sorted by relative path)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _from_model(model, *, id_: str, name: str) -> Backbone:
    shape = tuple(model.input_shape)
    out = tuple(model.output_shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[2] is None:
        raise BackboneUnavailableError(
            f"The backbone {name!r} must take a fixed-size RGB image (N, h, w, 3); it takes {shape}."
        )
    if len(out) != 2:
        raise BackboneUnavailableError(
            f"The backbone {name!r} must output one feature vector per image (N, D); it outputs {out}."
        )
    model.trainable = False
    return Backbone(
        id=id_, name=name, input_size=(int(shape[1]), int(shape[2])), feature_dim=int(out[1]), model=model
    )


def _load_local(path: Path) -> Backbone:
    import keras

    digest = _file_digest(path)[:12]
    try:
        if path.is_dir():
            if not (path / "saved_model.pb").exists():
                raise BackboneUnavailableError(f"{path} is a folder but not a TensorFlow SavedModel.")
            import tensorflow as tf

            sig = tf.saved_model.load(str(path)).signatures["serving_default"]
            (in_spec,) = sig.structured_input_signature[1].values()
            h, w = int(in_spec.shape[1]), int(in_spec.shape[2])
            layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
            inp = keras.Input((h, w, 3), dtype="float32", name="rgb_0_255")
            out = layer(inp)
            if isinstance(out, dict):
                (out,) = out.values()
            model = keras.Model(inp, out, name=f"savedmodel_{digest}")
        else:
            model = keras.models.load_model(path, compile=False)
    except BackboneUnavailableError:
        raise
    except Exception as exc:  # keras raises many types for unreadable files
        raise BackboneUnavailableError(f"Could not load the backbone file {path.name}: {exc}") from exc
    return _from_model(model, id_=f"file-{path.stem}-{digest}", name=str(path))


def _build_keras_app(app: _KerasApp, *, alpha: float | None, weights: str | None, size: int) -> object:
    import keras

    ctor = getattr(keras.applications, app.ctor)
    kwargs = dict(include_top=False, pooling="avg", weights=weights, input_shape=(size, size, 3))
    if alpha is not None:
        kwargs["alpha"] = alpha
    if app.preprocess == "builtin" and app.ctor.startswith("MobileNetV3"):
        kwargs["include_preprocessing"] = True
    base = ctor(**kwargs)
    inp = keras.Input((size, size, 3), dtype="float32", name="rgb_0_255")
    x = (
        keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")(inp)
        if app.preprocess == "tf"
        else inp
    )
    out = base(x, training=False)
    return keras.Model(inp, out, name=f"{app.ctor.lower()}_features")


def load_backbone(spec: str | None = None, *, weights: str | None = "imagenet") -> Backbone:
    """Load a frozen feature extractor.

    Args:
        spec: ``None`` for the shipped default (:data:`DEFAULT_BACKBONE`), a name from
            :data:`SHIPPED_BACKBONES` (``"efficientnet_lite1"``, ``"efficientnet_lite0"``); a name from
            :data:`KERAS_APPLICATIONS` or a retrain.py architecture such as ``"mobilenet_0.50_224"``
            (keras.applications MobileNet, alpha 0.5, 224x224) or ``"inception_v3"``; or a path
            to a ``.keras`` file / SavedModel directory mapping float32 RGB 0..255 to ``(N, D)``.
        weights: for keras.applications only: ``"imagenet"`` (downloaded once by Keras into
            ``~/.keras/models``), a path to a local weights file (``.h5`` / ``.weights.h5`` as
            published for that network with ``include_top=False``), or ``None`` for random
            initial weights (only useful for tests). Ignored for the shipped default and files.

    Returns:
        A :class:`Backbone`.

    Raises:
        BackboneUnavailableError: unknown name, unreadable file, or ImageNet weights that cannot be
            downloaded (the message says how to pass a local weights file instead).
    """
    spec = spec or DEFAULT_BACKBONE
    if spec in SHIPPED_BACKBONES:
        import keras

        shipped = SHIPPED_BACKBONES[spec]
        model = keras.models.load_model(shipped, compile=False)
        digest = _file_digest(shipped)[:8]
        return _from_model(model, id_=f"{spec}-imagenet-{digest}", name=spec)

    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path)

    m = _RETRAIN_MOBILENET.match(spec)
    if m:
        if m.group(3):
            raise BackboneUnavailableError(
                "Quantized MobileNet graphs from retrain.py are not supported; use the float "
                f"architecture {spec.removesuffix('_quantized')!r} and export TFLite afterwards."
            )
        alpha, size = float(m.group(1)), int(m.group(2))
        app, key = _KerasApp("MobileNet", size, "tf"), f"mobilenet_{alpha:.2f}_{size}"
    elif spec in KERAS_APPLICATIONS:
        app, alpha, size, key = KERAS_APPLICATIONS[spec], None, KERAS_APPLICATIONS[spec].size, spec
    else:
        raise BackboneUnavailableError(
            f"Unknown backbone {spec!r}. Use one of: {', '.join(available_backbones())}, "
            "or a path to a .keras file or SavedModel folder."
        )

    if weights in (None, "none"):
        weights_id, weights_arg = "random", None
    elif weights == "imagenet":
        weights_id, weights_arg = "imagenet", "imagenet"
    else:
        wpath = Path(weights).expanduser()
        if not wpath.is_file():
            raise BackboneUnavailableError(f"The weights file {weights!r} does not exist.")
        weights_id, weights_arg = f"file-{_file_digest(wpath)[:12]}", str(wpath)
    try:
        model = _build_keras_app(app, alpha=alpha, weights=weights_arg, size=size)
    except Exception as exc:  # download errors surface as URLError/OSError/Exception from get_file
        if weights_arg == "imagenet":
            raise BackboneUnavailableError(
                f"Could not download the ImageNet weights for {spec!r} ({type(exc).__name__}). "
                "Offline, download the no-top weights file for this network on a connected machine "
                "(Keras keeps it in ~/.keras/models/) and pass it with --weights PATH "
                "(or backbone_weights in the config), or use the shipped default backbone "
                f"{DEFAULT_BACKBONE!r}, which needs no download."
            ) from exc
        raise BackboneUnavailableError(f"Could not build the backbone {spec!r}: {exc}") from exc
    return _from_model(model, id_=f"{key}-{weights_id}", name=spec)
