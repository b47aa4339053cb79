"""Property test: whatever bytes arrive, decode_image returns an RGB array or raises ImageDecodeError.

Inputs are random bytes, random bytes behind real magic numbers, and mutations of real images in
every supported format (bit flips, truncations, header overwrites, insertions/deletions, splices of
one format's header onto another's body, and PNG headers with forged dimensions and valid CRCs).
Each example has a 2 s deadline, and the process RSS must stay within ``RSS_GROWTH_LIMIT`` of what
it was after warm-up: a forged header may claim up to DEFAULT_MAX_PIXELS (40 Mpx, ~160 MB in
Pillow) and is then decoded, so the bound allows a few such buffers but nothing near what an
unchecked header (up to 4 G pixels) would allocate.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model_store.errors import ImageDecodeError
from model_store.images import decode_image, sniff_extension

DATA = Path(__file__).resolve().parent / "data"
EXTENSIONS = {"jpg", "png", "webp", "gif", "bmp", "tiff", "heic"}
RSS_GROWTH_LIMIT = 1024 * 1024 * 1024
FUZZ_SETTINGS = settings(
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _make_seeds() -> list[bytes]:
    """Small real images (a downscaled clothing photo) in every format and several modes."""
    photo_path = sorted((DATA / "clothing" / "shoes").glob("*.jpg"))[0]
    photo = Image.open(photo_path).convert("RGB")
    photo.thumbnail((64, 64))
    gray16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50)
    seeds = [
        photo_path.read_bytes(),
        _encode(photo, "JPEG", quality=80, progressive=True),
        _encode(photo, "JPEG", quality=80, exif=exif),
        _encode(photo.convert("CMYK"), "JPEG", quality=80),
        _encode(photo, "PNG"),
        _encode(photo.convert("P"), "PNG", transparency=0),
        _encode(rgba, "PNG"),
        _encode(gray16, "PNG"),
        _encode(photo, "WEBP", quality=80),
        _encode(rgba, "WEBP", lossless=True),
        _encode(photo.convert("P"), "GIF"),
        animated.getvalue(),
        _encode(photo, "BMP"),
        _encode(photo, "TIFF"),
        _encode(photo, "TIFF", compression="tiff_lzw"),
        _encode(gray16, "TIFF"),
        _encode(photo, "HEIF", quality=60),
        (DATA / "cases" / "tiny_1x1.png").read_bytes(),
    ]
    for seed in seeds:  # every seed itself must decode
        decode_image(seed)
    return seeds


SEEDS = _make_seeds()
MAGICS = [
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xdb",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x00\x18ftypheic",
    b"\x00\x00\x00\x1cftypmif1",
]

# Pillow warns (UserWarning) about the garbage it skips over; expected here, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_PROCESS = psutil.Process()
_RSS_START = _PROCESS.memory_info().rss


@pytest.fixture(autouse=True)
def _rss_baseline() -> None:
    """Measure growth from this test's start: what earlier tests in the session left resident
    (models, interpreters) is not the decoder's doing."""
    global _RSS_START
    _RSS_START = _PROCESS.memory_info().rss


def _check(data: bytes) -> None:
    try:
        rgb = decode_image(data)
    except ImageDecodeError as exc:
        assert isinstance(exc.message, str) and exc.message
        assert "/" not in exc.message
    else:
        assert isinstance(rgb, np.ndarray)
        assert rgb.dtype == np.uint8
        assert rgb.ndim == 3 and rgb.shape[2] == 3
        assert rgb.shape[0] >= 1 and rgb.shape[1] >= 1
        assert rgb.shape[0] * rgb.shape[1] <= 40_000_000
        del rgb
    try:
        ext = sniff_extension(data)
    except ImageDecodeError as exc:
        assert exc.message
    else:
        assert ext in EXTENSIONS
    growth = _PROCESS.memory_info().rss - _RSS_START
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.0f} MiB"


@settings(FUZZ_SETTINGS, max_examples=40)
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@settings(FUZZ_SETTINGS, max_examples=40)
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_random_bytes_behind_magic(magic: bytes, rest: bytes) -> None:
    _check(magic + rest)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    seed = bytearray(draw(st.sampled_from(SEEDS)))
    kind = draw(st.sampled_from(["bitflip", "truncate", "overwrite", "insert", "delete", "splice"]))
    header = min(len(seed), 256)
    if kind == "bitflip":
        for _ in range(draw(st.integers(1, 16))):
            # Mostly in the header, where the structure is.
            limit = header if draw(st.booleans()) else len(seed)
            pos = draw(st.integers(0, limit - 1))
            seed[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        seed = seed[: draw(st.integers(0, len(seed) - 1))]
    elif kind == "overwrite":
        pos = draw(st.integers(0, header - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        seed[pos : pos + len(chunk)] = chunk
    elif kind == "insert":
        pos = draw(st.integers(0, header))
        seed[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "delete":
        pos = draw(st.integers(0, header - 1))
        seed[pos : pos + draw(st.integers(1, 64))] = b""
    else:  # splice: one image's header onto another's body
        other = draw(st.sampled_from(SEEDS))
        cut = draw(st.integers(0, min(len(other), 512)))
        seed = bytearray(other[:cut]) + seed[cut:]
    return bytes(seed)


@settings(FUZZ_SETTINGS, max_examples=90)
@given(mutated_images())
def test_mutated_images(data: bytes) -> None:
    _check(data)


def _png_with_dimensions(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose IHDR claims the given size (valid CRC) followed by a tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@settings(FUZZ_SETTINGS, max_examples=30)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(0, 2**31 - 1),
    st.sampled_from([(8, 0), (8, 2), (8, 6), (16, 0), (16, 2), (1, 0), (8, 3), (8, 4)]),
)
def test_forged_png_dimensions(width: int, height: int, depth_and_type: tuple[int, int]) -> None:
    _check(_png_with_dimensions(width, height, *depth_and_type))


@settings(FUZZ_SETTINGS, max_examples=20)
@given(st.integers(1, 8000), st.integers(1, 8000))
def test_forged_png_dimensions_near_the_limit(width: int, height: int) -> None:
    # Sizes around DEFAULT_MAX_PIXELS: accepted headers allocate and then run out of data.
    _check(_png_with_dimensions(width, height, 8, 2))
