"""Helpers shared by the tests (laid out like python-telegram-bot's own ``tests/auxil``).

Modules here are plain Python (constants, builders, checks): import from them. Fixtures live in
``tests/conftest.py`` and reach every test module by name, without an import.

* :mod:`tests.auxil.bot_harness`: user ids, the bot's config and the running Application.
* :mod:`tests.auxil.modelstore`: trained stores, training configs and the ``python -m bot`` CLI.
* :mod:`tests.auxil.standin_extras`: the Bot API stand-in with a download log and per-chat
  failures, and update builders for unusual senders.
* :mod:`tests.auxil.store_checks`: the store as seen from outside, and what the bot said.
* :mod:`tests.auxil.crafted_images`: hostile and huge image files made on the fly.
"""
