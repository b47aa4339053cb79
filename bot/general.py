"""What every user can ask: /start, /help, a word about non-image files; and the error handler."""

from __future__ import annotations

import logging
from typing import Any

from telegram import Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import BaseHandler, CommandHandler, MessageHandler, filters

from bot.context import Context
from bot.reports import MIN_TEST_IMAGES_PER_LABEL
from bot.telegram_io import reply

__all__ = [
    "GENERIC_APOLOGY",
    "handlers",
    "feedback_help_text",
    "help_text",
    "not_sure_text",
    "on_error",
    "on_help",
    "on_other_document",
    "on_start",
]

log = logging.getLogger(__name__)

GENERIC_APOLOGY = "Sorry, something went wrong on my side while handling that. Please try again later."


def not_sure_text(threshold: float) -> str:
    """What "I'm not sure" means, for /help (``threshold``: ``classify.confidence_threshold``, 0..1)."""
    return (
        f"I show my top guesses with a confidence each. When my best guess is under {threshold * 100:.0f}%, "
        "I say “I'm not sure” and still show them. A confidence compares only the labels I was taught, so I "
        "also check how far a photo is from every photo I was taught: when it looks like none of them, I say "
        "so (this catches other kinds of things better than look-alikes of a label)."
    )


def feedback_help_text(keep_days: float, max_answers: int) -> str:
    """What the feedback buttons do, what is kept about users' photos, for how long, how to withdraw.

    Args:
        keep_days: ``review.keep_days`` (answers, feedback and queued photos are deleted after it).
        max_answers: ``review.max_answers`` (at most this many answers are kept; the oldest go first).
    """
    return (
        "Under each answer, tap 👍 Right or 👎 Wrong (then pick the right label, or “None of these”); "
        "tap again to change your answer. Only the person who sent the photo can rate it.\n"
        "What I keep: for each photo I answer, its Telegram file id (a reference, not the photo itself), "
        f"my answer and your feedback, for {keep_days:g} days (and at most the last {max_answers} answers). "
        "My admins review photos rated wrong, or that I was unsure of, and may add them to my training "
        "photos (only then is the photo downloaded and stored). /withdraw deletes everything I keep about "
        "your photos and feedback at once; photos an admin already added to my training photos stay there "
        "(ask an admin to remove them)."
    )


def help_text(
    is_admin: bool, threshold: float | None = None, *, keep_days: float | None = None, max_answers: int = 10_000
) -> str:
    """The /help text; admins also get the teaching commands.

    Args:
        is_admin: whether the reader is an admin.
        threshold: ``classify.confidence_threshold`` (0..1) under which replies say "I'm not
            sure"; explained when given.
        keep_days: ``review.keep_days`` when answers carry feedback buttons (``review.feedback``):
            then the buttons, what is kept and ``/withdraw`` are explained (None: they are not).
        max_answers: ``review.max_answers``.
    """
    lines = [
        "Send me a photo, or an image as a file, and I'll tell you what I think it shows.",
    ]
    if threshold is not None:
        lines.append(not_sure_text(threshold))
    if keep_days is not None:
        lines.append(feedback_help_text(keep_days, max_answers))
    lines += [
        "",
        "/start – what this bot does",
        "/help – this help",
        "/withdraw – delete what I keep about your photos and feedback",
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
            "/review – photos users said I got wrong, or I was unsure of: accept, relabel or discard",
        ]
        if threshold is not None:
            lines += [
                "",
                f"The “not sure” limit is classify.confidence_threshold in the bot's config (now {threshold:.2f}). "
                "Reports and /status give the test accuracy with its 95% interval; a label with fewer than "
                f"{MIN_TEST_IMAGES_PER_LABEL} test images is too few to judge.",
            ]
    return "\n".join(lines)


def _help(update: Update, context: Context) -> str:
    data = context.bot_data
    review = data.config.review
    return help_text(
        _is_admin(update, context),
        data.config.classify.confidence_threshold,
        keep_days=review.keep_days if review.feedback else None,
        max_answers=review.max_answers,
    )


def _is_admin(update: Update, context: Context) -> bool:
    return context.bot_data.is_admin(update.effective_user.id if update.effective_user else None)


async def on_start(update: Update, context: Context) -> None:
    """``/start``: a greeting and the help text."""
    message = update.effective_message
    if message is None:
        return
    intro = "Hi! I label photos. I learn from examples my admins show me, and I retrain myself regularly."
    await reply(message, intro + "\n\n" + _help(update, context))


async def on_help(update: Update, context: Context) -> None:
    """``/help``."""
    message = update.effective_message
    if message is None:
        return
    await reply(message, _help(update, context))


async def on_other_document(update: Update, context: Context) -> None:
    """A non-image file in a private chat: say what the bot can do with it."""
    message = update.effective_message
    if message is None:
        return
    await reply(message, "I can only label photos and image files (JPEG, PNG, WebP, HEIC, …).")


async def on_error(update: object, context: Context) -> None:
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


def handlers() -> list[BaseHandler[Any, Any, Any]]:
    """/start and /help (everyone), and non-image files in private chats."""
    new = filters.UpdateType.MESSAGE
    return [
        CommandHandler("start", on_start, filters=new),
        CommandHandler("help", on_help, filters=new),
        MessageHandler(
            new & filters.ChatType.PRIVATE & filters.Document.ALL & ~filters.Document.IMAGE, on_other_document
        ),
    ]
