"""Coalesced teaching acknowledgements: a burst of ``/add`` photos is answered by ONE message.

An admin teaching in bursts (several ``/add`` photos in flight, or an album) used to get one
message per photo; at Telegram's ~1 message/s per chat that flooded the chat (issue 12). Now the
photos of a burst share a :class:`TeachingAck`: the first stored photo is answered (quoting it),
and that message is edited as the others land, at most every ``limits.teaching_edit_seconds``
(the final state always arrives)::

    Teaching: 14 photos, 2 still being stored…
    hat: 11 added, 1 duplicate (56 images in total).

and, once every photo is in::

    Added 12 images to hat (57 images in total).
    1 image was already there.
    1 photo could not be added:
    • #7: That file is too large (25.0 MB): ...

(one line per label, "hat: 12 added, 1 duplicate (57 images in total).", when several labels were taught).

A single ``/add`` photo joins the admin's open acknowledgement in that chat while any of its photos
is still being stored, or within ``limits.teaching_burst_seconds`` after the last of a burst of
two or more; otherwise it starts a new one. An album is a burst of its own (one acknowledgement,
which takes the album's stragglers only while it is still being stored). A lone photo's acknowledgement reads as before ("Added to hat
(57 images)."), so an admin teaching one photo at a time gets one answer per photo.

Sending and editing go through the rate limiter like every message (:mod:`bot.ratelimit`); a
failure to send is logged in one line, never raised into a handler: the photos are stored
whatever happens to their acknowledgement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from telegram import Message
from telegram.error import BadRequest, TelegramError

from bot.telegram_io import ReplyDropped, cut_text, images_text, reply

__all__ = ["TeachingAck", "join"]

log = logging.getLogger(__name__)

#: most problems listed one by one in an acknowledgement (the rest are counted)
MAX_LISTED_PROBLEMS = 15
#: consecutive failures to send an acknowledgement before it is given up
_MAX_FAILURES = 3
_MAX_OPEN = 256  # acknowledgements remembered at once (idle ones are forgotten first)


@dataclass
class _Tally:
    added: int = 0
    duplicates: int = 0


@dataclass
class TeachingAck:
    """One acknowledgement message: the photos of one admin's burst in one chat, and their outcomes.

    Created by :func:`join`; each photo is reserved with :meth:`reserve` and settled with
    :meth:`stored` or :meth:`failed`. ``count_images(label) -> int`` (blocking; run in a thread)
    gives the "N images in total" of each label.
    """

    anchor: Message
    edit_seconds: float
    burst_seconds: float
    photos: int = 0
    pending: int = 0
    tallies: dict[str, _Tally] = field(default_factory=dict)
    problems: list[tuple[int, str]] = field(default_factory=list)
    message: Message | None = None
    sent_text: str | None = None
    last_sent: float = float("-inf")
    last_activity: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    failures: int = 0
    version: int = 0  # bumped by every settled photo
    sent_version: int = 0  # the version the last send attempt showed
    waiters: list[tuple[float, asyncio.Future[None]]] = field(default_factory=list)

    # ------------------------------------------------------------------ outcomes

    def open_for_more(self, now: float) -> bool:
        """Whether a new photo joins this acknowledgement (see the module docstring)."""
        if self.failures >= _MAX_FAILURES:
            return False
        return self.pending > 0 or (self.photos >= 2 and now - self.last_activity < self.burst_seconds)

    def reserve(self, n: int) -> list[int]:
        """Reserve ``n`` photos; returns their numbers in this acknowledgement (1-based, "#7")."""
        first = self.photos + 1
        self.photos += n
        self.pending += n
        self.last_activity = time.monotonic()
        return list(range(first, first + n))

    def stored(self, label: str, created: bool) -> None:
        """One reserved photo was stored under ``label`` (``created`` False: it was already there)."""
        tally = self.tallies.setdefault(label, _Tally())
        if created:
            tally.added += 1
        else:
            tally.duplicates += 1
        self._settled()

    def failed(self, number: int, text: str) -> None:
        """One reserved photo (``number``) could not be added; ``text`` says why (for the admin)."""
        self.problems.append((number, text))
        self._settled()

    def _settled(self) -> None:
        self.version += 1
        self.pending -= 1
        self.last_activity = time.monotonic()
        self.changed.set()

    # ------------------------------------------------------------------ text

    def render(self, totals: dict[str, int]) -> str:
        """The acknowledgement's text (``totals``: images stored per label, for "N in total")."""
        if self.photos == 1 and self.pending == 0:  # a lone photo: the answer it always had
            if self.problems:
                return cut_text(self.problems[0][1])
            (label, tally), = self.tallies.items()
            if tally.added:
                return f"Added to {label} ({images_text(totals.get(label, 0))})."
            return f"That image is already in {label} ({images_text(totals.get(label, 0))})."
        if not self.pending and not self.tallies and len({text for _, text in self.problems}) == 1:
            return cut_text(self.problems[0][1])  # nothing stored, for one reason (a bad label, a full disk)
        lines: list[str]
        if not self.pending and len(self.tallies) == 1:  # one label, all done: the summary it always had
            (label, tally), = self.tallies.items()
            lines = [f"Added {images_text(tally.added)} to {label} ({images_text(totals.get(label, 0))} in total)."]
            if tally.duplicates:
                were = "was" if tally.duplicates == 1 else "were"
                lines.append(f"{images_text(tally.duplicates).capitalize()} {were} already there.")
        else:
            head = f"Teaching: {self.photos} photos"
            lines = [head + (f", {self.pending} still being stored…" if self.pending else ".")]
            for label, tally in self.tallies.items():
                parts = [f"{tally.added} added"]
                if tally.duplicates:
                    parts.append(f"{tally.duplicates} duplicate{'s' if tally.duplicates != 1 else ''}")
                lines.append(f"{label}: {', '.join(parts)} ({images_text(totals.get(label, 0))} in total).")
        if self.problems:
            lines.append(f"{images_text(len(self.problems)).capitalize()} could not be added:")
            by_text: dict[str, list[int]] = {}
            for n, text in sorted(self.problems):
                by_text.setdefault(text, []).append(n)
            for text, numbers in list(by_text.items())[:MAX_LISTED_PROBLEMS]:
                shown = ", ".join(f"#{n}" for n in numbers[:5]) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
                lines.append(f"• {shown}: {text}")
            if len(by_text) > MAX_LISTED_PROBLEMS:
                lines.append(f"… and {len(by_text) - MAX_LISTED_PROBLEMS} other reasons.")
        return cut_text("\n".join(lines))

    # ------------------------------------------------------------------ sending

    async def flush(self, application: Any, count_images: Any) -> None:
        """Have the current state sent (by the sender task, started if none runs) and wait until it was.

        "Sent" means shown to the admin or given up: an edit that failed and is tried again is
        waited for too, so a handler (which ``Application.stop`` waits for) never finishes before
        its photo's final acknowledgement, even when PTB does not await the task (one started
        during a stop). The wait is at most ``edit_seconds`` (plus that again per failed try, at
        most ``_MAX_FAILURES``) plus the chat's turn in the rate limiter; sending problems are
        logged by the task, never raised here.
        """
        self.changed.set()
        if self.task is None:
            self.task = application.create_task(self._send_loop(count_images), name="teaching-ack")
        if self.sent_version >= self.version:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((self.version, future))
        await future

    def _release(self, version: float) -> None:
        self.sent_version = max(self.sent_version, int(min(version, self.version)))
        waiting, self.waiters = self.waiters, []
        for wanted, future in waiting:
            if wanted <= version:
                if not future.done():
                    future.set_result(None)
            else:
                self.waiters.append((wanted, future))

    async def _send_loop(self, count_images: Any) -> None:
        try:
            while self.changed.is_set():
                self.changed.clear()
                if self.message is not None:  # edits: at most every edit_seconds
                    delay = self.last_sent + self.edit_seconds - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                        self.changed.clear()  # what came meanwhile is in this edit
                version = self.version
                totals = await asyncio.to_thread(_totals, count_images, list(self.tallies))
                text = self.render(totals)
                if text != self.sent_text and not await self._send(text):
                    continue  # sent again shortly: its waiters wait for that (a stop waits for them)
                self._release(version)
        finally:
            self.task = None
            self._release(float("inf"))

    async def _send(self, text: str) -> bool:
        """Send or edit; False when it failed and is tried again (``changed`` is set), True otherwise."""
        try:
            if self.message is None:
                self.message = await reply(self.anchor, text)
            else:
                await self.message.edit_text(text)
        except ReplyDropped:  # logged once by the limiter; the next change tries again
            self.failures += 1
            return True
        except BadRequest as exc:
            if "not modified" not in exc.message.lower():  # e.g. the message was deleted: a new one
                log.info("teaching acknowledgement not edited (%s); sending a new one", exc.message)
                self.message, self.failures = None, self.failures + 1
                if self.failures < _MAX_FAILURES:
                    self.changed.set()
                    return False
                return True
        except TelegramError as exc:  # network trouble: try again a little later
            self.failures += 1
            log.info("teaching acknowledgement not sent (%s: %s)", type(exc).__name__, exc)
            if self.failures < _MAX_FAILURES:
                self.changed.set()
                await asyncio.sleep(self.edit_seconds)
                return False
            return True
        self.sent_text, self.last_sent, self.failures = text, time.monotonic(), 0
        return True


def _totals(count_images: Any, labels: list[str]) -> dict[str, int]:
    return {label: count_images(label) for label in labels}


def join(acks: dict[tuple[int, int, str], TeachingAck], anchor: Message, user_id: int, *,
         album: str | None, edit_seconds: float, burst_seconds: float) -> TeachingAck:
    """The admin's open acknowledgement in the anchor's chat, or a new one quoting ``anchor``.

    Args:
        acks: ``BotData.teaching_acks`` ((chat id, admin's user id, album id or "") -> acknowledgement).
        anchor: the photo (or command) message a new acknowledgement replies to.
        user_id: the admin.
        album: the album's ``media_group_id`` (an album is a burst of its own: its acknowledgement
            takes only its own stragglers, while it is still being stored), None for single photos.
        edit_seconds: ``limits.teaching_edit_seconds``.
        burst_seconds: ``limits.teaching_burst_seconds`` (single photos only).
    """
    now = time.monotonic()
    key = (anchor.chat_id, user_id, album or "")
    ack = acks.get(key)
    if ack is not None and ack.open_for_more(now):
        return ack
    if len(acks) >= _MAX_OPEN:
        for old in [k for k, a in acks.items() if a.pending == 0 and a.task is None]:
            del acks[old]
    ack = acks[key] = TeachingAck(anchor, edit_seconds, burst_seconds if album is None else 0.0)
    return ack
