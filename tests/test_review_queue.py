"""The admins' review queue (issue 10, points 2, 3 and 5), end to end: the real Application over
HTTP against the Bot API stand-in, the session-trained store (shoes / pants / t-shirt).

/review shows the photo by its file id with the guess and users' votes; accept -> the photo in the
store like /add (added_by the admin, suggested_by the user) -> the next training uses it; another
label (paged); discard; next; a restart keeps the queue; the queue bound and active learning;
non-admins refused; real-world accuracy in /status.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from model_store.dataset import ImageStore
from model_store.registry import ModelRegistry
from tests.auxil.bot_harness import (
    ADMIN,
    OTHER_ADMIN,
    TRAIN_PER_LABEL,
    USER,
    bot_config,
    labels_in,
    photos,
    running_bot,
)
from tests.auxil.review_harness import ReviewStandIn, buttons, current, press, until
from tests.auxil.store_checks import assert_no_traceback, catalog_matches_folders
from tests.botapi_standin import Call

LABELS = {"shoes", "pants", "t-shirt"}


@pytest.fixture
async def api() -> AsyncIterator[ReviewStandIn]:
    async with ReviewStandIn() as stand_in:
        yield stand_in


def held_out(label: str, i: int = 0) -> Path:
    """A photo of a trained label the model never saw (i = 0 or 1)."""
    return photos(label)[TRAIN_PER_LABEL + i]


def untaught(label: str, i: int = 0) -> Path:
    """A photo of a label the model was never taught (dress, hat, skirt, shorts ...)."""
    assert label not in LABELS
    return photos(label)[i]


async def rate_wrong(bot, api: ReviewStandIn, user: int, photo: Path) -> tuple[Call, str, str]:  # noqa: ANN001
    """``user`` sends ``photo`` and says it is another label; returns (the answer, the guess, the label given)."""
    count = bot.svc.review.answer_count
    n = count()
    answer = await bot.reply(user, bot.send_photo(user, photo))
    guess = labels_in(str(answer.params["text"]))[0]
    other = sorted(LABELS - {guess})[0]
    await until(lambda: count() == n + 1)
    await press(api, user, answer, "Wrong")
    await press(api, user, answer, other)
    return answer, guess, other


async def review_message(bot, api: ReviewStandIn, text: str = "/review") -> Call:  # noqa: ANN001
    """Send ``/review`` as the admin; the bot's reply (a photo, or a text when the queue is empty)."""
    return await bot.reply(ADMIN, bot.send_text(ADMIN, text))


async def next_message(api: ReviewStandIn, since: int) -> Call:
    """The next photo / text the bot sends the admin after ``since`` (the next item, or "empty")."""
    return await api.wait_for(
        lambda c: c.method in ("sendPhoto", "sendMessage") and c.params["chat_id"] == ADMIN, since=since, timeout=30
    )


def catalog_row(store: Path, sha: str) -> tuple[str, int, int | None]:
    with contextlib.closing(sqlite3.connect(store / "catalog.sqlite")) as conn:
        return conn.execute("SELECT label, added_by, suggested_by FROM images WHERE sha256 = ?", (sha,)).fetchone()


@pytest.mark.slow  # a real training (/retrain, in a subprocess)
async def test_review_accept_adds_the_photo_like_add_and_the_next_training_uses_it(
    api: ReviewStandIn, store_copy: Path
) -> None:
    before = {r.sha256 for r in ImageStore(store_copy).snapshot()}
    async with running_bot(api, bot_config(api, store_copy, review={"auto_queue": False})) as bot:
        answer, guess, other = await rate_wrong(bot, api, USER, held_out("pants", 1))
        item = await review_message(bot, api)
        assert item.method == "sendPhoto"
        # the kept photo is sent by its file id: nothing downloaded or uploaded to show it
        assert item.params["photo"] == bot.svc.review.next_item().file_id and not item.files
        caption = str(item.params["caption"])
        assert caption.startswith("To review (1 waiting): a user said my answer was wrong.")
        assert f"I said: {guess} " in caption and f"Users said: {other} (1)" in caption
        assert list(buttons(item.result)) == [f"✅ Accept as {other}", "Another label…", "🗑 Discard", "Next ▶"]

        mark = api.mark()
        accepted = await press(api, ADMIN, item, "Accept as")
        after = await next_message(api, mark)
        added = {r.sha256: r.label for r in ImageStore(store_copy).snapshot() if r.sha256 not in before}
        assert list(added.values()) == [other]
        (sha,) = added
        assert catalog_row(store_copy, sha) == (other, ADMIN, USER)
        assert accepted["text"].startswith(f"Added to {other} (")
        assert after.method == "sendMessage" and after.params["text"].startswith(f"Added to {other} (")
        assert after.params["text"].endswith("The review queue is empty. Thanks!")
        assert buttons(current(api, item)) == {}
        assert bot.svc.review.pending_count() == 0
        catalog_matches_folders(store_copy)

        # the next training uses it
        old = ModelRegistry(store_copy / "models").current()
        assert old is not None
        report = await bot.reply(ADMIN, bot.send_text(ADMIN, "/retrain"), timeout=300)
        await api.wait_for(
            lambda c: c.method == "sendMessage" and c.params["chat_id"] == ADMIN and "Retraining done" in c.params["text"],
            timeout=300,
        )
    assert report.method == "sendMessage"
    new = ModelRegistry(store_copy / "models").current()
    assert new is not None and new.name != old.name
    assert new.metrics["images_per_label"][other] == old.metrics["images_per_label"][other] + 1
    assert new.metrics["store_fingerprint"] == ImageStore(store_copy).fingerprint()
    # the report shows users' feedback on the model that served until then (one "wrong" answer)
    texts = [str(c.params["text"]) for c in api.sent_calls("sendMessage", chat_id=ADMIN)]
    (final,) = [t for t in texts if t.startswith("Retraining done")]
    assert f"Real-world accuracy (users' feedback on model {old.name} since it was trained): 0.0% right of 1 rated" in final
    assert f"  {guess}: users 0/1 right (0%); test precision" in final
    assert_no_traceback(api)


async def test_another_label_paged_discard_next_and_refusals(api: ReviewStandIn, store_copy: Path) -> None:
    config = bot_config(api, store_copy, review={"auto_queue": False, "labels_per_page": 2})
    before = {r.sha256 for r in ImageStore(store_copy).snapshot()}
    async with running_bot(api, config) as bot:
        review = bot.svc.review
        for i, label in enumerate(("dress", "hat", "skirt")):
            await rate_wrong(bot, api, USER + i, untaught(label))
        await until(lambda: review.pending_count() == 3)

        # non-admins: /review refused, and a review button too
        refused = await bot.ask(USER, "/review")
        first = await review_message(bot, api)
        stranger = await press(api, USER, first, "Discard")
        assert review.pending_count() == 3

        # "Next" leaves the item in the queue and shows another one
        mark = api.mark()
        await press(api, ADMIN, first, "Next")
        second = await next_message(api, mark)
        assert second.method == "sendPhoto" and second.params["photo"] != first.params["photo"]
        assert buttons(current(api, first)) == {}

        # "Discard": resolved, nothing added
        mark = api.mark()
        discarded = await press(api, ADMIN, second, "Discard")
        third = await next_message(api, mark)
        assert discarded["text"] == "Discarded."
        assert str(third.params["caption"]).startswith("Discarded.\nTo review (2 waiting)")
        assert third.params["photo"] not in (first.params["photo"], second.params["photo"])

        # "Another label…": every label, two a page, then one of them
        await press(api, ADMIN, third, "Another label")
        page1 = list(buttons(current(api, third)))
        await press(api, ADMIN, third, "More")
        page2 = list(buttons(current(api, third)))
        await press(api, ADMIN, third, "Previous")
        assert list(buttons(current(api, third))) == page1
        shown = [b for b in page1 + page2 if b in LABELS]
        assert sorted(shown) == sorted(LABELS) and len([b for b in page1 if b in LABELS]) == 2
        assert "Back" in page1 and "Back" in page2
        if "shoes" not in page1:
            await press(api, ADMIN, third, "More")
        mark = api.mark()
        await press(api, ADMIN, third, "shoes")
        last = await next_message(api, mark)
        # only the skipped item is left, and it was skipped in this review
        assert last.method == "sendMessage"
        assert last.params["text"].startswith("Added to shoes (")
        assert last.params["text"].endswith("No other item waiting (1 skipped in this review; send /review to see them again).")

        # two admins on the same item: the second one's press finds it handled
        mine = await review_message(bot, api)
        theirs = await bot.reply(OTHER_ADMIN, bot.send_text(OTHER_ADMIN, "/review"))
        assert mine.params["photo"] == theirs.params["photo"] == first.params["photo"]
        mark = api.mark()
        await press(api, ADMIN, mine, "Discard")
        assert (await next_message(api, mark)).params["text"] == "Discarded.\nThe review queue is empty. Thanks!"
        handled = await press(api, OTHER_ADMIN, theirs, "Accept as")
    added = {r.sha256: r.label for r in ImageStore(store_copy).snapshot() if r.sha256 not in before}
    assert list(added.values()) == ["shoes"]
    assert refused == "Sorry, only the bot's admins can use /review. Send me a photo and I'll tell you what I see."
    assert stranger["text"] == "Sorry, only the bot's admins can use these buttons."
    assert handled["text"] == "Already handled (by another admin), withdrawn or expired."
    assert_no_traceback(api)


async def test_a_restart_keeps_the_queue(api: ReviewStandIn, store_copy: Path) -> None:
    config = bot_config(api, store_copy, review={"auto_queue": False})
    async with running_bot(api, config) as bot:
        _, _, other = await rate_wrong(bot, api, USER, held_out("t-shirt", 1))
        await until(lambda: bot.svc.review.pending_count() == 1)
        item_before = await review_message(bot, api)
    # a new Application on the same store: the old buttons have expired, the queue has not
    async with running_bot(api, config) as bot:
        assert bot.svc.review.pending_count() == 1
        item = await review_message(bot, api)
        assert item.params["photo"] == item_before.params["photo"]
        mark = api.mark()
        await press(api, ADMIN, item, "Accept as")
        done = await next_message(api, mark)
    assert done.params["text"].startswith(f"Added to {other} (")
    assert other in {r.label for r in ImageStore(store_copy).snapshot()}
    assert_no_traceback(api)


async def test_active_learning_queues_uncertain_answers_within_the_bound(api: ReviewStandIn, store_copy: Path) -> None:
    # every answer is "uncertain" at this margin: three photos, no feedback, a queue of two
    config = bot_config(api, store_copy, review={"uncertain_margin": 1.0, "max_queue": 2})
    async with running_bot(api, config) as bot:
        for label in ("dress", "hat", "skirt"):
            await bot.reply(USER, bot.send_photo(USER, untaught(label, 1)))
        review = bot.svc.review
        await until(lambda: review.answer_count() == 3)
        queued = review.pending_items()
        item = await review_message(bot, api)
    assert len(queued) == 2
    assert all(i.reason == "uncertain" for i in queued)
    caption = str(item.params["caption"])
    # untaught photos: uncertain, and most of them flagged unknown by the open-set check
    assert caption.startswith(("To review (2 waiting): I was unsure.", "To review (2 waiting): it looked like none of my labels."))
    assert item.params["photo"] == queued[0].file_id  # the queue's order: the most uncertain first
    assert "Users said: nothing yet" in caption
    # auto_queue off: an uncertain answer (a known photo, at this margin) no longer enters the queue,
    # an unknown one still does (unknown photos always feed the queue)
    async with running_bot(api, bot_config(api, store_copy, review={"auto_queue": False, "uncertain_margin": 1.0})) as bot:
        review = bot.svc.review
        await bot.reply(USER, bot.send_photo(USER, held_out("shoes")))
        await until(lambda: review.answer_count() == 4)
        known = review.get_answer(4)
        after_known = review.pending_count()
        await bot.reply(USER, bot.send_photo(USER, untaught("shorts", 1)))
        await until(lambda: review.answer_count() == 5)
        other = review.get_answer(5)
        after_other = review.pending_count()
    assert known is not None and not known.unknown and not known.auto_queued
    assert after_known == 2  # the two queued before, no new one
    assert other is not None and after_other == (3 if other.unknown else 2)
    assert_no_traceback(api)


async def test_status_shows_real_world_accuracy_next_to_the_test_split(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy, review={"auto_queue": False})) as bot:
        before = await bot.ask(ADMIN, "/status")
        answer = await bot.reply(USER, bot.send_photo(USER, held_out("shoes")))
        guess = labels_in(str(answer.params["text"]))[0]
        await until(lambda: bot.svc.review.answer_count() == 1)
        await press(api, USER, answer, "Right")
        _, wrong_guess, _ = await rate_wrong(bot, api, USER, held_out("pants"))
        status = await bot.ask(ADMIN, "/status")
    assert "no rated answers yet" in before
    version = ModelRegistry(store_copy / "models").current()
    assert version is not None
    assert (
        f"Real-world accuracy (users' feedback on model {version.name} since it was trained): 50.0% right of 2 rated answers"
        in status
    )
    assert "its test accuracy:" in status
    if guess == wrong_guess:
        assert f"  {guess}: users 1/2 right (50%); test precision" in status
    else:
        assert f"  {guess}: users 1/1 right (100%); test precision" in status
        assert f"  {wrong_guess}: users 0/1 right (0%); test precision" in status
    assert "Review queue: 1 waiting (/review)" in status
    assert_no_traceback(api)


async def test_an_image_sent_as_a_file_is_reviewed_as_a_file(api: ReviewStandIn, store_copy: Path) -> None:
    async with running_bot(api, bot_config(api, store_copy, review={"auto_queue": False})) as bot:
        review = bot.svc.review
        data = held_out("shoes", 1).read_bytes()
        answer = await bot.reply(USER, bot.send_document(USER, data, file_name="IMG_1.JPG", mime_type="image/jpeg"))
        await until(lambda: review.answer_count() == 1)
        await press(api, USER, answer, "Wrong")
        await press(api, USER, answer, "None of these")
        item = await review_message(bot, api)
        refused_as_photo = [c for c in api.failed_calls("sendPhoto") if c.params.get("photo") == item.params.get("document")]
        mark = api.mark()
        await press(api, ADMIN, item, "Another label")
        await press(api, ADMIN, item, "shoes")
        done = await next_message(api, mark)
    # sent as a photo first (the real server refuses a document's id there), then as the file it is
    assert item.method == "sendDocument" and item.params["document"] == review.get_answer(1).file_id  # type: ignore[union-attr]
    assert len(refused_as_photo) == 1
    assert "Users said: none of these (1)" in str(item.params["caption"])
    assert done.params["text"].startswith("Added to shoes (")
    assert_no_traceback(api)
