"""Pytest fixtures for the local Bot API stand-in (see tests/botapi_standin.py).

Use from a test module with ``from tests.botapi_fixtures import botapi  # noqa: F401`` or list
this module in a conftest's ``pytest_plugins``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.botapi_standin import BotApiStandIn


@pytest.fixture
async def botapi() -> AsyncIterator[BotApiStandIn]:
    """A running ``BotApiStandIn`` on 127.0.0.1 (ephemeral port) in the test's event loop.

    Point PTB at it with ``botapi.application_builder()`` or with
    ``.token(botapi.token).base_url(botapi.base_url).base_file_url(botapi.base_file_url)``.
    """
    async with BotApiStandIn() as api:
        yield api
