"""The typed context of the bot's Application (PTB's ``examples/contexttypesbot.py`` pattern).

``ContextTypes(bot_data=BotData)`` makes ``context.bot_data`` one :class:`BotData` per
Application, with typed fields, instead of a dict keyed by strings. Handlers are typed
``async def on_x(update: Update, context: Context) -> None`` and read
``context.bot_data.classifier``, ``context.bot_data.config`` ...

python-telegram-bot creates the object with no arguments; :func:`bot.app.build_application`
then sets the fields that need the configuration (the annotated ones without a value below).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from telegram import Message
from telegram.ext import CallbackContext, ContextTypes, ExtBot, Job, filters

from bot.limits import DOWNLOAD_BUDGET_BYTES, ByteBudget, RateLimiter, Throttle, decode_pool
from model_store.labels import label_key

if TYPE_CHECKING:
    import numpy as np

    from bot.acks import TeachingAck
    from bot.batching import MicroBatcher
    from bot.config import Config
    from bot.menus import AdminMenus
    from bot.state import BotState
    from bot.training_runner import Trainer
    from model_store.classifier import Classifier, Prepared
    from model_store.review import ReviewStore
    from model_store.workspace import Workspace

__all__ = ["CONTEXT_TYPES", "Album", "AlbumKey", "BotData", "Context"]

_T = TypeVar("_T")

#: (chat id, admin's user id, media_group_id)
AlbumKey: TypeAlias = tuple[int, int, str]


@dataclass
class Album:
    """An admin's album being collected: its photos so far and the ``/add`` caption, if any.

    ``label`` is None without an ``/add`` caption, "" for ``/add`` without a label.
    """

    messages: list[Message]
    label: str | None
    user_id: int
    captioned: Message | None = None
    done: bool = False
    finished_at: float = 0.0
    #: other labels of further ``/add`` captions in the album (then none of its photos is added)
    other_labels: list[str] = field(default_factory=list)


class BotData:
    """Everything the handlers of one Application share (``context.bot_data``).

    Attributes set by :func:`bot.app.build_application`: ``config``, ``workspace``,
    ``classifier``, ``batcher``, ``trainer``, ``state``, ``admins``, ``admin_menus``, ``rate``,
    ``message_rate``, ``image_slots``, ``review``.
    """

    config: Config
    workspace: Workspace
    classifier: Classifier
    batcher: MicroBatcher[np.ndarray | Prepared, list[tuple[str, float]]]
    trainer: Trainer
    state: BotState
    #: the admins (numeric user ids): the one admin check, used as a filter by the routes in
    #: bot.app and read by :meth:`is_admin`; change it with ``admins.add_user_ids(...)`` /
    #: ``admins.remove_user_ids(...)`` and every check follows
    admins: filters.User
    #: the admins whose command menu is set (bot.menus); call ``admin_menus.sync`` after changing admins
    admin_menus: AdminMenus
    #: photos a non-admin may have classified per minute (limits.photos_per_minute)
    rate: RateLimiter
    #: every update of a non-admin (limits.messages_per_minute)
    message_rate: RateLimiter
    #: bounds how many downloaded files are held (and queued for decoding) at once
    image_slots: asyncio.Semaphore
    #: answers, users' feedback and the admins' review queue (bot.feedback, bot.review); thread-safe,
    #: call it from worker threads
    review: ReviewStore

    def __init__(self) -> None:
        self.chat_actions = Throttle(4.0)
        #: bytes of users' downloaded files held at once (see DOWNLOAD_BUDGET_BYTES)
        self.download_budget = ByteBudget(DOWNLOAD_BUDGET_BYTES)
        #: the small dedicated pool every image decode runs in (not asyncio's default executor, so
        #: decodes never hold the threads that store and registry calls need)
        self.decoders: ThreadPoolExecutor = decode_pool()
        self.schedule_job: Job[Any] | None = None
        #: admins' albums being collected or recently handled (bot.teaching)
        self.albums: dict[AlbumKey, Album] = {}
        #: admins' open teaching acknowledgements, by (chat id, user id, album id or "") (bot.acks)
        self.teaching_acks: dict[tuple[int, int, str], TeachingAck] = {}
        #: review items an admin's accept / discard / next press is being handled for (bot.review)
        self.review_busy: set[int] = set()
        #: user id -> Telegram time (unix s) of their last /withdraw in the past hour (bot.feedback)
        self.withdrawn_at: dict[int, float] = {}
        #: the start-up load of the serving model (bot.app)
        self.warmup: asyncio.Future[Any] | None = None

    def label_count(self, label: str) -> int:
        """Images stored under ``label`` (compared by ``label_key``; 0 if absent). Reads the store: call in a thread."""
        key = label_key(label)
        return next((info.count for info in self.workspace.store.labels() if label_key(info.name) == key), 0)

    def is_admin(self, user_id: int | None) -> bool:
        """Whether ``user_id`` is one of :attr:`admins` (None never is)."""
        return user_id is not None and user_id in self.admins.user_ids

    async def in_decode_pool(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(*args, **kwargs)`` in :attr:`decoders` and return its result."""
        return await asyncio.get_running_loop().run_in_executor(
            self.decoders, functools.partial(fn, *args, **kwargs)
        )


#: The context type of every handler and job callback of the bot.
Context: TypeAlias = CallbackContext[ExtBot[Any], dict[Any, Any], dict[Any, Any], BotData]

#: Passed to ``ApplicationBuilder.context_types``.
CONTEXT_TYPES: ContextTypes[Context, dict[Any, Any], dict[Any, Any], BotData] = ContextTypes(
    bot_data=BotData
)
