"""Hardening round 2 (issue 8, points 2, 6 and 7): webhook secret, secrets in any form, pseudo-user admins.

* Webhook mode refuses to start without ``webhook_secret_token`` (anyone who found the URL could
  post forged admin commands), and the secret is redacted from the logs like the token, also at
  DEBUG where PTB logs ``setWebhook``'s parameters.
* The token is redacted in any mix of literal and percent-encoded characters and by its secret
  half alone; it never shows in a configuration error (a bad ``webhook_url`` that holds it); it
  never reaches the training subprocess's environment, however it was given.
* Telegram's pseudo-user ids (GroupAnonymousBot, Channel_Bot, service notifications) are refused
  in ``admins`` with a message saying why.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest

from bot.app import build_application
from bot.config import ConfigError, load_config
from bot.logsafe import REDACTED, TokenRedactingFilter, redact
from bot.state import BotState
from bot.training_runner import Trainer
from tests.auxil.bot_harness import bot_config
from tests.botapi_standin import BotApiStandIn

TOKEN = "987654321:AAHsecretPartOfTheToken_x-Y"
HALF = TOKEN.split(":", 1)[1]
HOOK_SECRET = "hook_Secret-value_0123456789"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ point 2: webhook secret
def test_webhook_mode_without_a_secret_refuses_to_start(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[telegram]\nmode = "webhook"\nwebhook_url = "https://bot.example.org/hook"\nwebhook_listen = "0.0.0.0"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("config error: telegram.webhook_secret_token: is required when mode = \"webhook\"")
    assert "forged" in message and "secrets.token_urlsafe" in message
    # with a secret it starts; polling never needs one
    assert load_config(write(tmp_path, f'[telegram]\nmode = "webhook"\nwebhook_url = "https://h/x"\n'
                                       f'webhook_secret_token = "{HOOK_SECRET}"\n')).telegram.mode == "webhook"
    assert load_config(write(tmp_path, "[telegram]\n")).telegram.webhook_secret_token is None


@pytest.mark.parametrize("secret", ["x", "e", "abc123", "a" * 15])
def test_a_short_webhook_secret_is_refused_naming_the_key_and_how_to_make_one(tmp_path: Path, secret: str) -> None:
    # A 1-character secret was accepted, then redaction replaced that character in every log line.
    path = write(tmp_path, f'[telegram]\nmode = "webhook"\nwebhook_url = "https://h/x"\n'
                           f'webhook_secret_token = "{secret}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("config error: telegram.webhook_secret_token: is too short")
    assert "at least 16" in message and "secrets.token_urlsafe" in message
    assert f'"{secret}"' not in message and f"'{secret}'" not in message
    ok = write(tmp_path, f'[telegram]\nmode = "webhook"\nwebhook_url = "https://h/x"\n'
                         f'webhook_secret_token = "{"a" * 16}"\n')
    assert load_config(ok).telegram.webhook_secret_token is not None


def test_redaction_never_redacts_a_secret_too_short_to_be_one() -> None:
    line = "every line has an e and an x in it: exit 0"
    assert redact(line, ["e"]) == line and redact(line, ["x", "exit", "an e "]) == line
    assert redact(f"the secret {HOOK_SECRET} here", ["e", HOOK_SECRET]) == f"the secret {REDACTED} here"


async def test_webhook_secret_is_redacted_from_ptb_debug_logs(botapi: BotApiStandIn, tmp_path: Path) -> None:
    """PTB logs every Bot API call's parameters at DEBUG: setWebhook's include the secret."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        config = bot_config(
            botapi,
            tmp_path / "store",
            telegram={
                "mode": "webhook",
                "webhook_url": "https://bot.example.org/hook",
                "webhook_secret_token": HOOK_SECRET,
            },
        )
        app = build_application(config)
        async with app:
            await app.bot.set_webhook("https://bot.example.org/hook", secret_token=HOOK_SECRET)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for f in list(handler.filters):
            handler.removeFilter(f)
    out = stream.getvalue()
    assert "setWebhook" in out, "PTB's DEBUG line about setWebhook was not logged at all"
    assert HOOK_SECRET not in out
    assert REDACTED in out
    assert botapi.token not in out


# ------------------------------------------------------------------------------ point 6: secrets in any form
@pytest.mark.parametrize(
    "text",
    [
        f"GET https://api.telegram.org/bot{TOKEN}/getMe",
        f"GET https://api.telegram.org/bot{TOKEN.replace(':', '%3A')}/getMe",
        f"GET https://api.telegram.org/bot{TOKEN.replace(':', '%3a')}/getMe",
        f"double encoded {TOKEN.replace(':', '%253A')}",
        f"fully encoded {''.join(f'%{b:02X}' for b in TOKEN.encode())}",
        f"only the secret half: {HALF}!",
        f"half, encoded: {HALF.replace('_', '%5F')}",
    ],
)
def test_token_is_redacted_in_any_encoding_or_part(text: str) -> None:
    cleaned = redact(text, [TOKEN])
    assert HALF not in cleaned and "secretPart" not in cleaned
    assert REDACTED in cleaned


def test_filter_redacts_the_webhook_secret_and_token_half_in_records() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TokenRedactingFilter(TOKEN, HOOK_SECRET))
    logger = logging.getLogger("tests.hardening.secrets")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("params %s", {"secret_token": HOOK_SECRET, "url": f"https://h/{HALF}"})
        logger.warning("url %s", f"https://h/bot{TOKEN.replace(':', '%3a')}/x")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert HOOK_SECRET not in out and HALF not in out and "secretPart" not in out
    assert out.count(REDACTED) == 3


@pytest.mark.parametrize(
    "text",
    [
        f'[telegram]\nwebhook_url = "ftp://bot.example.org/{TOKEN}"\n',
        f'[telegram]\nwebhook_url = "bot.example.org/{TOKEN}"\n',
        f'[telegram]\nbase_url = "api.telegram.org/bot{TOKEN}"\n',
        f'[telegram]\nwebhook_url = "ftp://bot.example.org/{TOKEN.replace(":", "%3A")}"\n',
        f'[training]\ntimezone = "{TOKEN}"\n',
    ],
)
def test_config_errors_never_print_the_token(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith("config error: ")
    assert HALF not in message and "secretPart" not in message


def test_config_errors_never_print_a_secret_given_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever field a secret lands in by mistake, the error text does not carry the configured secrets."""
    monkeypatch.setenv("LABELGRAM_TELEGRAM__WEBHOOK_SECRET_TOKEN", HOOK_SECRET)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f'[training]\ntimezone = "{HOOK_SECRET}"\n'))
    assert str(info.value).startswith("config error: training.timezone: unknown time zone")
    assert HOOK_SECRET not in str(info.value)


async def test_training_subprocess_environment_holds_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token given every way the configuration accepts it; the child prints its environment."""
    monkeypatch.setenv("LABELGRAM_TELEGRAM", json.dumps({"token": TOKEN, "webhook_secret_token": HOOK_SECRET}))
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("LABELGRAM_TELEGRAM__BASE_URL", "http://127.0.0.1:8081/bot")
    monkeypatch.setenv("labelgram_telegram__token", TOKEN)  # names are case-insensitive
    monkeypatch.setenv("MY_HOOK_URL", f"https://h/{TOKEN.replace(':', '%3A')}")
    monkeypatch.setenv("OTHER_SECRET_COPY", f"x{HALF}y")
    monkeypatch.setenv("LABELGRAM_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("HARMLESS_SETTING", "kept")
    config = load_config()
    assert config.token == TOKEN, "LABELGRAM_TELEGRAM='{\"token\": ...}' is how this token was given"
    dump = "import json, os; print(json.dumps({'event': 'result', 'status': 'failed', 'message': json.dumps(dict(os.environ))}))"
    trainer = Trainer(config, BotState(tmp_path), fingerprint=lambda: "f", command=[sys.executable, "-c", dump])
    async with trainer.lock:
        outcome = await trainer.run()
    child_env = json.loads(outcome.message)
    assert child_env.get("HARMLESS_SETTING") == "kept" and child_env.get("LABELGRAM_STORE_DIR")
    text = json.dumps(child_env)
    assert HALF not in text and HOOK_SECRET not in text and "secretPart" not in text
    assert not [k for k in child_env if k.upper().startswith("LABELGRAM_TELEGRAM") or k == "TELEGRAM_BOT_TOKEN"]


# ------------------------------------------------------------------------------ point 7: pseudo-user admins
@pytest.mark.parametrize(
    ("uid", "who"),
    [(1087968824, "GroupAnonymousBot"), (136817688, "Channel_Bot"), (777000, "service notifications")],
)
def test_pseudo_user_ids_are_refused_as_admins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uid: int, who: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"admins = [12345, {uid}]\n"))
    message = str(info.value)
    assert message.startswith(f"config error: admins: {uid} is not a person but ")
    assert who in message and "admins of this bot" in message
    assert "\n" not in message
    monkeypatch.setenv("LABELGRAM_ADMINS", f"12345,{uid}")
    with pytest.raises(ConfigError, match=f"admins: {uid} is not a person"):
        load_config()
    monkeypatch.setenv("LABELGRAM_ADMINS", "12345,67890")
    assert load_config().admins == [12345, 67890]
