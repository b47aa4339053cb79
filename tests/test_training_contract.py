"""The training contract: one report type, StrEnum status and trigger, and the retrain --json events
written by the CLI and read by the bot's runner with the same pydantic models."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from bot.config import Config
from bot.state import BotState
from bot.training_runner import Trainer, TrainingOutcome
from model_store.contract import (
    ImportEvent,
    ProgressEvent,
    ResultEvent,
    RetrainReport,
    SkippedFile,
    TrainingStatus,
    TrainingTrigger,
    parse_event,
)
from model_store.pipeline import RetrainReport as PipelineReport


def test_one_report_type() -> None:
    assert TrainingOutcome is RetrainReport is PipelineReport
    report = RetrainReport("refused", "kept", version="v1")
    assert report.status is TrainingStatus.REFUSED and report.completed and report.trigger is None
    assert not RetrainReport("failed", "no").completed


def test_status_and_trigger_values_are_the_strings_stored_and_compared_before() -> None:
    assert [str(s) for s in TrainingStatus] == ["promoted", "refused", "failed"]
    assert {str(t) for t in TrainingTrigger} == {"manual", "scheduled", "startup", "cli"}
    assert TrainingStatus.PROMOTED == "promoted" and json.dumps(TrainingTrigger.SCHEDULED) == '"scheduled"'


def test_result_line_round_trip_keeps_every_field() -> None:
    report = RetrainReport(
        TrainingStatus.PROMOTED,
        "New model v1 is serving.",
        version="v1",
        metrics={"accuracy": 0.9, "odd": math.nan, "per_label": {"hat": {"precision": 1.0}}},
        confusion_png=Path("/s/models/v1/confusion_matrix.png"),
        excluded_labels=["tiny"],
        skipped_images=[("ab" * 32, "damaged")],
        trigger=TrainingTrigger.MANUAL,
        started_at=1.0,
        finished_at=2.0,
    )
    line = ResultEvent(report=report).to_line()
    flat = json.loads(line)
    # the wire format of before: flat, the report's to_dict() beside "event", no trigger or times
    assert flat == {"event": "result", **json.loads(json.dumps(report.to_dict()))}
    assert list(flat) == ["event", "status", "message", "version", "metrics", "confusion_png", "excluded_labels", "skipped_images"]
    back = parse_event(line.encode())
    assert isinstance(back, ResultEvent)
    got = back.report
    assert got.status is TrainingStatus.PROMOTED and got.confusion_png == report.confusion_png
    assert got.skipped_images == report.skipped_images and got.excluded_labels == ["tiny"]
    assert math.isnan(got.metrics["odd"]) and got.metrics["per_label"] == report.metrics["per_label"]
    assert (got.trigger, got.started_at) == (None, 0.0)


def test_progress_and_import_lines() -> None:
    line = ProgressEvent(stage="bottlenecks", done=3, total=80).to_line()
    assert json.loads(line) == {"event": "progress", "stage": "bottlenecks", "done": 3, "total": 80}
    assert parse_event(line) == ProgressEvent(stage="bottlenecks", done=3, total=80)
    imported = ImportEvent(added=2, duplicates=1, skipped=[SkippedFile(file="a.txt", reason="not an image")])
    assert json.loads(imported.to_line())["skipped"] == [{"file": "a.txt", "reason": "not an image"}]
    assert parse_event(imported.to_line()) == imported


def test_lines_that_are_not_events_are_ignored() -> None:
    for line in [
        b"",
        b"2026-01-01 12:00:00 W tensorflow: some chatter",
        b"{not json",
        b"[1, 2]",
        b'{"event": "unknown"}',
        b'{"event": "progress", "stage": "training", "done": "x", "total": 3}',
        b'{"event": "result", "status": "exploded", "message": ""}',
        b"\xff\xfe{",
    ]:
        assert parse_event(line) is None, line


async def test_runner_reads_the_events_with_the_contract_models(tmp_path: Path) -> None:
    report = RetrainReport("promoted", "New model v9 is serving.", version="v9", metrics={"accuracy": 0.5})
    script = "\n".join(
        [
            "print('TensorFlow noise on stdout')",
            f"print({ProgressEvent(stage='bottlenecks', done=1, total=2).to_line()!r})",
            "print('{\"event\": \"progress\", \"stage\": \"training\", \"done\": \"x\", \"total\": 1}')",
            f"print({ProgressEvent(stage='training', done=2, total=60).to_line()!r})",
            f"print({ResultEvent(report=report).to_line()!r})",
        ]
    )
    config = Config(store_dir=tmp_path)
    promoted: list[bool] = []

    async def after() -> None:
        promoted.append(True)

    trainer = Trainer(
        config, BotState(tmp_path), fingerprint=lambda: "f1", after_promotion=after, command=[sys.executable, "-c", script]
    )
    seen: list[tuple[str, int, int]] = []

    async def progress(stage: str, done: int, total: int) -> None:
        seen.append((stage, done, total))

    async with trainer.lock:
        outcome = await trainer.run(trigger="scheduled", on_progress=progress)
    assert seen == [("bottlenecks", 1, 2), ("training", 2, 60)]
    assert outcome.status is TrainingStatus.PROMOTED and outcome.version == "v9"
    assert outcome.trigger is TrainingTrigger.SCHEDULED and outcome.started_at <= outcome.finished_at
    assert outcome.metrics == {"accuracy": 0.5} and promoted == [True]
    last = BotState(tmp_path).get("last_run")
    assert (last["status"], last["trigger"], last["version"]) == ("promoted", "scheduled", "v9")
