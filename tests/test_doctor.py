"""``python -m bot doctor``: each check names what is wrong and the fix, never a secret.

The token check talks to the Bot API stand-in over HTTP (PTB's real ``Bot.get_me``); the store
checks use real folders and the real store lock; the healthy case is the session-trained store.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from bot import doctor
from bot.app import BOT_LOCK_FILE, acquire_store_lock
from bot.config import Config
from bot.doctor import Status
from tests.auxil.bot_harness import bot_config
from tests.auxil.modelstore import run_cli
from tests.botapi_standin import BotApiStandIn

TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
SECRET = "WebhookSecret_0123456789abcdef"


def _write_config(path: Path, store: Path, *, telegram: str = "", extra: str = "") -> Path:
    path.write_text(
        f'store_dir = "{store}"\nadmins = [1001]\n[telegram]\n{telegram}\n'
        f'[training]\nbackbone = "efficientnet_lite0"\n[limits]\nmin_free_disk_mb = 0\n{extra}',
        encoding="utf-8",
    )
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_name(report: doctor.Report) -> dict[str, doctor.Check]:
    return {c.name: c for c in report.checks}


def _offline(**telegram: Any) -> dict[str, Any]:
    """A [telegram] section pointing at a port nobody listens on (Telegram 'unreachable')."""
    port = _closed_port()
    return {
        "base_url": f"http://127.0.0.1:{port}/bot",
        "base_file_url": f"http://127.0.0.1:{port}/file/bot",
        **telegram,
    }


# ---------------------------------------------------------------------------------------- config
def test_broken_config_is_a_problem_with_its_key_and_exit_code_1(tmp_path: Path, capsys) -> None:
    path = _write_config(tmp_path / "config.toml", tmp_path / "store", extra='[logging]\nlevel = "LOUD"\n')
    report = doctor.run_checks(str(path))
    (check,) = report.checks  # nothing else can be judged without a config
    assert check.name == "config" and check.status is Status.PROBLEM
    assert "logging.level" in check.summary and check.fix
    assert doctor.main(str(path)) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "logging.level" in out and "fix:" in out


def test_invalid_toml_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("store_dir = [unclosed\n", encoding="utf-8")
    (check,) = doctor.run_checks(str(path)).checks
    assert check.status is Status.PROBLEM and "invalid TOML" in check.summary


def test_malformed_token_is_a_config_problem_without_the_token(tmp_path: Path, capsys) -> None:
    bad = "123456789:AAH dq!Tcv"
    path = _write_config(tmp_path / "config.toml", tmp_path, telegram=f'token = "{bad}"')
    assert doctor.main(str(path), as_json=True) == 1
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["ok"] is False
    assert "telegram.token" in result["checks"][0]["summary"]
    assert "dq!Tcv" not in out


# ----------------------------------------------------------------------------------------- token
def test_missing_token_is_a_problem_with_botfather_fix(tmp_path: Path) -> None:
    check = doctor.check_token(Config(store_dir=tmp_path))
    assert check.status is Status.PROBLEM
    assert "no Telegram bot token" in check.summary
    assert "@BotFather" in (check.fix or "") and "TELEGRAM_BOT_TOKEN" in (check.fix or "")


async def test_token_accepted_by_the_bot_api(botapi: BotApiStandIn, tmp_path: Path) -> None:
    check = await asyncio.to_thread(doctor.check_token, bot_config(botapi, tmp_path))
    assert check.status is Status.OK, check
    assert [c.method for c in botapi.calls] == ["getMe"]
    assert f"@{botapi.bot_user['username']}" in check.summary
    assert botapi.token not in check.summary


async def test_token_rejected_by_the_bot_api_is_a_problem(botapi: BotApiStandIn, tmp_path: Path) -> None:
    config = bot_config(botapi, tmp_path, telegram={"token": TOKEN})
    check = await asyncio.to_thread(doctor.check_token, config)
    assert check.status is Status.PROBLEM
    assert "rejected the token" in check.summary and "@BotFather" in (check.fix or "")
    assert TOKEN not in check.summary + (check.fix or "")


def test_unreachable_bot_api_is_only_a_warning(tmp_path: Path) -> None:
    config = Config(telegram={"token": TOKEN, **_offline()}, store_dir=tmp_path)
    check = doctor.check_token(config, timeout=2)
    assert check.status is Status.WARNING, check
    assert "did not answer" in check.summary and check.fix


# ----------------------------------------------------------------------------------- store, disk
def test_missing_store_folder_is_a_problem(tmp_path: Path) -> None:
    check = doctor.check_store(Config(store_dir=tmp_path / "nope"))
    assert check.status is Status.PROBLEM and "does not exist" in check.summary
    assert "mkdir" in (check.fix or "")
    assert not (tmp_path / "nope").exists()  # the doctor does not create it


def test_store_without_a_model_is_a_problem_with_the_retrain_fix(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    config = Config(store_dir=store)
    assert doctor.check_store(config).status is Status.OK
    assert not (store / BOT_LOCK_FILE).exists()  # probing a lock nobody took creates nothing
    check = doctor.check_model(config)
    assert check.status is Status.PROBLEM and "no model trained yet" in check.summary
    assert "retrain" in (check.fix or "")


def _pointing_at(store: Path, version: str) -> Config:
    """A store whose models/CURRENT names ``version`` (the registry's pointer file is JSON)."""
    (store / "models").mkdir(parents=True)
    (store / "models" / "CURRENT").write_text(json.dumps({"version": version, "history": []}))
    return Config(store_dir=store)


def test_current_naming_a_missing_version_is_a_problem(tmp_path: Path) -> None:
    check = doctor.check_model(_pointing_at(tmp_path / "store", "20260101-000000-abcdef"))
    assert check.status is Status.PROBLEM and "missing or incomplete" in check.summary
    assert "rollback" in (check.fix or "")


@pytest.mark.slow
def test_a_serving_model_that_does_not_load_is_a_problem(tmp_path: Path) -> None:
    config = _pointing_at(tmp_path / "store", "20260101-000000-abcdef")
    version = tmp_path / "store" / "models" / "20260101-000000-abcdef"
    version.mkdir()
    (version / "model.keras").write_bytes(b"not a keras file")  # e.g. damaged on disk
    (version / "labels.txt").write_text("shoes\npants\n")
    check = doctor.check_model(config)
    assert check.status is Status.PROBLEM, check
    assert "20260101-000000-abcdef does not load" in check.summary and "rollback" in (check.fix or "")


def test_store_held_by_a_running_bot_is_reported_and_stays_held(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    lock = acquire_store_lock(store)  # what `python -m bot run` holds for its lifetime
    try:
        check = doctor.check_store(Config(store_dir=store))
        assert check.status is Status.WARNING and "running bot" in check.summary
        assert lock.is_locked  # the running bot keeps its lock
        assert doctor.store_lock_held(store)
    finally:
        lock.release()
    assert not doctor.store_lock_held(store)
    assert doctor.check_store(Config(store_dir=store)).status is Status.OK


def test_disk_floor_above_free_space_is_a_problem(tmp_path: Path) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    check = doctor.check_disk(Config(store_dir=tmp_path, limits={"min_free_disk_mb": free_mb + 10_000}))
    assert check.status is Status.PROBLEM and "below the floor" in check.summary
    assert "min_free_disk_mb" in (check.fix or "")
    assert doctor.check_disk(Config(store_dir=tmp_path, limits={"min_free_disk_mb": 1})).status is Status.OK


def test_no_admins_is_a_warning(tmp_path: Path) -> None:
    check = doctor.check_admins(Config(store_dir=tmp_path))
    assert check.status is Status.WARNING and "admins = [" in (check.fix or "")


def test_unknown_backbone_is_a_problem(tmp_path: Path) -> None:
    check, backbone = doctor.check_backbone(Config(store_dir=tmp_path, training={"backbone": "resnet9000"}))
    assert backbone is None and check.status is Status.PROBLEM and "resnet9000" in check.summary
    assert "efficientnet_lite" in (check.fix or "")


# --------------------------------------------------------------------------------------- secrets
def test_no_secret_in_text_or_json_output(tmp_path: Path, capsys) -> None:
    # Webhook mode (its secret set), the API unreachable, a backbone that does not exist: the
    # lines that might echo a setting all run, and the run stays fast.
    offline = _offline()
    telegram = "\n".join(
        [
            f'token = "{TOKEN}"',
            'mode = "webhook"',
            f'webhook_url = "https://example.org/{TOKEN}"',
            f'webhook_secret_token = "{SECRET}"',
            f'base_url = "{offline["base_url"]}"',
            f'base_file_url = "{offline["base_file_url"]}"',
        ]
    )
    path = _write_config(tmp_path / "config.toml", tmp_path / "missing-store", telegram=telegram)
    path.write_text(path.read_text().replace('"efficientnet_lite0"', f'"/nowhere/{TOKEN}.keras"'))
    for as_json in (False, True):
        doctor.main(str(path), as_json=as_json)
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert "token" in text and "webhook" in text
        for secret in (TOKEN, TOKEN.split(":")[1], SECRET):
            assert secret not in text


# ------------------------------------------------------------------------------ healthy, real CLI
@pytest.mark.slow
async def test_healthy_store_passes_every_check(
    botapi: BotApiStandIn, store_copy: Path, tmp_path: Path
) -> None:
    telegram = (
        f'token = "{botapi.token}"\nbase_url = "{botapi.base_url}"\nbase_file_url = "{botapi.base_file_url}"'
    )
    path = _write_config(tmp_path / "config.toml", store_copy, telegram=telegram)
    report = await asyncio.to_thread(doctor.run_checks, str(path))
    checks = _by_name(report)
    assert list(checks) == [
        "config",
        "token",
        "webhook",
        "store",
        "disk",
        "backbone",
        "engine",
        "model",
        "admins",
    ]
    assert report.ok and all(c.status is Status.OK for c in report.checks), report.render()
    assert "cached conversion" in checks["engine"].summary  # training cached it: no conversion now
    assert "shoes" in checks["model"].summary and "test accuracy" in checks["model"].summary


@pytest.mark.slow
def test_cli_doctor_json_in_a_subprocess(store_copy: Path, tmp_path: Path) -> None:
    """The real ``python -m bot doctor --json``: exit 1 for the missing token, one JSON object."""
    path = _write_config(tmp_path / "config.toml", store_copy)
    proc = run_cli("doctor", "--config", path, "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    status = {c["name"]: c["status"] for c in result["checks"]}
    assert status["token"] == "problem" and status["model"] == "ok" and status["store"] == "ok"
    assert result["ok"] is False and result["seconds"] > 0
