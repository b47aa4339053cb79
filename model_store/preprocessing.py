"""The backbone's eval transform: a decoded RGB image resized (or centre-cropped) to the model's input.

Training (the bottleneck cache), the gate and serving all call :func:`to_model_input` with
``mode=bottlenecks.PREPROCESSING_MODE``, so the model sees the same pixels in each.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_model_input"]

_CENTER_CROP_FRACTION = 0.875  # the classic ImageNet eval crop: resize to size/0.875, crop size
_MODES = ("squash", "center_crop")


def to_model_input(
    rgb: np.ndarray,
    size: tuple[int, int] = (224, 224),
    *,
    mode: str = "squash",
    crop_fraction: float = _CENTER_CROP_FRACTION,
) -> np.ndarray:
    """The backbone's eval transform: an RGB image resized to the model's input size.

    Modes (Pillow BICUBIC resampling in both):

    * ``"squash"``: the whole image is resized to ``size``; the aspect ratio is not kept and
      nothing is cropped.
    * ``"center_crop"``: the image is scaled so that it covers ``size / crop_fraction`` (the
      shorter side, relative to the target, becomes ``target / crop_fraction``; 0.875 is the
      classic ImageNet eval crop, 1.0 keeps the whole shorter side), then the central ``size``
      region is taken. Implemented by resampling only that source box, so extreme aspect
      ratios (e.g. 2000x20) never build a huge intermediate image.

    Args:
        rgb: ``(H, W, 3)`` ``uint8`` RGB array (as returned by :func:`model_store.images.decode_image`), H, W >= 1.
        size: target ``(height, width)``, as in ``Backbone.input_size``.
        mode: ``"squash"`` or ``"center_crop"``.
        crop_fraction: for ``"center_crop"``: share (0..1] of the scaled shorter side kept.

    Returns:
        A new ``(height, width, 3)`` ``float32`` array with values in 0..255 (not normalised:
        the backbone normalises inside the model).

    Raises:
        ValueError: ``rgb`` is not a non-empty ``(H, W, 3)`` uint8 array, ``size`` is not two
            positive integers, ``mode`` is unknown or ``crop_fraction`` is not in (0, 1].
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("rgb must be an (H, W, 3) uint8 array")
    src_h, src_w = int(rgb.shape[0]), int(rgb.shape[1])
    if src_h < 1 or src_w < 1:
        raise ValueError("rgb must have at least one pixel")
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"size must be two positive integers (height, width), got {size!r}")
    out_h, out_w = int(size[0]), int(size[1])

    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if mode == "squash":
        resized = image.resize((out_w, out_h), Image.Resampling.BICUBIC)
    else:
        # Scale factor of the (virtual) resize that makes the image cover size / crop_fraction.
        scale = max(out_h / crop_fraction / src_h, out_w / crop_fraction / src_w)
        box_w, box_h = min(out_w / scale, src_w), min(out_h / scale, src_h)  # float round-off at 1.0
        left, top = max(0.0, (src_w - box_w) / 2.0), max(0.0, (src_h - box_h) / 2.0)
        resized = image.resize(
            (out_w, out_h), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h)
        )
    return np.asarray(resized, dtype=np.float32)  # the uint8 -> float32 cast makes a new, writable array
