"""Telegram I/O helpers every feature module shares. A leaf: it imports no other ``bot`` module.

* :func:`reply` - answer a message, quoting it (still sent if it was deleted meanwhile);
* :func:`cut_text` - keep a text under Telegram's 4,096-character message limit;
* :class:`ImageRef` / :func:`image_ref` / :func:`download_image` - the image a message carries,
  downloaded only when it is under the configured size limit;
* :func:`parse_add_caption` and the :data:`ADD_CAPTION` filter - an ``/add <label>`` caption
  addressed to this bot (routing of teaching captions is done by this filter in :mod:`bot.app`);
* :func:`retry_after_seconds` - the pause Telegram asked for in a ``RetryAfter`` (HTTP 429);
* :class:`ReplyDropped` - a message given up after waiting for Telegram's flood limits (:mod:`bot.ratelimit`).
"""

from __future__ import annotations

import datetime as dtm
import re
import uuid
import warnings
from dataclasses import dataclass

from telegram import Bot, Message, ReplyParameters, Update
from telegram.error import BadRequest, RetryAfter, TelegramError
from telegram.ext import filters
from telegram.warnings import PTBDeprecationWarning

from model_store.errors import LabelgramError

__all__ = [
    "ADD_CAPTION",
    "ADD_USAGE",
    "IMAGES",
    "IN_ALBUM",
    "MAX_TEXT",
    "NEW",
    "FileTooLarge",
    "ImageRef",
    "ReplyDropped",
    "arg_text",
    "cut_text",
    "download_image",
    "image_ref",
    "issued_by_ptb",
    "images_text",
    "parse_add_caption",
    "reply",
    "retry_after_seconds",
    "too_large_text",
    "user_id_of",
]

#: Longest text the bot sends in one message (Telegram's limit is 4,096 characters).
MAX_TEXT = 4000

_ADD_CAPTION = re.compile(
    r"^/add(?:@(?P<bot>[A-Za-z0-9_]+))?(?:[ \t\u00a0]+(?P<label>[^\n]*))?(?:\n|$)", re.I
)


def cut_text(text: str) -> str:
    """``text`` unchanged when at most :data:`MAX_TEXT` characters, else its first 3,990 plus "\\n…"."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 10] + "\n…"


def images_text(n: int) -> str:
    """"1 image", "3 images"."""
    return f"{n} image" if n == 1 else f"{n} images"


def arg_text(message: Message) -> str:
    """Everything after the command word on the first line of the message's text (or caption)."""
    text = (message.text or message.caption or "").strip()
    first_line = text.split("\n", 1)[0]
    parts = first_line.split(None, 1)
    return parts[1].strip() if len(parts) > 1 else ""


async def reply(message: Message, text: str, **kwargs: object) -> Message:
    """Reply to ``message`` (quoting it; still sent if the message was deleted meanwhile).

    Raises:
        telegram.error.TelegramError: the Bot API refused or could not be reached.
    """
    return await message.reply_text(
        text,
        reply_parameters=ReplyParameters(message_id=message.message_id, allow_sending_without_reply=True),
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class ImageRef:
    """The downloadable image of a message: its file id and the size Telegram reported (bytes)."""

    file_id: str
    file_size: int | None
    kind: str  # "photo" or "document"


def image_ref(message: Message | None) -> ImageRef | None:
    """The image a message carries (largest photo size, or an image/* document), or None."""
    if message is None:
        return None
    if message.photo:
        largest = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        return ImageRef(largest.file_id, largest.file_size, "photo")
    doc = message.document
    if doc is not None and (doc.mime_type or "").lower().startswith("image/"):
        return ImageRef(doc.file_id, doc.file_size, "document")
    return None


class FileTooLarge(LabelgramError):
    """The file is over ``classify.max_file_bytes`` (or the Bot API refused to hand it out)."""


def too_large_text(limit: int, size: int | None) -> str:
    """The polite refusal for a file over ``limit`` bytes (``size`` in bytes, if known)."""
    limit_mb = limit / (1024 * 1024)
    size_part = f" ({size / (1024 * 1024):.1f} MB)" if size else ""
    return (
        f"That file is too large{size_part}: I can only look at images up to {limit_mb:g} MB. "
        "Please send it as a photo (Telegram compresses photos) or a smaller file."
    )


async def download_image(bot: Bot, ref: ImageRef, *, limit: int) -> bytes:
    """Download the image's bytes, refusing (before downloading when the size is known) files over ``limit``.

    Args:
        bot: the bot to call ``getFile`` with.
        ref: the image (see :func:`image_ref`).
        limit: most bytes accepted (``classify.max_file_bytes``).

    Raises:
        FileTooLarge: with a polite message.
        telegram.error.TelegramError: other Bot API failures.
    """
    if ref.file_size is not None and ref.file_size > limit:
        raise FileTooLarge(too_large_text(limit, ref.file_size))
    try:
        file = await bot.get_file(ref.file_id)
    except BadRequest as exc:
        if "too big" in exc.message.lower():
            raise FileTooLarge(too_large_text(limit, ref.file_size)) from None
        raise
    if file.file_size is not None and file.file_size > limit:
        raise FileTooLarge(too_large_text(limit, file.file_size))
    data = bytes(await file.download_as_bytearray())
    if len(data) > limit:
        raise FileTooLarge(too_large_text(limit, len(data)))
    return data


def parse_add_caption(caption: str | None, bot_username: str | None) -> str | None:
    """The label of an ``/add <label>`` caption ("" when the label is missing), else None.

    ``/add@OtherBot ...`` (a command for another bot in a group) is not ours: None.
    """
    if not caption:
        return None
    match = _ADD_CAPTION.match(caption.strip())
    if match is None:
        return None
    addressed = match.group("bot")
    if addressed and bot_username and addressed.lower() != bot_username.lower():
        return None
    return (match.group("label") or "").strip()


class _AddCaption(filters.MessageFilter):
    """Messages whose caption is an ``/add [label]`` command for this bot (:func:`parse_add_caption`)."""

    __slots__ = ()

    def filter(self, message: Message) -> bool:
        return parse_add_caption(message.caption, message.get_bot().username) is not None


#: How to teach: the reply to an ``/add`` without a photo or a label, and to /labels on an empty store.
ADD_USAGE = (
    "To teach me, send a photo with the caption /add <label> (also works on an album), "
    "or reply to a photo with /add <label>. Example: /add sneakers"
)

#: Filter: the caption is ``/add [label]`` addressed to this bot.
ADD_CAPTION = _AddCaption(name="ADD_CAPTION")


class _InAlbum(filters.MessageFilter):
    """Messages that belong to an album (they have a ``media_group_id``)."""

    __slots__ = ()

    def filter(self, message: Message) -> bool:
        return message.media_group_id is not None


#: Filter: the message is one photo/file of an album.
IN_ALBUM = _InAlbum(name="IN_ALBUM")

#: Filter: new messages only (edits and channel posts are deliberately not handled).
NEW = filters.UpdateType.MESSAGE

#: Filter: a photo or an image/* document.
IMAGES = filters.PHOTO | filters.Document.IMAGE


def user_id_of(update: Update) -> int | None:
    """The id of the user who sent ``update`` (None for channel posts and the like)."""
    return update.effective_user.id if update.effective_user else None


def retry_after_seconds(exc: RetryAfter) -> float:
    """Seconds Telegram asked to wait: ``RetryAfter.retry_after`` as a float.

    The attribute is an int (with a deprecation warning) or, with ``PTB_TIMEDELTA=1``, a timedelta
    since PTB 22.2; both are accepted and the warning is not shown.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


class ReplyDropped(TelegramError):
    """A request to a chat given up: Telegram's flood limits kept it waiting past the deadline.

    Raised by :class:`bot.ratelimit.ChatPacedRateLimiter` (which logs it once, without a traceback)
    after ``limits.reply_deadline_seconds``; handlers need not catch it (the error handler
    :func:`bot.ratelimit.on_flood_error` stops it silently).

    Attributes:
        endpoint: the Bot API method (``sendMessage`` ...).
        chat_id: the chat, None for a request without one.
        waited: seconds the request waited before it was given up.
    """

    def __init__(self, *, endpoint: str, chat_id: int | str | None, waited: float) -> None:
        super().__init__(f"Flood control: {endpoint} to chat {chat_id} given up after {waited:.0f} s")
        self.endpoint = endpoint
        self.chat_id = chat_id
        self.waited = waited


def issued_by_ptb(data: str) -> bool:
    """Whether ``data`` has the shape of the ids PTB's ``arbitrary_callback_data`` puts in buttons
    (two uuid4 hex strings, 64 characters): a button the bot issued and has since forgotten,
    rather than one it never issued."""
    if len(data) != 64:
        return False
    try:
        return all(uuid.UUID(hex=half).hex == half for half in (data[:32], data[32:]))
    except ValueError:
        return False
