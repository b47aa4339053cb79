"""Issue 4.1: every kind of odd or hostile file, through both bot paths, over the real stack.

Each file of ``tests/data/cases`` (and a few generated mutants of the same kinds) is sent to the
real Application over HTTP, as a document and as a photo,

* by a user asking for labels: ``classify`` files get labels (the same top label as
  ``baseline.jpg`` where the content is the photo), ``error`` files get a short sentence, and
  ``classify-or-error`` files either;
* by an admin with the caption ``/add shoes``: a readable file is stored (exactly that file, under
  shoes), anything else is refused with a sentence and the store is byte-for-byte unchanged.

No chat message ever shows a traceback or an exception name, and the bot keeps serving: a good
photo sent afterwards is answered.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from pathlib import Path

import pytest
from PIL import Image

from tests.auxil.bot_harness import ADMIN, CASES, TRAIN_PER_LABEL, USER, bot_config, labels_in, photos
from tests.auxil.standin_extras import HardenedStandIn
from tests.auxil.store_checks import (
    assert_no_traceback,
    assert_store_contained,
    catalog_matches_folders,
    store_state,
)

MIME = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "gif": "image/gif",
    "heic": "image/heic",
}
#: case files whose content is not the shoe photo itself (1x1 pixel, 100:1 strip)
NOT_THE_PHOTO = {"tiny_1x1.png", "wide_2000x20.png"}


def case_rows() -> list[tuple[str, str]]:
    """(file name, expected) for every row of cases.tsv."""
    with open(CASES / "cases.tsv", newline="", encoding="utf-8") as fh:
        rows = [(r["file"], r["expected"]) for r in csv.DictReader(fh, delimiter="\t")]
    assert len(rows) >= 20
    for name, expected in rows:
        assert (CASES / name).is_file(), name
        assert expected in ("classify", "classify-or-error", "error"), expected
    return rows


def mutants() -> dict[str, tuple[bytes, str]]:
    """More files of the faulty kinds, made from the baseline photo: name -> (bytes, expected)."""
    rng = random.Random(4)
    base = (CASES / "baseline.jpg").read_bytes()
    png = io.BytesIO()
    Image.open(CASES / "baseline.jpg").save(png, format="PNG")
    png_bytes = png.getvalue()
    out: dict[str, tuple[bytes, str]] = {}
    for frac in (0.02, 0.1, 0.5):
        out[f"cut{int(frac * 100)}.jpg"] = (base[: int(len(base) * frac)], "classify-or-error")
    out["cut_png.png"] = (png_bytes[: len(png_bytes) // 2], "classify-or-error")
    flipped = bytearray(base)
    for _ in range(40):
        pos = rng.randrange(200, len(flipped))
        flipped[pos] ^= 0xFF
    out["bitflips.jpg"] = (bytes(flipped), "classify-or-error")
    out["jpeg_magic_noise.jpg"] = (b"\xff\xd8\xff\xe0" + rng.randbytes(3000), "error")
    out["png_magic_noise.png"] = (b"\x89PNG\r\n\x1a\n" + rng.randbytes(3000), "error")
    out["gif_header_only.gif"] = (b"GIF89a\x10\x00\x10\x00", "error")
    out["zip.jpg"] = (b"PK\x03\x04" + rng.randbytes(500), "error")
    out["pdf.png"] = (b"%PDF-1.7\n" + rng.randbytes(500), "error")
    out["svg.png"] = (b'<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"/>', "error")
    out["one_byte.jpg"] = (b"\xff", "error")
    # a header claiming 60000 x 60000 pixels in front of a tiny real image body
    bomb = bytearray(png_bytes)
    bomb[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    out["bomb_60000.png"] = (bytes(bomb), "error")
    return out


def all_cases() -> list[tuple[str, bytes, str]]:
    cases = [(name, (CASES / name).read_bytes(), expected) for name, expected in case_rows()]
    cases += [(name, data, expected) for name, (data, expected) in mutants().items()]
    return cases


def mime_of(name: str) -> str:
    return MIME[name.rsplit(".", 1)[-1].lower()]


def is_refusal(text: str) -> bool:
    """A short, human sentence that is not a classification."""
    return not labels_in(text) and 10 < len(text) < 400 and text.rstrip().endswith((".", "!", ")"))


@pytest.mark.slow
async def test_a_user_sending_every_kind_of_file_gets_labels_or_a_sentence(api: HardenedStandIn, store_copy: Path) -> None:
    cases = all_cases()
    before = store_state(store_copy)
    async with _bot(api, store_copy) as bot:
        baseline = labels_in(await bot.reply_text(USER, bot.send_photo(USER, CASES / "baseline.jpg")))
        sent = []
        for name, data, expected in cases:
            doc = bot.send_document(USER, data, file_name=name, mime_type=mime_of(name))
            photo = bot.send_photo(USER, data)
            sent.append((name, expected, doc, photo))
        replies = {}
        for name, expected, doc, photo in sent:
            replies[name] = (expected, await bot.reply_text(USER, doc), await bot.reply_text(USER, photo))
        good = await bot.reply_text(USER, bot.send_photo(USER, photos("t-shirt")[TRAIN_PER_LABEL]))
        # every message was answered exactly once
        for name, _, doc, photo in sent:
            assert len(api.replies_to(USER, doc)) == 1 and len(api.replies_to(USER, photo)) == 1, name

    assert baseline and baseline[0] == "shoes"
    for name, (expected, as_document, as_photo) in replies.items():
        for text in (as_document, as_photo):
            if expected == "classify":
                assert labels_in(text), (name, text)
                if name not in NOT_THE_PHOTO and name in dict(case_rows()):
                    assert labels_in(text)[0] == baseline[0], (name, text)
            elif expected == "error":
                assert is_refusal(text), (name, text)
            else:
                assert labels_in(text) or is_refusal(text), (name, text)
    assert labels_in(good)[0] == "t-shirt"
    assert_no_traceback(api)
    assert store_state(store_copy) == before, "asking for labels never stores anything"


@pytest.mark.slow
async def test_an_admin_adding_every_kind_of_file_stores_exactly_the_readable_ones(
    api: HardenedStandIn, store_copy: Path, tmp_path: Path
) -> None:
    cases = all_cases()
    outside_before = [p for p in tmp_path.rglob("*") if store_copy not in p.parents and p != store_copy]
    outcomes: dict[str, list[str]] = {}
    async with _bot(api, store_copy) as bot:
        for kind in ("document", "photo"):
            for name, data, expected in cases:
                before = store_state(store_copy)
                if kind == "document":
                    mid = bot.send_document(
                        ADMIN, data, file_name=name, mime_type=mime_of(name), caption="/add shoes"
                    )
                else:
                    mid = bot.send_photo(ADMIN, data, caption="/add shoes")
                text = await bot.reply_text(ADMIN, mid)
                after = store_state(store_copy)
                stored = text.startswith(("Added to shoes", "That image is already in shoes"))
                # what the bot downloads: the document, or the largest size of the photo (for a 1x1
                # image the stand-in's JPEG thumbnail is "larger" in bytes than the original)
                sent_files = [data] if kind == "document" else [
                    api.file(size["file_id"]).data for size in api.message(ADMIN, mid)["photo"]
                ]
                shas = {hashlib.sha256(d).hexdigest(): d for d in sent_files}
                if expected == "classify":
                    assert stored, (kind, name, text)
                if expected == "error":
                    assert not stored and is_refusal(text), (kind, name, text)
                if stored:
                    new = after.added_since(before)
                    if text.startswith("Added"):
                        assert len(new) == 1, (kind, name, new)
                        ((folder, file_name),) = new
                        assert folder == "shoes" and file_name.split(".")[0] in shas, (name, new)
                        assert (store_copy / "images" / folder / file_name).read_bytes() in sent_files
                    else:
                        assert new == set() and kind == "photo", (kind, name, text)
                else:
                    assert is_refusal(text), (kind, name, text)
                    assert after == before, f"{kind} {name}: the store changed although the add was refused"
                outcomes.setdefault(name, []).append("stored" if stored else "refused")
        good = await bot.reply_text(USER, bot.send_photo(USER, photos("pants")[TRAIN_PER_LABEL]))
        labels = await bot.ask(ADMIN, "/labels")

    stored_names = sorted(n for n, o in outcomes.items() if o[0] == "stored")
    print(f"\nadmin /add: {len(cases)} files x 2 paths; stored {len(stored_names)}, refused {len(cases) - len(stored_names)}")
    print("refused:", sorted(n for n, o in outcomes.items() if o[0] == "refused"))
    assert labels_in(good)[0] == "pants"
    readable = {n for n, _, e in cases if e == "classify"}
    assert {n for n, o in outcomes.items() if o == ["stored", "stored"]} >= readable
    assert all(len(set(o)) == 1 for o in outcomes.values()), f"document and photo paths disagree: {outcomes}"
    shoes = sum(1 for f in (store_copy / "images" / "shoes").iterdir())
    assert f"shoes — {shoes}" in labels
    assert_no_traceback(api)
    assert_store_contained(tmp_path, store_copy, outside_before)
    catalog_matches_folders(store_copy)


def _bot(api: HardenedStandIn, store: Path):
    from tests.auxil.bot_harness import running_bot

    # one user sends ~70 files in a row here: the per-user limits are lifted (they have their own tests)
    limits = {"photos_per_minute": 0, "messages_per_minute": 0, "min_free_disk_mb": 0}
    return running_bot(api, bot_config(api, store, limits=limits))
