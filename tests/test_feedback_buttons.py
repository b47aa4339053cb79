"""Feedback on answers (issue 10, point 1), end to end: the real Application over HTTP against the
Bot API stand-in, the session-trained store (shoes / pants / t-shirt), the real review store.

Keyboard on every answer, "wrong" -> labels -> thanks in place, change of mind, only the sender
in a group, albums, a failing store costs only the keyboard, stale / forged buttons, teachers'
feedback straight into the training photos, /withdraw.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import feedback
from model_store.dataset import ImageStore
from model_store.review import ReviewStore
from tests.auxil.bot_harness import ADMIN, TRAIN_PER_LABEL, USER, bot_config, labels_in, photos, running_bot
from tests.auxil.review_harness import ReviewStandIn, buttons, current, press, press_data, until
from tests.auxil.store_checks import assert_no_traceback

GROUP = -100777
OTHER = 3003


@pytest.fixture
async def api() -> AsyncIterator[ReviewStandIn]:
    async with ReviewStandIn() as stand_in:
        yield stand_in


def review_of(store: Path) -> ReviewStore:
    return ReviewStore(ImageStore(store))


def held_out(label: str, i: int = 0) -> Path:
    """A photo of ``label`` the trained model never saw."""
    return photos(label)[TRAIN_PER_LABEL + i]


async def test_an_answer_carries_buttons_wrong_offers_labels_and_a_second_tap_changes_the_verdict(
    api: ReviewStandIn, store_copy: Path
) -> None:
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        mid = bot.send_photo(USER, held_out("shoes"))
        answer = await bot.reply(USER, mid)
        text = str(answer.params["text"])
        guess = labels_in(text)[0]
        assert list(buttons(answer.result)) == ["👍 Right", "👎 Wrong"]
        review = bot.svc.review
        await until(lambda: review.answer_count() == 1)

        # "wrong": the keyboard turns into the other labels and "none of these"; the text stays
        wrong = await press(api, USER, answer, "Wrong")
        assert wrong["text"] == "Which label is it?"
        page = current(api, answer)
        others = {"shoes", "pants", "t-shirt"} - {guess}
        assert set(buttons(page)) == others | {"None of these", "Back"}
        assert page["text"] == text
        other = sorted(others)[0]
        thanks = await press(api, USER, answer, other)
        assert thanks["text"] == "Thanks!"
        edited = current(api, answer)
        assert edited["text"].startswith(text) and f"Thanks! You said it is {other}." in edited["text"]
        assert list(buttons(edited)) == ["👍 Right", "👎 Wrong"]  # still there: a second tap changes it
        (stored,) = [a for a in [review.get_answer(i) for i in range(1, 5)] if a is not None]
        assert (stored.verdict, stored.verdict_label, stored.sender_id) == ("wrong", other, USER)
        queued = review.next_item()
        assert queued is not None and queued.suggestions == {other: 1}

        # change of mind: "right" replaces "wrong" (one verdict per answer), and the thanks line is replaced
        await press(api, USER, answer, "Right")
        again = current(api, answer)
        assert again["text"].count("Thanks!") == 1 and "You said my answer is right." in again["text"]
        after = review.get_answer(stored.answer_id)
        assert after is not None and (after.verdict, after.verdict_label) == ("right", guess)
        accuracy = review.real_world_accuracy(since=0)
        assert accuracy == {guess: (1, 1)}

        # "none of these", then back to the buttons without a verdict
        await press(api, USER, answer, "Wrong")
        await press(api, USER, answer, "Back")
        assert list(buttons(current(api, answer))) == ["👍 Right", "👎 Wrong"]
        await press(api, USER, answer, "Wrong")
        await press(api, USER, answer, "None of these")
        assert "none of my labels" in current(api, answer)["text"]
        last = review.get_answer(stored.answer_id)
        assert last is not None and last.verdict == "none"
    assert_no_traceback(api)


async def test_in_a_group_only_the_sender_rates_and_every_album_photo_has_its_own_buttons(
    api: ReviewStandIn, store_copy: Path
) -> None:
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        album = [
            api.make_photo_update(GROUP, USER, held_out(label).read_bytes(), media_group_id="alb-1", chat_type="supergroup")
            for label in ("pants", "t-shirt")
        ]
        mids = []
        for update in album:
            api.push_update(update)
            mids.append(update["message"]["message_id"])
        answers = [await bot.reply(GROUP, mid) for mid in mids]
        keyboards = [buttons(a.result) for a in answers]
        assert all(list(k) == ["👍 Right", "👎 Wrong"] for k in keyboards)
        assert keyboards[0]["👍 Right"] != keyboards[1]["👍 Right"]  # each answer its own buttons
        review = bot.svc.review
        await until(lambda: review.answer_count() == 2)

        refused = await press(api, OTHER, answers[0], "Right")
        assert refused["text"] == "Only the person who sent this photo can rate my answer."
        assert refused["show_alert"] is True
        refused_admin = await press(api, ADMIN, answers[0], "Wrong")
        assert refused_admin["text"] == refused["text"]
        assert current(api, answers[0]) == answers[0].result  # untouched
        assert all(a is None or a.verdict is None for a in (review.get_answer(i) for i in range(1, 4)))

        await press(api, USER, answers[1], "Right")  # the sender rates the second photo only
        rated = [a for a in (review.get_answer(i) for i in range(1, 4)) if a is not None and a.verdict]
        assert [(a.reply_message_id, a.verdict) for a in rated] == [(answers[1].result["message_id"], "right")]
        assert "Thanks!" not in current(api, answers[0]).get("text", "")
    assert_no_traceback(api)


async def test_a_slow_or_failing_review_store_costs_the_keyboard_never_the_answer(
    api: ReviewStandIn, store_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        review = bot.svc.review
        # a slow store: the answer goes out at once; a press before it is recorded asks to tap again
        gate = threading.Event()
        record = review.record_answer

        def slow(**kwargs: Any) -> int:
            gate.wait(30)
            return record(**kwargs)

        monkeypatch.setattr(feedback, "RECORD_WAIT_SECONDS", 0.2)
        monkeypatch.setattr(review, "record_answer", slow)
        waiting = await bot.reply(USER, bot.send_photo(USER, held_out("t-shirt")))
        early = await press(api, USER, waiting, "Right")
        gate.set()
        await until(lambda: review.answer_count() == 1)
        later = await press(api, USER, waiting, "Right")
        assert early["text"] == "I'm still saving my answer; please tap again in a moment."
        assert later["text"] == "Thanks!"

        def broken(**kwargs: object) -> int:
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(review, "record_answer", broken)
        mid = bot.send_photo(USER, held_out("pants"))
        answer = await bot.reply(USER, mid)
        assert labels_in(str(answer.params["text"]))  # the answer went out
        await api.wait_for(lambda c: c.method == "editMessageReplyMarkup" and c.params["message_id"] == answer.result["message_id"])
        assert buttons(current(api, answer)) == {}
        # a press that came before the keyboard was taken off is answered politely
        late = await press_data(api, USER, buttons(answer.result)["👍 Right"], answer.result)
        assert late["text"] == "Sorry, I couldn't keep feedback for this photo."
    assert_no_traceback(api)


async def test_stale_and_forged_buttons_are_answered_politely(api: ReviewStandIn, store_copy: Path) -> None:
    config = bot_config(api, store_copy)
    async with running_bot(api, config) as bot:
        first = await bot.reply(USER, bot.send_photo(USER, held_out("shoes")))
        second = await bot.reply(USER, bot.send_photo(USER, held_out("pants")))
        forged = await press_data(api, USER, "fb:1:right", first.result)
        never_issued = await press_data(api, USER, uuid.uuid4().hex + uuid.uuid4().hex, first.result)
        await until(lambda: buttons(current(api, first)) == {})  # an expired keyboard is taken off
        assert buttons(current(api, second)) == buttons(second.result)
    # a restart forgets the buttons (PTB's cache is in memory): the old ones have expired
    async with running_bot(api, config):
        mark = api.mark()
        stale = await press_data(api, USER, buttons(second.result)["👎 Wrong"], second.result)
        await api.wait_for(
            lambda c: c.method == "editMessageReplyMarkup" and c.params["message_id"] == second.result["message_id"],
            since=mark,
        )
    assert forged["text"] == "This button is not valid."
    assert never_issued["text"].startswith("This button has expired")
    assert stale["text"].startswith("This button has expired")
    assert buttons(current(api, second)) == {}
    assert [review_of(store_copy).get_answer(i).verdict for i in (1, 2)] == [None, None]  # type: ignore[union-attr]
    assert_no_traceback(api)


def _catalog(store: Path, sha: str) -> tuple[str, int, int | None]:
    with contextlib.closing(sqlite3.connect(store / "catalog.sqlite")) as conn:
        row = conn.execute("SELECT label, added_by, suggested_by FROM images WHERE sha256 = ?", (sha,)).fetchone()
    return row


async def test_a_teachers_feedback_goes_into_the_training_photos_at_once(api: ReviewStandIn, store_copy: Path) -> None:
    config = bot_config(api, store_copy, teachers=[USER], review={"uncertain_margin": 1.0})  # every answer queued
    before = {r.sha256 for r in ImageStore(store_copy).snapshot()}
    async with running_bot(api, config) as bot:
        answer = await bot.reply(USER, bot.send_photo(USER, held_out("t-shirt", 1)))
        guess = labels_in(str(answer.params["text"]))[0]
        review = bot.svc.review
        await until(lambda: review.pending_count() == 1)  # uncertain: queued without feedback
        await press(api, USER, answer, "Right")
        added = {r.sha256: r.label for r in ImageStore(store_copy).snapshot() if r.sha256 not in before}
        assert list(added.values()) == [guess]
        (sha,) = added
        assert _catalog(store_copy, sha) == (guess, USER, USER)
        assert "Added to my training photos of" in current(api, answer)["text"]
        assert review.pending_count() == 0  # a teacher's word needs no admin

        # change of mind: the photo moves to the label the teacher gives now
        await press(api, USER, answer, "Wrong")
        other = sorted({"shoes", "pants", "t-shirt"} - {guess})[0]
        await press(api, USER, answer, other)
        moved = {r.sha256: r.label for r in ImageStore(store_copy).snapshot() if r.sha256 not in before}
        assert moved == {sha: other}

        # an ordinary user's feedback only queues the photo
        plain = await bot.reply(ADMIN + 5, bot.send_photo(ADMIN + 5, held_out("pants", 1)))
        await until(lambda: review.answer_count() == 2)
        await press(api, ADMIN + 5, plain, "Right")
        assert {r.sha256 for r in ImageStore(store_copy).snapshot()} - before == {sha}
        assert review.pending_count() == 1
    assert_no_traceback(api)


async def test_withdraw_deletes_what_is_kept_about_a_users_photos(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        answers = [await bot.reply(USER, bot.send_photo(USER, held_out(label))) for label in ("shoes", "pants")]
        await press(api, USER, answers[0], "Wrong")
        await press(api, USER, answers[0], "None of these")
        other = await bot.reply(OTHER, bot.send_photo(OTHER, held_out("t-shirt")))
        review = bot.svc.review
        await until(lambda: review.answer_count() == 3)
        assert review.pending_count() >= 1
        help_text = await bot.ask(USER, "/help")
        done = await bot.ask(USER, "/withdraw")
        assert review.answer_count() == 1  # only the other user's answer is kept
        assert all(item.sender_id != USER for item in review.pending_items())
        nothing = await bot.ask(USER, "/withdraw")
        gone = await press(api, USER, answers[1], "Right")
        still = await press(api, OTHER, other, "Right")
    assert "file id" in help_text and "30 days" in help_text and "/withdraw" in help_text
    assert done.startswith("Done: I deleted what I kept about 2 answers")
    assert nothing.startswith("I keep nothing about your photos")
    assert gone["text"] == "This answer is no longer kept (it expired or was withdrawn)."
    assert still["text"] == "Thanks!"
    assert_no_traceback(api)
