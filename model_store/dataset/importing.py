"""Importing a ``retrain.py``-style folder tree (one sub-folder per label) into an image store."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from model_store.errors import DuplicateImageError, ImageDecodeError, LabelError
from model_store.images import IMAGE_EXTENSIONS
from model_store.labels import normalize_label

if TYPE_CHECKING:
    from model_store.dataset import ImageStore

__all__ = ["MAX_IMPORT_FILE_BYTES", "ImportReport", "import_tree"]

logger = logging.getLogger(__name__)

MAX_IMPORT_FILE_BYTES = 64 * 1024 * 1024
"""Files larger than this are skipped by :func:`import_tree` without being read."""


@dataclass
class ImportReport:
    """Outcome of :meth:`ImageStore.import_tree`.

    Attributes:
        added: images newly stored.
        duplicates: images that were already stored under the same label (nothing written).
        skipped: ``(path relative to the source folder, reason)`` for every file or folder not imported.
    """

    added: int = 0
    duplicates: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def import_tree(store: ImageStore, src_dir: Path | str) -> ImportReport:
    """Import a ``retrain.py``-style folder tree into ``store``: one sub-folder per label, images inside.

    Each immediate sub-folder of ``src_dir`` is a label (its name goes through
    :func:`~model_store.labels.normalize_label`); every file in it, recursively, whose suffix is
    in :data:`~model_store.images.IMAGE_EXTENSIONS` (any letter case) is added with
    :meth:`ImageStore.add`. Nothing aborts the import except a full disk: refused folders, non-image
    suffixes, unreadable or corrupt files, files over :data:`MAX_IMPORT_FILE_BYTES` and images
    already stored under another label are listed in ``skipped`` with the reason. Symbolic links to
    folders are not followed below the label level.

    Args:
        store: the image store to add to.
        src_dir: the folder to import.

    Returns:
        An :class:`ImportReport`.

    Raises:
        FileNotFoundError / NotADirectoryError: ``src_dir`` is not a folder.
        StoreFullError: the disk reached the free-space floor (images added so far stay).
    """
    src = Path(src_dir)
    report = ImportReport()
    entries = sorted(os.scandir(src), key=lambda e: (e.name.casefold(), e.name))
    for entry in entries:
        if not entry.is_dir():
            report.skipped.append((entry.name, "not in a label folder"))
            continue
        try:
            label = normalize_label(entry.name)
        except LabelError as exc:
            report.skipped.append((entry.name, f"folder name is not a valid label: {exc.message}"))
            continue
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames.sort(key=lambda n: (n.casefold(), n))
            for name in sorted(filenames, key=lambda n: (n.casefold(), n)):
                path = Path(dirpath) / name
                rel = path.relative_to(src).as_posix()
                _import_file(store, path, rel, label, report)
    logger.info(
        "imported %s: %d added, %d already present, %d skipped",
        src,
        report.added,
        report.duplicates,
        len(report.skipped),
    )
    return report


def _import_file(store: ImageStore, path: Path, rel: str, label: str, report: ImportReport) -> None:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        report.skipped.append((rel, f"not an image file (suffix {path.suffix or 'missing'!r})"))
        return
    try:
        size = path.stat().st_size
        if size > MAX_IMPORT_FILE_BYTES:
            report.skipped.append((rel, f"file too large ({size} bytes)"))
            return
        data = path.read_bytes()
    except OSError as exc:
        report.skipped.append((rel, f"could not be read ({exc.strerror or exc.__class__.__name__})"))
        return
    try:
        result = store.add(data, label)
    except (ImageDecodeError, DuplicateImageError, LabelError) as exc:
        report.skipped.append((rel, exc.message))
        return
    if result.created:
        report.added += 1
    else:
        report.duplicates += 1
