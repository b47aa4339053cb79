"""Checks of what tests cannot see through the bot: the store on disk and everything the bot said.

* :func:`store_state` / :class:`StoreState`: a snapshot of images, catalog, model pointer and versions;
* :func:`assert_store_contained`: nothing written outside the store, images where they belong;
* :func:`catalog_matches_folders`: the catalog rows are exactly the image files;
* :func:`chat_texts` / :func:`assert_no_traceback`: no internals shown in any chat.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from model_store.dataset import ImageStore
from model_store.labels import label_key, normalize_label
from tests.botapi_standin import BotApiStandIn

__all__ = [
    "StoreState",
    "assert_no_traceback",
    "assert_store_contained",
    "catalog_matches_folders",
    "chat_texts",
    "store_state",
]

#: what a chat message must never contain: Python tracebacks, exception class names, source paths
TRACEBACK_RE = re.compile(r"Traceback|File \"|\b\w+(Error|Exception)\b|\.py\b|/site-packages/|\bline \d+")

IMAGE_FILE = re.compile(r"^[0-9a-f]{64}\.[A-Za-z0-9]{1,16}$")


@dataclass(frozen=True)
class StoreState:
    """Everything an admin action could change, read from disk."""

    images: frozenset[tuple[str, str]]  # (label folder, file name)
    catalog: frozenset[tuple[str, str]]  # (sha256, label folder)
    pointer: bytes | None  # models/CURRENT
    versions: tuple[str, ...]
    folders: frozenset[str]

    def added_since(self, before: StoreState) -> set[tuple[str, str]]:
        return set(self.images - before.images)


def store_state(store_dir: Path) -> StoreState:
    images_dir = store_dir / "images"
    images = set()
    folders = set()
    if images_dir.is_dir():
        for folder in images_dir.iterdir():
            folders.add(folder.name)
            if folder.is_dir():
                images.update((folder.name, f.name) for f in folder.iterdir())
    catalog: set[tuple[str, str]] = set()
    db = store_dir / "catalog.sqlite"
    if db.exists():
        with contextlib.closing(sqlite3.connect(db)) as conn:
            catalog = set(conn.execute("SELECT sha256, label FROM images"))
    models = store_dir / "models"
    pointer_file = models / "CURRENT"
    pointer = pointer_file.read_bytes() if pointer_file.exists() else None
    versions = tuple(sorted(p.name for p in models.iterdir() if p.is_dir())) if models.is_dir() else ()
    return StoreState(frozenset(images), frozenset(catalog), pointer, versions, frozenset(folders))


_STORE_TOP_LEVEL = {
    "images",
    "catalog.sqlite",
    "catalog.sqlite-wal",
    "catalog.sqlite-shm",
    ".lock",
    "state.json",
    "bottlenecks",
    "models",
    ".train.lock",
    ".bot.lock",  # held by a running bot (bot.app.acquire_store_lock)
}


def assert_store_contained(root: Path, store_dir: Path, before: Iterable[Path] = ()) -> None:
    """Nothing was written outside ``store_dir`` under ``root``; inside it, images are where they belong.

    * every file under ``root`` that is not in ``before`` lies inside ``store_dir``;
    * the store's top level holds only the known entries; no symbolic links anywhere;
    * ``images/`` holds only folders named with a valid, normalised label (no two with the same
      label key), each holding only ``<sha256>.<ext>`` files whose content hashes to the name.
    """
    before_set = {Path(p) for p in before}
    store_dir = store_dir.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert not path.is_symlink(), f"symbolic link {path}"
            if path in before_set or path.is_dir():
                continue
            assert store_dir in path.resolve().parents, f"file written outside the store: {path}"
    top = {p.name for p in store_dir.iterdir()}
    assert top <= _STORE_TOP_LEVEL, f"unexpected entries in the store: {top - _STORE_TOP_LEVEL}"
    keys: dict[str, str] = {}
    for folder in (store_dir / "images").iterdir():
        assert folder.is_dir(), f"not a folder: {folder}"
        assert normalize_label(folder.name) == folder.name, (
            f"folder with a non-normalised name: {folder.name!r}"
        )
        key = label_key(folder.name)
        assert key not in keys, f"two folders for one label: {keys[key]!r} and {folder.name!r}"
        keys[key] = folder.name
        for f in folder.iterdir():
            assert f.is_file() and IMAGE_FILE.match(f.name), f"unexpected entry {f}"
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name.split(".")[0], (
                f"content of {f} changed"
            )


def catalog_matches_folders(store_dir: Path) -> None:
    """The catalog rows are exactly the image files on disk (after opening the store)."""
    store = ImageStore(store_dir)
    on_disk = {(r.sha256, r.path.parent.name) for r in store.snapshot()}
    with contextlib.closing(sqlite3.connect(store_dir / "catalog.sqlite")) as conn:
        rows = set(conn.execute("SELECT sha256, label FROM images"))
    assert rows == on_disk


# ------------------------------------------------------------------------------------------------
# what the bot said


def chat_texts(api: BotApiStandIn) -> list[str]:
    """Every text the bot showed anywhere: messages, captions, edits, button answers."""
    texts = []
    for call in api.sent_calls():
        for key in ("text", "caption"):
            value = call.params.get(key)
            if isinstance(value, str):
                texts.append(value)
    return texts


def assert_no_traceback(api: BotApiStandIn) -> None:
    for text in chat_texts(api):
        assert not TRACEBACK_RE.search(text), f"internal details shown in the chat: {text!r}"
