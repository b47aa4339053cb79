"""The frame sizes an AVIF file's AV1 streams really have, read before anything is decoded.

An AVIF's ``ispe`` box (what Pillow reports as the image size) and its AV1 stream are separate:
a hostile file can declare 64x64 in ``ispe`` and carry a 12000x12000 AV1 frame, which libavif
(1.4, through Pillow 13, which exposes none of libavif's size limits) decodes at full size (a
2 kB file peaked at 299 MB against a 61 kB estimate). This module reads, for every AV1 item of
the file (``iinf`` item type ``av01``, data located by ``iloc``), the largest frame size its
sequence header allows (``max_frame_width_minus_1`` / ``max_frame_height_minus_1``): an AV1
decoder never decodes a frame larger than that (AV1 spec 5.5.1 and 5.9.5).

Only what is needed is parsed: ISO/IEC 14496-12 boxes (``meta``, ``iinf``/``infe``, ``iloc``,
``idat``), ISO/IEC 23008-12 items, and the AV1 bitstream's OBU headers and sequence header
(AV1 Bitstream & Decoding Process Specification, sections 5.3 and 5.5).
"""

from __future__ import annotations

__all__ = ["AvifHeaderError", "av1_frame_sizes"]

_MAX_BOXES = 10_000
_MAX_ITEMS = 4_096


class AvifHeaderError(ValueError):
    """The AVIF container or an AV1 sequence header could not be parsed."""


def _u(data: bytes, pos: int, size: int) -> int:
    if size == 0:
        return 0
    if pos < 0 or pos + size > len(data):
        raise AvifHeaderError("box runs past the end of the file")
    return int.from_bytes(data[pos : pos + size], "big")


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """The boxes (type, payload start, payload end) between ``start`` and ``end``."""
    out: list[tuple[bytes, int, int]] = []
    pos = start
    while pos + 8 <= end:
        if len(out) >= _MAX_BOXES:
            raise AvifHeaderError("too many boxes")
        size, kind, header = _u(data, pos, 4), data[pos + 4 : pos + 8], 8
        if size == 1:
            size, header = _u(data, pos + 8, 8), 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise AvifHeaderError(f"box {kind!r} has an invalid size")
        out.append((kind, pos + header, pos + size))
        pos += size
    return out


def _child(data: bytes, start: int, end: int, path: tuple[bytes, ...]) -> list[tuple[int, int]]:
    """Payloads of the boxes reached by following ``path`` (box types) below a payload."""
    spans = [(start, end)]
    for kind in path:
        spans = [(s, e) for a, b in spans for k, s, e in _boxes(data, a, b) if k == kind]
    return spans


def _first_samples(data: bytes) -> list[bytes]:
    """The first sample of every track of an image sequence (``moov``), where a decode starts.

    AV1 in ISOBMFF puts a sequence header in every sync sample, and the first sample is one.
    """
    samples = []
    for m_start, m_end in _child(data, 0, len(data), (b"moov",)):
        for s, e in _child(data, m_start, m_end, (b"trak", b"mdia", b"minf", b"stbl")):
            stsz = _child(data, s, e, (b"stsz",))
            offsets = _child(data, s, e, (b"stco",))
            wide = _child(data, s, e, (b"co64",))
            if not stsz or not (offsets or wide):
                raise AvifHeaderError("track without sample sizes or offsets")
            z = stsz[0][0]
            size = _u(data, z + 4, 4) or _u(data, z + 12, 4)
            if offsets:
                offset = _u(data, offsets[0][0] + 8, 4)
            else:
                offset = _u(data, wide[0][0] + 8, 8)
            if offset + size > len(data):
                raise AvifHeaderError("sample outside the file")
            samples.append(data[offset : offset + size])
    return samples


def _av01_items(data: bytes, start: int, end: int) -> set[int]:
    """Item ids of type ``av01`` listed by an ``iinf`` payload (full box)."""
    version = data[start] if start < end else 0
    pos = start + 4 + (4 if version else 2)
    ids = set()
    for kind, s, _e in _boxes(data, pos, end):
        if kind != b"infe":
            continue
        v = data[s]
        if v < 2:
            continue  # infe versions 0/1 have no item type (not AVIF)
        id_size = 2 if v == 2 else 4
        item_id = _u(data, s + 4, id_size)
        item_type = data[s + 4 + id_size + 2 : s + 4 + id_size + 6]
        if item_type == b"av01":
            ids.add(item_id)
        if len(ids) > _MAX_ITEMS:
            raise AvifHeaderError("too many items")
    return ids


def _item_extents(data: bytes, start: int, end: int) -> dict[int, tuple[int, list[tuple[int, int]]]]:
    """``iloc``: item id -> (construction method, [(offset, length), ...])."""
    version = data[start]
    pos = start + 4
    sizes = _u(data, pos, 2)
    offset_size, length_size = sizes >> 12, (sizes >> 8) & 0xF
    base_offset_size, index_size = (sizes >> 4) & 0xF, sizes & 0xF if version in (1, 2) else 0
    pos += 2
    if version < 2:
        count, pos = _u(data, pos, 2), pos + 2
    else:
        count, pos = _u(data, pos, 4), pos + 4
    if count > _MAX_ITEMS:
        raise AvifHeaderError("too many items")
    items = {}
    for _ in range(count):
        if version < 2:
            item_id, pos = _u(data, pos, 2), pos + 2
        else:
            item_id, pos = _u(data, pos, 4), pos + 4
        method = 0
        if version in (1, 2):
            method, pos = _u(data, pos, 2) & 0xF, pos + 2
        pos += 2  # data_reference_index
        base, pos = _u(data, pos, base_offset_size), pos + base_offset_size
        n_extents, pos = _u(data, pos, 2), pos + 2
        extents = []
        for _ in range(n_extents):
            pos += index_size
            off, pos = _u(data, pos, offset_size), pos + offset_size
            length, pos = _u(data, pos, length_size), pos + length_size
            extents.append((base + off, length))
        if pos > end:
            raise AvifHeaderError("iloc runs past its box")
        items[item_id] = (method, extents)
    return items


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def f(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise AvifHeaderError("sequence header is cut off")
            value = (value << 1) | ((self.data[byte] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def uvlc(self) -> None:
        zeros = 0
        while not self.f(1):
            zeros += 1
            if zeros >= 32:
                return
        self.f(zeros)


def _sequence_header_size(payload: bytes) -> tuple[int, int]:
    """(max frame width, max frame height) of an AV1 sequence header OBU payload (spec 5.5)."""
    b = _Bits(payload)
    b.f(3)  # seq_profile
    b.f(1)  # still_picture
    if b.f(1):  # reduced_still_picture_header
        b.f(5)
    else:
        decoder_model_info = False
        buffer_delay_length = 0
        if b.f(1):  # timing_info_present_flag
            b.f(32)
            b.f(32)
            if b.f(1):  # equal_picture_interval
                b.uvlc()
            decoder_model_info = bool(b.f(1))
            if decoder_model_info:
                buffer_delay_length = b.f(5) + 1
                b.f(32)
                b.f(5)
                b.f(5)
        initial_display_delay = b.f(1)
        for _ in range(b.f(5) + 1):  # operating points
            b.f(12)
            if b.f(5) > 7:
                b.f(1)
            if decoder_model_info and b.f(1):
                b.f(buffer_delay_length)
                b.f(buffer_delay_length)
                b.f(1)
            if initial_display_delay and b.f(1):
                b.f(4)
    width_bits, height_bits = b.f(4) + 1, b.f(4) + 1
    return b.f(width_bits) + 1, b.f(height_bits) + 1


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if pos >= len(data):
            raise AvifHeaderError("OBU size is cut off")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos
    raise AvifHeaderError("OBU size is too long")


def _stream_frame_sizes(stream: bytes) -> list[tuple[int, int]]:
    """The max frame sizes of every sequence header OBU in an AV1 item's data (spec 5.3)."""
    sizes = []
    pos = 0
    while pos < len(stream):
        header = stream[pos]
        if header & 0x80:
            raise AvifHeaderError("OBU forbidden bit set")
        obu_type, has_extension, has_size = (header >> 3) & 0xF, header & 0x4, header & 0x2
        pos += 1 + (1 if has_extension else 0)
        if has_size:
            size, pos = _leb128(stream, pos)
        else:
            size = len(stream) - pos
        if pos + size > len(stream):
            raise AvifHeaderError("OBU runs past its item")
        if obu_type == 1:  # OBU_SEQUENCE_HEADER
            sizes.append(_sequence_header_size(stream[pos : pos + size]))
        pos += size
    return sizes


def av1_frame_sizes(data: bytes) -> list[tuple[int, int]]:
    """For every AV1 item and track of an AVIF file, the largest frame (width, height) it decodes to.

    Items (``meta``): the sequence headers of each ``av01`` item's data. Image sequences
    (``moov``, which libavif decodes instead of the items): the sequence headers of each track's
    first sample.

    Args:
        data: the whole file.

    Returns:
        One (width, height) per sequence header found in the ``av01`` items' data (primary image,
        grid tiles, alpha, thumbnails...) and tracks' first samples, in pixels; empty if the file
        has no AV1 item or track.

    Raises:
        AvifHeaderError: the boxes, ``iloc`` or a sequence header are malformed, or an ``av01``
            item or a track's first sample has no sequence header.
    """
    try:
        sizes = []
        for sample in _first_samples(data):
            found = _stream_frame_sizes(sample)
            if not found:
                raise AvifHeaderError("a track's first sample has no sequence header")
            sizes.extend(found)
        meta = next(((s, e) for kind, s, e in _boxes(data, 0, len(data)) if kind == b"meta"), None)
        if meta is None:
            return sizes
        children = _boxes(data, meta[0] + 4, meta[1])  # meta is a full box
        av01: set[int] = set()
        extents: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        idat = (0, 0)
        for kind, s, e in children:
            if kind == b"iinf":
                av01 |= _av01_items(data, s, e)
            elif kind == b"iloc":
                extents.update(_item_extents(data, s, e))
            elif kind == b"idat":
                idat = (s, e)
        for item_id in sorted(av01):
            method, parts = extents.get(item_id, (0, []))
            if method not in (0, 1):
                raise AvifHeaderError("unsupported item construction method")
            base, limit = (0, len(data)) if method == 0 else idat
            chunks = []
            for off, length in parts:
                start = base + off
                stop = limit if length == 0 else start + length
                if start < base or stop > limit:
                    raise AvifHeaderError("item data outside the file")
                chunks.append(data[start:stop])
            found = _stream_frame_sizes(b"".join(chunks))
            if not found:
                raise AvifHeaderError(f"AV1 item {item_id} has no sequence header")
            sizes.extend(found)
        return sizes
    except IndexError as exc:
        raise AvifHeaderError("box is cut off") from exc
