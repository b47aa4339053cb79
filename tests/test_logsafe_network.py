"""PTB's start-up network retry error is logged on one line, still without the token."""

from __future__ import annotations

import io
import logging

from bot.logsafe import NetworkRetryTracebackFilter, TokenRedactingFilter

TOKEN = "123456:SecretTokenValue"


def test_network_retry_error_is_one_line_and_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(NetworkRetryTracebackFilter())
    handler.addFilter(TokenRedactingFilter(TOKEN))
    logger = logging.getLogger("test.networkloop")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ConnectionError(f"cannot connect to https://api.telegram.org/bot{TOKEN}/getMe")
        except ConnectionError:
            logger.exception(
                "%s Failed run number %s of %s. Aborting.", "Network Retry Loop (Bootstrap):", 0, 0
            )
        try:
            raise ValueError("other")
        except ValueError:
            logger.exception("an unrelated error")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    first, rest = out.split("\n", 1)
    assert first.startswith(
        "Network Retry Loop (Bootstrap): Failed run number 0 of 0. Aborting. (ConnectionError:"
    )
    assert TOKEN not in out and "SecretTokenValue" not in out
    assert rest.startswith("an unrelated error\nTraceback")  # other errors keep their traceback
