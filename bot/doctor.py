"""``python -m bot doctor``: is this installation ready to run, and if not, what to do about it.

Each check gives one line, ``ok`` / ``warning`` / ``problem``, plus the fix for anything not ok:

* ``config``: the config file loads (the ``ConfigError`` text otherwise);
* ``token``: a token is configured, and if the Bot API answers ``getMe`` (PTB's public
  ``Bot.get_me``, short timeouts), Telegram accepts it; no answer is a warning (offline), not a problem;
* ``webhook``: in webhook mode, its URL, secret and PTB's webhook extra;
* ``store``: the store folder exists, is writable, and whether a bot holds its lock (``.bot.lock``);
* ``disk``: free space on the store's file system against ``limits.min_free_disk_mb``;
* ``backbone``: the configured backbone loads without a network (the shipped file, a local file,
  or Keras ImageNet weights already cached);
* ``engine``: the backbone on the configured engine (LiteRT conversion cached, or converted now, or
  the TensorFlow fallback and why);
* ``model``: the serving version is present and loads (version, labels, test accuracy, engine);
* ``admins``: somebody may teach the bot.

Secrets: the token and the webhook secret never appear in the output (every line is passed through
``bot.logsafe.redact`` with them, and PTB's ``Bot.initialize``, whose error names the token, is not
used). Reading the store lock takes it for an instant only when no bot holds it; a running bot is
never disturbed (its lock is held, so the probe fails at once and reports it).

Exit code (``main``): 0 when no check found a problem (warnings allowed), 1 otherwise.

Why this module is long: it is nine small checks, each with its own wording of the finding and the
fix; one file keeps every text an operator reads from ``doctor`` in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.config import Config
    from model_store.backbones import Backbone

#: seconds for each Bot API request of the token check (connect and read)
API_TIMEOUT = 5.0


class Status(StrEnum):
    """The outcome of one check."""

    OK = "ok"
    WARNING = "warning"
    PROBLEM = "problem"


@dataclass
class Check:
    """One check's result.

    Attributes:
        name: short name (``config``, ``token``, ``webhook``, ``store``, ``disk``, ``backbone``,
            ``engine``, ``model``, ``admins``).
        status: ok / warning / problem.
        summary: one line saying what was found.
        fix: what the operator should do (None when ok).
        seconds: wall time the check took, in seconds.
    """

    name: str
    status: Status
    summary: str
    fix: str | None = None
    seconds: float = 0.0


@dataclass
class Report:
    """All checks of one doctor run.

    Attributes:
        config_path: the config file used (None: defaults and environment only).
        checks: in the order they ran.
        seconds: total wall time, in seconds.
    """

    config_path: str | None
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no check found a problem (warnings allowed)."""
        return all(c.status != Status.PROBLEM for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"ok", "config", "seconds", "checks": [{name, status, summary, fix, seconds}]}``."""
        return {
            "ok": self.ok,
            "config": self.config_path,
            "seconds": round(self.seconds, 3),
            "checks": [
                {**asdict(c), "status": str(c.status), "seconds": round(c.seconds, 3)} for c in self.checks
            ],
        }

    def render(self) -> str:
        """The report as text for a terminal: one line per check, its fix indented below."""
        marks = {Status.OK: "ok", Status.WARNING: "WARNING", Status.PROBLEM: "PROBLEM"}
        lines = [f"labelgram doctor (config: {self.config_path or 'none: defaults and environment only'})"]
        for c in self.checks:
            lines.append(f"  {marks[c.status]:<8} {c.name:<9} {c.summary}  [{c.seconds:.1f} s]")
            if c.fix:
                lines.append(f"  {'':<8} {'':<9} fix: {c.fix}")
        problems = sum(c.status == Status.PROBLEM for c in self.checks)
        warnings = sum(c.status == Status.WARNING for c in self.checks)
        verdict = (
            "all good" if not problems and not warnings else f"{problems} problem(s), {warnings} warning(s)"
        )
        lines.append(f"{verdict} ({self.seconds:.1f} s)")
        return "\n".join(lines)


def _timed(name: str, fn: Callable[[], Check]) -> Check:
    """Run one check, timing it; an unexpected exception becomes a problem naming it."""
    start = time.monotonic()
    try:
        check = fn()
    except Exception as exc:  # a check must never stop the others
        check = Check(name, Status.PROBLEM, f"the check itself failed: {type(exc).__name__}: {exc}",
                      "report this with the line above")  # fmt: skip
    check.seconds = time.monotonic() - start
    return check


# ------------------------------------------------------------------------------------- config
def _config_path(given: str | None) -> str | None:
    """As ``python -m bot run``: the given file, else ``$LABELGRAM_CONFIG``, else ./config.toml if present."""
    from bot.config import CONFIG_PATH_ENV

    if given:
        return given
    if os.environ.get(CONFIG_PATH_ENV):
        return os.environ[CONFIG_PATH_ENV]
    return "config.toml" if Path("config.toml").is_file() else None


def check_config(path: str | None) -> tuple[Check, Config | None]:
    """Load the config. Returns the check and the config (None when it does not load)."""
    from bot.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        return Check("config", Status.PROBLEM, str(exc), "correct that key (see config.example.toml)"), None
    if path is None:
        return (
            Check(
                "config",
                Status.WARNING,
                "no config file: defaults and LABELGRAM_* / TELEGRAM_BOT_TOKEN variables only",
                "copy config.example.toml to config.toml (or pass --config FILE / set LABELGRAM_CONFIG)",
            ),
            config,
        )
    return Check("config", Status.OK, f"{path} loads ({config.telegram.mode} mode)"), config


# -------------------------------------------------------------------------------------- token
async def _get_me(config: Config, timeout: float):
    """``Bot.get_me`` with short timeouts; raises PTB's errors. (``Bot.initialize`` is avoided: its
    ``InvalidToken`` message quotes the token.)"""
    from telegram import Bot
    from telegram.request import HTTPXRequest

    tg = config.telegram
    request = HTTPXRequest(
        connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout, pool_timeout=timeout
    )
    kwargs: dict[str, Any] = {}
    if tg.base_url:
        kwargs["base_url"] = tg.base_url
    if tg.base_file_url:
        kwargs["base_file_url"] = tg.base_file_url
    bot = Bot(str(config.token), request=request, local_mode=tg.local_mode, **kwargs)
    await request.initialize()
    try:
        return await bot.get_me(connect_timeout=timeout, read_timeout=timeout)
    finally:
        await request.shutdown()


def check_token(config: Config, *, timeout: float = API_TIMEOUT) -> Check:
    """Token present (its shape is checked by the config) and accepted by the Bot API's ``getMe``.

    Telegram unreachable (offline, firewall, timeout) is a warning: the token may still be right.
    """
    from telegram.error import InvalidToken, NetworkError, TelegramError

    from bot.config import TOKEN_ENV

    if not config.token:
        return Check(
            "token",
            Status.PROBLEM,
            "no Telegram bot token is configured",
            f"get one from @BotFather (/newbot), then export {TOKEN_ENV}='<token>' or set [telegram] token",
        )
    where = config.telegram.base_url or "api.telegram.org"
    try:
        me = asyncio.run(_get_me(config, timeout))
    except InvalidToken:
        return Check(
            "token",
            Status.PROBLEM,
            f"the Bot API at {where} rejected the token (getMe: unauthorized)",
            "copy the token again from @BotFather (/mybots -> API Token); revoked tokens stop working",
        )
    except NetworkError as exc:  # TimedOut is a NetworkError
        return Check(
            "token",
            Status.WARNING,
            f"well-formed, but not verified: the Bot API at {where} did not answer ({type(exc).__name__}: {exc})",
            "check the network / proxy, or telegram.base_url; the bot needs this connection to work",
        )
    except TelegramError as exc:
        return Check(
            "token",
            Status.PROBLEM,
            f"getMe failed: {type(exc).__name__}: {exc}",
            "see the Bot API's answer above",
        )
    return Check("token", Status.OK, f"accepted by the Bot API: the bot is @{me.username} ({me.first_name})")


# ------------------------------------------------------------------------------------ webhook
def check_webhook(config: Config) -> Check:
    """Polling needs nothing; webhook mode needs its URL, secret (both enforced by the config) and
    PTB's webhook extra (tornado)."""
    import importlib.util

    tg = config.telegram
    if tg.mode == "polling":
        return Check("webhook", Status.OK, "polling mode: no webhook needed")
    if importlib.util.find_spec("tornado") is None:
        return Check(
            "webhook",
            Status.PROBLEM,
            "webhook mode, but python-telegram-bot's webhook extra (tornado) is not installed",
            "pip install 'python-telegram-bot[webhooks]' (or set telegram.mode = \"polling\")",
        )
    if not config.webhook_secret:
        return Check("webhook", Status.PROBLEM, "webhook mode without webhook_secret_token",
                     "set telegram.webhook_secret_token")  # fmt: skip
    if not str(tg.webhook_url).startswith("https://"):
        return Check(
            "webhook",
            Status.WARNING,
            "webhook_url is not https://: Telegram only delivers webhooks over HTTPS",
            "put an HTTPS reverse proxy in front and give its https:// URL",
        )
    return Check(
        "webhook", Status.OK, f"webhook mode, secret set, listening on {tg.webhook_listen}:{tg.webhook_port}"
    )


# -------------------------------------------------------------------------------------- store
def store_lock_held(store_dir: Path) -> bool:
    """Whether a running bot holds the store's lock (``bot.app.BOT_LOCK_FILE``).

    Tries the lock without waiting and releases it at once; a held lock is only observed, so a
    running bot is not disturbed. A lock file that does not exist is not held (it is not created).

    Raises:
        OSError: the lock file cannot be opened (permissions).
    """
    from filelock import FileLock, Timeout

    from bot.app import BOT_LOCK_FILE

    path = store_dir / BOT_LOCK_FILE
    if not path.exists():
        return False
    lock = FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def check_store(config: Config) -> Check:
    """The store folder exists, is writable (a temp file is created and removed), and whether a bot
    is running on it."""
    from model_store.fs import TMP_PREFIX

    store = Path(config.store_dir)
    if not store.exists():
        return Check(
            "store",
            Status.PROBLEM,
            f"the store folder {store} does not exist",
            f"check store_dir; to start a new store: mkdir -p {store} (the bot then fills it)",
        )
    if not store.is_dir():
        return Check("store", Status.PROBLEM, f"{store} is not a folder", "point store_dir at a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "doctor-", dir=store)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return Check(
            "store",
            Status.PROBLEM,
            f"the store folder {store} is not writable ({exc.strerror})",
            f"give the bot's user write access: chown -R <bot user> {store} (or fix a read-only mount)",
        )
    try:
        held = store_lock_held(store)
    except OSError as exc:
        return Check("store", Status.PROBLEM, f"cannot open the store's lock file ({exc.strerror})",
                     f"give the bot's user write access to {store}")  # fmt: skip
    if held:
        return Check(
            "store",
            Status.WARNING,
            f"{store} is in use by a running bot (it holds the store lock)",
            "fine if that bot is yours; `run` on this store is refused until it stops "
            "(a second bot needs its own store_dir)",
        )
    return Check("store", Status.OK, f"{store} exists and is writable; no bot is running on it")


# --------------------------------------------------------------------------------------- disk
def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (for ``disk_usage`` of a store not made yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(config: Config) -> Check:
    """Free space on the store's file system against ``limits.min_free_disk_mb`` (below the floor
    the bot refuses new photos and training; below twice the floor: a warning)."""
    floor_mb = config.limits.min_free_disk_mb
    free_mb = shutil.disk_usage(_existing(Path(config.store_dir))).free / 2**20
    text = f"{free_mb:,.0f} MB free, floor {floor_mb:,} MB (limits.min_free_disk_mb)"
    if free_mb < floor_mb:
        return Check(
            "disk",
            Status.PROBLEM,
            text + ": below the floor, new photos and training are refused",
            f"free at least {floor_mb - free_mb:,.0f} MB on that disk, or lower limits.min_free_disk_mb",
        )
    if free_mb < 2 * floor_mb:
        return Check("disk", Status.WARNING, text + ": less than twice the floor left",
                     "free some space before the store grows")  # fmt: skip
    return Check("disk", Status.OK, text)


# ----------------------------------------------------------------------------------- backbone
def _keras_weights_cached(spec: str) -> bool:
    """Whether Keras' download cache (``$KERAS_HOME`` or ``~/.keras``, ``models/``) seems to hold the
    no-top ImageNet weights of a keras.applications backbone (matched by network name)."""
    from model_store.backbones import KERAS_APPLICATIONS

    app = KERAS_APPLICATIONS.get(spec)
    network = app.ctor.lower() if app else "mobilenet"  # retrain.py's mobilenet_<alpha>_<size>
    cache = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"
    if not cache.is_dir():
        return False
    for f in cache.iterdir():
        flat = f.name.lower().replace("_", "")
        if network in flat and "notop" in flat:
            return True
    return False


def check_backbone(config: Config) -> tuple[Check, Backbone | None]:
    """Load the configured backbone (``training.backbone`` / ``backbone_weights``) without a network."""
    from model_store.backbones import KERAS_APPLICATIONS, SHIPPED_BACKBONES, load_backbone
    from model_store.errors import LabelgramError

    spec, weights = config.training.backbone, config.training.backbone_weights
    fix_default = "set training.backbone to a shipped one (efficientnet_lite1 or efficientnet_lite0)"
    if spec in SHIPPED_BACKBONES:
        if not SHIPPED_BACKBONES[spec].is_file():
            return Check("backbone", Status.PROBLEM, f"the shipped file of {spec} is missing ({SHIPPED_BACKBONES[spec]})",
                         "reinstall labelgram (pip install --force-reinstall)"), None  # fmt: skip
    elif (
        (spec in KERAS_APPLICATIONS or spec.startswith("mobilenet_"))
        and not Path(spec).expanduser().exists()
        and weights == "imagenet"
        and not _keras_weights_cached(spec)
    ):
        return (
            Check(
                "backbone",
                Status.PROBLEM,
                f"{spec} needs ImageNet weights that are not in Keras' cache (~/.keras/models) and would be downloaded",
                "download the no-top weights on a connected machine and set training.backbone_weights = PATH, "
                "or " + fix_default,
            ),
            None,
        )
    try:
        backbone = load_backbone(spec, weights=weights)
    except LabelgramError as exc:
        return Check("backbone", Status.PROBLEM, str(exc), fix_default), None
    return (
        Check("backbone", Status.OK,
              f"{backbone.name} loads offline ({backbone.input_size[0]}x{backbone.input_size[1]} in, "
              f"{backbone.feature_dim} features)"),
        backbone,
    )  # fmt: skip


# ------------------------------------------------------------------------------------- engine
def check_engine(config: Config, backbone: Backbone, *, store_ok: bool) -> Check:
    """The backbone on the configured engine: the cached LiteRT conversion (fast), else a conversion
    now (cached in the store as training would), else the TensorFlow fallback and its reason."""
    from model_store.engine import cache_paths

    settings = config.engine.settings()
    cache_dir = Path(config.store_dir) / "bottlenecks" / backbone.id if store_ok else None
    cached = cache_dir is not None and cache_paths(cache_dir, "litert")[0].exists()
    start = time.monotonic()
    backbone.use_engine(settings, cache_dir=cache_dir)
    took = time.monotonic() - start
    frozen = backbone.engine
    assert frozen is not None
    if frozen.engine == "litert":
        how = (
            "cached conversion"
            if cached
            else f"converted now in {took:.0f} s"
            + (", cached for training" if cache_dir is not None else ", not cached (store not usable)")
        )
        return Check("engine", Status.OK, f"{frozen.description} ({how})")
    if settings.engine == "tensorflow":
        return Check("engine", Status.OK, 'TensorFlow (engine.engine = "tensorflow" in the config)')
    reason = frozen.fallback_reason or "unknown"
    fix = (
        "pip install ai-edge-litert"
        if "not installed" in reason
        else "use a shipped backbone (converts to LiteRT), or accept the slower TensorFlow path"
    )
    return Check("engine", Status.WARNING, f"TensorFlow fallback, slower: {reason}", fix)


# -------------------------------------------------------------------------------------- model
def check_model(config: Config) -> Check:
    """The serving version (``models/CURRENT``) is present, loads on the configured engine and runs
    one blank input; reports its version, labels and test accuracy."""
    import numpy as np

    from model_store.registry import POINTER, ModelRegistry
    from model_store.serving import open_serving_model

    fix_train = "teach it (/add in the chat, then /retrain), or: python -m bot retrain --image_dir DIR"
    models = Path(config.store_dir) / "models"
    if not models.is_dir():
        return Check("model", Status.PROBLEM, "no model trained yet: the bot cannot answer photos", fix_train)
    registry = ModelRegistry(models)
    version = registry.current()
    if version is None:
        if (models / POINTER).exists():
            return Check("model", Status.PROBLEM, "models/CURRENT names a version that is missing or incomplete",
                         "python -m bot rollback, or retrain")  # fmt: skip
        return Check("model", Status.PROBLEM, "no model trained yet: the bot cannot answer photos", fix_train)
    try:
        labels = version.labels
        metrics = version.metrics
        model = open_serving_model(version.path, config.engine.settings())
        model(np.zeros((1, *model.input_size, 3), np.float32))
    except Exception as exc:  # any failure to load is the finding
        return Check(
            "model",
            Status.PROBLEM,
            f"version {version.name} does not load: {type(exc).__name__}: {exc}",
            "python -m bot rollback (serve the previous version), or retrain",
        )
    accuracy = metrics.get("accuracy")
    acc = (
        f"test accuracy {accuracy:.1%} on {metrics.get('test_images', '?')} images"
        if accuracy is not None
        else "no test accuracy"
    )
    shown = ", ".join(labels[:6]) + (f", ... ({len(labels)})" if len(labels) > 6 else "")
    return Check(
        "model",
        Status.OK,
        f"version {version.name}: {len(labels)} labels ({shown}), {acc}; {model.description}",
    )


# ------------------------------------------------------------------------------------- admins
def check_admins(config: Config) -> Check:
    """At least one admin id (admins teach, retrain and roll back)."""
    if not config.admins:
        return Check(
            "admins",
            Status.WARNING,
            "no admins: nobody can teach, retrain or roll back from the chat",
            "add your numeric Telegram user id: admins = [123456789] (ask @userinfobot for yours)",
        )
    return Check("admins", Status.OK, f"{len(config.admins)} admin(s) configured")


# ---------------------------------------------------------------------------------------- run
def run_checks(config_path: str | None = None, *, api_timeout: float = API_TIMEOUT) -> Report:
    """Run every check (those needing a config only when it loads).

    Args:
        config_path: the config file (None: ``$LABELGRAM_CONFIG``, else ./config.toml if present).
        api_timeout: seconds for the Bot API's ``getMe`` (connect and read, each).

    Returns:
        The :class:`Report`, its texts free of the token and the webhook secret. Blocks (runs its
        own event loop for ``getMe``): call it from a thread when inside an event loop.
    """
    from bot.logsafe import install_token_filter, redact

    start = time.monotonic()
    path = _config_path(config_path)
    report = Report(config_path=path)
    holder: list[Config | None] = []

    def config_check() -> Check:
        check, cfg = check_config(path)
        holder.append(cfg)
        return check

    report.checks.append(_timed("config", config_check))
    config = holder[0] if holder else None
    if config is not None:
        cfg = config
        install_token_filter(cfg.token, cfg.webhook_secret)  # PTB / httpx log lines name the token
        report.checks.append(_timed("token", lambda: check_token(cfg, timeout=api_timeout)))
        report.checks.append(_timed("webhook", lambda: check_webhook(cfg)))
        store = _timed("store", lambda: check_store(cfg))
        report.checks.append(store)
        report.checks.append(_timed("disk", lambda: check_disk(cfg)))
        loaded: list[Backbone | None] = []

        def backbone_check() -> Check:
            check, bb = check_backbone(cfg)
            loaded.append(bb)
            return check

        report.checks.append(_timed("backbone", backbone_check))
        bb = loaded[0] if loaded else None
        if bb is not None:
            report.checks.append(
                _timed("engine", lambda: check_engine(cfg, bb, store_ok=store.status != Status.PROBLEM))
            )
        else:
            report.checks.append(Check("engine", Status.WARNING, "not checked: the backbone did not load",
                                       "fix the backbone first"))  # fmt: skip
        if store.status != Status.PROBLEM:
            report.checks.append(_timed("model", lambda: check_model(cfg)))
        else:
            report.checks.append(Check("model", Status.PROBLEM, "not checked: the store is not usable",
                                       "fix the store first"))  # fmt: skip
        report.checks.append(_timed("admins", lambda: check_admins(cfg)))
        secrets = [s for s in (cfg.token, cfg.webhook_secret) if s]
        for c in report.checks:
            c.summary = redact(c.summary, secrets)
            c.fix = redact(c.fix, secrets) if c.fix else c.fix
    report.seconds = time.monotonic() - start
    return report


def main(config_path: str | None = None, *, as_json: bool = False) -> int:
    """``python -m bot doctor``: print the report (text, or one JSON object with ``--json``).

    Returns:
        The exit code: 0 when no check found a problem, 1 otherwise.
    """
    import logging

    from bot.logsafe import configure_logging

    configure_logging("WARNING")  # the secrets are added to its redaction once the config is read
    # Library warnings (a LiteRT fallback, a conversion) are reported by the checks themselves.
    logging.getLogger("model_store").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):  # library chatter must not mix with the report
        report = run_checks(config_path)
    print(json.dumps(report.to_dict(), ensure_ascii=False) if as_json else report.render())
    return 0 if report.ok else 1
