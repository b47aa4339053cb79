"""Everyone's side of the bot: photos and image files get labels; /start, /help; the error handler.

Flow of one photo: the largest ``PhotoSize`` (or the image ``Document``) is checked against
``classify.max_file_bytes`` before anything is downloaded -> the bytes are downloaded -> decoded
by :func:`model_store.images.decode_image` in the decode pool (``Services.decoders``, within the
process-wide decode memory budget; JPEGs DCT-scaled, everything reduced to what the classifier
keeps) -> handed to the micro-batcher,
which classifies concurrent photos in one forward pass on its own thread -> the reply (to that
message) lists the top-k labels with percentages, or starts with "I'm not sure" when the best
one is under ``classify.confidence_threshold``.

A photo whose caption is ``/add <label>`` is a teaching example, and an admin's album is held
briefly so its caption applies to all its photos: both go to :mod:`bot.admin`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from telegram import Message, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest, TelegramError
from telegram.ext import ContextTypes

from bot.services import Services, services
from model_store.classifier import KEEP_SIDE, Prepared
from model_store.errors import LabelgramError, NoModelError
from model_store.images import decode_image

__all__ = [
    "ImageRef",
    "classify_message",
    "download_image",
    "format_predictions",
    "help_text",
    "image_ref",
    "on_error",
    "on_help",
    "on_image",
    "on_other_document",
    "on_start",
    "reply",
]

log = logging.getLogger(__name__)

_ADD_CAPTION = re.compile(
    r"^/add(?:@(?P<bot>[A-Za-z0-9_]+))?(?:[ \t\u00a0]+(?P<label>[^\n]*))?(?:\n|$)", re.I
)

GENERIC_APOLOGY = "Sorry, something went wrong on my side while handling that. Please try again later."


@dataclass(frozen=True)
class ImageRef:
    """The downloadable image of a message: its file id and the size Telegram reported."""

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


async def reply(message: Message, text: str, **kwargs: object) -> Message:
    """Reply to ``message`` (quoting it; still sent if the message was deleted meanwhile)."""
    return await message.reply_text(
        text,
        reply_parameters=ReplyParameters(message_id=message.message_id, allow_sending_without_reply=True),
        **kwargs,  # type: ignore[arg-type]
    )


def too_large_text(svc: Services, size: int | None) -> str:
    """The polite refusal for a file over ``classify.max_file_bytes`` (``size`` in bytes, if known)."""
    limit_mb = svc.config.classify.max_file_bytes / (1024 * 1024)
    size_part = f" ({size / (1024 * 1024):.1f} MB)" if size else ""
    return (
        f"That file is too large{size_part}: I can only look at images up to {limit_mb:g} MB. "
        "Please send it as a photo (Telegram compresses photos) or a smaller file."
    )


def _decode_and_prepare(svc: Services, data: bytes) -> Prepared:
    """Decode image bytes (size-limited) and prepare them for the serving model (decode pool).

    The image is decoded no larger than needed: the classifier keeps at most ``KEEP_SIDE`` pixels
    on the longer side, so JPEGs are DCT-scaled and other formats box-reduced towards it.
    """
    rgb = decode_image(data, max_pixels=svc.config.classify.max_pixels, max_side=KEEP_SIDE)
    return svc.classifier.prepare(rgb)


class FileTooLarge(LabelgramError):
    """The file is over ``classify.max_file_bytes`` (or the Bot API refused to hand it out)."""


async def download_image(context: ContextTypes.DEFAULT_TYPE, ref: ImageRef) -> bytes:
    """Download the image's bytes, refusing (before downloading) files over the configured limit.

    Raises:
        FileTooLarge: with a polite message.
    """
    svc = services(context)
    limit = svc.config.classify.max_file_bytes
    if ref.file_size is not None and ref.file_size > limit:
        raise FileTooLarge(too_large_text(svc, ref.file_size))
    try:
        file = await context.bot.get_file(ref.file_id)
    except BadRequest as exc:
        if "too big" in exc.message.lower():
            raise FileTooLarge(too_large_text(svc, ref.file_size)) from None
        raise
    if file.file_size is not None and file.file_size > limit:
        raise FileTooLarge(too_large_text(svc, file.file_size))
    data = bytes(await file.download_as_bytearray())
    if len(data) > limit:
        raise FileTooLarge(too_large_text(svc, len(data)))
    return data


async def send_action(context: ContextTypes.DEFAULT_TYPE, message: Message, action: str) -> None:
    """Show "sending a photo…"/"typing…", at most every few seconds per chat; failures are ignored."""
    svc = services(context)
    if not svc.chat_actions.ready(message.chat_id):
        return
    try:
        await context.bot.send_chat_action(
            message.chat_id, action, message_thread_id=message.message_thread_id
        )
    except TelegramError as exc:
        log.debug("chat action not sent: %s", exc)


def _percent(p: float) -> str:
    value = p * 100
    if 0 < value < 1:
        return "<1%"
    return f"{value:.0f}%"


def format_predictions(predictions: list[tuple[str, float]], threshold: float) -> str:
    """The reply text for one photo's top-k predictions."""
    if not predictions:
        return "I couldn't find any label for this one."
    lines = [f"{label} — {_percent(p)}" for label, p in predictions]
    if predictions[0][1] < threshold:
        return "I'm not sure what this is. My best guesses:\n" + "\n".join(lines)
    return "\n".join(lines)


def still_learning_text(is_admin: bool) -> str:
    """The reply to a photo before any model exists (admins are told how to teach)."""
    if is_admin:
        return (
            "I'm still learning: there is no trained model yet. Teach me by sending photos with the "
            "caption /add <label> (at least 2 labels with 5 or more photos each), then send /retrain."
        )
    return (
        "I'm still learning and can't label photos yet. My admins teach me by sending example photos "
        "with /add <label>; once I've been trained, send your photo again."
    )


async def classify_message(update: Update, context: ContextTypes.DEFAULT_TYPE, message: Message) -> None:
    """Answer one photo / image document with its labels (or a polite reason why not)."""
    svc = services(context)
    ref = image_ref(message)
    if ref is None:
        return
    user_id = update.effective_user.id if update.effective_user else None
    if user_id is not None and not svc.is_admin(user_id) and not svc.rate.allow(user_id):
        if svc.rate.should_warn(user_id):
            await reply(
                message,
                "You're sending photos faster than I can look at them. "
                f"Please wait a minute (the limit is {svc.config.limits.photos_per_minute} per minute).",
            )
        log.info("rate limit: photo from user %s not classified", user_id)
        return
    try:
        await send_action(context, message, ChatAction.TYPING)
        # The slot is taken before downloading: it bounds the bytes and decoded images in memory,
        # the HTTP requests in flight (httpx's pool gets slow with hundreds queued), and makes a
        # burst of photos go through roughly first come, first served instead of in lockstep.
        # The download budget is weighted by the file's size (the limit when Telegram did not say),
        # held until the decode is done: a burst of large files waits instead of piling up.
        size = ref.file_size if ref.file_size is not None else svc.config.classify.max_file_bytes
        async with svc.image_slots:
            async with svc.download_budget.reserve(size):
                data = await download_image(context, ref)
                # Decode, crop and resize here, in the decode pool: the model's thread only runs
                # the forward pass (Classifier.prepare).
                prepared = await svc.in_decode_pool(_decode_and_prepare, svc, data)
                del data
            predictions = await svc.batcher.submit(prepared)
            del prepared
    except NoModelError:
        await reply(message, still_learning_text(svc.is_admin(user_id)))
        return
    except LabelgramError as exc:  # unreadable image, too large, ...
        await reply(message, exc.message)
        return
    await reply(message, format_predictions(predictions, svc.config.classify.confidence_threshold))


async def on_image(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A photo or image document: teaching (``/add`` caption, admin albums) or classifying."""
    from bot import admin  # admin imports this module

    message = update.effective_message
    if message is None or image_ref(message) is None:
        return
    svc = services(context)
    user_id = update.effective_user.id if update.effective_user else None
    label = parse_add_caption(message.caption, context.bot.username)
    if message.media_group_id and svc.is_admin(user_id):
        await admin.collect_album_item(update, context, message, label)
        return
    if label is not None:
        await admin.add_from_caption(update, context, message, label)
        return
    await classify_message(update, context, message)


async def on_other_document(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A non-image file in a private chat: say what the bot can do with it."""
    message = update.effective_message
    if message is None:
        return
    await reply(message, "I can only label photos and image files (JPEG, PNG, WebP, HEIC, …).")


def help_text(is_admin: bool) -> str:
    """The /help text; admins also get the teaching commands."""
    lines = [
        "Send me a photo, or an image as a file, and I'll tell you what I think it shows.",
        "",
        "/start – what this bot does",
        "/help – this help",
    ]
    if is_admin:
        lines += [
            "",
            "Teaching (you are an admin):",
            "/add <label> – as the caption of a photo or an album, or as a reply to a photo",
            "/undo [n] – remove your last n added photos (default 1)",
            "/labels – labels and how many photos each has",
            "/rename <old> <new> – rename a label (quote names with spaces)",
            "/delete <label> – delete a label and its photos (asks first)",
            "/retrain – train a new model now",
            "/status – model version, accuracy, photos, next scheduled training",
            "/rollback – go back to the previous model",
        ]
    return "\n".join(lines)


async def on_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/start``: a greeting and the help text."""
    message = update.effective_message
    if message is None:
        return
    svc = services(context)
    is_admin = svc.is_admin(update.effective_user.id if update.effective_user else None)
    intro = "Hi! I label photos. I learn from examples my admins show me, and I retrain myself regularly."
    await reply(message, intro + "\n\n" + help_text(is_admin))


async def on_help(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """``/help``."""
    message = update.effective_message
    if message is None:
        return
    svc = services(context)
    await reply(message, help_text(svc.is_admin(update.effective_user.id if update.effective_user else None)))


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Log the failure (the log filter removes the token) and apologise to the user, if any."""
    error = context.error
    update_id = update.update_id if isinstance(update, Update) else None
    log.error("error while handling update %s: %s", update_id, type(error).__name__, exc_info=error)
    if not isinstance(update, Update):
        return
    if update.callback_query is not None:
        try:
            await update.callback_query.answer("Sorry, something went wrong.", show_alert=True)
        except TelegramError:
            pass
        return
    message = update.effective_message
    if message is None or (message.chat.type == ChatType.CHANNEL):
        return
    try:
        await reply(message, GENERIC_APOLOGY)
    except TelegramError as exc:
        log.info("could not send the apology: %s", exc)
