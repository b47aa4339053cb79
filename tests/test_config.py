"""Configuration: the example file, environment overrides, one-line errors naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bot.config import BOT_API_DOWNLOAD_LIMIT, Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_parses_and_documents_every_default() -> None:
    loaded = load_config(EXAMPLE)
    assert loaded.model_dump() == Config().model_dump()
    assert loaded.token is None
    assert loaded.classify.max_file_bytes == BOT_API_DOWNLOAD_LIMIT == 20 * 1024 * 1024
    assert loaded.training.schedule == "0 3 * * *" and loaded.training.timezone == "UTC"


def test_example_config_lists_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    for name, field in Config.model_fields.items():
        assert name in data, f"config.example.toml lacks {name}"
        section = field.annotation
        if isinstance(section, type) and hasattr(section, "model_fields"):
            missing = set(section.model_fields) - set(data[name])
            assert not missing, f"config.example.toml [{name}] lacks {sorted(missing)}"


def test_file_values_are_read(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
            admins = [111, 222]
            store_dir = "data/store"
            [telegram]
            token = "123456:ABC-def_GHI"
            base_url = "http://127.0.0.1:8081/bot"
            base_file_url = "http://127.0.0.1:8081/file/bot"
            local_mode = true
            [classify]
            top_k = 5
            [training]
            schedule = "30 2 * * 1-5"
            timezone = "Europe/Berlin"
            [logging]
            level = "debug"
            """,
        )
    )
    assert cfg.admins == [111, 222]
    assert cfg.store_dir == Path("data/store")
    assert cfg.token == "123456:ABC-def_GHI"
    assert cfg.telegram.local_mode is True
    assert cfg.classify.top_k == 5
    assert cfg.logging.level == "DEBUG"
    trigger = cfg.training.trigger()
    assert str(trigger.timezone) == "Europe/Berlin"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[telegram]\nbase_url = "http://file.example/bot"\n[classify]\ntop_k = 2\n')
    monkeypatch.setenv("LABELGRAM_TELEGRAM__BASE_URL", "http://127.0.0.1:9/bot")
    monkeypatch.setenv("LABELGRAM_CLASSIFY__TOP_K", "4")
    monkeypatch.setenv("LABELGRAM_ADMINS", "5, 6")
    monkeypatch.setenv("LABELGRAM_TRAINING__INTERVAL_SECONDS", "2.5")
    cfg = load_config(path)
    assert cfg.telegram.base_url == "http://127.0.0.1:9/bot"
    assert cfg.classify.top_k == 4
    assert cfg.admins == [5, 6]
    assert cfg.training.interval_seconds == 2.5
    monkeypatch.setenv("LABELGRAM_ADMINS", "[7]")
    assert load_config(path).admins == [7]


def test_token_from_environment_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[telegram]\ntoken = "1:file"\n')
    assert load_config(path).token == "1:file"
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "2:env")
    assert load_config(path).token == "2:env"
    monkeypatch.setenv("LABELGRAM_TELEGRAM__TOKEN", "3:labelgram")
    assert load_config(path).token == "3:labelgram"


def test_token_never_in_repr_or_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "987654:SECRETsecret")
    cfg = load_config()
    assert "SECRETsecret" not in repr(cfg) and "SECRETsecret" not in str(cfg.model_dump())
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "987654 SECRETsecret")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(info.value).startswith("config error: telegram.token: ")
    assert "SECRETsecret" not in str(info.value)


def test_missing_token_is_none() -> None:
    assert load_config().token is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[training]\ntimezone = "Mars/Base"\n', "config error: training.timezone: unknown time zone 'Mars/Base'"),
        ('[training]\nschedule = "0 25 * * *"\n', "config error: training.schedule: invalid cron expression '0 25 * * *'"),
        ('[training]\nschedule = "every night"\n', "config error: training.schedule: invalid cron expression"),
        ('[classify]\ntop_k = 0\n', "config error: classify.top_k: must be greater than or equal to 1"),
        ('[classify]\nconfidence_threshold = 1.5\n', "config error: classify.confidence_threshold: must be less than or equal to 1"),
        ('[telegram]\nmode = "push"\n', "config error: telegram.mode: must be 'polling' or 'webhook'"),
        ('[telegram]\nmode = "webhook"\n', "config error: telegram.webhook_url: is required"),
        ('[telegram]\nbase_url = "127.0.0.1:8081"\n', "config error: telegram.base_url: must be an http:// or https:// URL"),
        ('[telegram]\nwebhook_port = 70000\n', "config error: telegram.webhook_port: must be less than or equal to 65535"),
        ('admins = ["@alice"]\n', "config error: admins: must be a list of numeric Telegram user ids"),
        ("admins = [-5]\n", "config error: admins: -5 is not a user id"),
        ('[trainig]\nepochs = 3\n', "config error: trainig: unknown setting"),
        ('[training]\nepoch = 3\n', "config error: training.epoch: unknown setting"),
        ('[logging]\nlevel = "LOUD"\n', "config error: logging.level: must be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
        (
            "[training]\nvalidation_percentage = 60\ntesting_percentage = 50\n",
            "config error: training: validation_percentage + testing_percentage must be below 100",
        ),
        ("[training\n", "invalid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELGRAM_TRAINING__TIMEZONE", "Mars/Base")
    with pytest.raises(ConfigError, match=r"^config error: training.timezone: unknown time zone 'Mars/Base'$"):
        load_config()
    monkeypatch.delenv("LABELGRAM_TRAINING__TIMEZONE")
    monkeypatch.setenv("LABELGRAM_CLASSIFY__TOP_K", "many")
    with pytest.raises(ConfigError, match=r"^config error: classify.top_k: must be a valid integer"):
        load_config()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELGRAM_CONFIG", str(write(tmp_path, "admins = [42]\n")))
    assert load_config().admins == [42]
