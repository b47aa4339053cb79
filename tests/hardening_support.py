"""Helpers for the hardening tests (tests/test_hardening_*.py, issue 4).

* :class:`HardenedStandIn`: the Bot API stand-in plus two things those tests need and the shared
  stand-in does not do: a log of file downloads (``downloads``: one file path per GET of the file
  route, so "refused before download" is checked on the wire), and failures injected for ONE chat
  (``fail_next_in_chat``: e.g. a 429 RetryAfter on ``sendMessage`` to one chat only). It also
  builds updates the stand-in has no helper for (forwarded, renamed senders, cheap photo copies).
* The ``api`` fixture (a running :class:`HardenedStandIn`); import it into a test module as
  ``from tests.hardening_support import api_fixture  # noqa: F401``.
* :func:`serving_bot`: like ``tests.conftest.running_bot``, with the ``allowed_updates`` the bot
  polls with as a parameter (to deliver update types the bot does not ask for).
* Store snapshots and checks: :func:`store_state`, :func:`assert_store_contained`,
  :func:`chat_texts`, :func:`assert_no_traceback`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from model_store.dataset import ImageStore
from model_store.labels import label_key, normalize_label
from tests.botapi_standin import BotApiStandIn, _ApiError, _consume_failure, _Failure, _norm_chat_id
from tests.conftest import running_bot

__all__ = [
    "HardenedStandIn",
    "StoreState",
    "api_fixture",
    "assert_no_traceback",
    "assert_store_contained",
    "chat_texts",
    "serving_bot",
    "store_state",
]

#: what a chat message must never contain: Python tracebacks, exception class names, source paths
TRACEBACK_RE = re.compile(r"Traceback|File \"|\b\w+(Error|Exception)\b|\.py\b|/site-packages/|\bline \d+")

IMAGE_FILE = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9]{1,16}$")


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


@pytest.fixture(name="api")
async def api_fixture() -> AsyncIterator[HardenedStandIn]:
    """A running :class:`HardenedStandIn` in the test's event loop."""
    async with HardenedStandIn() as stand_in:
        yield stand_in


#: The real Application polling the stand-in; ``allowed_updates=None`` delivers every update type.
serving_bot = running_bot


# ------------------------------------------------------------------------------------------------
# the store as observed from outside


@dataclass(frozen=True)
class StoreState:
    """Everything an admin action could change, read from disk."""

    images: frozenset[tuple[str, str]]  # (label folder, file name)
    catalog: frozenset[tuple[str, str]]  # (sha256, label folder)
    pointer: bytes | None  # models/CURRENT
    versions: tuple[str, ...]
    folders: frozenset[str]

    def added_since(self, before: StoreState) -> set[tuple[str, str]]:
        return set(self.images - before.images)


def store_state(store_dir: Path) -> StoreState:
    images_dir = store_dir / "images"
    images = set()
    folders = set()
    if images_dir.is_dir():
        for folder in images_dir.iterdir():
            folders.add(folder.name)
            if folder.is_dir():
                images.update((folder.name, f.name) for f in folder.iterdir())
    catalog: set[tuple[str, str]] = set()
    db = store_dir / "catalog.sqlite"
    if db.exists():
        with contextlib.closing(sqlite3.connect(db)) as conn:
            catalog = set(conn.execute("SELECT sha256, label FROM images"))
    models = store_dir / "models"
    pointer_file = models / "CURRENT"
    pointer = pointer_file.read_bytes() if pointer_file.exists() else None
    versions = tuple(sorted(p.name for p in models.iterdir() if p.is_dir())) if models.is_dir() else ()
    return StoreState(frozenset(images), frozenset(catalog), pointer, versions, frozenset(folders))


_STORE_TOP_LEVEL = {
    "images",
    "catalog.sqlite",
    "catalog.sqlite-wal",
    "catalog.sqlite-shm",
    ".lock",
    "state.json",
    "bottlenecks",
    "models",
    ".train.lock",
    ".bot.lock",  # held by a running bot (bot.app.acquire_store_lock)
}


def assert_store_contained(root: Path, store_dir: Path, before: Iterable[Path] = ()) -> None:
    """Nothing was written outside ``store_dir`` under ``root``; inside it, images are where they belong.

    * every file under ``root`` that is not in ``before`` lies inside ``store_dir``;
    * the store's top level holds only the known entries; no symbolic links anywhere;
    * ``images/`` holds only folders named with a valid, normalised label (no two with the same
      label key), each holding only ``<sha256>.<ext>`` files whose content hashes to the name.
    """
    before_set = {Path(p) for p in before}
    store_dir = store_dir.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert not path.is_symlink(), f"symbolic link {path}"
            if path in before_set or path.is_dir():
                continue
            assert store_dir in path.resolve().parents, f"file written outside the store: {path}"
    top = {p.name for p in store_dir.iterdir()}
    assert top <= _STORE_TOP_LEVEL, f"unexpected entries in the store: {top - _STORE_TOP_LEVEL}"
    keys: dict[str, str] = {}
    for folder in (store_dir / "images").iterdir():
        assert folder.is_dir(), f"not a folder: {folder}"
        assert normalize_label(folder.name) == folder.name, (
            f"folder with a non-normalised name: {folder.name!r}"
        )
        key = label_key(folder.name)
        assert key not in keys, f"two folders for one label: {keys[key]!r} and {folder.name!r}"
        keys[key] = folder.name
        for f in folder.iterdir():
            assert f.is_file() and IMAGE_FILE.match(f.name), f"unexpected entry {f}"
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name.split(".")[0], (
                f"content of {f} changed"
            )


def catalog_matches_folders(store_dir: Path) -> None:
    """The catalog rows are exactly the image files on disk (after opening the store)."""
    store = ImageStore(store_dir)
    on_disk = {(r.sha256, r.path.parent.name) for r in store.snapshot()}
    with contextlib.closing(sqlite3.connect(store_dir / "catalog.sqlite")) as conn:
        rows = set(conn.execute("SELECT sha256, label FROM images"))
    assert rows == on_disk


# ------------------------------------------------------------------------------------------------
# what the bot said


def chat_texts(api: BotApiStandIn) -> list[str]:
    """Every text the bot showed anywhere: messages, captions, edits, button answers."""
    texts = []
    for call in api.sent_calls():
        for key in ("text", "caption"):
            value = call.params.get(key)
            if isinstance(value, str):
                texts.append(value)
    return texts


def assert_no_traceback(api: BotApiStandIn) -> None:
    for text in chat_texts(api):
        assert not TRACEBACK_RE.search(text), f"internal details shown in the chat: {text!r}"
