"""Labelled image folders: the training set the bot is taught with (:class:`ImageStore`).

Layout under the store root::

    root/images/<label>/<sha256>.<ext>   one file per image; the name is the SHA-256 of its bytes
    root/catalog.sqlite                  who added which image, when, from which chat (SQLite, WAL)
    root/.lock                           lock file (model_store.fs.file_lock) shared by all processes

The folders are the source of truth (they are what ``retrain.py``-style tools read, and what an
operator may edit by hand); the catalog only adds provenance. Opening an :class:`ImageStore`
reconciles the two: catalog rows whose file is gone are dropped, files without a row get one
(``added_by`` NULL, ``added_at`` = the file's mtime), and leftovers of interrupted writes
(``.tmp-*`` files, ``root/.trash-*`` folders) are removed. A catalog of an older schema version is upgraded
in place (its provenance kept); one that is missing, empty, not a database, damaged
(``PRAGMA quick_check``) or of a layout that is not ours (a foreign SQLite file) is rebuilt from the
folders, the bad file kept as ``catalog.sqlite.corrupt-<UTC time>``, and the log says so (ERROR /
WARNING). The same file holds the review queue's tables (:mod:`model_store.review`).

A label folder is named with the label's normalised display form as first typed
(:func:`model_store.labels.normalize_label`). Labels that differ only in letter case or Unicode
form are the same label (:func:`model_store.labels.label_key`): adding "T-Shirt" when the folder
"t-shirt" exists stores the image in "t-shirt".

Every file is written with :func:`model_store.fs.write_atomic` (a ``.tmp-<random>`` name, fsynced,
``os.replace``-d into place, the folder fsynced), so readers never see half an image. Mutations take
a store-level lock (a ``threading.RLock`` plus :func:`model_store.fs.file_lock` on ``root/.lock``),
so one store may be shared by threads and by several processes.

The package: :mod:`.folders` (the ``images/<label>/`` tree), :mod:`.catalog` (the SQLite
provenance), :mod:`.importing` (``import_tree``); this module composes them.

Why this module is long (~520 lines): :class:`ImageStore` is the one lock-holding facade over the
folders and the catalog, and each method is a short composition of theirs under the store lock;
over a third of the lines are the docstrings of its public contract.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model_store.dataset.catalog import Catalog
from model_store.dataset.folders import Folder, LabelFolders
from model_store.dataset.importing import MAX_IMPORT_FILE_BYTES, ImportReport, import_tree
from model_store.errors import DuplicateImageError, LabelError, StoreFullError
from model_store.fs import DISK_FULL_ERRNOS, file_lock, fsync_dir, write_atomic
from model_store.images import decode_image, sniff_extension
from model_store.labels import label_key, normalize_label

__all__ = [
    "DISK_FULL_ERRNOS",
    "MAX_IMPORT_FILE_BYTES",
    "AddResult",
    "ImageRecord",
    "ImageStore",
    "ImportReport",
    "LabelInfo",
]

logger = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_STORE_FULL_MESSAGE = (
    "The image store is almost out of disk space, so the image was not saved. "
    "Please ask the bot's administrator to free some space."
)
_IMAGE_FILE_MODE = 0o644  # stored images are plain files others may read (before the umask)


@dataclass(frozen=True)
class AddResult:
    """Outcome of :meth:`ImageStore.add`.

    Attributes:
        sha256: hex SHA-256 of the image bytes (the file's stem).
        label: the label the image is stored under (the existing folder's name when the label
            already existed in another letter case).
        path: the stored file.
        created: False when the same image was already stored under this label (nothing written).
    """

    sha256: str
    label: str
    path: Path
    created: bool


@dataclass(frozen=True)
class LabelInfo:
    """One label and how many images it holds."""

    name: str
    count: int


@dataclass(frozen=True)
class ImageRecord:
    """One stored image: its content hash, its label, and the file."""

    sha256: str
    label: str
    path: Path


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in DISK_FULL_ERRNOS


class ImageStore:
    """Labelled training images on disk, with a provenance catalog.

    Safe to share between threads, and to open from several processes on the same root.

    Args:
        root: the store directory (created if missing).
        min_free_bytes: refuse to add an image when the free space on the store's file system would
            drop below this many bytes.
        max_pixels: largest image (width x height) accepted by :meth:`add`; None uses the default
            of :func:`model_store.images.decode_image`.

    Raises:
        OSError: the root cannot be created or read.
        sqlite3.Error: the catalog cannot be opened.
    """

    def __init__(self, root: Path | str, *, min_free_bytes: int = 0, max_pixels: int | None = None) -> None:
        self.root = Path(root)
        self.folders = LabelFolders(self.root)
        self.images_dir = self.folders.images_dir
        self.catalog_path = self.root / "catalog.sqlite"
        self.catalog = Catalog(self.catalog_path)
        self.min_free_bytes = int(min_free_bytes)
        self.max_pixels = max_pixels
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._file_lock = file_lock(self.root / ".lock")  # one object, only used under self._lock
        with self._locked():
            self._open_catalog()

    # ------------------------------------------------------------------ locking and catalog

    def _open_catalog(self) -> None:
        """Open the catalog and reconcile it with the folders (rebuilt if missing or corrupt).

        Rebuilt rows have no ``added_by`` / ``chat_id`` (who added an image is not in the
        folders), so ``/undo`` cannot take those images back; the log says so (WARNING).

        Raises:
            sqlite3.Error: the catalog cannot be opened for another reason (locked, read-only...).
            OSError: the damaged catalog cannot be moved aside.
        """
        reason = self.catalog.open()
        added = self._reconcile()
        if reason == "corrupt" or (reason in ("missing", "empty") and added):
            logger.warning(
                "the image catalog %s was %s: rebuilt it from the image folders (%d images); who "
                "added those images is no longer known, so /undo cannot take them back",
                self.catalog_path,
                reason,
                added,
            )

    def _reconcile(self) -> int:
        """Remove leftovers of interrupted operations and make the catalog match the folders.

        Returns:
            The number of catalog rows added for files that had none.
        """
        self.folders.remove_leftovers()
        return self.catalog.reconcile({(folder.name, file.sha256): file for _, folder, file in self.folders.scan()})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store lock: reentrant within a thread, exclusive across threads and processes."""
        with self._lock:
            if self._lock_depth:  # this thread holds the file lock already
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with self._file_lock:
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0

    # ------------------------------------------------------------------ writing

    def _check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.images_dir).free
        if free < self.min_free_bytes + needed:
            logger.warning(
                "store full: %d bytes free, %d needed plus a floor of %d", free, needed, self.min_free_bytes
            )
            raise StoreFullError(_STORE_FULL_MESSAGE)

    def add(
        self,
        data: bytes,
        label: str,
        *,
        added_by: int | None = None,
        chat_id: int | None = None,
        suggested_by: int | None = None,
    ) -> AddResult:
        """Store one labelled image.

        The label is validated, the image is fully decoded (so nothing unreadable is ever stored),
        and the bytes are stored unchanged as ``images/<label>/<sha256>.<ext>``.

        Args:
            data: the encoded image (JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC bytes).
            label: the label as typed; an existing label in another letter case or Unicode form is
                reused with its existing spelling.
            added_by: Telegram user id of the admin who taught it (or accepted it from the review
                queue), for the catalog.
            chat_id: chat it came from, for the catalog.
            suggested_by: Telegram user id of the user whose feedback suggested this label (an
                item of the review queue, :mod:`model_store.review`), for the catalog; None when
                the admin labelled it alone. Not recorded when the image was already stored
                (``created`` False: the existing row and its provenance are kept).

        Returns:
            An :class:`AddResult`; ``created`` is False when this image was already stored under
            this label (nothing is written then).

        Raises:
            LabelError: the label is refused.
            ImageDecodeError: the bytes are not a readable image (or too large); nothing is stored.
            DuplicateImageError: the same image is already stored under another label
                (``existing_label`` names it); nothing is stored.
            StoreFullError: free disk space would fall below ``min_free_bytes``; nothing is written.
            OSError: the file system failed otherwise; no partial file is left behind.
            TypeError: ``data`` is not bytes-like (a programming error).
        """
        display = normalize_label(label)
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if self.max_pixels is None:
            decode_image(data)
        else:
            decode_image(data, max_pixels=self.max_pixels)
        ext = sniff_extension(data)
        sha = hashlib.sha256(data).hexdigest()
        key = label_key(display)
        file_name = f"{sha}.{ext}"

        with self._locked():
            folders = self.folders.groups()
            for other_key, group in folders.items():
                for folder in group:
                    if (self.images_dir / folder.name / file_name).is_file():
                        if other_key == key:
                            self.catalog.add(
                                sha, folder.name, ext, added_by, chat_id, replace=False, suggested_by=suggested_by
                            )
                            return AddResult(
                                sha, group[0].label, self.images_dir / folder.name / file_name, False
                            )
                        raise DuplicateImageError(
                            f"This image is already saved under the label “{group[0].label}”. "
                            "Remove it there first if it belongs to a different label.",
                            existing_label=group[0].label,
                        )
            self._check_free_space(len(data))
            target = folders[key][0] if key in folders else None
            created_dir = False
            if target is None:
                folder_name, stored_label = display, display
                directory = self.images_dir / folder_name
                if directory.parent != self.images_dir:
                    raise LabelError(
                        "That label cannot be used as a folder name. Please choose another name."
                    )
                try:
                    directory.mkdir()
                except FileExistsError:
                    # Only a file or a symbolic link can be here (a real folder would have been
                    # found above); never write through a link to somewhere outside the store.
                    if directory.is_symlink() or not directory.is_dir():
                        raise LabelError(
                            "That label clashes with a file in the store. Please choose another name."
                        ) from None
                except OSError as exc:
                    if _is_disk_full(exc):
                        raise StoreFullError(_STORE_FULL_MESSAGE) from exc
                    raise
                created_dir = True
                fsync_dir(self.images_dir)
            else:
                folder_name, stored_label = target.name, target.label
                directory = self.images_dir / folder_name
            try:
                path = write_atomic(directory / file_name, data, mode=_IMAGE_FILE_MODE)
            except BaseException as exc:
                if created_dir:  # do not leave an empty new label behind
                    with contextlib.suppress(OSError):
                        directory.rmdir()
                if isinstance(exc, OSError) and _is_disk_full(exc):
                    raise StoreFullError(_STORE_FULL_MESSAGE) from exc
                raise
            try:
                self.catalog.add(sha, folder_name, ext, added_by, chat_id, suggested_by=suggested_by)
            except sqlite3.Error:
                # The folder is the source of truth and already holds the image; the next
                # reconcile re-creates the row (without its provenance).
                logger.exception("image %s stored but its catalog row could not be written", sha)
        logger.info("stored %s under %r (added_by=%s, suggested_by=%s)", file_name, stored_label, added_by, suggested_by)
        return AddResult(sha, stored_label, path, True)

    # ------------------------------------------------------------------ labels

    def labels(self) -> list[LabelInfo]:
        """List the labels with their image counts.

        Returns:
            One :class:`LabelInfo` per label folder (empty folders included), sorted by label key.
        """
        return [LabelInfo(group[0].label, self.folders.count(group)) for _, group in sorted(self.folders.groups().items())]

    def resolve_label(self, name: str) -> str | None:
        """Find the existing label that ``name`` refers to (ignoring case and Unicode form).

        Args:
            name: a label as typed.

        Returns:
            The existing label's name as stored (its folder name), or None if there is none.

        Raises:
            LabelError: ``name`` is not a valid label.
        """
        group = self.folders.groups().get(label_key(name))
        return group[0].label if group else None

    def _require_label(self, name: str) -> tuple[str, list[Folder]]:
        display = normalize_label(name)
        group = self.folders.groups().get(label_key(display))
        if not group:
            raise LabelError(f"There is no label called “{display}”.")
        return display, group

    def rename_label(self, old: str, new: str) -> str:
        """Rename a label (its folder), keeping its images and their catalog entries.

        Renaming to another letter case of the same label (``"t-shirt"`` -> ``"T-Shirt"``) is allowed
        and renames the folder.

        Args:
            old: the existing label (any letter case / Unicode form).
            new: the new name.

        Returns:
            The new label as stored (normalised).

        Raises:
            LabelError: ``old`` is unknown, ``new`` is invalid, or ``new`` is another existing label
                (labels are never merged by renaming).
        """
        new_display = normalize_label(new)
        new_key = label_key(new_display)
        with self._locked():
            _, group = self._require_label(old)
            old_key = group[0].key
            if new_key != old_key and new_key in self.folders.groups():
                raise LabelError(
                    f"A label called “{self.folders.groups()[new_key][0].label}” already exists. "
                    "Choose another name, or move the images one by one."
                )
            # Normally a label is one folder; folders made by hand that differ only in case
            # ("Hat" next to "hat") are folded into the renamed one.
            keep = next((f for f in group if f.name == new_display), group[0])
            source = self.images_dir / keep.name
            target = self.images_dir / new_display
            if keep.name != new_display:
                if os.path.lexists(target) and not os.path.samefile(source, target):
                    raise LabelError(
                        "That name clashes with a file in the store. Please choose another name."
                    )
                os.rename(source, target)
            for extra in group:
                if extra is not keep:
                    self.folders.merge(self.images_dir / extra.name, target)
            fsync_dir(self.images_dir)
            self.catalog.relabel([folder.name for folder in group], new_display)
        logger.info("renamed label %r to %r", group[0].label, new_display)
        return new_display

    def delete_label(self, label: str) -> int:
        """Delete a label and all its images.

        The folder is first renamed out of ``images/`` (to ``root/.trash-<random>``), then removed, so
        readers never see a half-deleted label.

        Args:
            label: the label (any letter case / Unicode form).

        Returns:
            The number of images deleted.

        Raises:
            LabelError: no such label.
        """
        with self._locked():
            _, group = self._require_label(label)
            count = self.folders.count(group)
            trashes = [self.folders.move_to_trash(self.images_dir / folder.name) for folder in group]
            fsync_dir(self.images_dir)
            self.catalog.delete_folders([f.name for f in group])
            for trash in trashes:
                shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted label %r with %d images", group[0].label, count)
        return count

    # ------------------------------------------------------------------ images

    def remove(self, sha256: str) -> bool:
        """Remove one image (from whichever label holds it).

        Args:
            sha256: the image's content hash, 64 hex digits (any letter case). Never a path.

        Returns:
            True if a file was removed, False if no such image is stored.

        Raises:
            ValueError: ``sha256`` is not 64 hex digits.
        """
        if not isinstance(sha256, str) or not _SHA256_HEX.match(sha256):
            raise ValueError("an image id must be 64 hexadecimal digits")
        sha = sha256.lower()
        removed = False
        with self._locked():
            for group in self.folders.groups().values():
                for folder in group:
                    for file in self.folders.files_in(folder.name):
                        if file.sha256 == sha:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(file.path)
                                removed = True
                            fsync_dir(file.path.parent)
            self.catalog.delete_image(sha)
        if removed:
            logger.info("removed image %s", sha)
        return removed

    def import_tree(self, src_dir: Path | str) -> ImportReport:
        """Import a ``retrain.py``-style folder tree: see :func:`model_store.dataset.importing.import_tree`.

        Raises:
            FileNotFoundError / NotADirectoryError: ``src_dir`` is not a folder.
            StoreFullError: the disk reached the free-space floor (images added so far stay).
        """
        return import_tree(self, src_dir)

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> list[ImageRecord]:
        """List every stored image from a scan of the folders.

        Temp files (``.tmp-*``) and files not named ``<64 hex digits>.<ext>`` are ignored.

        Returns:
            :class:`ImageRecord` s sorted by (label key, sha256).
        """
        records = []
        seen: set[tuple[str, str]] = set()
        for label, folder, file in self.folders.scan():
            if (folder.key, file.sha256) in seen:
                continue  # the same image twice in one label (hand-copied folders): listed once
            seen.add((folder.key, file.sha256))
            records.append(ImageRecord(file.sha256, label, file.path))
        return records

    def image_count(self) -> int:
        """Return the number of stored images (as :meth:`snapshot` would list them)."""
        return len(self.snapshot())

    def fingerprint(self) -> str:
        """Return a hex SHA-256 of the labelled image set.

        It changes if and only if the set of (label, image hash) pairs changes: adding, removing,
        relabelling or renaming a label changes it; re-adding an existing image does not.
        """
        return self.fingerprint_of(self.snapshot())

    @staticmethod
    def fingerprint_of(records: list[ImageRecord]) -> str:
        """:meth:`fingerprint` of a given snapshot (e.g. the one a training run used)."""
        digest = hashlib.sha256()
        for label, sha in sorted({(r.label, r.sha256) for r in records}):
            digest.update(f"{label}\0{sha}\n".encode())
        return digest.hexdigest()

    def last_added_by(self, user_id: int, n: int = 1) -> list[ImageRecord]:
        """Return the images most recently added by one user, newest first.

        Args:
            user_id: the Telegram user id recorded as ``added_by``.
            n: how many to return at most.

        Returns:
            Up to ``n`` :class:`ImageRecord` s whose files still exist.
        """
        if n <= 0:
            return []
        labels_by_folder = {f.name: group[0].label for group in self.folders.groups().values() for f in group}
        records = []
        for sha, folder, ext in self.catalog.added_by(user_id):
            path = self.images_dir / folder / f"{sha}.{ext}"
            if folder in labels_by_folder and path.is_file():
                records.append(ImageRecord(sha, labels_by_folder[folder], path))
                if len(records) == n:
                    break
        return records

    def count_added_since(self, timestamp: float) -> int:
        """Count catalog entries added at or after ``timestamp`` (unix seconds).

        Files found by reconciliation count with their modification time.
        """
        return self.catalog.count_added_since(timestamp)
