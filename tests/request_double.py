"""An in-process Bot API double for fast handler tests (after PTB's ``tests/auxil`` ``OfflineRequest``).

:class:`RecordingRequest` is a :class:`telegram.request.BaseRequest`: the real ``ExtBot`` builds
every request (parameters, reply markups, arbitrary callback data) as over HTTP, and the double
records it and answers from memory, with no socket. :class:`OfflineBot` builds the real
Application with it (no updater, no TensorFlow unless a model is served) and feeds it updates
through ``Application.process_update``, as a webhook would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telegram import Update
from telegram.ext import Application
from telegram.request import BaseRequest, RequestData

from bot.app import build_application
from bot.config import Config

BOT_USER = {"id": 4242, "is_bot": True, "first_name": "Labelgram", "username": "labelgram_test_bot"}
TOKEN = "4242:offline-test-token"


@dataclass
class Call:
    """One Bot API request the bot made."""

    method: str
    params: dict[str, Any]
    result: Any = None


class RecordingRequest(BaseRequest):
    """Answers Bot API requests from memory and records them (no network)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.files: dict[str, bytes] = {}
        self._message_ids = itertools.count(10_000)

    async def initialize(self) -> None:
        """Nothing to open."""

    async def shutdown(self) -> None:
        """Nothing to close."""

    @property
    def read_timeout(self) -> float:
        """PTB reads it for ``getUpdates``."""
        return 1.0

    def _message(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = int(params.get("chat_id", 0))
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "from": BOT_USER,
        }
        for key in ("text", "caption", "reply_markup"):
            if key in params:
                message[key] = params[key]
        return message

    def _result(self, method: str, params: dict[str, Any]) -> Any:
        if method == "getMe":
            return BOT_USER
        if method in ("sendMessage", "sendPhoto", "sendDocument", "editMessageText"):
            return self._message(params)
        if method == "getFile":
            file_id = str(params["file_id"])
            return {"file_id": file_id, "file_unique_id": file_id, "file_size": len(self.files[file_id]),
                    "file_path": f"photos/{file_id}"}
        if method == "getUpdates":
            return []
        return True

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = BaseRequest.DEFAULT_NONE,
        write_timeout: Any = BaseRequest.DEFAULT_NONE,
        connect_timeout: Any = BaseRequest.DEFAULT_NONE,
        pool_timeout: Any = BaseRequest.DEFAULT_NONE,
    ) -> tuple[int, bytes]:
        """Record the call; answer ``{"ok": true, "result": ...}`` (or a file's bytes for a download)."""
        if "/file/bot" in url:
            return 200, self.files[url.rsplit("/", 1)[-1]]
        endpoint = url.rsplit("/", 1)[-1]
        params = dict(request_data.parameters) if request_data is not None else {}
        call = Call(endpoint, params, self._result(endpoint, params))
        self.calls.append(call)
        return 200, json.dumps({"ok": True, "result": call.result}).encode()

    def sent(self, method: str = "sendMessage") -> list[Call]:
        """The calls of one method, in order."""
        return [c for c in self.calls if c.method == method]


class OfflineBot:
    """The real Application on a :class:`RecordingRequest`; updates go in via ``process_update``."""

    def __init__(self, app: Application[Any, Any, Any, Any, Any, Any], request: RecordingRequest) -> None:
        self.app = app
        self.request = request
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._files = itertools.count(1)

    def _user(self, user: int) -> dict[str, Any]:
        return {"id": user, "is_bot": False, "first_name": f"User{user}"}

    def _message(self, user: int, chat: int | None, **fields: Any) -> dict[str, Any]:
        chat_id = chat if chat is not None else user
        return {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "from": self._user(user),
            **fields,
        }

    async def push(self, data: dict[str, Any]) -> dict[str, Any]:
        """Hand one update (a dict as the Bot API sends it) to the Application and wait until it is handled."""
        data = {"update_id": next(self._update_ids), **data}
        update = Update.de_json(data, self.app.bot)
        self.app.bot.insert_callback_data(update)  # as PTB's updater and webhook server do
        await self.app.process_update(update)
        return data

    async def text(self, user: int, text: str, *, chat: int | None = None) -> dict[str, Any]:
        """A text message (a command when it starts with "/"); returns the message dict."""
        entities = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}] if text.startswith("/") else []
        message = self._message(user, chat, text=text, entities=entities)
        await self.push({"message": message})
        return message

    def photo_message(self, user: int, data: bytes, *, caption: str | None = None,
                      media_group_id: str | None = None, chat: int | None = None) -> dict[str, Any]:
        """A photo message dict (its bytes registered for download)."""
        file_id = f"photo{next(self._files)}"
        self.request.files[file_id] = data
        fields: dict[str, Any] = {"photo": [{"file_id": file_id, "file_unique_id": file_id, "width": 640,
                                            "height": 480, "file_size": len(data)}]}
        if caption is not None:
            fields["caption"] = caption
        if media_group_id is not None:
            fields["media_group_id"] = media_group_id
        return self._message(user, chat, **fields)

    async def photo(self, user: int, data: bytes, **kwargs: Any) -> dict[str, Any]:
        """Send a photo (see :meth:`photo_message`); returns the message dict."""
        message = self.photo_message(user, data, **kwargs)
        await self.push({"message": message})
        return message

    async def press(self, user: int, data: str, on: dict[str, Any]) -> dict[str, Any]:
        """Press a button with callback data ``data`` on message ``on``; returns the answerCallbackQuery params."""
        query_id = f"q{next(self._update_ids)}"
        await self.push({"callback_query": {"id": query_id, "from": self._user(user), "chat_instance": "ci",
                                            "data": data, "message": on}})
        answers = [c.params for c in self.request.sent("answerCallbackQuery") if c.params["callback_query_id"] == query_id]
        assert len(answers) == 1, answers
        return answers[0]

    def replies_to(self, message: dict[str, Any]) -> list[str]:
        """Texts of the messages sent in reply to ``message``."""
        out = []
        for call in self.request.sent():
            params = call.params.get("reply_parameters") or {}
            if int(call.params["chat_id"]) == message["chat"]["id"] and params.get("message_id") == message["message_id"]:
                out.append(str(call.params["text"]))
        return out

    def reply_to(self, message: dict[str, Any]) -> str:
        """The one text sent in reply to ``message``."""
        texts = self.replies_to(message)
        assert len(texts) == 1, (message.get("text") or message.get("caption"), texts)
        return texts[0]


@contextlib.asynccontextmanager
async def offline_bot(store_dir: Path, *, admins: tuple[int, ...] = (1001,), **overrides: Any) -> AsyncIterator[OfflineBot]:
    """The bot's real Application on a :class:`RecordingRequest`, initialized and started (no updater)."""
    data: dict[str, Any] = {
        "telegram": {"token": TOKEN},
        "admins": list(admins),
        "store_dir": str(store_dir),
        "classify": {"album_wait_ms": 100},
        "limits": {"min_free_disk_mb": 0},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    request = RecordingRequest()
    app = build_application(Config(**data), request=request)
    await app.initialize()
    await app.start()
    try:
        yield OfflineBot(app, request)
    finally:
        await app.stop()
        await app.shutdown()
        if app.post_shutdown is not None:
            await app.post_shutdown(app)


__all__ = ["BOT_USER", "TOKEN", "Call", "OfflineBot", "RecordingRequest", "offline_bot"]
