"""The ``images/<label>/<sha256>.<ext>`` tree: the source of truth of the image store.

Scanning (label folders grouped by :func:`~model_store.labels.label_key`, hash-named files only),
removing leftovers of interrupted writes (``.tmp-*`` files and folders, ``<root>/.trash-*``),
and the folder moves behind renaming and deleting labels. Writing an image is
:func:`model_store.fs.write_atomic`. No locking here: :class:`~model_store.dataset.ImageStore`
calls these under its store lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from model_store.errors import LabelError
from model_store.fs import TMP_PREFIX, fsync_dir
from model_store.labels import label_key, normalize_label

__all__ = ["IMAGE_NAME", "TRASH_PREFIX", "Folder", "LabelFolders", "StoredFile"]

logger = logging.getLogger(__name__)

TRASH_PREFIX = ".trash-"
"""Folders moved out of ``images/`` before removal are renamed ``<root>/.trash-<random>``."""

IMAGE_NAME = re.compile(r"^([0-9a-f]{64})\.([A-Za-z0-9]{1,16})$")
"""A stored image's file name: the SHA-256 of its bytes (lower-case hex) and its extension."""


@dataclass(frozen=True)
class Folder:
    """A label folder found on disk: its display label, comparison key and real name."""

    label: str
    key: str
    name: str


@dataclass(frozen=True)
class StoredFile:
    """One complete image file inside a label folder."""

    folder: str
    sha256: str
    ext: str
    path: Path


class LabelFolders:
    """The label folders under ``<root>/images``.

    Args:
        root: the store directory (``images/`` is created if missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)

    def groups(self) -> dict[str, list[Folder]]:
        """Label folders on disk, grouped by label key; the canonical folder (sorted first) leads.

        Hidden entries (``.tmp-*``, ``.trash-*``, ...) and folders whose names are not valid labels
        are ignored (with a warning for the latter).
        """
        groups: dict[str, list[Folder]] = {}
        try:
            entries = list(os.scandir(self.images_dir))
        except FileNotFoundError:
            return groups
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                label = normalize_label(entry.name)
            except LabelError as exc:
                logger.warning("ignoring folder %r in %s: %s", entry.name, self.images_dir, exc.message)
                continue
            key = label_key(label)
            groups.setdefault(key, []).append(Folder(label=label, key=key, name=entry.name))
        for key, folders in groups.items():
            folders.sort(key=lambda f: f.name)
            if len(folders) > 1:
                logger.warning(
                    "folders %s are the same label; treating them as %r",
                    [f.name for f in folders],
                    folders[0].label,
                )
            groups[key] = folders
        return groups

    def files_in(self, folder: str) -> list[StoredFile]:
        """Complete image files directly inside one label folder (no temp files, hash-named only)."""
        directory = self.images_dir / folder
        found: list[StoredFile] = []
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in entries:
            match = IMAGE_NAME.match(entry.name)
            if match is None or not entry.is_file():
                continue
            found.append(StoredFile(folder, match.group(1), match.group(2), directory / entry.name))
        return found

    def count(self, group: list[Folder]) -> int:
        """Distinct images in one label (all folders of its group)."""
        return len({f.sha256 for folder in group for f in self.files_in(folder.name)})

    def scan(self) -> list[tuple[str, Folder, StoredFile]]:
        """Every stored file as (label, folder, file), sorted by (label key, sha256, folder, ext).

        ``label`` is the canonical label of the folder's group (see :meth:`groups`).
        """
        items = [
            (group[0].label, folder, file)
            for group in self.groups().values()
            for folder in group
            for file in self.files_in(folder.name)
        ]
        items.sort(key=lambda item: (item[1].key, item[2].sha256, item[1].name, item[2].ext))
        return items

    def remove_leftovers(self) -> None:
        """Remove what interrupted operations left: ``<root>/.trash-*`` and ``.tmp-*`` under ``images/``."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(TRASH_PREFIX):
                logger.info("removing leftover %s", entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        for dirpath, dirnames, filenames in os.walk(self.images_dir):
            for name in [d for d in dirnames if d.startswith(TMP_PREFIX)]:
                logger.info("removing leftover temporary folder %s", os.path.join(dirpath, name))
                shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
                dirnames.remove(name)
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    logger.info("removing leftover temporary file %s", os.path.join(dirpath, name))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))

    def move_to_trash(self, folder: Path) -> Path:
        """Rename ``folder`` to ``<root>/.trash-<random>`` (one rename: readers never see it half-gone).

        Returns:
            The trash path; remove it with ``shutil.rmtree`` (a crash leaves it to :meth:`remove_leftovers`).
        """
        trash = self.root / f"{TRASH_PREFIX}{secrets.token_hex(8)}"
        os.rename(folder, trash)
        return trash

    def merge(self, source: Path, target: Path) -> None:
        """Move every image of ``source`` into ``target`` (fsynced), then remove ``source``."""
        for entry in os.scandir(source):
            if IMAGE_NAME.match(entry.name) and entry.is_file():
                os.replace(entry.path, target / entry.name)
        fsync_dir(target)
        shutil.rmtree(self.move_to_trash(source), ignore_errors=True)
