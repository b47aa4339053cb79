"""Hostile and huge image files, made on the fly without holding their pixels in memory.

* :func:`solid_jpeg`: a valid baseline JPEG of any size (multiples of 16) in one flat grey: the
  headers come from Pillow, the scan is the 4-byte MCU of a flat 4:2:0 block repeated (DC
  difference 0 + end-of-block in the standard Huffman tables), so a 200-megapixel phone-sized
  photo is a 3 MB file made in milliseconds.
* :func:`animated_webp`: the ~96-byte animated WebP of issue 8: a large canvas (VP8X + ANIM) and
  one 1x1 lossless frame (ANMF) placed anywhere on it.
* :func:`tiled_tiff`: a deflate-compressed 8-bit grey TIFF with one tile of any declared size (the
  158-byte file with a 64x64 image and 32768x32768 tiles made libtiff allocate 1 GiB).
* :func:`striped_tiff`: a large deflate TIFF in mode ``F``, ``I`` or ``CMYK`` whose strips all share
  one compressed strip of a horizontal ramp (a 33-megapixel float TIFF is a few kB).
* :func:`solid_png`: a PNG of any size in one colour, compressed row by row (a 40-megapixel RGB
  one is ~120 kB).
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

__all__ = ["animated_webp", "solid_jpeg", "solid_png", "striped_tiff", "tiled_tiff"]

_FLAT_MCU = b"\x28\xa2\x8a\x00"  # 4 Y blocks + Cb + Cr of a flat mid-grey 4:2:0 MCU


def solid_jpeg(width: int, height: int) -> bytes:
    """A baseline 4:2:0 JPEG of ``width`` x ``height`` pixels (both multiples of 16), flat grey 128."""
    if width % 16 or height % 16 or not 0 < width <= 65535 or not 0 < height <= 65535:
        raise ValueError("width and height must be multiples of 16 in 16..65520")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, "JPEG", quality=75, subsampling=2)
    small = buf.getvalue()
    sos = small.index(b"\xff\xda")
    header = bytearray(small[: sos + 2 + int.from_bytes(small[sos + 2 : sos + 4], "big")])
    assert small[len(header) :] == _FLAT_MCU + b"\xff\xd9", "Pillow's encoder changed its tables"
    sof = header.index(b"\xff\xc0")
    header[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(header) + _FLAT_MCU * ((width // 16) * (height // 16)) + b"\xff\xd9"


def _chunk(tag: bytes, payload: bytes) -> bytes:
    pad = b"\0" if len(payload) % 2 else b""
    return tag + struct.pack("<I", len(payload)) + payload + pad


def _u24(value: int) -> bytes:
    return value.to_bytes(3, "little")


def animated_webp(canvas: tuple[int, int], frame: tuple[int, int] = (1, 1), offset: tuple[int, int] = (0, 0)) -> bytes:
    """An animated WebP with a ``canvas`` (w, h) and one lossless frame of size ``frame`` at ``offset``.

    The frame's bitstream is a real 1x1 image; a larger ``frame`` only changes the ANMF header
    (so the file claims a frame size its bitstream does not have, as a hostile file would).
    """
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (10, 20, 30)).save(buf, "WEBP", lossless=True)
    one = buf.getvalue()
    vp8l = one[12:]  # the VP8L chunk of a simple file
    cw, ch = canvas
    fw, fh = frame
    vp8x = _chunk(b"VP8X", bytes([0x02]) + b"\0\0\0" + _u24(cw - 1) + _u24(ch - 1))  # animation flag
    anim = _chunk(b"ANIM", b"\xff\xff\xff\xff" + struct.pack("<H", 0))
    anmf_header = _u24(offset[0] // 2) + _u24(offset[1] // 2) + _u24(fw - 1) + _u24(fh - 1) + _u24(100) + b"\0"
    anmf = _chunk(b"ANMF", anmf_header + vp8l)
    body = b"WEBP" + vp8x + anim + anmf
    return b"RIFF" + struct.pack("<I", len(body)) + body


def solid_png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """An 8-bit RGB PNG of ``width`` x ``height`` pixels in one colour, made row by row."""
    row = b"\0" + bytes(colour) * width
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    idat = b"".join(parts)

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiled_tiff(size: tuple[int, int], tile: tuple[int, int], *, real_tile: bool = True) -> bytes:
    """A grey 8-bit tiled TIFF of ``size`` (w, h) declaring ``tile`` (w, h) tiles, all tiles data 0.

    With ``real_tile`` each tile's deflate stream holds a whole tile of zeros; otherwise 100 bytes
    (a hostile file: small, but the declared tile size is what the decoder allocates).
    """
    width, height = size
    tile_w, tile_h = tile
    raw = b"\0" * (tile_w * tile_h if real_tile else 100)
    data = zlib.compress(raw)
    count = -(-width // tile_w) * -(-height // tile_h)
    n_tags = 11
    ifd_off = 8
    arrays_off = ifd_off + 2 + 12 * n_tags + 4
    data_off = arrays_off + 8 * count
    offsets = [data_off] * count  # every tile shares the same compressed data
    lengths = [len(data)] * count
    tags = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
        (277, 3, 1, 1), (284, 3, 1, 1), (322, 4, 1, tile_w), (323, 4, 1, tile_h),
        (324, 4, count, offsets[0] if count == 1 else arrays_off),
        (325, 4, count, lengths[0] if count == 1 else arrays_off + 4 * count),
    ]
    out = bytearray(b"II*\0" + struct.pack("<I", ifd_off) + struct.pack("<H", n_tags))
    for tag, typ, cnt, val in tags:
        out += struct.pack("<HHIHH", tag, typ, cnt, val, 0) if typ == 3 else struct.pack("<HHII", tag, typ, cnt, val)
    out += struct.pack("<I", 0)
    out += b"".join(struct.pack("<I", v) for v in offsets) + b"".join(struct.pack("<I", v) for v in lengths)
    return bytes(out + data)


def striped_tiff(width: int, height: int, mode: str, rows_per_strip: int = 64) -> bytes:
    """A ``width`` x ``height`` TIFF in ``mode`` "F" (float32), "I" (int32) or "CMYK" (8-bit).

    Every row is the same ramp (float: -1e6..3.5e6, int: -5..70000, CMYK: 0..255 in each ink),
    so the decoder has to scale a real range; all strips point at one compressed strip.
    """
    ramp = [i / max(1, width - 1) for i in range(width)]
    if mode == "F":
        row = struct.pack(f"<{width}f", *(-1e6 + 4.5e6 * r for r in ramp))
        bits, samples, photometric, sample_format = 32, 1, 1, 3
    elif mode == "I":
        row = struct.pack(f"<{width}i", *(int(-5 + 70005 * r) for r in ramp))
        bits, samples, photometric, sample_format = 32, 1, 1, 2
    elif mode == "CMYK":
        row = bytes(int(255 * r) for r in ramp for _ in range(4))
        bits, samples, photometric, sample_format = 8, 4, 5, 1
    else:
        raise ValueError(f"unsupported mode {mode!r}")
    strip = zlib.compress(row * rows_per_strip, 9)
    count = -(-height // rows_per_strip)
    n_tags = 12
    ifd_off = 8
    extra_off = ifd_off + 2 + 12 * n_tags + 4
    bits_off = extra_off  # BitsPerSample array when samples > 1 (4 shorts)
    offsets_off = bits_off + 8
    lengths_off = offsets_off + 4 * count
    data_off = lengths_off + 4 * count
    tags = [
        (256, 4, 1, width), (257, 4, 1, height),
        (258, 3, samples, bits if samples == 1 else bits_off),
        (259, 3, 1, 8), (262, 3, 1, photometric), (273, 4, count, offsets_off if count > 1 else data_off),
        (277, 3, 1, samples), (278, 4, 1, rows_per_strip),
        (279, 4, count, lengths_off if count > 1 else len(strip)), (284, 3, 1, 1), (317, 3, 1, 1),
        (339, 3, 1, sample_format),
    ]
    out = bytearray(b"II*\0" + struct.pack("<I", ifd_off) + struct.pack("<H", n_tags))
    for tag, typ, cnt, val in tags:
        inline_short = typ == 3 and cnt == 1
        out += struct.pack("<HHIHH", tag, typ, cnt, val, 0) if inline_short else struct.pack("<HHII", tag, typ, cnt, val)
    out += struct.pack("<I", 0)
    out += struct.pack("<4H", *([bits] * 4))
    out += struct.pack(f"<{count}I", *([data_off] * count)) + struct.pack(f"<{count}I", *([len(strip)] * count))
    return bytes(out + strip)
