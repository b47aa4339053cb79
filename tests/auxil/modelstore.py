"""Model-store helpers for the store / pipeline / CLI tests (real TensorFlow, real photos, real files).

The trained stores are built once per test session, whichever test asks first: through the
``backbone``, ``clothing_store`` and ``clothing_store_v2`` fixtures (tests/conftest.py) or, inside a
test, through :func:`shared_backbone` and friends. They are read-only: a test that changes a store
works on a :func:`copy_store` copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from model_store.backbones import Backbone, load_backbone
from model_store.labels import label_key
from model_store.pipeline import RetrainReport, retrain
from model_store.training import TrainConfig
from model_store.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
CLOTHING = DATA / "clothing"
CASES = DATA / "cases"
PYTHON = sys.executable

#: The small, quick training configuration every trained store uses (80 photos, 10 labels).
BASE_CONFIG = dict(
    epochs=30,
    min_images_per_label=5,
    validation_percentage=15,
    testing_percentage=15,
    # 15 test images, so one image is 6.7 points of accuracy: keep the floor far below the ~60%
    # this configuration reaches, so the fixture's promotion does not hinge on a single photo.
    accuracy_floor=0.2,
)

_BOT_ENV_PREFIXES = ("LABELGRAM_", "TELEGRAM_BOT_TOKEN")


def train_config(**overrides) -> TrainConfig:
    """:data:`BASE_CONFIG` with ``overrides``."""
    return TrainConfig(**{**BASE_CONFIG, **overrides})


def clothing_photos() -> dict[str, list[Path]]:
    """label -> the 8 JPEG files of that label in tests/data/clothing, sorted."""
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted(CLOTHING.iterdir()) if d.is_dir()}


def clothing_labels() -> list[str]:
    """The 10 label names, in the class-index order training uses (sorted by label_key)."""
    return sorted(clothing_photos(), key=label_key)


# ---------------------------------------------------------------------------------------- caches
_CACHE: dict[str, object] = {}


def shared_backbone() -> Backbone:
    """The shipped EfficientNet-Lite0 (the fast choice), loaded once per session.

    The pipeline tests use it rather than the default Lite1 to keep CI fast; the default is
    trained and served end to end in tests/test_default_backbone.py.
    """
    if "backbone" not in _CACHE:
        _CACHE["backbone"] = load_backbone("efficientnet_lite0")
    return _CACHE["backbone"]  # type: ignore[return-value]


@dataclass
class TrainedStore:
    """A store folder with the clothing photos imported and a trained, promoted model.

    Attributes:
        root: the store folder (do not modify: copy it with :func:`copy_store`).
        report: the report of the retrain that produced the serving version.
        events: ``(stage, done, total)`` progress calls of that retrain.
        versions: the version names, oldest first.
        reports: every retrain report that built this store, oldest first.
    """

    root: Path
    report: RetrainReport
    events: list[tuple[str, int, int]] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    reports: list[RetrainReport] = field(default_factory=list)

    @property
    def version(self) -> str:
        """The serving version (the newest one)."""
        return self.versions[-1]


def copy_store(src: Path, dst: Path) -> Workspace:
    """Copy a whole store folder (images, catalog, bottlenecks, models) and open the copy."""
    shutil.copytree(src, dst, symlinks=True)
    return Workspace(dst)


def _build_trained_store(tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    root = tmp_path_factory.mktemp("trained") / "store"
    ws = Workspace(root)
    imported = ws.store.import_tree(CLOTHING)
    assert imported.added == 80, imported
    events: list[tuple[str, int, int]] = []
    report = retrain(
        ws, train_config(), backbone=shared_backbone(), progress=lambda s, d, n: events.append((s, d, n))
    )
    assert report.status == "promoted", report.message
    return TrainedStore(root, report, events, [report.version], [report])


def _build_two_version_store(tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    base = shared_trained_store(tmp_path_factory)
    root = tmp_path_factory.mktemp("two_versions") / "store"
    ws = copy_store(base.root, root)
    events: list[tuple[str, int, int]] = []
    # Nothing changed since the first training: a second one must reuse every bottleneck; the gate
    # is opened wide (max_accuracy_drop=1) so the second version is certainly promoted.
    report = retrain(
        ws,
        train_config(max_accuracy_drop=1.0),
        backbone=shared_backbone(),
        progress=lambda s, d, n: events.append((s, d, n)),
    )
    assert report.status == "promoted", report.message
    return TrainedStore(root, report, events, [base.version, report.version], [base.report, report])


def shared_trained_store(tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """One promoted version trained on the 80 clothing photos (built once per session)."""
    if "trained" not in _CACHE:
        _CACHE["trained"] = _build_trained_store(tmp_path_factory)
    return _CACHE["trained"]  # type: ignore[return-value]


def shared_two_version_store(tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """A copy of the trained store retrained once more: versions v1 (rollback target) and v2 (serving)."""
    if "two" not in _CACHE:
        _CACHE["two"] = _build_two_version_store(tmp_path_factory)
    return _CACHE["two"]  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- CLI
def cli_env() -> dict[str, str]:
    """Environment for ``python -m bot`` subprocesses: no developer bot settings, quiet TensorFlow."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_BOT_ENV_PREFIXES)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m bot ARGS`` from the repository root and capture its output."""
    return subprocess.run(
        [PYTHON, "-m", "bot", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_lines(stdout: str) -> list[dict]:
    """Parse every non-empty stdout line as JSON (fails the test on any other output)."""
    out = []
    for line in stdout.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:  # pragma: no cover - only reached when the CLI misbehaves
                raise AssertionError(f"stdout line is not JSON: {line!r}") from exc
    return out
