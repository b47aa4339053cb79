"""Scheduled retraining on the Application's JobQueue (APScheduler underneath).

* When: ``training.schedule`` (crontab syntax, parsed by APScheduler's ``CronTrigger.from_crontab``)
  in ``training.timezone``; or every ``training.interval_seconds`` when that is above 0 (tests).
* Skipped when the labelled image set is unchanged since the last completed training (its store
  fingerprint is kept in ``state.json``), when the store is empty, and when a training is already
  running (``/retrain`` and the schedule share :attr:`Trainer.lock`, so there are never two; a
  command-line retrain holding the store's training lock is skipped too, not reported as a failure).
* A fire time missed while the bot was down (the time of the last scheduled check is persisted) is
  caught up once, shortly after start-up.
* The training runs in a subprocess; photos keep being answered. After a promotion the classifier
  serves the new version at once, and every admin gets the report; when the gate refuses the new
  version, admins are told why and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from telegram.ext import Application, Job

from bot.config import Config
from bot.context import BotData, Context
from bot.reports import notify_admins, real_world_of
from bot.state import BotState

__all__ = ["missed_run", "run_scheduled_training", "setup_schedule"]

log = logging.getLogger(__name__)

JOB_NAME = "scheduled-retraining"
CATCH_UP_DELAY_SECONDS = 5.0
_JOB_KWARGS: dict[str, Any] = {"max_instances": 4, "coalesce": True, "misfire_grace_time": 600}


def missed_run(config: Config, state: BotState, now: datetime | None = None) -> bool:
    """Whether a scheduled fire time passed since the last scheduled check (the bot was down).

    The first start (no check recorded) is not a missed run.
    """
    last = state.get("last_scheduled_check")
    if not isinstance(last, int | float):
        return False
    now = now or datetime.now(UTC)
    last_dt = datetime.fromtimestamp(float(last), UTC)
    if config.training.interval_seconds > 0:
        return (now - last_dt).total_seconds() >= config.training.interval_seconds
    trigger = config.training.trigger()
    next_fire = trigger.get_next_fire_time(None, last_dt + timedelta(seconds=1))
    return next_fire is not None and next_fire <= now


def setup_schedule(application: Application[Any, Any, Any, Any, Any, Any], data: BotData) -> Job[Any] | None:
    """Add the retraining job (and a one-off catch-up if a run was missed) to the JobQueue."""
    job_queue = application.job_queue
    if job_queue is None:
        raise RuntimeError("python-telegram-bot was installed without the job-queue extra")
    cfg = data.config.training
    if cfg.interval_seconds > 0:
        job = job_queue.run_repeating(
            run_scheduled_training,
            interval=cfg.interval_seconds,
            first=cfg.interval_seconds,
            name=JOB_NAME,
            data="scheduled",
            job_kwargs=_JOB_KWARGS,
        )
        log.info("retraining scheduled every %g s", cfg.interval_seconds)
    else:
        trigger = cfg.trigger()
        job = job_queue.run_custom(
            run_scheduled_training,
            job_kwargs={"trigger": trigger, **_JOB_KWARGS},
            name=JOB_NAME,
            data="scheduled",
        )
        log.info("retraining scheduled by cron %r in %s", cfg.schedule, cfg.timezone)
    if missed_run(data.config, data.state):
        log.info("a scheduled retraining was missed while the bot was down; running it shortly")
        job_queue.run_once(run_scheduled_training, when=CATCH_UP_DELAY_SECONDS, name=f"{JOB_NAME}-catch-up", data="startup")
    elif data.state.get("last_scheduled_check") is None:
        data.state.update(last_scheduled_check=time.time())
    return job


async def run_scheduled_training(context: Context) -> None:
    """The job: retrain unless nothing changed or a training is already running."""
    data = context.bot_data
    trigger = context.job.data if context.job is not None and isinstance(context.job.data, str) else "scheduled"
    trainer = data.trainer
    fired = time.time()
    if trainer.busy:
        log.info("%s retraining skipped: a training is already running", trigger)
        await asyncio.to_thread(data.state.update, last_scheduled_check=fired)
        return
    serving = await asyncio.to_thread(data.workspace.registry.current)  # for the report's real-world accuracy
    async with trainer.lock:
        if not await asyncio.to_thread(_training_lock_free, data):
            # a command-line retrain holds the store: not a failure to report, just not now
            log.info("%s retraining skipped: another process (e.g. a command-line retrain) is training this store", trigger)
            await asyncio.to_thread(data.state.update, last_scheduled_check=fired)
            return
        store = data.workspace.store
        fingerprint = await asyncio.to_thread(store.fingerprint)
        if fingerprint == await asyncio.to_thread(_last_trained_fingerprint, data):
            log.info("%s retraining skipped: no image changed since the last training", trigger)
            await asyncio.to_thread(data.state.update, last_scheduled_check=fired)
            return
        if await asyncio.to_thread(store.image_count) == 0:
            log.info("%s retraining skipped: no labelled images yet", trigger)
            await asyncio.to_thread(data.state.update, last_scheduled_check=fired)
            return
        outcome = await trainer.run(trigger=trigger)
    if trainer.closing:
        # stopped by a shutdown: the check time stays old, so the next start catches this run up
        log.info("%s retraining interrupted by shutdown; it will run again at the next start", trigger)
        return
    await asyncio.to_thread(data.state.update, last_scheduled_check=fired)
    await _tell_admins(context, data, outcome, fingerprint, serving)


def _training_lock_free(data: BotData) -> bool:
    """Whether the store's cross-process training lock is free (taken and released at once)."""
    from model_store.errors import TrainingError
    from model_store.pipeline import training_lock

    try:
        with training_lock(data.workspace):
            return True
    except TrainingError:
        return False


def _last_trained_fingerprint(data: BotData) -> str | None:
    """Fingerprint of the images the last completed training used.

    From ``state.json``; before the bot has run a training itself (a store trained with
    ``python -m bot retrain``), from the serving version's metrics.
    """
    last_run = data.state.get("last_run") or {}
    if last_run.get("fingerprint"):
        return str(last_run["fingerprint"])
    current = data.workspace.registry.current()
    value = current.metrics.get("store_fingerprint") if current is not None else None
    return str(value) if value else None


async def _tell_admins(context: Context, data: BotData, outcome: Any, fingerprint: str, serving: Any = None) -> None:
    if outcome.status == "failed":
        if data.state.get("last_failure_fingerprint") == fingerprint:
            log.info("scheduled training failed again for the same images; admins were told already")
            return
        await asyncio.to_thread(data.state.update, last_failure_fingerprint=fingerprint)
    await notify_admins(context.bot, data.config.admins, outcome, real_world=await real_world_of(data.review, serving))
