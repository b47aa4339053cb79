"""Build and run the Telegram Application: the one place that composes and routes the features.

:func:`build_application` wires the configuration, the model store and the feature modules into a
python-telegram-bot ``Application``: token and Bot API URLs from the config, the typed context
(:class:`bot.context.BotData` as ``context.bot_data``), arbitrary callback data (the ``/delete``,
feedback and ``/review`` buttons; ``review.button_cache`` keyboards), a rate limiter for Telegram's
flood limits (each chat paced to its limit, 429s waited out per chat, :mod:`bot.ratelimit`),
concurrent update handling (photos are answered in parallel and batched into one forward pass),
the command menus (one for everyone, one per admin chat, :mod:`bot.menus`), and the retraining schedule.

Routing (:func:`add_handlers`, in the manner of aiogram's ``examples/multi_file_bot``): each
feature module exports its handlers, and the order here decides which one an update reaches:

* group -2: :func:`bot.menus.on_any_update` (an admin's first update sets their command menu);
* group -1: :func:`bot.access.limit_messages` (a non-admin over the message limit goes no further);
* group 0, first match wins: /start and /help (:mod:`bot.general`); /withdraw and everyone's
  presses of the feedback buttons under answers, and non-admins' presses of forgotten buttons
  (:mod:`bot.feedback`); the admins' /review and its buttons (:mod:`bot.review`); the admins' routes of
  :mod:`bot.teaching` (albums first, then ``/add`` captions), :mod:`bot.labels` and
  :mod:`bot.models`, all filtered by the one ``filters.User`` of admins; the refusals for everyone
  else (:mod:`bot.access`); then every other photo is classified (:mod:`bot.classifying`).

:func:`run` is what ``python -m bot run`` calls.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from filelock import FileLock, Timeout
from telegram import BotCommand, Update
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application, TypeHandler, filters
from telegram.request import BaseRequest

from bot import access, classifying, feedback, general, labels, menus, models, review, teaching
from bot.batching import MicroBatcher
from bot.config import CONFIG_PATH_ENV, Config, ConfigError, load_config
from bot.context import CONTEXT_TYPES, BotData
from bot.limits import RateLimiter
from bot.logsafe import configure_logging, install_token_filter, redact
from bot.ratelimit import ChatPacedRateLimiter, on_flood_error
from bot.schedule import setup_schedule
from bot.state import BotState
from bot.training_runner import Trainer, retrain_command
from model_store.classifier import Classifier
from model_store.errors import LabelgramError
from model_store.workspace import Workspace

__all__ = [
    "ADMIN_COMMANDS",
    "EXIT_STORE_IN_USE",
    "PUBLIC_COMMANDS",
    "LabelgramApplication",
    "acquire_store_lock",
    "add_handlers",
    "build_application",
    "run",
]

log = logging.getLogger(__name__)

PUBLIC_COMMANDS = [
    BotCommand("start", "What this bot does"),
    BotCommand("help", "How to use it"),
    BotCommand("withdraw", "Delete what the bot keeps about your photos and feedback"),
]
ADMIN_COMMANDS = [
    *PUBLIC_COMMANDS,
    BotCommand("add", "Teach: /add <label> as a photo caption or a reply to a photo"),
    BotCommand("undo", "Remove your last added photos: /undo [n]"),
    BotCommand("labels", "Labels and their photo counts"),
    BotCommand("rename", "Rename a label: /rename <old> <new>"),
    BotCommand("delete", "Delete a label and its photos"),
    BotCommand("retrain", "Train a new model now"),
    BotCommand("status", "Model, accuracy, photos, next training"),
    BotCommand("rollback", "Serve the previous model again"),
    BotCommand("review", "Review photos users said were wrong, or the model was unsure of"),
]

# New messages and button presses only: edits and channel posts are deliberately not handled.
ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]

NO_TOKEN_HELP = """\
labelgram: no Telegram bot token is configured, so the bot cannot start.

To get a token:
  1. In Telegram, open a chat with @BotFather and send /newbot.
  2. Choose a display name and a username ending in "bot".
  3. BotFather replies with a token that looks like 123456789:AAH...xyz. Keep it secret.

Then give it to labelgram in one of these ways (the first one keeps it out of files):
  export TELEGRAM_BOT_TOKEN='123456789:AAH...xyz'
or in your config file (see config.example.toml):
  [telegram]
  token = "123456789:AAH...xyz"

and start the bot again:  python -m bot run --config config.toml
"""


class LabelgramApplication(Application):
    """An Application that stops a running training before waiting for its handlers to finish."""

    async def stop(self) -> None:
        """Kill a running training subprocess first, answer the albums still waiting, then stop as usual."""
        trainer = getattr(self.bot_data, "trainer", None)
        if trainer is not None:
            await trainer.aclose()
        if self.running:
            await teaching.finish_albums_now(self)
        await super().stop()


async def _post_init(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    data: BotData = application.bot_data
    await set_commands(application, data.config)
    # Load the serving model on the classifier's own thread before the first photo needs it.
    warmup = asyncio.get_running_loop().run_in_executor(
        data.batcher.executor, data.classifier.reload_if_changed
    )
    warmup.add_done_callback(_log_warmup)
    data.warmup = warmup


def _log_warmup(future: asyncio.Future[Any]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.error("could not load the serving model: %s", exc, exc_info=exc)


async def _post_shutdown(application: Application[Any, Any, Any, Any, Any, Any]) -> None:
    data: BotData = application.bot_data
    await data.trainer.aclose()
    await data.batcher.aclose()


async def set_commands(application: Application[Any, Any, Any, Any, Any, Any], config: Config) -> None:
    """Register the command menus: /start and /help for everyone, all commands in admins' chats.

    An admin without a chat with the bot yet gets theirs at their first update
    (:func:`bot.menus.on_any_update`); admins whose menu a previous run set (``state.json``) cost
    no call; former admins' menus are deleted (:meth:`bot.menus.AdminMenus.sync`).
    """
    bot = application.bot
    await bot.set_my_commands(PUBLIC_COMMANDS)
    data: BotData = application.bot_data
    await data.admin_menus.sync(bot, config.admins)


#: exit code of ``run`` when another bot already serves the same store
EXIT_STORE_IN_USE = 3
BOT_LOCK_FILE = ".bot.lock"


def acquire_store_lock(store_dir: Path) -> FileLock:
    """Take the store's bot lock (``<store_dir>/.bot.lock``) for the life of this process.

    One bot per store: two would overwrite each other's ``state.json`` and fight over trainings.
    The lock is ``filelock.FileLock`` (``fcntl.flock`` on Unix), released by the kernel when the
    process ends, however it ends; the file itself stays (it holds nothing).

    Returns:
        The held lock (keep a reference; release it to give the store up earlier).

    Raises:
        filelock.Timeout: another process holds it.
        OSError: the store folder cannot be created or written.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(store_dir / BOT_LOCK_FILE, thread_local=False)
    lock.acquire(timeout=0)
    return lock


def build_application(
    config: Config,
    *,
    workspace: Workspace | None = None,
    train_command: list[str] | None = None,
    request: BaseRequest | None = None,
) -> Application[Any, Any, Any, Any, Any, Any]:
    """Create the bot's Application (not started).

    Args:
        config: the validated configuration; it must have a token.
        workspace: the store folder to use (default: ``Workspace(config.store_dir, ...)``).
        train_command: the retraining command line (default: ``python -m bot retrain`` with the
            configuration's flags).
        request: the HTTP layer for Bot API calls (default: PTB's ``HTTPXRequest`` with the
            timeouts below; tests pass an in-process double). Used for ``get_updates`` too.

    Raises:
        ConfigError: no token.
        OSError / sqlite3.Error: the store folder cannot be opened.
    """
    token = config.token
    if not token:
        raise ConfigError("config error: telegram.token: not set (or set TELEGRAM_BOT_TOKEN)")
    install_token_filter(token, config.webhook_secret)
    logging.getLogger("httpx").setLevel(max(logging.getLogger("httpx").getEffectiveLevel(), logging.WARNING))

    ws = workspace or Workspace(
        config.store_dir,
        min_free_bytes=config.limits.min_free_disk_mb * 1024 * 1024,
        max_pixels=config.classify.max_pixels,
        review=review.store_settings(config),
    )
    classifier = Classifier(ws.registry, max_batch=config.classify.max_batch, engine=config.engine.settings())
    top_k = config.classify.top_k
    batcher: MicroBatcher[Any, list[tuple[str, float]]] = MicroBatcher(
        lambda images: classifier.classify(images, top_k=top_k),
        window=config.classify.batch_window_ms / 1000,
        max_batch=config.classify.max_batch,
        name="classify",
    )
    state = BotState(ws.root)

    async def reload_model() -> None:
        await batcher.run_in_worker(classifier.reload_if_changed)

    trainer = Trainer(
        config,
        state,
        fingerprint=ws.store.fingerprint,
        after_promotion=reload_model,
        command=train_command or retrain_command(config, store_dir=ws.root),
    )

    tg = config.telegram
    builder = (
        Application.builder()
        .application_class(LabelgramApplication)
        .context_types(CONTEXT_TYPES)
        # review.button_cache keyboards (PTB's default is 1024): every answer to a photo carries one (bot.feedback)
        .arbitrary_callback_data(config.review.button_cache)
        .token(token)
        .concurrent_updates(tg.concurrent_updates)
        .rate_limiter(
            # each chat paced to its limit, the overall limit on top; a 429 pauses only the chat
            # it concerns and is waited out until limits.reply_deadline_seconds (bot/ratelimit.py)
            ChatPacedRateLimiter(
                overall_per_second=tg.max_requests_per_second,
                chat_burst=config.limits.chat_messages_burst,
                chat_per_second=config.limits.chat_messages_per_second,
                group_burst=config.limits.group_messages_burst,
                group_per_minute=config.limits.group_messages_per_minute,
                deadline=config.limits.reply_deadline_seconds,
            )
        )
        .post_init(_post_init)
        .post_shutdown(_post_shutdown)
    )
    if request is not None:
        builder = builder.request(request).get_updates_request(request)
    else:
        builder = builder.read_timeout(30).write_timeout(30).media_write_timeout(60)
    if tg.base_url:
        builder = builder.base_url(tg.base_url)
    if tg.base_file_url:
        builder = builder.base_file_url(tg.base_file_url)
    if tg.local_mode:
        builder = builder.local_mode(True)
    application = builder.build()

    data: BotData = application.bot_data
    data.config = config
    data.workspace = ws
    data.classifier = classifier
    data.batcher = batcher
    data.trainer = trainer
    data.state = state
    data.admins = filters.User(user_id=config.admins)
    data.admin_menus = menus.AdminMenus(state, ADMIN_COMMANDS)
    data.rate = RateLimiter(config.limits.photos_per_minute)
    data.message_rate = RateLimiter(config.limits.messages_per_minute)
    data.image_slots = asyncio.Semaphore(2 * config.classify.max_batch)
    data.review = ws.review  # a workspace passed in keeps its own review settings
    add_handlers(application, data.admins)
    data.schedule_job = setup_schedule(application, data)
    return application


#: the commands only admins may use (everyone else gets a refusal)
ADMIN_ONLY_COMMANDS = [c.command for c in ADMIN_COMMANDS if c not in PUBLIC_COMMANDS]


def add_handlers(application: Application[Any, Any, Any, Any, Any, Any], admins: filters.User) -> None:
    """Compose the feature modules' handlers in routing order (see the module docstring).

    Args:
        application: the Application to add them to.
        admins: the one admin filter (``BotData.admins``): admins' routes take it, refusals its negation.
    """
    # first, for every update: an admin's command menu if not set yet (once per admin, one call)
    application.add_handler(TypeHandler(Update, menus.on_any_update), group=-2)
    # then: a non-admin over limits.messages_per_minute goes no further
    application.add_handler(TypeHandler(Update, access.limit_messages), group=-1)
    application.add_handlers(
        [
            *general.handlers(),
            *feedback.handlers(admins),  # /withdraw, feedback buttons (everyone's), non-admins' stale buttons
            *review.handlers(admins),  # admins' /review and its buttons
            *teaching.handlers(admins),  # admins' albums and /add captions before any classifying
            *labels.handlers(admins),
            *models.handlers(admins),
            *access.handlers(admins, ADMIN_ONLY_COMMANDS),  # everyone else: refusals
            *classifying.handlers(),  # every other photo
        ]
    )
    # a message dropped by flood control was logged once by the limiter: no traceback, no apology
    application.add_error_handler(on_flood_error)
    application.add_error_handler(general.on_error)


def run(config_path: str | None) -> int:
    """Start the bot (long polling, or a webhook server) and block until it is stopped.

    Args:
        config_path: the TOML file; None uses ``$LABELGRAM_CONFIG``, else ``./config.toml`` if it
            exists, else defaults and environment variables only.

    Returns:
        The process exit code: 0 after a normal stop, 2 for configuration problems (including a
        missing or rejected token), 3 when another bot already runs on the same store
        (:data:`EXIT_STORE_IN_USE`, see :func:`acquire_store_lock`), 1 when the bot cannot start
        otherwise.
    """
    if config_path is None and not os.environ.get(CONFIG_PATH_ENV) and Path("config.toml").is_file():
        config_path = "config.toml"
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    token = config.token
    if not token:
        print(NO_TOKEN_HELP, file=sys.stderr, end="")
        return 2
    configure_logging(config.logging.level, token, config.webhook_secret)
    tg = config.telegram
    if tg.mode == "webhook" and importlib.util.find_spec("tornado") is None:
        print(
            'labelgram: telegram.mode = "webhook" needs the webhook extra of python-telegram-bot: '
            "pip install 'python-telegram-bot[webhooks]' (or use mode = \"polling\").",
            file=sys.stderr,
        )
        return 2
    try:
        store_lock = acquire_store_lock(Path(config.store_dir))
    except Timeout:
        print(
            f"labelgram: another bot is already running on the store {config.store_dir} "
            f"(it holds {Path(config.store_dir) / BOT_LOCK_FILE}). One bot per store: stop the other "
            "one first, or give this one its own store_dir.",
            file=sys.stderr,
        )
        return EXIT_STORE_IN_USE
    except OSError as exc:
        log.error("cannot open the store %s: %s", config.store_dir, exc)
        return 1
    try:
        return _run_application(config, token)
    finally:
        store_lock.release()


def _run_application(config: Config, token: str) -> int:
    """Build and run the Application (the caller holds the store's bot lock); returns the exit code."""
    tg = config.telegram
    try:
        application = build_application(config)
    except (OSError, sqlite3.Error, LabelgramError) as exc:
        log.error("cannot open the store %s: %s", config.store_dir, exc)
        return 1
    try:
        if tg.mode == "webhook":
            assert tg.webhook_url is not None
            application.run_webhook(
                listen=tg.webhook_listen,
                port=tg.webhook_port,
                url_path=urlparse(tg.webhook_url).path.lstrip("/"),
                webhook_url=tg.webhook_url,
                secret_token=config.webhook_secret,
                allowed_updates=ALLOWED_UPDATES,
            )
        else:
            application.run_polling(allowed_updates=ALLOWED_UPDATES)
    except InvalidToken:
        print(
            "labelgram: Telegram rejected the bot token. Check TELEGRAM_BOT_TOKEN / telegram.token "
            "(ask @BotFather for the token again with /token).",
            file=sys.stderr,
        )
        return 2
    except NetworkError as exc:
        print(f"labelgram: cannot reach the Bot API: {redact(str(exc), [token])}", file=sys.stderr)
        return 1
    except TelegramError as exc:
        print(
            f"labelgram: the Bot API refused a start-up request: {redact(str(exc), [token])}", file=sys.stderr
        )
        return 1
    return 0
