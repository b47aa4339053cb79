"""Teaching from the chat: admin commands, refusals for everyone else, the /delete buttons."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from bot.app import ADMIN_COMMANDS, PUBLIC_COMMANDS
from model_store.dataset import ImageStore
from tests.auxil.bot_harness import ADMIN, CASES, OTHER_ADMIN, USER, bot_config, photos, running_bot
from tests.botapi_standin import BotApiStandIn, Call


def stored(store_dir: Path) -> dict[str, int]:
    return {info.name: info.count for info in ImageStore(store_dir).labels()}


def keyboard_data(call: Call) -> list[str]:
    markup = call.params["reply_markup"]
    return [button["callback_data"] for row in markup["inline_keyboard"] for button in row]


async def test_a_non_admins_add_is_refused_and_nothing_is_stored(
    botapi: BotApiStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = tmp_path / "store"
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        caption = await bot.reply_text(USER, bot.send_photo(USER, photos("hat")[0], caption="/add hat"))
        photo_mid = bot.send_photo(USER, photos("hat")[1])
        await bot.reply(USER, photo_mid)
        as_reply = await bot.ask(USER, "/add hat", reply_to=photo_mid)
        album = [bot.send_photo(USER, p, caption="/add hat" if i == 0 else None, media_group_id="g1")
                 for i, p in enumerate(photos("hat")[2:4])]
        album_first = await bot.reply_text(USER, album[0])
        others = {cmd: await bot.ask(USER, cmd) for cmd in
                  ("/labels", "/undo", "/rename hat cap", "/delete hat", "/retrain", "/status", "/rollback")}
    for text in (caption, as_reply, album_first, *others.values()):
        assert text.startswith("Sorry, only the bot's admins can use"), text
    assert stored(store) == {}
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any(f"refused /add from non-admin user {USER}" == m for m in refusals), refusals
    assert len(refusals) >= 9
    assert not any("User2002" in m for m in refusals), "only the id is logged"


async def test_admin_adds_by_caption_by_reply_and_by_album(botapi: BotApiStandIn, tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        first = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[0], caption="/add hat"))
        again = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[0], caption="/add Hat"))
        # a user's photo in a group, taught by an admin replying to it
        group = -5001
        user_photo = bot.send_photo(USER, photos("hat")[1], chat=group)
        await bot.reply(group, user_photo)
        by_reply = await bot.ask(ADMIN, "/add hat", chat=group, reply_to=user_photo)
        # an album: the caption is on the first photo only
        mids = [bot.send_photo(ADMIN, p, caption="/add shoes" if i == 0 else None, media_group_id="alb")
                for i, p in enumerate(photos("shoes")[:5])]
        album = await bot.reply_text(ADMIN, mids[0])
        document = await bot.reply_text(
            ADMIN,
            bot.send_document(ADMIN, photos("pants")[0].read_bytes(), file_name="p.jpg", mime_type="image/jpeg",
                              caption="/add pants"),
        )
        assert len(botapi.replies_to(ADMIN, mids[1])) == 0, "an album gets one summary reply"
    assert first == "Added to hat (1 image)."
    assert again == "That image is already in hat (1 image)."
    assert by_reply == "Added to hat (2 images)."
    assert album == "Added 5 images to shoes (5 images in total)."
    assert document == "Added to pants (1 image)."
    assert stored(store) == {"hat": 2, "pants": 1, "shoes": 5}
    records = ImageStore(store).last_added_by(ADMIN, 100)
    assert len(records) == 8


async def test_add_errors_are_explained(botapi: BotApiStandIn, tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[0], caption="/add hat"))
        duplicate = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[0], caption="/add shoes"))
        bad_label = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[1], caption="/add ../etc"))
        no_label = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[1], caption="/add"))
        no_photo = await bot.ask(ADMIN, "/add hat")
        corrupt = await bot.reply_text(
            ADMIN,
            bot.send_document(ADMIN, (CASES / "html.png").read_bytes(), file_name="x.png", mime_type="image/png",
                              caption="/add hat"),
        )
    assert "already saved under the label “hat”" in duplicate
    assert "Traceback" not in bad_label and "hat" not in bad_label and bad_label.endswith(".")
    assert no_label.startswith("Which label?")
    assert "reply to a photo with /add <label>" in no_photo
    assert "Traceback" not in corrupt and not corrupt.startswith("Added")
    assert stored(store) == {"hat": 1}


async def test_undo_labels_rename_and_status(botapi: BotApiStandIn, tmp_path: Path) -> None:
    store = tmp_path / "store"
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        for path in photos("hat")[:3]:
            await bot.reply_text(ADMIN, bot.send_photo(ADMIN, path, caption="/add hat"))
        for path in photos("shoes")[:2]:
            await bot.reply_text(ADMIN, bot.send_photo(ADMIN, path, caption="/add shoes"))
        await bot.reply_text(OTHER_ADMIN, bot.send_photo(OTHER_ADMIN, photos("pants")[0], caption="/add pants"))
        labels = await bot.ask(ADMIN, "/labels")
        undo_one = await bot.ask(ADMIN, "/undo")
        undo_two = await bot.ask(ADMIN, "/undo 2")
        bad_undo = await bot.ask(ADMIN, "/undo lots")
        rename = await bot.ask(ADMIN, "/rename HAT cap")
        rename_missing = await bot.ask(ADMIN, "/rename nothing other")
        rename_usage = await bot.ask(ADMIN, "/rename justone")
        rename_clash = await bot.ask(ADMIN, "/rename cap pants")
        status = await bot.ask(ADMIN, "/status")
    assert labels.splitlines() == ["3 labels, 6 images:", "hat — 3", "pants — 1", "shoes — 2"]
    assert undo_one == "Removed 1 image: shoes (1)."
    assert undo_two == "Removed 2 images: hat (1), shoes (1)."
    assert bad_undo.startswith("Use /undo")
    assert rename.startswith("Renamed hat to cap (2 images).")
    assert "There is no label called “nothing”" in rename_missing
    assert rename_usage.startswith("Use /rename")
    assert "already exists" in rename_clash
    assert stored(store) == {"cap": 2, "pants": 1, "shoes": 0}  # an emptied label stays until /delete
    assert "Model: none yet" in status
    assert "Backbone: efficientnet_lite1, engine: litert, all threads (for the first training)" in status
    assert "cap — 2" in status and "pants — 1" in status
    assert "Next scheduled training:" in status and "0 3 * * *" in status


async def test_delete_asks_first_and_validates_the_buttons(
    botapi: BotApiStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = tmp_path / "store"
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        for path in photos("hat")[:2]:
            await bot.reply_text(ADMIN, bot.send_photo(ADMIN, path, caption="/add hat"))
        ask = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete HAT"))
        assert "Delete the label “hat” and its 2 images?" in ask.params["text"]
        yes, no = keyboard_data(ask)
        assert yes != no and len(yes.encode()) <= 64 and len(no.encode()) <= 64
        message = ask.result

        async def press(user: int, data: str) -> dict:
            update = botapi.make_callback_update(ADMIN, user, data, message)
            botapi.push_update(update)
            query_id = update["callback_query"]["id"]
            await botapi.wait_for(lambda c: c.method == "answerCallbackQuery" and c.params["callback_query_id"] == query_id)
            answer = botapi.callback_answer(query_id)
            assert answer is not None
            return answer

        stranger = await press(USER, yes)
        other_admin = await press(OTHER_ADMIN, yes)
        tampered = await press(ADMIN, yes[:-1] + "x")
        unknown = await press(ADMIN, uuid.uuid4().hex + uuid.uuid4().hex)  # well formed, never issued
        assert stored(store) == {"hat": 2}, "nothing deleted by invalid presses"
        confirmed = await press(ADMIN, yes)
        await botapi.wait_for(lambda c: c.method == "editMessageText" and "Deleted" in c.params["text"])
        stale = await press(ADMIN, yes)
        # a second request, cancelled
        await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("shoes")[0], caption="/add shoes"))
        ask2 = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete shoes"))
        message = ask2.result
        _, cancel = keyboard_data(ask2)
        cancelled = await press(ADMIN, cancel)
        missing = await bot.ask(ADMIN, "/delete nothing")
    assert stranger["show_alert"] is True and "only the bot's admins" in stranger["text"]
    assert "Only the admin who asked" in other_admin["text"]
    assert "not valid" in tampered["text"]
    assert "expired" in unknown["text"]
    assert confirmed["text"] == "Deleted."
    assert "expired" in stale["text"]
    assert cancelled["text"] == "Cancelled."
    assert "There is no label called “nothing”" in missing
    assert stored(store) == {"shoes": 1}
    assert any(r.getMessage() == f"refused a button press from non-admin user {USER}" for r in caplog.records)


async def test_command_menus_for_everyone_and_for_admins(botapi: BotApiStandIn, tmp_path: Path) -> None:
    botapi.open_chat(ADMIN)
    botapi.open_chat(OTHER_ADMIN)
    async with running_bot(botapi, bot_config(botapi, tmp_path / "store")):
        default = botapi.commands()
        admin = botapi.commands({"type": "chat", "chat_id": ADMIN})
        other = botapi.commands({"type": "chat", "chat_id": OTHER_ADMIN})
    assert [c["command"] for c in default] == [c.command for c in PUBLIC_COMMANDS] == ["start", "help", "withdraw"]
    assert [c["command"] for c in admin] == [c.command for c in ADMIN_COMMANDS]
    assert other == admin
    assert botapi.commands({"type": "chat", "chat_id": USER}) == []


def menu_calls(botapi: BotApiStandIn, method: str, chat_id: int) -> list[Call]:
    """Successful setMyCommands / deleteMyCommands calls for one chat's scope."""
    return [c for c in botapi.sent_calls(method) if (c.params.get("scope") or {}).get("chat_id") == chat_id]


async def test_an_admin_who_opens_the_chat_after_the_start_gets_the_menu_once(
    botapi: BotApiStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = tmp_path / "store"
    admin_scope = {"type": "chat", "chat_id": ADMIN}
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        # the usual order: configure, start the bot, then open the chat with it
        at_start = botapi.commands(admin_scope)
        told = [r for r in caplog.records if "menu is set when they first message the bot" in r.getMessage()]
        assert [r.levelno for r in told] == [logging.INFO, logging.INFO], "one INFO line per admin, no warning"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "menu" in r.getMessage()]
        await bot.ask(ADMIN, "/start")
        await botapi.wait_for(lambda c: c.method == "setMyCommands" and c.params["scope"] == admin_scope)
        after_start = botapi.commands(admin_scope)
        # more updates of every kind: no more calls
        await bot.ask(ADMIN, "/help")
        await bot.ask(ADMIN, "/labels")
        await bot.reply(ADMIN, bot.send_photo(ADMIN, photos("hat")[0]))
        # the other admin writes in a group first (no private chat yet): no menu, one try only
        group = -7001
        await bot.reply(group, bot.send_text(OTHER_ADMIN, "/help", chat=group))
        await bot.reply(group, bot.send_text(OTHER_ADMIN, "/help", chat=group))
        other_in_group = botapi.commands({"type": "chat", "chat_id": OTHER_ADMIN})
        await bot.ask(OTHER_ADMIN, "/help")
        await botapi.wait_for(
            lambda c: c.method == "setMyCommands" and c.params["scope"] == {"type": "chat", "chat_id": OTHER_ADMIN}
        )
    assert at_start == []
    assert [c["command"] for c in after_start] == [c.command for c in ADMIN_COMMANDS]
    assert len(menu_calls(botapi, "setMyCommands", ADMIN)) == 1, "set exactly once"
    assert other_in_group == []
    tries = [c for c in botapi.calls if c.method == "setMyCommands" and (c.params.get("scope") or {}).get("chat_id") == OTHER_ADMIN]
    assert len(tries) == 2, "at start, then from the private chat (not from the group)"
    assert len(menu_calls(botapi, "setMyCommands", OTHER_ADMIN)) == 1

    # a restart: the menus set are remembered in state.json, so no call per admin
    async with running_bot(botapi, bot_config(botapi, store)):
        pass
    assert len(menu_calls(botapi, "setMyCommands", ADMIN)) == 1
    assert len(menu_calls(botapi, "setMyCommands", OTHER_ADMIN)) == 1
    # admins changes: a former admin's menu is deleted, a new admin's set
    botapi.open_chat(USER)
    async with running_bot(botapi, bot_config(botapi, store, admins=[ADMIN, USER])):
        pass
    assert menu_calls(botapi, "deleteMyCommands", OTHER_ADMIN) != []
    assert botapi.commands({"type": "chat", "chat_id": OTHER_ADMIN}) == []
    assert [c["command"] for c in botapi.commands({"type": "chat", "chat_id": USER})] == [
        c.command for c in ADMIN_COMMANDS
    ]
    assert len(menu_calls(botapi, "setMyCommands", ADMIN)) == 1


async def test_an_admins_album_without_add_is_classified_photo_by_photo(
    botapi: BotApiStandIn, store_copy: Path
) -> None:
    from tests.test_bot_classify import labels_in

    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        mids = [bot.send_photo(ADMIN, p, media_group_id="holiday") for p in (photos("shoes")[6], photos("pants")[6])]
        texts = [await bot.reply_text(ADMIN, mid) for mid in mids]
    assert [labels_in(t)[0] for t in texts] == ["shoes", "pants"]
    assert stored(store_copy) == {"pants": 6, "shoes": 6, "t-shirt": 6}


async def test_a_full_disk_is_explained_to_the_admin(botapi: BotApiStandIn, tmp_path: Path) -> None:
    store = tmp_path / "store"
    config = bot_config(botapi, store, limits={"min_free_disk_mb": 1024**3})  # a petabyte floor
    async with running_bot(botapi, config) as bot:
        text = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[0], caption="/add hat"))
    assert "almost out of disk space" in text
    assert stored(store) == {}
