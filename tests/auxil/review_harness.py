"""What the feedback and review tests share: a stand-in that sends photos by file id, and buttons.

* :class:`ReviewStandIn`: :class:`~tests.auxil.standin_extras.HardenedStandIn` whose ``sendPhoto``
  and ``sendDocument`` also take a ``file_id`` the stand-in knows, of their kind (as the real server
  does for a file it holds), which ``/review`` uses to show a kept photo without downloading it; an
  unknown id, or one of the other kind, gets the real server's error.
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
    """The hardened stand-in whose ``sendPhoto`` / ``sendDocument`` also accept a known ``file_id``.

    As on the real server, a file id is only good for its kind: a document's id sent as a photo
    is refused ("can't use file of type Document as Photo"), and an unknown id too.
    """

    def _by_file_id(self, p: dict[str, Any], name: str, kind: str) -> dict[str, Any]:
        with self._lock:
            stored = self._files.get(str(p.get(name)))
        if stored is None:
            raise _ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
        if not stored.file_path.startswith(f"{kind}/"):
            raise _ApiError(400, f"Bad Request: can't use file of type {stored.file_path.split('/')[0]} as {name}")
        message, chat = self._new_bot_message(p)
        entry = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id, "file_size": stored.file_size}
        if name == "photo":
            message["photo"] = [{**entry, "width": stored.width, "height": stored.height}]
        else:
            message["document"] = {**entry, "file_name": stored.file_name or "image", "mime_type": stored.mime_type}
        self._apply_caption(message, p)
        return self._finish_bot_message(message, chat)

    def _m_send_photo(self, p: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        if "photo" in f or not isinstance(p.get("photo"), str):
            return super()._m_send_photo(p, f)
        return self._by_file_id(p, "photo", "photos")

    def _m_send_document(self, p: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        if "document" in f or not isinstance(p.get("document"), str):
            return super()._m_send_document(p, f)
        return self._by_file_id(p, "document", "documents")


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
