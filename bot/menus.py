"""The admins' command menus: set when an admin first talks to the bot, and when ``admins`` changes.

Telegram keeps one command menu per scope. Everyone gets the public menu (the default scope); each
admin gets the full menu in their private chat (``BotCommandScopeChat(admin_id)``, the Bot API's
``setMyCommands``). Telegram refuses that scope ("Bad Request: chat not found") for a user who has
not opened a chat with the bot yet, which is the usual order (configure, start, then open the
chat). So the menu is tried at start-up and then set by :func:`on_any_update`, which sees every
update: the first one from an admin whose menu is not set yet sets it, once.

:class:`AdminMenus` keeps the set of admins whose menu is set, in ``state.json`` (key
``admin_menus``, with the bot's id and a digest of the admin commands, so another token or a new
bot version with other commands sets them again). A restart then costs no ``setMyCommands`` call per admin, and an admin removed from
``admins`` gets their menu deleted (``deleteMyCommands``) at the next :meth:`AdminMenus.sync`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Collection, Sequence
from typing import Any

from telegram import Bot, BotCommand, BotCommandScopeChat, Update
from telegram.error import BadRequest, Forbidden, TelegramError

from bot.context import Context
from bot.state import BotState

__all__ = ["STATE_KEY", "AdminMenus", "on_any_update"]

log = logging.getLogger(__name__)

#: the state.json key: {"bot": the bot's user id, "commands": digest of the admin commands,
#: "chats": [admin ids with the menu]}
STATE_KEY = "admin_menus"


def _digest(commands: Sequence[BotCommand]) -> str:
    text = json.dumps([[c.command, c.description] for c in commands])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class AdminMenus:
    """Which admins have their command menu set; sets and deletes those menus.

    Args:
        state: the bot's ``state.json`` (:class:`bot.state.BotState`), where the set is kept.
        commands: the admins' menu (``bot.app.ADMIN_COMMANDS``).

    Methods run on the event loop; ``state.json`` is written in a worker thread.
    """

    def __init__(self, state: BotState, commands: Sequence[BotCommand]) -> None:
        self._state = state
        self._commands = list(commands)
        self._digest = _digest(self._commands)
        saved = state.get(STATE_KEY)
        saved = saved if isinstance(saved, dict) else {}
        #: the bot (its user id) the saved menus belong to: another token, another bot, no menus
        self._bot_id: int | None = saved.get("bot") if isinstance(saved.get("bot"), int) else None
        chats = {c for c in saved.get("chats") or [] if isinstance(c, int)}
        #: admins whose menu is set with the current commands
        self._set: set[int] = chats if saved.get("commands") == self._digest else set()
        #: chats holding a menu of an older command list (re-set or deleted by sync)
        self._stale: set[int] = chats - self._set
        self._pending: set[int] = set()
        #: admins Telegram refused (no chat with the bot yet): retried on their next private update
        self._refused: set[int] = set()
        self._save_lock = asyncio.Lock()

    def has_menu(self, user_id: int) -> bool:
        """Whether ``user_id``'s admin menu is set (with the current commands)."""
        return user_id in self._set

    async def sync(self, bot: Bot, admins: Collection[int]) -> None:
        """Make the menus match ``admins``: delete ex-admins' menus, try to set the missing ones.

        Called at start-up; call it again after changing ``BotData.admins`` at run time. An admin
        who has no chat with the bot yet is logged at INFO and gets the menu at their first update.
        Telegram errors are logged, never raised.
        """
        if self._bot_id != bot.id:  # first run, or the store now serves another bot (token)
            self._set.clear()
            self._stale.clear()
            self._bot_id = bot.id
        wanted = set(admins)
        for chat_id in sorted((self._set | self._stale) - wanted):
            try:
                await bot.delete_my_commands(scope=BotCommandScopeChat(chat_id))
            except BadRequest:  # the chat is gone: so is its menu
                pass
            except TelegramError as exc:
                log.warning("admin command menu of former admin %d not deleted: %s", chat_id, exc)
                continue
            self._set.discard(chat_id)
            self._stale.discard(chat_id)
            log.info("admin command menu of former admin %d deleted", chat_id)
        for admin in sorted(wanted - self._set):
            await self.ensure(bot, admin, retry_refused=True)
        await self._save()

    async def ensure(self, bot: Bot, user_id: int, *, retry_refused: bool = False) -> bool:
        """Set ``user_id``'s admin menu unless it is set or being set; True if it is set now.

        ``retry_refused``: try again although Telegram refused it before (the admin now has a
        private chat with the bot). Telegram errors are logged, never raised.
        """
        if user_id in self._set:
            return True
        if user_id in self._pending or (user_id in self._refused and not retry_refused):
            return False
        self._pending.add(user_id)
        try:
            await bot.set_my_commands(self._commands, scope=BotCommandScopeChat(user_id))
        except (BadRequest, Forbidden) as exc:  # no chat with the bot yet, or the admin blocked it
            self._refused.add(user_id)
            log.info(
                "admin %d has no chat with the bot yet (%s): their command menu is set when they "
                "first message the bot",
                user_id,
                exc.message,
            )
            return False
        except TelegramError as exc:  # network trouble: the admin's next update tries again
            log.warning("admin command menu not set for admin %d: %s", user_id, exc)
            return False
        finally:
            self._pending.discard(user_id)
        self._set.add(user_id)
        self._stale.discard(user_id)
        self._refused.discard(user_id)
        log.info("admin command menu set for admin %d", user_id)
        await self._save()
        return True

    async def _save(self) -> None:
        # one write at a time, each with the value current when it starts: the last write wins
        async with self._save_lock:
            value: dict[str, Any] = {
                "bot": self._bot_id,
                "commands": self._digest,
                "chats": sorted(self._set | self._stale),
            }
            if self._state.get(STATE_KEY) == value:
                return
            try:
                await asyncio.to_thread(self._state.update, **{STATE_KEY: value})
            except OSError as exc:  # the menus are set; the next start only sets them again
                log.warning("could not remember the admins' command menus in %s: %s", self._state.path, exc)


async def on_any_update(update: Update, context: Context) -> None:
    """Runs for every update, before any other handler: an admin whose menu is not set yet gets it
    (one ``setMyCommands`` call before their first update is handled; nothing for anyone else). Telegram refuses the scope until the admin has a private chat with the
    bot, so after a refusal only an update from that private chat tries again."""
    user = update.effective_user
    data = context.bot_data
    if user is None or not data.is_admin(user.id) or data.admin_menus.has_menu(user.id):
        return
    chat = update.effective_chat
    await data.admin_menus.ensure(context.bot, user.id, retry_refused=chat is not None and chat.id == user.id)
