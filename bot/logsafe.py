"""Keep the bot token out of every log line.

The token is part of every Bot API URL (``https://api.telegram.org/bot<token>/getUpdates``), and
httpx logs request URLs at INFO; exceptions raised while talking to the server may carry the URL
too. :class:`TokenRedactingFilter` rewrites each record that passes a handler: the message, its
arguments, the formatted traceback and stack info, replacing the token (also URL-encoded) by
``<token>``. :func:`install_token_filter` puts it on every handler of the root logger (and the
handlers of ``extra_loggers``), and :func:`configure_logging` sets up plain stderr logging for the
``run`` command with httpx turned down to WARNING.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterable
from urllib.parse import quote

__all__ = ["REDACTED", "TokenRedactingFilter", "configure_logging", "install_token_filter", "redact"]

REDACTED = "<token>"


def _variants(secret: str) -> list[str]:
    forms = {secret, quote(secret, safe=""), quote(secret, safe=":")}
    return sorted((f for f in forms if f), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every secret (and its URL-encoded forms) replaced by ``<token>``."""
    for secret in secrets:
        for form in _variants(secret):
            if form in text:
                text = text.replace(form, REDACTED)
    return text


class TokenRedactingFilter(logging.Filter):
    """A handler filter that removes secrets from each record (never drops a record)."""

    def __init__(self, *secrets: str) -> None:
        super().__init__("labelgram.redact")
        self.secrets = [s for s in secrets if s]

    def add(self, secret: str | None) -> None:
        """Also redact ``secret`` from now on (None / "" / already known: nothing happens)."""
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def _clean(self, text: str) -> str:
        return redact(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place (message, args, traceback, stack); always returns True."""
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep the raw parts, redacted
            message = f"{record.msg} {record.args}"
        cleaned = self._clean(message)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            if not record.exc_text:
                record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = self._clean(record.exc_text)
        elif record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self._clean(record.stack_info)
        return True


def install_token_filter(
    token: str | None, *, extra_loggers: Iterable[str] = ()
) -> TokenRedactingFilter | None:
    """Attach one shared redacting filter to the root logger's handlers (and ``extra_loggers``').

    Idempotent: a handler that already has a labelgram filter gets the token added to it.

    Returns:
        The filter used, or None when there is no token.
    """
    if not token:
        return None
    shared: TokenRedactingFilter | None = None
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in extra_loggers)]
    handlers = [h for lg in loggers for h in lg.handlers]
    for handler in handlers:
        for existing in handler.filters:
            if isinstance(existing, TokenRedactingFilter):
                existing.add(token)
                shared = shared or existing
    shared = shared or TokenRedactingFilter(token)
    for handler in handlers:
        if not any(isinstance(f, TokenRedactingFilter) for f in handler.filters):
            handler.addFilter(shared)
    return shared


class NetworkRetryTracebackFilter(logging.Filter):
    """Shorten PTB's "Network Retry Loop ... Aborting." error to one line (no chained traceback).

    When the Bot API cannot be reached at start-up, PTB logs a ~70-line traceback of httpx/httpcore
    internals before ``run`` prints its own one-line explanation; the exception text is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.getMessage().startswith("Network Retry Loop"):
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str = "INFO", token: str | None = None) -> None:
    """Log to stderr at ``level`` with the token redacted; httpx/httpcore only from WARNING;
    PTB's start-up network retry errors on one line (:class:`NetworkRetryTracebackFilter`)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in root.handlers:
        if not any(isinstance(f, NetworkRetryTracebackFilter) for f in handler.filters):
            handler.addFilter(NetworkRetryTracebackFilter())
    install_token_filter(token)
