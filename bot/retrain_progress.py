"""How ``python -m bot retrain`` shows its progress where it goes.

* On a terminal: a live ``tqdm`` bar per stage (:class:`BarProgress`), redrawn in place.
* Anywhere else (systemd, cron, CI, a file): a few plain lines, one when a stage starts and one
  each time it passes another 10 % (:class:`LineProgress`): at most 11 lines per stage, whatever the
  number of photos or epochs, and no carriage returns in the log.
* With ``--json``: one ``ProgressEvent`` line per step on stdout (``bot.__main__.cmd_retrain``; the
  bot's training runner reads them).

:func:`progress_for` picks the first two by whether the stream is a terminal. Both are the
``progress(stage, done, total)`` callback of ``model_store.pipeline.retrain``; stages arrive in the
order "bottlenecks", "training", "evaluating", "saving" (a stage may end early: the training stage
stops at early stopping, before its ``total`` epochs).
"""

from __future__ import annotations

import io
import os
from typing import Any, TextIO

__all__ = ["LINE_STEP_PERCENT", "BarProgress", "LineProgress", "progress_for"]

#: a plain progress line each time a stage passes another multiple of this many percent
LINE_STEP_PERCENT = 10

#: what a stage counts (tqdm's unit)
_UNITS = {"bottlenecks": "img", "training": "epoch"}


class LineProgress:
    """Plain progress lines for a log: ``bottlenecks: 160/1600 (10%)``.

    A line is written the first time a stage reports (with a known ``total``) and each time its
    percentage reaches a new multiple of :data:`LINE_STEP_PERCENT`; at most
    ``100 / LINE_STEP_PERCENT + 1`` lines per stage. Calls with ``total <= 0`` (nothing to do,
    e.g. every bottleneck already cached) write nothing.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._stage: str | None = None
        self._last_step = -1

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total <= 0:
            return
        if stage != self._stage:
            self._stage, self._last_step = stage, -1
        done = max(0, min(done, total))
        percent = 100 * done // total
        step = percent // LINE_STEP_PERCENT
        if step > self._last_step:
            self._last_step = step
            print(f"{stage}: {done}/{total} ({percent}%)", file=self._stream, flush=True)

    def close(self) -> None:
        """Nothing to finish (lines are complete when written)."""


class BarProgress:
    """A live ``tqdm`` bar per stage on a terminal; a stage's bar is closed when it reaches its
    total or the next stage begins."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._stage: str | None = None
        self._bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total <= 0:
            return
        if stage != self._stage:
            self.close()
            from tqdm import tqdm

            self._stage = stage
            self._bar = tqdm(
                total=total,
                desc=stage,
                unit=_UNITS.get(stage, "step"),
                file=self._stream,
                ncols=_fallback_width(self._stream),
            )
        if self._bar is None:  # this stage's bar already finished
            return
        self._bar.total = total
        self._bar.n = min(done, total)
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        """Close the open bar, if any (leaves it on the screen at its last value)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fallback_width(stream: TextIO) -> int | None:
    """None (tqdm follows the terminal's width), or 80 columns for a terminal that reports a width
    of 0 (a pseudo-terminal nobody sized, e.g. ``script`` or ``docker run -t`` without a terminal
    behind it), on which tqdm would draw empty bars."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return None
    return None if columns > 0 else 80


def progress_for(stream: TextIO) -> BarProgress | LineProgress:
    """The progress callback that fits ``stream``: :class:`BarProgress` when it is a terminal
    (``stream.isatty()``), else :class:`LineProgress`. A stream without ``isatty`` (or whose
    ``isatty`` raises ``ValueError``/``OSError``, e.g. closed) counts as not a terminal."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        tty = False
    return BarProgress(stream) if tty else LineProgress(stream)
