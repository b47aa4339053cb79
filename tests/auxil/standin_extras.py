"""The Bot API stand-in with what the input, access, load and crash tests need on top.

* :class:`HardenedStandIn`: the stand-in plus a log of file downloads (``downloads``: one file path
  per GET of the file route, so "refused before download" is checked on the wire) and failures
  injected for ONE chat (``fail_next_in_chat``: e.g. a 429 RetryAfter on ``sendMessage`` to one chat
  only); the ``api`` fixture (tests/conftest.py) yields a running one.
* Update builders the stand-in has no helper for: :meth:`HardenedStandIn.photo_like` (cheap photo
  copies), :func:`with_sender` (renamed senders), :func:`forwarded`, and :func:`push`.
* :func:`serving_bot`: ``tests.auxil.bot_harness.running_bot``, whose ``allowed_updates`` parameter
  delivers update types the bot does not ask for.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from tests.auxil.bot_harness import running_bot
from tests.botapi_standin import BotApiStandIn, _ApiError, _consume_failure, _Failure, _norm_chat_id

__all__ = ["HardenedStandIn", "forwarded", "push", "serving_bot", "with_sender"]


class HardenedStandIn(BotApiStandIn):
    """The Bot API stand-in with a download log and chat-scoped injected failures."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: file paths downloaded through the file route, in order
        self.downloads: list[str] = []
        self._chat_failures: dict[tuple[str, int | str | None], list[_Failure]] = {}

    # ---------------------------------------------------------------- downloads
    async def _handle_file(self, request: Any) -> Any:
        with self._lock:
            self.downloads.append(request.match_info["file_path"])
        return await super()._handle_file(request)

    def downloaded(self, file_id: str) -> int:
        """How many times the file with this id was downloaded."""
        path = self.file(file_id).file_path
        with self._lock:
            return sum(1 for p in self.downloads if p == path)

    # ---------------------------------------------------------------- chat-scoped failures
    def fail_next_in_chat(
        self,
        method: str,
        chat_id: int,
        *,
        error_code: int = 429,
        retry_after: int | None = 2,
        count: int = 1,
    ) -> None:
        """Make the next ``count`` calls of ``method`` to ``chat_id`` fail (other chats unaffected).

        Supported for ``sendMessage`` and ``sendChatAction`` (what the bot sends per chat).
        """
        parameters = {"retry_after": retry_after} if error_code == 429 and retry_after is not None else None
        description = (
            f"Too Many Requests: retry after {retry_after}" if error_code == 429 else f"Error {error_code}"
        )
        with self._lock:
            self._chat_failures.setdefault((method.lower(), _norm_chat_id(chat_id)), []).append(
                _Failure(error_code, description, parameters, count)
            )

    def _take_chat_failure(self, method: str, params: dict[str, Any]) -> _ApiError | None:
        key = (method.lower(), _norm_chat_id(params.get("chat_id")))
        with self._lock:
            return _consume_failure(self._chat_failures.get(key))

    def _m_send_message(self, p: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        failure = self._take_chat_failure("sendMessage", p)
        if failure is not None:
            raise failure
        return super()._m_send_message(p, f)

    def _m_send_chat_action(self, p: dict[str, Any], f: dict[str, Any]) -> bool:
        failure = self._take_chat_failure("sendChatAction", p)
        if failure is not None:
            raise failure
        return super()._m_send_chat_action(p, f)

    def failed_calls(self, method: str | None = None, *, chat_id: int | None = None) -> list[Any]:
        with self._lock:
            calls = list(self.calls)
        return [
            c
            for c in calls
            if not c.ok
            and (method is None or c.method == method)
            and (chat_id is None or c.chat_id == chat_id)
        ]

    # ---------------------------------------------------------------- update builders
    def photo_like(
        self,
        template: dict[str, Any],
        chat_id: int,
        user_id: int,
        *,
        caption: str | None = None,
        chat_type: str = "private",
    ) -> dict[str, Any]:
        """A new photo message from ``user_id`` in ``chat_id`` carrying the same files as ``template``.

        No re-encoding or thumbnailing (cheap, for load tests); the file ids are shared, so downloads
        of this photo count for every message made from the same template.
        """
        msg: dict[str, Any] = {
            "message_id": self._next_message_id(chat_id),
            "from": self._user(user_id),
            "chat": self._chat_for(chat_id, chat_type, None),
            "date": int(time.time()),
            "photo": copy.deepcopy(template["message"]["photo"]),
        }
        if caption is not None:
            msg["caption"] = caption
        return {"message": msg}


def with_sender(
    update: dict[str, Any], *, username: str | None = None, first_name: str | None = None
) -> dict[str, Any]:
    """The update with its sender's username / first name replaced (``username=""`` removes it)."""
    msg = update.get("message") or update.get("edited_message") or update.get("callback_query")
    assert msg is not None
    sender = msg["from"]
    if username is not None:
        if username:
            sender["username"] = username
        else:
            sender.pop("username", None)
        if msg.get("chat", {}).get("type") == "private":
            msg["chat"]["username"] = username
    if first_name is not None:
        sender["first_name"] = first_name
        if msg.get("chat", {}).get("type") == "private":
            msg["chat"]["first_name"] = first_name
    return update


def forwarded(update: dict[str, Any], origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """The message update marked as forwarded (``forward_origin``; a hidden user by default)."""
    msg = update["message"]
    msg["forward_origin"] = origin or {
        "type": "hidden_user",
        "sender_user_name": "Someone",
        "date": int(time.time()) - 3600,
    }
    return update


def push(api: BotApiStandIn, update: dict[str, Any]) -> int:
    """Queue the update; returns the message id it carries."""
    api.push_update(update)
    msg = update.get("message") or update.get("edited_message") or update.get("channel_post")
    return int(msg["message_id"]) if msg else 0


#: The real Application polling the stand-in; ``allowed_updates=None`` delivers every update type.
serving_bot = running_bot
