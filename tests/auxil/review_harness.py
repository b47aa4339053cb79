"""What the feedback and review tests share: a stand-in that sends photos by file id, and buttons.

* :class:`ReviewStandIn`: :class:`~tests.auxil.standin_extras.HardenedStandIn` whose ``sendPhoto``
  also takes a ``file_id`` the stand-in knows (as the real server does for a file it holds), which
  ``/review`` uses to show a kept photo without downloading it; an unknown id gets the real
  server's "wrong file identifier" error.
* :func:`buttons` / :func:`press`: the inline keyboard of a message as the stand-in holds it now
  (after edits), and a press on one of its buttons by its text, waiting for the bot's answer.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from typing import Any

from tests.auxil.standin_extras import HardenedStandIn
from tests.botapi_standin import Call, _ApiError

__all__ = ["ReviewStandIn", "buttons", "current", "press", "press_data", "until"]


class ReviewStandIn(HardenedStandIn):
    """The hardened stand-in whose ``sendPhoto`` also accepts a known ``file_id``."""

    def _m_send_photo(self, p: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        photo = p.get("photo")
        if "photo" in f or not isinstance(photo, str):
            return super()._m_send_photo(p, f)
        with self._lock:
            stored = self._files.get(photo)
        if stored is None:
            raise _ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
        message, chat = self._new_bot_message(p)
        message["photo"] = [
            {
                "file_id": stored.file_id,
                "file_unique_id": stored.file_unique_id,
                "file_size": stored.file_size,
                "width": stored.width,
                "height": stored.height,
            }
        ]
        self._apply_caption(message, p)
        return self._finish_bot_message(message, chat)


def buttons(message: dict[str, Any]) -> dict[str, str]:
    """Button text -> callback data of the message's inline keyboard ({} without one)."""
    rows = (message.get("reply_markup") or {}).get("inline_keyboard") or []
    return {b["text"]: b["callback_data"] for row in rows for b in row if "callback_data" in b}


def current(api: ReviewStandIn, message: dict[str, Any] | Call) -> dict[str, Any]:
    """The stand-in's current view of a bot message (a ``Call`` of sendMessage/sendPhoto or a message dict)."""
    msg = message.result if isinstance(message, Call) else message
    found = api.message(msg["chat"]["id"], msg["message_id"])
    assert found is not None, msg
    return found


async def press_data(api: ReviewStandIn, user: int, data: str, message: dict[str, Any]) -> dict[str, Any]:
    """Press a button with ``data`` on ``message`` as ``user``; returns the answerCallbackQuery params."""
    update = api.make_callback_update(message["chat"]["id"], user, data, copy.deepcopy(message))
    query_id = update["callback_query"]["id"]
    api.push_update(update)
    await api.wait_for(
        lambda c: c.method == "answerCallbackQuery" and c.params["callback_query_id"] == query_id, timeout=30
    )
    answer = api.callback_answer(query_id)
    assert answer is not None
    return answer


async def press(api: ReviewStandIn, user: int, message: dict[str, Any] | Call, text: str) -> dict[str, Any]:
    """Press the button whose text is ``text`` (else the one containing it) on the message as it is now;
    returns the answer."""
    msg = current(api, message)
    keys = buttons(msg)
    matches = [t for t in keys if t == text] or [t for t in keys if text in t]
    assert len(matches) == 1, (text, list(keys))
    return await press_data(api, user, keys[matches[0]], msg)


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait until ``predicate()`` is true (the bot records an answer just after sending it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
