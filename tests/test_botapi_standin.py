"""Tests for the local Bot API stand-in, driven by the real python-telegram-bot over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image
from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeChat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Update,
)
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from tests.botapi_standin import BotApiStandIn, Call


def _png(width: int = 640, height: int = 480, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def _builder(api: BotApiStandIn) -> ApplicationBuilder:
    """A PTB ``ApplicationBuilder`` pointed at the stand-in (token and both URLs)."""
    return Application.builder().token(api.token).base_url(api.base_url).base_file_url(api.base_file_url)


@contextlib.asynccontextmanager
async def _running(app: Application, **polling: object) -> AsyncIterator[Application]:
    await app.initialize()
    await app.start()
    await app.updater.start_polling(poll_interval=0, timeout=1, **polling)
    try:
        yield app
    finally:
        await app.updater.stop()
        await app.stop()
        await app.shutdown()


async def _reply_with_largest_photo_size(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    photo = update.message.photo[-1]
    data = await (await photo.get_file()).download_as_bytearray()
    await update.message.reply_text(str(len(data)), do_quote=True)


# ----------------------------------------------------------------------------------------------
# End-to-end with the real Application
# ----------------------------------------------------------------------------------------------


async def test_photo_update_is_downloaded_and_answered_by_a_real_application() -> None:
    async with BotApiStandIn() as api:
        port = api.port
        app = (
            Application.builder()
            .token("123:ABC")
            .base_url(f"http://127.0.0.1:{port}/bot")
            .base_file_url(f"http://127.0.0.1:{port}/file/bot")
            .build()
        )
        app.add_handler(MessageHandler(filters.PHOTO, _reply_with_largest_photo_size))
        image = _png(640, 480)
        async with _running(app):
            update = api.make_photo_update(5, 7, image, caption="what is this?")
            sizes = update["message"]["photo"]
            assert len(sizes) == 2
            assert (sizes[-1]["width"], sizes[-1]["height"], sizes[-1]["file_size"]) == (640, 480, len(image))
            assert max(sizes[0]["width"], sizes[0]["height"]) <= 90
            update_id = api.push_update(update)
            assert update_id in api.pushed_at

            call = await api.wait_for(
                lambda c: c.method == "sendMessage" and c.params["chat_id"] == 5, timeout=10
            )
        message_id = update["message"]["message_id"]
        assert call.params["text"] == str(len(image))
        assert call.params["reply_parameters"] == {"message_id": message_id}
        assert call.result["reply_to_message"]["message_id"] == message_id
        assert call.result["from"]["is_bot"] is True
        assert call.result["message_id"] > message_id
        assert api.replies_to(5, message_id) == [call]
        assert [c.method for c in api.sent[:2]] == ["getMe", "deleteWebhook"]
        assert api.sent_calls("getFile")[0].params["file_id"] == sizes[-1]["file_id"]
        assert api.pending_update_count == 0  # the final getUpdates on stop confirmed it


async def test_command_edited_message_channel_post_and_document_reach_handlers(
    botapi: BotApiStandIn,
) -> None:
    seen: list[str] = []

    async def on_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        seen.append(f"start:{' '.join(context.args)}")
        await update.effective_message.reply_text("hello")

    async def on_edit(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        seen.append(f"edit:{update.edited_message.text}")

    async def on_channel(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        seen.append(f"channel:{update.channel_post.text}:{update.effective_chat.type}")

    async def on_document(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        doc = update.message.document
        seen.append(f"doc:{doc.file_name}:{doc.mime_type}:{doc.file_size}")
        try:
            await doc.get_file()
        except BadRequest as exc:
            await update.message.reply_text(f"refused: {exc.message}")

    app = _builder(botapi).build()
    app.add_handler(CommandHandler("start", on_start))
    app.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE, on_edit))
    app.add_handler(MessageHandler(filters.UpdateType.CHANNEL_POST, on_channel))
    app.add_handler(MessageHandler(filters.Document.ALL, on_document))
    async with _running(app):
        start = botapi.make_text_update(11, 11, "/start now", username="alice")
        assert start["message"]["entities"] == [{"type": "bot_command", "offset": 0, "length": 6}]
        botapi.push_update(start)
        hello = await botapi.wait_for(lambda c: c.method == "sendMessage" and c.chat_id == 11)
        # PTB v22's reply_text does not quote in private chats unless do_quote=True.
        assert hello.reply_to is None and botapi.replies_to(11, start["message"]["message_id"]) == []

        first = botapi.make_text_update(11, 11, "typo")
        botapi.push_update(first)
        botapi.push_update(botapi.make_edited_message_update(11, 11, first["message"]["message_id"], text="fixed"))
        botapi.push_update(botapi.make_channel_post_update(-100500, "news"))
        big = botapi.make_document_update(
            11, 11, b"%PDF-1.4 tiny", mime_type="application/pdf", file_name="scan.pdf",
            file_size=25 * 1024 * 1024,
        )
        botapi.push_update(big)
        refusal = await botapi.wait_for(lambda c: c.params["text"].startswith("refused"))
    assert seen[0] == "start:now"
    assert "edit:fixed" in seen and "channel:news:channel" in seen
    assert f"doc:scan.pdf:application/pdf:{25 * 1024 * 1024}" in seen
    assert "too big" in refusal.params["text"].lower()
    assert botapi.message(11, first["message"]["message_id"])["text"] == "fixed"


@pytest.mark.slow
async def test_rate_limiter_retries_after_injected_429() -> None:
    async with BotApiStandIn() as api:
        app = _builder(api).rate_limiter(AIORateLimiter(max_retries=2)).build()

        async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            await update.message.reply_text(update.message.text.upper())

        app.add_handler(MessageHandler(filters.TEXT, echo))
        api.fail_next("sendMessage", error_code=429, retry_after=1)
        async with _running(app):
            api.push_update(api.make_text_update(5, 5, "ping"))
            call = await api.wait_for(lambda c: c.method == "sendMessage", timeout=10)
        attempts = [c for c in api.calls if c.method == "sendMessage"]
        assert [(c.ok, c.error_code) for c in attempts] == [(False, 429), (True, None)]
        assert attempts[0].description == "Too Many Requests: retry after 1"
        assert attempts[1].timestamp - attempts[0].timestamp >= 1.0
        assert call.params["text"] == "PING"
        assert len(api.sent_calls("sendMessage")) == 1


async def test_callback_query_is_answered_and_message_edited(botapi: BotApiStandIn) -> None:
    async def on_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        await query.answer(text=f"got {query.data}")
        await query.edit_message_text(f"chose {query.data}")

    app = _builder(botapi).build()
    app.add_handler(CallbackQueryHandler(on_button))
    keyboard = InlineKeyboardMarkup(
        [[InlineKeyboardButton("Cat", callback_data="cat"), InlineKeyboardButton("Dog", callback_data="dog")]]
    )
    async with _running(app):
        sent = await app.bot.send_message(42, "Which one?", reply_markup=keyboard)
        assert sent.reply_markup == keyboard  # inline keyboards are echoed and parse back
        prompt = botapi.sent_calls("sendMessage")[-1].result
        update = botapi.make_callback_update(42, 42, "dog", prompt)
        botapi.push_update(update)
        answer = await botapi.wait_for(lambda c: c.method == "answerCallbackQuery")
        edit = await botapi.wait_for(lambda c: c.method == "editMessageText")
    query_id = update["callback_query"]["id"]
    assert answer.params == {"callback_query_id": query_id, "text": "got dog"}
    assert botapi.callback_answer(query_id)["text"] == "got dog"
    assert edit.result["text"] == "chose dog"
    assert "reply_markup" not in edit.result  # editing text without reply_markup drops the keyboard
    assert botapi.message(42, sent.message_id)["text"] == "chose dog"


# ----------------------------------------------------------------------------------------------
# Bot methods through PTB's Bot
# ----------------------------------------------------------------------------------------------


def _bot(api: BotApiStandIn, token: str | None = None) -> Bot:
    return Bot(token or api.token, base_url=api.base_url, base_file_url=api.base_file_url)


async def test_get_me_and_wrong_token(botapi: BotApiStandIn) -> None:
    async with _bot(botapi) as bot:
        me = await bot.get_me()
        assert (me.id, me.username, me.is_bot) == (123, "labelgram_test_bot", True)
        assert bot.username == "labelgram_test_bot"
    with pytest.raises(InvalidToken):
        async with _bot(botapi, "999:WRONG"):
            pass
    app = Application.builder().token("999:WRONG").base_url(botapi.base_url).build()
    with pytest.raises(InvalidToken):
        await app.initialize()
    await app.bot.shutdown()  # a failed Application.initialize leaves PTB's HTTP clients open


async def test_set_my_commands_is_stored_per_scope(botapi: BotApiStandIn) -> None:
    scope = BotCommandScopeChat(chat_id=77)
    async with _bot(botapi) as bot:
        with pytest.raises(BadRequest, match="(?i)chat not found"):  # 77 never opened a chat with the bot
            await bot.set_my_commands([BotCommand("label", "Label a photo")], scope=scope)
        botapi.open_chat(77)
        assert await bot.set_my_commands([BotCommand("label", "Label a photo")], scope=scope)
        assert await bot.set_my_commands([BotCommand("start", "Start")])
        with pytest.raises(BadRequest, match="(?i)BOT_COMMAND_INVALID"):
            await bot.set_my_commands([BotCommand("Bad-Name", "x")])
        assert await bot.set_my_commands([], scope=scope)
        assert await bot.delete_my_commands(scope=scope)
        with pytest.raises(BadRequest, match="(?i)chat not found"):
            await bot.delete_my_commands(scope=BotCommandScopeChat(chat_id=78))
    call = botapi.sent_calls("setMyCommands")[0]
    assert call.params["scope"] == {"type": "chat", "chat_id": 77}
    assert call.params["commands"] == [{"command": "label", "description": "Label a photo"}]
    assert botapi.commands() == [{"command": "start", "description": "Start"}]
    assert botapi.commands({"type": "chat", "chat_id": 77}) == []  # an empty list deletes them
    assert botapi.commands(language_code="de") == []


async def test_send_photo_upload_is_recorded_with_its_bytes(botapi: BotApiStandIn) -> None:
    image = _png(320, 200, "blue")
    async with _bot(botapi) as bot:
        msg = await bot.send_photo(9, photo=image, caption="cat 97%")
        downloaded = await (await bot.get_file(msg.photo[-1])).download_as_bytearray()
        doc = await bot.send_document(9, document=b"a,b\n1,2\n", filename="report.csv", caption="table")
        assert await bot.send_chat_action(9, "upload_photo")
        with pytest.raises(BadRequest, match="(?i)wrong parameter action"):
            await bot.send_chat_action(9, "dancing")
        with pytest.raises(BadRequest, match="(?i)IMAGE_PROCESS_FAILED"):
            await bot.send_photo(9, photo=b"not an image")
    upload = botapi.sent_calls("sendPhoto")[0]
    assert upload.params["photo"] == image
    assert upload.files["photo"].data == image
    # PTB does not sniff raw bytes: they go up as application/octet-stream, not image/png.
    assert (upload.files["photo"].filename, upload.files["photo"].content_type) == (
        "application.octet-stream",
        "application/octet-stream",
    )
    assert upload.params["chat_id"] == 9
    assert (msg.photo[-1].width, msg.photo[-1].height, msg.photo[-1].file_size) == (320, 200, len(image))
    assert max(msg.photo[0].width, msg.photo[0].height) <= 90
    assert msg.caption == "cat 97%"
    assert bytes(downloaded) == image
    assert (doc.document.file_name, doc.document.mime_type, doc.document.file_size) == ("report.csv", "text/csv", 8)
    assert doc.caption == "table"
    assert botapi.sent_calls("sendDocument")[0].params["document"] == b"a,b\n1,2\n"


async def test_text_rules_keyboards_and_edits(botapi: BotApiStandIn) -> None:
    async with _bot(botapi) as bot:
        ok = await bot.send_message(3, "confidence 0.93 <b>")
        assert ok.text == "confidence 0.93 <b>" and ok.entities == ()
        with pytest.raises(BadRequest, match="(?i)does not emulate parse_mode"):
            await bot.send_message(3, "*bold*", parse_mode="MarkdownV2")
        with pytest.raises(BadRequest, match="(?i)does not emulate parse_mode"):
            await bot.send_photo(3, photo=_png(10, 10), caption="<b>x</b>", parse_mode="HTML")
        with pytest.raises(BadRequest, match="(?i)too long"):
            await bot.send_message(3, "x" * 4097)
        with pytest.raises(BadRequest, match="(?i)text is empty"):
            await bot.send_message(3, "   ")
        with pytest.raises(BadRequest, match="(?i)BUTTON_DATA_INVALID"):
            await bot.send_message(
                3, "k", reply_markup=InlineKeyboardMarkup([[InlineKeyboardButton("b", callback_data="d" * 65)]])
            )
        with pytest.raises(BadRequest, match="(?i)replied not found"):
            await bot.send_message(3, "hi", reply_to_message_id=999)
        lenient = await bot.send_message(3, "hi", reply_to_message_id=999, allow_sending_without_reply=True)
        assert lenient.reply_to_message is None

        edited = await bot.edit_message_text("plain", chat_id=3, message_id=ok.message_id)
        assert edited.text == "plain" and edited.edit_date is not None
        with pytest.raises(BadRequest, match="(?i)not modified"):
            await bot.edit_message_text("plain", chat_id=3, message_id=ok.message_id)
        markup = InlineKeyboardMarkup([[InlineKeyboardButton("again", callback_data="again")]])
        with_kb = await bot.edit_message_reply_markup(chat_id=3, message_id=ok.message_id, reply_markup=markup)
        assert with_kb.reply_markup == markup
        without_kb = await bot.edit_message_reply_markup(chat_id=3, message_id=ok.message_id, reply_markup=None)
        assert without_kb.reply_markup is None
        with pytest.raises(BadRequest, match="(?i)not modified"):
            await bot.edit_message_reply_markup(chat_id=3, message_id=ok.message_id, reply_markup=None)
        with pytest.raises(BadRequest, match="(?i)to edit not found"):
            await bot.edit_message_text("x", chat_id=3, message_id=999)
        user_msg = botapi.make_text_update(3, 3, "mine")["message"]
        with pytest.raises(BadRequest, match="(?i)can't be edited"):
            await bot.edit_message_text("x", chat_id=3, message_id=user_msg["message_id"])
    ids = [c.result["message_id"] for c in botapi.sent_calls("sendMessage")]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert botapi.message(3, ok.message_id)["text"] == "plain"


# ----------------------------------------------------------------------------------------------
# Wire level: raw HTTP
# ----------------------------------------------------------------------------------------------


async def test_wire_formats_unknown_method_and_file_route(botapi: BotApiStandIn) -> None:
    base = f"{botapi.base_url}{botapi.token}"
    doc = botapi.make_document_update(4, 4, b"\x00\x01payload", mime_type="application/pdf", file_name="a.pdf")
    file_id = doc["message"]["document"]["file_id"]
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/sendMessage", data={"chat_id": "4", "text": "form"}) as r:
            body = await r.json()
            assert r.status == 200 and body["ok"] and body["result"]["text"] == "form"
        async with http.post(f"{base}/SENDMESSAGE", data={"chat_id": "4", "text": "123"}) as r:
            assert (await r.json())["result"]["text"] == "123"  # text stays a string
        async with http.post(f"{base}/getMe") as r:
            assert (await r.json())["result"]["username"] == "labelgram_test_bot"
        async with http.post(f"{base}/frobnicate") as r:
            assert r.status == 404
            assert await r.json() == {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        async with http.post(f"{botapi.base_url}1:nope/getMe") as r:
            assert r.status == 401
            assert await r.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
        async with http.post(f"{base}/getFile", data={"file_id": file_id}) as r:
            file_path = (await r.json())["result"]["file_path"]
        async with http.get(f"{botapi.base_file_url}{botapi.token}/{file_path}") as r:
            assert r.status == 200 and await r.read() == b"\x00\x01payload"
        async with http.get(f"{botapi.base_file_url}{botapi.token}/documents/missing.bin") as r:
            assert r.status == 404
        async with http.get(f"{botapi.base_file_url}1:nope/{file_path}") as r:
            assert r.status == 401
    assert [c.method for c in botapi.sent_calls()][:4] == ["sendMessage", "sendMessage", "getMe", "getFile"]
    assert botapi.sent_calls()[1].params == {"chat_id": 4, "text": "123"}
    assert [c.method for c in botapi.calls if not c.ok] == ["frobnicate", "getMe"]


async def test_long_polling_offset_limit_and_allowed_updates(botapi: BotApiStandIn) -> None:
    url = f"{botapi.base_url}{botapi.token}/getUpdates"
    async with aiohttp.ClientSession() as http:

        async def get_updates(**params: object) -> tuple[float, dict]:
            t0 = time.monotonic()
            form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
            async with http.post(url, data=form) as r:
                return time.monotonic() - t0, await r.json()

        elapsed, body = await get_updates(timeout=0)
        assert body == {"ok": True, "result": []} and elapsed < 0.5

        loop = asyncio.get_running_loop()
        loop.call_later(0.2, botapi.push_update, botapi.make_text_update(1, 1, "late"))
        elapsed, body = await get_updates(timeout=5)
        assert 0.15 <= elapsed < 2.0
        [first] = body["result"]
        assert first["message"]["text"] == "late"

        elapsed, body = await get_updates(timeout=0.3)
        assert [u["update_id"] for u in body["result"]] == [first["update_id"]]  # not yet confirmed

        ids = [botapi.push_update(botapi.make_text_update(1, 1, f"m{i}")) for i in range(3)]
        _, body = await get_updates(offset=first["update_id"] + 1, limit=2)
        assert [u["update_id"] for u in body["result"]] == ids[:2]
        _, body = await get_updates(offset=-1)
        assert [u["update_id"] for u in body["result"]] == ids[2:]

        cb_msg = botapi.make_text_update(1, 1, "kb")["message"]
        botapi.push_update(botapi.make_callback_update(1, 1, "x", cb_msg))
        msg_id = botapi.push_update(botapi.make_text_update(1, 1, "text"))
        _, body = await get_updates(offset=ids[2] + 1, allowed_updates=["message"])
        assert [u["update_id"] for u in body["result"]] == [msg_id]
        elapsed, body = await get_updates(offset=msg_id + 1, timeout=0.3)
        assert body["result"] == [] and elapsed >= 0.25
        assert botapi.pending_update_count == 0

        poll = asyncio.create_task(get_updates(timeout=5))
        await asyncio.sleep(0.2)
        _, body = await get_updates(timeout=0)
        _, first_poll = await poll
        assert first_poll["error_code"] == 409 and "terminated by other getUpdates" in first_poll["description"]


async def test_webhook_is_recorded_and_blocks_get_updates(botapi: BotApiStandIn) -> None:
    botapi.push_update(botapi.make_text_update(2, 2, "queued"))
    async with _bot(botapi) as bot:
        with pytest.raises(BadRequest, match="(?i)HTTPS URL must be provided"):
            await bot.set_webhook("http://example.org/hook")
        assert await bot.set_webhook("https://example.org/hook", max_connections=5, secret_token="s3cret")
        with pytest.raises(Conflict, match="(?i)webhook is active"):
            await bot.get_updates()
        assert botapi.webhook is not None
        assert (botapi.webhook["url"], botapi.webhook["max_connections"]) == ("https://example.org/hook", 5)
        assert botapi.webhook["secret_token"] == "s3cret"
        assert await bot.delete_webhook(drop_pending_updates=True)
        assert await bot.get_updates() == ()
    assert botapi.webhook is None and botapi.pending_update_count == 0


async def test_injected_failures_and_wait_for_helpers(botapi: BotApiStandIn) -> None:
    async with _bot(botapi) as bot:
        botapi.fail_next("sendChatAction", error_code=403, count=2)
        for _ in range(2):
            with pytest.raises(Forbidden, match="(?i)blocked by the user"):
                await bot.send_chat_action(8, "typing")
        assert await bot.send_chat_action(8, "typing")
        mark = botapi.mark()
        pending = asyncio.create_task(
            botapi.wait_for(lambda c: c.method == "sendMessage", count=2, since=mark)
        )
        await bot.send_message(8, "one")
        await bot.send_message(8, "two")
        both = await asyncio.wait_for(pending, 5)
    assert [c.params["text"] for c in both] == ["one", "two"]
    with pytest.raises(TimeoutError, match="(?i)no matching Bot API call"):
        await botapi.wait_for(lambda c: c.method == "sendPhoto", timeout=0.2)


def test_thread_mode_serves_a_real_application_and_accepts_pushes_from_other_threads() -> None:
    api = BotApiStandIn().start_in_thread()
    try:
        assert api.port > 0

        async def run_bot() -> Call:
            app = _builder(api).build()
            app.add_handler(MessageHandler(filters.PHOTO, _reply_with_largest_photo_size))
            async with _running(app):
                image = _png(64, 48)
                updates = [api.make_photo_update(20 + i, 20 + i, image) for i in range(3)]
                pushers = [threading.Thread(target=api.push_update, args=(u,)) for u in updates]
                for t in pushers:
                    t.start()
                for t in pushers:
                    t.join()
                # a blocking waiter in a worker thread and an async waiter in this loop
                sync_wait = asyncio.to_thread(
                    api.wait_for_sync, lambda c: c.method == "sendMessage", 10, count=3
                )
                calls = await sync_wait
                reply = await api.wait_for(lambda c: c.method == "sendMessage" and c.chat_id == 22)
                assert {c.chat_id for c in calls} == {20, 21, 22}
                assert all(c.params["text"] == str(len(image)) for c in calls)
                return reply

        reply = asyncio.run(run_bot())
        assert reply.reply_to == 1
    finally:
        api.stop()
    assert api._thread is None


def test_module_imports_without_pytest() -> None:
    code = "import sys, tests.botapi_standin; sys.exit('pytest' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert done.returncode == 0
