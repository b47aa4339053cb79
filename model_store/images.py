"""Decoding untrusted image bytes into RGB arrays, and the backbone's eval transform.

Everything that reaches the model (photos sent in chat, image documents, folders imported by an
admin) goes through :func:`decode_image`. It accepts bytes from strangers, so it is written to
fail closed: every problem becomes a :class:`~model_store.errors.ImageDecodeError` whose
``.message`` is safe to show in chat, and the pixel count is checked from the header before any
pixel buffer is allocated.

Decisions worth knowing:

* Only the formats in ``_ALLOWED_FORMATS`` are opened (JPEG/MPO, PNG/APNG, WebP, GIF, BMP,
  TIFF, HEIC/HEIF). Pillow can open more (EPS, PSD, ...), but some of those hand the bytes to
  external programs (EPS runs Ghostscript) and none of them can be named by
  :func:`sniff_extension`, so they are refused like any other non-image.
* Truncated files are refused ("That image file is incomplete ..."): Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False), so a decoder that runs out of data
  raises, and we turn that into the typed error rather than classifying a half-grey picture.
* Embedded ICC profiles are not applied; pixels are taken as sRGB, as in the training data.
* Headers above Pillow's own bomb threshold are refused inside ``Image.open`` (before our check
  sees the size), so that "too large" message names the limit but not the dimensions.
* Broken EXIF metadata does not make an otherwise readable image fail: the orientation is then
  left as stored.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from model_store.errors import ImageDecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "decode_image",
    "sniff_extension",
    "to_model_input",
]

logger = logging.getLogger(__name__)

pillow_heif.register_heif_opener()

#: Largest image (width * height) :func:`decode_image` accepts by default.
#:
#: 40 megapixels is above what phones send by default (12-24 Mpx; Telegram "photos" are
#: recompressed to about 2560 px per side, so only files sent as documents or imported from
#: folders come near it) and above most scans, while bounding the work per image: decoding
#: needs about 9 bytes per pixel at peak (Pillow's 4-byte RGB buffer, the uint8 result and a
#: transient copy), i.e. ~360 MB and well under a second for 40 Mpx, which a small bot server
#: can afford. Opt-in full-resolution 48/50 Mpx phone shots are refused with a clear message;
#: callers that want them pass a larger ``max_pixels``. The value is also below Pillow's own
#: decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``, ~89 Mpx), so our check, which
#: reports the dimensions, is the one users normally meet.
DEFAULT_MAX_PIXELS = 40_000_000

#: File-name suffixes (lower case, with the dot) accepted when importing a folder of images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
)

# Pillow format id (``Image.format``) -> canonical extension used to name stored files.
_FORMAT_EXTENSIONS: dict[str, str] = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG written by some cameras; the first picture is a JPEG
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
    "HEIF": "heic",
}
# The only formats Image.open may try. MPO is not listed: Pillow opens it through the JPEG plugin.
_ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF")

_MSG_EMPTY = "That file is empty."
_MSG_NOT_IMAGE = "That doesn't look like an image I can read (JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC)."
_MSG_INCOMPLETE = "That image file is incomplete; it may have been cut off while sending."
_MSG_DAMAGED = "That image file is damaged and I can't read it."
_MSG_COLOURS = "That image uses a colour format I can't read."
_MSG_NO_MEMORY = "That image is too large for me to process right now."

_CENTER_CROP_FRACTION = 0.875  # the classic ImageNet eval crop: resize to size/0.875, crop size
_MODES = ("squash", "center_crop")

# Modes that carry an alpha channel (composited onto white).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes holding more than 8 bits per sample, scaled to 8 bit with numpy.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def _bomb_limit(max_pixels: int) -> int:
    """The limit in force when Pillow's own bomb guard refused an image."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return min(max_pixels, pillow_limit) if pillow_limit else max_pixels


def _too_large(limit: int, size: tuple[int, int] | None = None) -> ImageDecodeError:
    limit_text = f"{limit / 1_000_000:.3g} megapixels"
    if size is None:
        return ImageDecodeError(f"That image is too large; the limit is {limit_text}.")
    width, height = size
    return ImageDecodeError(f"That image is too large ({width}×{height} pixels); the limit is {limit_text}.")


def _check_bytes(data: object) -> bytes:
    if isinstance(data, memoryview):
        return data.tobytes()
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    raise TypeError(f"image data must be bytes, not {type(data).__name__}")


def _open(data: bytes, max_pixels_for_message: int) -> Image.Image:
    """Image.open restricted to our formats; header only, no pixels decoded.

    Must be called inside :func:`_bomb_guard`, which turns ``DecompressionBombWarning`` into an
    error.
    """
    if not data:
        raise ImageDecodeError(_MSG_EMPTY)
    try:
        return Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        logger.debug("refused by Pillow's decompression-bomb guard: %s", exc)
        raise _too_large(_bomb_limit(max_pixels_for_message)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(_MSG_NOT_IMAGE) from exc
    except MemoryError as exc:
        raise ImageDecodeError(_MSG_NO_MEMORY) from exc
    except Exception as exc:  # a plugin recognised the header, then choked on what followed
        logger.debug("image header could not be parsed: %r", exc)
        raise ImageDecodeError(_MSG_DAMAGED) from exc


@contextlib.contextmanager
def _bomb_guard() -> Iterator[None]:
    """Make Pillow's DecompressionBombWarning an exception for the duration of the block.

    ``warnings.catch_warnings`` is not thread-safe before Python 3.14: with concurrent decodes the
    "error" filter may briefly be missing in one thread (then our own ``max_pixels`` check, made
    right after ``Image.open``, still refuses the image) or outlive the block (then Pillow's bomb
    warning is an error elsewhere in the process too, which is only stricter). Neither weakens
    the limit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16-bit / 32-bit integer / float single-channel array to uint8 (not clip)."""
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = arr
        elif hi > lo:  # arbitrary range (float64: hi - lo may overflow float32)
            scaled = (arr.astype(np.float64) - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(arr)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 0xFFFF:
        # 16-bit samples (the normal case, also Pillow's "I" mode for 16-bit PNG/TIFF):
        # round(v * 255 / 65535) == round(v / 257).
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    # Genuine 32-bit data: stretch the used range linearly.
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    wide = arr.astype(np.int64) - lo
    return ((wide * 255 + (hi - lo) // 2) // (hi - lo)).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to mode RGB, alpha composited onto white."""
    mode = im.mode
    transparency = im.info.get("transparency")

    if mode in _WIDE_MODES:
        gray = _wide_to_uint8(np.asarray(im))
        if gray.ndim != 2:
            raise ImageDecodeError(_MSG_COLOURS)
        if isinstance(transparency, int) and mode != "F":
            alpha = np.where(np.asarray(im) == transparency, 0, 255).astype(np.uint8)
            im = Image.merge("LA", (Image.fromarray(gray, "L"), Image.fromarray(alpha, "L")))
        else:
            im = Image.fromarray(gray, "L")
        mode = im.mode
        transparency = None

    has_alpha = mode in _ALPHA_MODES or (transparency is not None and mode in ("P", "L", "RGB", "1"))
    if has_alpha:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, (0, 0), rgba)  # an RGBA mask means "use its alpha band"
        return background
    if mode == "RGB":
        return im
    return im.convert("RGB")


def _exif_transposed(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # broken EXIF must not hide a readable picture
        logger.debug("EXIF orientation ignored (unreadable metadata): %r", exc)
        return im


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode untrusted image bytes into an RGB array.

    Accepts JPEG (baseline, progressive, CMYK), PNG (any bit depth, palette, alpha, first frame
    of APNG), WebP (first frame), GIF (first frame), BMP, TIFF (first page) and HEIC/HEIF. The
    EXIF orientation is applied, alpha is composited onto white, palettes / grayscale / CMYK
    are converted, and 16-bit or 32-bit samples are scaled (not clipped) to 8 bit.

    The pixel count ``width * height`` is read from the header and compared with
    ``max_pixels`` before any pixel buffer is allocated. Pillow's own decompression-bomb guard
    (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 Mpx by default) also applies: an image above it is
    refused with the same "too large" error even if ``max_pixels`` is higher.

    Args:
        data: the complete file contents (``bytes``, ``bytearray`` or ``memoryview``).
        max_pixels: largest accepted ``width * height``; must be positive.

    Returns:
        A new, writable, C-contiguous ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``,
        RGB, in display orientation.

    Raises:
        ImageDecodeError: the data is empty, not an image in a supported format, truncated,
            damaged, or larger than ``max_pixels``. ``.message`` is a short sentence that is
            safe to show in chat (it never contains paths or Pillow's internal text).
        TypeError: ``data`` is not bytes-like (a programming error, not bad input).
        ValueError: ``max_pixels`` is not positive (a programming error).
    """
    data = _check_bytes(data)
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")

    with _bomb_guard():
        im = _open(data, max_pixels)
        try:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(_MSG_DAMAGED)
            if width * height > max_pixels:
                raise _too_large(max_pixels, (width, height))
            try:
                im.load()
            except OSError as exc:
                logger.debug("image data could not be decoded: %r", exc)
                if "truncat" in str(exc).lower():
                    raise ImageDecodeError(_MSG_INCOMPLETE) from exc
                raise ImageDecodeError(_MSG_DAMAGED) from exc
            im = _exif_transposed(im)
            try:
                rgb_image = _to_rgb(im)
            except ValueError as exc:  # "conversion not supported" for exotic modes
                logger.debug("image mode %s could not be converted: %r", im.mode, exc)
                raise ImageDecodeError(_MSG_COLOURS) from exc
            rgb = np.array(rgb_image, dtype=np.uint8)
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            logger.debug("refused by Pillow's decompression-bomb guard: %s", exc)
            raise _too_large(_bomb_limit(max_pixels)) from exc
        except MemoryError as exc:
            raise ImageDecodeError(_MSG_NO_MEMORY) from exc
        except Exception as exc:  # any other decoder failure (ValueError, EOFError, struct.error, ...)
            logger.debug("image data could not be decoded: %r", exc)
            raise ImageDecodeError(_MSG_DAMAGED) from exc
        finally:
            im.close()

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(_MSG_DAMAGED)
    return np.ascontiguousarray(rgb)


def sniff_extension(data: bytes) -> str:
    """Name the image format of ``data`` from its content (never from a file name).

    Only the header is parsed; pixels are not decoded, so bytes that pass here can still be
    refused by :func:`decode_image` (truncated, damaged, too large).

    Args:
        data: the file contents (``bytes``, ``bytearray`` or ``memoryview``).

    Returns:
        The canonical extension without a dot: one of ``"jpg"``, ``"png"``, ``"webp"``,
        ``"gif"``, ``"bmp"``, ``"tiff"``, ``"heic"``.

    Raises:
        ImageDecodeError: empty data, not an image in a supported format, a header Pillow
            cannot parse, or a header above Pillow's decompression-bomb limit.
        TypeError: ``data`` is not bytes-like.
    """
    data = _check_bytes(data)
    with _bomb_guard():
        im = _open(data, Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)
        try:
            fmt = im.format
        finally:
            im.close()
    try:
        return _FORMAT_EXTENSIONS[fmt or ""]
    except KeyError:
        raise ImageDecodeError(_MSG_NOT_IMAGE) from None


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
        rgb: ``(H, W, 3)`` ``uint8`` RGB array (as returned by :func:`decode_image`), H, W >= 1.
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
