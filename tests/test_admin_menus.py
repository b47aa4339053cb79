"""bot.menus.AdminMenus bookkeeping in state.json (fast; the end-to-end path over HTTP is
tests/test_bot_admin.py::test_an_admin_who_opens_the_chat_after_the_start_gets_the_menu_once)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from telegram.error import BadRequest

from bot.app import ADMIN_COMMANDS
from bot.menus import STATE_KEY, AdminMenus
from bot.state import BotState


class MenuBot:
    """Records set/delete calls; ``known`` chats accept a chat scope, others get "chat not found"."""

    def __init__(self, bot_id: int, known: set[int]) -> None:
        self.id = bot_id
        self.known = known
        self.set: list[int] = []
        self.deleted: list[int] = []

    async def set_my_commands(self, commands: Any, *, scope: Any) -> bool:
        await asyncio.sleep(0.01)  # let concurrent calls interleave
        if scope.chat_id not in self.known:
            raise BadRequest("Chat not found")
        self.set.append(scope.chat_id)
        return True

    async def delete_my_commands(self, *, scope: Any) -> bool:
        self.deleted.append(scope.chat_id)
        return True


async def test_concurrent_first_updates_of_two_admins_are_both_remembered(tmp_path: Path) -> None:
    bot = MenuBot(7, known={1, 2})
    menus = AdminMenus(BotState(tmp_path), ADMIN_COMMANDS)
    await menus.sync(bot, [])  # type: ignore[arg-type]
    await asyncio.gather(*(menus.ensure(bot, user) for user in (1, 2, 1, 2)))  # type: ignore[arg-type]
    assert sorted(bot.set) == [1, 2], "once per admin"
    saved = json.loads((tmp_path / "state.json").read_text())[STATE_KEY]
    assert saved["chats"] == [1, 2] and saved["bot"] == 7


async def test_menus_saved_for_another_bot_or_other_commands_are_set_again(tmp_path: Path) -> None:
    first = MenuBot(7, known={1})
    await AdminMenus(BotState(tmp_path), ADMIN_COMMANDS).sync(first, [1])  # type: ignore[arg-type]
    same = MenuBot(7, known={1})
    await AdminMenus(BotState(tmp_path), ADMIN_COMMANDS).sync(same, [1])  # type: ignore[arg-type]
    other_token = MenuBot(8, known={1})
    await AdminMenus(BotState(tmp_path), ADMIN_COMMANDS).sync(other_token, [1])  # type: ignore[arg-type]
    new_commands = MenuBot(8, known={1})
    await AdminMenus(BotState(tmp_path), ADMIN_COMMANDS[:3]).sync(new_commands, [1])  # type: ignore[arg-type]
    assert (first.set, same.set, other_token.set, new_commands.set) == ([1], [], [1], [1])


async def test_a_refused_admin_is_retried_only_from_their_private_chat(tmp_path: Path) -> None:
    bot = MenuBot(7, known=set())
    menus = AdminMenus(BotState(tmp_path), ADMIN_COMMANDS)
    await menus.sync(bot, [1])  # type: ignore[arg-type]
    assert await menus.ensure(bot, 1) is False  # e.g. a group message: not tried again
    bot.known.add(1)
    assert await menus.ensure(bot, 1, retry_refused=True) is True
    assert bot.set == [1] and menus.has_menu(1)
