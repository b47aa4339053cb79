"""The training contract: one report type, its status and trigger, and the JSON-lines events.

One retraining produces one :class:`RetrainReport`, whoever runs it: :func:`model_store.pipeline.retrain`
returns it, ``python -m bot retrain --json`` prints it as the last line of its output
(:class:`ResultEvent`), and the bot's training runner reads that line back into the same type,
adding who started the run (:class:`TrainingTrigger`) and when.

The JSON-lines protocol (``python -m bot retrain --json``, one object per line on stdout)::

    {"event": "import", "added": 8, "duplicates": 0, "skipped": [{"file": "x.txt", "reason": "..."}]}
    {"event": "progress", "stage": "bottlenecks", "done": 10, "total": 80}
    {"event": "result", "status": "promoted", "message": "...", "version": "...", "metrics": {...},
     "confusion_png": "/path/confusion_matrix.png", "excluded_labels": [], "skipped_images": []}

Both sides use the pydantic models below: the CLI writes :meth:`Event.to_line`, the bot reads
:func:`parse_event`. The wire format is flat (the result's fields sit beside ``"event"``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

__all__ = [
    "Event",
    "ImportEvent",
    "ProgressEvent",
    "ResultEvent",
    "RetrainReport",
    "SkippedFile",
    "TrainingStatus",
    "TrainingTrigger",
    "parse_event",
]

log = logging.getLogger(__name__)


class TrainingStatus(StrEnum):
    """How a retraining ended."""

    PROMOTED = "promoted"
    """A new version was written and serves now."""
    REFUSED = "refused"
    """A new version was written, but the quality gate kept the serving model."""
    FAILED = "failed"
    """Nothing was promoted (too few images, a crash, a timeout, ...); the report's message says why."""


class TrainingTrigger(StrEnum):
    """Who started a retraining."""

    MANUAL = "manual"
    """An admin's ``/retrain``."""
    SCHEDULED = "scheduled"
    """The bot's schedule (``[training] schedule`` or ``interval_seconds``)."""
    STARTUP = "startup"
    """The catch-up at start-up for a scheduled run missed while the bot was down."""
    CLI = "cli"
    """``python -m bot retrain`` run by the operator."""


@dataclass
class RetrainReport:
    """What one retraining produced: the one report type of the library, the CLI and the bot.

    Attributes:
        status: :class:`TrainingStatus` (a plain string is converted).
        message: one or two human sentences, safe to show in chat.
        version: the new version's name (None when failed).
        metrics: the version's ``metrics.json`` content (accuracy, per_label, confusion_matrix,
            labels, gate, timings, ...); {} when failed.
        confusion_png: path of the confusion-matrix plot, or None.
        excluded_labels: labels left out for having too few images.
        skipped_images: ``[(sha256, reason)]`` images that could not be read.
        trigger: who started the run (set by the bot's runner; None for a direct library call).
        started_at / finished_at: unix times (set by the bot's runner; 0.0 otherwise).
    """

    status: TrainingStatus
    message: str
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    confusion_png: Path | None = None
    excluded_labels: list[str] = field(default_factory=list)
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    trigger: TrainingTrigger | None = None
    started_at: float = 0.0
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        self.status = TrainingStatus(self.status)
        if self.trigger is not None:
            self.trigger = TrainingTrigger(self.trigger)

    @property
    def completed(self) -> bool:
        """True when the training itself ran to the end (promoted or refused by the gate)."""
        return self.status in (TrainingStatus.PROMOTED, TrainingStatus.REFUSED)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of what the training produced (paths as strings; without trigger and times)."""
        return {
            "status": str(self.status),
            "message": self.message,
            "version": self.version,
            "metrics": self.metrics,
            "confusion_png": str(self.confusion_png) if self.confusion_png else None,
            "excluded_labels": self.excluded_labels,
            "skipped_images": [list(x) for x in self.skipped_images],
        }


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_line(self) -> str:
        """The event as one JSON line (UTF-8 text, no newline)."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False)


class SkippedFile(BaseModel):
    """A file ``--image_dir`` could not import, and why."""

    file: str
    reason: str


class ImportEvent(_Event):
    """``--image_dir`` was imported into the store before training."""

    event: Literal["import"] = "import"
    added: int
    duplicates: int
    skipped: list[SkippedFile] = []


class ProgressEvent(_Event):
    """Progress of a stage: ``done`` of ``total`` (images for bottlenecks, epochs for training).

    ``stage`` is one of "bottlenecks", "training", "evaluating", "saving" (``model_store.pipeline.Progress``).
    """

    event: Literal["progress"] = "progress"
    stage: str
    done: int
    total: int



class ResultEvent(_Event):
    """The last line: the run's :class:`RetrainReport` (its :meth:`RetrainReport.to_dict` fields, flat)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    event: Literal["result"] = "result"
    report: RetrainReport

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        # on the wire the report's fields sit beside "event"
        if isinstance(data, dict) and "report" not in data:
            # trigger and times are the reader's to set, never taken from the line
            fields = {k: v for k, v in data.items() if k not in ("event", "trigger", "started_at", "finished_at")}
            return {"event": data.get("event", "result"), "report": fields}
        return data

    def to_line(self) -> str:
        """The flat JSON line (NaN stays NaN, as ``json.dumps`` writes it)."""
        return json.dumps({"event": self.event, **self.report.to_dict()}, ensure_ascii=False)


Event = Annotated[ImportEvent | ProgressEvent | ResultEvent, Field(discriminator="event")]
"""Any line of ``python -m bot retrain --json``."""

_EVENT = TypeAdapter(Event)


def parse_event(line: str | bytes) -> ImportEvent | ProgressEvent | ResultEvent | None:
    """One line of ``retrain --json`` output as its event model.

    Args:
        line: one line of the child's stdout (bytes are decoded as UTF-8, bad bytes replaced).

    Returns:
        The event, or None for a line that is not an event (TensorFlow chatter, an unknown or
        malformed object): those are logged at DEBUG level and otherwise ignored.
    """
    text = (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).strip()
    if not text.startswith("{"):
        if text:
            log.debug("training output: %s", text[:500])
        return None
    try:
        return _EVENT.validate_json(text)
    except ValidationError as exc:
        log.debug("training output (not an event: %s): %s", exc.errors(include_url=False)[:1], text[:500])
        return None
