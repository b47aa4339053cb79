"""Fixtures shared by every test module (found by pytest here: test modules never import them).

Helpers (constants, builders, checks) live in ``tests/auxil/``; import those.

Bot API stand-in (tests/botapi_standin.py, on 127.0.0.1, in the test's event loop):

* ``botapi``: a running :class:`~tests.botapi_standin.BotApiStandIn`;
* ``api``: a running :class:`~tests.auxil.standin_extras.HardenedStandIn` (download log,
  failures injected for one chat).

Stores (real TensorFlow, the shipped EfficientNet-Lite0, built once per session, read-only):

* ``trained_store``: one promoted model trained on 6 photos each of shoes, pants and t-shirt;
  ``store_copy`` gives each test its own copy (images, bottleneck cache, models);
* ``backbone``: the shipped Lite0 feature extractor;
* ``clothing_store`` / ``clothing_store_v2``: the 80 clothing photos with one / two promoted
  versions (change a copy: ``tests.auxil.modelstore.copy_store``).

Every test runs without the developer's ``LABELGRAM_*`` / ``TELEGRAM_BOT_TOKEN`` variables.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from model_store.backbones import Backbone
from tests.auxil import modelstore
from tests.auxil.bot_harness import ADMIN, TRAIN_PER_LABEL, TRAINED_LABELS, photos
from tests.auxil.standin_extras import HardenedStandIn
from tests.botapi_standin import BotApiStandIn

_BOT_ENV_PREFIXES = ("LABELGRAM_", "TELEGRAM_BOT_TOKEN")


@pytest.fixture(autouse=True)
def _clean_bot_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see a developer's LABELGRAM_* / TELEGRAM_BOT_TOKEN variables."""
    for name in list(os.environ):
        if name.upper().startswith(_BOT_ENV_PREFIXES):
            monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------ Bot API stand-in
@pytest.fixture
async def botapi() -> AsyncIterator[BotApiStandIn]:
    """A running ``BotApiStandIn`` on 127.0.0.1 (ephemeral port) in the test's event loop.

    Point the bot at it with ``tests.auxil.bot_harness.bot_config(botapi, store)``, or PTB with
    ``.token(botapi.token).base_url(botapi.base_url).base_file_url(botapi.base_file_url)``.
    """
    async with BotApiStandIn() as stand_in:
        yield stand_in


@pytest.fixture
async def api() -> AsyncIterator[HardenedStandIn]:
    """A running :class:`HardenedStandIn` in the test's event loop."""
    async with HardenedStandIn() as stand_in:
        yield stand_in


# ---------------------------------------------------------------------------------------- stores
@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store folder with one promoted model, trained once per test session.

    Trained on the shipped Lite0 (the fast choice, as ``backbone``) to keep CI fast; the
    default backbone is trained and served end to end in tests/test_default_backbone.py.
    """
    from model_store.pipeline import retrain
    from model_store.training import TrainConfig
    from model_store.workspace import Workspace

    root = tmp_path_factory.mktemp("trained") / "store"
    ws = Workspace(root)
    for label in TRAINED_LABELS:
        for path in photos(label)[:TRAIN_PER_LABEL]:
            ws.store.add(path.read_bytes(), label, added_by=ADMIN, chat_id=ADMIN)
    report = retrain(
        ws,
        TrainConfig(epochs=20, accuracy_floor=0.0, max_accuracy_drop=1.0),
        backbone=modelstore.shared_backbone(),
    )
    assert report.status == "promoted", report.message
    return root


@pytest.fixture
def store_copy(trained_store: Path, tmp_path: Path) -> Path:
    """This test's own copy of the trained store."""
    target = tmp_path / "store"
    shutil.copytree(trained_store, target, symlinks=True)
    (target / "state.json").unlink(missing_ok=True)
    return target


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    """The real shipped EfficientNet-Lite0 feature extractor (shared, do not mutate)."""
    return modelstore.shared_backbone()


@pytest.fixture(scope="session")
def clothing_store(tmp_path_factory: pytest.TempPathFactory) -> modelstore.TrainedStore:
    """A store with the clothing photos and one promoted model version (read-only)."""
    return modelstore.shared_trained_store(tmp_path_factory)


@pytest.fixture(scope="session")
def clothing_store_v2(tmp_path_factory: pytest.TempPathFactory) -> modelstore.TrainedStore:
    """A store with two promoted versions, the second serving (read-only)."""
    return modelstore.shared_two_version_store(tmp_path_factory)
