"""Small persistent facts the bot keeps between restarts, in ``<store_dir>/state.json``.

* ``last_run``: the last training that completed (promoted or refused): its store fingerprint
  (a scheduled run is skipped while the images are unchanged since then), time, version, status.
* ``last_scheduled_check``: when the scheduled job last fired (to notice a run missed while the
  bot was down).
* ``last_failure_fingerprint``: fingerprint of the last failed training, so a failure that will
  repeat every night (e.g. too few labels) is reported to admins once, not nightly.

Written as temp file + fsync + ``os.replace``, so a crash never leaves half a file; an unreadable
file is treated as empty (with a warning): losing it only costs one extra training.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from model_store.fs import write_atomic

__all__ = ["BotState"]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


class BotState:
    """A JSON dict on disk, read once and rewritten atomically on every change. Thread-safe."""

    def __init__(self, store_dir: Path) -> None:
        self.path = Path(store_dir) / STATE_FILE
        self._lock = threading.Lock()
        self._data: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s)", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring %s: not a JSON object", self.path)
            return {}
        return data

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key`` (``default`` if absent)."""
        with self._lock:
            return self._data.get(key, default)

    def update(self, **values: Any) -> None:
        """Set keys: write the file atomically (temp file, fsync, ``os.replace``), and only once that
        succeeded change the values in memory, so memory and disk never differ.

        Raises:
            OSError: the file could not be written (e.g. ENOSPC); nothing changed, on disk or in memory.
            TypeError / ValueError: a value is not JSON-serialisable; nothing changed.
        """
        with self._lock:
            new = {**self._data, **values}
            payload = json.dumps(new, indent=1, sort_keys=True).encode("utf-8")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, payload)
            self._data = new
