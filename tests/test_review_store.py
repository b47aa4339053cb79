"""model_store.review: answers, feedback, the review queue, bounds, expiry, withdrawal (issue 10, store side).

Real SQLite files in tmp_path, real photos for accepting; a fake clock only where time must pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from model_store.active_learning import priority
from model_store.dataset import ImageStore
from model_store.dataset import catalog as catalog_module
from model_store.errors import (
    DuplicateImageError,
    LabelError,
    NotYourPhotoError,
    ReviewItemGoneError,
    UnknownAnswerError,
)
from model_store.review import ReviewSettings, ReviewStore
from model_store.workspace import Workspace

DATA = Path(__file__).parent / "data" / "clothing"
DAY = 86_400.0

# The catalog's layout before issue 10 (schema version 1, user_version 0), verbatim.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    sha256   TEXT NOT NULL,
    label    TEXT NOT NULL,   -- the folder name under images/
    ext      TEXT NOT NULL,
    added_by INTEGER,
    chat_id  INTEGER,
    added_at REAL NOT NULL,
    PRIMARY KEY (sha256, label)
);
CREATE INDEX IF NOT EXISTS images_added_by ON images (added_by, added_at);
CREATE INDEX IF NOT EXISTS images_added_at ON images (added_at);
"""


class Clock:
    """A clock the test moves: starts at a fixed unix time, ``tick`` seconds per reading."""

    def __init__(self, start: float = 1_800_000_000.0, tick: float = 1.0) -> None:
        self.now = start
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def photo(label: str, n: int = 0) -> bytes:
    return sorted((DATA / label).glob("*.jpg"))[n].read_bytes()


def review_store(root: Path, settings: ReviewSettings | None = None, clock: Clock | None = None) -> ReviewStore:
    return ReviewStore(ImageStore(root), settings, clock=clock or Clock())


def answer(review: ReviewStore, uid: str, probs: list[float] | None = None, *, sender: int = 7, labels=None,
           unknown: bool | None = False, auto_queue: bool = True, chat_id: int = -100) -> int:
    probs = probs if probs is not None else [0.9, 0.06, 0.04]
    labels = labels or ["hat", "pants", "shoes", "dress", "shirt"][: len(probs)]
    return review.record_answer(
        chat_id=chat_id,
        chat_type="group",
        reply_message_id=1000 + len(uid),
        sender_id=sender,
        file_id=f"file-{uid}",
        file_unique_id=uid,
        predictions=list(zip(labels, probs, strict=True)),
        unknown=unknown,
        model_version="v1",
        auto_queue=auto_queue,
    )


def tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def image_rows(path: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT sha256, label, added_by, chat_id, suggested_by FROM images ORDER BY sha256"
        ).fetchall()


# ---------------------------------------------------------------------------- schema migration


def _v1_store(root: Path) -> list[tuple]:
    """A store with three images whose catalog has the pre-issue-10 layout; returns its rows."""
    store = ImageStore(root)
    for n, label in enumerate(["hat", "hat", "pants"]):
        store.add(photo(label, n), label, added_by=100 + n, chat_id=-5)
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        rows = conn.execute("SELECT sha256, label, ext, added_by, chat_id, added_at FROM images").fetchall()
    for p in root.glob("catalog.sqlite*"):
        p.unlink()
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)", rows)
        conn.commit()
    return sorted(rows)


def test_a_catalog_of_the_previous_layout_is_upgraded_in_place_keeping_who_added_what(tmp_path: Path) -> None:
    root = tmp_path / "store"
    before = _v1_store(root)
    assert tables(root / "catalog.sqlite") == {"images"}

    ws = Workspace(root)
    assert list(root.glob("catalog.sqlite.corrupt-*")) == []  # not set aside and rebuilt
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        after = sorted(conn.execute("SELECT sha256, label, ext, added_by, chat_id, added_at FROM images").fetchall())
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    assert after == before and {r[3] for r in after} == {100, 101, 102}
    assert version == catalog_module.SCHEMA_VERSION == 2
    assert {"review_answers", "review_items"} <= tables(root / "catalog.sqlite")
    assert [r.label for r in ws.store.last_added_by(102)] == ["pants"]  # /undo still works
    # and the upgraded catalog works for the new tables and column
    aid = answer(ws.review, "u1", [0.5, 0.45, 0.05])
    assert ws.review.pending_count() == 1 and ws.review.get_answer(aid) is not None
    ws.store.add(photo("shoes"), "shoes", added_by=1, suggested_by=2)
    assert (1, 2) in {(r[2], r[4]) for r in image_rows(root / "catalog.sqlite")}
    Workspace(root)  # reopening an upgraded catalog changes nothing
    assert list(root.glob("catalog.sqlite.corrupt-*")) == []


def test_an_upgrade_that_fails_half_way_leaves_the_old_catalog_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    before = _v1_store(root)
    broken = {1: [*catalog_module._MIGRATIONS[1], "CREATE TABLE review_items (x INTEGER)"]}  # fails last
    monkeypatch.setattr(catalog_module, "_MIGRATIONS", broken)
    with pytest.raises(sqlite3.OperationalError):
        ImageStore(root)
    assert tables(root / "catalog.sqlite") == {"images"}  # one transaction: nothing of it stayed
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        assert sorted(conn.execute("SELECT * FROM images").fetchall()) == before
    assert list(root.glob("catalog.sqlite.corrupt-*")) == []
    monkeypatch.undo()
    assert {r[2] for r in image_rows(ImageStore(root).catalog_path)} == {100, 101, 102}


@pytest.mark.parametrize(
    "schema",
    [
        V1_SCHEMA.replace("added_at REAL NOT NULL,", "added_at REAL NOT NULL, note TEXT,"),  # an unknown column
        V1_SCHEMA + "CREATE TABLE review_answers (answer_id INTEGER PRIMARY KEY);",  # half of version 2
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);",  # a foreign file
    ],
)
def test_a_catalog_of_no_known_layout_is_still_set_aside_and_rebuilt(tmp_path: Path, schema: str) -> None:
    root = tmp_path / "store"
    ImageStore(root).add(photo("hat"), "hat", added_by=3)
    for p in root.glob("catalog.sqlite*"):
        p.unlink()
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        conn.executescript(schema)
    foreign = (root / "catalog.sqlite").read_bytes()
    ws = Workspace(root)
    aside = [p for p in root.glob("catalog.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert [p.read_bytes() for p in aside] == [foreign]
    assert [r[1:3] for r in image_rows(root / "catalog.sqlite")] == [("hat", None)]  # rebuilt from the folders
    assert ws.review.pending_count() == 0


def test_a_catalog_of_a_newer_version_is_refused_not_set_aside(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ImageStore(root).add(photo("hat"), "hat", added_by=3)
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        conn.execute("ALTER TABLE images ADD COLUMN future TEXT")
        conn.execute("PRAGMA user_version = 3")
        conn.commit()
    with pytest.raises(sqlite3.OperationalError, match="newer version"):
        ImageStore(root)
    assert list(root.glob("catalog.sqlite.corrupt-*")) == []
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        assert conn.execute("SELECT added_by FROM images").fetchall() == [(3,)]


def test_a_damaged_catalog_is_still_set_aside(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ImageStore(root)
    for p in root.glob("catalog.sqlite*"):
        p.unlink()
    (root / "catalog.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    ws = Workspace(root)
    assert len([p for p in root.glob("catalog.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]) == 1
    assert answer(ws.review, "u1") > 0


# ---------------------------------------------------------------------------- feedback


def test_feedback_change_of_mind_replaces_the_first_verdict(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    aid = answer(review, "u1", [0.9, 0.06, 0.04])  # a confident answer: not queued by itself
    assert review.pending_count() == 0

    first = review.set_feedback(answer_id=aid, user_id=7, verdict="wrong", label="Pants")
    assert (first.verdict, first.label, first.previous, first.changed) == ("wrong", "Pants", None, True)
    item = review.get_item(first.item_id or 0)
    assert item is not None and item.reason == "feedback" and item.suggestions == {"Pants": 1}
    assert (item.wrong_votes, item.right_votes) == (1, 0)

    second = review.set_feedback(answer_id=aid, user_id=7, verdict="none")
    assert (second.verdict, second.previous, second.item_id) == ("none", "wrong", first.item_id)
    item = review.get_item(first.item_id or 0)
    assert item is not None and item.suggestions == {} and item.none_votes == 1 and item.wrong_votes == 1

    third = review.set_feedback(answer_id=aid, user_id=7, verdict="right")
    assert (third.verdict, third.label, third.previous, third.item_id) == ("right", "hat", "none", None)
    assert review.pending_count() == 0  # only the disagreement had queued it
    got = review.get_answer(aid)
    assert got is not None and (got.verdict, got.verdict_label) == ("right", "hat")
    assert review.real_world_accuracy(since=0) == {"hat": (1, 1)}  # one verdict, not three

    again = review.set_feedback(answer_id=aid, user_id=7, verdict="right")
    assert again.changed is False
    # "wrong" naming the answer's own label is a "right"
    assert review.set_feedback(answer_id=aid, user_id=7, verdict="wrong", label="HAT").verdict == "right"


def test_right_on_an_uncertain_answer_keeps_it_queued_with_the_label_suggested(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    aid = answer(review, "u1", [0.48, 0.42, 0.10])
    result = review.set_feedback(answer_id=aid, user_id=7, verdict="right")
    item = review.get_item(result.item_id or 0)
    assert item is not None and item.reason == "uncertain" and item.suggestions == {"hat": 1}
    assert item.suggester("Hat") == 7 and item.suggester("pants") is None


def test_only_the_sender_may_rate_and_a_refusal_records_nothing(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    aid = answer(review, "u1", sender=7)
    with pytest.raises(NotYourPhotoError) as refused:
        review.set_feedback(answer_id=aid, user_id=8, verdict="wrong", label="pants")
    assert (refused.value.answer_id, refused.value.user_id) == (aid, 8)
    got = review.get_answer(aid)
    assert got is not None and got.verdict is None and review.pending_count() == 0
    with pytest.raises(UnknownAnswerError):
        review.set_feedback(answer_id=aid + 99, user_id=7, verdict="right")
    with pytest.raises(LabelError):
        review.set_feedback(answer_id=aid, user_id=7, verdict="wrong", label="../../etc")
    with pytest.raises(ValueError):
        review.set_feedback(answer_id=aid, user_id=7, verdict="none", label="pants")
    with pytest.raises(ValueError):
        review.set_feedback(answer_id=aid, user_id=7, verdict="maybe")  # type: ignore[arg-type]
    got = review.get_answer(aid)
    assert got is not None and got.verdict is None


def test_bad_answers_are_refused_and_nothing_is_recorded(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    with pytest.raises(ValueError, match="probability"):
        answer(review, "u1", [1.5, 0.1])
    with pytest.raises(ValueError):
        answer(review, "", [0.5, 0.4])
    with pytest.raises(ValueError):
        answer(review, "u2", [], labels=[])
    assert review.answer_count() == 0 and review.pending_count() == 0


# ---------------------------------------------------------------------------- active learning and order


def test_only_uncertain_or_unknown_answers_enter_the_queue_without_feedback(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store", ReviewSettings(uncertain_margin=0.2))
    answer(review, "sure", [0.7, 0.2, 0.1])  # margin 0.5
    answer(review, "edge", [0.55, 0.35, 0.1])  # margin 0.2: not below the threshold
    answer(review, "close", [0.5, 0.35, 0.15])  # margin 0.15
    answer(review, "unknown", [0.9, 0.05, 0.05], unknown=True)
    answer(review, "off", [0.4, 0.39, 0.21], auto_queue=False)  # active learning off
    answer(review, "unknown-off", [0.9, 0.05, 0.05], unknown=True, auto_queue=False)  # unknown photos always
    assert {item.file_unique_id for item in review.pending_items()} == {"close", "unknown", "unknown-off"}
    assert all(item.reason == "uncertain" for item in review.pending_items())


def test_the_queue_is_ordered_by_priority_not_by_arrival(tmp_path: Path) -> None:
    rng = random.Random(3)
    review = review_store(tmp_path / "store", ReviewSettings(uncertain_margin=1.0))
    expected = []
    for n in range(40):
        p1 = rng.uniform(0.34, 1.0)
        p2 = rng.uniform(0.0, 1.0 - p1)
        probs = [p1, p2, 1.0 - p1 - p2]
        unknown = n % 9 == 0
        aid = answer(review, f"u{n}", probs, unknown=unknown, sender=n)
        wrong = n % 3 == 0
        if n % 2 == 0:
            review.set_feedback(answer_id=aid, user_id=n, verdict="wrong" if wrong else "right")
        votes = (int(wrong), int(not wrong)) if n % 2 == 0 else (0, 0)
        expected.append((priority(probs, unknown=unknown, wrong=votes[0], right=votes[1]), n))
    order = [int(item.file_unique_id[1:]) for item in review.pending_items()]
    want = [n for _, n in sorted(expected, key=lambda e: (e[0][0], e[0][1], -e[1]), reverse=True)]
    assert order == want
    assert order != sorted(order)  # not the arrival order
    assert review.next_item() == review.pending_items()[0]
    first, second = review.pending_items()[:2]
    nxt = review.next_item(skip={first.item_id})
    assert nxt is not None and nxt.item_id == second.item_id


def test_several_senders_of_one_photo_share_one_item(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    a = answer(review, "same", [0.9, 0.1], sender=1)
    b = answer(review, "same", [0.9, 0.1], sender=2)
    c = answer(review, "same", [0.9, 0.1], sender=3)
    review.set_feedback(answer_id=a, user_id=1, verdict="wrong", label="pants")
    review.set_feedback(answer_id=b, user_id=2, verdict="wrong", label="pants")
    review.set_feedback(answer_id=c, user_id=3, verdict="right")
    [item] = review.pending_items()
    assert item.suggestions == {"pants": 2, "hat": 1} and item.suggesters["pants"] == (1, 2)
    assert item.priority == priority([0.9, 0.1], wrong=2, right=1)
    assert item.answer_id == c  # the latest answer represents the photo


# ---------------------------------------------------------------------------- resolving and accepting


def test_accepting_adds_the_photo_like_add_with_who_suggested_and_who_accepted(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ws = Workspace(root)
    review = ws.review
    aid = answer(review, "u1", [0.9, 0.1], sender=55, chat_id=-42)
    item_id = review.set_feedback(answer_id=aid, user_id=55, verdict="wrong", label="Pants").item_id
    assert item_id is not None
    data = photo("pants")
    result = review.accept(item_id, data, label="pants", by=9)
    assert result.created and result.label == "pants"
    assert result.path.read_bytes() == data and result.path.parent == ws.store.images_dir / "pants"
    assert image_rows(root / "catalog.sqlite") == [(hashlib.sha256(data).hexdigest(), "pants", 9, -42, 55)]
    item = review.get_item(item_id)
    assert item is not None and item.status == "accepted" and review.pending_count() == 0
    with pytest.raises(ReviewItemGoneError) as gone:
        review.resolve(item_id, action="discarded", by=10)
    assert gone.value.status == "accepted"
    # the same photo again, from another sender's answer: not queued again while the decision is kept
    other = answer(review, "u1", [0.9, 0.1], sender=56)
    assert review.set_feedback(answer_id=other, user_id=56, verdict="none").item_id is None

    # dedupe as /add: the same image under the same label is not stored twice, under another is refused
    aid2 = answer(review, "u2", [0.5, 0.45], sender=57)
    item2 = review.set_feedback(answer_id=aid2, user_id=57, verdict="wrong", label="pants").item_id or 0
    assert review.accept(item2, data, label="PANTS", by=9).created is False
    aid3 = answer(review, "u3", [0.5, 0.45], sender=58)
    item3 = review.set_feedback(answer_id=aid3, user_id=58, verdict="wrong", label="shoes").item_id or 0
    with pytest.raises(DuplicateImageError):
        review.accept(item3, data, label="shoes", by=9)
    still = review.get_item(item3)
    assert still is not None and still.status == "pending"  # nothing lost: it can be retried or discarded
    assert ws.store.image_count() == 1


def test_accepting_an_uncertain_photo_nobody_labelled_records_no_suggester(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "store")
    answer(ws.review, "u1", [0.5, 0.45])
    item = ws.review.next_item()
    assert item is not None
    ws.review.accept(item.item_id, photo("hat"), label="hat", by=9)
    assert [r[2:] for r in image_rows(ws.store.catalog_path)] == [(9, -100, None)]


def test_discard_and_resolve_errors(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    answer(review, "u1", [0.5, 0.45])
    item = review.next_item()
    assert item is not None
    with pytest.raises(ValueError):
        review.resolve(item.item_id, action="accepted", by=1)  # accepted needs the label
    review.resolve(item.item_id, action="discarded", by=1)
    assert review.next_item() is None and review.pending_count() == 0
    with pytest.raises(ReviewItemGoneError) as gone:
        review.resolve(item.item_id + 5, action="discarded", by=1)
    assert gone.value.status is None


# ---------------------------------------------------------------------------- bounds, expiry, withdrawal, restart


def test_a_full_queue_drops_the_item_that_would_teach_least(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store", ReviewSettings(max_queue=3, uncertain_margin=1.0))
    margins = {"a": 0.30, "b": 0.05, "c": 0.20, "d": 0.10, "e": 0.40}
    for uid, margin in margins.items():
        p1 = (1 + margin) / 2
        answer(review, uid, [p1, 1 - p1], labels=["hat", "pants"])
    assert [i.file_unique_id for i in review.pending_items()] == ["b", "d", "c"]  # "e" (newest) and "a" dropped
    assert review.answer_count() == 5  # answers are bounded on their own
    assert review.pending_count() == 3


def test_answers_are_bounded_oldest_first(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store", ReviewSettings(max_answers=4))
    ids = [answer(review, f"u{n}", [0.5, 0.45]) for n in range(6)]
    assert review.answer_count() == 4
    assert [review.get_answer(i) is None for i in ids] == [True, True, False, False, False, False]
    assert {i.file_unique_id for i in review.pending_items()} == {"u2", "u3", "u4", "u5"}
    with pytest.raises(UnknownAnswerError):
        review.set_feedback(answer_id=ids[0], user_id=7, verdict="right")


def test_answers_feedback_and_decisions_expire_after_the_retention(tmp_path: Path) -> None:
    clock = Clock(tick=0.0)
    review = review_store(tmp_path / "store", ReviewSettings(retention_days=30), clock)
    old = answer(review, "old", [0.5, 0.45])
    review.set_feedback(answer_id=old, user_id=7, verdict="wrong", label="pants")
    decided = answer(review, "decided", [0.5, 0.45])
    decided_item = review.set_feedback(answer_id=decided, user_id=7, verdict="none").item_id or 0
    review.resolve(decided_item, action="discarded", by=1)
    clock.now += 20 * DAY
    new = answer(review, "new", [0.5, 0.45])
    assert review.pending_count() == 2
    clock.now += 11 * DAY  # "old" is 31 days old, "new" 11
    with pytest.raises(UnknownAnswerError):  # refused even before the expiry ran
        review.set_feedback(answer_id=old, user_id=7, verdict="right")
    assert review.expire() == 2
    assert review.get_answer(old) is None and review.get_answer(new) is not None
    assert [i.file_unique_id for i in review.pending_items()] == ["new"]
    assert review.get_item(decided_item) is None
    with contextlib.closing(sqlite3.connect(review.path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM review_items").fetchone() == (1,)
    # expiry also runs by itself (at most once a minute) as the bot works
    clock.now += 31 * DAY
    assert review.next_item() is None and review.answer_count() == 0


def test_withdraw_deletes_a_users_answers_feedback_and_queued_photos(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    mine = answer(review, "mine", [0.5, 0.45], sender=1)
    review.set_feedback(answer_id=mine, user_id=1, verdict="wrong", label="pants")
    shared_mine = answer(review, "shared", [0.9, 0.1], sender=1)
    review.set_feedback(answer_id=shared_mine, user_id=1, verdict="wrong", label="pants")
    shared_theirs = answer(review, "shared", [0.9, 0.1], sender=2)
    review.set_feedback(answer_id=shared_theirs, user_id=2, verdict="wrong", label="shoes")
    answer(review, "theirs", [0.5, 0.45], sender=2)
    assert review.pending_count() == 3

    assert review.withdraw(1) == 2
    assert review.get_answer(mine) is None and review.get_answer(shared_mine) is None
    items = {i.file_unique_id: i for i in review.pending_items()}
    assert set(items) == {"shared", "theirs"}
    assert items["shared"].suggestions == {"shoes": 1} and items["shared"].sender_id == 2
    with contextlib.closing(sqlite3.connect(review.path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM review_answers WHERE sender_id = 1").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM review_items WHERE file_unique_id = 'mine'").fetchone() == (0,)
    assert review.withdraw(1) == 0
    assert review.real_world_accuracy(since=0) == {"hat": (0, 1)}


def test_the_queue_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ws = Workspace(root)
    for n, probs in enumerate([[0.5, 0.45], [0.55, 0.4], [0.4, 0.39]]):
        aid = answer(ws.review, f"u{n}", probs)
    ws.review.set_feedback(answer_id=aid, user_id=7, verdict="wrong", label="pants")
    before = ws.review.pending_items()
    del ws
    reopened = Workspace(root)
    assert reopened.review.pending_items() == before and len(before) == 3
    new_id = answer(reopened.review, "u9", [0.5, 0.45])
    assert new_id > aid  # ids are never reused across restarts


def test_real_world_accuracy_counts_rated_answers_since_the_training(tmp_path: Path) -> None:
    clock = Clock(tick=0.0)
    review = review_store(tmp_path / "store", clock=clock)
    before = answer(review, "before", [0.9, 0.1])
    review.set_feedback(answer_id=before, user_id=7, verdict="right")
    trained_at = clock.now + 1
    clock.now += 10
    rated = {
        "a": ([0.9, 0.1], "right", None),
        "b": ([0.9, 0.1], "wrong", "pants"),
        "c": ([0.8, 0.2], "none", None),
    }
    for uid, (probs, verdict, label) in rated.items():
        aid = answer(review, uid, probs)
        review.set_feedback(answer_id=aid, user_id=7, verdict=verdict, label=label)  # type: ignore[arg-type]
    answer(review, "d", [0.1, 0.9], labels=["hat", "pants"])  # pants first, never rated
    p = answer(review, "e", [0.2, 0.8], labels=["hat", "pants"])
    review.set_feedback(answer_id=p, user_id=7, verdict="right")
    u = answer(review, "f", [0.9, 0.1], unknown=True)
    review.set_feedback(answer_id=u, user_id=7, verdict="none")
    assert review.real_world_accuracy(since=trained_at) == {"hat": (1, 3), "pants": (1, 1)}
    assert review.real_world_accuracy(since=0) == {"hat": (2, 4), "pants": (1, 1)}
    assert review.unknown_feedback(since=trained_at) == (1, 1)


def test_settings_are_checked() -> None:
    for bad in ({"max_queue": 0}, {"max_answers": -1}, {"retention_days": 0}, {"uncertain_margin": 1.5}):
        with pytest.raises(ValueError):
            ReviewSettings(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sequences_of_calls_keep_the_queue_consistent(tmp_path: Path, seed: int) -> None:
    """Whatever users and admins do, in any order: bounds hold, and the queue is exactly the photos
    the rules say, each with the priority recomputed from its answers."""
    rng = random.Random(seed)
    clock = Clock(tick=0.0)
    settings = ReviewSettings(max_queue=6, max_answers=25, retention_days=1, uncertain_margin=0.3)
    review = review_store(tmp_path / "store", settings, clock)
    ids: list[int] = []
    for _ in range(300):
        op = rng.random()
        clock.now += rng.uniform(0, 900)
        if op < 0.45:
            p1 = rng.uniform(0.34, 1.0)
            ids.append(answer(review, f"u{rng.randrange(15)}", [p1, 1 - p1], sender=rng.randrange(5),
                              unknown=rng.random() < 0.1, auto_queue=rng.random() < 0.8, labels=["hat", "pants"]))
        elif op < 0.75 and ids:
            aid = rng.choice(ids)
            got = review.get_answer(aid)
            verdict = rng.choice(["right", "wrong", "none"])
            label = rng.choice(["pants", "shoes", None]) if verdict == "wrong" else None
            with contextlib.suppress(UnknownAnswerError):
                review.set_feedback(answer_id=aid, user_id=got.sender_id if got else 0, verdict=verdict, label=label)
        elif op < 0.85:
            item = review.next_item()
            if item is not None:
                review.resolve(item.item_id, action=rng.choice(["accepted", "discarded"]), by=99, label="hat")
        elif op < 0.9:
            review.withdraw(rng.randrange(5))
        else:
            clock.now += rng.uniform(0, DAY / 2)

        review.expire()
        assert review.answer_count() <= settings.max_answers
        items = review.pending_items()
        assert len(items) == review.pending_count() <= settings.max_queue
        cutoff = clock.now - DAY
        for item in items:
            answers = item.answers
            assert answers and all(a.file_unique_id == item.file_unique_id and a.created_at >= cutoff for a in answers)
            latest_by_user = {a.sender_id: a for a in answers if a.verdict is not None}
            wrong = sum(1 for a in latest_by_user.values() if not a.agreed)
            right = len(latest_by_user) - wrong
            assert wrong or any(a.auto_queued for a in answers)
            last = answers[-1]
            assert item.priority == priority([p for _, p in last.predictions], unknown=last.unknown, wrong=wrong, right=right)
        keys = [(i.priority, -i.queued_at, -i.item_id) for i in items]
        assert keys == sorted(keys, reverse=True)


class FailingCommit:
    """The review store's connection, whose next COMMIT fails (as on a full disk)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.armed = True

    def execute(self, sql: str, *args):  # noqa: ANN202 - a stand-in for sqlite3.Connection.execute
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.conn, name)


def test_a_failed_commit_records_nothing_and_the_store_keeps_working(tmp_path: Path) -> None:
    review = review_store(tmp_path / "store")
    kept = answer(review, "u0", [0.5, 0.45])
    failing = FailingCommit(review._conn)
    review._conn = failing  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="full"):
        answer(review, "u1", [0.5, 0.45])
    assert not failing.conn.in_transaction
    assert review.answer_count() == 1 and [i.file_unique_id for i in review.pending_items()] == ["u0"]
    assert review.set_feedback(answer_id=kept, user_id=7, verdict="none").changed
    assert answer(review, "u2", [0.5, 0.45]) > kept


# ---------------------------------------------------------------------------- threads


def test_concurrent_calls_from_threads(tmp_path: Path) -> None:
    review = ReviewStore(ImageStore(tmp_path / "store"), ReviewSettings(max_queue=50))
    errors: list[BaseException] = []
    ids: list[int] = []
    start = threading.Barrier(6)

    def user(n: int) -> None:
        try:
            start.wait()
            for k in range(10):
                aid = answer(review, f"u{n}-{k % 5}", [0.5, 0.45] if k % 2 else [0.9, 0.1], sender=n)
                ids.append(aid)
                review.set_feedback(answer_id=aid, user_id=n, verdict="wrong", label="pants")
                review.next_item()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == len(set(ids)) == 60 and review.answer_count() == 60
    assert review.pending_count() == 30  # 6 users x 5 photos, each photo one item
    assert all(i.wrong_votes == 1 and i.suggestions == {"pants": 1} for i in review.pending_items())

    # two admins resolving the same item at once: exactly one wins
    item = review.next_item()
    assert item is not None
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def admin(by: int) -> None:
        barrier.wait()
        try:
            review.resolve(item.item_id, action="discarded", by=by)
            outcomes.append("done")
        except ReviewItemGoneError:
            outcomes.append("gone")

    admins = [threading.Thread(target=admin, args=(a,)) for a in (1, 2)]
    for t in admins:
        t.start()
    for t in admins:
        t.join()
    assert sorted(outcomes) == ["done", "gone"]
