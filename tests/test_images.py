"""Tests of model_store.images against the shared odd-input cases and synthetic images.

Similarity threshold used below (``CONTENT_MAX_DIFF``): both images are resized to 64x64 and the
mean absolute difference per channel value (0..255) is taken. Measured on tests/data:

* every re-encoding of the baseline photo in cases/ (WebP, BMP, TIFF, HEIC, CMYK, palette, GIF,
  progressive, EXIF-rotated, 6x upscaled, RGBA with a transparent corner) differs by 0.1-1.03;
  gray.jpg and gray16.png differ from the grayscale baseline by 0.0 and 0.75;
* the baseline mirrored left-right differs by 21.7, rotated 180 degrees by 26.9, rotated 90
  degrees by 34.7; the closest *other* photo of the clothing subset differs by 39.5;
* gray16.png clipped to 8 bit (the classic "blown out to white" bug) differs by 103.

6.0 is therefore ~6x the worst legitimate encoding and ~3.5x below a wrong orientation.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_store.errors import ImageDecodeError, LabelgramError
from model_store.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_image,
    sniff_extension,
    to_model_input,
)
from tests.auxil.crafted_images import solid_jpeg

DATA = Path(__file__).resolve().parent / "data"
CASES_DIR = DATA / "cases"
CLOTHING_DIR = DATA / "clothing"
REPO_ROOT = Path(__file__).resolve().parent.parent

CONTENT_MAX_DIFF = 6.0
NOT_THE_PHOTO = {"tiny_1x1.png", "wide_2000x20.png"}  # classify rows whose content is not the photo
GRAY_CASES = {"gray.jpg", "gray16.png"}
EXPECTED_EXTENSION = {
    "baseline.jpg": "jpg",
    "png_named.jpg": "png",
    "photo.webp": "webp",
    "photo.bmp": "bmp",
    "photo.tiff": "tiff",
    "progressive.jpg": "jpg",
    "cmyk.jpg": "jpg",
    "gray.jpg": "jpg",
    "gray16.png": "png",
    "rgba.png": "png",
    "palette.png": "png",
    "animated.gif": "gif",
    "exif_rotate6.jpg": "jpg",
    "big_6x.jpg": "jpg",
    "tiny_1x1.png": "png",
    "wide_2000x20.png": "png",
    "photo.heic": "heic",
}


def _load_cases() -> list[tuple[str, str, str]]:
    with (CASES_DIR / "cases.tsv").open(encoding="utf-8", newline="") as f:
        return [(row["file"], row["kind"], row["expected"]) for row in csv.DictReader(f, delimiter="\t")]


CASES = _load_cases()
CLASSIFY = [c for c in CASES if c[2] == "classify"]
ERROR = [c for c in CASES if c[2] == "error"]
EITHER = [c for c in CASES if c[2] == "classify-or-error"]


def _case_id(case: tuple[str, str, str]) -> str:
    return case[0]


def _read(name: str) -> bytes:
    return (CASES_DIR / name).read_bytes()


def _small(rgb: np.ndarray, *, gray: bool = False) -> np.ndarray:
    image = Image.fromarray(rgb)
    if gray:
        image = image.convert("L").convert("RGB")
    return np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def baseline() -> np.ndarray:
    return decode_image(_read("baseline.jpg"))


def _assert_rgb(arr: np.ndarray) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert arr.shape[0] >= 1 and arr.shape[1] >= 1
    assert arr.flags.c_contiguous and arr.flags.writeable


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


# --- the shared cases -------------------------------------------------------------------------


def test_cases_table_is_complete() -> None:
    assert len(CASES) == 22
    for name, _kind, expected in CASES:
        assert (CASES_DIR / name).is_file(), name
        assert expected in {"classify", "error", "classify-or-error"}
    assert {c[0] for c in CLASSIFY} == set(EXPECTED_EXTENSION)


@pytest.mark.parametrize("case", CLASSIFY, ids=_case_id)
def test_classify_rows_decode(case: tuple[str, str, str], baseline: np.ndarray) -> None:
    name = case[0]
    rgb = decode_image(_read(name))
    _assert_rgb(rgb)
    if name == "tiny_1x1.png":
        assert rgb.shape == (1, 1, 3)
    elif name == "wide_2000x20.png":
        assert rgb.shape == (20, 2000, 3)
    elif name == "big_6x.jpg":
        assert rgb.shape == (baseline.shape[0] * 6, baseline.shape[1] * 6, 3)
    else:
        assert rgb.shape == baseline.shape


@pytest.mark.parametrize("case", [c for c in CLASSIFY if c[0] not in NOT_THE_PHOTO], ids=_case_id)
def test_content_rows_look_like_baseline(case: tuple[str, str, str], baseline: np.ndarray) -> None:
    name = case[0]
    rgb = decode_image(_read(name))
    gray = name in GRAY_CASES
    assert _diff(_small(rgb), _small(baseline, gray=gray)) < CONTENT_MAX_DIFF


def test_exif_rotated_has_baseline_orientation(baseline: np.ndarray) -> None:
    stored = Image.open(CASES_DIR / "exif_rotate6.jpg")
    assert stored.size == (baseline.shape[0], baseline.shape[1])  # stored sideways
    rgb = decode_image(_read("exif_rotate6.jpg"))
    assert rgb.shape == baseline.shape
    assert _diff(_small(rgb), _small(baseline)) < CONTENT_MAX_DIFF
    # Guard against the threshold being too lax to notice a wrong rotation direction.
    assert _diff(_small(np.rot90(rgb, 2).copy()), _small(baseline)) > 3 * CONTENT_MAX_DIFF


def test_gray16_is_scaled_not_clipped() -> None:
    rgb = decode_image(_read("gray16.png"))
    reference = decode_image(_read("gray.jpg"))
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert (rgb == 255).mean() < 0.05  # clipping would make nearly every pixel white
    assert abs(float(rgb.mean()) - float(reference.mean())) < 2.0


def test_rgba_transparent_corner_becomes_white() -> None:
    with Image.open(CASES_DIR / "rgba.png") as im:
        alpha = np.asarray(im.getchannel("A"))
    rgb = decode_image(_read("rgba.png"))
    transparent = alpha == 0
    assert transparent.any()
    assert (rgb[transparent] == 255).all()


@pytest.mark.parametrize("case", ERROR, ids=_case_id)
def test_error_rows_raise_polite_error(case: tuple[str, str, str]) -> None:
    name = case[0]
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_read(name))
    message = info.value.message
    assert isinstance(info.value, LabelgramError)
    assert message and message.strip() == message and message.endswith(".")
    assert str(info.value) == message
    assert "/" not in message and "\\" not in message
    assert name not in message and str(CASES_DIR) not in message
    assert "Traceback" not in message and "PIL" not in message


@pytest.mark.parametrize("case", EITHER, ids=_case_id)
def test_classify_or_error_rows(case: tuple[str, str, str]) -> None:
    try:
        rgb = decode_image(_read(case[0]))
    except ImageDecodeError as exc:
        assert exc.message and "/" not in exc.message
    else:
        _assert_rgb(rgb)


def test_truncated_jpeg_is_refused_as_incomplete() -> None:
    # The decision documented in model_store.images: truncated files are refused.
    with pytest.raises(ImageDecodeError, match="incomplete"):
        decode_image(_read("truncated.jpg"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF"])
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_files_are_refused_in_every_format(fmt: str, fraction: float) -> None:
    rng = np.random.default_rng(1)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: int(len(data) * fraction)])
    assert info.value.message


def test_specific_messages() -> None:
    with pytest.raises(ImageDecodeError, match="^That file is empty.$"):
        decode_image(_read("empty.jpg"))
    for name in ("text.jpg", "html.png"):
        with pytest.raises(ImageDecodeError, match="doesn't look like an image"):
            decode_image(_read(name))
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_read("bomb_40000.png"))


def test_bomb_refused_quickly_in_process() -> None:
    data = _read("bomb_40000.png")
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(data)
    assert time.perf_counter() - start < 0.5


def test_bomb_bounded_peak_memory() -> None:
    """Peak RSS (ru_maxrss, in a fresh interpreter) barely moves while the bomb is refused.

    A decoded 40000x40000 RGB image would need 4.8 GB (6.4 GB in Pillow's 4-byte layout).
    """
    script = """
import json, resource, sys, time
from model_store.errors import ImageDecodeError
from model_store.images import decode_image
data = open(sys.argv[1], "rb").read()
small = open(sys.argv[2], "rb").read()
decode_image(small)  # warm up: import every plugin and allocate the usual buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    decode_image(data)
    outcome = "decoded"
except ImageDecodeError as exc:
    outcome = exc.message
elapsed = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "delta_kib": after - before, "elapsed": elapsed}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(CASES_DIR / "bomb_40000.png"), str(CASES_DIR / "tiny_1x1.png")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "too large" in report["outcome"]
    assert report["elapsed"] < 0.5
    assert report["delta_kib"] * 1024 < 50 * 1024 * 1024  # vs 4_800_000_000 for the pixels
    assert 50 * 1024 * 1024 < 40000 * 40000 * 3 / 90


def test_bomb_tracemalloc_peak_is_small() -> None:
    """Python and numpy allocations stay small (Pillow's C buffers are covered by the RSS test)."""
    import tracemalloc

    data = _read("bomb_40000.png")
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError):
            decode_image(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024


@pytest.mark.parametrize("case", CLASSIFY, ids=_case_id)
def test_sniff_extension_classify_rows(case: tuple[str, str, str]) -> None:
    assert sniff_extension(_read(case[0])) == EXPECTED_EXTENSION[case[0]]


@pytest.mark.parametrize("name", ["empty.jpg", "text.jpg", "html.png", "bomb_40000.png"])
def test_sniff_extension_refuses_non_images(name: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        sniff_extension(_read(name))
    assert info.value.message


def test_sniff_extension_accepts_bytearray_and_memoryview() -> None:
    data = _read("photo.webp")
    assert sniff_extension(bytearray(data)) == "webp"
    assert sniff_extension(memoryview(data)) == "webp"


# --- max_pixels -------------------------------------------------------------------------------


def test_max_pixels_limit_is_checked_before_decoding(baseline: np.ndarray) -> None:
    # a format decoded at full size (JPEGs are DCT-scaled to fit instead: see test_decode_budget.py)
    data = _read("photo.bmp")
    h, w = baseline.shape[:2]
    assert decode_image(data, max_pixels=h * w).shape == baseline.shape
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=h * w - 1)
    assert f"{w}×{h} pixels" in info.value.message
    assert "megapixels" in info.value.message


def test_a_jpeg_over_max_pixels_is_dct_scaled_to_fit(baseline: np.ndarray) -> None:
    h, w = baseline.shape[:2]
    rgb = decode_image(_read("baseline.jpg"), max_pixels=h * w - 1)
    assert rgb.shape == ((h + 1) // 2, (w + 1) // 2, 3)
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_read("baseline.jpg"), max_pixels=(h // 8) * (w // 8) - 1)


def test_default_max_pixels() -> None:
    assert DEFAULT_MAX_PIXELS == 40_000_000
    with pytest.raises(ValueError):
        decode_image(_read("baseline.jpg"), max_pixels=0)


def test_header_dimensions_refused_without_decoding() -> None:
    # A real 6000x7000 PNG header over almost no data: refused from the header alone.
    image = Image.new("L", (6000, 7000))
    data = _encode(image, "PNG")
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match=r"6000×7000 pixels\); the limit is 40 megapixels"):
        decode_image(data)
    assert time.perf_counter() - start < 0.5


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` (1-bit) with one byte of pixel data."""
    import struct
    import zlib

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_pillow_bomb_warning_becomes_our_error() -> None:
    # Between Pillow's warning and error thresholds (raised to MAX_JPEG_PIXELS by the module),
    # with a caller limit above both: Pillow's guard wins, as a typed error, not a warning
    # followed by decoding.
    data = _png_header_only(20_000, 20_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the limit given is PNG's: here the decode budget's (576 MiB / 12 bytes per pixel)
        with pytest.raises(ImageDecodeError, match=r"too large; the limit is 50.3 megapixels for PNG images\.$"):
            decode_image(data, max_pixels=500_000_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_bomb_refused_by_pillow_gives_the_limit_of_its_own_format() -> None:
    # bomb_40000.png said "the limit is 256 megapixels" (the JPEG header limit) on the old code.
    for call in (decode_image, sniff_extension):
        with pytest.raises(ImageDecodeError, match=r"^That image is too large; the limit is 40 megapixels\.$"):
            call(_read("bomb_40000.png"))
    with pytest.raises(ImageDecodeError, match=r"the limit is 256 megapixels\.$"):  # JPEG's own
        decode_image(solid_jpeg(24000, 24000))


def test_a_full_size_format_over_the_budget_is_refused_from_its_header() -> None:
    with pytest.raises(ImageDecodeError, match=r"10000×9500 pixels\); the limit is [\d.]+ megapixels for PNG"):
        decode_image(_png_header_only(10_000, 9_500), max_pixels=500_000_000)


def test_non_bytes_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        decode_image("baseline.jpg")  # type: ignore[arg-type]


# --- synthetic images: modes and formats ------------------------------------------------------


def _gradient(width: int = 48, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).round().astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.mark.parametrize(
    ("fmt", "params", "ext"),
    [
        ("JPEG", {"quality": 95}, "jpg"),
        ("JPEG", {"quality": 95, "progressive": True}, "jpg"),
        ("PNG", {}, "png"),
        ("WEBP", {"lossless": True}, "webp"),
        ("GIF", {}, "gif"),
        ("BMP", {}, "bmp"),
        ("TIFF", {}, "tiff"),
        ("TIFF", {"compression": "tiff_lzw"}, "tiff"),
        ("HEIF", {"quality": 95}, "heic"),
    ],
)
def test_synthetic_formats_roundtrip(fmt: str, params: dict[str, object], ext: str) -> None:
    source = _gradient()
    data = _encode(source, fmt, **params)
    rgb = decode_image(data)
    assert rgb.shape == (32, 48, 3)
    tolerance = 12.0 if fmt in {"GIF", "JPEG", "HEIF"} else 0.5
    assert _diff(rgb.astype(np.float32), np.asarray(source, dtype=np.float32)) < tolerance
    assert sniff_extension(data) == ext


def test_16bit_modes_scale_full_range() -> None:
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    expected = np.linspace(0, 255, 256).round().astype(np.uint8).reshape(16, 16)
    for array, fmt in ((ramp, "PNG"), (ramp, "TIFF"), (ramp.astype(np.int32), "TIFF")):
        image = Image.fromarray(array)
        assert image.mode in {"I;16", "I"}
        rgb = decode_image(_encode(image, fmt))
        assert rgb.shape == (16, 16, 3)
        assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1, (image.mode, fmt)


def test_32bit_integer_range_is_stretched() -> None:
    values = (np.arange(64, dtype=np.int32) * 3_000_000).reshape(8, 8)  # up to 189 million
    rgb = decode_image(_encode(Image.fromarray(values), "TIFF"))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert np.all(np.diff(rgb[..., 0].ravel().astype(int)) >= 0)  # monotonic, nothing clipped


def test_float_tiff_is_scaled() -> None:
    values = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    rgb = decode_image(_encode(Image.fromarray(values), "TIFF"))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("1", "PNG"),
        ("1", "BMP"),
        ("L", "PNG"),
        ("L", "TIFF"),
        ("LA", "PNG"),
        ("LA", "TIFF"),
        ("P", "PNG"),
        ("P", "BMP"),
        ("RGBA", "PNG"),
        ("RGBA", "TIFF"),
        ("RGBA", "WEBP"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("YCbCr", "JPEG"),
        ("LAB", "TIFF"),
        ("I", "TIFF"),
        ("I;16", "TIFF"),
        ("F", "TIFF"),
    ],
)
def test_modes_convert_to_rgb(mode: str, fmt: str) -> None:
    image = _gradient()
    rgb = decode_image(_encode(image.convert(mode), fmt))
    _assert_rgb(rgb)
    assert rgb.shape == (32, 48, 3)
    if mode in {"RGBA", "CMYK", "YCbCr", "LAB", "P"}:  # colour is kept (approximately)
        assert _diff(rgb.astype(np.float32), np.asarray(image, dtype=np.float32)) < 16.0


def test_palette_with_transparency_index_composited_on_white() -> None:
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, 5, 10))
    for fmt in ("PNG", "GIF"):
        rgb = decode_image(_encode(image, fmt, transparency=0))
        assert (rgb[:, :5] == 255).all(), fmt
        assert (rgb[:, 5:] == (200, 0, 0)).all(), fmt


def test_semi_transparent_alpha_blends_with_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    rgb = decode_image(_encode(image, "PNG"))
    assert np.abs(rgb.astype(int) - 127).max() <= 1


def test_rgb_png_with_trns_chunk() -> None:
    image = Image.new("RGB", (6, 6), (10, 20, 30))
    image.paste((1, 2, 3), (0, 0, 3, 6))
    rgb = decode_image(_encode(image, "PNG", transparency=(1, 2, 3)))
    assert (rgb[:, :3] == 255).all()
    assert (rgb[:, 3:] == (10, 20, 30)).all()


def test_gif_first_frame_only() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    rgb = decode_image(buf.getvalue())
    assert (rgb == (255, 0, 0)).all()


def test_animated_png_and_webp_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((0, 255, 0), (255, 0, 255))]
    for fmt, params in (("PNG", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, **params)
        rgb = decode_image(buf.getvalue())
        assert (rgb == (0, 255, 0)).all(), fmt


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(orientation: int) -> None:
    # An upright 3x2 image with one red pixel at its top-left, stored as a camera would.
    upright = np.zeros((2, 3, 3), dtype=np.uint8)
    upright[0, 0] = (255, 0, 0)
    inverse = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: np.rot90(a, 2),
        4: lambda a: a[::-1],
        5: lambda a: np.transpose(a, (1, 0, 2)),
        6: lambda a: np.rot90(a, 1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, -1),
    }[orientation]
    stored = Image.fromarray(np.ascontiguousarray(inverse(upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    rgb = decode_image(_encode(stored, "PNG", exif=exif))
    assert rgb.shape == (2, 3, 3)
    assert np.array_equal(rgb, upright)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_hide_picture() -> None:
    data = _encode(_gradient(), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    rgb = decode_image(data)
    assert rgb.shape == (32, 48, 3)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "EPS"])
def test_formats_outside_the_allow_list_are_refused(fmt: str) -> None:
    image = _gradient()
    data = _encode(image, fmt)
    with pytest.raises(ImageDecodeError, match="doesn't look like an image"):
        decode_image(data)
    with pytest.raises(ImageDecodeError):
        sniff_extension(data)


def test_image_extensions() -> None:
    assert IMAGE_EXTENSIONS == frozenset(
        {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
    )
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


# --- to_model_input ---------------------------------------------------------------------------

MODES = ["squash", "center_crop"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1), (20, 2000), (2000, 20), (533, 400), (224, 224)])
@pytest.mark.parametrize("size", [(224, 224), (299, 299), (160, 200)])
def test_to_model_input_shape_dtype_range(mode: str, shape: tuple[int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    out = to_model_input(rgb, size, mode=mode)
    assert out.shape == (*size, 3)
    assert out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    assert out.flags.writeable


@pytest.mark.parametrize("mode", MODES)
def test_to_model_input_cases(mode: str) -> None:
    for name in ("tiny_1x1.png", "wide_2000x20.png", "baseline.jpg"):
        out = to_model_input(decode_image(_read(name)), mode=mode)
        assert out.shape == (224, 224, 3) and out.dtype == np.float32


def test_to_model_input_default_is_squash() -> None:
    rgb = np.zeros((10, 40, 3), dtype=np.uint8)
    rgb[:, :20] = 255  # left half white, right half black
    squash = to_model_input(rgb, (8, 8))
    assert np.array_equal(squash, to_model_input(rgb, (8, 8), mode="squash"))
    assert squash[:, 0].min() == 255 and squash[:, -1].max() == 0  # nothing cropped away
    crop = to_model_input(rgb, (8, 8), mode="center_crop")
    # The centre crop keeps ~10/0.875... of the 40 columns around the middle: both halves visible.
    assert crop[:, 0].mean() > 200 and crop[:, -1].mean() < 55


def test_to_model_input_uniform_colour_is_preserved() -> None:
    rgb = np.full((30, 70, 3), (12, 130, 250), dtype=np.uint8)
    for mode in MODES:
        out = to_model_input(rgb, (224, 224), mode=mode)
        assert np.allclose(out, np.array((12, 130, 250), dtype=np.float32), atol=0.5)


def test_to_model_input_center_crop_matches_resize_then_crop() -> None:
    rgb = np.asarray(_gradient(400, 533))
    out = to_model_input(rgb, (224, 224), mode="center_crop")
    short = round(224 / 0.875)  # 256
    resized = Image.fromarray(rgb).resize((short, round(533 * short / 400)), Image.Resampling.BICUBIC)
    top = (resized.height - 224) // 2
    left = (resized.width - 224) // 2
    reference = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    assert _diff(out, reference) < 2.0


def test_to_model_input_rejects_bad_arguments() -> None:
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        to_model_input(good, mode="stretch")
    with pytest.raises(ValueError):
        to_model_input(good.astype(np.float32))
    with pytest.raises(ValueError):
        to_model_input(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        to_model_input(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        to_model_input(good, (0, 224))


# --- the committed clothing subset ------------------------------------------------------------


def test_clothing_subset_decodes() -> None:
    labels = sorted(p.name for p in CLOTHING_DIR.iterdir() if p.is_dir())
    assert len(labels) == 10
    for name in ("LICENSE", "PROVENANCE.md", "README.md"):
        assert (CLOTHING_DIR / name).is_file()
    for label in labels:
        files = sorted((CLOTHING_DIR / label).glob("*.jpg"))
        assert len(files) == 8, label
        for path in files:
            rgb = decode_image(path.read_bytes())
            assert max(rgb.shape[:2]) <= 160
            assert sniff_extension(path.read_bytes()) == "jpg"
