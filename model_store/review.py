"""Learning from the chat: the bot's answers, users' feedback, the admins' review queue (issue 10).

Everything lives in the store's catalog, ``<store root>/catalog.sqlite`` (SQLite, WAL; tables
``review_answers`` and ``review_items``, created by :mod:`model_store.dataset.catalog`, which also
upgrades an older catalog in place). Only Telegram file ids, the model's top-k answer and the
users' verdicts are kept, never image bytes: a photo is downloaded by the bot only when an admin
accepts it, and then added exactly like ``/add`` (:meth:`ReviewStore.accept` or
:meth:`~model_store.dataset.ImageStore.add` with ``suggested_by``).

The loop:

1. :meth:`ReviewStore.record_answer` for every classified photo (returns the ``answer_id`` the bot
   puts in its feedback buttons). A photo the open-set check flagged *unknown* enters the queue
   without feedback (issue 10, point 4: unknown photos feed the queue); with ``auto_queue``
   (active learning, point 3) so does an *uncertain* one: the margin between its two best
   probabilities is below :attr:`ReviewSettings.uncertain_margin` (default 0.2).
2. :meth:`ReviewStore.set_feedback`: only the photo's sender may rate it ("right", "wrong" with or
   without the right label, "none" of the labels); a second call replaces the first (change of
   mind). A verdict that disagrees with the answer queues the photo; "right" never dequeues an
   uncertain photo (it is now labelled: an admin accepts it in one tap), and a change of mind
   back to agreement dequeues a photo that only its disagreement had queued.
3. Admins: :meth:`ReviewStore.next_item` (highest :func:`model_store.active_learning.priority`
   first: uncertainty, then disagreement, then the oldest), :meth:`ReviewStore.get_item`,
   :meth:`ReviewStore.resolve` / :meth:`ReviewStore.accept`.

One queue item per photo (Telegram's ``file_unique_id``): the same photo sent by several users
collects all their verdicts (each user's latest counts once). An item's model answer (predictions,
``file_id``, chat, sender) is that of its latest recorded answer.

What is kept and for how long (the wording of ``/help``): answers and their feedback for
:attr:`ReviewSettings.retention_days` (default 30) days after the photo was answered, and at most
:attr:`ReviewSettings.max_answers` (default 10,000; the oldest are deleted first); a queued photo
as long as one of its answers is kept, and at most :attr:`ReviewSettings.max_queue` (default 200)
queued photos (when full, one nobody rated wrong that would teach least, by the queue's order, is dropped); the
decision on a reviewed photo (accepted / discarded, by whom) for ``retention_days`` after it, so the
same photo is not queued again meanwhile. :meth:`ReviewStore.withdraw` deletes one user's answers,
feedback and queued photos at once. Images an admin accepted are training images like any other:
they stay in the store (with ``added_by`` the admin and ``suggested_by`` the user) until an admin
removes them.

Thread-safe: every method is one SQLite transaction (``BEGIN IMMEDIATE``, so other processes are
excluded too) on the store's one connection, under its lock; the bot calls it from worker threads.
Every write is such a transaction (WAL, ``synchronous=NORMAL``: a committed write survives a crash
of the process; a power cut may lose the last ones, never leave the tables half-written).

Why this module is long (~850 lines, over a third docstrings): it is the whole contract of issue
10's store side (the settings, four result types, the queue's rules of entry, order, bound and
expiry, withdrawal and real-world accuracy), each rule a few lines of SQL next to the docstring
that states it; splitting it would spread one transaction's invariants over several files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from model_store.active_learning import margin_uncertainty, priority
from model_store.errors import NotYourPhotoError, ReviewItemGoneError, UnknownAnswerError
from model_store.labels import label_key, normalize_label

if TYPE_CHECKING:
    from model_store.dataset import AddResult, ImageStore

__all__ = [
    "Answer",
    "FeedbackResult",
    "Reason",
    "Resolution",
    "ReviewItem",
    "ReviewSettings",
    "ReviewStore",
    "Verdict",
]

logger = logging.getLogger(__name__)

Verdict = Literal["right", "wrong", "none"]
"""A user's feedback: the answer was right; wrong (optionally with the right label); none of the labels."""
Resolution = Literal["accepted", "discarded"]
"""An admin's decision on a review item."""
Reason = Literal["uncertain", "feedback"]
"""Why an item is queued: the model was unsure (active learning), or a user said it was wrong."""

MAX_PREDICTIONS = 10
"""At most this many (label, probability) pairs are kept per answer (the best ones)."""
MAX_ID_CHARS = 256
"""Longest Telegram ``file_id`` / ``file_unique_id`` / chat type accepted (they are ~100 chars)."""
_DAY = 86_400.0
_EXPIRE_EVERY = 60.0  # seconds between opportunistic expiry runs


@dataclass(frozen=True)
class ReviewSettings:
    """Bounds and thresholds of the review store (the bot's ``[review]`` config keys).

    Attributes:
        max_queue: most pending items in the queue (N); when full, an item no user rated wrong is
            dropped first, the one of lowest priority (:func:`model_store.active_learning.priority`,
            then the newest).
        max_answers: most answers kept (M); when full, the oldest answers (and their feedback)
            are deleted.
        retention_days: answers, feedback and admins' decisions are deleted this many days (K)
            after the photo was answered / the decision taken.
        uncertain_margin: an answer whose two best probabilities differ by less than this
            (``p1 - p2 < uncertain_margin``, margin sampling) is "uncertain" and, with
            ``auto_queue``, enters the queue without feedback (unknown photos always do).

    Raises:
        ValueError: a bound below 1, a retention not above 0, a margin outside [0, 1].
    """

    max_queue: int = 200
    max_answers: int = 10_000
    retention_days: float = 30.0
    uncertain_margin: float = 0.2

    def __post_init__(self) -> None:
        if self.max_queue < 1 or self.max_answers < 1:
            raise ValueError(f"max_queue and max_answers must be >= 1, got {self.max_queue}, {self.max_answers}")
        if not self.retention_days > 0 or math.isinf(self.retention_days):
            raise ValueError(f"retention_days must be a positive number, got {self.retention_days}")
        if not 0.0 <= self.uncertain_margin <= 1.0:
            raise ValueError(f"uncertain_margin must be in [0, 1], got {self.uncertain_margin}")


@dataclass(frozen=True)
class Answer:
    """One classified photo as the bot answered it, and its sender's feedback.

    Attributes:
        answer_id: the id :meth:`ReviewStore.record_answer` returned (never reused).
        chat_id, chat_type, reply_message_id: where the bot replied (``chat_type`` as Telegram's
            ``Chat.type``: "private", "group", "supergroup", "channel").
        sender_id: Telegram user id of who sent the photo (the only one who may rate it).
        file_id, file_unique_id: Telegram's ids of the photo (the largest size).
        predictions: ``((label, probability), ...)``, best first, probabilities in [0, 1].
        unknown: the open-set flag (None: the model version has no open-set check).
        model_version: the serving version's name, if known.
        uncertainty: :func:`model_store.active_learning.margin_uncertainty` of the answer.
        auto_queued: it entered the queue without feedback (unknown, or uncertain with ``auto_queue``).
        created_at: unix seconds.
        verdict: the sender's feedback, None if none.
        verdict_label: the label the feedback names: the top-1 label for "right" (None for an
            unknown answer), the given label for "wrong" (None if not given), None for "none".
        agreed: whether the feedback agrees with the answer ("right"; or "none" on an unknown
            answer); None without feedback.
    """

    answer_id: int
    chat_id: int
    chat_type: str
    reply_message_id: int
    sender_id: int
    file_id: str
    file_unique_id: str
    predictions: tuple[tuple[str, float], ...]
    unknown: bool | None
    model_version: str | None
    uncertainty: float
    auto_queued: bool
    created_at: float
    verdict: Verdict | None
    verdict_label: str | None

    @property
    def agreed(self) -> bool | None:
        if self.verdict is None:
            return None
        return self.verdict == "right" or (bool(self.unknown) and self.verdict == "none")


@dataclass(frozen=True)
class FeedbackResult:
    """Outcome of :meth:`ReviewStore.set_feedback`.

    Attributes:
        answer_id: the answer rated.
        verdict: the verdict stored ("wrong" naming the top-1 label is stored as "right").
        label: the label stored with it (see :attr:`Answer.verdict_label`).
        previous: the sender's earlier verdict on this answer, None if this is the first.
        changed: False when the same verdict and label were already stored (nothing changed).
        item_id: the photo's pending review item after this feedback, None if it is not queued
            (or was already reviewed by an admin).
    """

    answer_id: int
    verdict: Verdict
    label: str | None
    previous: Verdict | None
    changed: bool
    item_id: int | None


@dataclass(frozen=True)
class ReviewItem:
    """One photo in the admins' review queue (or reviewed already: :attr:`status`).

    Attributes:
        item_id: the item's id (never reused).
        answer_id, chat_id, sender_id, file_id, file_unique_id, predictions, unknown,
            model_version: those of the photo's latest recorded answer (:class:`Answer`).
        suggestions: label -> how many users said the photo shows it ("right" votes count for
            the top-1 label, "wrong" votes for the label they gave), most votes first.
        suggesters: label -> the user ids behind :attr:`suggestions`, in the order of their answers.
        none_votes: users who said it is none of the labels (or agreed with an "unknown" answer).
        right_votes, wrong_votes: users who agreed / disagreed with the model's answer.
        queued_at: unix seconds when it entered the queue.
        reason: "uncertain" (active learning) or "feedback" (a user disagreed).
        priority: its :func:`model_store.active_learning.priority` ``(uncertainty, disagreement)``.
        status: "pending", "accepted" or "discarded".
    """

    item_id: int
    answer_id: int
    chat_id: int
    sender_id: int
    file_id: str
    file_unique_id: str
    predictions: tuple[tuple[str, float], ...]
    unknown: bool | None
    model_version: str | None
    suggestions: Mapping[str, int]
    suggesters: Mapping[str, tuple[int, ...]]
    none_votes: int
    right_votes: int
    wrong_votes: int
    queued_at: float
    reason: Reason
    priority: tuple[float, float]
    status: Literal["pending", "accepted", "discarded"] = "pending"
    answers: tuple[Answer, ...] = field(default=(), repr=False)

    def suggester(self, label: str) -> int | None:
        """The first user who suggested ``label`` (any letter case / Unicode form), or None.

        This is the ``suggested_by`` of an accepted image.
        """
        key = label_key(label)
        for suggested, users in self.suggesters.items():
            if label_key(suggested) == key and users:
                return users[0]
        return None


# ---------------------------------------------------------------------------------------- helpers


def _check_id(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


def _clean_predictions(predictions: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    pairs = [(str(label), float(p)) for label, p in predictions]
    if not pairs:
        raise ValueError("an answer needs at least one (label, probability) prediction")
    margin_uncertainty([p for _, p in pairs])  # raises ValueError for a probability outside [0, 1]
    pairs.sort(key=lambda pair: pair[1], reverse=True)
    return pairs[:MAX_PREDICTIONS]


_ANSWER_COLUMNS = (
    "answer_id, chat_id, chat_type, reply_message_id, sender_id, file_id, file_unique_id, predictions, "
    "is_unknown, model_version, uncertainty, auto_queued, created_at, verdict, verdict_label"
)


def _answer(row: Sequence) -> Answer:
    (aid, chat_id, chat_type, reply_id, sender, file_id, unique_id, preds, unknown, version, unc, auto, at, verdict, label) = row
    return Answer(
        answer_id=int(aid),
        chat_id=int(chat_id),
        chat_type=str(chat_type),
        reply_message_id=int(reply_id),
        sender_id=int(sender),
        file_id=str(file_id),
        file_unique_id=str(unique_id),
        predictions=tuple((str(lab), float(p)) for lab, p in json.loads(preds)),
        unknown=None if unknown is None else bool(unknown),
        model_version=version,
        uncertainty=float(unc),
        auto_queued=bool(auto),
        created_at=float(at),
        verdict=verdict,
        verdict_label=label,
    )


@dataclass
class _Votes:
    right: int = 0
    wrong: int = 0
    none: int = 0
    suggesters: dict[str, list[int]] = field(default_factory=dict)


def _votes(answers: Sequence[Answer]) -> _Votes:
    """Each user's latest verdict on the photo, counted once."""
    latest: dict[int, Answer] = {}
    for answer in answers:  # in answer_id order: later answers replace earlier ones
        if answer.verdict is not None:
            latest.pop(answer.sender_id, None)
            latest[answer.sender_id] = answer
    votes = _Votes()
    for user, answer in latest.items():
        if answer.agreed:
            votes.right += 1
        else:
            votes.wrong += 1
        if answer.verdict_label is not None:
            votes.suggesters.setdefault(answer.verdict_label, []).append(user)
        elif answer.verdict == "none" or (answer.verdict == "right" and answer.unknown):
            votes.none += 1
    return votes


# ---------------------------------------------------------------------------------------- the store


class ReviewStore:
    """Answers, feedback and the review queue of one store (tables in its ``catalog.sqlite``).

    Args:
        store: the store's :class:`~model_store.dataset.ImageStore` (opened: its catalog exists and
            has the current schema); accepted photos are added to it.
        settings: bounds and thresholds (:class:`ReviewSettings`).
        clock: the time in unix seconds (tests pass their own).

    Raises:
        sqlite3.Error: the catalog cannot be opened (locked for over 60 s, read-only, ...).
    """

    def __init__(
        self,
        store: ImageStore,
        settings: ReviewSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.path = store.catalog_path
        self.settings = settings if settings is not None else ReviewSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._last_expiry = -math.inf
        # One connection, used under self._lock by whichever thread calls: opening and closing one
        # per call costs 2-4 times as much (benchmarks/bench_review_store.py).
        self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process
        with self._transaction() as conn:
            self._maybe_expire(conn)

    def close(self) -> None:
        """Close the connection to the catalog (further calls raise ``sqlite3.ProgrammingError``)."""
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction under the store's lock: committed, or rolled back on error."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed (disk full, I/O error): the shared connection must
                # not stay inside a transaction, or every later call would fail.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _answers_of(self, conn: sqlite3.Connection, file_unique_id: str) -> list[Answer]:
        rows = conn.execute(
            f"SELECT {_ANSWER_COLUMNS} FROM review_answers WHERE file_unique_id = ? ORDER BY answer_id",
            (file_unique_id,),
        ).fetchall()
        return [_answer(row) for row in rows]

    def _refresh(self, conn: sqlite3.Connection, file_unique_id: str) -> int | None:
        """Make the photo's queue item match its answers; returns its pending item id, or None.

        A photo is queued while one of its answers was queued as uncertain or a user's latest
        verdict disagrees with the answer; its priority is recomputed from its latest answer and
        the votes. Items an admin resolved are left as they are.
        """
        row = conn.execute(
            "SELECT item_id, status FROM review_items WHERE file_unique_id = ?", (file_unique_id,)
        ).fetchone()
        if row is not None and row[1] != "pending":
            return None
        answers = self._answers_of(conn, file_unique_id)
        votes = _votes(answers)
        if not answers or not (votes.wrong or any(a.auto_queued for a in answers)):
            if row is not None:
                conn.execute("DELETE FROM review_items WHERE item_id = ?", (row[0],))
            return None
        latest = answers[-1]
        uncertainty, disagreement = priority(
            [p for _, p in latest.predictions], unknown=latest.unknown, wrong=votes.wrong, right=votes.right
        )
        reason: Reason = "feedback" if votes.wrong else "uncertain"
        if row is not None:
            conn.execute(
                "UPDATE review_items SET reason = ?, uncertainty = ?, disagreement = ? WHERE item_id = ?",
                (reason, uncertainty, disagreement, row[0]),
            )
            return int(row[0])
        cursor = conn.execute(
            "INSERT INTO review_items (file_unique_id, status, reason, uncertainty, disagreement, queued_at) "
            "VALUES (?, 'pending', ?, ?, ?, ?)",
            (file_unique_id, reason, uncertainty, disagreement, self._clock()),
        )
        item_id = int(cursor.lastrowid or 0)
        self._bound_queue(conn)
        still = conn.execute("SELECT 1 FROM review_items WHERE item_id = ?", (item_id,)).fetchone()
        return item_id if still else None

    def _bound_queue(self, conn: sqlite3.Connection) -> None:
        """Drop pending items beyond ``max_queue``: those nobody rated (queued as uncertain) first,
        then the lowest-priority, then the newest. A user's correction is not pushed out by a
        stream of photos the model is merely unsure of (a confident answer has the lowest
        uncertainty, so by priority alone every correction would go first)."""
        (pending,) = conn.execute("SELECT COUNT(*) FROM review_items WHERE status = 'pending'").fetchone()
        excess = int(pending) - self.settings.max_queue
        if excess > 0:
            dropped = conn.execute(
                "SELECT item_id FROM review_items WHERE status = 'pending' "
                "ORDER BY reason = 'feedback' ASC, uncertainty ASC, disagreement ASC, queued_at DESC, item_id DESC LIMIT ?",
                (excess,),
            ).fetchall()
            conn.executemany("DELETE FROM review_items WHERE item_id = ?", dropped)
            logger.info("review queue full (%d): dropped %d item(s) of lowest priority", self.settings.max_queue, excess)

    def _bound_answers(self, conn: sqlite3.Connection) -> None:
        """Delete the oldest answers beyond ``max_answers`` (and update their photos' items)."""
        (count,) = conn.execute("SELECT COUNT(*) FROM review_answers").fetchone()
        excess = int(count) - self.settings.max_answers
        if excess > 0:
            rows = conn.execute(
                "SELECT answer_id, file_unique_id FROM review_answers ORDER BY answer_id LIMIT ?", (excess,)
            ).fetchall()
            conn.executemany("DELETE FROM review_answers WHERE answer_id = ?", [(r[0],) for r in rows])
            for unique_id in {r[1] for r in rows}:
                self._refresh(conn, unique_id)

    def _expire(self, conn: sqlite3.Connection, now: float) -> int:
        cutoff = now - self.settings.retention_days * _DAY
        rows = conn.execute(
            "SELECT answer_id, file_unique_id FROM review_answers WHERE created_at < ?", (cutoff,)
        ).fetchall()
        conn.execute("DELETE FROM review_answers WHERE created_at < ?", (cutoff,))
        for unique_id in {r[1] for r in rows}:
            self._refresh(conn, unique_id)
        conn.execute("DELETE FROM review_items WHERE status != 'pending' AND resolved_at < ?", (cutoff,))
        self._last_expiry = now
        if rows:
            logger.info("review store: %d answer(s) older than %g days deleted", len(rows), self.settings.retention_days)
        return len(rows)

    def _maybe_expire(self, conn: sqlite3.Connection) -> None:
        now = self._clock()
        if now - self._last_expiry >= _EXPIRE_EVERY:
            self._expire(conn, now)

    # ------------------------------------------------------------------ answers and feedback

    def record_answer(
        self,
        *,
        chat_id: int,
        chat_type: str,
        reply_message_id: int,
        sender_id: int,
        file_id: str,
        file_unique_id: str,
        predictions: Sequence[tuple[str, float]],
        unknown: bool | None,
        model_version: str | None,
        auto_queue: bool,
    ) -> int:
        """Record one classified photo as answered.

        Args:
            chat_id, chat_type, reply_message_id: the chat and the bot's reply carrying the feedback
                buttons (``chat_type``: Telegram's ``Chat.type``).
            sender_id: who sent the photo (the only user whose feedback is accepted).
            file_id, file_unique_id: Telegram's ids of the photo (never its bytes).
            predictions: the model's top-k ``(label, probability)`` pairs (probabilities in [0, 1]);
                the best :data:`MAX_PREDICTIONS` are kept, best first.
            unknown: the open-set flag of the answer (None: no open-set check).
            model_version: the serving version's name.
            auto_queue: active learning: an uncertain answer (margin below
                ``settings.uncertain_margin``) enters the review queue at once. An unknown answer
                (``unknown`` True) always does.

        Returns:
            The ``answer_id`` (an int > 0, never reused), for the feedback buttons.

        Raises:
            ValueError: no prediction, a probability outside [0, 1], or an empty / over-long id.
            sqlite3.Error: the catalog cannot be written (nothing is recorded).
        """
        pairs = _clean_predictions(predictions)
        _check_id("file_id", file_id)
        _check_id("file_unique_id", file_unique_id)
        _check_id("chat_type", chat_type)
        uncertainty = margin_uncertainty([p for _, p in pairs], unknown=unknown)
        uncertain = (1.0 - uncertainty) < self.settings.uncertain_margin or bool(unknown)
        with self._transaction() as conn:
            self._maybe_expire(conn)
            cursor = conn.execute(
                "INSERT INTO review_answers (chat_id, chat_type, reply_message_id, sender_id, file_id, "
                "file_unique_id, predictions, is_unknown, model_version, uncertainty, auto_queued, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    int(chat_id),
                    chat_type,
                    int(reply_message_id),
                    int(sender_id),
                    file_id,
                    file_unique_id,
                    json.dumps(pairs, ensure_ascii=False),
                    None if unknown is None else int(bool(unknown)),
                    model_version,
                    uncertainty,
                    int((bool(auto_queue) and uncertain) or bool(unknown)),
                    self._clock(),
                ),
            )
            answer_id = int(cursor.lastrowid or 0)
            self._refresh(conn, file_unique_id)
            self._bound_answers(conn)
        return answer_id

    def get_answer(self, answer_id: int) -> Answer | None:
        """The answer ``answer_id`` with its feedback, or None if it is not kept (any more)."""
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_ANSWER_COLUMNS} FROM review_answers WHERE answer_id = ?", (int(answer_id),)
            ).fetchone()
        return None if row is None else _answer(row)

    def set_feedback(
        self, *, answer_id: int, user_id: int, verdict: Verdict, label: str | None = None
    ) -> FeedbackResult:
        """Record the sender's feedback on an answer; a second call replaces the first.

        Args:
            answer_id: from :meth:`record_answer`.
            user_id: who tapped; must be the photo's sender.
            verdict: "right" (``label`` None or the top-1 label), "wrong" (``label`` the right one,
                or None when not given; naming the top-1 label makes it "right"), or "none" (none of
                the labels; ``label`` must be None).
            label: see ``verdict``; normalised (:func:`model_store.labels.normalize_label`). It is not
                checked against the model's labels (the bot offers only those).

        Returns:
            A :class:`FeedbackResult` (with the photo's pending ``item_id`` if it is queued).

        Raises:
            UnknownAnswerError: no such answer (expired, withdrawn, evicted).
            NotYourPhotoError: ``user_id`` is not the photo's sender; nothing is recorded.
            LabelError: ``label`` is not a valid label.
            ValueError: an unknown verdict, or a label with "none" / another label with "right".
            sqlite3.Error: the catalog cannot be written (nothing is recorded).
        """
        if verdict not in get_args(Verdict):
            raise ValueError(f"verdict must be one of {get_args(Verdict)}, got {verdict!r}")
        given = normalize_label(label) if label is not None else None
        if verdict == "none" and given is not None:
            raise ValueError('the verdict "none" takes no label')
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_ANSWER_COLUMNS} FROM review_answers WHERE answer_id = ?", (int(answer_id),)
            ).fetchone()
            cutoff = self._clock() - self.settings.retention_days * _DAY
            if row is None or _answer(row).created_at < cutoff:
                raise UnknownAnswerError(answer_id=int(answer_id))
            answer = _answer(row)
            if int(user_id) != answer.sender_id:
                raise NotYourPhotoError(answer_id=answer.answer_id, user_id=int(user_id))
            top1 = answer.predictions[0][0]
            stored_verdict: Verdict = verdict
            stored_label = given
            if verdict == "right":
                if given is not None and (answer.unknown or label_key(given) != label_key(top1)):
                    raise ValueError(f'the verdict "right" names the answer\'s label {top1!r}, not {given!r}')
                stored_label = None if answer.unknown else top1
            elif verdict == "wrong" and given is not None and not answer.unknown and label_key(given) == label_key(top1):
                stored_verdict, stored_label = "right", top1
            changed = (answer.verdict, answer.verdict_label) != (stored_verdict, stored_label)
            if changed:
                conn.execute(
                    "UPDATE review_answers SET verdict = ?, verdict_label = ?, verdict_at = ? WHERE answer_id = ?",
                    (stored_verdict, stored_label, self._clock(), answer.answer_id),
                )
            item_id = self._refresh(conn, answer.file_unique_id)
        return FeedbackResult(answer.answer_id, stored_verdict, stored_label, answer.verdict, changed, item_id)

    # ------------------------------------------------------------------ the queue

    def _item(self, conn: sqlite3.Connection, row: Sequence) -> ReviewItem | None:
        item_id, unique_id, status, reason, uncertainty, disagreement, queued_at = row
        answers = self._answers_of(conn, unique_id)
        if not answers:
            return None
        latest = answers[-1]
        votes = _votes(answers)
        order = sorted(votes.suggesters.items(), key=lambda kv: (-len(kv[1]), label_key(kv[0])))
        return ReviewItem(
            item_id=int(item_id),
            answer_id=latest.answer_id,
            chat_id=latest.chat_id,
            sender_id=latest.sender_id,
            file_id=latest.file_id,
            file_unique_id=latest.file_unique_id,
            predictions=latest.predictions,
            unknown=latest.unknown,
            model_version=latest.model_version,
            suggestions={label: len(users) for label, users in order},
            suggesters={label: tuple(users) for label, users in order},
            none_votes=votes.none,
            right_votes=votes.right,
            wrong_votes=votes.wrong,
            queued_at=float(queued_at),
            reason=reason,
            priority=(float(uncertainty), float(disagreement)),
            status=status,
            answers=tuple(answers),
        )

    _ITEM_COLUMNS = "item_id, file_unique_id, status, reason, uncertainty, disagreement, queued_at"

    def next_item(self, *, skip: Collection[int] = ()) -> ReviewItem | None:
        """The pending item that would teach most, or None when the queue is empty.

        Order: :func:`model_store.active_learning.priority` (uncertainty, then disagreement),
        highest first; then the oldest first.

        Args:
            skip: item ids not to return (those an admin already passed over in this session).
        """
        skipped = {int(i) for i in skip}
        with self._transaction() as conn:
            self._maybe_expire(conn)
            rows = conn.execute(
                f"SELECT {self._ITEM_COLUMNS} FROM review_items WHERE status = 'pending' "
                "ORDER BY uncertainty DESC, disagreement DESC, queued_at ASC, item_id ASC"
            )
            for row in rows:
                if row[0] not in skipped:
                    item = self._item(conn, row)
                    if item is not None:
                        return item
        return None

    def get_item(self, item_id: int) -> ReviewItem | None:
        """An item by id (pending or already resolved: see :attr:`ReviewItem.status`), or None if gone."""
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {self._ITEM_COLUMNS} FROM review_items WHERE item_id = ?", (int(item_id),)
            ).fetchone()
            return None if row is None else self._item(conn, row)

    def pending_items(self) -> list[ReviewItem]:
        """Every pending item in queue order (at most ``settings.max_queue``)."""
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {self._ITEM_COLUMNS} FROM review_items WHERE status = 'pending' "
                "ORDER BY uncertainty DESC, disagreement DESC, queued_at ASC, item_id ASC"
            ).fetchall()
            items = [self._item(conn, row) for row in rows]
        return [item for item in items if item is not None]

    def pending_count(self) -> int:
        """How many items wait in the queue."""
        with self._transaction() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM review_items WHERE status = 'pending'").fetchone()
        return int(count)

    def resolve(self, item_id: int, *, action: Resolution, by: int, label: str | None = None) -> None:
        """Record an admin's decision on a pending item; it leaves the queue.

        Args:
            item_id: the item.
            action: "accepted" (the photo was added to the store under ``label``) or "discarded".
            by: the admin's user id.
            label: the label it was added under; required for "accepted".

        Raises:
            ReviewItemGoneError: the item is not pending (another admin resolved it:
                ``status``; or it expired, was withdrawn or evicted: ``status`` None).
            ValueError: an unknown action, or "accepted" without a label.
            LabelError: ``label`` is not a valid label.
        """
        if action not in get_args(Resolution):
            raise ValueError(f"action must be one of {get_args(Resolution)}, got {action!r}")
        if action == "accepted" and label is None:
            raise ValueError("an accepted item needs the label it was added under")
        stored = normalize_label(label) if label is not None else None
        with self._transaction() as conn:
            row = conn.execute("SELECT status FROM review_items WHERE item_id = ?", (int(item_id),)).fetchone()
            if row is None or row[0] != "pending":
                raise ReviewItemGoneError(item_id=int(item_id), status=None if row is None else row[0])
            conn.execute(
                "UPDATE review_items SET status = ?, resolved_at = ?, resolved_by = ?, resolved_label = ? "
                "WHERE item_id = ?",
                (action, self._clock(), int(by), stored, int(item_id)),
            )
        logger.info("review item %d %s by %d (label %r)", item_id, action, by, stored)

    def accept(self, item_id: int, data: bytes, *, label: str, by: int, chat_id: int | None = None) -> AddResult:
        """Add a pending item's photo to the store under ``label``, then resolve it as accepted.

        The photo is added exactly like ``/add`` (:meth:`~model_store.dataset.ImageStore.add`: the
        same validation, dedupe and atomic write), with ``added_by=by`` and ``suggested_by`` the
        first user who suggested ``label`` (:meth:`ReviewItem.suggester`; None if nobody did).

        Args:
            item_id: the pending item.
            data: the photo's bytes, downloaded by the bot from the item's ``file_id``.
            label: the label to store it under (any letter case of an existing one).
            by: the accepting admin's user id.
            chat_id: the chat for the catalog; default the chat the photo was sent in.

        Returns:
            The store's :class:`~model_store.dataset.AddResult`.

        Raises:
            ReviewItemGoneError: the item is not pending (checked before adding). If another admin
                resolves it while the photo is being added, the photo stays added and their
                decision stands (logged).
            LabelError, ImageDecodeError, DuplicateImageError, StoreFullError, OSError: from
                :meth:`~model_store.dataset.ImageStore.add`; the item stays pending.
        """
        item = self.get_item(item_id)
        if item is None or item.status != "pending":
            raise ReviewItemGoneError(item_id=int(item_id), status=None if item is None else item.status)
        result = self.store.add(
            data,
            label,
            added_by=by,
            chat_id=item.chat_id if chat_id is None else chat_id,
            suggested_by=item.suggester(label),
        )
        try:
            self.resolve(item_id, action="accepted", by=by, label=result.label)
        except ReviewItemGoneError as exc:
            logger.warning("review item %d was resolved meanwhile (%s); its photo was added anyway", item_id, exc)
        return result

    # ------------------------------------------------------------------ privacy, bounds, accuracy

    def withdraw(self, user_id: int) -> int:
        """Delete everything kept about one user's photos: answers, feedback, queued photos.

        A photo several users sent stays queued for the others' answers (without this user's
        verdict). Images already accepted into the store stay (an admin's training data).

        Returns:
            The number of answers deleted (0 when nothing was kept).
        """
        with self._transaction() as conn:
            unique_ids = {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT file_unique_id FROM review_answers WHERE sender_id = ?", (int(user_id),)
                )
            }
            deleted = conn.execute("DELETE FROM review_answers WHERE sender_id = ?", (int(user_id),)).rowcount
            for unique_id in unique_ids:
                left = conn.execute(
                    "SELECT 1 FROM review_answers WHERE file_unique_id = ? LIMIT 1", (unique_id,)
                ).fetchone()
                if left is None:  # the decision on it too: nothing about the photo is kept
                    conn.execute("DELETE FROM review_items WHERE file_unique_id = ?", (unique_id,))
                else:
                    self._refresh(conn, unique_id)
        logger.info("withdrew %d answer(s) of one user", deleted)
        return int(deleted)

    def expire(self, now: float | None = None) -> int:
        """Delete answers and feedback older than ``settings.retention_days`` (and decisions).

        Also run by the other methods at most once a minute; the bot need not call it.

        Args:
            now: unix seconds (default: the clock).

        Returns:
            The number of answers deleted.
        """
        with self._transaction() as conn:
            return self._expire(conn, self._clock() if now is None else now)

    def answer_count(self) -> int:
        """How many answers are kept."""
        with self._transaction() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM review_answers").fetchone()
        return int(count)

    def real_world_accuracy(self, *, since: float, model_version: str | None = None) -> dict[str, tuple[int, int]]:
        """Accuracy as users reported it: per answered label, ``(right, rated)``.

        Counts the answers given at or after ``since`` (unix seconds; the bot passes the serving
        version's training time) by ``model_version`` (None: by any model; after a rollback the
        newer model's answers are not the older one's) that their sender rated, grouped by the model's top-1 label
        (so ``right / rated`` is the precision users observed for that label). Answers flagged
        unknown are not counted here (:meth:`unknown_feedback`). Answers expire after
        ``settings.retention_days``, so at most that window is counted.

        Returns:
            ``{label: (right, rated)}`` with ``0 <= right <= rated``, rated >= 1; labels sorted.
        """
        counts: dict[str, list[int]] = {}
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT predictions, verdict FROM review_answers "
                "WHERE verdict IS NOT NULL AND created_at >= ? AND (is_unknown IS NULL OR is_unknown = 0) "
                "AND (? IS NULL OR model_version = ?)",
                (float(since), model_version, model_version),
            ).fetchall()
        for predictions, verdict in rows:
            label = str(json.loads(predictions)[0][0])
            entry = counts.setdefault(label, [0, 0])
            entry[0] += verdict == "right"
            entry[1] += 1
        return {label: (right, rated) for label, (right, rated) in sorted(counts.items())}

    def unknown_feedback(self, *, since: float, model_version: str | None = None) -> tuple[int, int]:
        """For answers flagged unknown since ``since`` (by ``model_version``, None: any):
        ``(agreed, rated)`` (agreed: "right" or "none")."""
        with self._transaction() as conn:
            agreed, rated = conn.execute(
                "SELECT COALESCE(SUM(verdict IN ('right', 'none')), 0), COUNT(*) FROM review_answers "
                "WHERE verdict IS NOT NULL AND created_at >= ? AND is_unknown = 1 AND (? IS NULL OR model_version = ?)",
                (float(since), model_version, model_version),
            ).fetchone()
        return int(agreed), int(rated)
