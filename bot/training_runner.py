"""Run one retraining in a subprocess and follow its progress; one training at a time.

The bot never trains in its own process: TensorFlow's memory and the GIL would stall the photo
replies. ``python -m bot retrain --store_dir DIR --json ...`` prints one JSON object per line on
stdout (``{"event": "progress", "stage", "done", "total"}`` while working, then
``{"event": "result", ...RetrainReport.to_dict()}``); this module reads them with the models of
:mod:`model_store.contract`, hands progress to a callback, and returns the result's
:class:`~model_store.contract.RetrainReport` with its trigger and times filled in.

:class:`Trainer` owns the one :class:`asyncio.Lock` that ``/retrain``, ``/rollback`` and the
scheduled job share. After a completed run it records the store fingerprint in ``state.json``
(so an unchanged store is not retrained by the schedule) and, after a promotion, makes the
classifier load the new version before the next photo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bot.config import Config, TrainingConfig
from bot.logsafe import redact
from bot.state import BotState
from model_store.contract import (
    ProgressEvent,
    ResultEvent,
    RetrainReport,
    TrainingStatus,
    TrainingTrigger,
    parse_event,
)

__all__ = ["TrainingOutcome", "Trainer", "retrain_command", "training_flags"]

log = logging.getLogger(__name__)

#: ``await on_progress(stage, done, total)``
ProgressCallback = Callable[[str, int, int], Awaitable[None]]

_SECRET_ENV = ("TELEGRAM_BOT_TOKEN",)
#: every ``[telegram]`` override (``LABELGRAM_TELEGRAM='{"token": ...}'``, ``LABELGRAM_TELEGRAM__TOKEN``,
#: the webhook secret, ...): the training needs none of them
_SECRET_ENV_PREFIX = "LABELGRAM_TELEGRAM"
_STDOUT_LINE_LIMIT = 64 * 1024 * 1024  # the result line carries all metrics (confusion matrix, ...)


TrainingOutcome = RetrainReport
"""The bot's name for :class:`model_store.contract.RetrainReport` (the one report type)."""


def training_flags(training: TrainingConfig) -> list[str]:
    """The config's ``[training]`` settings as ``python -m bot retrain`` flags.

    Every flag is named after its key (``--<key> VALUE``, ``--<key>`` / ``--no-<key>`` for a
    switch): ``backbone``, ``backbone_weights`` and the ``TrainConfig`` fields of
    :attr:`TrainingConfig.TRAIN_CONFIG_KEYS`. The bot's training subprocess gets these on its
    command line.
    """
    flags = ["--backbone", training.backbone, "--backbone_weights", training.backbone_weights]
    for key in training.TRAIN_CONFIG_KEYS:
        value = getattr(training, key)
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key}")
        else:
            flags += [f"--{key}", repr(value) if isinstance(value, float) else str(value)]
    return flags


def retrain_command(config: Config, *, store_dir: Path | str | None = None) -> list[str]:
    """The ``python -m bot retrain`` command line for this configuration (retrain.py flag names)."""
    store = str(store_dir if store_dir is not None else config.store_dir)
    return [
        sys.executable,
        "-m",
        "bot",
        "retrain",
        "--store_dir",
        store,
        "--json",
        *training_flags(config.training),
        "--engine", config.engine.engine,
        "--threads", str(config.engine.threads),
    ]  # fmt: skip


def _child_env(secrets: Iterable[str | None] = ()) -> dict[str, str]:
    """The training subprocess's environment: the bot's, without any variable holding a secret.

    Dropped: ``TELEGRAM_BOT_TOKEN``, every ``LABELGRAM_TELEGRAM*`` variable, and any other variable
    whose value contains one of ``secrets`` (the token, its part after the colon, the webhook
    secret; also percent-encoded, see :func:`bot.logsafe.redact`).
    """
    known = [s for s in secrets if s]

    def holds_secret(value: str) -> bool:
        return bool(known) and redact(value, known) != value

    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in _SECRET_ENV
        and not k.upper().startswith(_SECRET_ENV_PREFIX)
        and not holds_secret(v)
    }
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Trainer:
    """Runs trainings one at a time.

    Args:
        config: the bot configuration (store folder, training flags, time limit).
        state: where the last completed run's fingerprint is kept.
        fingerprint: returns the store's current fingerprint (called in a worker thread).
        after_promotion: awaited after a promotion (the classifier reload).
        command: override of :func:`retrain_command` (tests and benchmarks).

    Use ``async with trainer.lock:`` around :meth:`run` (and around anything else that must not
    overlap a training, such as a rollback); :attr:`busy` says whether it is held.
    """

    def __init__(
        self,
        config: Config,
        state: BotState,
        *,
        fingerprint: Callable[[], str],
        after_promotion: Callable[[], Awaitable[Any]] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self._fingerprint = fingerprint
        self._after_promotion = after_promotion
        self.command = command or retrain_command(config)
        self.lock = asyncio.Lock()
        self.current_trigger: TrainingTrigger | None = None
        self.started_at: float | None = None
        self.last_outcome: TrainingOutcome | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.closing = False

    def _secrets(self) -> list[str | None]:
        return [self.config.token, self.config.webhook_secret]

    @property
    def busy(self) -> bool:
        """True while :attr:`lock` is held (a training or a rollback is running)."""
        return self.lock.locked()

    async def run(
        self,
        *,
        trigger: TrainingTrigger | str = TrainingTrigger.MANUAL,
        on_progress: ProgressCallback | None = None,
    ) -> TrainingOutcome:
        """Train once (the caller holds :attr:`lock`). Never raises for a failed training.

        Args:
            trigger: who started the run (a :class:`TrainingTrigger` or its value).
            on_progress: awaited with each progress event of the subprocess.

        Returns:
            The run's report, with ``trigger``, ``started_at`` and ``finished_at`` set.
        """
        if not self.lock.locked():
            raise RuntimeError("Trainer.run() must be called with trainer.lock held")
        trigger = TrainingTrigger(trigger)
        started = time.time()
        if self.closing:
            return TrainingOutcome(
                TrainingStatus.FAILED,
                "The bot is shutting down; no training was started.",
                trigger=trigger,
                started_at=started,
                finished_at=started,
            )
        self.current_trigger, self.started_at = trigger, started
        try:
            fingerprint = await asyncio.to_thread(self._fingerprint)
            outcome = await self._run_subprocess(trigger, started, on_progress)
            if outcome.completed:
                await asyncio.to_thread(
                    self.state.update,
                    last_run={
                        # taken before the subprocess snapshot: images added while it trained make
                        # the next scheduled run happen (the pipeline's own figure is taken later)
                        "fingerprint": fingerprint,
                        "at": outcome.finished_at,
                        "started_at": started,
                        "version": outcome.version,
                        "status": outcome.status,
                        "trigger": trigger,
                    },
                    last_failure_fingerprint=None,
                )
            if outcome.status == TrainingStatus.PROMOTED and self._after_promotion is not None:
                await self._after_promotion()
            self.last_outcome = outcome
            log.info("training (%s) finished: %s %s", trigger, outcome.status, outcome.version or "")
            return outcome
        finally:
            self.current_trigger, self.started_at = None, None

    async def _run_subprocess(
        self, trigger: TrainingTrigger, started: float, on_progress: ProgressCallback | None
    ) -> TrainingOutcome:
        limit = self.config.training.max_minutes * 60
        log.info("starting training (%s): %s", trigger, " ".join(self.command[1:]))
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_child_env(self._secrets()),
                limit=_STDOUT_LINE_LIMIT,
                start_new_session=True,  # Ctrl-C on the bot's terminal does not kill a training midway
            )
        except OSError:
            log.exception("could not start the training process")
            return TrainingOutcome(
                TrainingStatus.FAILED,
                "The training process could not be started; the bot's log has the details.",
                trigger=trigger,
                started_at=started,
                finished_at=time.time(),
            )
        self._proc = proc
        stderr_tail: deque[str] = deque(maxlen=40)
        stderr_task = asyncio.create_task(self._drain(proc.stderr, stderr_tail))
        result: RetrainReport | None = None
        try:
            async with asyncio.timeout(limit):
                assert proc.stdout is not None
                async for raw in proc.stdout:
                    event = parse_event(raw)
                    if isinstance(event, ResultEvent):
                        result = event.report
                    elif isinstance(event, ProgressEvent) and on_progress is not None:
                        await self._report_progress(on_progress, event)
                returncode = await proc.wait()
                await stderr_task
        except TimeoutError:
            await self._kill(proc)
            stderr_task.cancel()
            log.error(
                "training (%s) took longer than %s minutes and was stopped",
                trigger,
                self.config.training.max_minutes,
            )
            return TrainingOutcome(
                TrainingStatus.FAILED,
                f"The training took longer than {self.config.training.max_minutes:g} minutes and was stopped. "
                "The current model keeps serving.",
                trigger=trigger,
                started_at=started,
                finished_at=time.time(),
            )
        except BaseException:
            await self._kill(proc)
            stderr_task.cancel()
            raise
        finally:
            self._proc = None
        if result is None:
            log.error(
                "training (%s) ended with exit code %s and no result; last stderr lines:\n%s",
                trigger,
                returncode,
                "\n".join(stderr_tail),
            )
            return TrainingOutcome(
                TrainingStatus.FAILED,
                f"The training process stopped unexpectedly (exit code {returncode}). "
                "The current model keeps serving; the bot's log has the details.",
                trigger=trigger,
                started_at=started,
                finished_at=time.time(),
            )
        if returncode not in (0, 1):
            log.warning("training (%s) exited with code %s after reporting a result", trigger, returncode)
        if result.status == TrainingStatus.FAILED and stderr_tail:
            log.warning("training (%s) failed; last stderr lines:\n%s", trigger, "\n".join(stderr_tail))
        return replace(result, trigger=trigger, started_at=started, finished_at=time.time())

    @staticmethod
    async def _report_progress(on_progress: ProgressCallback, event: ProgressEvent) -> None:
        try:
            await on_progress(event.stage, event.done, event.total)
        except Exception:  # a failed progress edit must not stop the training
            log.exception("progress callback failed")

    @staticmethod
    async def _drain(stream: asyncio.StreamReader | None, tail: deque[str]) -> None:
        if stream is None:
            return
        async for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                tail.append(line[:1000])

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 10)

    async def aclose(self) -> None:
        """Stop a running training (bot shutdown) and refuse new ones. The store stays consistent."""
        self.closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.warning("stopping the running training because the bot shuts down")
            await self._kill(proc)
