"""Admin commands: teaching the bot from the chat.

An admin is a numeric Telegram user id listed in ``config.admins`` (never a username: those can
change hands). Every path that changes something checks it first: commands, ``/add`` captions on
photos and albums, and the buttons of ``/delete``. Anyone else gets a polite refusal, nothing is
stored or changed, and one log line records the refusal with the user id only.

Store and registry calls run in worker threads (``asyncio.to_thread``); training runs in a
subprocess (:mod:`bot.training_runner`) under the one lock that the schedule shares.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import shlex
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import wraps
from typing import Any
from zoneinfo import ZoneInfo

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from bot.handlers import ImageRef, classify_message, download_image, image_ref, reply
from bot.reports import ProgressMessage, send_report
from bot.services import Services, services
from model_store.errors import LabelError, LabelgramError, NoModelError, StoreFullError, TrainingError
from model_store.labels import label_key, normalize_label

__all__ = [
    "add_from_caption",
    "collect_album_item",
    "on_add",
    "on_delete",
    "on_delete_button",
    "on_labels",
    "on_rename",
    "on_retrain",
    "on_rollback",
    "on_status",
    "on_undo",
    "refuse",
]

log = logging.getLogger(__name__)

Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Awaitable[None]]

ALBUM_MEMORY_SECONDS = 120.0
DELETE_CONFIRM_SECONDS = 600.0
MAX_UNDO = 100
_DELETE_DATA = re.compile(r"^del:(?P<token>[A-Za-z0-9_-]{8,32}):(?P<choice>[yn])$")


# ------------------------------------------------------------------------------------------------
# access


def _user_id(update: Update) -> int | None:
    return update.effective_user.id if update.effective_user else None


async def refuse(update: Update, what: str) -> None:
    """Politely refuse a non-admin and log it with the user id only."""
    log.info("refused %s from non-admin user %s", what, _user_id(update))
    message = update.effective_message
    if message is not None:
        await reply(
            message,
            f"Sorry, only the bot's admins can use {what}. Send me a photo and I'll tell you what I see.",
        )


def admin_only(command: str) -> Callable[[Handler], Handler]:
    """Decorator: run the handler for admins, refuse everybody else."""

    def decorate(fn: Handler) -> Handler:
        @wraps(fn)
        async def wrapper(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            if not services(context).is_admin(_user_id(update)):
                await refuse(update, f"/{command}")
                return
            await fn(update, context)

        return wrapper

    return decorate


def _arg_text(message: Message) -> str:
    """Everything after the command word on the command's first line."""
    text = (message.text or message.caption or "").strip()
    first_line = text.split("\n", 1)[0]
    parts = first_line.split(None, 1)
    return parts[1].strip() if len(parts) > 1 else ""


# ------------------------------------------------------------------------------------------------
# /add


def _label_count(svc: Services, label: str) -> int:
    key = label_key(label)
    return next((info.count for info in svc.workspace.store.labels() if label_key(info.name) == key), 0)


def _photos(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


async def add_images(
    context: ContextTypes.DEFAULT_TYPE, refs: list[ImageRef], label: str, *, user_id: int, chat_id: int
) -> str:
    """Store the images under ``label``; returns the reply text (a summary or the reason why not)."""
    svc = services(context)
    try:
        label = normalize_label(label)
    except LabelError as exc:
        return exc.message
    added = already = 0
    stored_label = label
    problems: list[str] = []
    for ref in refs:
        try:
            data = await download_image(context, ref)
            # in the decode pool, like users' photos: the store decodes the image to check it
            result = await svc.in_decode_pool(
                svc.workspace.store.add, data, label, added_by=user_id, chat_id=chat_id
            )
        except (LabelError, StoreFullError) as exc:
            return exc.message if not added else f"Added {_photos(added)} to {stored_label}, then: {exc.message}"
        except LabelgramError as exc:  # too large, unreadable, already under another label
            problems.append(exc.message)
            continue
        stored_label = result.label
        if result.created:
            added += 1
        else:
            already += 1
    count = await asyncio.to_thread(_label_count, svc, stored_label)
    if len(refs) == 1:
        if problems:
            return problems[0]
        if added:
            return f"Added to {stored_label} ({_photos(count)})."
        return f"That image is already in {stored_label} ({_photos(count)})."
    lines = [f"Added {_photos(added)} to {stored_label} ({_photos(count)} in total)."]
    if already:
        lines.append(f"{_photos(already).capitalize()} {'was' if already == 1 else 'were'} already there.")
    if problems:
        lines.append(f"{_photos(len(problems)).capitalize()} could not be added:")
        lines += [f"• {text}" for text, _ in Counter(problems).most_common(5)]
    return "\n".join(lines)


ADD_USAGE = (
    "To teach me, send a photo with the caption /add <label> (also works on an album), "
    "or reply to a photo with /add <label>. Example: /add sneakers"
)


async def add_from_caption(update: Update, context: ContextTypes.DEFAULT_TYPE, message: Message, label: str) -> None:
    """A single photo / image document captioned ``/add <label>``."""
    svc = services(context)
    user_id = _user_id(update)
    if not svc.is_admin(user_id):
        await refuse(update, "/add")
        return
    assert user_id is not None
    if not label:
        await reply(message, "Which label? " + ADD_USAGE)
        return
    ref = image_ref(message)
    if ref is None:
        await reply(message, ADD_USAGE)
        return
    await reply(message, await add_images(context, [ref], label, user_id=user_id, chat_id=message.chat_id))


@admin_only("add")
async def on_add(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/add <label>`` as a text message: it must reply to a photo."""
    message = update.effective_message
    if message is None:
        return
    label = _arg_text(message)
    target = message.reply_to_message
    ref = image_ref(target)
    if ref is None:
        await reply(message, ADD_USAGE)
        return
    if not label:
        await reply(message, "Which label? " + ADD_USAGE)
        return
    user_id = _user_id(update)
    assert user_id is not None
    await reply(message, await add_images(context, [ref], label, user_id=user_id, chat_id=message.chat_id))


# ------------------------------------------------------------------------------------------------
# albums: an "/add label" caption sits on one photo of the album; apply it to all of them


@dataclass
class _Album:
    messages: list[Message]
    label: str | None
    last_seen: float
    captioned: Message | None = None
    done: bool = False
    finished_at: float = 0.0


def _albums(svc: Services) -> dict[tuple[int, int, str], _Album]:
    return svc.extras.setdefault("albums", {})


async def collect_album_item(
    update: Update, context: ContextTypes.DEFAULT_TYPE, message: Message, label: str | None
) -> None:
    """One photo of an admin's album: held until the album is complete, then added or classified."""
    svc = services(context)
    user_id = _user_id(update)
    assert user_id is not None and message.media_group_id is not None
    key = (message.chat_id, user_id, message.media_group_id)
    albums = _albums(svc)
    now = time.monotonic()
    for old_key in [k for k, a in albums.items() if a.done and now - a.finished_at > ALBUM_MEMORY_SECONDS]:
        del albums[old_key]

    album = albums.get(key)
    if album is not None and album.done:
        # a straggler arriving after its album was handled: same treatment, answered on its own
        if album.label:
            ref = image_ref(message)
            assert ref is not None
            await reply(message, await add_images(context, [ref], album.label, user_id=user_id, chat_id=message.chat_id))
        elif album.label is None and label is None:
            await classify_message(update, context, message)
        else:
            await add_from_caption(update, context, message, label or "")
        return
    if album is not None:
        album.messages.append(message)
        album.last_seen = now
        if label is not None and album.label is None:
            album.label, album.captioned = label, message
        return

    album = _Album([message], label, now, message if label is not None else None)
    albums[key] = album
    wait = svc.config.classify.album_wait_ms / 1000
    while (remaining := album.last_seen + wait - time.monotonic()) > 0:
        await asyncio.sleep(remaining)
    album.done, album.finished_at = True, time.monotonic()
    messages = sorted(album.messages, key=lambda m: m.message_id)
    if album.label is None:
        await asyncio.gather(*(classify_message(update, context, m) for m in messages))
        return
    anchor = album.captioned or messages[0]
    if not album.label:
        await reply(anchor, "Which label? " + ADD_USAGE)
        return
    refs = [ref for m in messages if (ref := image_ref(m)) is not None]
    await reply(anchor, await add_images(context, refs, album.label, user_id=user_id, chat_id=message.chat_id))


# ------------------------------------------------------------------------------------------------
# /undo /labels /rename /delete


@admin_only("undo")
async def on_undo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/undo [n]``: remove the admin's own last ``n`` (1..MAX_UNDO) added images."""
    message = update.effective_message
    if message is None:
        return
    arg = _arg_text(message)
    # isdecimal, not isdigit: "²" is a digit that int() refuses (it raised in the handler)
    if arg and not (arg.isdecimal() and 1 <= int(arg) <= MAX_UNDO):
        await reply(message, f"Use /undo to remove your last added image, or /undo <n> (n from 1 to {MAX_UNDO}).")
        return
    n = int(arg) if arg else 1
    svc = services(context)
    user_id = _user_id(update)
    assert user_id is not None

    def undo() -> Counter[str]:
        removed: Counter[str] = Counter()
        for record in svc.workspace.store.last_added_by(user_id, n):
            if svc.workspace.store.remove(record.sha256):
                removed[record.label] += 1
        return removed

    removed = await asyncio.to_thread(undo)
    if not removed:
        await reply(message, "Nothing to undo: none of the images you added is still stored.")
        return
    total = sum(removed.values())
    parts = ", ".join(f"{label} ({count})" for label, count in sorted(removed.items()))
    await reply(message, f"Removed {_photos(total)}: {parts}.")


@admin_only("labels")
async def on_labels(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/labels``: every label with its image count."""
    message = update.effective_message
    if message is None:
        return
    infos = await asyncio.to_thread(services(context).workspace.store.labels)
    if not infos:
        await reply(message, "No labels yet. " + ADD_USAGE)
        return
    total = sum(i.count for i in infos)
    lines = [f"{len(infos)} labels, {_photos(total)}:"] + [f"{i.name} — {i.count}" for i in infos]
    text = "\n".join(lines)
    await reply(message, text if len(text) <= 4000 else text[:3990] + "\n…")


RENAME_USAGE = 'Use /rename <old> <new>. Put names with spaces in quotes: /rename "t shirt" t-shirt'


def _two_names(text: str) -> tuple[str, str] | None:
    for arrow in ("->", "→"):
        if arrow in text:
            old, _, new = text.partition(arrow)
            return (old.strip(), new.strip()) if old.strip() and new.strip() else None
    parts = text.split()
    if len(parts) == 2:
        return parts[0], parts[1]
    try:
        parts = shlex.split(text)
    except ValueError:
        return None
    return (parts[0], parts[1]) if len(parts) == 2 else None


@admin_only("rename")
async def on_rename(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/rename <old> <new>`` (quotes or ``->`` for names with spaces)."""
    message = update.effective_message
    if message is None:
        return
    names = _two_names(_arg_text(message))
    if names is None:
        await reply(message, RENAME_USAGE)
        return
    svc = services(context)
    try:
        old = await asyncio.to_thread(svc.workspace.store.resolve_label, names[0])
        if old is None:
            await reply(message, f"There is no label called “{normalize_label(names[0])}”. /labels lists them.")
            return
        new = await asyncio.to_thread(svc.workspace.store.rename_label, old, names[1])
    except LabelgramError as exc:
        await reply(message, exc.message)
        return
    count = await asyncio.to_thread(_label_count, svc, new)
    await reply(
        message,
        f"Renamed {old} to {new} ({_photos(count)}). Answers use the new name after the next training (/retrain).",
    )


@dataclass
class _PendingDelete:
    admin_id: int
    chat_id: int
    label: str
    created: float = field(default_factory=time.monotonic)


def _pending_deletes(svc: Services) -> dict[str, _PendingDelete]:
    return svc.extras.setdefault("deletes", {})


@admin_only("delete")
async def on_delete(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/delete <label>``: asks for confirmation with two buttons (see :func:`on_delete_button`)."""
    message = update.effective_message
    if message is None:
        return
    name = _arg_text(message)
    if not name:
        await reply(message, "Use /delete <label>. /labels lists them.")
        return
    svc = services(context)
    try:
        label = await asyncio.to_thread(svc.workspace.store.resolve_label, name)
        if label is None:
            await reply(message, f"There is no label called “{normalize_label(name)}”. /labels lists them.")
            return
    except LabelgramError as exc:
        await reply(message, exc.message)
        return
    count = await asyncio.to_thread(_label_count, svc, label)
    pending = _pending_deletes(svc)
    now = time.monotonic()
    for token in [t for t, p in pending.items() if now - p.created > DELETE_CONFIRM_SECONDS]:
        del pending[token]
    token = secrets.token_urlsafe(12)
    user_id = _user_id(update)
    assert user_id is not None
    pending[token] = _PendingDelete(user_id, message.chat_id, label)
    keyboard = InlineKeyboardMarkup(
        [[
            InlineKeyboardButton(f"Delete {_photos(count)}", callback_data=f"del:{token}:y"),
            InlineKeyboardButton("Cancel", callback_data=f"del:{token}:n"),
        ]]
    )
    await reply(message, f"Delete the label “{label}” and its {_photos(count)}? This cannot be undone.", reply_markup=keyboard)


async def on_delete_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Any inline-button press. Only ``del:<token>:<y|n>`` from the admin who asked is honoured."""
    query = update.callback_query
    if query is None:
        return
    svc = services(context)
    user_id = query.from_user.id
    if not svc.is_admin(user_id):
        log.info("refused a button press from non-admin user %s", user_id)
        await query.answer("Sorry, only the bot's admins can use these buttons.", show_alert=True)
        return
    match = _DELETE_DATA.match(query.data or "")
    if match is None:
        log.info("ignored unknown button data from admin %s", user_id)
        await query.answer("This button is not valid.", show_alert=True)
        return
    pending = _pending_deletes(svc)
    token, choice = match.group("token"), match.group("choice")
    request = pending.get(token)
    chat_id = query.message.chat.id if query.message is not None else None
    if request is None or time.monotonic() - request.created > DELETE_CONFIRM_SECONDS:
        pending.pop(token, None)
        await query.answer("This button has expired. Send /delete <label> again.", show_alert=True)
        await _drop_keyboard(query)
        return
    if request.admin_id != user_id or request.chat_id != chat_id:
        log.info("refused a delete confirmation from admin %s for another admin's request", user_id)
        await query.answer("Only the admin who asked for this can confirm it.", show_alert=True)
        return
    del pending[token]
    if choice == "n":
        await query.answer("Cancelled.")
        await _edit(query, f"Kept the label “{request.label}”.")
        return
    try:
        current = await asyncio.to_thread(svc.workspace.store.resolve_label, request.label)
        if current is None or label_key(current) != label_key(request.label):
            await query.answer(f"The label “{request.label}” no longer exists.", show_alert=True)
            await _edit(query, f"The label “{request.label}” no longer exists; nothing was deleted.")
            return
        count = await asyncio.to_thread(svc.workspace.store.delete_label, current)
    except LabelgramError as exc:
        await query.answer(exc.message[:200], show_alert=True)
        return
    log.info("admin %s deleted label %r (%d images)", user_id, current, count)
    await query.answer("Deleted.")
    await _edit(query, f"Deleted the label “{current}” and its {_photos(count)}. The next training leaves it out.")


async def _edit(query: Any, text: str) -> None:
    try:
        await query.edit_message_text(text)
    except TelegramError as exc:
        log.info("could not edit the confirmation message: %s", exc)


async def _drop_keyboard(query: Any) -> None:
    try:
        await query.edit_message_reply_markup(None)
    except TelegramError as exc:
        log.debug("could not remove the keyboard: %s", exc)


# ------------------------------------------------------------------------------------------------
# /retrain /status /rollback


@admin_only("retrain")
async def on_retrain(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/retrain``: train now, with a live progress message, then the report in this chat."""
    message = update.effective_message
    if message is None:
        return
    svc = services(context)
    trainer = svc.trainer
    if trainer.busy:
        who = {"manual": "an admin", "scheduled": "the schedule", "startup": "the start-up catch-up"}
        started = f", started {time.time() - trainer.started_at:.0f} s ago" if trainer.started_at else ""
        await reply(
            message,
            f"A training is already running (by {who.get(trainer.current_trigger or '', 'someone')}{started}). "
            + (
                "Its report goes to the admin who started it when it finishes."
                if trainer.current_trigger == "manual"
                else "Its report goes to the admins when it finishes."
            ),
        )
        return
    async with trainer.lock:
        status = await reply(message, "Retraining… starting")
        progress = ProgressMessage(status)
        outcome = await trainer.run(trigger="manual", on_progress=progress.update)
    took = outcome.finished_at - outcome.started_at
    final = {"promoted": "finished: new model serving", "refused": "finished: kept the current model"}
    await progress.finish(f"Retraining {final.get(outcome.status, 'failed')} ({took:.0f} s).")
    await send_report(context.bot, message.chat_id, outcome, reply_to=message.message_id)


def _fmt_time(ts: float | None, tz: ZoneInfo) -> str:
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M %Z")


def status_text(svc: Services) -> str:
    """The /status text (runs in a worker thread: it reads the store)."""
    tz = ZoneInfo(svc.config.training.timezone)
    current = svc.workspace.registry.current()
    lines = []
    if current is None:
        lines.append("Model: none yet (teach me with /add, then /retrain).")
        engine = svc.config.engine
        threads = engine.threads or "all"
        lines.append(
            f"Backbone: {svc.config.training.backbone}, engine: {engine.engine}, {threads} threads (for the first training)"
        )
    else:
        metrics = current.metrics
        acc = metrics.get("accuracy")
        acc_text = f"test accuracy {acc * 100:.1f}%" if isinstance(acc, int | float) else "accuracy unknown"
        lines.append(f"Model: {current.name} ({acc_text}, trained {_fmt_time(current.created_at, tz)})")
        lines.append(engine_line(metrics, svc.classifier.engine_description))
    infos = svc.workspace.store.labels()
    total = sum(i.count for i in infos)
    lines.append(f"Labels: {len(infos)}, {_photos(total)}")
    lines += [f"  {i.name} — {i.count}" for i in infos[:40]]
    if len(infos) > 40:
        lines.append(f"  … and {len(infos) - 40} more")
    last_run = svc.state.get("last_run") or {}
    since = last_run.get("started_at") or last_run.get("at") or (current.created_at if current else None)
    if since:
        lines.append(f"Images added since the last training: {svc.workspace.store.count_added_since(float(since))}")
    else:
        lines.append(f"Images added since the last training: {total} (no training yet)")
    lines.append(f"Next scheduled training: {next_run_text(svc, tz)}")
    if svc.trainer.busy and svc.trainer.started_at:
        lines.append(
            f"Training now: yes ({svc.trainer.current_trigger}, running for {time.time() - svc.trainer.started_at:.0f} s)"
        )
    return "\n".join(lines)


def engine_line(metrics: dict, serving: str | None = None) -> str:
    """"Backbone: efficientnet_lite0, engine: LiteRT/XNNPACK, 2 threads" for a version's metrics.

    ``serving`` is the engine the bot runs the model on now (``Classifier.engine_description``);
    without it, the one the training run used (``metrics["engine"]["serving"]``).
    """
    backbone = (metrics.get("backbone") or {}).get("name") or "unknown"
    engine = serving or (metrics.get("engine") or {}).get("serving") or "TensorFlow"
    return f"Backbone: {backbone}, engine: {engine}"


def next_run_text(svc: Services, tz: ZoneInfo) -> str:
    """When the schedule fires next, in ``tz``, and its rule ("not scheduled" without a job)."""
    job = svc.schedule_job
    if job is None:
        return "not scheduled"
    try:
        when = job.next_t
    except AttributeError:  # job queue not started yet
        when = None
    if when is None:
        return "not scheduled"
    cfg = svc.config.training
    rule = f"every {cfg.interval_seconds:g} s" if cfg.interval_seconds else f"cron “{cfg.schedule}” {cfg.timezone}"
    return f"{when.astimezone(tz).strftime('%Y-%m-%d %H:%M:%S %Z')} ({rule}; skipped if nothing changed)"


@admin_only("status")
async def on_status(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/status``: see :func:`status_text`."""
    message = update.effective_message
    if message is None:
        return
    await reply(message, await asyncio.to_thread(status_text, services(context)))


def _rollback_under_training_lock(svc: Services) -> Any:
    """``registry.rollback()`` holding the store's training lock (raises TrainingError if it is held)."""
    from model_store.pipeline import training_lock

    with training_lock(svc.workspace):
        return svc.workspace.registry.rollback()


@admin_only("rollback")
async def on_rollback(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/rollback``: serve the previous model version (not while a training runs)."""
    message = update.effective_message
    if message is None:
        return
    svc = services(context)
    if svc.trainer.busy:
        await reply(message, "A training is running; try /rollback again when it has finished.")
        return
    async with svc.trainer.lock:
        try:
            # the store's training lock too: a command-line retrain rewrites CURRENT under it
            version = await asyncio.to_thread(_rollback_under_training_lock, svc)
        except NoModelError as exc:
            await reply(message, exc.message)
            return
        except TrainingError:
            await reply(
                message,
                "A training is running on this store (started outside the bot, e.g. from the command "
                "line); try /rollback again when it has finished.",
            )
            return
        await svc.batcher.run_in_worker(svc.classifier.reload_if_changed)
    log.info("admin %s rolled the model back to %s", _user_id(update), version.name)
    acc = version.metrics.get("accuracy")
    acc_text = f" (test accuracy {acc * 100:.1f}%)" if isinstance(acc, int | float) else ""
    await reply(
        message,
        f"Rolled back: model {version.name}{acc_text} is serving again. "
        "The schedule retrains only after images change; /retrain trains now.",
    )
