"""Webhook mode: ``python -m bot run`` registers its URL and answers updates POSTed to it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.auxil.bot_harness import ADMIN, ROOT, USER, labels_in, photos
from tests.botapi_standin import BotApiStandIn

TOKEN = "424242:WebhookTestTokenAbcdef"
SECRET = "hook_secret_123456"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
async def test_webhook_mode_registers_its_url_and_answers_posted_updates(
    tmp_path: Path, store_copy: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    # The public HTTPS URL Telegram would post to (a reverse proxy in front of the bot); the bot
    # itself listens on 127.0.0.1:port under the same path, where this test posts directly.
    public_url = "https://bot.example.org/labelgram-hook"
    hook_url = f"http://127.0.0.1:{port}/labelgram-hook"
    async with BotApiStandIn(token=TOKEN) as api:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABELGRAM_", "TELEGRAM_"))}
        env.update(
            TELEGRAM_BOT_TOKEN=TOKEN,
            LABELGRAM_TELEGRAM__BASE_URL=api.base_url,
            LABELGRAM_TELEGRAM__BASE_FILE_URL=api.base_file_url,
            LABELGRAM_TELEGRAM__MODE="webhook",
            LABELGRAM_TELEGRAM__WEBHOOK_URL=public_url,
            LABELGRAM_TELEGRAM__WEBHOOK_LISTEN="127.0.0.1",
            LABELGRAM_TELEGRAM__WEBHOOK_PORT=str(port),
            LABELGRAM_TELEGRAM__WEBHOOK_SECRET_TOKEN=SECRET,
            LABELGRAM_STORE_DIR=str(store_copy),
            LABELGRAM_ADMINS=str(ADMIN),
            LABELGRAM_LIMITS__MIN_FREE_DISK_MB="0",
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}
        )
        try:
            registered = await api.wait_for(lambda c: c.method == "setWebhook", timeout=60)
            await api.wait_for(lambda c: c.method == "setMyCommands", timeout=60)
            assert registered.params["url"] == public_url
            assert registered.params.get("secret_token") == SECRET
            update = api.make_photo_update(USER, USER, photos("shoes")[0].read_bytes())
            update["update_id"] = 1  # push_update would assign it; here Telegram's role is ours
            async with aiohttp.ClientSession() as http:

                async def post(headers: dict[str, str]) -> int:
                    for _ in range(100):  # the webhook server may still be starting
                        try:
                            async with http.post(hook_url, json=update, headers=headers) as resp:
                                return resp.status
                        except aiohttp.ClientConnectorError:
                            await asyncio.sleep(0.2)
                    raise AssertionError("the webhook server never accepted a connection")

                # Without the secret header the bot must not act on the update.
                assert await post({}) == 403
                assert await post({"X-Telegram-Bot-Api-Secret-Token": SECRET}) == 200
            call = await api.wait_for_reply(USER, update["message"]["message_id"], timeout=60)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
            code = await asyncio.wait_for(proc.wait(), 60)
    assert labels_in(str(call.params["text"]))[0] == "shoes"
    assert len(api.replies_to(USER, update["message"]["message_id"])) == 1
    assert code == 0
    out, err = capfd.readouterr()
    assert TOKEN.split(":")[1] not in out + err and SECRET not in out + err
