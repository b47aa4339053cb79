"""Issue 4.6: files over the size limit, a disk at its floor, and what training leaves on disk.

* A file whose size is over ``classify.max_file_bytes`` is refused before it is downloaded, on
  every path (a user's photo or document, an admin's ``/add`` caption, reply or album), whether the
  size is in the message or only known from ``getFile``; the stand-in logs every file download.
* Below the free-disk floor the store refuses new images with a clear message to the admin on
  every teaching path, nothing is written, and users are still answered; when the floor is reached
  in the middle of an album, the images added so far stay and the reply says what happened.
* After a retraining the model versions on disk are within ``keep_versions`` (plus the rollback
  target) and the bottleneck cache holds entries for the stored images only.
"""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from model_store import dataset as dataset_module
from model_store.bottlenecks import BottleneckCache
from model_store.dataset import ImageStore
from model_store.pipeline import retrain
from model_store.registry import ModelRegistry
from model_store.training import TrainConfig
from model_store.workspace import Workspace
from tests.auxil.bot_harness import ADMIN, CASES, TRAIN_PER_LABEL, USER, bot_config, labels_in, photos
from tests.auxil.modelstore import shared_backbone
from tests.auxil.standin_extras import HardenedStandIn, push, serving_bot
from tests.auxil.store_checks import assert_no_traceback, store_state

LIMIT = 100_000  # bytes; big_6x.jpg is 535 kB, the clothing photos are under 10 kB


def _largest(update: dict) -> str:
    return max(update["message"]["photo"], key=lambda s: s["width"] * s["height"])["file_id"]


async def test_files_over_the_limit_are_refused_before_any_download(api: HardenedStandIn, store_copy: Path) -> None:
    big = (CASES / "big_6x.jpg").read_bytes()
    assert len(big) > LIMIT
    config = bot_config(api, store_copy, classify={"max_file_bytes": LIMIT})
    before = store_state(store_copy)
    refused_files: list[str] = []
    async with serving_bot(api, config) as bot:
        texts: dict[str, str] = {}

        async def send(key: str, chat: int, update: dict, file_id: str) -> None:
            refused_files.append(file_id)
            texts[key] = await bot.reply_text(chat, push(api, update))

        doc = api.make_document_update(USER, USER, big, mime_type="image/jpeg", file_name="big.jpg")
        await send("user document", USER, doc, doc["message"]["document"]["file_id"])
        photo = api.make_photo_update(USER, USER, big)
        await send("user photo", USER, photo, _largest(photo))
        doc = api.make_document_update(ADMIN, ADMIN, big, mime_type="image/jpeg", file_name="big.jpg", caption="/add shoes")
        await send("admin document", ADMIN, doc, doc["message"]["document"]["file_id"])
        photo = api.make_photo_update(ADMIN, ADMIN, big, caption="/add shoes")
        await send("admin photo", ADMIN, photo, _largest(photo))
        user_photo = api.make_photo_update(USER, USER, big)
        await send("user photo 2", USER, user_photo, _largest(user_photo))
        reply = api.make_text_update(USER, ADMIN, "/add shoes", reply_to_message=user_photo["message"]["message_id"])
        await send("admin reply", USER, reply, _largest(user_photo))
        # the size is not in the message: getFile tells, and the download is not started
        doc = api.make_document_update(USER, USER, big, mime_type="image/jpeg", file_name="nosize.jpg")
        del doc["message"]["document"]["file_size"]
        await send("no size in message", USER, doc, doc["message"]["document"]["file_id"])
        # the message understates the size
        doc = api.make_document_update(USER, USER, big, mime_type="image/jpeg", file_name="liar.jpg")
        doc["message"]["document"]["file_size"] = 1000
        await send("understated size", USER, doc, doc["message"]["document"]["file_id"])
        # over the Bot API's own 20 MB download limit: getFile refuses ("file is too big")
        doc = api.make_document_update(USER, USER, big, mime_type="image/jpeg", file_name="huge.jpg",
                                       file_size=25 * 1024 * 1024)
        doc["message"]["document"]["file_size"] = 1000
        await send("over the Bot API limit", USER, doc, doc["message"]["document"]["file_id"])
        # an album with one big photo among small ones: the small ones are added
        album = [
            api.make_photo_update(ADMIN, ADMIN, data, media_group_id="mixed", caption="/add hat" if i == 0 else None)
            for i, data in enumerate([photos("hat")[0].read_bytes(), big, photos("hat")[1].read_bytes()])
        ]
        refused_files.append(_largest(album[1]))
        mids = [push(api, u) for u in album]
        texts["album"] = await bot.reply_text(ADMIN, mids[0])
        good = await bot.reply_text(USER, bot.send_photo(USER, photos("shoes")[TRAIN_PER_LABEL]))

    for key, text in texts.items():
        if key != "album":
            assert text.startswith("That file is too large"), (key, text)
            assert "I can only look at images up to" in text, (key, text)
    assert texts["album"].startswith("Added 2 images to hat (2 images in total).")
    assert "1 image could not be added:\n• #2: That file is too large" in texts["album"]
    for file_id in refused_files:
        assert api.downloaded(file_id) == 0, f"{file_id} was downloaded although it is over the limit"
    assert labels_in(good)[0] == "shoes"
    after = store_state(store_copy)
    assert after.added_since(before) == {("hat", n) for f, n in after.images if f == "hat"}
    assert len(after.added_since(before)) == 2
    assert_no_traceback(api)


async def test_below_the_disk_floor_every_teaching_path_refuses_clearly(api: HardenedStandIn, store_copy: Path) -> None:
    config = bot_config(api, store_copy, limits={"min_free_disk_mb": 1024**3})  # a petabyte floor
    before = store_state(store_copy)
    async with serving_bot(api, config) as bot:
        caption = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[0], caption="/add hat"))
        document = await bot.reply_text(ADMIN, bot.send_document(
            ADMIN, photos("hat")[1].read_bytes(), file_name="h.jpg", mime_type="image/jpeg", caption="/add shoes"))
        user_mid = bot.send_photo(USER, photos("hat")[2])
        user_answer = await bot.reply_text(USER, user_mid)
        # an admin teaching with a reply to a user's photo
        reply = await bot.reply_text(
            USER, push(api, api.make_text_update(USER, ADMIN, "/add hat", reply_to_message=user_mid)))
        mids = [bot.send_photo(ADMIN, p, media_group_id="full", caption="/add skirt" if i == 0 else None)
                for i, p in enumerate(photos("skirt")[:3])]
        album = await bot.reply_text(ADMIN, mids[0])
        labels = await bot.ask(ADMIN, "/labels")
    message = "The image store is almost out of disk space, so the image was not saved."
    for text in (caption, document, reply, album):
        assert text.startswith(message), text
        assert "administrator" in text
    assert labels_in(user_answer), "users are still answered"
    assert labels.startswith("3 labels, 18 images")
    assert store_state(store_copy) == before
    assert not [p for p in store_copy.rglob("*") if p.name.startswith(".tmp-")]
    assert_no_traceback(api)


async def test_the_floor_reached_in_the_middle_of_an_album(
    api: HardenedStandIn, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    checks = {"n": 0}
    floor = 1024 * 1024

    def disk_usage(path: object) -> object:
        if Path(str(path)).resolve().is_relative_to(store_copy.resolve()):
            checks["n"] += 1
            # room for two more images, then below the floor
            return usage(10 * floor, 0, 5 * floor if checks["n"] <= 2 else floor // 2)
        return real(path)

    monkeypatch.setattr(dataset_module.shutil, "disk_usage", disk_usage)
    config = bot_config(api, store_copy, limits={"min_free_disk_mb": 1})
    before = store_state(store_copy)
    async with serving_bot(api, config) as bot:
        mids = [bot.send_photo(ADMIN, p, media_group_id="filling", caption="/add hat" if i == 0 else None)
                for i, p in enumerate(photos("hat")[:5])]
        text = await bot.reply_text(ADMIN, mids[0])
    assert text.startswith("Added 2 images to hat (2 images in total).\n3 images could not be added:\n"
                           "• #3, #4, #5: The image store is almost out of disk space"), text
    assert len(store_state(store_copy).added_since(before)) == 2
    assert not [p for p in store_copy.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_versions_and_bottleneck_cache_stay_within_their_limits(store_copy: Path) -> None:
    ws = Workspace(store_copy)
    registry = ws.registry
    (old,) = registry.versions()
    # six older complete versions, and leftovers of crashed writes
    for i in range(6):
        shutil.copytree(old.path, registry.root / f"20000101-00000{i}-aaaaaa")
    (registry.root / ".tmp-20000101-000009-bbbbbb").mkdir()
    backbone = shared_backbone()
    cache = BottleneckCache(ws.bottleneck_dir, backbone)
    entries = sorted(p for p in cache.dir.rglob("*.npy"))
    assert entries, "the trained store has a bottleneck cache"
    # entries of images that are no longer stored (deleted labels), and a half-written entry
    orphans = []
    for n, entry in enumerate(entries[:8]):
        fake = f"{n:02d}" + "f" * 62
        target = entry.parent.parent / fake[:2] / f"{fake}.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(entry, target)
        orphans.append(target)
    (entries[0].parent / ".tmp-abc.npy").write_bytes(b"\x93NUMPY half")
    # one label deleted since the last training: its images' bottlenecks are orphans too
    deleted = ImageStore(store_copy).delete_label("pants")
    assert deleted == TRAIN_PER_LABEL

    report = retrain(ws, TrainConfig(epochs=5, accuracy_floor=0.0, max_accuracy_drop=1.0, keep_versions=2,
                                     min_images_per_label=3), backbone=backbone)
    assert report.status == "promoted", report.message

    registry = ModelRegistry(store_copy / "models")
    names = [v.name for v in registry.versions()]
    assert names == [old.name, report.version], names  # keep_versions=2 newest; the old one is also the rollback target
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".tmp-")]
    stored = {r.sha256 for r in ImageStore(store_copy).snapshot()}
    views = TrainConfig().train_views()
    # the backbone's LiteRT conversion (model_store.engine) lives beside the entries
    left = [p for p in cache.dir.rglob("*") if p.is_file() and not p.name.startswith("litert.")]
    assert not [p for p in left if p.name.startswith(".tmp-")], "half-written cache entries are removed"
    assert {p.stem for p in left} == stored, "the cache holds entries for stored images only"
    assert len(left) == len(stored) * len(views)
    for p in left:
        vec = np.load(p)
        assert vec.dtype == np.float32 and vec.shape == (backbone.feature_dim,) and np.isfinite(vec).all()
