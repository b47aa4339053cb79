"""Labelled image folders: the training set the bot is taught with.

Layout under the store root::

    root/images/<label>/<sha256>.<ext>   one file per image; the name is the SHA-256 of its bytes
    root/catalog.sqlite                  who added which image, when, from which chat (SQLite, WAL)
    root/.lock                           advisory lock file (fcntl.flock) shared by all processes

The folders are the source of truth (they are what ``retrain.py``-style tools read, and what an
operator may edit by hand); the catalog only adds provenance. Opening an :class:`ImageStore`
reconciles the two: catalog rows whose file is gone are dropped, files without a row get one
(``added_by`` NULL, ``added_at`` = the file's mtime), and leftovers of interrupted writes
(``.tmp-*`` files, ``root/.trash-*`` folders) are removed. A catalog that is missing, empty, not
a database, damaged (``PRAGMA quick_check``) or of another schema (a foreign SQLite file, an older
version's) is rebuilt from the folders, the bad file kept as ``catalog.sqlite.corrupt-<UTC time>``,
and the log says so (ERROR / WARNING).

A label folder is named with the label's normalised display form as first typed
(:func:`model_store.labels.normalize_label`). Labels that differ only in letter case or Unicode
form are the same label (:func:`model_store.labels.label_key`): adding "T-Shirt" when the folder
"t-shirt" exists stores the image in "t-shirt".

Every file is written to a ``.tmp-<random>`` name, fsynced, then ``os.replace``-d into place and the
directory fsynced, so readers never see half an image. Mutations take a store-level lock (a
``threading.RLock`` plus ``fcntl.flock`` on ``root/.lock``), so one store may be shared by threads
and by several processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model_store.errors import DuplicateImageError, ImageDecodeError, LabelError, StoreFullError
from model_store.images import IMAGE_EXTENSIONS, decode_image, sniff_extension
from model_store.labels import label_key, normalize_label
from model_store.registry import fsync_dir

__all__ = [
    "MAX_IMPORT_FILE_BYTES",
    "AddResult",
    "ImageRecord",
    "ImageStore",
    "ImportReport",
    "LabelInfo",
]

logger = logging.getLogger(__name__)

MAX_IMPORT_FILE_BYTES = 64 * 1024 * 1024
"""Files larger than this are skipped by :meth:`ImageStore.import_tree` without being read."""

TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_IMAGE_NAME = re.compile(r"^([0-9a-f]{64})\.([A-Za-z0-9]{1,16})$")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_STORE_FULL_MESSAGE = (
    "The image store is almost out of disk space, so the image was not saved. "
    "Please ask the bot's administrator to free some space."
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    sha256   TEXT NOT NULL,
    label    TEXT NOT NULL,   -- the folder name under images/
    ext      TEXT NOT NULL,
    added_by INTEGER,
    chat_id  INTEGER,
    added_at REAL NOT NULL,
    PRIMARY KEY (sha256, label)
);
CREATE INDEX IF NOT EXISTS images_added_by ON images (added_by, added_at);
CREATE INDEX IF NOT EXISTS images_added_at ON images (added_at);
"""


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


@dataclass(frozen=True)
class _Folder:
    """A label folder found on disk: its display label, comparison key and real name."""

    label: str
    key: str
    name: str


@dataclass(frozen=True)
class _File:
    folder: str
    sha256: str
    ext: str
    path: Path


class _SchemaMismatch(sqlite3.DatabaseError):
    """The catalog is an SQLite database, but not with this program's tables (foreign or older)."""


def _table_layout(conn: sqlite3.Connection) -> dict[str, list[tuple[str, str, int, int]]]:
    """Every user table and its columns (name, declared type, not null, primary-key position)."""
    tables = [
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    ]
    return {
        table: [(c[1], str(c[2]).upper(), int(c[3]), int(c[5])) for c in conn.execute(f'PRAGMA table_info("{table}")')]
        for table in tables
    }


def _expected_layout() -> dict[str, list[tuple[str, str, int, int]]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        conn.executescript(_SCHEMA)
        return _table_layout(conn)


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Whether an SQLite error means a damaged or foreign file (not a lock or permission problem)."""
    if isinstance(exc, _SchemaMismatch):
        return True
    if isinstance(exc, sqlite3.OperationalError):  # locked, read-only, cannot open, ...
        return False
    name = getattr(exc, "sqlite_errorname", None)
    if name is not None:
        return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT")
    return True  # raised by our own quick_check


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
        self.images_dir = self.root / "images"
        self.catalog_path = self.root / "catalog.sqlite"
        self.min_free_bytes = int(min_free_bytes)
        self.max_pixels = max_pixels
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._lock_file: int | None = None
        self.images_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._open_catalog()

    # ------------------------------------------------------------------ locking and catalog

    def _init_catalog(self) -> None:
        """Create or open the catalog (WAL, schema) and check it (``PRAGMA quick_check``).

        Raises:
            sqlite3.DatabaseError: the file is not a database, is damaged (``quick_check`` failed)
                or has other tables or columns than ours (a foreign file or an older schema).
        """
        with contextlib.closing(sqlite3.connect(self.catalog_path, timeout=60)) as conn:
            layout = _table_layout(conn)  # read before anything is written to a foreign file
            if layout and layout != _expected_layout():  # empty: a new catalog
                raise _SchemaMismatch(
                    f"its tables are not this program's (found {sorted(layout)}, images columns "
                    f"{[c[0] for c in layout.get('images', [])]}): a foreign file or an older schema"
                )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.commit()
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"quick_check: {'; '.join(map(str, problems[:3]))}")

    def _open_catalog(self) -> None:
        """Open the catalog and reconcile it with the folders; rebuild it if it is missing or corrupt.

        The folders are the source of truth, so a catalog that is not a database, is damaged or
        has another schema (a foreign SQLite file, an older version's) is moved aside as
        ``catalog.sqlite.corrupt-<UTC time>`` (with its ``-wal`` / ``-shm`` files) and rebuilt from
        them, with an ERROR in the log; a catalog missing from a store that holds images, or empty
        (0 bytes), is rebuilt with a WARNING. Rebuilt rows have no ``added_by`` / ``chat_id`` (who added
        an image is not in the folders), so ``/undo`` cannot take those images back.

        Raises:
            sqlite3.Error: the catalog cannot be opened for another reason (locked, read-only...).
            OSError: the damaged catalog cannot be moved aside.
        """
        missing = not self.catalog_path.exists()
        # A 0-byte file is an empty database to SQLite (its -wal, if any, may still hold the rows):
        # if the folders then add rows, who added them is lost as with a missing catalog.
        empty = not missing and self.catalog_path.stat().st_size == 0
        if missing:
            self._set_catalog_aside(self._catalog_sidecars(), "stale")
        try:
            self._init_catalog()
            reason = "missing" if missing else "empty" if empty else None
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            aside = self._set_catalog_aside([self.catalog_path, *self._catalog_sidecars()], "corrupt")
            logger.error(
                "the image catalog %s is damaged (%s): moved it aside to %s and rebuilding it from "
                "the image folders, which are the source of truth",
                self.catalog_path,
                exc,
                aside,
            )
            self._init_catalog()
            reason = "corrupt"
        added = self._reconcile()
        if reason == "corrupt" or (reason in ("missing", "empty") and added):
            logger.warning(
                "the image catalog %s was %s: rebuilt it from the image folders (%d images); who "
                "added those images is no longer known, so /undo cannot take them back",
                self.catalog_path,
                reason,
                added,
            )

    def _catalog_sidecars(self) -> list[Path]:
        return [self.catalog_path.with_name(self.catalog_path.name + s) for s in ("-wal", "-shm", "-journal")]

    def _set_catalog_aside(self, paths: list[Path], why: str) -> Path:
        """Rename each existing path to ``<name>.<why>-<UTC time>``; returns the first new name."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        first: Path | None = None
        for path in paths:
            target = path.with_name(f"{path.name}.{why}-{stamp}")
            try:
                os.replace(path, target)
            except FileNotFoundError:
                continue
            first = first or target
        fsync_dir(self.root)
        return first or self.catalog_path.with_name(f"{self.catalog_path.name}.{why}-{stamp}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store lock: reentrant within a thread, exclusive across threads and processes."""
        with self._lock:
            if self._lock_depth == 0:
                fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_file = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_file is not None:
                    fd, self._lock_file = self._lock_file, None
                    try:
                        fcntl.flock(fd, fcntl.LOCK_UN)
                    finally:
                        os.close(fd)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection for one transaction: committed on success, rolled back on error."""
        conn = sqlite3.connect(self.catalog_path, timeout=60)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            with conn:
                yield conn
        finally:
            conn.close()

    # ------------------------------------------------------------------ folder scanning

    def _folders(self) -> dict[str, list[_Folder]]:
        """Label folders on disk, grouped by label key; the canonical folder (sorted first) leads.

        Hidden entries (``.tmp-*``, ``.trash-*``, ...) and folders whose names are not valid labels
        are ignored (with a warning for the latter).
        """
        groups: dict[str, list[_Folder]] = {}
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
            groups.setdefault(key, []).append(_Folder(label=label, key=key, name=entry.name))
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

    def _files_in(self, folder: str) -> list[_File]:
        """Complete image files directly inside one label folder (no temp files, hash-named only)."""
        directory = self.images_dir / folder
        found: list[_File] = []
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in entries:
            match = _IMAGE_NAME.match(entry.name)
            if match is None or not entry.is_file():
                continue
            found.append(_File(folder, match.group(1), match.group(2), directory / entry.name))
        return found

    def _scan(self) -> list[tuple[str, _Folder, _File]]:
        """Every stored file as (label, folder, file), sorted by (label key, sha256, folder, ext).

        ``label`` is the canonical label of the folder's group (see :meth:`_folders`).
        """
        items = [
            (group[0].label, folder, file)
            for group in self._folders().values()
            for folder in group
            for file in self._files_in(folder.name)
        ]
        items.sort(key=lambda item: (item[1].key, item[2].sha256, item[1].name, item[2].ext))
        return items

    # ------------------------------------------------------------------ reconcile

    def _reconcile(self) -> int:
        """Make the catalog match the folders and remove leftovers of interrupted operations.

        Returns:
            The number of catalog rows added for files that had none.
        """
        for entry in os.scandir(self.root):
            if entry.name.startswith(_TRASH_PREFIX):
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

        on_disk = {(folder.name, file.sha256): file for _, folder, file in self._scan()}
        with self._db() as conn:
            rows = {
                (label, sha): (ext, added_by, chat_id, added_at)
                for sha, label, ext, added_by, chat_id, added_at in conn.execute(
                    "SELECT sha256, label, ext, added_by, chat_id, added_at FROM images"
                )
            }
            gone = [key for key in rows if key not in on_disk]
            # A file that moved folder by hand keeps who added it and when.
            orphans = {sha: rows[(label, sha)] for label, sha in gone}
            conn.executemany("DELETE FROM images WHERE label = ? AND sha256 = ?", gone)
            added = 0
            for (folder, sha), file in on_disk.items():
                row = rows.get((folder, sha))
                if row is not None:
                    if row[0] != file.ext:
                        conn.execute(
                            "UPDATE images SET ext = ? WHERE label = ? AND sha256 = ?",
                            (file.ext, folder, sha),
                        )
                    continue
                if sha in orphans:
                    _, added_by, chat_id, added_at = orphans[sha]
                else:
                    added_by, chat_id = None, None
                    try:
                        added_at = file.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                conn.execute(
                    "INSERT INTO images (sha256, label, ext, added_by, chat_id, added_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (sha, folder, file.ext, added_by, chat_id, added_at),
                )
                added += 1
        if gone or added:
            logger.info("catalog reconciled: %d rows dropped, %d rows added", len(gone), added)
        return added

    # ------------------------------------------------------------------ writing

    def _write_atomic(self, directory: Path, final_name: str, data: bytes) -> Path:
        """Write ``data`` to ``directory/final_name`` via a fsynced temp file and ``os.replace``.

        Raises:
            StoreFullError: the disk filled up while writing (the temp file is removed).
            OSError: any other write failure (the temp file is removed).
        """
        tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        final = directory / final_name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and _is_disk_full(exc):
                raise StoreFullError(_STORE_FULL_MESSAGE) from exc
            raise
        fsync_dir(directory)
        return final

    def _check_free_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.images_dir).free
        if free < self.min_free_bytes + needed:
            logger.warning(
                "store full: %d bytes free, %d needed plus a floor of %d", free, needed, self.min_free_bytes
            )
            raise StoreFullError(_STORE_FULL_MESSAGE)

    def add(
        self, data: bytes, label: str, *, added_by: int | None = None, chat_id: int | None = None
    ) -> AddResult:
        """Store one labelled image.

        The label is validated, the image is fully decoded (so nothing unreadable is ever stored),
        and the bytes are stored unchanged as ``images/<label>/<sha256>.<ext>``.

        Args:
            data: the encoded image (JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC bytes).
            label: the label as typed; an existing label in another letter case or Unicode form is
                reused with its existing spelling.
            added_by: Telegram user id of the admin who taught it, for the catalog.
            chat_id: chat it came from, for the catalog.

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
            folders = self._folders()
            for other_key, group in folders.items():
                for folder in group:
                    if (self.images_dir / folder.name / file_name).is_file():
                        if other_key == key:
                            self._ensure_row(sha, folder.name, ext, added_by, chat_id)
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
                path = self._write_atomic(directory, file_name, data)
            except BaseException:
                if created_dir:  # do not leave an empty new label behind
                    with contextlib.suppress(OSError):
                        directory.rmdir()
                raise
            try:
                with self._db() as conn:
                    conn.execute(
                        "INSERT OR REPLACE INTO images (sha256, label, ext, added_by, chat_id, added_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (sha, folder_name, ext, added_by, chat_id, time.time()),
                    )
            except sqlite3.Error:
                # The folder is the source of truth and already holds the image; the next
                # reconcile re-creates the row (without its provenance).
                logger.exception("image %s stored but its catalog row could not be written", sha)
        logger.info("stored %s under %r (added_by=%s)", file_name, stored_label, added_by)
        return AddResult(sha, stored_label, path, True)

    def _ensure_row(self, sha: str, folder: str, ext: str, added_by: int | None, chat_id: int | None) -> None:
        with self._db() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO images (sha256, label, ext, added_by, chat_id, added_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (sha, folder, ext, added_by, chat_id, time.time()),
            )

    # ------------------------------------------------------------------ labels

    def labels(self) -> list[LabelInfo]:
        """List the labels with their image counts.

        Returns:
            One :class:`LabelInfo` per label folder (empty folders included), sorted by label key.
        """
        result = []
        for _, group in sorted(self._folders().items()):
            count = len({f.sha256 for folder in group for f in self._files_in(folder.name)})
            result.append(LabelInfo(group[0].label, count))
        return result

    def resolve_label(self, name: str) -> str | None:
        """Find the existing label that ``name`` refers to (ignoring case and Unicode form).

        Args:
            name: a label as typed.

        Returns:
            The existing label's name as stored (its folder name), or None if there is none.

        Raises:
            LabelError: ``name`` is not a valid label.
        """
        group = self._folders().get(label_key(name))
        return group[0].label if group else None

    def _require_label(self, name: str) -> tuple[str, list[_Folder]]:
        display = normalize_label(name)
        group = self._folders().get(label_key(display))
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
            if new_key != old_key and new_key in self._folders():
                raise LabelError(
                    f"A label called “{self._folders()[new_key][0].label}” already exists. "
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
                    self._merge_folder(self.images_dir / extra.name, target)
            fsync_dir(self.images_dir)
            with self._db() as conn:
                for folder in group:
                    conn.execute(
                        "UPDATE OR REPLACE images SET label = ? WHERE label = ?", (new_display, folder.name)
                    )
        logger.info("renamed label %r to %r", group[0].label, new_display)
        return new_display

    def _merge_folder(self, source: Path, target: Path) -> None:
        for entry in os.scandir(source):
            if _IMAGE_NAME.match(entry.name) and entry.is_file():
                os.replace(entry.path, target / entry.name)
        fsync_dir(target)
        trash = self.root / f"{_TRASH_PREFIX}{secrets.token_hex(8)}"
        os.rename(source, trash)
        shutil.rmtree(trash, ignore_errors=True)

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
            count = len({f.sha256 for folder in group for f in self._files_in(folder.name)})
            trashes = []
            for folder in group:
                trash = self.root / f"{_TRASH_PREFIX}{secrets.token_hex(8)}"
                os.rename(self.images_dir / folder.name, trash)
                trashes.append(trash)
            fsync_dir(self.images_dir)
            with self._db() as conn:
                conn.executemany("DELETE FROM images WHERE label = ?", [(f.name,) for f in group])
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
            for group in self._folders().values():
                for folder in group:
                    for file in self._files_in(folder.name):
                        if file.sha256 == sha:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(file.path)
                                removed = True
                            fsync_dir(file.path.parent)
            with self._db() as conn:
                conn.execute("DELETE FROM images WHERE sha256 = ?", (sha,))
        if removed:
            logger.info("removed image %s", sha)
        return removed

    def import_tree(self, src_dir: Path | str) -> ImportReport:
        """Import a ``retrain.py``-style folder tree: one sub-folder per label, images inside.

        Each immediate sub-folder of ``src_dir`` is a label (its name goes through
        :func:`~model_store.labels.normalize_label`); every file in it, recursively, whose suffix is
        in :data:`~model_store.images.IMAGE_EXTENSIONS` (any letter case) is added. Nothing aborts
        the import except a full disk: refused folders, non-image suffixes, unreadable or corrupt
        files, files over :data:`MAX_IMPORT_FILE_BYTES` and images already stored under another label
        are listed in ``skipped`` with the reason. Symbolic links to folders are not followed below
        the label level.

        Args:
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
                    self._import_file(path, rel, label, report)
        logger.info(
            "imported %s: %d added, %d already present, %d skipped",
            src,
            report.added,
            report.duplicates,
            len(report.skipped),
        )
        return report

    def _import_file(self, path: Path, rel: str, label: str, report: ImportReport) -> None:
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
            result = self.add(data, label)
        except (ImageDecodeError, DuplicateImageError, LabelError) as exc:
            report.skipped.append((rel, exc.message))
            return
        if result.created:
            report.added += 1
        else:
            report.duplicates += 1

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> list[ImageRecord]:
        """List every stored image from a scan of the folders.

        Temp files (``.tmp-*``) and files not named ``<64 hex digits>.<ext>`` are ignored.

        Returns:
            :class:`ImageRecord` s sorted by (label key, sha256).
        """
        records = []
        seen: set[tuple[str, str]] = set()
        for label, folder, file in self._scan():
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
        labels_by_folder = {f.name: group[0].label for group in self._folders().values() for f in group}
        with self._db() as conn:
            rows = conn.execute(
                "SELECT sha256, label, ext FROM images WHERE added_by = ? ORDER BY added_at DESC, rowid DESC",
                (user_id,),
            ).fetchall()
        records = []
        for sha, folder, ext in rows:
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
        with self._db() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(DISTINCT sha256) FROM images WHERE added_at >= ?", (timestamp,)
            ).fetchone()
        return int(count)
