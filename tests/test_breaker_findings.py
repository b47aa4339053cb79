"""What a fresh-eyes tester found in the feedback buttons, the review queue and real-world accuracy.

End to end over the real Application and the HTTP Bot API stand-in (session-trained store:
shoes / pants / t-shirt), except the real-world accuracy check, which reads a real review store.

* a double tap on a feedback button: the second tap (on the keyboard the first one replaced) was
  told "This button has expired ... send the photo again" and the new keyboard was taken off;
* a review item accepted as a label an admin renamed (or deleted) meanwhile recreated the old label
  with that one photo, splitting the class; a teacher's tap did the same;
* /status and the training report after /rollback counted the answers of the newer model as
  "users' feedback on model <older> since it was trained";
* two presses of "Accept as" / "Discard" arriving together sent the next item twice;
* /review in a group posted users' (private) photos to the group;
* a press in a flood-paced group was answered only after its edit's turn (the tap spun);
* /withdraw right after a photo: that photo's answer was recorded after the withdrawal, and kept;
* a full queue evicted users' corrections of confident answers first (lowest uncertainty);
* an album with "/add hat" on one photo and "/add shoes" on another stored all under one label;
* a read-only / full catalog: a press or /withdraw got the generic apology in the chat.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bot import feedback
from bot.reports import RealWorld
from model_store.dataset import ImageStore
from model_store.review import ReviewSettings, ReviewStore
from tests.auxil.bot_harness import ADMIN, TRAIN_PER_LABEL, USER, bot_config, labels_in, photos, running_bot
from tests.auxil.review_harness import ReviewStandIn, buttons, current, press, press_data, until
from tests.auxil.store_checks import assert_no_traceback

LABELS = {"shoes", "pants", "t-shirt"}


@pytest.fixture
async def api() -> AsyncIterator[ReviewStandIn]:
    async with ReviewStandIn() as stand_in:
        yield stand_in


def held_out(label: str, i: int = 0) -> Path:
    return photos(label)[TRAIN_PER_LABEL + i]


async def test_a_double_tap_on_a_feedback_button_is_not_told_it_expired(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        answer = await bot.reply(USER, bot.send_photo(USER, held_out("shoes")))
        await until(lambda: bot.svc.review.answer_count() == 1)
        original = answer.result
        first = await press(api, USER, answer, "Right")
        # the second tap of a double tap comes from the keyboard the first one replaced
        second = await press_data(api, USER, buttons(original)["👍 Right"], original)
        wrong_again = await press_data(api, USER, buttons(original)["👎 Wrong"], original)
        await asyncio.sleep(0.2)
        after = current(api, answer)
    assert first["text"] == second["text"] == "Thanks!"
    assert wrong_again["text"] == "Which label is it?"
    assert "None of these" in buttons(after)  # the keyboard is still there, now the labels
    assert_no_traceback(api)


async def _rate_wrong(bot, api: ReviewStandIn, photo: Path) -> tuple[str, str]:  # noqa: ANN001
    """USER sends ``photo`` and says it is another label; returns (the guess, the label given)."""
    answer = await bot.reply(USER, bot.send_photo(USER, photo))
    guess = labels_in(str(answer.params["text"]))[0]
    other = sorted(LABELS - {guess})[0]
    await until(lambda: bot.svc.review.answer_count() >= 1)
    await press(api, USER, answer, "Wrong")
    await press(api, USER, answer, other)
    return guess, other


async def test_accepting_as_a_label_renamed_meanwhile_does_not_recreate_it(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy, review={"auto_queue": False})) as bot:
        _, other = await _rate_wrong(bot, api, held_out("pants", 1))
        item = await bot.reply(ADMIN, bot.send_text(ADMIN, "/review"))
        assert f"✅ Accept as {other}" in buttons(item.result)
        renamed = await bot.ask(ADMIN, f"/rename {other} {other}-new")
        refused = await press(api, ADMIN, item, "Accept as")
        pending = bot.svc.review.pending_count()
    labels = {i.name: i.count for i in ImageStore(store_copy).labels()}
    assert other not in labels, (renamed, refused, labels)  # not recreated with one photo
    assert labels[f"{other}-new"] == TRAIN_PER_LABEL
    assert refused["show_alert"] is True and f"{other}" in refused["text"] and "no longer" in refused["text"]
    assert pending == 1  # the item stays: another label can still be chosen
    assert_no_traceback(api)


async def test_a_teachers_tap_on_a_label_deleted_meanwhile_does_not_recreate_it(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy, teachers=[USER])) as bot:
        answer = await bot.reply(USER, bot.send_photo(USER, held_out("t-shirt", 1)))
        guess = labels_in(str(answer.params["text"]))[0]
        other = sorted(LABELS - {guess})[0]
        await until(lambda: bot.svc.review.answer_count() == 1)
        await press(api, USER, answer, "Wrong")  # the labels keyboard, shown before the label goes
        confirm = await bot.reply(ADMIN, bot.send_text(ADMIN, f"/delete {other}"))
        await press(api, ADMIN, confirm, "Delete")
        await until(lambda: other not in {i.name for i in ImageStore(store_copy).labels()})
        await press(api, USER, answer, other)
        text = current(api, answer)["text"]
    assert other not in {i.name for i in ImageStore(store_copy).labels()}, text
    assert "no longer" in text
    assert_no_traceback(api)


async def test_two_presses_of_accept_arriving_together_send_the_next_item_once(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy, review={"auto_queue": False})) as bot:
        await _rate_wrong(bot, api, held_out("pants", 1))
        await _rate_wrong(bot, api, held_out("shoes", 1))
        await until(lambda: bot.svc.review.pending_count() == 2)
        item = await bot.reply(ADMIN, bot.send_text(ADMIN, "/review"))
        (data,) = [v for k, v in buttons(item.result).items() if k.startswith("✅ Accept as")]
        mark = api.mark()
        updates = [api.make_callback_update(ADMIN, ADMIN, data, item.result) for _ in range(2)]
        for update in updates:
            api.push_update(update)
        for update in updates:
            query_id = update["callback_query"]["id"]
            await api.wait_for(
                lambda c, q=query_id: c.method == "answerCallbackQuery" and c.params["callback_query_id"] == q, since=mark
            )
        await asyncio.sleep(0.5)
        shown = [c for c in api.sent[mark:] if c.method in ("sendPhoto", "sendMessage") and c.params["chat_id"] == ADMIN]
        pending = bot.svc.review.pending_count()
    assert len(shown) == 1, [c.params.get("caption") or c.params.get("text") for c in shown]
    assert pending == 1
    assert_no_traceback(api)


def test_real_world_accuracy_after_a_rollback_counts_only_that_models_answers(tmp_path: Path) -> None:
    review = ReviewStore(ImageStore(tmp_path / "store"))
    ids = []
    for n, (version, label) in enumerate([("v1", "shoes"), ("v2", "pants"), ("v2", "pants"), ("v2", "shoes")]):
        ids.append(
            review.record_answer(
                chat_id=USER, chat_type="private", reply_message_id=n + 1, sender_id=USER, file_id=f"f{n}",
                file_unique_id=f"u{n}", predictions=[(label, 0.9), ("hat", 0.1)], unknown=False,
                model_version=version, auto_queue=False,
            )
        )
    for answer_id in ids:
        review.set_feedback(answer_id=answer_id, user_id=USER, verdict="right")
    # v2 was trained after v1 and served these answers; /rollback serves v1 again
    real = RealWorld.read(review, SimpleNamespace(name="v1", created_at=0.0, metrics={}))
    review.close()
    assert real.per_label == {"shoes": (1, 1)}


async def test_review_in_a_group_does_not_show_users_photos_to_the_group(api: ReviewStandIn, store_copy: Path) -> None:
    group = -100555
    async with running_bot(api, bot_config(api, store_copy, review={"auto_queue": False})) as bot:
        await _rate_wrong(bot, api, held_out("pants", 1))  # a photo USER sent in a private chat
        await until(lambda: bot.svc.review.pending_count() == 1)
        update = api.make_text_update(group, ADMIN, "/review", chat_type="supergroup")
        api.push_update(update)
        answer = await bot.reply(group, update["message"]["message_id"])
        private = await bot.reply(ADMIN, bot.send_text(ADMIN, "/review"))
    assert answer.method == "sendMessage" and "private chat" in str(answer.params["text"])
    assert not api.sent_calls("sendPhoto", chat_id=group)
    assert private.method == "sendPhoto"  # in the admin's private chat the queue is shown
    assert_no_traceback(api)


async def test_a_press_in_a_flood_paced_group_is_answered_before_its_edit_waits(
    api: ReviewStandIn, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a busy group: its bucket (3 messages, then one a second) is empty when the sender taps
    monkeypatch.setattr(feedback, "ANSWER_WITHIN_SECONDS", 0.2)
    group = -100666
    config = bot_config(api, store_copy, limits={"group_messages_burst": 3, "group_messages_per_minute": 60})
    async with running_bot(api, config) as bot:
        answers = []
        for user, label in ((USER, "shoes"), (USER + 1, "pants"), (USER + 2, "t-shirt")):
            update = api.make_photo_update(group, user, held_out(label).read_bytes(), chat_type="supergroup")
            api.push_update(update)
            answers.append(await bot.reply(group, update["message"]["message_id"]))
        await until(lambda: bot.svc.review.answer_count() == 3)
        mark = api.mark()
        thanks = await press(api, USER, answers[0], "Right")
        edit = await api.wait_for(lambda c: c.method == "editMessageText" and c.params["chat_id"] == group, since=mark)
        calls = api.sent[mark:]
    assert thanks["text"] == "Thanks!"
    answered = next(i for i, c in enumerate(calls) if c.method == "answerCallbackQuery")
    assert answered < calls.index(edit)  # the tap does not spin while the edit waits for the group's turn
    assert "Thanks! You said my answer is right." in str(edit.params["text"])
    assert_no_traceback(api)


async def test_withdraw_sent_right_after_a_photo_also_deletes_that_photos_answer(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        photo = bot.send_photo(USER, held_out("shoes"))
        said = await bot.ask(USER, "/withdraw")  # handled while the photo is still being classified
        answer = await bot.reply(USER, photo)
        await api.wait_for(lambda c: c.method == "editMessageReplyMarkup" and c.params["message_id"] == answer.result["message_id"])
        kept = bot.svc.review.answer_count()
        # a photo sent after /withdraw (Telegram's dates are whole seconds: one a second later) is kept as usual
        update = api.make_photo_update(USER, USER, held_out("pants").read_bytes())
        update["message"]["date"] += 2
        api.push_update(update)
        later = await bot.reply(USER, update["message"]["message_id"])
        await until(lambda: bot.svc.review.answer_count() == 1)
    assert said.startswith("I keep nothing about your photos")
    assert kept == 0  # not recorded after the user asked to delete everything
    assert buttons(current(api, answer)) == {}
    assert list(buttons(current(api, later))) == ["👍 Right", "👎 Wrong"]
    assert_no_traceback(api)


def test_a_full_queue_of_uncertain_photos_does_not_evict_a_users_correction(tmp_path: Path) -> None:
    review = ReviewStore(ImageStore(tmp_path / "store"), ReviewSettings(max_queue=2, uncertain_margin=0.2))

    def record(uid: str, p1: float, sender: int = USER) -> int:
        return review.record_answer(
            chat_id=sender, chat_type="private", reply_message_id=1, sender_id=sender, file_id=f"f-{uid}",
            file_unique_id=uid, predictions=[("shoes", p1), ("pants", 1 - p1)], unknown=False,
            model_version="v1", auto_queue=True,
        )

    # a confident answer the user corrects, with the right label: the admins' most useful item
    corrected = record("corrected", 0.97)
    result = review.set_feedback(answer_id=corrected, user_id=USER, verdict="wrong", label="pants")
    assert result.item_id is not None
    for n in range(5):  # then a stream of photos the model is unsure of (auto-queued, nobody said anything)
        record(f"unsure-{n}", 0.52, sender=USER + 1)
    pending = {i.file_unique_id for i in review.pending_items()}
    review.close()
    assert "corrected" in pending, pending


async def test_an_album_with_two_different_add_labels_stores_nothing_under_the_wrong_one(api: ReviewStandIn, store_copy: Path) -> None:
    before = {r.sha256 for r in ImageStore(store_copy).snapshot()}
    async with running_bot(api, bot_config(api, store_copy)):
        for i, caption in enumerate(["/add hat", None, "/add shoes", None]):
            image = photos("hat" if i < 2 else "shoes")[i]
            api.push_update(api.make_photo_update(ADMIN, ADMIN, image.read_bytes(), media_group_id="two-labels", caption=caption))
        sent = await api.wait_for(lambda c: c.method == "sendMessage" and c.params["chat_id"] == ADMIN)
        await asyncio.sleep(0.3)
        said = str(api.message(ADMIN, sent.result["message_id"])["text"])  # type: ignore[index]
    added = [r.label for r in ImageStore(store_copy).snapshot() if r.sha256 not in before]
    assert added == [], (said, added)  # nothing under a label it was not captioned with
    assert "hat" in said and "shoes" in said and "one album per label" in said
    assert_no_traceback(api)


async def test_a_read_only_or_full_catalog_gets_a_clear_answer_to_a_press_and_to_withdraw(
    api: ReviewStandIn, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        review = bot.svc.review
        answer = await bot.reply(USER, bot.send_photo(USER, held_out("shoes")))
        await until(lambda: review.answer_count() == 1)

        def read_only(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        monkeypatch.setattr(review, "set_feedback", read_only)
        monkeypatch.setattr(review, "withdraw", read_only)
        pressed = await press(api, USER, answer, "Right")
        withdrawn = await bot.ask(USER, "/withdraw")
        texts = [str(c.params.get("text")) for c in api.sent_calls("sendMessage", chat_id=USER)]
    assert pressed["text"] == "Sorry, I couldn't save your answer just now. Please tap again later."
    assert withdrawn.startswith("Sorry, I couldn't delete anything just now")
    assert not [t for t in texts if t.startswith("Sorry, something went wrong")]  # no generic apology in the chat
    assert list(buttons(current(api, answer))) == ["👍 Right", "👎 Wrong"]  # tap again later
    assert_no_traceback(api)
