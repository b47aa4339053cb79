"""Issue 4.3: a non-admin never reaches an admin code path; admins are numeric ids, not usernames.

The real Application runs over HTTP against the stand-in, on a store with two model versions (so
a ``/rollback`` that got through would change the serving pointer). Every store and registry
method an admin command could call, the training runner, and the album collector are wrapped with
spies: a non-admin's attempts, in every shape (captions, replies, albums, documents, groups,
commands, buttons pressed with data copied from an admin's keyboard), must leave every spy
uncalled, the store, catalog and models byte-for-byte unchanged, get a polite refusal, and leave
log lines that name the user by id only.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from bot import teaching
from model_store.registry import ModelRegistry
from tests.auxil.bot_harness import ADMIN, TRAIN_PER_LABEL, USER, bot_config, labels_in, photos
from tests.auxil.standin_extras import HardenedStandIn, push, serving_bot, with_sender
from tests.auxil.store_checks import assert_no_traceback, store_state

BOT = "labelgram_test_bot"
GROUP = -1005555
IMPOSTOR = 2003  # a non-admin who took the admin's old @username
ADMIN_NAME = "alice_admin"
PERSONAL = ("mallory", "Mallory", "Quux", ADMIN_NAME, "Alice")

STORE_METHODS = ("add", "remove", "rename_label", "delete_label", "last_added_by", "labels", "resolve_label",
                 "import_tree", "count_added_since")
REGISTRY_METHODS = ("rollback", "promote", "prune", "commit", "new_version_dir")


def second_version(store: Path) -> str:
    """Make the trained store hold two complete versions; the copy serves, the original is the rollback target."""
    registry = ModelRegistry(store / "models")
    (first,) = registry.versions()
    name = "29990101-000000-abcdef"
    shutil.copytree(first.path, registry.root / name)
    registry.promote(registry.get(name))
    return name


def install_spies(bot: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call into an admin-only code path."""
    calls: list[str] = []

    def wrap(obj: Any, name: str, label: str) -> None:
        original = getattr(obj, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            calls.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, spy)

    def wrap_async(obj: Any, name: str, label: str) -> None:
        original = getattr(obj, name)

        async def spy(*args: Any, **kwargs: Any) -> Any:
            calls.append(label)
            return await original(*args, **kwargs)

        monkeypatch.setattr(obj, name, spy)

    svc = bot.svc
    for name in STORE_METHODS:
        wrap(svc.workspace.store, name, f"store.{name}")
    for name in REGISTRY_METHODS:
        wrap(svc.workspace.registry, name, f"registry.{name}")
    wrap_async(svc.trainer, "run", "trainer.run")
    wrap_async(teaching, "add_images", "teaching.add_images")
    wrap_async(teaching, "collect_album_item", "teaching.collect_album_item")
    return calls


async def test_a_non_admin_reaches_no_admin_code_path(
    api: HardenedStandIn, store_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    second_version(store_copy)
    before = store_state(store_copy)
    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        # the admin's own /delete request, whose button data the others copy
        ask = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete shoes"))
        yes = ask.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
        admin_photo = (await bot.reply(GROUP, push(api, api.make_photo_update(
            GROUP, ADMIN, photos("hat")[0].read_bytes(), chat_type="supergroup")))).result
        del admin_photo  # the admin's photo in the group is answered (labels); USER replies to it below
        calls = install_spies(bot, monkeypatch)
        state_before = (store_copy / "state.json").read_bytes()  # written at start-up (schedule bookkeeping)
        hat = iter(photos("hat")[1:] + photos("dress") + photos("shorts"))

        async def attempt(user: int, update: dict[str, Any], chat: int, username: str) -> str:
            with_sender(update, username=username, first_name="Mallory Quux" if user == USER else "Alice")
            return str((await bot.reply(chat, push(api, update))).params["text"])

        replies: dict[str, str] = {}
        for user, username in ((USER, "mallory"), (IMPOSTOR, ADMIN_NAME)):
            tag = f"{user}:"
            replies[tag + "caption"] = await attempt(
                user, api.make_photo_update(user, user, next(hat).read_bytes(), caption="/add hat"), user, username)
            replies[tag + "document"] = await attempt(user, api.make_document_update(
                user, user, next(hat).read_bytes(), mime_type="image/jpeg", file_name="h.jpg", caption="/add hat"),
                user, username)
            own_photo = push(api, api.make_photo_update(user, user, next(hat).read_bytes()))
            await bot.reply(user, own_photo)
            replies[tag + "reply"] = await attempt(
                user, api.make_text_update(user, user, "/add hat", reply_to_message=own_photo), user, username)
            group_photo = push(api, api.make_photo_update(GROUP, ADMIN, next(hat).read_bytes(), chat_type="supergroup"))
            await bot.reply(GROUP, group_photo)
            replies[tag + "reply in group"] = await attempt(user, api.make_text_update(
                GROUP, user, f"/add@{BOT} hat", reply_to_message=group_photo, chat_type="supergroup"), GROUP, username)
            replies[tag + "caption in group"] = await attempt(user, api.make_photo_update(
                GROUP, user, next(hat).read_bytes(), caption=f"/add@{BOT} hat", chat_type="supergroup"), GROUP, username)
            # albums: the /add caption on the first or on a later photo; the others get labels
            for where in (0, 1):
                album = [
                    with_sender(api.make_photo_update(user, user, p.read_bytes(), media_group_id=f"alb-{user}-{where}",
                                                      caption="/add hat" if i == where else None), username=username)
                    for i, p in enumerate(photos("skirt")[3 * where: 3 * where + 3])
                ]
                mids = [push(api, u) for u in album]
                texts = [str((await bot.reply(user, mid)).params["text"]) for mid in mids]
                replies[tag + f"album caption on photo {where}"] = texts[where]
                assert all(labels_in(t) for i, t in enumerate(texts) if i != where), texts
            for command in ("/retrain", "/rollback", "/rename shoes boots", "/undo", "/undo 5", "/delete shoes",
                            "/labels", "/status", f"/retrain@{BOT}"):
                replies[tag + command] = await attempt(user, api.make_text_update(user, user, command), user, username)
            # the admin's valid button data, pressed on the admin's message and on a message of their own
            for on in (ask.result, (await bot.reply(user, push(api, api.make_text_update(user, user, "/help")))).result):
                update = with_sender(api.make_callback_update(on["chat"]["id"], user, yes, on), username=username,
                                     first_name="Mallory Quux")
                api.push_update(update)
                qid = update["callback_query"]["id"]
                await api.wait_for(lambda c, q=qid: c.method == "answerCallbackQuery" and c.params["callback_query_id"] == q)
                replies[tag + f"button in {on['chat']['id']}"] = api.callback_answer(qid)["text"]
        assert calls == [], f"a non-admin reached admin code: {calls}"
        after = store_state(store_copy)
        # the admin is still served, and the pending delete was not consumed by the presses above
        assert (await bot.ask(ADMIN, "/labels")).startswith("3 labels, 18 images")

    assert after == before
    assert (store_copy / "state.json").read_bytes() == state_before
    for key, text in replies.items():
        if "button" in key:
            assert text == "Sorry, only the bot's admins can use these buttons.", (key, text)
        else:
            assert text.startswith("Sorry, only the bot's admins can use /"), (key, text)
            assert text.endswith("Send me a photo and I'll tell you what I see."), (key, text)
    assert len(replies) == 2 * 18
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    for user in (USER, IMPOSTOR):
        mine = [m for m in refusals if m.endswith(f"non-admin user {user}")]
        assert len(mine) == 18, mine  # one line per attempt, naming the user by id
    # the bot's own records at any level, and everyone's at INFO and above (the bot's default level;
    # python-telegram-bot itself dumps whole updates only at DEBUG)
    for record in caplog.records:
        if record.name.startswith(("bot", "model_store")) or record.levelno >= logging.INFO:
            message = record.getMessage()
            assert not any(p in message for p in PERSONAL), f"personal data in the log: {message!r}"
    assert_no_traceback(api)


async def test_admins_are_known_by_id_whatever_their_username(
    api: HardenedStandIn, store_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        texts = []
        for i, username in enumerate((ADMIN_NAME, "alice_renamed", "")):
            update = with_sender(api.make_photo_update(ADMIN, ADMIN, photos("hat")[i].read_bytes(), caption="/add hat"),
                                 username=username, first_name=f"Alice {i}")
            texts.append(await bot.reply_text(ADMIN, push(api, update)))
            update = with_sender(api.make_text_update(ADMIN, ADMIN, "/labels"), username=username)
            texts.append(await bot.reply_text(ADMIN, push(api, update)))
        impostor = with_sender(api.make_photo_update(IMPOSTOR, IMPOSTOR, photos("hat")[5].read_bytes(), caption="/add hat"),
                               username=ADMIN_NAME, first_name="Alice")
        refused = await bot.reply_text(IMPOSTOR, push(api, impostor))
        classified = await bot.reply_text(IMPOSTOR, push(api, with_sender(
            api.make_photo_update(IMPOSTOR, IMPOSTOR, photos("shoes")[TRAIN_PER_LABEL].read_bytes()), username=ADMIN_NAME)))
    assert texts[0::2] == ["Added to hat (1 image).", "Added to hat (2 images).", "Added to hat (3 images)."]
    assert all(t.startswith("4 labels") for t in texts[1::2]), texts
    assert refused.startswith("Sorry, only the bot's admins can use /add")
    assert labels_in(classified)[0] == "shoes"
    assert any(r.getMessage() == f"refused /add from non-admin user {IMPOSTOR}" for r in caplog.records)
