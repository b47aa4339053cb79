"""Model versions on disk, an atomic "current" pointer, promotion, rollback and pruning.

Layout under ``root`` (normally ``<store>/models``)::

    <version>/model.keras          backbone + head: float32 RGB 0..255 (N, h, w, 3) -> softmax (N, C)
    <version>/head.keras           the head alone: bottleneck (N, D) -> logits (N, C)
    <version>/labels.txt           one label per line, in class-index order (retrain.py's output_labels)
    <version>/metrics.json         evaluation, training settings, backbone id, gate decision
    <version>/confusion_matrix.png
    <version>/saved_model/         optional, for TensorFlow Serving
    <version>/model.tflite         optional
    <version>/litert.tflite, .json the model converted for the LiteRT engine (model_store.engine)
    CURRENT                        JSON {"version": name, "history": [previous, ...]}
    .tmp-<version>/                a version being written (never read; removed by prune)

A version directory appears under its final name only once complete (written as ``.tmp-<name>``
and renamed). ``CURRENT`` is replaced atomically (temp file, fsync, ``os.replace``), so a crash at
any point leaves either the old or the new pointer, both naming complete versions.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from model_store.errors import ModelProblem, NoModelError
from model_store.fs import TMP_PREFIX, publish_dir, write_atomic

__all__ = ["POINTER", "ModelRegistry", "ModelVersion"]

log = logging.getLogger(__name__)

POINTER = "CURRENT"


@dataclass(frozen=True)
class ModelVersion:
    """A complete model version directory.

    Attributes:
        name: sortable version name, ``YYYYmmdd-HHMMSS-<hex>`` (UTC).
        path: its directory.
    """

    name: str
    path: Path

    @property
    def labels(self) -> list[str]:
        """Class names in index order (``labels.txt``)."""
        return (self.path / "labels.txt").read_text(encoding="utf-8").splitlines()

    @property
    def metrics(self) -> dict:
        """Contents of ``metrics.json`` (``{}`` if missing)."""
        p = self.path / "metrics.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}

    @property
    def model_path(self) -> Path:
        """The full inference model file (``model.keras``)."""
        return self.path / "model.keras"

    @property
    def created_at(self) -> float:
        """Unix time the version was created (from metrics, else the folder's mtime)."""
        return float(self.metrics.get("created_at", self.path.stat().st_mtime))


class ModelRegistry:
    """Versioned models in one folder.

    Args:
        root: the models folder (created if missing).
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading ---------------------------------------------------------------------------------
    def pointer_path(self) -> Path:
        """Path of the ``CURRENT`` pointer file (its stat changes on every promotion/rollback)."""
        return self.root / POINTER

    def _read_pointer(self) -> dict:
        p = self.pointer_path()
        if not p.exists():
            return {"version": None, "history": []}
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            return {"version": data.get("version"), "history": list(data.get("history", []))}
        except (ValueError, OSError) as exc:  # unreadable pointer: fall back to no model
            log.error("model pointer %s is unreadable (%s); serving no model", p, exc)
            return {"version": None, "history": []}

    def _is_complete(self, name: str | None) -> bool:
        if not name:
            return False
        return not name.startswith(TMP_PREFIX) and (self.root / name / "model.keras").is_file()

    def versions(self) -> list[ModelVersion]:
        """All complete versions, oldest first."""
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and self._is_complete(p.name))
        return [ModelVersion(n, self.root / n) for n in names]

    def get(self, name: str) -> ModelVersion:
        """A version by name. Raises NoModelError if it does not exist or is incomplete."""
        if not self._is_complete(name) or "/" in name or name.startswith("."):
            raise NoModelError(reason=ModelProblem.NO_SUCH_VERSION, version=name)
        return ModelVersion(name, self.root / name)

    def current(self) -> ModelVersion | None:
        """The serving version, or None before the first promotion."""
        name = self._read_pointer()["version"]
        if name and self._is_complete(name):
            return ModelVersion(name, self.root / name)
        if name:
            log.error("model pointer names %r, which is not a complete version; serving no model", name)
        return None

    # -- writing ---------------------------------------------------------------------------------
    def new_version_dir(self) -> tuple[str, Path]:
        """Reserve a new version: returns ``(name, temp_dir)``; fill ``temp_dir``, then :meth:`commit`."""
        name = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        tmp.mkdir(parents=True)
        return name, tmp

    def commit(self, name: str, temp_dir: Path) -> ModelVersion:
        """Make a fully written temp version visible under its final name (atomic rename).

        Durable before visible: every file, then every folder inside the version (deepest first,
        the version folder itself last) is fsynced, then the folder is renamed and its parent
        (``root``) fsynced, so after a power cut the version is either absent or complete.
        """
        final = publish_dir(temp_dir, self.root / name)
        return ModelVersion(name, final)

    def promote(self, version: ModelVersion) -> None:
        """Make ``version`` the serving one (atomic pointer swap); the old one becomes the rollback target."""
        if not self._is_complete(version.name):
            raise NoModelError(reason=ModelProblem.INCOMPLETE_VERSION, version=version.name)
        state = self._read_pointer()
        history = [state["version"], *state["history"]] if state["version"] else state["history"]
        history = [h for h in history if h != version.name][:20]
        write_atomic(self.pointer_path(), json.dumps({"version": version.name, "history": history}).encode())
        log.info("promoted model version %s", version.name)

    def rollback(self) -> ModelVersion:
        """Serve the previously promoted version again.

        Returns:
            The version now serving.

        Raises:
            NoModelError: no earlier complete version to go back to.
        """
        state = self._read_pointer()
        history = [h for h in state["history"] if self._is_complete(h)]
        if not history:
            raise NoModelError(reason=ModelProblem.NOTHING_TO_ROLL_BACK)
        target, rest = history[0], history[1:]
        write_atomic(self.pointer_path(), json.dumps({"version": target, "history": rest}).encode())
        log.info("rolled back model from %s to %s", state["version"], target)
        return ModelVersion(target, self.root / target)

    def prune(self, keep: int) -> list[str]:
        """Delete old versions and leftovers of crashed writes.

        Keeps the ``keep`` newest complete versions plus the current one and its rollback target.
        Call only while holding the training lock (a ``.tmp-`` folder of a running write would be
        removed).

        Returns:
            Names of the deleted folders.
        """
        state = self._read_pointer()
        protected = {state["version"], *(state["history"][:1])}
        complete = [v.name for v in self.versions()]
        keepers = set(complete[-max(keep, 1) :]) | protected
        removed = []
        for p in self.root.iterdir():
            if not p.is_dir():
                if p.name.startswith(TMP_PREFIX):
                    p.unlink(missing_ok=True)
                continue
            if p.name.startswith(TMP_PREFIX) or (p.name in complete and p.name not in keepers):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        if removed:
            log.info("pruned model versions/leftovers: %s", ", ".join(sorted(removed)))
        return removed
