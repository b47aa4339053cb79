"""Decoding untrusted image bytes into RGB arrays, and the backbone's eval transform.

Everything that reaches the model (photos sent in chat, image documents, folders imported by an
admin) goes through :func:`decode_image`. It accepts bytes from strangers, so it is written to
fail closed: every problem becomes a :class:`~model_store.errors.ImageDecodeError` that says
what is wrong as data (``reason``, ``size``, ``limit_pixels``; the bot words it for the chat), and the pixel count is checked from the header before any
pixel buffer is allocated.

Decisions worth knowing:

* What a decode costs is bounded by what is actually decoded (issue 8): after the header is read,
  :func:`decode_image` estimates the decode's peak memory (12-18 bytes per decoded pixel by format
  and mode, plus the coefficient buffer of a progressive JPEG) and reserves it from a process-wide
  :class:`DecodeBudget` (a semaphore weighted by bytes) before ``load()``, so concurrent decodes
  never hold more than the budget, whatever thread or caller they come from. A decode whose
  estimate alone is over the budget is refused as "too large".
* JPEGs are decoded with DCT scaling (``Image.draft``: 1/2, 1/4 or 1/8 inside libjpeg), so a
  200-megapixel phone photo costs what a ~12-megapixel one does; their header may be up to
  :data:`MAX_JPEG_PIXELS`; progressive JPEGs are DCT-scaled too, but keep a whole-image
  coefficient buffer, so their header may be up to :data:`MAX_PHONE_PIXELS`. Every other format
  is decoded at full size, so its limit is lower: ``max_pixels`` (HEIC and AVIF: at least
  :data:`MAX_PHONE_PIXELS`, phones' 48-50 Mpx photos), and for costly modes or formats with
  large decoder buffers (WebP: the animation decoder keeps two canvas-sized RGBA buffers, even
  for one 1x1 frame; 32-bit TIFF; alpha) the budget divided by the estimated cost per pixel.
  For animated WebP both the canvas and every frame's declared size are checked; for TIFF the
  tile or strip buffer libtiff allocates is counted (tiles far larger than the image are
  refused); for AVIF the AV1 sequence headers may not allow frames larger than the declared size.
* Only the formats in ``_ALLOWED_FORMATS`` are opened (JPEG/MPO, PNG/APNG, WebP, GIF, BMP,
  TIFF, HEIC/HEIF, AVIF). Pillow can open more (EPS, PSD, ...), but some of those hand the bytes to
  external programs (EPS runs Ghostscript) and none of them can be named by
  :func:`sniff_extension`, so they are refused like any other non-image.
* Truncated files are refused ("That image file is incomplete ..."): Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (False), so a decoder that runs out of data
  raises, and we turn that into the typed error rather than classifying a half-grey picture.
* Embedded ICC profiles are not applied; pixels are taken as sRGB, as in the training data.
* Pillow's own bomb threshold (``Image.MAX_IMAGE_PIXELS``) is raised to :data:`MAX_JPEG_PIXELS`
  when this module is imported (our per-format limits are all lower and are checked before any
  pixel is decoded); headers above it are refused inside ``Image.open`` (before our check sees
  the size), so that "too large" message names the limit but not the dimensions.
* Broken EXIF metadata does not make an otherwise readable image fail: the orientation is then
  left as stored.

Why this module is long (~700 lines): it is one fail-closed pipeline over untrusted bytes
(sniff -> open the header -> per-format limits -> memory plan -> reserve -> decode -> convert),
and its steps share the private limits, per-pixel costs and chat messages above; split further, a
reader would have to follow ~30 private names across modules to check one limit. The parts that
stand alone live elsewhere: the byte-weighted semaphore (``decode_budget``), the AVIF sequence
header parser (``avif_header``) and the model's eval transform (``preprocessing``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError, features

from model_store.avif_header import AvifHeaderError, av1_frame_sizes
from model_store.decode_budget import DECODE_BUDGET, DEFAULT_DECODE_BUDGET_BYTES, DecodeBudget
from model_store.errors import DecodeProblem, ImageDecodeError
from model_store.preprocessing import to_model_input  # imported from here by tests and benchmarks

__all__ = [
    "DECODE_BUDGET",
    "DEFAULT_DECODE_BUDGET_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DRAFT_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_JPEG_PIXELS",
    "MAX_PHONE_PIXELS",
    "DecodeBudget",
    "decode_image",
    "sniff_extension",
    "to_model_input",
]

logger = logging.getLogger(__name__)

pillow_heif.register_heif_opener()

#: Largest number of pixels :func:`decode_image` decodes by default, i.e. the limit for formats
#: decoded at full size (PNG, WebP, GIF, BMP, TIFF, HEIC, AVIF, progressive JPEG), and for a
#: baseline JPEG the limit of its DCT-scaled size.
#:
#: 40 megapixels is above what phones send as PNG/HEIC and above most scans, while bounding the
#: work per image (decoding costs up to 15 bytes per pixel at peak, see ``_COST_ALPHA_OR_WIDE``).
DEFAULT_MAX_PIXELS = 40_000_000

#: Largest HEIC, AVIF and progressive JPEG (width * height) accepted, also when ``max_pixels`` is
#: lower: phones' 48-50 megapixel photos (iPhone "HEIF Max" 8064x6048, 50 Mpx sensors 8160x6120).
#: These cost at most 12 bytes per pixel (HEIC, AVIF without alpha) or are DCT-scaled (progressive
#: JPEG), so they fit the decode budget, which stays the real bound (HEIC/AVIF with alpha: lower).
MAX_PHONE_PIXELS = 50_000_000

#: Largest baseline JPEG header (width * height) accepted: above the 200-megapixel sensors of
#: current phones (16320x12240). Such a JPEG is decoded DCT-scaled (see :data:`DRAFT_PIXELS`).
#: Pillow's own decompression-bomb threshold is raised to this value on import.
MAX_JPEG_PIXELS = 256_000_000

#: JPEGs are decoded at the largest DCT scale (1, 1/2, 1/4, 1/8) whose result has at most this
#: many pixels (1/8 if none does): a 48-megapixel photo decodes at 12 Mpx, a 200-megapixel one at
#: 3.1 Mpx. The classifier's input is 224-480 px, so nothing it sees is lost.
DRAFT_PIXELS = 12_000_000

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_JPEG_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_JPEG_PIXELS

#: File-name suffixes (lower case, with the dot) accepted when importing a folder of images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
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
    "AVIF": "avif",
}
# The only formats Image.open may try. MPO is not listed: Pillow opens it through the JPEG plugin.
# AVIF is decoded by Pillow itself (>= 11.3 wheels bundle libavif).
_ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF") + (
    ("AVIF",) if features.check("avif") else ()
)

#: Estimated peak bytes per decoded pixel (:func:`_bytes_per_pixel`), measured as the peak-RSS
#: increase of one full-size 40-megapixel decode (tests/test_decode_budget.py prints such
#: figures) and rounded up: Pillow's image (1-4 bytes per pixel), the RGB conversion or alpha
#: composite (4 + 4), the uint8 result (3). 16-bit and alpha images need the most; WebP always
#: goes through libwebp's animation decoder, which keeps two canvas-sized RGBA buffers, and
#: Pillow copies the frame once more (15 bytes per canvas pixel measured, for a 1x1 frame too).
_COST_PLAIN = 12
_COST_ALPHA_OR_WIDE = 15
# 32-bit samples (modes "I", "F"): Pillow's image (4), its copy for numpy (``tobytes`` joins
# 4-byte chunks: 4 + 4), the in-place scaling temporary (4), then the 8-bit image, the RGB
# conversion and the result (1 + 4 + 3, after the temporaries are gone). 17.1 measured (40 Mpx).
_COST_WIDE32 = 18
# HEIC / AVIF without alpha: the library's YUV planes and RGB buffer, Pillow's copy, the result.
# Peak measured at 48.8 Mpx (8064x6048, full size): HEIC 8-bit 10.1, HEIC 10-bit 11.3, AVIF 8-bit
# 10.3 bytes per pixel (AVIF with alpha 14.1: ``_COST_ALPHA_OR_WIDE``).
_COST_HEIF = 12
_COST_CMYK = 15  # Pillow's CMYK image (4), the RGB conversion (4), the result (3), libtiff's strips
_COST_WEBP = 18
_COST_JPEG = 14  # per DCT-scaled pixel, plus the coefficient buffer of a progressive JPEG
_FORMAT_NAMES = {"JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP", "HEIF": "HEIC", "TIFF": "TIFF", "AVIF": "AVIF"}


# Modes that carry an alpha channel (composited onto white).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes holding more than 8 bits per sample, scaled to 8 bit with numpy.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def _sniff_format(data: bytes) -> str:
    """The Pillow format id a file's magic bytes announce ("" if none of ours): for messages only."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG"):
        return "PNG"
    if head.startswith(b"GIF8"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith((b"II*\0", b"MM\0*")):
        return "TIFF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        return "AVIF" if b"avif" in head[8:32] or b"avis" in head[8:32] else "HEIF"
    return ""


def _format_limit(fmt: str, max_pixels: int, capacity: int) -> tuple[int, str]:
    """The header pixel limit of a format in its cheapest mode, and the format named when the
    budget (not ``max_pixels``) sets it: what a "too large" message gives when the exact mode is
    not known (Pillow's own bomb guard refused the file while opening it)."""
    if fmt in ("JPEG", "MPO"):
        limit, what = MAX_JPEG_PIXELS, ""
    else:
        bpp = _COST_WEBP if fmt == "WEBP" else _COST_PLAIN
        base = max(max_pixels, MAX_PHONE_PIXELS) if fmt in ("HEIF", "AVIF") else max_pixels
        limit = min(base, capacity // bpp)
        what = _format_name(fmt) if limit < base else ""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return (min(limit, pillow_limit) if pillow_limit else limit), what


def _bomb_limit(data: bytes, max_pixels: int, capacity: int) -> tuple[int, str]:
    """The limit in force when Pillow's own bomb guard refused an image: that of its format."""
    return _format_limit(_sniff_format(data), max_pixels, capacity)


def _too_large(limit: int, size: tuple[int, int] | None = None, what: str = "") -> ImageDecodeError:
    return ImageDecodeError(reason=DecodeProblem.TOO_LARGE, size=size, limit_pixels=limit, image_format=what)


def _check_bytes(data: object) -> bytes:
    if isinstance(data, memoryview):
        return data.tobytes()
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    raise TypeError(f"image data must be bytes, not {type(data).__name__}")


def _open(data: bytes, max_pixels: int, capacity: int) -> Image.Image:
    """Image.open restricted to our formats; header only, no pixels decoded.

    Must be called inside :func:`_bomb_guard`, which turns ``DecompressionBombWarning`` into an
    error. ``max_pixels`` and ``capacity`` (the budget's) only word the "too large" message.
    """
    if not data:
        raise ImageDecodeError(reason=DecodeProblem.EMPTY)
    try:
        return Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        logger.debug("refused by Pillow's decompression-bomb guard: %s", exc)
        limit, what = _bomb_limit(data, max_pixels, capacity)
        raise _too_large(limit, what=what) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(reason=DecodeProblem.NOT_IMAGE) from exc
    except MemoryError as exc:
        raise ImageDecodeError(reason=DecodeProblem.NO_MEMORY) from exc
    except Exception as exc:  # a plugin recognised the header, then choked on what followed
        logger.debug("image header could not be parsed: %r", exc)
        raise ImageDecodeError(reason=DecodeProblem.DAMAGED) from exc


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


def _webp_frames(data: bytes) -> tuple[tuple[int, int] | None, list[tuple[int, int, int, int]]]:
    """The canvas size (VP8X) and the frames (x, y, width, height) declared by ANMF chunks.

    Only chunk headers are read (at most 4096 chunks); a malformed layout ends the walk (libwebp
    then refuses the file when it is opened).
    """
    canvas = None
    frames: list[tuple[int, int, int, int]] = []
    pos, end = 12, min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    for _ in range(4096):
        if pos + 8 > end:
            break
        tag, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + min(size, 16)]
        if tag == b"VP8X" and len(body) >= 10:
            canvas = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
        elif tag == b"ANMF" and len(body) >= 12:
            x, y, w, h = (int.from_bytes(body[i : i + 3], "little") for i in (0, 3, 6, 9))
            frames.append((2 * x, 2 * y, w + 1, h + 1))
        pos += 8 + size + (size & 1)
    return canvas, frames


def _bytes_per_pixel(im: Image.Image) -> int:
    """Estimated peak bytes per decoded pixel of an opened image (by format and mode)."""
    fmt = im.format or ""
    if fmt in ("JPEG", "MPO"):
        return _COST_JPEG
    if fmt == "WEBP":
        return _COST_WEBP
    if im.mode in ("I", "F"):
        return _COST_WIDE32
    if im.mode == "CMYK":
        return _COST_CMYK
    if im.mode in _WIDE_MODES or im.mode in _ALPHA_MODES or "transparency" in im.info:
        return _COST_ALPHA_OR_WIDE
    if fmt in ("HEIF", "AVIF"):
        return _COST_HEIF
    return _COST_PLAIN


#: Largest TIFF tile side accepted when the tile is larger than the image (rounded up to a
#: multiple of 16, as the TIFF spec requires for tile sides): writers use 128-1024.
_TIFF_MAX_OVERSIZED_TILE_SIDE = 1024


def _tiff_buffer_bytes(im: Image.Image) -> int:
    """Bytes of libtiff's tile or strip buffer for the first page of an opened TIFF, 0 otherwise.

    libtiff allocates one whole decoded tile (TileWidth x TileLength, tags 322/323) or strip
    (ImageWidth x min(RowsPerStrip, ImageLength), tag 278) at a time, in samples per pixel (277)
    times bytes per sample (258), and at least 4 bytes per pixel when it reads RGBA. A tile is not
    bounded by the image: a 158-byte file with a 64x64 image and 32768x32768 tiles made it allocate
    1 GiB. Tiles far larger than their image are refused as damaged.

    Raises:
        ImageDecodeError: a tile side larger than the image's side rounded up to 16 and larger
            than 1024 (damaged).
    """
    if (im.format or "") != "TIFF":
        return 0
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return 0
    width, height = im.size

    def _int(tag: int, default: int) -> int:
        value = tags.get(tag, default)
        if isinstance(value, tuple):
            value = max(value) if value else default
        try:
            return max(1, int(value))
        except (TypeError, ValueError):
            return default

    samples = _int(277, 1)
    bytes_per_sample = -(-_int(258, 1) // 8)
    pixel_bytes = max(samples * bytes_per_sample, 4)
    if 322 in tags or 323 in tags:
        tile_w, tile_h = _int(322, width), _int(323, height)
        for side, image_side in ((tile_w, width), (tile_h, height)):
            if side > max(-(-image_side // 16) * 16, _TIFF_MAX_OVERSIZED_TILE_SIDE):
                raise ImageDecodeError(reason=DecodeProblem.DAMAGED)
        return tile_w * tile_h * pixel_bytes
    rows = min(_int(278, height), height)
    return width * rows * pixel_bytes


def _check_avif_frames(data: bytes, width: int, height: int) -> None:
    """Refuse an AVIF whose AV1 frames may be larger than the size its ``ispe`` box declares.

    Pillow reports (and the estimate uses) the ``ispe`` size, but the AV1 decoder decodes the
    size of the stream's sequence header: a 2 kB file declaring 64x64 with a 12000x12000 frame
    peaked at 299 MB. Every AV1 item and track may decode at most ``width`` x ``height``.

    Raises:
        ImageDecodeError: a larger frame, or no readable AV1 sequence header (damaged).
    """
    try:
        sizes = av1_frame_sizes(data)
    except AvifHeaderError as exc:
        logger.debug("AVIF container or AV1 sequence header unreadable: %s", exc)
        raise ImageDecodeError(reason=DecodeProblem.DAMAGED) from exc
    if not sizes or any(w > width or h > height for w, h in sizes):
        logger.debug("AVIF frames %s do not fit its declared size %dx%d", sizes, width, height)
        raise ImageDecodeError(reason=DecodeProblem.DAMAGED)


def _format_name(fmt: str) -> str:
    return _FORMAT_NAMES.get(fmt, fmt)


@dataclass(frozen=True)
class _Plan:
    """How one opened image will be decoded: DCT scale (JPEG) and the estimated peak bytes."""

    scale: int  # JPEG DCT scale denominator (1, 2, 4 or 8); 1 for other formats
    decoded: tuple[int, int]  # (width, height) after DCT scaling
    cost: int  # estimated peak bytes of the decode


def _jpeg_coefficient_bytes(im: Image.Image) -> int:
    """Bytes of libjpeg's whole-image coefficient buffer (progressive JPEGs keep one)."""
    width, height = im.size
    layers = getattr(im, "layer", None) or []
    try:
        hmax = max(int(layer[1]) for layer in layers)
        vmax = max(int(layer[2]) for layer in layers)
        blocks = sum(
            math.ceil(math.ceil(width * int(layer[1]) / hmax) / 8) * math.ceil(math.ceil(height * int(layer[2]) / vmax) / 8)
            for layer in layers
        )
    except (ValueError, TypeError, IndexError, ZeroDivisionError):
        blocks = 4 * math.ceil(width / 8) * math.ceil(height / 8)  # up to 4 full-size components
    return blocks * 64 * 2  # 64 int16 coefficients per 8x8 block


def _dct_scale(width: int, height: int, target_pixels: int, max_side: int | None) -> int:
    """The JPEG DCT scale denominator (1, 2, 4 or 8) to decode with.

    The smallest scale whose result has at most ``target_pixels`` (8 if none does); with
    ``max_side``, a larger scale if the result's longer side still stays at least ``max_side``.
    """
    by_pixels = next((s for s in (1, 2, 4, 8) if -(-width // s) * -(-height // s) <= target_pixels), 8)
    if max_side is None:
        return by_pixels
    by_side = max((s for s in (1, 2, 4, 8) if -(-max(width, height) // s) >= max_side), default=1)
    return max(by_pixels, by_side)


def _plan(
    im: Image.Image, data: bytes, max_pixels: int, budget: DecodeBudget, max_side: int | None = None
) -> _Plan:
    """Check an opened (not loaded) image against the limits and estimate what decoding it costs.

    JPEGs are DCT-scaled here (``Image.draft``), so the returned plan describes the scaled decode.

    Args:
        im: from ``Image.open``, pixels not loaded yet.
        data: the file's bytes (WebP frame headers are read from them).
        max_pixels: largest number of pixels decoded (full-size formats: the image; JPEG: the
            DCT-scaled image).
        budget: its ``capacity`` is the largest estimate accepted.
        max_side: if given, JPEGs are not DCT-scaled below this longer side.

    Returns:
        The plan (DCT scale, decoded size, estimated peak bytes).

    Raises:
        ImageDecodeError: over a limit ("too large", naming the dimensions and the limit), or a
            frame outside its canvas (damaged).
    """
    width, height = im.size
    fmt = im.format or ""
    pixels = width * height
    bpp = _bytes_per_pixel(im)
    if fmt in ("JPEG", "MPO"):
        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        extra = _jpeg_coefficient_bytes(im) if progressive else 0
        header_limit = MAX_JPEG_PIXELS if not progressive else max(max_pixels, MAX_PHONE_PIXELS)
        if pixels > header_limit:
            raise _too_large(header_limit, (width, height), "progressive JPEG" if progressive else "")
        scale = _dct_scale(width, height, min(DRAFT_PIXELS, max_pixels), max_side)
        if scale > 1:
            im.draft(im.mode, (max(1, width // scale), max(1, height // scale)))
        decoded = im.size
        if decoded[0] * decoded[1] > max_pixels:
            raise _too_large(min(MAX_JPEG_PIXELS, 64 * max_pixels), (width, height))
        cost = decoded[0] * decoded[1] * bpp + extra
        if cost > budget.capacity:
            limit = max(1, (budget.capacity - extra) // bpp) if extra < budget.capacity else max_pixels
            raise _too_large(min(limit, header_limit), (width, height), "progressive JPEG" if progressive else "JPEG")
        return _Plan(scale, decoded, cost)

    base = max(max_pixels, MAX_PHONE_PIXELS) if fmt in ("HEIF", "AVIF") else max_pixels
    limit = min(base, budget.capacity // bpp)
    what = _format_name(fmt) if limit < base else ""
    if pixels > limit:
        raise _too_large(limit, (width, height), what)
    if fmt == "AVIF":
        _check_avif_frames(data, width, height)
    extra = _tiff_buffer_bytes(im)
    if pixels * bpp + extra > budget.capacity:
        if extra >= budget.capacity:
            raise ImageDecodeError(reason=DecodeProblem.NO_MEMORY)
        raise _too_large((budget.capacity - extra) // bpp, (width, height), _format_name(fmt))
    if fmt == "WEBP":
        canvas, frames = _webp_frames(data)
        cw, ch = canvas or (width, height)
        if cw * ch > limit:
            raise _too_large(limit, (cw, ch), what)
        for x, y, w, h in frames:
            if w * h > limit:
                raise _too_large(limit, (w, h), what)
            if x + w > cw or y + h > ch:
                raise ImageDecodeError(reason=DecodeProblem.DAMAGED)
    return _Plan(1, (width, height), pixels * bpp + extra)


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16-bit / 32-bit integer / float single-channel array to uint8 (not clip).

    Works in place on one temporary (4 bytes per pixel for float and 16-bit data, 8 for genuine
    32-bit integers), then the 1-byte result: the decode's peak is bounded by the per-mode cost.
    """
    if arr.dtype.kind == "f":
        work = arr.astype(np.float32)  # a copy, then everything in place
        np.nan_to_num(work, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(work.min()), float(work.max())
        if lo >= 0.0 and hi <= 1.0:
            work *= 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif hi > lo:  # arbitrary range; scale first, so that nothing overflows float32
            scale = 255.0 / (hi - lo)  # Python floats (float64): hi - lo is finite
            work *= np.float32(scale)
            work -= np.float32(lo * scale)
        else:
            work[...] = 0.0
        np.rint(work, out=work)
        np.clip(work, 0.0, 255.0, out=work)
        return work.astype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi <= 0xFFFF:
        # 16-bit samples (the normal case, also Pillow's "I" mode for 16-bit PNG/TIFF):
        # round(v * 255 / 65535) == round(v / 257). In place: one temporary, not three.
        wide = arr.astype(np.uint32)
        wide += 128
        wide //= 257
        return wide.astype(np.uint8)
    # Genuine 32-bit data: stretch the used range linearly, in place in int64 (no overflow:
    # (hi - lo) * 255 < 2**40).
    if hi == lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    wide = arr.astype(np.int64)
    wide -= lo
    wide *= 255
    wide += (hi - lo) // 2
    wide //= hi - lo
    return wide.astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to mode RGB, alpha composited onto white."""
    mode = im.mode
    transparency = im.info.get("transparency")

    if mode in _WIDE_MODES:
        gray = _wide_to_uint8(np.asarray(im))
        if gray.ndim != 2:
            raise ImageDecodeError(reason=DecodeProblem.COLOURS)
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


_ARRAY_BAND_PIXELS = 1 << 20  # rows per slice of :func:`_to_array`: about 1 Mpx (3 MB) at a time


def _to_array(im: Image.Image) -> np.ndarray:
    """An RGB image as a new, writable ``(H, W, 3)`` uint8 array, copied in bands of rows.

    ``np.array(im)`` goes through ``im.tobytes()`` (encoded chunks, then joined: twice the image)
    and copies once more; band by band the extra memory is ~3 MB instead of 9 bytes per pixel.
    """
    width, height = im.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _ARRAY_BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = np.asarray(im.crop((0, top, width, bottom)), dtype=np.uint8)
    return out


def _exif_transposed(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # broken EXIF must not hide a readable picture
        logger.debug("EXIF orientation ignored (unreadable metadata): %r", exc)
        return im


_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F"})


def _reduced(im: Image.Image, max_side: int | None) -> Image.Image:
    """``im`` box-reduced by an integer factor so that its longer side stays >= ``max_side``."""
    if max_side is None:
        return im
    factor = max(im.size) // max_side
    if factor < 2:
        return im
    if im.mode not in _REDUCIBLE_MODES:
        return im
    return im.reduce(factor)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Decode untrusted image bytes into an RGB array, within a memory budget.

    Accepts JPEG (baseline, progressive, CMYK), PNG (any bit depth, palette, alpha, first frame
    of APNG), WebP (first frame), GIF (first frame), BMP, TIFF (first page), HEIC/HEIF and AVIF.
    The EXIF orientation is applied, alpha is composited onto white, palettes / grayscale / CMYK
    are converted, and 16-bit or 32-bit samples are scaled (not clipped) to 8 bit.

    The header is read first; the limits are checked and the decode's peak memory is estimated
    from it, and that estimate is reserved from ``budget`` before any pixel is decoded (so the
    call may wait for other decodes to finish). Limits, all checked before decoding:

    * baseline JPEG: header up to :data:`MAX_JPEG_PIXELS`; decoded DCT-scaled (1/2, 1/4, 1/8) to
      at most :data:`DRAFT_PIXELS` where possible, and the scaled size at most ``max_pixels``.
      The returned array then has the scaled size (e.g. 4080x3060 for a 16320x12240 photo);
    * other formats (and progressive JPEG): ``width * height`` at most ``max_pixels``, and the
      estimated peak bytes at most ``budget.capacity`` (for WebP this is the lower limit); for
      animated WebP the canvas and every frame.

    Args:
        data: the complete file contents (``bytes``, ``bytearray`` or ``memoryview``).
        max_pixels: largest number of pixels decoded; must be positive.
        max_side: if given, the image is reduced (DCT scaling for JPEG, then an integer box
            reduction) while its longer side stays at least ``max_side`` pixels: for callers
            that only need a small image (classification), this bounds the conversions' cost.
        budget: where the decode's memory is reserved; None uses :data:`DECODE_BUDGET`.

    Returns:
        A new, writable, C-contiguous ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``,
        RGB, in display orientation.

    Raises:
        ImageDecodeError: the data is empty, not an image in a supported format, truncated,
            damaged, or over a limit. ``.message`` is a short sentence that is safe to show in
            chat (it never contains paths or Pillow's internal text).
        TypeError: ``data`` is not bytes-like (a programming error, not bad input).
        ValueError: ``max_pixels`` or ``max_side`` is not positive (a programming error).
    """
    data = _check_bytes(data)
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    budget = DECODE_BUDGET if budget is None else budget

    with _bomb_guard():
        im = _open(data, max_pixels, budget.capacity)
        try:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(reason=DecodeProblem.DAMAGED)
            plan = _plan(im, data, max_pixels, budget, max_side)
            with budget.reserve(plan.cost):
                try:
                    im.load()
                except OSError as exc:
                    logger.debug("image data could not be decoded: %r", exc)
                    if "truncat" in str(exc).lower():
                        raise ImageDecodeError(reason=DecodeProblem.INCOMPLETE) from exc
                    raise ImageDecodeError(reason=DecodeProblem.DAMAGED) from exc
                im = _reduced(im, max_side)
                im = _exif_transposed(im)
                try:
                    rgb_image = _to_rgb(im)
                except ValueError as exc:  # "conversion not supported" for exotic modes
                    logger.debug("image mode %s could not be converted: %r", im.mode, exc)
                    raise ImageDecodeError(reason=DecodeProblem.COLOURS) from exc
                rgb_image = _reduced(rgb_image, max_side)
                rgb = _to_array(rgb_image)
                del rgb_image
        except ImageDecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            logger.debug("refused by Pillow's decompression-bomb guard: %s", exc)
            limit, what = _bomb_limit(data, max_pixels, budget.capacity)
            raise _too_large(limit, what=what) from exc
        except MemoryError as exc:
            raise ImageDecodeError(reason=DecodeProblem.NO_MEMORY) from exc
        except Exception as exc:  # any other decoder failure (ValueError, EOFError, struct.error, ...)
            logger.debug("image data could not be decoded: %r", exc)
            raise ImageDecodeError(reason=DecodeProblem.DAMAGED) from exc
        finally:
            im.close()

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(reason=DecodeProblem.DAMAGED)
    return np.ascontiguousarray(rgb)


def sniff_extension(data: bytes) -> str:
    """Name the image format of ``data`` from its content (never from a file name).

    Only the header is parsed; pixels are not decoded, so bytes that pass here can still be
    refused by :func:`decode_image` (truncated, damaged, too large).

    Args:
        data: the file contents (``bytes``, ``bytearray`` or ``memoryview``).

    Returns:
        The canonical extension without a dot: one of ``"jpg"``, ``"png"``, ``"webp"``,
        ``"gif"``, ``"bmp"``, ``"tiff"``, ``"heic"``, ``"avif"``.

    Raises:
        ImageDecodeError: empty data, not an image in a supported format, a header Pillow
            cannot parse, or a header above Pillow's decompression-bomb limit.
        TypeError: ``data`` is not bytes-like.
    """
    data = _check_bytes(data)
    with _bomb_guard():
        im = _open(data, DEFAULT_MAX_PIXELS, DECODE_BUDGET.capacity)
        try:
            fmt = im.format
        finally:
            im.close()
    try:
        return _FORMAT_EXTENSIONS[fmt or ""]
    except KeyError:
        raise ImageDecodeError(reason=DecodeProblem.NOT_IMAGE) from None
