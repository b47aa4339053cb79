"""Keep the bot token and the webhook secret token out of every log line.

The token is part of every Bot API URL (``https://api.telegram.org/bot<token>/getUpdates``), and
httpx logs request URLs at INFO; exceptions raised while talking to the server may carry the URL
too. :class:`TokenRedactingFilter` rewrites each record that passes a handler: the message, its
arguments, the formatted traceback and stack info, replacing each secret by ``<token>``: in any
mix of literal and percent-encoded characters, and a bot token's secret part (after the colon) also
on its own. PTB logs ``setWebhook``'s parameters (the webhook secret among them) at DEBUG, so the
webhook secret is registered here too. :func:`install_token_filter` puts it on every handler of the root logger (and the
handlers of ``extra_loggers``), and :func:`configure_logging` sets up plain stderr logging for the
``run`` command with httpx turned down to WARNING.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import traceback
from collections.abc import Iterable

__all__ = ["REDACTED", "TokenRedactingFilter", "configure_logging", "install_token_filter", "redact"]

REDACTED = "<token>"


#: the part of a bot token after the colon is the secret itself; shorter "halves" are not redacted
#: on their own (too likely to match ordinary text)
_MIN_PART = 8
#: whole secrets shorter than this are never redacted (the config refuses webhook secrets under 16
#: characters; this is the defensive floor: a 1-character one was replaced in every log line)
_MIN_SECRET = 6


def _char_pattern(ch: str) -> str:
    """One character, literal or percent-encoded (any hex case, also double-encoded ``%25XX``)."""
    encoded = "".join(f"%(?:25)?(?i:{b:02x})" for b in ch.encode("utf-8"))
    return f"(?:{re.escape(ch)}|{encoded})"


@functools.lru_cache(maxsize=64)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex matching every secret, and for ``id:secret`` tokens the part after the colon alone."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret or len(secret) < _MIN_SECRET:
            continue  # a 1-character "secret" would be replaced in every line (config refuses it)
        forms.add(secret)
        _, colon, rest = secret.partition(":")
        if colon and len(rest) >= _MIN_PART:
            forms.add(rest)
    if not forms:
        return None
    # longest first, so a whole token wins over its secret half at the same position
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("|".join("".join(_char_pattern(c) for c in form) for form in ordered))


def redact(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every secret replaced by ``<token>``.

    Matched in any mix of literal and percent-encoded characters (``%3A``, ``%3a``, ``%253A``), and
    for a bot token (``<bot id>:<secret>``) also the secret part after the colon on its own.
    Secrets shorter than 6 characters are not redacted (they would match ordinary text).
    """
    pattern = _pattern(tuple(s for s in secrets if s))
    if pattern is None:
        return text
    return pattern.sub(REDACTED, text)


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
    token: str | None, *secrets: str | None, extra_loggers: Iterable[str] = ()
) -> TokenRedactingFilter | None:
    """Attach one shared redacting filter to the root logger's handlers (and ``extra_loggers``').

    Args:
        token: the bot token.
        secrets: more secrets to redact the same way (the webhook secret token).
        extra_loggers: names of loggers with their own handlers to protect too.

    Idempotent: a handler that already has a labelgram filter gets the secrets added to it.

    Returns:
        The filter used, or None when there is no secret at all.
    """
    wanted = [s for s in (token, *secrets) if s]
    if not wanted:
        return None
    shared: TokenRedactingFilter | None = None
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in extra_loggers)]
    handlers = [h for lg in loggers for h in lg.handlers]
    for handler in handlers:
        for existing in handler.filters:
            if isinstance(existing, TokenRedactingFilter):
                for secret in wanted:
                    existing.add(secret)
                shared = shared or existing
    shared = shared or TokenRedactingFilter(*wanted)
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


def configure_logging(level: str = "INFO", token: str | None = None, *secrets: str | None) -> None:
    """Log to stderr at ``level`` with the token (and ``secrets``, e.g. the webhook secret token)
    redacted at every level; httpx/httpcore only from WARNING; PTB's start-up network retry errors
    on one line (:class:`NetworkRetryTracebackFilter`)."""
    root = logging.getLogger()
    if not root.handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(stream)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in root.handlers:
        if not any(isinstance(f, NetworkRetryTracebackFilter) for f in handler.filters):
            handler.addFilter(NetworkRetryTracebackFilter())
    install_token_filter(token, *secrets)
