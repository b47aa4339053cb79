"""The bot's configuration: one TOML file, every key overridable by an environment variable.

Precedence, highest first:

1. environment variables ``LABELGRAM_<SECTION>__<KEY>`` (``LABELGRAM_TELEGRAM__BASE_URL``,
   ``LABELGRAM_CLASSIFY__TOP_K``, ``LABELGRAM_STORE_DIR``, ``LABELGRAM_ADMINS="[1, 2]"`` or
   ``"1,2"``);
2. for the token only, ``TELEGRAM_BOT_TOKEN`` (the name most deployment guides use);
3. the TOML file (see ``config.example.toml``, which documents every key and its default);
4. the defaults below.

:func:`load_config` turns every problem into a :class:`ConfigError` whose message is one line
naming the key and what is wrong, e.g.
``config error: training.timezone: unknown time zone 'Mars/Base'``. The token is a
:class:`~pydantic.SecretStr`: it never shows in ``repr()``, in error messages or in logs.

Why this module is long: it is the whole configuration schema, one pydantic model per section
with the checks of its keys (token format, webhook secret, admin ids, cron and time zone, split
percentages, older key spellings), kept in one file so that it reads as the reference of every key
next to ``config.example.toml``; splitting it by section would scatter the precedence rules above.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from telegram.constants import ChatID

from bot.logsafe import redact
from model_store.backbones import DEFAULT_BACKBONE
from model_store.training import TrainConfig

__all__ = [
    "BOT_API_DOWNLOAD_LIMIT",
    "ClassifyConfig",
    "Config",
    "ConfigError",
    "EngineConfig",
    "LimitsConfig",
    "LoggingConfig",
    "ReviewConfig",
    "TelegramConfig",
    "TrainingConfig",
    "load_config",
]

ENV_PREFIX = "LABELGRAM_"
TOKEN_ENV = "TELEGRAM_BOT_TOKEN"
CONFIG_PATH_ENV = "LABELGRAM_CONFIG"

BOT_API_DOWNLOAD_LIMIT = 20 * 1024 * 1024
"""The public Bot API server lets bots download files of up to 20 MB (``getFile``)."""

_TOKEN_RE = re.compile(r"^[0-9]+:[A-Za-z0-9_-]+$")
# anything shaped like a bot token (also with a percent-encoded colon), for scrubbing error messages
_TOKEN_LIKE = re.compile(r"[0-9]{3,}(?::|%(?:25)?3[aA])[A-Za-z0-9_-]{8,}")

PSEUDO_USER_IDS = {
    int(ChatID.ANONYMOUS_ADMIN): "GroupAnonymousBot, the sender Telegram shows for every anonymous group admin",
    int(ChatID.FAKE_CHANNEL): "Channel_Bot, the sender Telegram shows for messages posted on behalf of a channel",
    int(ChatID.SERVICE_CHAT): "Telegram's service notifications account (777000)",
}
"""User ids that are not people (1087968824, 136817688, 777000; PTB's ``telegram.constants.ChatID``):
as an admin, each would make strangers (e.g. every anonymous group admin anywhere) admins of the bot."""


class ConfigError(Exception):
    """The configuration cannot be used. ``str(error)`` is one line, safe to print (no secrets)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


#: Shortest ``webhook_secret_token`` accepted (Telegram itself allows 1-256 characters).
MIN_WEBHOOK_SECRET_LENGTH = 16
_MAKE_SECRET = "; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class TelegramConfig(_Section):
    """``[telegram]``: how to reach the Bot API and how to receive updates."""

    token: SecretStr | None = None
    base_url: str | None = None
    base_file_url: str | None = None
    local_mode: bool = False
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = Field(8443, ge=1, le=65535)
    webhook_secret_token: SecretStr | None = None
    max_requests_per_second: float = Field(30.0, ge=0)
    concurrent_updates: int = Field(256, ge=1)

    @field_validator("token", "webhook_secret_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _TOKEN_RE.match(value.get_secret_value()):
            # never echo the value: it may be a real token with a typo
            raise ValueError("does not look like a bot token (expected digits, ':', then letters/digits)")
        return value

    @field_validator("webhook_secret_token")
    @classmethod
    def _secret_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value()
        # never echo the value. Telegram accepts 1-256 characters; a short one is guessable and
        # would make log redaction mangle ordinary text, so at least MIN_WEBHOOK_SECRET_LENGTH.
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise ValueError(f"must be {MIN_WEBHOOK_SECRET_LENGTH}-256 characters of A-Z, a-z, 0-9, _ and -{_MAKE_SECRET}")
        if len(secret) < MIN_WEBHOOK_SECRET_LENGTH:
            raise ValueError(
                f"is too short ({len(secret)} characters; at least {MIN_WEBHOOK_SECRET_LENGTH} are needed, "
                f"so that it cannot be guessed){_MAKE_SECRET}"
            )
        return value

    @field_validator("base_url", "base_file_url", "webhook_url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("must be a URL string")
        value = value.strip()
        if not value:
            return None
        if not re.match(r"^https?://[^\s/]+", value):
            # never echo the value: a webhook URL often carries the bot token as its path
            raise ValueError("must be an http:// or https:// URL (the value is not shown: it may hold a secret)")
        return value

    @model_validator(mode="after")
    def _webhook_needs_url_and_secret(self) -> TelegramConfig:
        if self.mode == "webhook" and not self.webhook_url:
            raise ValueError("webhook_url: is required when mode = \"webhook\"")
        if self.mode == "webhook" and self.webhook_secret_token is None:
            # Without it, anyone who learns the URL can post forged updates (e.g. an admin's /delete).
            raise ValueError(
                "webhook_secret_token: is required when mode = \"webhook\" (without it anyone who "
                "finds the URL can post forged updates); make one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return self


class ClassifyConfig(_Section):
    """``[classify]``: answering photos."""

    top_k: int = Field(3, ge=1, le=20)
    confidence_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_file_bytes: int = Field(BOT_API_DOWNLOAD_LIMIT, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    batch_window_ms: float = Field(10.0, ge=0, le=10_000)
    max_batch: int = Field(8, ge=1, le=1024)
    album_wait_ms: float = Field(800.0, ge=0, le=60_000)


#: the defaults of every training setting: the library's (one source of defaults)
_TRAIN_DEFAULTS = TrainConfig()


class TrainingConfig(_Section):
    """``[training]``: when and how the model is retrained.

    The keys of the training settings are the field names of :class:`model_store.training.TrainConfig`
    (and of the ``python -m bot retrain`` flags), with its defaults; :meth:`train_config` makes the
    ``TrainConfig``. Older spellings keep working as aliases: ``batch_size`` (now
    ``train_batch_size``) and ``flip`` (now ``flip_left_right``). ``backbone`` and
    ``backbone_weights`` are the ``backbone`` / ``weights`` arguments of ``retrain()``.
    """

    #: the keys that are :class:`~model_store.training.TrainConfig` fields of the same name
    TRAIN_CONFIG_KEYS: ClassVar[tuple[str, ...]] = (
        "epochs", "learning_rate", "train_batch_size", "validation_percentage", "testing_percentage",
        "min_images_per_label", "flip_left_right", "accuracy_floor", "max_accuracy_drop", "keep_versions",
    )  # fmt: skip

    schedule: str = "0 3 * * *"
    timezone: str = "UTC"
    interval_seconds: float = Field(0, ge=0)
    backbone: str = DEFAULT_BACKBONE
    backbone_weights: str = "imagenet"
    epochs: int = Field(_TRAIN_DEFAULTS.epochs, ge=1, le=100_000)
    learning_rate: float = Field(_TRAIN_DEFAULTS.learning_rate, gt=0, le=10)
    train_batch_size: int = Field(
        _TRAIN_DEFAULTS.train_batch_size,
        ge=1,
        le=65_536,
        validation_alias=AliasChoices("train_batch_size", "batch_size"),
    )
    validation_percentage: float = Field(_TRAIN_DEFAULTS.validation_percentage, ge=0, lt=100)
    testing_percentage: float = Field(_TRAIN_DEFAULTS.testing_percentage, ge=0, lt=100)
    min_images_per_label: int = Field(_TRAIN_DEFAULTS.min_images_per_label, ge=1)
    flip_left_right: bool = Field(
        _TRAIN_DEFAULTS.flip_left_right, validation_alias=AliasChoices("flip_left_right", "flip")
    )
    accuracy_floor: float = Field(_TRAIN_DEFAULTS.accuracy_floor, ge=0, le=1)
    max_accuracy_drop: float = Field(_TRAIN_DEFAULTS.max_accuracy_drop, ge=0, le=1)
    keep_versions: int = Field(_TRAIN_DEFAULTS.keep_versions, ge=1)
    max_minutes: float = Field(180, gt=0)

    #: older spellings of keys, still accepted (config files written before they were renamed)
    OLD_KEYS: ClassVar[dict[str, str]] = {"batch_size": "train_batch_size", "flip": "flip_left_right"}

    @model_validator(mode="before")
    @classmethod
    def _one_spelling(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for old, new in cls.OLD_KEYS.items():
                if old in data and new in data:
                    raise ValueError(f"{old}: is the older name of {new}; give only one of them")
        return data

    def train_config(self) -> TrainConfig:
        """These settings as the library's :class:`~model_store.training.TrainConfig` (other fields: its defaults)."""
        return replace(_TRAIN_DEFAULTS, **{key: getattr(self, key) for key in self.TRAIN_CONFIG_KEYS})

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        value = " ".join(value.split())
        try:
            CronTrigger.from_crontab(value, timezone=ZoneInfo("UTC"))
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _split(self) -> TrainingConfig:
        if self.validation_percentage + self.testing_percentage >= 100:
            raise ValueError("validation_percentage + testing_percentage must be below 100")
        return self

    def trigger(self) -> CronTrigger:
        """The APScheduler trigger for :attr:`schedule` in :attr:`timezone`."""
        return CronTrigger.from_crontab(self.schedule, timezone=ZoneInfo(self.timezone))


class EngineConfig(_Section):
    """``[engine]``: how the frozen model runs (bottlenecks in training, and serving)."""

    engine: Literal["litert", "tensorflow"] = "litert"
    threads: int = Field(0, ge=0, le=1024)

    def settings(self):
        """The ``model_store.engine.EngineSettings`` of this section."""
        from model_store.engine import EngineSettings

        return EngineSettings(self.engine, self.threads)


class LimitsConfig(_Section):
    """``[limits]``: protection against floods and full disks."""

    photos_per_minute: int = Field(30, ge=0)
    messages_per_minute: int = Field(60, ge=0)
    min_free_disk_mb: int = Field(500, ge=0)
    # Outgoing messages, paced to Telegram's flood limits (bot.ratelimit; docs/flood_control.md)
    chat_messages_burst: int = Field(20, ge=1)
    chat_messages_per_second: float = Field(1.0, ge=0)
    group_messages_burst: int = Field(20, ge=1)
    group_messages_per_minute: float = Field(20.0, ge=0)
    reply_deadline_seconds: float = Field(600.0, gt=0)
    # Coalesced /add acknowledgements (bot.acks)
    teaching_edit_seconds: float = Field(3.0, ge=0)
    teaching_burst_seconds: float = Field(10.0, ge=0)


class ReviewConfig(_Section):
    """``[review]``: users' feedback on answers, the admins' review queue (/review), active learning.

    ``max_queue``, ``max_answers``, ``keep_days`` and ``uncertain_margin`` are the review store's
    ``ReviewSettings`` (``model_store.review``), ``auto_queue`` is passed with every answer; the
    other keys are the bot's.
    """

    #: the feedback buttons under every answer to a photo (false: answers carry no keyboard)
    feedback: bool = True
    #: active learning: answers the model is least sure of enter the queue even without feedback
    #: ("unknown" ones always do)
    auto_queue: bool = True
    #: an answer enters the queue on its own when the margin between its two best probabilities is
    #: under this (model_store.active_learning.margin_uncertainty)
    uncertain_margin: float = Field(0.2, ge=0.0, le=1.0)
    #: most items waiting in the review queue (the least informative ones make room)
    max_queue: int = Field(200, ge=1, le=1_000_000)
    #: most answers kept (the oldest, with their feedback, make room)
    max_answers: int = Field(10_000, ge=1, le=10_000_000)
    #: answers, feedback and queued photos (file ids) older than this are deleted
    keep_days: float = Field(30.0, gt=0, le=3650)
    #: labels shown per page of the "which label?" buttons
    labels_per_page: int = Field(8, ge=2, le=50)
    #: keyboards whose buttons the bot remembers (PTB's arbitrary callback data cache, in memory):
    #: the answers older than the last this many cannot be rated any more, nor after a restart
    button_cache: int = Field(10_000, ge=100, le=1_000_000)


class LoggingConfig(_Section):
    """``[logging]``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class _CurrentKeyNames(PydanticBaseSettingsSource):
    """A settings source whose ``[training]`` keys with an older name (``TrainingConfig.OLD_KEYS``)
    are renamed to the current one, so that precedence between sources holds across spellings."""

    def __init__(self, settings_cls: type[BaseSettings], source: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._source = source

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: :meth:`__call__` delegates to the wrapped source."""
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = self._source()
        training = data.get("training")
        if not isinstance(training, Mapping):
            return data
        training = dict(training)
        for old, new in TrainingConfig.OLD_KEYS.items():
            if old in training:
                if new in training:
                    raise ConfigError(f"config error: training.{old}: is the older name of {new}; give only one of them")
                training[new] = training.pop(old)
        return {**data, "training": training}


class Config(BaseSettings):
    """The whole configuration. Build it with :func:`load_config`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    telegram: TelegramConfig = TelegramConfig()
    admins: Annotated[list[int], NoDecode] = []
    store_dir: Path = Path("store")
    classify: ClassifyConfig = ClassifyConfig()
    training: TrainingConfig = TrainingConfig()
    engine: EngineConfig = EngineConfig()
    limits: LimitsConfig = LimitsConfig()
    logging: LoggingConfig = LoggingConfig()
    #: users whose feedback ("right", "wrong -> label") goes into the training photos at once,
    #: without an admin's review (numeric user ids, like admins)
    teachers: Annotated[list[int], NoDecode] = []
    review: ReviewConfig = ReviewConfig()

    @field_validator("admins", "teachers", mode="before")
    @classmethod
    def _admins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            parts = [p.strip() for p in re.split(r"[,\s]+", text) if p.strip()]
            try:
                return [int(p) for p in parts]
            except ValueError:
                raise ValueError("must be a list of numeric Telegram user ids, e.g. [12345, 67890]") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, list):
            for item in value:
                numeric = isinstance(item, int) and not isinstance(item, bool)
                if not numeric and not (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
                    raise ValueError(
                        f"must be a list of numeric Telegram user ids, e.g. [12345, 67890] "
                        f"(usernames are not accepted: they can change hands), got {item!r}"
                    )
        return value

    @field_validator("admins", "teachers")
    @classmethod
    def _admin_ids(cls, value: list[int], info: ValidationInfo) -> list[int]:
        role, article = ("teacher", "a") if info.field_name == "teachers" else ("admin", "an")
        for uid in value:
            if uid <= 0:
                raise ValueError(f"{uid} is not a user id (user ids are positive numbers)")
            if uid in PSEUDO_USER_IDS:
                raise ValueError(
                    f"{uid} is not a person but {PSEUDO_USER_IDS[uid]}; as {article} {role} it would make "
                    f"strangers {role}s of this bot. List the {role}s' own numeric user ids instead."
                )
        return list(dict.fromkeys(value))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the file; the file data comes in as init kwargs.
        """Environment variables first, then the TOML data (passed as init kwargs); in both,
        older key names are read as the current ones (so the environment still beats the file)."""
        return (_CurrentKeyNames(settings_cls, env_settings), _CurrentKeyNames(settings_cls, init_settings))

    @property
    def token(self) -> str | None:
        """The bot token in clear (for the ApplicationBuilder and the log redactor only)."""
        return self.telegram.token.get_secret_value() if self.telegram.token else None

    @property
    def webhook_secret(self) -> str | None:
        """The webhook secret token in clear (for ``run_webhook`` and the log redactor only)."""
        secret = self.telegram.webhook_secret_token
        return secret.get_secret_value() if secret else None

    def is_admin(self, user_id: int | None) -> bool:
        """Whether ``user_id`` is listed in :attr:`admins` (None is never an admin)."""
        return user_id is not None and user_id in self.admins


def _format_error(error: Mapping[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ())]
    msg = str(error.get("msg", "invalid value"))
    kind = error.get("type", "")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # A model-level validator names its key at the start of its message ("webhook_url: ...").
    head = re.match(r"^([a-z_]+): (.*)$", msg)
    if head and kind == "value_error" and len(loc) <= 1:
        loc = [*loc, head.group(1)]
        msg = head.group(2)
    if kind == "extra_forbidden":
        msg = "unknown setting (check the spelling against config.example.toml)"
    elif kind == "literal_error":
        msg = msg.replace("Input should be", "must be")
    elif msg.startswith("Input should be"):
        msg = "must be" + msg[len("Input should be") :]
    where = ".".join(loc) if loc else "(top level)"
    return f"config error: {where}: {msg}"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config error: {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config error: {path}: is a folder, not a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config error: {path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {path}: not UTF-8 text") from None


def _given_secrets(data: Mapping[str, Any]) -> list[str]:
    """The token and webhook secret as given (file, ``TELEGRAM_BOT_TOKEN``, ``LABELGRAM_TELEGRAM*``),
    valid or not, so that an error message can be scrubbed of them."""
    found: list[Any] = []
    telegram = data.get("telegram")
    if isinstance(telegram, Mapping):
        found += [telegram.get("token"), telegram.get("webhook_secret_token")]
    for name, value in os.environ.items():
        upper = name.upper()
        if upper == TOKEN_ENV or upper.startswith(f"{ENV_PREFIX}TELEGRAM__") and upper.endswith("TOKEN"):
            found.append(value)
        elif upper == f"{ENV_PREFIX}TELEGRAM":
            try:
                parsed = json.loads(value)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                found += [parsed.get("token"), parsed.get("webhook_secret_token")]
    return [s.strip() for s in found if isinstance(s, str) and len(s.strip()) >= 4]


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the configuration.

    Args:
        path: the TOML file; None uses ``$LABELGRAM_CONFIG`` if set, else defaults + environment only.

    Returns:
        The validated :class:`Config` (``token`` may be None: :func:`bot.app.run` explains what to do).

    Raises:
        ConfigError: with one line naming the key and the problem.
    """
    if path is None and os.environ.get(CONFIG_PATH_ENV):
        path = os.environ[CONFIG_PATH_ENV]
    data: dict[str, Any] = dict(_read_toml(Path(path))) if path is not None else {}

    has_env_token = any(k.upper() == f"{ENV_PREFIX}TELEGRAM__TOKEN" for k in os.environ)
    if not has_env_token and os.environ.get(TOKEN_ENV, "").strip():
        telegram = data.get("telegram")
        telegram = dict(telegram) if isinstance(telegram, dict) else {}
        telegram["token"] = os.environ[TOKEN_ENV]
        data["telegram"] = telegram

    try:
        return Config(**data)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        message = redact(_format_error(errors[0]), _given_secrets(data))
        raise ConfigError(_TOKEN_LIKE.sub("<token>", message)) from None
    except ValueError as exc:  # pydantic-settings' SettingsError: an env var that is not valid JSON
        m = re.search(r'field "([^"]+)"', str(exc))
        where = m.group(1) if m else "environment"
        raise ConfigError(
            f"config error: {where}: cannot parse the value given in the environment ({ENV_PREFIX}...)"
        ) from None
