"""Teaching from the chat (admins only): ``/add`` as a caption, as a reply, on an album; ``/undo``.

An ``/add <label>`` caption sits on one photo of an album; the album is held until no photo of it
came for ``classify.album_wait_ms`` (a ``JobQueue.run_once`` job keyed by the album's
``media_group_id``, rescheduled by each photo), then the label applies to all its photos; an
admin's album without ``/add`` is classified photo by photo. Stragglers arriving after their
album was handled get the same treatment, answered on their own.

Every stored (or refused) photo is counted in the admin's teaching acknowledgement
(:mod:`bot.acks`): one message per burst of ``/add`` photos or per album, edited as they land and
paced to the chat's flood limit, instead of one message per photo (issue 12).

Store calls run in worker threads (the decode pool for adds, which decode the image to check it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, cast

from telegram import Message, Update
from telegram.error import TelegramError
from telegram.ext import Application, BaseHandler, CommandHandler, MessageHandler, filters

from bot import acks
from bot.classifying import classify_message
from bot.context import Album, AlbumKey, Context
from bot.telegram_io import (
    ADD_CAPTION,
    ADD_USAGE,
    IMAGES,
    IN_ALBUM,
    NEW,
    ImageRef,
    arg_text,
    cut_text,
    download_image,
    image_ref,
    images_text,
    parse_add_caption,
    reply,
    user_id_of,
)
from bot.wording import error_text
from model_store.errors import LabelError, LabelgramError, StoreFullError
from model_store.labels import label_key, normalize_label

__all__ = [
    "add_from_caption",
    "add_images",
    "collect_album_item",
    "finish_albums_now",
    "handlers",
    "on_add",
    "on_undo",
]

log = logging.getLogger(__name__)

ALBUM_MEMORY_SECONDS = 120.0
MAX_UNDO = 100



async def add_images(context: Context, anchor: Message, refs: list[ImageRef], label: str, *, user_id: int) -> None:
    """Store the images under ``label``, each counted in the admin's teaching acknowledgement.

    The acknowledgement (:mod:`bot.acks`) is the admin's open one in the anchor's chat (a burst)
    or a new one quoting ``anchor``; it is sent and edited by its own task, so a flood-limited
    chat never holds up storing, and a stored photo is never answered with an apology.

    Args:
        context: the handler's (or album job's) context.
        anchor: the message a new acknowledgement replies to (the captioned photo, the command).
        refs: the images, in order.
        label: the label as typed (normalised here; a bad one is reported for every image).
        user_id: the admin (``added_by``).
    """
    data = context.bot_data
    limits = data.config.limits
    ack = acks.join(
        data.teaching_acks, anchor, user_id, album=anchor.media_group_id,
        edit_seconds=limits.teaching_edit_seconds, burst_seconds=limits.teaching_burst_seconds,
    )
    numbers = ack.reserve(len(refs))
    settled = 0
    try:
        try:
            label = normalize_label(label)
        except LabelError as exc:
            for n in numbers:
                ack.failed(n, error_text(exc))
            settled = len(numbers)
            return
        for n, ref in zip(numbers, refs, strict=True):
            try:
                raw = await download_image(context.bot, ref, limit=data.config.classify.max_file_bytes)
                # in the decode pool, like users' photos: the store decodes the image to check it
                result = await data.in_decode_pool(
                    data.workspace.store.add, raw, label, added_by=user_id, chat_id=anchor.chat_id
                )
            except (LabelError, StoreFullError) as exc:  # the same for every remaining image
                for rest in numbers[settled:]:
                    ack.failed(rest, error_text(exc))
                settled = len(numbers)
                return
            except LabelgramError as exc:  # too large, unreadable, already under another label
                ack.failed(n, error_text(exc))
            except TelegramError as exc:  # the download failed: nothing stored
                log.info("teaching: image not downloaded (%s: %s)", type(exc).__name__, exc)
                ack.failed(n, "I couldn't download this one from Telegram. Please send it again.")
            else:
                ack.stored(result.label, result.created)
            settled += 1
    finally:
        if settled < len(numbers):  # an unexpected error (reported by the error handler): not stored
            for rest in numbers[settled:]:
                ack.failed(rest, "Something went wrong on my side; it was not added.")
        await ack.flush(context.application, data.label_count)


async def add_from_caption(context: Context, message: Message, label: str, user_id: int) -> None:
    """A single photo / image document captioned ``/add <label>`` by an admin."""
    if not label:
        await reply(message, "Which label? " + ADD_USAGE)
        return
    ref = image_ref(message)
    if ref is None:
        await reply(message, ADD_USAGE)
        return
    await add_images(context, message, [ref], label, user_id=user_id)


async def on_add_caption(update: Update, context: Context) -> None:
    """An admin's photo captioned ``/add <label>`` (routed here by the ADD_CAPTION filter)."""
    message = update.effective_message
    user_id = user_id_of(update)
    if message is None or user_id is None:
        return
    label = parse_add_caption(message.caption, context.bot.username) or ""
    await add_from_caption(context, message, label, user_id)


async def on_add(update: Update, context: Context) -> None:
    """``/add <label>`` as a text message: it must reply to a photo."""
    message = update.effective_message
    user_id = user_id_of(update)
    if message is None or user_id is None:
        return
    label = arg_text(message)
    ref = image_ref(message.reply_to_message)
    if ref is None:
        await reply(message, ADD_USAGE)
        return
    if not label:
        await reply(message, "Which label? " + ADD_USAGE)
        return
    await add_images(context, message, [ref], label, user_id=user_id)


_ALBUM_JOB_PREFIX = "album:"


def _album_job_name(key: AlbumKey) -> str:
    return f"{_ALBUM_JOB_PREFIX}{key[0]}:{key[1]}:{key[2]}"


async def on_album_item(update: Update, context: Context) -> None:
    """One photo of an admin's album (routed here for admins' messages with a media_group_id)."""
    message = update.effective_message
    if message is None or user_id_of(update) is None:
        return
    await collect_album_item(update, context, message, parse_add_caption(message.caption, context.bot.username))


async def collect_album_item(update: Update, context: Context, message: Message, label: str | None) -> None:
    """Hold one photo of an admin's album until the album is complete, then add or classify it.

    Args:
        update: the photo's update (errors of the whole album are reported against it).
        context: the handler's context.
        message: the photo's message (it has a ``media_group_id``).
        label: its ``/add`` caption's label ("" without one), None without an ``/add`` caption.
    """
    data = context.bot_data
    user_id = user_id_of(update)
    assert user_id is not None and message.media_group_id is not None
    key: AlbumKey = (message.chat_id, user_id, message.media_group_id)
    albums = data.albums
    now = time.monotonic()
    for old_key in [k for k, a in albums.items() if a.done and now - a.finished_at > ALBUM_MEMORY_SECONDS]:
        del albums[old_key]

    album = albums.get(key)
    if album is not None and album.done:
        # a straggler arriving after its album was handled: same treatment, answered on its own
        if album.other_labels or (label and album.label and not _same_label(label, album.label)):
            await reply(message, _conflict_text([album.label or "", *album.other_labels, label or ""]))
        elif album.label:
            ref = image_ref(message)
            assert ref is not None
            await add_images(context, message, [ref], album.label, user_id=user_id)
        elif album.label is None and label is None:
            await classify_message(context, message, user_id)
        else:
            await add_from_caption(context, message, label or "", user_id)
        return
    if album is None:
        album = Album([message], label, user_id, message if label is not None else None)
        albums[key] = album
    else:
        album.messages.append(message)
        if label is not None and album.label is None:
            album.label, album.captioned = label, message
        elif label and album.label and not _same_label(label, album.label):
            album.other_labels.append(label)
    # (re)start the wait: the album is complete once none of its photos came for album_wait_ms
    job_queue = context.job_queue
    assert job_queue is not None
    name = _album_job_name(key)
    for job in job_queue.get_jobs_by_name(name):
        job.schedule_removal()
    job_queue.run_once(
        _finish_album, when=data.config.classify.album_wait_ms / 1000, data=(key, update), name=name
    )


async def _finish_album(context: Context) -> None:
    """The album's wait is over: add its photos under the caption's label, or classify each."""
    assert context.job is not None
    key, update = cast(tuple[AlbumKey, Update], context.job.data)
    album = context.bot_data.albums.get(key)
    if album is None or album.done:
        return
    album.done, album.finished_at = True, time.monotonic()
    try:
        await _answer_album(context, album)
    except Exception as exc:  # reported like a handler's error: logged, and an apology to the first photo
        await context.application.process_error(update, exc, job=context.job)


async def finish_albums_now(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    """Answer every album still waiting for photos, now (at shutdown: no more photos will come).

    Without it, stopping the JobQueue would drop them; before albums were jobs, Application.stop
    waited for the handler that was holding the album.
    """
    job_queue = application.job_queue
    if job_queue is None:
        return
    for job in job_queue.jobs():
        if job.name is not None and job.name.startswith(_ALBUM_JOB_PREFIX) and not job.removed:
            job.schedule_removal()
            await job.run(application)


async def _answer_album(context: Context, album: Album) -> None:
    messages = sorted(album.messages, key=lambda m: m.message_id)
    if album.label is None:
        await asyncio.gather(*(classify_message(context, m, album.user_id) for m in messages))
        return
    anchor = album.captioned or messages[0]
    if album.other_labels:  # "/add hat" on one photo, "/add shoes" on another: which is which is unknown
        await reply(anchor, _conflict_text([album.label or "", *album.other_labels]))
        return
    if not album.label:
        await reply(anchor, "Which label? " + ADD_USAGE)
        return
    refs = [ref for m in messages if (ref := image_ref(m)) is not None]
    await add_images(context, anchor, refs, album.label, user_id=album.user_id)


def _same_label(a: str, b: str) -> bool:
    try:
        return label_key(a) == label_key(b)
    except LabelError:
        return a.strip() == b.strip()


def _conflict_text(labels: list[str]) -> str:
    names = ", ".join(dict.fromkeys(label.strip() for label in labels if label.strip()))
    return cut_text(
        f"This album has more than one /add label ({names}), so I added none of its photos. "
        "Send one album per label."
    )


async def on_undo(update: Update, context: Context) -> None:
    """``/undo [n]``: remove the admin's own last ``n`` (1..MAX_UNDO) added images."""
    message = update.effective_message
    user_id = user_id_of(update)
    if message is None or user_id is None:
        return
    arg = arg_text(message)
    # isdecimal, not isdigit: "²" is a digit that int() refuses (it raised in the handler)
    if arg and not (arg.isdecimal() and 1 <= int(arg) <= MAX_UNDO):
        await reply(message, f"Use /undo to remove your last added image, or /undo <n> (n from 1 to {MAX_UNDO}).")
        return
    n = int(arg) if arg else 1
    store = context.bot_data.workspace.store

    def undo() -> Counter[str]:
        removed: Counter[str] = Counter()
        for record in store.last_added_by(user_id, n):
            if store.remove(record.sha256):
                removed[record.label] += 1
        return removed

    removed = await asyncio.to_thread(undo)
    if not removed:
        await reply(message, "Nothing to undo: none of the images you added is still stored.")
        return
    total = sum(removed.values())
    parts = ", ".join(f"{label} ({count})" for label, count in sorted(removed.items()))
    await reply(message, f"Removed {images_text(total)}: {parts}.")


def handlers(admins: filters.User) -> list[BaseHandler[Any, Any, Any]]:
    """Admins' albums (first), ``/add`` captions, ``/add`` replies and ``/undo``."""
    mine = NEW & admins
    return [
        MessageHandler(mine & IMAGES & IN_ALBUM, on_album_item),
        MessageHandler(mine & IMAGES & ADD_CAPTION, on_add_caption),
        CommandHandler("add", on_add, filters=mine),
        CommandHandler("undo", on_undo, filters=mine),
    ]
