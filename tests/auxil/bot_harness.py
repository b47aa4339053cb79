"""The real bot, run against the Bot API stand-in, and what the bot tests share.

* user ids (``ADMIN``, ``OTHER_ADMIN``, ``USER``) and the labels of the session-trained store
  (the ``trained_store`` / ``store_copy`` fixtures in tests/conftest.py);
* ``bot_config(...)`` builds a real :class:`bot.config.Config` pointed at the stand-in;
* ``running_bot(...)`` starts the real Application the way ``run_polling`` does (initialize,
  post_init, start, long polling) and yields a :class:`BotHarness` that sends updates and waits
  for the bot's replies over HTTP;
* ``labels_in(text)`` reads the labels of a classification reply.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telegram.ext import Application

from bot.app import ALLOWED_UPDATES, build_application
from bot.config import Config
from bot.context import BotData
from tests.botapi_standin import BotApiStandIn, Call

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CLOTHING = DATA / "clothing"
CASES = DATA / "cases"

ADMIN = 1001
OTHER_ADMIN = 1002
USER = 2002

#: labels of the session-trained model; photos [:6] train it, [6:] are never stored there
TRAINED_LABELS = ("shoes", "pants", "t-shirt")
TRAIN_PER_LABEL = 6

#: one line of a classification reply: "label — 87%" (or "<1%")
_LABEL_LINE = re.compile(r"^(?P<label>.+) — (?P<pct><?\d+%)$")


def photos(label: str) -> list[Path]:
    """The test photos of one clothing label, in a stable order."""
    return sorted((CLOTHING / label).glob("*.jpg"))


def labels_in(text: str) -> list[str]:
    """Labels of a classification reply, best first."""
    return [m.group("label") for line in text.splitlines() if (m := _LABEL_LINE.match(line))]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def bot_config(api: BotApiStandIn, store_dir: Path, **overrides: Any) -> Config:
    """A real Config for a bot talking to ``api``; keyword sections are merged in."""
    data: dict[str, Any] = {
        "telegram": {"token": api.token, "base_url": api.base_url, "base_file_url": api.base_file_url},
        "admins": [ADMIN, OTHER_ADMIN],
        "store_dir": str(store_dir),
        "classify": {"album_wait_ms": 300},
        "training": {"epochs": 20, "accuracy_floor": 0.0, "max_accuracy_drop": 1.0, "max_minutes": 5},
        "limits": {"min_free_disk_mb": 0},
    }
    return Config(**_merge(data, overrides))


@dataclass
class BotHarness:
    """The running bot plus helpers to talk to it through the stand-in."""

    api: BotApiStandIn
    app: Application[Any, Any, Any, Any, Any, Any]

    @property
    def svc(self) -> BotData:
        return self.app.bot_data

    def send_photo(
        self,
        user: int,
        image: Path | bytes,
        *,
        chat: int | None = None,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: int | None = None,
    ) -> int:
        """Push a photo message; returns its message id."""
        data = image.read_bytes() if isinstance(image, Path) else image
        update = self.api.make_photo_update(
            chat if chat is not None else user,
            user,
            data,
            caption=caption,
            media_group_id=media_group_id,
            reply_to=reply_to,
        )
        self.api.push_update(update)
        return update["message"]["message_id"]

    def send_document(
        self,
        user: int,
        data: bytes,
        *,
        file_name: str,
        mime_type: str,
        chat: int | None = None,
        caption: str | None = None,
        file_size: int | None = None,
    ) -> int:
        update = self.api.make_document_update(
            chat if chat is not None else user,
            user,
            data,
            mime_type=mime_type,
            file_name=file_name,
            caption=caption,
            file_size=file_size,
        )
        self.api.push_update(update)
        return update["message"]["message_id"]

    def send_text(self, user: int, text: str, *, chat: int | None = None, reply_to: int | None = None) -> int:
        update = self.api.make_text_update(
            chat if chat is not None else user, user, text, reply_to_message=reply_to
        )
        self.api.push_update(update)
        return update["message"]["message_id"]

    async def reply(self, chat: int, message_id: int, timeout: float = 30.0) -> Call:
        """The bot's (first) reply to one message."""
        return await self.api.wait_for_reply(chat, message_id, timeout=timeout)

    async def reply_text(self, chat: int, message_id: int, timeout: float = 30.0) -> str:
        call = await self.reply(chat, message_id, timeout)
        assert call.method == "sendMessage", call
        return str(call.params["text"])

    async def ask(
        self, user: int, text: str, *, chat: int | None = None, timeout: float = 30.0, **kw: Any
    ) -> str:
        """Send a text (command) and return the bot's reply text."""
        chat_id = chat if chat is not None else user
        return await self.reply_text(chat_id, self.send_text(user, text, chat=chat, **kw), timeout)


@contextlib.asynccontextmanager
async def running_bot(
    api: BotApiStandIn,
    config: Config,
    *,
    allowed_updates: list[str] | None = ALLOWED_UPDATES,
    **build_kwargs: Any,
) -> AsyncIterator[BotHarness]:
    """Build the real Application and run it like ``run_polling`` does, against the stand-in.

    ``allowed_updates=None`` delivers every update type (as a webhook set up without the list
    would, or updates that were queued before the bot restricted the list).
    """
    app = build_application(config, **build_kwargs)
    await app.initialize()
    if app.post_init is not None:
        await app.post_init(app)
    await app.start()
    assert app.updater is not None
    await app.updater.start_polling(poll_interval=0, timeout=1, allowed_updates=allowed_updates)
    try:
        yield BotHarness(api, app)
    finally:
        if app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        if app.post_stop is not None:
            await app.post_stop(app)
        await app.shutdown()
        if app.post_shutdown is not None:
            await app.post_shutdown(app)
