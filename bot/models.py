"""The model (admins only): ``/retrain`` now, ``/status``, ``/rollback`` to the previous version.

Training runs in a subprocess (:mod:`bot.training_runner`) under :attr:`Trainer.lock`, the one
lock the schedule shares; ``/rollback`` also takes the store's cross-process training lock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from telegram import Update
from telegram.ext import BaseHandler, CommandHandler, filters

from bot.context import BotData, Context
from bot.reports import (
    ProgressMessage,
    RealWorld,
    accuracy_text,
    real_world_lines,
    real_world_of,
    send_report,
    too_few_test_images_text,
)
from bot.telegram_io import NEW, images_text, reply, user_id_of
from bot.wording import error_text
from model_store.errors import NoModelError, TrainingError

__all__ = [
    "engine_line",
    "handlers",
    "next_run_text",
    "on_retrain",
    "on_rollback",
    "on_status",
    "status_text",
]

log = logging.getLogger(__name__)


async def on_retrain(update: Update, context: Context) -> None:
    """``/retrain``: train now, with a live progress message, then the report in this chat."""
    message = update.effective_message
    if message is None:
        return
    data = context.bot_data
    trainer = data.trainer
    if trainer.busy:
        who = {"manual": "an admin", "scheduled": "the schedule", "startup": "the start-up catch-up"}
        started = f", started {time.time() - trainer.started_at:.0f} s ago" if trainer.started_at else ""
        await reply(
            message,
            f"A training is already running (by {who.get(trainer.current_trigger or '', 'someone')}{started}). "
            + (
                "Its report goes to the admin who started it when it finishes."
                if trainer.current_trigger == "manual"
                else "Its report goes to the admins when it finishes."
            ),
        )
        return
    serving = await asyncio.to_thread(data.workspace.registry.current)  # its real-world accuracy goes in the report
    async with trainer.lock:
        status = await reply(message, "Retraining… starting")
        progress = ProgressMessage(status)
        outcome = await trainer.run(trigger="manual", on_progress=progress.update)
    took = outcome.finished_at - outcome.started_at
    final = {"promoted": "finished: new model serving", "refused": "finished: kept the current model"}
    await progress.finish(f"Retraining {final.get(outcome.status, 'failed')} ({took:.0f} s).")
    real_world = await real_world_of(data.review, serving)
    await send_report(context.bot, message.chat_id, outcome, reply_to=message.message_id, real_world=real_world)


def _fmt_time(ts: float | None, tz: ZoneInfo) -> str:
    if not ts:
        return "never"
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M %Z")


def status_text(data: BotData) -> str:
    """The /status text (runs in a worker thread: it reads the store)."""
    tz = ZoneInfo(data.config.training.timezone)
    current = data.workspace.registry.current()
    lines = []
    if current is None:
        lines.append("Model: none yet (teach me with /add, then /retrain).")
        engine = data.config.engine
        threads = engine.threads or "all"
        lines.append(
            f"Backbone: {data.config.training.backbone}, engine: {engine.engine}, {threads} threads (for the first training)"
        )
    else:
        metrics = current.metrics
        lines.append(f"Model: {current.name}, trained {_fmt_time(current.created_at, tz)}")
        lines.append(f"Test accuracy: {accuracy_text(metrics)}")
        hint = too_few_test_images_text(metrics)
        if hint:
            lines.append(hint)
        lines.append(engine_line(metrics, data.classifier.engine_description))
        try:
            lines += real_world_lines(RealWorld.read(data.review, current))
            pending = data.review.pending_count()
        except sqlite3.Error as exc:  # /status still answers
            log.warning("could not read users' feedback: %s", exc)
            lines.append("Real-world accuracy: the review store cannot be read now (see the log).")
        else:
            if pending:
                lines.append(f"Review queue: {pending} waiting (/review)")
    infos = data.workspace.store.labels()
    total = sum(i.count for i in infos)
    lines.append(f"Labels: {len(infos)}, {images_text(total)}")
    lines += [f"  {i.name} — {i.count}" for i in infos[:40]]
    if len(infos) > 40:
        lines.append(f"  … and {len(infos) - 40} more")
    last_run = data.state.get("last_run") or {}
    since = last_run.get("started_at") or last_run.get("at") or (current.created_at if current else None)
    if since:
        lines.append(f"Images added since the last training: {data.workspace.store.count_added_since(float(since))}")
    else:
        lines.append(f"Images added since the last training: {total} (no training yet)")
    lines.append(f"Next scheduled training: {next_run_text(data, tz)}")
    if data.trainer.busy and data.trainer.started_at:
        lines.append(
            f"Training now: yes ({data.trainer.current_trigger}, running for {time.time() - data.trainer.started_at:.0f} s)"
        )
    return "\n".join(lines)


def engine_line(metrics: dict, serving: str | None = None) -> str:
    """"Backbone: efficientnet_lite0, engine: LiteRT/XNNPACK, 2 threads" for a version's metrics.

    ``serving`` is the engine the bot runs the model on now (``Classifier.engine_description``);
    without it, the one the training run used (``metrics["engine"]["serving"]``).
    """
    backbone = (metrics.get("backbone") or {}).get("name") or "unknown"
    engine = serving or (metrics.get("engine") or {}).get("serving") or "TensorFlow"
    return f"Backbone: {backbone}, engine: {engine}"


def next_run_text(data: BotData, tz: ZoneInfo) -> str:
    """When the schedule fires next, in ``tz``, and its rule ("not scheduled" without a job)."""
    job = data.schedule_job
    if job is None:
        return "not scheduled"
    try:
        when = job.next_t
    except AttributeError:  # job queue not started yet
        when = None
    if when is None:
        return "not scheduled"
    cfg = data.config.training
    rule = f"every {cfg.interval_seconds:g} s" if cfg.interval_seconds else f"cron “{cfg.schedule}” {cfg.timezone}"
    return f"{when.astimezone(tz).strftime('%Y-%m-%d %H:%M:%S %Z')} ({rule}; skipped if nothing changed)"


async def on_status(update: Update, context: Context) -> None:
    """``/status``: see :func:`status_text`."""
    message = update.effective_message
    if message is None:
        return
    await reply(message, await asyncio.to_thread(status_text, context.bot_data))


def _rollback_under_training_lock(data: BotData) -> Any:
    """``registry.rollback()`` holding the store's training lock (raises TrainingError if it is held)."""
    from model_store.pipeline import training_lock

    with training_lock(data.workspace):
        return data.workspace.registry.rollback()


async def on_rollback(update: Update, context: Context) -> None:
    """``/rollback``: serve the previous model version (not while a training runs)."""
    message = update.effective_message
    if message is None:
        return
    data = context.bot_data
    if data.trainer.busy:
        await reply(message, "A training is running; try /rollback again when it has finished.")
        return
    async with data.trainer.lock:
        try:
            # the store's training lock too: a command-line retrain rewrites CURRENT under it
            version = await asyncio.to_thread(_rollback_under_training_lock, data)
        except NoModelError as exc:
            await reply(message, error_text(exc))
            return
        except TrainingError:
            await reply(
                message,
                "A training is running on this store (started outside the bot, e.g. from the command "
                "line); try /rollback again when it has finished.",
            )
            return
        await data.batcher.run_in_worker(data.classifier.reload_if_changed)
    log.info("admin %s rolled the model back to %s", user_id_of(update), version.name)
    acc = version.metrics.get("accuracy")
    acc_text = f" (test accuracy {acc * 100:.1f}%)" if isinstance(acc, int | float) else ""
    await reply(
        message,
        f"Rolled back: model {version.name}{acc_text} is serving again. "
        "The schedule retrains only after images change; /retrain trains now.",
    )


def handlers(admins: filters.User) -> list[BaseHandler[Any, Any, Any]]:
    """``/retrain``, ``/status``, ``/rollback`` for admins."""
    mine = NEW & admins
    return [
        CommandHandler("retrain", on_retrain, filters=mine),
        CommandHandler("status", on_status, filters=mine),
        CommandHandler("rollback", on_rollback, filters=mine),
    ]
