"""Coalesced teaching acknowledgements: a burst of ``/add`` photos is answered by ONE message.

An admin teaching in bursts (several ``/add`` photos in flight, or an album) used to get one
message per photo; at Telegram's ~1 message/s per chat that flooded the chat (issue 12). Now the
photos of a burst share a :class:`TeachingAck`: the first stored photo is answered (quoting it),
and that message is edited as the others land, at most every ``limits.teaching_edit_seconds``
(the final state always arrives)::

    Teaching: 14 photos.
    hat: 12 added, 1 duplicate (57 images in total).
    1 could not be added:
    • #7: That file is too large (25.0 MB): ...

A photo joins the admin's open acknowledgement in that chat while any of its photos is still being
stored, or within ``limits.teaching_burst_seconds`` after the last of a burst of two or more;
otherwise it starts a new one. A lone photo's acknowledgement reads as before ("Added to hat
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
        head = f"Teaching: {self.photos} photos"
        head += f", {self.pending} still being stored…" if self.pending else "."
        lines = [head]
        for label, tally in self.tallies.items():
            parts = [f"{tally.added} added"]
            if tally.duplicates:
                parts.append(f"{tally.duplicates} duplicate{'s' if tally.duplicates != 1 else ''}")
            lines.append(f"{label}: {', '.join(parts)} ({images_text(totals.get(label, 0))} in total).")
        if self.problems:
            lines.append(f"{images_text(len(self.problems)).capitalize().replace('image', 'photo')} could not be added:")
            shown = sorted(self.problems)[:MAX_LISTED_PROBLEMS]
            lines += [f"• #{n}: {text}" for n, text in shown]
            if len(self.problems) > len(shown):
                lines.append(f"… and {len(self.problems) - len(shown)} more.")
        return cut_text("\n".join(lines))

    # ------------------------------------------------------------------ sending

    def kick(self, application: Any, count_images: Any) -> None:
        """Make sure the current state will be sent (starts the sender task if none runs)."""
        self.changed.set()
        if self.task is None:
            self.task = application.create_task(self._send_loop(count_images), name="teaching-ack")

    async def _send_loop(self, count_images: Any) -> None:
        try:
            while self.changed.is_set():
                self.changed.clear()
                if self.message is not None:  # edits: at most every edit_seconds
                    delay = self.last_sent + self.edit_seconds - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                        self.changed.clear()  # what came meanwhile is in this edit
                totals = await asyncio.to_thread(_totals, count_images, list(self.tallies))
                text = self.render(totals)
                if text != self.sent_text:
                    await self._send(text)
        finally:
            self.task = None

    async def _send(self, text: str) -> None:
        try:
            if self.message is None:
                self.message = await reply(self.anchor, text)
            else:
                await self.message.edit_text(text)
        except ReplyDropped:  # logged once by the limiter; the next change tries again
            self.failures += 1
            return
        except BadRequest as exc:
            if "not modified" not in exc.message.lower():  # e.g. the message was deleted: a new one
                log.info("teaching acknowledgement not edited (%s); sending a new one", exc.message)
                self.message, self.failures = None, self.failures + 1
                if self.failures < _MAX_FAILURES:
                    self.changed.set()
                return
        except TelegramError as exc:  # network trouble: try again a little later
            self.failures += 1
            log.info("teaching acknowledgement not sent (%s: %s)", type(exc).__name__, exc)
            if self.failures < _MAX_FAILURES:
                self.changed.set()
                await asyncio.sleep(self.edit_seconds)
            return
        self.sent_text, self.last_sent, self.failures = text, time.monotonic(), 0


def _totals(count_images: Any, labels: list[str]) -> dict[str, int]:
    return {label: count_images(label) for label in labels}


def join(acks: dict[tuple[int, int], TeachingAck], anchor: Message, user_id: int, *,
         edit_seconds: float, burst_seconds: float) -> TeachingAck:
    """The admin's open acknowledgement in the anchor's chat, or a new one quoting ``anchor``.

    Args:
        acks: ``BotData.teaching_acks`` ((chat id, admin's user id) -> acknowledgement).
        anchor: the photo (or command) message a new acknowledgement replies to.
        user_id: the admin.
        edit_seconds: ``limits.teaching_edit_seconds``.
        burst_seconds: ``limits.teaching_burst_seconds``.
    """
    now = time.monotonic()
    key = (anchor.chat_id, user_id)
    ack = acks.get(key)
    if ack is not None and ack.open_for_more(now):
        return ack
    if len(acks) >= _MAX_OPEN:
        for old in [k for k, a in acks.items() if a.pending == 0 and a.task is None]:
            del acks[old]
    ack = acks[key] = TeachingAck(anchor, edit_seconds, burst_seconds)
    return ack
