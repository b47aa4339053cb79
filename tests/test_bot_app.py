"""The process around the bot: `python -m bot run`, the missing-token message, tokens kept out of logs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from bot.app import NO_TOKEN_HELP, run
from bot.logsafe import REDACTED, TokenRedactingFilter
from tests.auxil.bot_harness import ADMIN, ROOT, USER, bot_config, labels_in, photos, running_bot
from tests.botapi_standin import BotApiStandIn

TOKEN = "7312345678:AAHsecretTOKENvalue-for_tests"


def test_without_a_token_run_explains_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(None) == 2
    err = capsys.readouterr().err
    assert err == NO_TOKEN_HELP
    assert "@BotFather" in err and "/newbot" in err
    assert "TELEGRAM_BOT_TOKEN" in err and "[telegram]" in err and "token = " in err


def test_a_config_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[training]\ntimezone = "Mars/Base"\n')
    assert run(str(path)) == 2
    assert capsys.readouterr().err == "config error: training.timezone: unknown time zone 'Mars/Base'\n"


def test_the_log_filter_redacts_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.redact")
    redactor = TokenRedactingFilter(TOKEN)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    try:
        with caplog.at_level(logging.INFO):
            logger.info("HTTP Request: POST http://api/bot%s/getMe", TOKEN)
            logger.info("encoded %s", TOKEN.replace(":", "%3A"))
            try:
                raise RuntimeError(f"failed calling http://api/bot{TOKEN}/sendMessage")
            except RuntimeError:
                logger.exception("boom")
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(redactor)
    assert TOKEN not in caplog.text and "AAHsecret" not in caplog.text
    assert f"bot{REDACTED}/getMe" in caplog.text
    assert f"bot{REDACTED}/sendMessage" in caplog.text  # from the traceback


async def test_the_token_never_reaches_the_logs(
    tmp_path: Path, store_copy: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    async with BotApiStandIn(token=TOKEN) as api:
        async with running_bot(api, bot_config(api, store_copy)) as bot:
            # make httpx log every request URL (each contains the token) despite the bot's setting
            logging.getLogger("httpx").setLevel(logging.DEBUG)
            text = await bot.reply_text(USER, bot.send_photo(USER, photos("shoes")[6]))
            api.fail_next("sendMessage", error_code=500, description=f"Internal error for bot{TOKEN}")
            failed = bot.send_photo(USER, photos("pants")[6])
            apology = await bot.reply_text(USER, failed)
            await bot.ask(ADMIN, "/status")
    assert labels_in(text)[0] == "shoes"
    assert apology.startswith("Sorry, something went wrong")
    out, err = capfd.readouterr()
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for where in (logged, out, err):
        assert TOKEN not in where
        assert TOKEN.split(":")[1] not in where
    assert f"bot{REDACTED}/getUpdates" in caplog.text, "request URLs were logged, with the token redacted"
    assert f"Internal error for bot{REDACTED}" in caplog.text, "the error text was logged, redacted"
    assert any(r.levelno == logging.ERROR and "error while handling update" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
async def test_python_m_bot_run_answers_photos_and_stops_cleanly(
    tmp_path: Path, store_copy: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with BotApiStandIn(token=TOKEN) as api:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABELGRAM_", "TELEGRAM_"))}
        env.update(
            TELEGRAM_BOT_TOKEN=TOKEN,
            LABELGRAM_TELEGRAM__BASE_URL=api.base_url,
            LABELGRAM_TELEGRAM__BASE_FILE_URL=api.base_file_url,
            LABELGRAM_STORE_DIR=str(store_copy),
            LABELGRAM_ADMINS=str(ADMIN),
            LABELGRAM_LOGGING__LEVEL="DEBUG",
            LABELGRAM_LIMITS__MIN_FREE_DISK_MB="0",
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}
        )
        try:
            await api.wait_for(lambda c: c.method == "setMyCommands", timeout=60)
            update = api.make_photo_update(USER, USER, photos("t-shirt")[6].read_bytes())
            api.push_update(update)
            call = await api.wait_for_reply(USER, update["message"]["message_id"], timeout=60)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(proc.wait(), 60)
    assert labels_in(str(call.params["text"]))[0] == "t-shirt"
    assert code == 0
    out, err = capfd.readouterr()
    assert "Application started" in err or "Application is stopping" in err, err[-2000:]
    assert TOKEN not in out + err and TOKEN.split(":")[1] not in out + err
