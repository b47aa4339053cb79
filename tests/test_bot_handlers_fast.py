"""Fast tests of the bot's routes, handlers and formatters: the real Application on an in-process
Bot API double (tests/request_double.py), no HTTP server, no TensorFlow (the store has no model).

What the slow end-to-end tests check over HTTP with a trained model, these check in well under a
second each: who reaches which feature (the one admin filter, refusals, the /add caption filter),
the /delete buttons (arbitrary callback data), the album wait (JobQueue), the per-user message
limit, and the texts.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
import uuid
import warnings
from pathlib import Path

import pytest
from telegram.error import RetryAfter

from bot import app as bot_app
from bot import labels
from bot.classifying import format_predictions, still_learning_text
from bot.telegram_io import cut_text, parse_add_caption, retry_after_seconds
from model_store.dataset import ImageStore
from tests.request_double import offline_bot

ADMIN, OTHER_ADMIN, USER = 1001, 1002, 2002
PHOTOS = Path(__file__).resolve().parent / "data" / "clothing"
REFUSAL_END = "Send me a photo and I'll tell you what I see."


def jpeg(label: str = "hat", i: int = 0) -> bytes:
    return sorted((PHOTOS / label).glob("*.jpg"))[i].read_bytes()


def keyboard(bot, message: dict) -> tuple[list[str], dict]:  # noqa: ANN001
    """The callback data of the keyboard the bot sent in reply to ``message``, and the sent message."""
    for call in bot.request.sent():
        rp = call.params.get("reply_parameters") or {}
        if rp.get("message_id") == message["message_id"] and "reply_markup" in call.params:
            markup = call.params["reply_markup"]
            return [b["callback_data"] for row in markup["inline_keyboard"] for b in row], call.result
    raise AssertionError("no keyboard sent")


async def test_everyone_gets_start_and_help_and_only_admins_see_teaching(tmp_path: Path) -> None:
    async with offline_bot(tmp_path / "store", admins=(ADMIN,)) as bot:
        user_help = bot.reply_to(await bot.text(USER, "/help"))
        admin_help = bot.reply_to(await bot.text(ADMIN, "/help"))
        start = bot.reply_to(await bot.text(USER, "/start"))
    assert user_help.startswith("Send me a photo") and "/retrain" not in user_help
    assert "Teaching (you are an admin):" in admin_help and "/rollback" in admin_help
    assert start.startswith("Hi! I label photos.") and start.endswith(user_help)


async def test_every_admin_command_is_refused_to_others_by_name_and_logged_by_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    commands = [f"/{c}" for c in bot_app.ADMIN_ONLY_COMMANDS]
    async with offline_bot(tmp_path / "store", admins=(ADMIN,)) as bot:
        texts = {c: bot.reply_to(await bot.text(USER, f"{c} x")) for c in commands}
        shouted = bot.reply_to(await bot.text(USER, "/RETRAIN@labelgram_test_bot"))
        labels_for_admin = bot.reply_to(await bot.text(ADMIN, "/labels"))
    assert commands == ["/add", "/undo", "/labels", "/rename", "/delete", "/retrain", "/status", "/rollback", "/review"]
    for command, text in texts.items():
        assert text == f"Sorry, only the bot's admins can use {command}. {REFUSAL_END}"
    assert shouted.startswith("Sorry, only the bot's admins can use /retrain.")
    assert labels_for_admin.startswith("No labels yet.")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert logged == [f"refused {c} from non-admin user {USER}" for c in [*commands, "/retrain"]]


async def test_add_captions_are_routed_by_the_filter(tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with offline_bot(store, admins=(ADMIN,)) as bot:
        refused = bot.reply_to(await bot.photo(USER, jpeg(), caption="/add hat"))
        other_bot = bot.reply_to(await bot.photo(USER, jpeg(), caption="/add@OtherBot hat"))
        plain = bot.reply_to(await bot.photo(USER, jpeg()))
        added = bot.reply_to(await bot.photo(ADMIN, jpeg(), caption="/add@labelgram_test_bot hat"))
        which = bot.reply_to(await bot.photo(ADMIN, jpeg(i=1), caption="/add"))
        again = bot.reply_to(await bot.photo(ADMIN, jpeg(), caption="/add Hat"))
    assert refused == f"Sorry, only the bot's admins can use /add. {REFUSAL_END}"
    assert other_bot == plain == still_learning_text(False), "not ours: classified (no model yet)"
    assert added == "Added to hat (1 image)."
    assert which.startswith("Which label? To teach me")
    assert again == "That image is already in hat (1 image)."
    assert {i.name: i.count for i in ImageStore(store).labels()} == {"hat": 1}


async def test_the_admin_filter_is_the_one_check_and_follows_changes(tmp_path: Path) -> None:
    async with offline_bot(tmp_path / "store", admins=(ADMIN,)) as bot:
        before = bot.reply_to(await bot.text(USER, "/labels"))
        bot.app.bot_data.admins.add_user_ids(USER)
        promoted = bot.reply_to(await bot.text(USER, "/labels"))
        promoted_help = bot.reply_to(await bot.text(USER, "/help"))
        promoted_add = bot.reply_to(await bot.photo(USER, jpeg(), caption="/add hat"))
        bot.app.bot_data.admins.remove_user_ids(USER)
        after = bot.reply_to(await bot.text(USER, "/labels"))
    assert before.startswith("Sorry") and after.startswith("Sorry")
    assert promoted.startswith("No labels yet.")
    assert "Teaching (you are an admin):" in promoted_help
    assert promoted_add == "Added to hat (1 image)."


async def test_delete_buttons_carry_their_request_and_are_honoured_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with offline_bot(store, admins=(ADMIN, OTHER_ADMIN)) as bot:
        for i in range(2):
            await bot.photo(ADMIN, jpeg(i=i), caption="/add hat")
        ask = await bot.text(ADMIN, "/delete HAT")
        assert bot.reply_to(ask) == "Delete the label “hat” and its 2 images? This cannot be undone."
        (yes, no), sent = keyboard(bot, ask)
        assert len(yes) == len(no) == 64 and yes != no  # PTB's ids: Telegram never sees the request
        answers = {
            "stranger": await bot.press(USER, yes, sent),
            "other admin": await bot.press(OTHER_ADMIN, yes, sent),
            "tampered": await bot.press(ADMIN, yes[:-1] + "x", sent),
            "never issued": await bot.press(ADMIN, uuid.uuid4().hex + uuid.uuid4().hex, sent),
            "no data": await bot.press(ADMIN, "", sent),
        }
        assert {i.name: i.count for i in ImageStore(store).labels()} == {"hat": 2}
        answers["yes"] = await bot.press(ADMIN, yes, sent)
        answers["again"] = await bot.press(ADMIN, no, sent)
        # a second request, left until its window is over
        await bot.photo(ADMIN, jpeg("shoes"), caption="/add shoes")
        ask2 = await bot.text(ADMIN, "/delete shoes")
        (yes2, _), sent2 = keyboard(bot, ask2)
        labels.DELETE_CONFIRM_SECONDS, window = -1.0, labels.DELETE_CONFIRM_SECONDS
        try:
            answers["late"] = await bot.press(ADMIN, yes2, sent2)
        finally:
            labels.DELETE_CONFIRM_SECONDS = window
        answers["late, then in time"] = await bot.press(ADMIN, yes2, sent2)
    texts = {k: a["text"] for k, a in answers.items()}
    assert texts == {
        "stranger": "Sorry, only the bot's admins can use these buttons.",
        "other admin": "Only the admin who asked for this can confirm it.",
        "tampered": "This button is not valid.",
        "never issued": labels.EXPIRED_BUTTON,
        "no data": "This button is not valid.",
        "yes": "Deleted.",
        "again": labels.EXPIRED_BUTTON,
        "late": "This button has expired. Send /delete <label> again.",
        "late, then in time": labels.EXPIRED_BUTTON,
    }
    assert {i.name: i.count for i in ImageStore(store).labels()} == {"shoes": 1}
    edits = [c.params["text"] for c in bot.request.sent("editMessageText")]
    assert edits == ["Deleted the label “hat” and its 2 images. The next training leaves it out."]


async def test_an_album_waits_for_its_last_photo_then_takes_the_caption_of_any_photo(tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with offline_bot(store, admins=(ADMIN,), classify={"album_wait_ms": 500}) as bot:
        album = [bot.photo_message(ADMIN, jpeg(i=i), media_group_id="g1", caption="/add hat" if i == 1 else None)
                 for i in range(3)]
        for message in album:
            await asyncio.sleep(0.2)  # each photo restarts the wait: 3 x 0.2 s > the 0.5 s wait
            assert not bot.request.sent(), "answered before the album was complete"
            await bot.push({"message": message})
            jobs = bot.app.job_queue.get_jobs_by_name(f"album:{ADMIN}:{ADMIN}:g1")
            assert len([j for j in jobs if not j.removed]) == 1, "one wait per album"
        for _ in range(100):
            if bot.request.sent():
                break
            await asyncio.sleep(0.02)
        straggler = bot.reply_to(await bot.photo(ADMIN, jpeg(i=3), media_group_id="g1"))
    assert bot.reply_to(album[1]) == "Added 3 images to hat (3 images in total)."
    assert bot.replies_to(album[0]) == bot.replies_to(album[2]) == []
    assert straggler == "Added to hat (4 images)."
    assert {i.name: i.count for i in ImageStore(store).labels()} == {"hat": 4}


async def test_a_non_admin_over_the_message_limit_is_told_once_then_ignored(tmp_path: Path) -> None:
    async with offline_bot(tmp_path / "store", admins=(ADMIN,), limits={"messages_per_minute": 2}) as bot:
        texts = [bot.replies_to(await bot.text(USER, "/help")) for _ in range(4)]
        admin = [bot.replies_to(await bot.text(ADMIN, "/help")) for _ in range(4)]
    assert [len(t) for t in texts] == [1, 1, 1, 0]
    assert texts[2] == ["You're sending messages faster than I can answer them. Please wait a minute and try again."]
    assert all(len(t) == 1 and t[0].startswith("Send me a photo") for t in admin)


def test_formatters() -> None:
    assert format_predictions([("hat", 0.912), ("cap", 0.004)], 0.5) == "hat — 91%\ncap — <1%"
    assert format_predictions([("hat", 0.4)], 0.5) == "I'm not sure what this is. My best guesses:\nhat — 40%"
    assert format_predictions([], 0.5) == "I couldn't find any label for this one."
    assert cut_text("x" * 4000) == "x" * 4000
    assert cut_text("x" * 4001) == "x" * 3990 + "\n…"
    assert parse_add_caption("/add  summer hat\nmore", "Bot") == "summer hat"
    assert parse_add_caption("/add@bot", "Bot") == ""
    assert parse_add_caption("/add@Other hat", "Bot") is None
    assert parse_add_caption("/addx hat", "Bot") is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PTB's own constructor warns about the int
        as_int, as_delta = RetryAfter(3), RetryAfter(dtm.timedelta(seconds=1.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading it shows no deprecation warning
        assert retry_after_seconds(as_int) == 3.0
        assert retry_after_seconds(as_delta) == 1.5


async def test_an_album_still_waiting_at_shutdown_is_answered_not_dropped(tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with offline_bot(store, admins=(ADMIN,), classify={"album_wait_ms": 60_000}) as bot:
        album = [bot.photo_message(ADMIN, jpeg(i=i), media_group_id="g2", caption="/add hat" if i == 0 else None)
                 for i in range(2)]
        for message in album:
            await bot.push({"message": message})
        assert not bot.request.sent()
    assert bot.reply_to(album[0]) == "Added 2 images to hat (2 images in total)."
