"""Retraining from the chat and on the schedule: real TensorFlow training in a subprocess."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from bot.config import Config
from bot.schedule import missed_run
from bot.state import BotState
from model_store.backbones import DEFAULT_BACKBONE
from model_store.dataset import ImageStore
from model_store.registry import ModelRegistry
from tests.auxil.bot_harness import ADMIN, OTHER_ADMIN, USER, bot_config, labels_in, photos, running_bot
from tests.botapi_standin import BotApiStandIn, Call


def is_report(call: Call, chat: int, start: str) -> bool:
    return call.method == "sendMessage" and call.chat_id == chat and str(call.params["text"]).startswith(start)


@pytest.mark.slow
async def test_admin_teaches_three_labels_retrains_and_a_new_photo_is_answered(
    botapi: BotApiStandIn, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        for label in ("shoes", "pants", "t-shirt"):
            mids = [
                bot.send_photo(ADMIN, p, caption=f"/add {label}" if i == 0 else None, media_group_id=f"teach-{label}")
                for i, p in enumerate(photos(label)[:7])
            ]
            assert await bot.reply_text(ADMIN, mids[0]) == f"Added 7 images to {label} (7 images in total)."
        before = await bot.reply_text(USER, bot.send_photo(USER, photos("shoes")[7]))
        assert "still learning" in before

        retrain_mid = bot.send_text(ADMIN, "/retrain")
        status = await botapi.wait_for(
            lambda c: c.method == "sendMessage" and c.reply_to == retrain_mid and "Retraining" in c.params["text"]
        )
        # photos keep being answered while the subprocess trains
        during_mid = bot.send_photo(USER, photos("pants")[7])
        during = await bot.reply(USER, during_mid, timeout=20)
        assert bot.svc.trainer.busy, "the reply came while the training was still running"
        again = await bot.ask(OTHER_ADMIN, "/retrain")
        assert again.startswith("A training is already running")

        report = await botapi.wait_for(lambda c: is_report(c, ADMIN, "Retraining done"), timeout=180)
        picture = await botapi.wait_for(lambda c: c.method == "sendPhoto" and c.chat_id == ADMIN, timeout=30)
        after = await bot.reply_text(USER, bot.send_photo(USER, photos("shoes")[7]))
        status_text = await bot.ask(ADMIN, "/status")
        rollback = await bot.ask(ADMIN, "/rollback")

    assert during.timestamp < report.timestamp
    edits = [c for c in botapi.sent_calls("editMessageText") if c.params["message_id"] == status.result["message_id"]]
    assert edits, "the progress message is edited in place"
    assert str(edits[-1].params["text"]).startswith("Retraining finished: new model serving")
    text = str(report.params["text"])
    assert report.reply_to == retrain_mid
    assert "is now serving" in text and "Test accuracy:" in text
    assert re.search(r"Test accuracy: [\d.]+% on \d+ test images \(95% interval [\d.]+%–[\d.]+%\)", text), text
    assert "Per label: precision / recall" in text
    assert f"Backbone: {DEFAULT_BACKBONE}, engine: LiteRT/XNNPACK" in text
    for label in ("shoes", "pants", "t-shirt"):
        assert f"\n{label}: " in text
    assert Image.open(io.BytesIO(picture.params["photo"])).format == "PNG"
    assert labels_in(after)[0] == "shoes", after
    current = ModelRegistry(store / "models").current()
    assert current is not None and current.name in status_text
    assert "Images added since the last training: 0" in status_text
    assert re.search(r"Test accuracy: [\d.]+% on \d+ test images \(95% interval", status_text), status_text
    assert f"Backbone: {DEFAULT_BACKBONE}, engine: LiteRT/XNNPACK" in status_text, status_text
    assert "There is no earlier model version" in rollback
    state = json.loads((store / "state.json").read_text())
    assert state["last_run"]["fingerprint"] == ImageStore(store).fingerprint()


def _add_directly(store: Path, label: str, paths: list[Path]) -> None:
    images = ImageStore(store)
    for path in paths:
        images.add(path.read_bytes(), label, added_by=ADMIN, chat_id=ADMIN)


@pytest.mark.slow
async def test_scheduled_job_retrains_and_the_next_answer_comes_from_the_new_version(
    botapi: BotApiStandIn, store_copy: Path
) -> None:
    old_version = ModelRegistry(store_copy / "models").current()
    assert old_version is not None
    _add_directly(store_copy, "hat", photos("hat")[:7])
    config = bot_config(botapi, store_copy, training={"interval_seconds": 2})
    async with running_bot(botapi, config) as bot:
        first = await bot.reply_text(USER, bot.send_photo(USER, photos("hat")[7]))
        assert "hat" not in labels_in(first), "the old model does not know hats"
        deadline = time.monotonic() + 30
        while not bot.svc.trainer.busy:
            assert time.monotonic() < deadline, "the scheduled job did not start a training"
            await asyncio.sleep(0.05)
        during = [bot.send_photo(USER + i, photos("shoes")[6]) for i in range(3)]
        during_replies = [await bot.reply(USER + i, mid, timeout=20) for i, mid in enumerate(during)]
        assert bot.svc.trainer.busy, "photos were answered while the training ran"

        reports = [
            await botapi.wait_for(lambda c, a=admin: is_report(c, a, "Retraining done (scheduled)"), timeout=180)
            for admin in (ADMIN, OTHER_ADMIN)
        ]
        await botapi.wait_for(lambda c: c.method == "sendPhoto" and c.chat_id == OTHER_ADMIN, timeout=30)
        after = await bot.reply_text(USER, bot.send_photo(USER, photos("hat")[7]))
        new_version = bot.svc.classifier.version

        # nothing changed since: the next fires are skipped
        trained_at = bot.svc.state.get("last_run")["at"]
        await asyncio.sleep(config.training.interval_seconds * 2.5)
        assert bot.svc.state.get("last_run")["at"] == trained_at
        assert bot.svc.state.get("last_scheduled_check") > trained_at
        assert len([c for c in botapi.sent_calls("sendMessage", chat_id=ADMIN) if "Retraining" in c.params["text"]]) == 1

        rollback = await bot.ask(ADMIN, "/rollback")
        rolled = await bot.reply_text(USER, bot.send_photo(USER, photos("hat")[7]))

    assert all(r.timestamp < reports[0].timestamp for r in during_replies)
    assert all(labels_in(str(r.params["text"]))[0] == "shoes" for r in during_replies)
    assert new_version != old_version.name
    assert new_version in str(reports[0].params["text"])
    assert "\nhat: " in str(reports[0].params["text"])
    assert labels_in(after)[0] == "hat", after
    assert f"model {old_version.name}" in rollback and "serving again" in rollback
    assert "hat" not in labels_in(rolled)


def _near_duplicates(source: Path, n: int) -> list[bytes]:
    """``n`` different files of the same picture (one pixel and the JPEG quality differ)."""
    base = Image.open(source).convert("RGB")
    out = []
    for i in range(n):
        img = base.copy()
        img.putpixel((i, 0), (i * 7 % 256, 0, 0))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85 + i % 10)
        out.append(buf.getvalue())
    assert len({hash(b) for b in out}) == n
    return out


@pytest.mark.slow
async def test_missed_run_catches_up_at_start_and_a_refused_model_is_explained(
    botapi: BotApiStandIn, store_copy: Path
) -> None:
    old_version = ModelRegistry(store_copy / "models").current()
    assert old_version is not None
    # two labels nobody can tell apart: the new model cannot reach the accuracy floor
    images = ImageStore(store_copy)
    for i, data in enumerate(_near_duplicates(photos("skirt")[0], 12)):
        images.add(data, "left" if i % 2 else "right", added_by=ADMIN)
    BotState(store_copy).update(last_scheduled_check=time.time() - 2 * 86400)
    config = bot_config(botapi, store_copy, training={"accuracy_floor": 0.9})
    async with running_bot(botapi, config) as bot:
        reports = [
            await botapi.wait_for(lambda c, a=admin: is_report(c, a, "Retraining done (missed"), timeout=180)
            for admin in (ADMIN, OTHER_ADMIN)
        ]
        after = await bot.reply_text(USER, bot.send_photo(USER, photos("pants")[7]))
        serving = bot.svc.classifier.version
    text = str(reports[0].params["text"])
    assert "the new model was not promoted" in text and "The current model keeps serving" in text
    assert "below the floor of 90.0%" in text
    assert serving == old_version.name
    assert ModelRegistry(store_copy / "models").current().name == old_version.name
    assert labels_in(after)[0] == "pants"


def test_missed_run_detection(tmp_path: Path) -> None:
    state = BotState(tmp_path)
    cron = Config(training={"schedule": "0 3 * * *", "timezone": "Europe/Berlin"})
    now = datetime(2030, 6, 10, 12, 0, tzinfo=UTC)
    assert not missed_run(cron, state, now), "first start: nothing to catch up"
    state.update(last_scheduled_check=(now - timedelta(hours=2)).timestamp())
    assert not missed_run(cron, state, now)  # 03:00 Berlin (01:00 UTC) was before 10:00 UTC
    state.update(last_scheduled_check=(now - timedelta(hours=12)).timestamp())
    assert missed_run(cron, state, now)  # 00:00 UTC -> the 01:00 UTC run was missed
    interval = Config(training={"interval_seconds": 60})
    assert missed_run(interval, state, now)
    state.update(last_scheduled_check=(now - timedelta(seconds=30)).timestamp())
    assert not missed_run(interval, state, now)
    assert BotState(tmp_path).get("last_scheduled_check") == state.get("last_scheduled_check")
