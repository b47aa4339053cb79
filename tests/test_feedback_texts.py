"""Fast checks of the feedback and review texts and keyboards (no Telegram, no model).

The end-to-end behaviour is in tests/test_feedback_buttons.py and tests/test_review_queue.py; these
pin the paging, the wording users and admins read, and the real-world accuracy lines.
"""

from __future__ import annotations

from bot.feedback import Answer, FeedbackButton, feedback_keyboard, labels_keyboard, thanks_text
from bot.general import help_text
from bot.reports import RealWorld, real_world_lines
from bot.review import MAX_CAPTION, ReviewButton, item_keyboard, item_text
from bot.review import labels_keyboard as review_labels_keyboard
from model_store.review import ReviewItem


def _texts(markup) -> list[list[str]]:  # noqa: ANN001
    return [[b.text for b in row] for row in markup.inline_keyboard]


def _item(**overrides) -> ReviewItem:  # noqa: ANN003
    fields = dict(
        item_id=7, answer_id=3, chat_id=2002, sender_id=2002, file_id="AgAC1", file_unique_id="AQAD1",
        predictions=(("shoes", 0.46), ("pants", 0.44), ("t-shirt", 0.10)), unknown=False, model_version="v1",
        suggestions={"pants": 2, "t-shirt": 1}, suggesters={"pants": (2002, 3003), "t-shirt": (4004,)},
        none_votes=1, right_votes=0, wrong_votes=4, queued_at=1_796_300_000.0, reason="feedback",
        priority=(0.98, 1.0),
    )
    fields.update(overrides)
    return ReviewItem(**fields)  # type: ignore[arg-type]


def test_the_labels_of_wrong_are_paged_and_every_button_carries_its_answer() -> None:
    answer = Answer(2002, 2002, "AgAC1", "shoes")
    labels = [f"label {i:02d}" for i in range(19)]
    first = labels_keyboard(answer, labels, 0, 8)
    last = labels_keyboard(answer, labels, 2, 8)
    assert _texts(first)[:4] == [[f"label {i:02d}", f"label {i + 1:02d}"] for i in range(0, 8, 2)]
    assert _texts(first)[4:] == [["More (2/3) ▶"], ["None of these", "Back"]]
    assert _texts(last) == [["label 16", "label 17"], ["label 18"], ["◀ Previous"], ["None of these", "Back"]]
    assert _texts(labels_keyboard(answer, labels, 99, 8)) == _texts(last)  # clamped
    data = [b.callback_data for row in first.inline_keyboard for b in row]
    assert all(isinstance(d, FeedbackButton) and d.answer is answer for d in data)
    assert data[0].action == "label" and data[0].value == "label 00"
    assert [d.value for d in data if d.action == "page"] == [1]
    assert _texts(feedback_keyboard(answer)) == [["👍 Right", "👎 Wrong"]]
    assert _texts(labels_keyboard(answer, [], 0, 8)) == [["None of these", "Back"]]


def test_thanks_say_what_was_recorded() -> None:
    assert thanks_text("right", "shoes") == "Thanks! You said my answer is right. Tap again to change your answer."
    assert thanks_text("wrong", "pants") == "Thanks! You said it is pants. Tap again to change your answer."
    assert thanks_text("none", None).startswith("Thanks! You said it is none of my labels.")
    assert thanks_text("right", None).startswith("Thanks! You said it is none of my labels, as I thought.")
    assert thanks_text("wrong", "pants", taught="Added to my training photos of pants (7 images).").endswith(
        "Added to my training photos of pants (7 images)."
    )


def test_a_review_item_says_why_what_the_model_said_and_what_users_said() -> None:
    text = item_text(_item(), 4, before="Added to shoes (8 images).")
    assert text.splitlines() == [
        "Added to shoes (8 images).",
        "To review (4 waiting): a user said my answer was wrong.",
        "I said: shoes 46%, pants 44%, t-shirt 10%",
        "Users said: pants (2), t-shirt (1), none of these (1)",
        "Sent by user 2002, queued 2026-12-03 12:13 UTC.",
    ]
    unsure = item_text(_item(reason="uncertain", suggestions={}, suggesters={}, none_votes=0), 1)
    assert "To review (1 waiting): I was unsure." in unsure and "Users said: nothing yet" in unsure
    long = item_text(_item(suggestions={f"label {'x' * 60} {i}": 1 for i in range(40)}), 1)
    assert len(long) <= MAX_CAPTION
    # accept as the label users suggested most; without suggestions the model's guess; unknown: none
    assert _texts(item_keyboard(_item(), ()))[0] == ["✅ Accept as pants"]
    assert _texts(item_keyboard(_item(suggestions={}), ()))[0] == ["✅ Accept as shoes"]
    assert _texts(item_keyboard(_item(suggestions={}, unknown=True), ()))[0] == ["Another label…"]
    buttons = [b.callback_data for row in item_keyboard(_item(), (1, 2)).inline_keyboard for b in row]
    assert all(isinstance(b, ReviewButton) and b.item_id == 7 and b.skip == (1, 2) for b in buttons)
    pages = review_labels_keyboard(7, ["a", "b", "c"], 1, 2, ())
    assert _texts(pages) == [["c"], ["◀ Previous"], ["Back"]]


def test_real_world_lines_stand_next_to_the_test_split() -> None:
    metrics = {
        "accuracy": 0.9,
        "test_images": 20,
        "per_label": {"shoes": {"precision": 0.95, "recall": 0.9, "support": 10}, "pants": {"precision": 0.8}},
    }
    real = RealWorld(0.0, {"pants": (1, 4), "shoes": (5, 6)}, (2, 3), "v7", metrics)
    lines = real_world_lines(real)
    assert lines[0].startswith(
        "Real-world accuracy (users' feedback on model v7 since it was trained): 60.0% right of 10 rated answers (95% interval"
    )
    assert "its test accuracy: 90.0% on 20 test images" in lines[0]
    assert lines[1:] == [
        "  pants: users 1/4 right (25%); test precision 80%",
        "  shoes: users 5/6 right (83%); test precision 95%",
        "  “none of my labels” answers: users agreed with 2 of 3",
    ]
    assert real_world_lines(RealWorld(0.0, {}, (0, 0), "v7", metrics)) == [
        "Real-world accuracy (users' feedback on model v7 since it was trained): no rated answers yet."
    ]


def test_help_says_what_is_kept_for_how_long_and_how_to_withdraw() -> None:
    text = help_text(False, 0.5, keep_days=14, max_answers=5000)
    assert "Telegram file id" in text and "for 14 days" in text and "last 5000 answers" in text
    assert "/withdraw – delete what I keep about your photos and feedback" in text
    assert "/review" not in text
    assert "/review – " in help_text(True, 0.5, keep_days=14)
    assert "file id" not in help_text(False, 0.5)  # feedback off: nothing kept, nothing said
