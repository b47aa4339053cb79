"""Issue 4.2: hostile labels and odd messages, each handled on purpose, over the real stack.

* every hostile label name of ``tests/data/cases/README.md`` (and more of the same kinds) typed in
  ``/add <name>`` captions, ``/add`` replies, ``/rename`` and ``/delete``: a clean accept or a clear
  refusal, nothing outside ``images/``, one label for names that differ only by case or Unicode form;
* commands with missing or extra arguments, 1024-character captions, 4096-character commands;
* edited messages, channel posts, group messages (bot mentioned or not, commands for other bots),
  forwarded photos;
* tampered, foreign, inline, renamed-meanwhile, expired and pre-restart ``/delete`` buttons.

Where the bot stays silent on purpose, the test sends a message that is answered afterwards, waits
for that answer and a short grace period, and checks that nothing else was said.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from bot import labels
from bot.app import ALLOWED_UPDATES
from model_store.dataset import ImageStore
from model_store.labels import label_key
from tests.auxil.bot_harness import ADMIN, OTHER_ADMIN, TRAIN_PER_LABEL, USER, bot_config, labels_in, photos
from tests.auxil.standin_extras import HardenedStandIn, forwarded, push, serving_bot
from tests.auxil.store_checks import (
    assert_no_traceback,
    assert_store_contained,
    catalog_matches_folders,
    store_state,
)
from tests.botapi_standin import Call

BOT = "labelgram_test_bot"  # the stand-in's bot username
GROUP = -1001234

REFUSED = "refused"
WHICH = "which label"

#: (name as typed after "/add ", expected): REFUSED, WHICH, or the label folder it lands in
ADD_NAMES: list[tuple[str, str]] = [
    # from tests/data/cases/README.md
    ("../../etc", REFUSED),
    ("a/b", REFUSED),
    ("..", REFUSED),
    (".hidden", REFUSED),
    ("", WHICH),
    ("   ", WHICH),
    ("x" * 300, REFUSED),
    ("a\x00b", REFUSED),
    ("CON", REFUSED),
    ("T-Shirt", "t-shirt"),  # the store already has "t-shirt"
    ("e\u0301te", "\u00e9te"),  # e + combining acute ...
    ("\u00e9te", "\u00e9te"),  # ... and the single character: the same label
    ("\u00c9TE", "\u00e9te"),  # and another letter case of it
    ("Розы", "Розы"),
    ("👗 dress", "👗 dress"),
    # more of the same kinds
    (".", REFUSED),
    ("/etc/passwd", REFUSED),
    ("..\\..\\evil", REFUSED),
    ("C:evil", REFUSED),
    ("con.txt", REFUSED),
    ("LPT1", REFUSED),
    ("trailing.", REFUSED),
    ("a\tb", REFUSED),
    ("\u202eevil", REFUSED),  # right-to-left override
    ("zero\u200bwidth", REFUSED),
    ("x" * 65, REFUSED),
    ("y" * 64, "y" * 64),
    ("  red \u00a0  dress  ", "red dress"),
    ("$(rm -rf ~)", "$(rm -rf ~)"),
    ("%2e%2e%2f", "%2e%2e%2f"),
    # a caption's first line is the command; later lines are a comment, not part of the label
    ("a\nb", "a"),
    ("hat\n../../etc", "hat"),
]


def teaching_photos() -> list[Path]:
    """Photos that are not in the session-trained store (it holds shoes, pants, t-shirt [:6])."""
    return [p for label in ("hat", "skirt", "dress", "outwear", "shirt", "shorts", "longsleeve") for p in photos(label)]


def is_refusal(text: str) -> bool:
    return not text.startswith(("Added", "That image is already")) and not labels_in(text) and len(text) > 10


async def _silent(api: HardenedStandIn, bot: Any, chat: int, mids: list[int], *, sentinel_user: int = USER) -> None:
    """Assert that none of ``mids`` in ``chat`` got an answer (after a later message was answered)."""
    await bot.ask(sentinel_user, "/help", chat=chat)
    await asyncio.sleep(0.5)
    for mid in mids:
        assert api.replies_to(chat, mid) == [], f"message {mid} in chat {chat} was answered"


@pytest.mark.slow
async def test_hostile_labels_typed_in_chat_are_accepted_cleanly_or_refused_clearly(
    api: HardenedStandIn, store_copy: Path, tmp_path: Path
) -> None:
    outside = [p for p in tmp_path.rglob("*") if store_copy not in p.parents and p != store_copy]
    pool = iter(teaching_photos())
    results: list[tuple[str, str, str, str]] = []  # (how, name, expected, reply)
    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        for name, expected in ADD_NAMES:
            photo = next(pool)
            before = store_state(store_copy)
            text = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photo, caption=f"/add {name}"))
            results.append(("caption", name, expected, text))
            if expected in (REFUSED, WHICH):
                assert store_state(store_copy) == before, (name, text)
        # /add as a reply to a photo: the whole rest of the command line is the label
        for name, expected in [("../x", REFUSED), ("a/b", REFUSED), ("NUL", REFUSED), ("T-SHIRT", "t-shirt")]:
            photo_mid = bot.send_photo(USER, next(pool))
            await bot.reply(USER, photo_mid)
            update = api.make_text_update(USER, ADMIN, f"/add {name}", reply_to_message=photo_mid)
            text = await bot.reply_text(USER, push(api, update))
            results.append(("reply", name, expected, text))
        renames = {
            name: await bot.ask(ADMIN, f"/rename hat {name}")
            for name in ("../../etc", "a/b", "..", ".hidden", "CON", "x" * 300, "'a\tb'", "Розы", '"RED DRESS"')
        }
        case_only = await bot.ask(ADMIN, "/rename t-shirt T-Shirt")
        deletes = {name: await bot.ask(ADMIN, f"/delete {name}") for name in ("../../etc", "..", "a/b", "CON", "x" * 300)}
        labels = await bot.ask(ADMIN, "/labels")

    for how, name, expected, text in results:
        if expected == REFUSED:
            assert is_refusal(text), (how, name, text)
        elif expected == WHICH:
            assert text.startswith("Which label?"), (how, name, text)
        else:
            assert text.startswith(f"Added to {expected} ("), (how, name, expected, text)
    by_name = {(how, name): text for how, name, _, text in results}
    assert "NUL character" in by_name[("caption", "a\x00b")]
    assert "300 characters long" in by_name[("caption", "x" * 300)]
    assert "reserved device name" in by_name[("caption", "CON")]
    assert "cannot contain these characters: /" in by_name[("caption", "../../etc")]
    assert by_name[("caption", "\u00c9TE")] == "Added to \u00e9te (3 images)."
    for name, text in renames.items():
        assert is_refusal(text) and "Renamed" not in text, (name, text)
    assert "already exists" in renames["Розы"] and "already exists" in renames['"RED DRESS"']
    assert case_only.startswith("Renamed t-shirt to T-Shirt")
    for name, text in deletes.items():
        assert is_refusal(text) and "Delete the label" not in text, (name, text)

    store = ImageStore(store_copy)
    names = [info.name for info in store.labels()]
    assert len({label_key(n) for n in names}) == len(names), names
    assert "\u00e9te" in names and "e\u0301te" not in names
    assert sorted(names, key=label_key) == sorted(
        ["a", "éte", "hat", "pants", "red dress", "shoes", "T-Shirt", "y" * 64, "Розы", "👗 dress",
         "$(rm -rf ~)", "%2e%2e%2f"],
        key=label_key,
    ), names
    assert "T-Shirt — 8" in labels  # 6 trained + "T-Shirt" caption + "T-SHIRT" reply
    assert_store_contained(tmp_path, store_copy, outside)
    catalog_matches_folders(store_copy)
    assert_no_traceback(api)


async def test_commands_with_missing_or_extra_arguments_and_long_texts(api: HardenedStandIn, store_copy: Path) -> None:
    before = store_state(store_copy)
    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        photo_mid = bot.send_photo(ADMIN, photos("hat")[0])
        await bot.reply(ADMIN, photo_mid)
        texts = {
            "/add": await bot.ask(ADMIN, "/add"),
            "/add (reply, no label)": await bot.ask(ADMIN, "/add", reply_to=photo_mid),
            "/add   (reply, blank)": await bot.ask(ADMIN, "/add    ", reply_to=photo_mid),
            "/rename hat": await bot.ask(ADMIN, "/rename hat"),
            "/rename": await bot.ask(ADMIN, "/rename"),
            "/rename a b c": await bot.ask(ADMIN, "/rename a b c"),
            '/rename "unclosed': await bot.ask(ADMIN, '/rename "unclosed quote'),
            "/rename a ->": await bot.ask(ADMIN, "/rename a ->"),
            "/delete": await bot.ask(ADMIN, "/delete"),
            "/undo abc": await bot.ask(ADMIN, "/undo abc"),
            "/undo 0": await bot.ask(ADMIN, "/undo 0"),
            "/undo -1": await bot.ask(ADMIN, "/undo -1"),
            "/undo 101": await bot.ask(ADMIN, "/undo 101"),
            "/undo 1 2": await bot.ask(ADMIN, "/undo 1 2"),
            "/undo ²": await bot.ask(ADMIN, "/undo ²"),  # isdigit() but not a number int() reads
            "/undo ½": await bot.ask(ADMIN, "/undo ½"),
            "/labels extra": await bot.ask(ADMIN, "/labels please, all of them"),
            "/help extra": await bot.ask(USER, "/help me " + "z" * 100),
            "/start@bot": await bot.ask(USER, f"/start@{BOT}"),
            "/delete long": await bot.ask(ADMIN, "/delete " + "y" * 4000),
            "/rename long": await bot.ask(ADMIN, "/rename " + "y" * 2000 + " " + "z" * 2000),
            "/add long (reply)": await bot.ask(ADMIN, "/add " + "w" * 4000, reply_to=photo_mid),
        }
        assert store_state(store_copy) == before
        # 1024-character captions: a user's comment, an admin's too-long label, a label + long comment
        user_caption = await bot.reply_text(
            USER, bot.send_photo(USER, photos("shoes")[TRAIN_PER_LABEL], caption="look " * 204 + "!!!!")
        )
        long_label = await bot.reply_text(ADMIN, bot.send_photo(ADMIN, photos("hat")[1], caption="/add " + "h" * 1019))
        assert store_state(store_copy) == before
        label_and_comment = await bot.reply_text(
            ADMIN, bot.send_photo(ADMIN, photos("hat")[2], caption="/add hat\n" + "c" * 1015)
        )
        extra_words = await bot.ask(ADMIN, "/add hat with a brim", reply_to=photo_mid)

    assert texts["/add"].startswith("To teach me, send a photo with the caption /add <label>")
    assert texts["/add (reply, no label)"].startswith("Which label?")
    assert texts["/add   (reply, blank)"].startswith("Which label?")
    for key in ("/rename hat", "/rename", "/rename a b c", "/rename a ->"):
        assert texts[key].startswith("Use /rename <old> <new>"), (key, texts[key])
    assert texts['/rename "unclosed'].startswith("Labels cannot contain these characters: \"")
    assert texts["/delete"] == "Use /delete <label>. /labels lists them."
    for key in ("/undo abc", "/undo 0", "/undo -1", "/undo 101", "/undo 1 2", "/undo ²", "/undo ½"):
        assert texts[key].startswith("Use /undo"), (key, texts[key])
    assert texts["/labels extra"].startswith("3 labels, 18 images:")
    assert texts["/help extra"].startswith("Send me a photo") and "/add" not in texts["/help extra"]
    assert texts["/start@bot"].startswith("Hi!")
    for key in ("/delete long", "/rename long", "/add long (reply)"):
        assert "characters long" in texts[key] or "too long" in texts[key], (key, texts[key])
    assert labels_in(user_caption)[0] == "shoes"
    assert "1019 characters long" in long_label
    assert label_and_comment == "Added to hat (1 image)."
    # extra words after /add are part of the label: labels may contain spaces ("red dress")
    assert extra_words == "Added to hat with a brim (1 image)."
    assert_no_traceback(api)


async def test_edits_and_channel_posts_are_never_requested_and_ignored_if_delivered(
    api: HardenedStandIn, store_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = store_state(store_copy)
    # 1. the bot asks Telegram for new messages and button presses only
    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        photo_mid = bot.send_photo(ADMIN, photos("hat")[0])
        await bot.reply(ADMIN, photo_mid)
        edit = api.make_edited_message_update(ADMIN, ADMIN, photo_mid, caption="/add hat")
        api.push_update(edit)
        await bot.ask(ADMIN, "/help")
        assert api.replies_to(ADMIN, photo_mid)[0].params["text"]  # the photo itself was answered once
        assert len(api.replies_to(ADMIN, photo_mid)) == 1
    polls = [c for c in api.calls if c.method == "getUpdates"]
    assert polls and all(c.params.get("allowed_updates") == ALLOWED_UPDATES for c in polls)

    # 2. delivered anyway (a webhook or updates queued before the bot restricted the list)
    async with serving_bot(api, bot_config(api, store_copy), allowed_updates=None) as bot:
        mark = api.mark()
        text_mid = bot.send_text(ADMIN, "hello")
        photo_mid = bot.send_photo(ADMIN, photos("hat")[1])
        await bot.reply(ADMIN, photo_mid)
        for update in (
            api.make_edited_message_update(ADMIN, ADMIN, text_mid, text="/delete shoes"),
            api.make_edited_message_update(ADMIN, ADMIN, photo_mid, caption="/add hat"),
            api.make_edited_message_update(USER, USER, 999, text="/start"),
            api.make_channel_post_update(-1009, "/start"),
            api.make_channel_post_update(-1009, image_bytes=photos("hat")[2].read_bytes(), caption="/add hat"),
            api.make_channel_post_update(-1009, image_bytes=photos("hat")[3].read_bytes()),
        ):
            api.push_update(update)
        edited_channel = api.make_channel_post_update(-1009, "/help")
        api.push_update({"edited_channel_post": edited_channel["channel_post"]})
        await bot.ask(USER, "/help")
        await asyncio.sleep(0.5)
        said = [c for c in api.sent_calls()[mark:] if c.method in ("sendMessage", "sendPhoto", "editMessageText")]
    # only "/help" and the new photo were answered: no reply to edits or channel posts
    assert len(said) == 2, [(c.method, c.chat_id, c.params.get("text")) for c in said]
    assert api.sent_calls(chat_id=-1009) == []
    assert store_state(store_copy) == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "nothing went wrong"


async def test_groups_mentions_and_forwarded_photos(api: HardenedStandIn, store_copy: Path) -> None:
    config = bot_config(api, store_copy)
    async with serving_bot(api, config) as bot:
        def group_photo(user: int, path: Path, caption: str | None = None) -> int:
            return push(api, api.make_photo_update(GROUP, user, path.read_bytes(), caption=caption, chat_type="supergroup"))

        def group_text(user: int, text: str) -> int:
            return push(api, api.make_text_update(GROUP, user, text, chat_type="supergroup"))

        answered = {
            "photo": group_photo(USER, photos("shoes")[TRAIN_PER_LABEL]),
            "help@us": group_text(USER, f"/help@{BOT}"),
            "start": group_text(USER, "/start"),
            "add@other (admin)": group_photo(ADMIN, photos("hat")[0], caption="/add@other_bot hat"),
            "add@us (admin)": group_photo(ADMIN, photos("hat")[1], caption=f"/add@{BOT} hat"),
            "add (user)": group_photo(USER, photos("hat")[2], caption="/add hat"),
            "delete@us (user)": group_text(USER, f"/delete@{BOT} shoes"),
        }
        replies = {key: str((await bot.reply(GROUP, mid)).params["text"]) for key, mid in answered.items()}
        silent = [
            group_text(USER, f"hello @{BOT}, what is this?"),
            group_text(USER, "/help@other_bot"),
            group_text(ADMIN, "/labels@other_bot"),
            push(api, api.make_document_update(GROUP, USER, b"%PDF-1.4", mime_type="application/pdf",
                                               file_name="a.pdf", chat_type="supergroup")),
        ]
        await _silent(api, bot, GROUP, silent)

        # forwarded photos: judged by who sends them now, whatever their caption says
        fwd_user = push(api, forwarded(api.make_photo_update(USER, USER, photos("pants")[TRAIN_PER_LABEL].read_bytes())))
        fwd_add = push(api, forwarded(
            api.make_photo_update(USER, USER, photos("hat")[3].read_bytes(), caption="/add hat"),
            {"type": "user", "sender_user": {"id": ADMIN, "is_bot": False, "first_name": "Admin"}, "date": 1},
        ))
        fwd_channel = push(api, forwarded(
            api.make_photo_update(ADMIN, ADMIN, photos("t-shirt")[TRAIN_PER_LABEL].read_bytes()),
            {"type": "channel", "chat": {"id": -1007, "type": "channel", "title": "Shop"}, "message_id": 5, "date": 1},
        ))
        forwarded_replies = [await bot.reply_text(USER, fwd_user), await bot.reply_text(USER, fwd_add),
                             await bot.reply_text(ADMIN, fwd_channel)]

    assert labels_in(replies["photo"])[0] == "shoes", "a photo the bot can see in a group is answered"
    assert replies["help@us"].startswith("Send me a photo")
    assert replies["start"].startswith("Hi!")
    assert labels_in(replies["add@other (admin)"]), "an /add for another bot is not ours: just labels"
    assert replies["add@us (admin)"] == "Added to hat (1 image)."
    assert replies["add (user)"].startswith("Sorry, only the bot's admins can use /add")
    assert replies["delete@us (user)"].startswith("Sorry, only the bot's admins can use /delete")
    assert labels_in(forwarded_replies[0])[0] == "pants"
    assert forwarded_replies[1].startswith("Sorry, only the bot's admins can use /add")
    assert labels_in(forwarded_replies[2])[0] == "t-shirt"
    assert {i.name: i.count for i in ImageStore(store_copy).labels()}["hat"] == 1
    assert_no_traceback(api)


def _buttons(call: Call) -> list[str]:
    return [b["callback_data"] for row in call.params["reply_markup"]["inline_keyboard"] for b in row]


async def _press(api: HardenedStandIn, update: dict[str, Any]) -> dict[str, Any]:
    api.push_update(update)
    query_id = update["callback_query"]["id"]
    await api.wait_for(lambda c: c.method == "answerCallbackQuery" and c.params["callback_query_id"] == query_id)
    answer = api.callback_answer(query_id)
    assert answer is not None
    return answer


async def test_tampered_foreign_stale_and_expired_delete_buttons_delete_nothing(
    api: HardenedStandIn, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = bot_config(api, store_copy)
    async with serving_bot(api, config) as bot:
        for path in photos("hat")[:2]:
            await bot.reply_text(ADMIN, bot.send_photo(ADMIN, path, caption="/add hat"))
        ask = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete hat"))
        yes, no = _buttons(ask)
        message = ask.result
        before = store_state(store_copy)

        def press(data: str | None, *, user: int = ADMIN, on: dict[str, Any] | None = None) -> dict[str, Any]:
            update = api.make_callback_update(ADMIN, user, data or "", on or message)
            if data is None:
                del update["callback_query"]["data"]
            return update

        tampered = {
            "no data": await _press(api, press(None)),
            "empty": await _press(api, press("")),
            "extra field": await _press(api, press(f"{yes}:y")),
            "path": await _press(api, press("del:../../etc:y")),
            "64 bytes": await _press(api, press("x" * 64)),
            "unicode": await _press(api, press("del:тесттестте:y")),
            "halves swapped": await _press(api, press(yes[32:] + yes[:32])),
            "upper token": await _press(api, press(yes.upper())),
        }
        # the right data pressed somewhere else: in another chat, on an inline message
        group_msg = (await bot.reply(GROUP, push(api, api.make_text_update(GROUP, ADMIN, "/help", chat_type="supergroup")))).result
        elsewhere = await _press(api, api.make_callback_update(GROUP, ADMIN, yes, group_msg))
        inline = press(yes)
        del inline["callback_query"]["message"]
        inline["callback_query"]["inline_message_id"] = "AgAAAInline"
        inline_answer = await _press(api, inline)
        assert store_state(store_copy) == before

        # renamed meanwhile: the request was for "hat", which no longer exists
        await bot.ask(ADMIN, "/rename hat cap")
        renamed = await _press(api, press(yes))
        # expired: a fresh request whose confirmation window is over
        ask2 = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete cap"))
        monkeypatch.setattr(labels, "DELETE_CONFIRM_SECONDS", -1.0)
        expired = await _press(api, press(_buttons(ask2)[0], on=ask2.result))
        await api.wait_for(lambda c: c.method == "editMessageReplyMarkup")
        monkeypatch.undo()
        ask3 = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete cap"))
        after_rename = store_state(store_copy)

    # 3. a restart forgets pending confirmations: the old button is stale
    async with serving_bot(api, config) as bot:
        stale = await _press(api, press(_buttons(ask3)[0], on=ask3.result))
        ask4 = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete cap"))
        confirmed = await _press(api, press(_buttons(ask4)[0], on=ask4.result))
        await api.wait_for(lambda c: c.method == "editMessageText" and "Deleted the label" in c.params["text"])

    for key, answer in tampered.items():
        assert answer["show_alert"] is True, key
        assert answer["text"] in ("This button is not valid.", labels.EXPIRED_BUTTON), (key, answer)
    assert tampered["path"]["text"] == "This button is not valid."
    assert elsewhere["text"] == inline_answer["text"] == "Only the admin who asked for this can confirm it."
    assert "no longer exists" in renamed["text"]
    assert "expired" in expired["text"] and "expired" in stale["text"]
    assert after_rename.images == {("cap" if f == "hat" else f, n) for f, n in before.images}
    assert confirmed["text"] == "Deleted."
    assert "cap" not in {i.name for i in ImageStore(store_copy).labels()}
    assert no  # the cancel button exists (exercised in tests/test_bot_admin.py)
    assert_no_traceback(api)


async def test_other_admins_buttons_and_non_admin_presses_on_copied_data(api: HardenedStandIn, store_copy: Path) -> None:
    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        ask = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete shoes"))
        yes, _ = _buttons(ask)
        before = store_state(store_copy)
        # the admin's exact data, pressed by a non-admin on the admin's message and on a copy in their own chat
        own = (await bot.reply(USER, bot.send_text(USER, "/help"))).result
        answers = [
            await _press(api, api.make_callback_update(ADMIN, USER, yes, ask.result)),
            await _press(api, api.make_callback_update(USER, USER, yes, own)),
            await _press(api, api.make_callback_update(ADMIN, OTHER_ADMIN, yes, ask.result)),
        ]
        after = store_state(store_copy)
    assert [a["text"] for a in answers] == [
        "Sorry, only the bot's admins can use these buttons.",
        "Sorry, only the bot's admins can use these buttons.",
        "Only the admin who asked for this can confirm it.",
    ]
    assert after == before
