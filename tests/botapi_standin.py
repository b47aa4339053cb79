"""A local stand-in for the Telegram Bot API server, for tests and benchmarks.

The stand-in is a small aiohttp server that speaks the Bot API wire protocol closely enough for
the *real* python-telegram-bot ``Application`` to run against it over HTTP on 127.0.0.1::

    async with BotApiStandIn() as api:
        app = (
            Application.builder().token(api.token)
            .base_url(api.base_url).base_file_url(api.base_file_url).build()
        )
        ...
        api.push_update(api.make_photo_update(chat_id=5, user_id=5, image_bytes=png))
        call = await api.wait_for(lambda c: c.method == "sendMessage" and c.params["chat_id"] == 5)

Benchmarks that run the bot in a subprocess use the thread mode instead::

    api = BotApiStandIn().start_in_thread()
    ...  # api.push_update(...) from any thread, api.wait_for_sync(...)
    api.stop()

(``with BotApiStandIn() as api:`` does the same as a synchronous context manager.)

Wire format notes (what PTB really sends):

* PTB posts ``application/x-www-form-urlencoded`` bodies in which every non-string value is
  JSON-encoded (``chat_id=5``, ``reply_parameters={"message_id": 3}``) while strings are sent raw,
  and ``multipart/form-data`` when a file is uploaded (the only bodies the stand-in reads). It
  decodes form values per parameter name, like the real server does.
* PTB v22 always sends ``reply_parameters`` (it converts ``reply_to_message_id`` itself).
* Method names are case-insensitive, as on the real server; calls are recorded under their
  canonical spelling (``sendMessage``).

Scope: the Bot API methods and parameters the bot and PTB's ``Application`` use (polling, webhook
registration, commands, plain-text messages with inline keyboards, photo and document uploads,
chat actions, callback answers and edits, file downloads), with the real server's checks on them.
Command menus for a chat scope need a chat the stand-in knows (one that sent a message,
or :meth:`BotApiStandIn.open_chat`), else "chat not found", as on the real server for a user who
never opened a chat with the bot. No ``parse_mode`` / ``entities`` emulation (the bot sends plain text): a call using them fails with
400, so a change that starts using them shows up here instead of passing unchecked.

Flood limits (off by default): ``BotApiStandIn(flood_limits=FloodLimits(...))`` or
:meth:`BotApiStandIn.set_flood_limits` makes the stand-in refuse, like Telegram, a message to a
chat over that chat's limit with 429 ``Too Many Requests: retry after N`` and
``parameters.retry_after`` (whole seconds, at least 1: the time until the chat may get one more
message). Each chat has a leaky bucket: ``private_burst`` messages at once, refilled at
``private_per_second``, ``group_burst`` / ``group_per_minute`` for groups (negative ids), and an
overall one (``overall_per_second``, 0 = off). Counted are the methods of ``FloodLimits.methods``
(sending and editing messages, not chat actions). Refused calls are recorded like any failure
(``calls``, ``error_code == 429``; :meth:`BotApiStandIn.refusals`) and do not take a token.
Windows scale: ``FloodLimits.scaled(10)`` is the same shape ten times faster, for short tests.

This module deliberately does not import pytest: benchmarks import it as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import io
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "BotApiStandIn",
    "Call",
    "FloodLimits",
    "StoredFile",
    "UploadedFile",
]

_MAX_GET_FILE_SIZE = 20 * 1024 * 1024  # getFile refuses files above 20 MB on the real server
_MAX_UPLOAD_SIZE = 50 * 1024 * 1024
_MAX_TEXT = 4096
_MAX_CAPTION = 1024
_THUMB_SIDE = 90

# Parameters whose (form-encoded) value is a plain string and must never be JSON-decoded.
_STRING_PARAMS = frozenset(
    {
        "text",
        "caption",
        "callback_query_id",
        "action",
        "url",
        "secret_token",
        "ip_address",
        "language_code",
        "file_id",
        "photo",
        "document",
    }
)

_CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)

# sendX methods whose calls count as replies for ``replies_to``.
_REPLY_METHODS = frozenset({"sendMessage", "sendPhoto", "sendDocument"})

_COMMAND_RE = re.compile(r"^[a-z0-9_]{1,32}$")


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadedFile:
    """One file part of a multipart request."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class StoredFile:
    """A file the stand-in can hand out through ``getFile`` and the file download route."""

    file_id: str
    file_unique_id: str
    file_path: str
    data: bytes
    file_size: int
    width: int = 0
    height: int = 0
    mime_type: str | None = None
    file_name: str | None = None


@dataclass
class Call:
    """One request the bot made to the stand-in.

    ``params`` holds decoded parameter values (ints, dicts, lists, strings); uploaded files appear
    in ``params`` as their raw ``bytes`` and, with file name and content type, in ``files``.
    ``timestamp`` is ``time.monotonic()`` when the request was received (comparable across
    processes on the same Linux host). ``result`` is the ``result`` field sent back (``None``
    for failed calls, whose ``error_code``/``description`` are set instead).
    """

    method: str
    params: dict[str, Any]
    timestamp: float
    result: Any = None
    ok: bool = True
    error_code: int | None = None
    description: str | None = None
    files: dict[str, UploadedFile] = field(default_factory=dict)

    @property
    def chat_id(self) -> int | str | None:
        return _norm_chat_id(self.params.get("chat_id"))

    @property
    def reply_to(self) -> int | None:
        """The message id this call replies to (from ``reply_parameters`` or the legacy field)."""
        rp = self.params.get("reply_parameters")
        if isinstance(rp, dict) and rp.get("message_id") is not None:
            return int(rp["message_id"])
        legacy = self.params.get("reply_to_message_id")
        return int(legacy) if legacy is not None else None


class _ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


@dataclass
class _Failure:
    error_code: int
    description: str
    parameters: dict[str, Any] | None
    remaining: int


#: Bot API methods that count against a chat's flood limit (sending and editing messages).
FLOOD_COUNTED_METHODS = frozenset(
    {"sendMessage", "sendPhoto", "sendDocument", "editMessageText", "editMessageReplyMarkup", "editMessageCaption"}
)


@dataclass(frozen=True)
class FloodLimits:
    """Telegram-like flood limits the stand-in enforces (see the module docstring).

    The defaults are the issue-12 server: 1 message/s per private chat after a burst of 20,
    20 messages per minute per group (burst 20), 30 per second overall.
    """

    private_burst: int = 20
    private_per_second: float = 1.0
    group_burst: int = 20
    group_per_minute: float = 20.0
    overall_per_second: float = 30.0
    methods: frozenset[str] = FLOOD_COUNTED_METHODS

    def scaled(self, factor: float) -> FloodLimits:
        """The same bursts, refilled ``factor`` times faster (windows ``factor`` times shorter)."""
        return FloodLimits(
            self.private_burst, self.private_per_second * factor, self.group_burst,
            self.group_per_minute * factor, self.overall_per_second * factor, self.methods,
        )


class _Bucket:
    """A leaky bucket of ``capacity`` tokens draining at ``rate`` per second (time.monotonic)."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity, self.rate, self.level, self.stamp = capacity, rate, 0.0, time.monotonic()

    def take(self, now: float) -> float:
        """Take a token and return 0, or return the seconds until one is free (nothing taken)."""
        self.level = max(0.0, self.level - (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level + 1 <= self.capacity + 1e-9:
            self.level += 1
            return 0.0
        return (self.level + 1 - self.capacity) / self.rate


@dataclass
class _Waiter:
    predicate: Callable[[Call], bool]
    count: int
    matches: list[Call]
    deliver: Callable[[list[Call]], None]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _u16(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


def _norm_chat_id(value: Any) -> int | str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    s = str(value).strip()
    if re.fullmatch(r"-?\d+", s):
        return int(s)
    return s


def _decode_form_value(name: str, value: str) -> Any:
    if name in _STRING_PARAMS:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise _ApiError(400, f"Bad Request: invalid {name} specified")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _ApiError(400, f"Bad Request: invalid {name} specified") from None


def _image_size(data: bytes) -> tuple[int, int]:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return int(img.width), int(img.height)
    except Exception:  # unreadable or Pillow missing: Bot API stand-in reports 0x0
        return 0, 0


def _image_format(data: bytes) -> str | None:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return (img.format or "").lower() or None
    except Exception:
        return None


def _thumbnail(data: bytes) -> tuple[bytes, int, int] | None:
    """A real ≤90 px JPEG thumbnail, or None if the bytes are not an image Pillow can read."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img.load()
            thumb = img.convert("RGB")
            thumb.thumbnail((_THUMB_SIDE, _THUMB_SIDE))
            out = io.BytesIO()
            thumb.save(out, format="JPEG", quality=70)
            return out.getvalue(), thumb.width, thumb.height
    except Exception:
        return None


def _plain_text(params: dict[str, Any], *formatting: str) -> None:
    """Refuse formatting the stand-in does not emulate (the bot sends plain text)."""
    for name in ("parse_mode", *formatting):
        if params.get(name) not in (None, "", []):
            raise _ApiError(400, f"Bad Request: the stand-in does not emulate {name}")


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------


def _consume_failure(queue: list[_Failure] | None) -> _ApiError | None:
    """Use one count of the first injected failure in ``queue`` (caller holds the lock)."""
    if not queue:
        return None
    failure = queue[0]
    failure.remaining -= 1
    if failure.remaining <= 0:
        queue.pop(0)
    return _ApiError(failure.error_code, failure.description, failure.parameters)


class BotApiStandIn:
    """Local Bot API server. See the module docstring for usage.

    Args:
        token: the only token accepted (others get 401 Unauthorized).
        host / port: where to listen; ``port=0`` picks a free port (read ``.port`` after start).
        bot_username / bot_first_name: what ``getMe`` reports.
        first_update_id: the first ``update_id`` handed out by ``push_update``.

    Sending to a never-seen chat id creates it (private chat for positive ids, supergroup for
    negative ones).
    """

    def __init__(
        self,
        token: str = "123:ABC",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bot_username: str = "labelgram_test_bot",
        bot_first_name: str = "Labelgram Test",
        first_update_id: int = 100_000,
        flood_limits: FloodLimits | None = None,
    ) -> None:
        self.token = token
        self.host = host
        self._requested_port = port
        self.port: int = 0
        head = token.split(":", 1)[0]
        self.bot_id = int(head) if head.isdigit() else 1
        self.bot_user: dict[str, Any] = {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": bot_first_name,
            "username": bot_username,
        }

        self._lock = threading.RLock()
        self.sent: list[Call] = []  # successful calls, except getUpdates
        self.calls: list[Call] = []  # every request, including failures and getUpdates
        self.pushed_at: dict[int, float] = {}  # update_id -> time.monotonic() of push_update
        self.webhook: dict[str, Any] | None = None

        self._updates: list[dict[str, Any]] = []
        self._next_update_id = first_update_id
        self._allowed_updates: frozenset[str] | None = None  # None: every update type
        self._poll_generation = 0

        self._files: dict[str, StoredFile] = {}
        self._files_by_path: dict[str, StoredFile] = {}
        self._file_counter = itertools.count(1)
        self._chats: dict[int | str, dict[str, Any]] = {}
        self._message_ids: dict[int | str, int] = {}
        self._messages: dict[tuple[int | str, int], dict[str, Any]] = {}
        self._callbacks: dict[str, dict[str, Any]] = {}  # id -> {"query": ..., "answer": ...}
        self._callback_counter = itertools.count(1)
        self._commands: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._failures: dict[str, list[_Failure]] = {}
        self._waiters: list[_Waiter] = []
        self._flood: FloodLimits | None = flood_limits
        self._flood_buckets: dict[Any, _Bucket] = {}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

        self._methods: dict[str, tuple[str, Callable[..., Any]]] = {}
        for name, fn in (
            ("getMe", self._m_get_me),
            ("getUpdates", self._m_get_updates),
            ("setWebhook", self._m_set_webhook),
            ("deleteWebhook", self._m_delete_webhook),
            ("setMyCommands", self._m_set_my_commands),
            ("deleteMyCommands", self._m_delete_my_commands),
            ("sendMessage", self._m_send_message),
            ("sendPhoto", self._m_send_photo),
            ("sendDocument", self._m_send_document),
            ("sendChatAction", self._m_send_chat_action),
            ("editMessageText", self._m_edit_message_text),
            ("editMessageReplyMarkup", self._m_edit_message_reply_markup),
            ("answerCallbackQuery", self._m_answer_callback_query),
            ("getFile", self._m_get_file),
        ):
            self._methods[name.lower()] = (name, fn)

    # ------------------------------------------------------------------ URLs / PTB convenience

    @property
    def base_url(self) -> str:
        """Value for ``ApplicationBuilder.base_url`` (PTB appends the token)."""
        return f"http://{self.host}:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        """Value for ``ApplicationBuilder.base_file_url`` (PTB appends the token)."""
        return f"http://{self.host}:{self.port}/file/bot"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> BotApiStandIn:
        """Start serving in the running event loop."""
        if self._runner is not None:
            raise RuntimeError("BotApiStandIn is already running")
        self._loop = asyncio.get_running_loop()
        self._wakeup = self._loop.create_future()
        self._closing = False
        app = web.Application(client_max_size=_MAX_UPLOAD_SIZE + 1024 * 1024)
        app.router.add_route("POST", "/bot{token}/{method}", self._handle_method)
        app.router.add_route("GET", "/file/bot{token}/{file_path:.+}", self._handle_file)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        await site.start()
        self._runner = runner
        server = site._server  # the asyncio.Server; the only way to learn an ephemeral port
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._requested_port
        return self

    async def close(self) -> None:
        """Stop serving; pending long polls return immediately."""
        if self._runner is None:
            return
        self._closing = True
        self._wake()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> BotApiStandIn:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start_in_thread(self, timeout: float = 10.0) -> BotApiStandIn:
        """Serve from a daemon thread with its own event loop (for benchmarks). Returns self."""
        if self._thread is not None:
            raise RuntimeError("BotApiStandIn thread already started")
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.close())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="BotApiStandIn", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("BotApiStandIn thread did not start in time")
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread started by ``start_in_thread``."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self.close(), loop)
        fut.result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> BotApiStandIn:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ thread-safe wake-ups

    def _wake(self) -> None:
        """Wake every getUpdates long poll (must run on the server loop)."""
        if self._loop is None:
            return
        old = self._wakeup
        self._wakeup = self._loop.create_future()
        if old is not None and not old.done():
            old.set_result(None)

    def _notify_pollers(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed between check and call
                loop.call_soon_threadsafe(self._wake)

    # ------------------------------------------------------------------ test-side: configuration

    def fail_next(
        self,
        method: str,
        *,
        error_code: int = 429,
        retry_after: int | None = 1,
        count: int = 1,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        """Make the next ``count`` calls of ``method`` fail with ``error_code``.

        429 gets ``"Too Many Requests: retry after N"`` and ``parameters.retry_after`` (which PTB
        turns into ``RetryAfter``); other codes get a generic description unless one is given.
        """
        if parameters is None and error_code == 429 and retry_after is not None:
            parameters = {"retry_after": retry_after}
        if description is None:
            description = {
                429: f"Too Many Requests: retry after {retry_after}",
                400: "Bad Request: injected failure",
                401: "Unauthorized",
                403: "Forbidden: bot was blocked by the user",
                404: "Not Found",
                409: "Conflict: injected failure",
                500: "Internal Server Error",
                502: "Bad Gateway",
            }.get(error_code, f"Error {error_code}")
        with self._lock:
            self._failures.setdefault(method.lower(), []).append(
                _Failure(error_code, description, parameters, count)
            )

    def set_flood_limits(self, limits: FloodLimits | None) -> None:
        """Enforce ``limits`` from now on (fresh buckets), or stop enforcing any (None)."""
        with self._lock:
            self._flood = limits
            self._flood_buckets = {}

    def refusals(self, chat_id: int | str | None = None) -> int:
        """429 answers given (to one chat, or in all)."""
        with self._lock:
            return sum(1 for c in self.calls if c.error_code == 429 and (chat_id is None or c.chat_id == chat_id))

    def _flood_check(self, method: str, params: dict[str, Any]) -> _ApiError | None:
        """A 429 if this call is over its chat's (or the overall) limit, else None (a token is taken)."""
        limits = self._flood
        chat = _norm_chat_id(params.get("chat_id"))
        if limits is None or method not in limits.methods or chat is None:
            return None
        group = isinstance(chat, str) or chat < 0
        capacity, rate = (
            (limits.group_burst, limits.group_per_minute / 60.0) if group
            else (limits.private_burst, limits.private_per_second)
        )
        now = time.monotonic()
        with self._lock:
            waits = []
            if rate > 0:
                bucket = self._flood_buckets.get(chat)
                if bucket is None:
                    bucket = self._flood_buckets[chat] = _Bucket(capacity, rate)
                waits.append((bucket, bucket.take(now)))
            if limits.overall_per_second > 0:
                overall = self._flood_buckets.get(None)
                if overall is None:
                    overall = self._flood_buckets[None] = _Bucket(limits.overall_per_second, limits.overall_per_second)
                waits.append((overall, overall.take(now)))
            wait = max((w for _, w in waits), default=0.0)
            if wait > 0:
                for bucket, w in waits:  # refused: give back the token another bucket gave
                    if w == 0:
                        bucket.level -= 1
                retry_after = max(1, int(-(-wait // 1)))
                return _ApiError(429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after})
        return None

    def _add_chat(
        self,
        chat_id: int,
        *,
        chat_type: str = "private",
        title: str | None = None,
        username: str | None = None,
        first_name: str | None = None,
    ) -> dict[str, Any]:
        """Register (or replace) a chat; returns its Chat dict."""
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name or f"User{chat_id}"
        else:
            chat["title"] = title or f"{chat_type.capitalize()} {chat_id}"
        if username:
            chat["username"] = username
        with self._lock:
            self._chats[chat_id] = chat
        return copy.deepcopy(chat)

    def open_chat(self, user_id: int) -> dict[str, Any]:
        """The user opens a private chat with the bot (presses Start) without a message yet; returns its Chat."""
        return self._chat_for(user_id, "private", None)

    # ------------------------------------------------------------------ test-side: files

    def _store_file(
        self,
        data: bytes,
        *,
        file_unique_id: str | None = None,
        file_path: str | None = None,
        file_size: int | None = None,
        kind: str = "documents",
        extension: str | None = None,
        width: int = 0,
        height: int = 0,
        mime_type: str | None = None,
        file_name: str | None = None,
    ) -> StoredFile:
        with self._lock:
            n = next(self._file_counter)
            if extension is None:
                fmt = _image_format(data)
                extension = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt or "", fmt or "bin")
            digest = hashlib.sha1(data).hexdigest()[:20]
            unique = file_unique_id or f"AQAD{digest}"
            prefix = "AgAC" if kind == "photos" else "BQAC"
            file_id = f"{prefix}{n:06d}_{digest}"
            path = file_path or f"{kind}/file_{n}.{extension}"
            stored = StoredFile(
                file_id=file_id,
                file_unique_id=unique,
                file_path=path,
                data=bytes(data),
                file_size=len(data) if file_size is None else file_size,
                width=width,
                height=height,
                mime_type=mime_type,
                file_name=file_name,
            )
            self._files[file_id] = stored
            self._files_by_path[path] = stored
            return stored

    def file(self, file_id: str) -> StoredFile:
        with self._lock:
            return self._files[file_id]

    def _photo_sizes(self, data: bytes) -> list[dict[str, Any]]:
        width, height = _image_size(data)
        thumb = _thumbnail(data)
        if thumb is not None:
            tdata, tw, th = thumb
            small = self._store_file(tdata, kind="photos", extension="jpg", width=tw, height=th)
        else:
            small = self._store_file(data, kind="photos", width=0, height=0)
        big = self._store_file(data, kind="photos", width=width, height=height)
        return [
            {
                "file_id": f.file_id,
                "file_unique_id": f.file_unique_id,
                "file_size": f.file_size,
                "width": f.width,
                "height": f.height,
            }
            for f in (small, big)
        ]

    # ------------------------------------------------------------------ test-side: updates

    def _user(self, user_id: int, username: str | None = None) -> dict[str, Any]:
        user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}
        if username:
            user["username"] = username
        user["language_code"] = "en"
        return user

    def _chat_for(self, chat_id: int, chat_type: str, username: str | None) -> dict[str, Any]:
        with self._lock:
            chat = self._chats.get(chat_id)
            if chat is None or chat.get("type") != chat_type:
                chat = self._add_chat(
                    chat_id, chat_type=chat_type, username=username if chat_type == "private" else None
                )
            return copy.deepcopy(chat)

    def _next_message_id(self, chat_id: int | str) -> int:
        with self._lock:
            mid = self._message_ids.get(chat_id, 0) + 1
            self._message_ids[chat_id] = mid
            return mid

    def _remember_message(self, message: dict[str, Any]) -> None:
        chat_id = _norm_chat_id(message.get("chat", {}).get("id"))
        mid = message.get("message_id")
        if chat_id is None or not isinstance(mid, int):
            return
        with self._lock:
            self._messages[(chat_id, mid)] = copy.deepcopy(message)
            if self._message_ids.get(chat_id, 0) < mid:
                self._message_ids[chat_id] = mid
            if chat_id not in self._chats and isinstance(message.get("chat"), dict):
                self._chats[chat_id] = copy.deepcopy(message["chat"])

    def message(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        """The stand-in's current view of a message (after edits), or None if deleted/unknown."""
        with self._lock:
            msg = self._messages.get((chat_id, message_id))
            return copy.deepcopy(msg) if msg is not None else None

    def _resolve_reply(self, chat_id: int | str, reply_to: Any) -> dict[str, Any] | None:
        if reply_to is None:
            return None
        if isinstance(reply_to, dict):
            msg = copy.deepcopy(reply_to)
        else:
            with self._lock:
                found = self._messages.get((chat_id, int(reply_to)))
            if found is None:
                raise KeyError(f"no message {reply_to} in chat {chat_id}")
            msg = copy.deepcopy(found)
        msg.pop("reply_to_message", None)
        return msg

    def _user_message(
        self,
        chat_id: int,
        user_id: int,
        *,
        chat_type: str = "private",
        username: str | None = None,
        reply_to: Any = None,
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "message_id": self._next_message_id(chat_id),
            "from": self._user(user_id, username),
            "chat": self._chat_for(chat_id, chat_type, username),
            "date": int(time.time()),
        }
        reply = self._resolve_reply(chat_id, reply_to)
        if reply is not None:
            msg["reply_to_message"] = reply
        return msg

    def make_photo_update(
        self,
        chat_id: int,
        user_id: int,
        image_bytes: bytes,
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
        reply_to: int | dict[str, Any] | None = None,
        chat_type: str = "private",
        username: str | None = None,
    ) -> dict[str, Any]:
        """A ``message`` update with a 2-entry ``photo`` array (thumbnail, full size).

        The full-size entry carries the real width/height (via Pillow, 0 if unreadable) and
        ``file_size=len(image_bytes)``; both sizes are downloadable. ``reply_to`` is a message id
        in the same chat or a message dict. The update is not queued: pass it to ``push_update``.
        """
        msg = self._user_message(chat_id, user_id, chat_type=chat_type, username=username, reply_to=reply_to)
        msg["photo"] = self._photo_sizes(image_bytes)
        if caption is not None:
            msg["caption"] = caption
        if media_group_id is not None:
            msg["media_group_id"] = media_group_id
        self._remember_message(msg)
        return {"message": msg}

    def make_document_update(
        self,
        chat_id: int,
        user_id: int,
        data: bytes,
        *,
        mime_type: str,
        file_name: str,
        caption: str | None = None,
        file_size: int | None = None,
        chat_type: str = "private",
        username: str | None = None,
        reply_to: int | dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A ``message`` update with a ``document``; ``file_size`` overrides the claimed size."""
        ext = file_name.rsplit(".", 1)[-1] if "." in file_name else "bin"
        stored = self._store_file(
            data,
            kind="documents",
            extension=ext,
            file_size=file_size,
            mime_type=mime_type,
            file_name=file_name,
        )
        msg = self._user_message(chat_id, user_id, chat_type=chat_type, username=username, reply_to=reply_to)
        msg["document"] = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": stored.file_size,
        }
        if caption is not None:
            msg["caption"] = caption
        self._remember_message(msg)
        return {"message": msg}

    def make_text_update(
        self,
        chat_id: int,
        user_id: int,
        text: str,
        *,
        reply_to_message: int | dict[str, Any] | None = None,
        chat_type: str = "private",
        username: str | None = None,
    ) -> dict[str, Any]:
        """A ``message`` update with ``text``; a leading ``/command`` gets a bot_command entity."""
        msg = self._user_message(
            chat_id, user_id, chat_type=chat_type, username=username, reply_to=reply_to_message
        )
        msg["text"] = text
        if text.startswith("/"):
            command = text.split(None, 1)[0]
            msg["entities"] = [{"type": "bot_command", "offset": 0, "length": _u16(command)}]
        self._remember_message(msg)
        return {"message": msg}

    def make_callback_update(
        self,
        chat_id: int,
        user_id: int,
        data: str,
        message: dict[str, Any] | int,
        *,
        username: str | None = None,
    ) -> dict[str, Any]:
        """A ``callback_query`` update pressed on ``message`` (a Message dict, e.g. a ``Call.result``,
        or a message id in ``chat_id``)."""
        if isinstance(message, int):
            with self._lock:
                found = self._messages.get((chat_id, message))
            if found is None:
                raise KeyError(f"no message {message} in chat {chat_id}")
            message = found
        query_id = f"{self.bot_id}{next(self._callback_counter):08d}"
        query = {
            "id": query_id,
            "from": self._user(user_id, username),
            "message": copy.deepcopy(message),
            "chat_instance": str(abs(hash((self.bot_id, chat_id)))),
            "data": data,
        }
        with self._lock:
            self._callbacks[query_id] = {"query": query, "answer": None}
        return {"callback_query": query}

    def make_edited_message_update(
        self,
        chat_id: int,
        user_id: int,
        message_id: int,
        *,
        text: str | None = None,
        caption: str | None = None,
        chat_type: str = "private",
        username: str | None = None,
    ) -> dict[str, Any]:
        """An ``edited_message`` update for the user's message ``message_id`` (new text/caption)."""
        with self._lock:
            found = self._messages.get((chat_id, message_id))
        if found is not None:
            msg = copy.deepcopy(found)
        else:
            msg = {
                "message_id": message_id,
                "from": self._user(user_id, username),
                "chat": self._chat_for(chat_id, chat_type, username),
                "date": int(time.time()),
            }
        if text is not None:
            msg["text"] = text
            msg.pop("entities", None)
            if text.startswith("/"):
                msg["entities"] = [
                    {"type": "bot_command", "offset": 0, "length": _u16(text.split(None, 1)[0])}
                ]
        if caption is not None:
            msg["caption"] = caption
        msg["edit_date"] = int(time.time())
        self._remember_message(msg)
        return {"edited_message": msg}

    def make_channel_post_update(
        self,
        chat_id: int,
        text: str | None = None,
        *,
        image_bytes: bytes | None = None,
        caption: str | None = None,
        title: str | None = None,
        username: str | None = None,
    ) -> dict[str, Any]:
        """A ``channel_post`` update (no ``from``; ``sender_chat`` is the channel)."""
        with self._lock:
            chat = self._chats.get(chat_id)
        if chat is None or chat.get("type") != "channel":
            chat = self._add_chat(chat_id, chat_type="channel", title=title, username=username)
        msg: dict[str, Any] = {
            "message_id": self._next_message_id(chat_id),
            "sender_chat": copy.deepcopy(chat),
            "chat": copy.deepcopy(chat),
            "date": int(time.time()),
        }
        if text is not None:
            msg["text"] = text
        if image_bytes is not None:
            msg["photo"] = self._photo_sizes(image_bytes)
        if caption is not None:
            msg["caption"] = caption
        self._remember_message(msg)
        return {"channel_post": msg}

    def push_update(self, update: dict[str, Any]) -> int:
        """Queue an update for getUpdates (thread-safe); assigns and returns its ``update_id``."""
        upd = copy.deepcopy(update)
        for key in ("message", "edited_message", "channel_post", "edited_channel_post"):
            if isinstance(upd.get(key), dict):
                self._remember_message(upd[key])
        cq = upd.get("callback_query")
        if isinstance(cq, dict) and "id" in cq:
            with self._lock:
                self._callbacks.setdefault(str(cq["id"]), {"query": cq, "answer": None})
        with self._lock:
            update_id = self._next_update_id
            self._next_update_id += 1
            upd["update_id"] = update_id
            self._updates.append(upd)
            self.pushed_at[update_id] = time.monotonic()
        self._notify_pollers()
        return update_id

    @property
    def pending_update_count(self) -> int:
        """Updates queued and not yet confirmed by a getUpdates offset."""
        with self._lock:
            return len(self._updates)

    # ------------------------------------------------------------------ test-side: inspection

    def mark(self) -> int:
        """Current length of ``sent``; pass as ``since=`` to wait only for later calls."""
        with self._lock:
            return len(self.sent)

    def sent_calls(self, method: str | None = None, *, chat_id: int | str | None = None) -> list[Call]:
        with self._lock:
            calls = list(self.sent)
        return [
            c
            for c in calls
            if (method is None or c.method == method) and (chat_id is None or c.chat_id == chat_id)
        ]

    def replies_to(self, chat_id: int | str, message_id: int) -> list[Call]:
        """sendMessage/sendPhoto/sendDocument calls in ``chat_id`` replying to ``message_id``."""
        return [
            c
            for c in self.sent_calls(chat_id=_norm_chat_id(chat_id))
            if c.method in _REPLY_METHODS and c.reply_to == message_id
        ]

    def commands(self, scope: dict[str, Any] | None = None, language_code: str = "") -> list[dict[str, Any]]:
        """Commands currently stored for ``scope`` (default scope if None) and language."""
        with self._lock:
            return copy.deepcopy(self._commands.get(self._scope_key(scope, language_code), []))

    def callback_answer(self, callback_query_id: str) -> dict[str, Any] | None:
        """Params of the answerCallbackQuery call for this query id, or None if unanswered."""
        with self._lock:
            entry = self._callbacks.get(str(callback_query_id))
            return copy.deepcopy(entry["answer"]) if entry and entry["answer"] is not None else None

    @staticmethod
    def _safe_match(predicate: Callable[[Call], bool], call: Call) -> bool:
        try:
            return bool(predicate(call))
        except (LookupError, TypeError, AttributeError, ValueError):
            # e.g. c.params["chat_id"] on a getMe call: simply not a match
            return False

    def _register_waiter(
        self,
        predicate: Callable[[Call], bool],
        count: int,
        since: int,
        deliver: Callable[[list[Call]], None],
    ) -> tuple[_Waiter | None, list[Call]]:
        with self._lock:
            matches = [c for c in self.sent[since:] if self._safe_match(predicate, c)]
            if len(matches) >= count:
                return None, matches[:count]
            waiter = _Waiter(predicate, count, matches, deliver)
            self._waiters.append(waiter)
            return waiter, []

    def _drop_waiter(self, waiter: _Waiter) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def _timeout_message(self, timeout: float, since: int) -> str:
        with self._lock:
            recent = [f"{c.method}({c.params.get('chat_id', '')})" for c in self.sent[since:][-10:]]
        return f"no matching Bot API call within {timeout}s; recent calls: {recent or 'none'}"

    async def wait_for(
        self,
        predicate: Callable[[Call], bool],
        timeout: float = 10.0,
        *,
        count: int | None = None,
        since: int = 0,
    ) -> Any:
        """Wait until a recorded call (in ``sent``, index ≥ ``since``) matches ``predicate``.

        Returns the first matching ``Call``, or a list of the first ``count`` matches if
        ``count`` is given. Works from any event loop/thread. Predicates that raise
        LookupError/TypeError/AttributeError/ValueError count as "no match". Raises
        ``TimeoutError``.
        """
        need = 1 if count is None else count
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Call]] = loop.create_future()

        def deliver(matches: list[Call]) -> None:
            def _set() -> None:
                if not fut.done():
                    fut.set_result(matches)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set)

        waiter, ready = self._register_waiter(predicate, need, since, deliver)
        if waiter is None:
            matches = ready
        else:
            try:
                matches = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                self._drop_waiter(waiter)
                raise TimeoutError(self._timeout_message(timeout, since)) from None
        return matches[0] if count is None else matches

    def wait_for_sync(
        self,
        predicate: Callable[[Call], bool],
        timeout: float = 10.0,
        *,
        count: int | None = None,
        since: int = 0,
    ) -> Any:
        """Blocking ``wait_for`` for threads without an event loop (thread mode / benchmarks)."""
        need = 1 if count is None else count
        done = threading.Event()
        box: list[list[Call]] = []

        def deliver(matches: list[Call]) -> None:
            box.append(matches)
            done.set()

        waiter, ready = self._register_waiter(predicate, need, since, deliver)
        if waiter is None:
            matches = ready
        else:
            if not done.wait(timeout):
                self._drop_waiter(waiter)
                if not box:
                    raise TimeoutError(self._timeout_message(timeout, since))
            matches = box[0]
        return matches[0] if count is None else matches

    async def wait_for_reply(self, chat_id: int, message_id: int, timeout: float = 10.0) -> Call:
        """Wait for a send* call in ``chat_id`` replying to ``message_id``."""
        return await self.wait_for(
            lambda c: c.method in _REPLY_METHODS and c.chat_id == chat_id and c.reply_to == message_id,
            timeout,
        )

    def _record(self, call: Call) -> None:
        deliveries: list[tuple[_Waiter, list[Call]]] = []
        with self._lock:
            self.calls.append(call)
            if not call.ok or call.method == "getUpdates":
                return
            self.sent.append(call)
            for waiter in list(self._waiters):
                if self._safe_match(waiter.predicate, call):
                    waiter.matches.append(call)
                    if len(waiter.matches) >= waiter.count:
                        self._waiters.remove(waiter)
                        deliveries.append((waiter, waiter.matches[: waiter.count]))
        for waiter, matches in deliveries:
            waiter.deliver(matches)

    # ------------------------------------------------------------------ HTTP plumbing

    @staticmethod
    def _json_response(payload: dict[str, Any], status: int = 200) -> web.Response:
        return web.Response(body=json.dumps(payload).encode(), status=status, content_type="application/json")

    def _error_response(self, err: _ApiError) -> web.Response:
        payload: dict[str, Any] = {"ok": False, "error_code": err.code, "description": err.description}
        if err.parameters:
            payload["parameters"] = err.parameters
        return self._json_response(payload, status=err.code)

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], dict[str, UploadedFile]]:
        """The form fields (PTB posts url-encoded forms, multipart ones when it uploads a file)."""
        params: dict[str, Any] = {}
        files: dict[str, UploadedFile] = {}
        if request.body_exists and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    data = value.file.read()
                    files[key] = UploadedFile(key, value.filename, value.content_type, data)
                else:
                    params[key] = _decode_form_value(key, str(value))
        return params, files

    def _take_failure(self, method_key: str) -> _ApiError | None:
        with self._lock:
            return _consume_failure(self._failures.get(method_key))

    async def _handle_method(self, request: web.Request) -> web.Response:
        received = time.monotonic()
        raw_method = request.match_info["method"]
        canonical, handler = self._methods.get(raw_method.lower(), (raw_method, None))
        call = Call(method=canonical, params={}, timestamp=received)
        try:
            if request.match_info["token"] != self.token:
                raise _ApiError(401, "Unauthorized")
            if handler is None:
                raise _ApiError(404, "Not Found: method not found")
            params, files = await self._read_params(request)
            call.params, call.files = params, files
            for name, up in files.items():
                params[name] = up.data
            failure = self._take_failure(canonical.lower()) or self._flood_check(canonical, params)
            if failure is not None:
                raise failure
            result = handler(params, files)
            if asyncio.iscoroutine(result):
                result = await result
        except _ApiError as err:
            call.ok, call.error_code, call.description = False, err.code, err.description
            self._record(call)
            return self._error_response(err)
        call.result = result
        self._record(call)
        return self._json_response({"ok": True, "result": result})

    async def _handle_file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return self._error_response(_ApiError(401, "Unauthorized"))
        with self._lock:
            stored = self._files_by_path.get(request.match_info["file_path"])
        if stored is None:
            return self._error_response(_ApiError(404, "Not Found"))
        return web.Response(body=stored.data, content_type="application/octet-stream")

    # ------------------------------------------------------------------ shared method helpers

    def _chat(self, chat_ref: Any) -> dict[str, Any]:
        chat_id = _norm_chat_id(chat_ref)
        if not isinstance(chat_id, int):
            raise _ApiError(400, "Bad Request: chat not found")  # the bot only sends to numeric ids
        with self._lock:
            chat = self._chats.get(chat_id)
            if chat is None:
                chat = self._add_chat(chat_id, chat_type="private" if chat_id > 0 else "supergroup")
            return copy.deepcopy(chat)

    @staticmethod
    def _check_markup(markup: Any) -> dict[str, Any] | None:
        """Validate reply_markup; return it if it is an inline keyboard (the only kind echoed)."""
        if markup in (None, ""):
            return None
        if not isinstance(markup, dict):
            raise _ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object")
        rows = markup.get("inline_keyboard")
        if rows is None:
            return None
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise _ApiError(
                400, 'Bad Request: field "inline_keyboard" of the InlineKeyboardMarkup must be an Array'
            )
        actions = ("url", "callback_data")  # the kinds of inline button the bot sends
        for row in rows:
            for button in row:
                if not isinstance(button, dict) or not button.get("text"):
                    raise _ApiError(400, "Bad Request: text buttons are unallowed in the inline keyboard")
                if not any(k in button for k in actions):
                    raise _ApiError(400, "Bad Request: text buttons are unallowed in the inline keyboard")
                data = button.get("callback_data")
                if data is not None and not (1 <= len(str(data).encode("utf-8")) <= 64):
                    raise _ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        return copy.deepcopy(markup)

    def _reply_target(self, chat_id: int | str, params: dict[str, Any]) -> dict[str, Any] | None:
        """The message replied to (``reply_parameters``: PTB v22 always sends those), or None."""
        rp = params.get("reply_parameters")
        if not isinstance(rp, dict) or rp.get("message_id") is None:
            return None
        target_id = _as_int(rp["message_id"], "message_id")
        allow_without = _as_bool(rp.get("allow_sending_without_reply", False))
        with self._lock:
            target = self._messages.get((chat_id, target_id))
        if target is None:
            if allow_without:
                return None
            raise _ApiError(400, "Bad Request: message to be replied not found")
        reply = copy.deepcopy(target)
        reply.pop("reply_to_message", None)
        return reply

    def _new_bot_message(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        chat = self._chat(params.get("chat_id"))
        message: dict[str, Any] = {
            "message_id": 0,
            "from": copy.deepcopy(self.bot_user),
            "chat": chat,
            "date": int(time.time()),
        }
        reply = self._reply_target(chat["id"], params)
        if reply is not None:
            message["reply_to_message"] = reply
        markup = self._check_markup(params.get("reply_markup"))
        if markup is not None:
            message["reply_markup"] = markup
        return message, chat

    def _finish_bot_message(self, message: dict[str, Any], chat: dict[str, Any]) -> dict[str, Any]:
        message["message_id"] = self._next_message_id(chat["id"])
        self._remember_message(message)
        return message

    def _apply_caption(self, message: dict[str, Any], params: dict[str, Any]) -> None:
        caption = params.get("caption")
        if caption in (None, ""):
            return
        _plain_text(params, "caption_entities")
        text = str(caption)
        if len(text) > _MAX_CAPTION:
            raise _ApiError(400, "Bad Request: message caption is too long")
        message["caption"] = text

    def _upload(self, params: dict[str, Any], files: dict[str, UploadedFile], name: str) -> UploadedFile:
        """The uploaded file ``name`` (the bot uploads every photo and document it sends)."""
        upload = files.get(name)
        if upload is None:
            raise _ApiError(400, f"Bad Request: there is no {name} in the request")
        if not upload.data:
            raise _ApiError(400, "Bad Request: file must be non-empty")
        return upload

    def _stored_message(self, params: dict[str, Any]) -> tuple[dict[str, Any], tuple[int | str, int]]:
        chat = self._chat(params.get("chat_id"))
        if params.get("message_id") is None:
            raise _ApiError(400, "Bad Request: message identifier is not specified")
        key = (chat["id"], _as_int(params["message_id"], "message_id"))
        with self._lock:
            msg = self._messages.get(key)
        if msg is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        if msg.get("from", {}).get("id") != self.bot_id:
            raise _ApiError(400, "Bad Request: message can't be edited")
        return copy.deepcopy(msg), key

    @staticmethod
    def _scope_key(scope: Any, language_code: Any) -> tuple[str, str]:
        if isinstance(scope, str):
            try:
                scope = json.loads(scope)
            except ValueError:
                raise _ApiError(400, "Bad Request: can't parse BotCommandScope JSON object") from None
        if not scope:
            scope = {"type": "default"}
        if not isinstance(scope, dict) or "type" not in scope:
            raise _ApiError(400, "Bad Request: can't parse BotCommandScope JSON object")
        norm = dict(scope)
        if "chat_id" in norm:
            norm["chat_id"] = _norm_chat_id(norm["chat_id"])
        return json.dumps(norm, sort_keys=True), str(language_code or "")

    # ------------------------------------------------------------------ Bot API methods

    def _m_get_me(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> dict[str, Any]:
        me = copy.deepcopy(self.bot_user)
        me.update(
            {
                "can_join_groups": True,
                "can_read_all_group_messages": False,
                "supports_inline_queries": False,
                "can_connect_to_business": False,
                "has_main_web_app": False,
            }
        )
        return me

    async def _m_get_updates(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> list[dict[str, Any]]:
        offset = _as_int(p.get("offset", 0) or 0, "offset")
        limit = max(1, min(100, _as_int(p.get("limit", 100) or 100, "limit")))
        try:
            timeout = max(0.0, float(p.get("timeout", 0) or 0))
        except (TypeError, ValueError):
            raise _ApiError(400, "Bad Request: invalid timeout specified") from None
        with self._lock:
            if self.webhook is not None:
                raise _ApiError(
                    409,
                    "Conflict: can't use getUpdates method while webhook is active; "
                    "use deleteWebhook to delete the webhook first",
                )
            if "allowed_updates" in p:
                allowed = p["allowed_updates"]
                if isinstance(allowed, str):
                    allowed = json.loads(allowed) if allowed.strip() else []
                self._allowed_updates = frozenset(allowed) if allowed else None
            self._poll_generation += 1
            generation = self._poll_generation
            if offset > 0:
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            elif offset < 0:
                self._updates = self._updates[offset:]
        self._wake()  # an older long poll still waiting now gets 409, like the real server
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        while True:
            wakeup = self._wakeup
            with self._lock:
                if self._allowed_updates is not None:  # like the server: other types are dropped
                    self._updates = [u for u in self._updates if self._update_type(u) in self._allowed_updates]
                batch = copy.deepcopy(self._updates[:limit])
                superseded = generation != self._poll_generation
            if batch or self._closing:
                return batch
            if superseded:
                raise _ApiError(
                    409,
                    "Conflict: terminated by other getUpdates request; "
                    "make sure that only one bot instance is running",
                )
            remaining = deadline - self._loop.time()
            if remaining <= 0 or wakeup is None:
                return []
            await asyncio.wait([wakeup], timeout=remaining)

    @staticmethod
    def _update_type(update: dict[str, Any]) -> str:
        return next((k for k in update if k != "update_id"), "")

    def _m_set_webhook(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> bool:
        url = p.get("url")
        if not url:
            return self._m_delete_webhook(p, f)
        if not str(url).startswith("https://"):
            raise _ApiError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        with self._lock:
            self.webhook = {k: v for k, v in p.items() if not isinstance(v, bytes)}
            if _as_bool(p.get("drop_pending_updates", False)):
                self._updates.clear()
            if "allowed_updates" in p and p["allowed_updates"]:
                self._allowed_updates = frozenset(p["allowed_updates"])
        self._notify_pollers()
        return True

    def _m_delete_webhook(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> bool:
        with self._lock:
            self.webhook = None
            if _as_bool(p.get("drop_pending_updates", False)):
                self._updates.clear()
        return True

    def _m_set_my_commands(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> bool:
        commands = p.get("commands")
        if isinstance(commands, str):
            try:
                commands = json.loads(commands)
            except ValueError:
                raise _ApiError(400, "Bad Request: can't parse commands JSON object") from None
        if not isinstance(commands, list):
            raise _ApiError(400, 'Bad Request: parameter "commands" is required')
        if len(commands) > 100:
            raise _ApiError(400, "Bad Request: too many commands specified")
        clean: list[dict[str, Any]] = []
        for cmd in commands:
            if not isinstance(cmd, dict):
                raise _ApiError(400, "Bad Request: can't parse BotCommand JSON object")
            name = str(cmd.get("command", "")).lstrip("/")
            desc = str(cmd.get("description", ""))
            if not _COMMAND_RE.match(name):
                raise _ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(desc) <= 256:
                raise _ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
            clean.append({"command": name, "description": desc})
        key = self._scope_key(p.get("scope"), p.get("language_code"))
        with self._lock:
            self._check_scope_chat(key)
            if clean:
                self._commands[key] = clean
            else:
                self._commands.pop(key, None)
        return True

    def _m_delete_my_commands(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> bool:
        key = self._scope_key(p.get("scope"), p.get("language_code"))
        with self._lock:
            self._check_scope_chat(key)
            self._commands.pop(key, None)
        return True

    def _check_scope_chat(self, key: tuple[str, str]) -> None:
        """A chat scope needs a chat the bot knows: a user who never opened a chat with the bot gets
        the real server's "chat not found" (the caller holds the lock)."""
        chat_id = json.loads(key[0]).get("chat_id")
        if chat_id is not None and chat_id not in self._chats:
            raise _ApiError(400, "Bad Request: chat not found")

    def _m_send_message(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> dict[str, Any]:
        raw = p.get("text")
        if raw is None or str(raw) == "":
            raise _ApiError(400, "Bad Request: message text is empty")
        _plain_text(p, "entities")
        text = str(raw)
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > _MAX_TEXT:
            raise _ApiError(400, "Bad Request: message is too long")
        message, chat = self._new_bot_message(p)
        message["text"] = text
        return self._finish_bot_message(message, chat)

    def _m_send_photo(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> dict[str, Any]:
        upload = self._upload(p, f, "photo")
        if _image_size(upload.data) == (0, 0):
            raise _ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED")
        message, chat = self._new_bot_message(p)
        message["photo"] = self._photo_sizes(upload.data)
        self._apply_caption(message, p)
        return self._finish_bot_message(message, chat)

    def _m_send_document(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> dict[str, Any]:
        upload = self._upload(p, f, "document")
        message, chat = self._new_bot_message(p)
        filename = upload.filename or "document"
        ext = filename.rsplit(".", 1)[-1] if "." in filename else "bin"
        mime = upload.content_type or "application/octet-stream"
        stored = self._store_file(upload.data, kind="documents", extension=ext, mime_type=mime, file_name=filename)
        message["document"] = {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_name": filename,
            "mime_type": mime,
            "file_size": stored.file_size,
        }
        self._apply_caption(message, p)
        return self._finish_bot_message(message, chat)

    def _m_send_chat_action(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> bool:
        self._chat(p.get("chat_id"))
        if p.get("action") not in _CHAT_ACTIONS:
            raise _ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    def _m_edit_message_text(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> dict[str, Any]:
        raw = p.get("text")
        if raw is None or str(raw) == "":
            raise _ApiError(400, "Bad Request: message text is empty")
        _plain_text(p, "entities")
        msg, _ = self._stored_message(p)
        if "text" not in msg:
            raise _ApiError(400, "Bad Request: there is no text in the message to edit")
        text = str(raw)
        if len(text) > _MAX_TEXT:
            raise _ApiError(400, "Bad Request: message is too long")
        markup = self._check_markup(p.get("reply_markup"))
        if text == msg.get("text") and markup == msg.get("reply_markup"):
            raise _ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message",
            )
        msg["text"] = text
        msg.pop("reply_markup", None)  # like Telegram: editing without reply_markup drops the keyboard
        if markup is not None:
            msg["reply_markup"] = markup
        msg["edit_date"] = int(time.time())
        self._remember_message(msg)
        return msg

    def _m_edit_message_reply_markup(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> dict[str, Any]:
        msg, _ = self._stored_message(p)
        markup = self._check_markup(p.get("reply_markup"))
        if markup == msg.get("reply_markup"):
            raise _ApiError(
                400,
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message",
            )
        msg.pop("reply_markup", None)
        if markup is not None:
            msg["reply_markup"] = markup
        msg["edit_date"] = int(time.time())
        self._remember_message(msg)
        return msg

    def _m_answer_callback_query(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> bool:
        qid = str(p.get("callback_query_id", ""))
        text = p.get("text")
        if text is not None and len(str(text)) > 200:
            raise _ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        with self._lock:
            entry = self._callbacks.get(qid)
            if entry is None or entry["answer"] is not None:
                raise _ApiError(
                    400,
                    "Bad Request: query is too old and response timeout expired or query ID is invalid",
                )
            entry["answer"] = {k: v for k, v in p.items()}
        return True

    def _m_get_file(self, p: dict[str, Any], f: dict[str, UploadedFile]) -> dict[str, Any]:
        file_id = str(p.get("file_id", ""))
        with self._lock:
            stored = self._files.get(file_id)
        if stored is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        if stored.file_size > _MAX_GET_FILE_SIZE:
            raise _ApiError(400, "Bad Request: file is too big")
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": stored.file_size,
            "file_path": stored.file_path,
        }
