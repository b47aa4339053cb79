"""Classifying photos end to end: the real Application over HTTP against the Bot API stand-in."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from bot.classifying import format_predictions
from tests.auxil.bot_harness import ADMIN, CASES, TRAIN_PER_LABEL, USER, bot_config, photos, running_bot
from tests.botapi_standin import BotApiStandIn

LINE = re.compile(r"^(?P<label>.+) — (?P<pct><?\d+%)$")


def labels_in(text: str) -> list[str]:
    """Labels of a classification reply, best first."""
    return [m.group("label") for line in text.splitlines() if (m := LINE.match(line))]


async def test_a_users_photo_gets_labels(botapi: BotApiStandIn, store_copy: Path) -> None:
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        mid = bot.send_photo(USER, photos("shoes")[TRAIN_PER_LABEL])
        text = await bot.reply_text(USER, mid)
    assert labels_in(text)[0] == "shoes", text
    assert len(labels_in(text)) == 3  # top_k = 3, and the model knows 3 labels
    assert not text.startswith("I'm not sure")
    actions = botapi.sent_calls("sendChatAction", chat_id=USER)
    assert actions, "a chat action is shown while working"
    # the largest PhotoSize was downloaded, not the thumbnail
    photo_call = botapi.sent_calls("getFile")[0]
    assert botapi.file(photo_call.params["file_id"]).width > 90


async def test_an_image_sent_as_a_file_gets_labels(botapi: BotApiStandIn, store_copy: Path) -> None:
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        data = photos("pants")[TRAIN_PER_LABEL].read_bytes()
        mid = bot.send_document(USER, data, file_name="IMG_0001.JPG", mime_type="image/jpeg")
        text = await bot.reply_text(USER, mid)
    assert labels_in(text)[0] == "pants", text


async def test_corrupt_and_odd_files_get_clear_messages(botapi: BotApiStandIn, store_copy: Path) -> None:
    cases = {
        "truncated.jpg": "image/jpeg",
        "text.jpg": "image/jpeg",
        "html.png": "image/png",
        "empty.jpg": "image/jpeg",
        "bomb_40000.png": "image/png",
    }
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        sent = {
            name: bot.send_document(USER, (CASES / name).read_bytes(), file_name=name, mime_type=mime)
            for name, mime in cases.items()
        }
        # the bot keeps serving afterwards
        ok = bot.send_photo(USER, photos("t-shirt")[TRAIN_PER_LABEL])
        replies = {name: await bot.reply_text(USER, mid) for name, mid in sent.items()}
        good = await bot.reply_text(USER, ok)
    for name, text in replies.items():
        assert "Traceback" not in text and "Error" not in text, (name, text)
        assert not labels_in(text), (name, text)
        assert text.endswith((".", "!")) and len(text) > 10, (name, text)
    assert "incomplete" in replies["truncated.jpg"].lower() or "image" in replies["truncated.jpg"].lower()
    assert labels_in(good)[0] == "t-shirt"


async def test_odd_but_valid_formats_are_classified(botapi: BotApiStandIn, store_copy: Path) -> None:
    names = ["photo.webp", "cmyk.jpg", "gray16.png", "rgba.png", "animated.gif", "photo.heic", "tiny_1x1.png"]
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        sent = {
            name: bot.send_document(USER, (CASES / name).read_bytes(), file_name=name, mime_type="image/x-test")
            for name in names
        }
        replies = {name: await bot.reply_text(USER, mid) for name, mid in sent.items()}
    for name, text in replies.items():
        assert labels_in(text), (name, text)


async def test_a_file_over_the_limit_is_refused_before_downloading(botapi: BotApiStandIn, store_copy: Path) -> None:
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        data = photos("shoes")[TRAIN_PER_LABEL].read_bytes()
        mid = bot.send_document(USER, data, file_name="huge.jpg", mime_type="image/jpeg", file_size=25 * 1024 * 1024)
        text = await bot.reply_text(USER, mid)
    assert "too large" in text and "20 MB" in text
    assert botapi.sent_calls("getFile") == [], "nothing was downloaded"


async def test_before_any_model_the_bot_says_it_is_still_learning(botapi: BotApiStandIn, tmp_path: Path) -> None:
    async with running_bot(botapi, bot_config(botapi, tmp_path / "empty-store")) as bot:
        user_text = await bot.reply_text(USER, bot.send_photo(USER, photos("shoes")[0]))
        admin_text = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("shoes")[1]))
    assert "still learning" in user_text and "/add" in user_text
    assert "still learning" in admin_text and "/retrain" in admin_text


async def test_every_photo_of_an_album_is_answered(botapi: BotApiStandIn, store_copy: Path) -> None:
    album = [photos("shoes")[6], photos("pants")[6], photos("t-shirt")[6], photos("shoes")[7]]
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        mids = [bot.send_photo(USER, p, media_group_id="album-1") for p in album]
        texts = [await bot.reply_text(USER, mid) for mid in mids]
    assert [labels_in(t)[0] for t in texts] == ["shoes", "pants", "t-shirt", "shoes"]


async def test_concurrent_photos_share_forward_passes(botapi: BotApiStandIn, store_copy: Path) -> None:
    senders = range(3000, 3012)
    async with running_bot(botapi, bot_config(botapi, store_copy, classify={"batch_window_ms": 50})) as bot:
        # warm up: the first photo loads the model
        await bot.reply_text(USER, bot.send_photo(USER, photos("pants")[7]))
        sent = [(uid, bot.send_photo(uid, photos("shoes")[6 + uid % 2])) for uid in senders]
        texts = await asyncio.gather(*(bot.reply_text(uid, mid) for uid, mid in sent))
        batcher = bot.svc.batcher
    assert all(labels_in(t)[0] == "shoes" for t in texts), texts
    assert batcher.largest_batch > 1, "photos arriving together are classified in one batch"
    assert batcher.batches < batcher.items


async def test_a_flooding_user_is_told_to_slow_down(botapi: BotApiStandIn, store_copy: Path) -> None:
    config = bot_config(botapi, store_copy, limits={"photos_per_minute": 2})
    async with running_bot(botapi, config) as bot:
        mids = [bot.send_photo(USER, photos("shoes")[6]) for _ in range(4)]
        await botapi.wait_for(lambda c: c.method == "sendMessage" and c.chat_id == USER, count=3, timeout=30)
        await asyncio.sleep(0.5)
        texts = [str(c.params["text"]) for c in botapi.sent_calls("sendMessage", chat_id=USER)]
    assert sum(1 for t in texts if labels_in(t)) == 2
    slow = [t for t in texts if "faster than I can" in t]
    assert len(slow) == 1, texts  # told once, not once per photo
    assert len(mids) == 4


async def test_non_image_documents_get_a_hint_in_private_chats(botapi: BotApiStandIn, store_copy: Path) -> None:
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        mid = bot.send_document(USER, b"%PDF-1.4 hello", file_name="cv.pdf", mime_type="application/pdf")
        text = await bot.reply_text(USER, mid)
    assert "only label photos" in text


async def test_start_and_help_show_only_the_commands_the_user_may_use(botapi: BotApiStandIn, store_copy: Path) -> None:
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        user_help = await bot.ask(USER, "/help")
        admin_help = await bot.ask(ADMIN, "/help")
        start = await bot.ask(USER, "/start")
    assert "/add" not in user_help and "/retrain" not in user_help and "/help" in user_help
    for command in ("/add", "/undo", "/labels", "/rename", "/delete", "/retrain", "/status", "/rollback"):
        assert command in admin_help
    assert "photo" in start and "/add" not in start


def test_not_sure_reply_under_the_threshold() -> None:
    sure = format_predictions([("shoes", 0.91), ("pants", 0.05), ("t-shirt", 0.004)], 0.5)
    assert sure.splitlines() == ["shoes — 91%", "pants — 5%", "t-shirt — <1%"]
    unsure = format_predictions([("shoes", 0.41), ("pants", 0.39), ("t-shirt", 0.2)], 0.5)
    assert unsure.startswith("I'm not sure")
    assert labels_in(unsure) == ["shoes", "pants", "t-shirt"]
