"""The image store's provenance catalog: ``<root>/catalog.sqlite`` (SQLite, WAL).

One row per stored image and label folder: who added it (``added_by``), from which chat, when. The
folders are the source of truth; the catalog only adds provenance, so :meth:`Catalog.open` rebuilds
a catalog that is missing, empty, not a database, damaged (``PRAGMA quick_check``) or of another
schema (a foreign SQLite file, an older version's), keeping the bad file as
``catalog.sqlite.corrupt-<UTC time>``, and :meth:`Catalog.reconcile` makes the rows match the files.
No locking here: :class:`~model_store.dataset.ImageStore` calls these under its store lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from model_store.dataset.folders import StoredFile
from model_store.fs import fsync_dir

__all__ = ["SCHEMA", "Catalog"]

logger = logging.getLogger(__name__)

SCHEMA = """
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
        conn.executescript(SCHEMA)
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


class Catalog:
    """The SQLite catalog at ``path``.

    Args:
        path: ``<root>/catalog.sqlite``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ opening

    def _init(self) -> None:
        """Create or open the catalog (WAL, schema) and check it (``PRAGMA quick_check``).

        Raises:
            sqlite3.DatabaseError: the file is not a database, is damaged (``quick_check`` failed)
                or has other tables or columns than ours (a foreign file or an older schema).
        """
        with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as conn:
            layout = _table_layout(conn)  # read before anything is written to a foreign file
            if layout and layout != _expected_layout():  # empty: a new catalog
                raise _SchemaMismatch(
                    f"its tables are not this program's (found {sorted(layout)}, images columns "
                    f"{[c[0] for c in layout.get('images', [])]}): a foreign file or an older schema"
                )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            conn.commit()
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"quick_check: {'; '.join(map(str, problems[:3]))}")

    def open(self) -> str | None:
        """Open the catalog, creating it, or rebuilding an empty one if it is missing or corrupt.

        A catalog that is not a database, is damaged or has another schema is moved aside as
        ``catalog.sqlite.corrupt-<UTC time>`` (with its ``-wal`` / ``-shm`` files), with an ERROR in
        the log; stale ``-wal`` / ``-shm`` files of a missing catalog are moved aside too.

        Returns:
            Why the rows must be rebuilt from the folders: ``"missing"``, ``"empty"`` (0 bytes),
            ``"corrupt"``, or None for a healthy catalog.

        Raises:
            sqlite3.Error: the catalog cannot be opened for another reason (locked, read-only...).
            OSError: the damaged catalog cannot be moved aside.
        """
        missing = not self.path.exists()
        # A 0-byte file is an empty database to SQLite (its -wal, if any, may still hold the rows):
        # if the folders then add rows, who added them is lost as with a missing catalog.
        empty = not missing and self.path.stat().st_size == 0
        if missing:
            self._set_aside(self._sidecars(), "stale")
        try:
            self._init()
            return "missing" if missing else "empty" if empty else None
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise
            aside = self._set_aside([self.path, *self._sidecars()], "corrupt")
            logger.error(
                "the image catalog %s is damaged (%s): moved it aside to %s and rebuilding it from "
                "the image folders, which are the source of truth",
                self.path,
                exc,
                aside,
            )
            self._init()
            return "corrupt"

    def _sidecars(self) -> list[Path]:
        return [self.path.with_name(self.path.name + s) for s in ("-wal", "-shm", "-journal")]

    def _set_aside(self, paths: list[Path], why: str) -> Path:
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
        fsync_dir(self.path.parent)
        return first or self.path.with_name(f"{self.path.name}.{why}-{stamp}")

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection for one transaction: committed on success, rolled back on error."""
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            with conn:
                yield conn
        finally:
            conn.close()

    # ------------------------------------------------------------------ reconcile

    def reconcile(self, on_disk: Mapping[tuple[str, str], StoredFile]) -> int:
        """Make the rows match the files ``{(folder, sha256): file}``.

        Rows whose file is gone are dropped; files without a row get one (a file moved to another
        folder by hand keeps who added it and when; else ``added_by`` NULL and ``added_at`` the
        file's mtime); a changed extension is updated.

        Returns:
            The number of rows added.
        """
        with self.connect() as conn:
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

    # ------------------------------------------------------------------ rows

    def add(
        self, sha: str, folder: str, ext: str, added_by: int | None, chat_id: int | None, *, replace: bool = True
    ) -> None:
        """Record an image added now (``replace=False``: keep an existing row for it)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self.connect() as conn:
            conn.execute(
                f"{verb} INTO images (sha256, label, ext, added_by, chat_id, added_at) VALUES (?, ?, ?, ?, ?, ?)",
                (sha, folder, ext, added_by, chat_id, time.time()),
            )

    def relabel(self, folders: list[str], new_folder: str) -> None:
        """Move the rows of ``folders`` to ``new_folder`` (a renamed label)."""
        with self.connect() as conn:
            for folder in folders:
                conn.execute("UPDATE OR REPLACE images SET label = ? WHERE label = ?", (new_folder, folder))

    def delete_folders(self, folders: list[str]) -> None:
        """Drop the rows of deleted label folders."""
        with self.connect() as conn:
            conn.executemany("DELETE FROM images WHERE label = ?", [(f,) for f in folders])

    def delete_image(self, sha: str) -> None:
        """Drop the rows of one image (whatever its label)."""
        with self.connect() as conn:
            conn.execute("DELETE FROM images WHERE sha256 = ?", (sha,))

    def added_by(self, user_id: int) -> list[tuple[str, str, str]]:
        """``(sha256, folder, ext)`` of the images one user added, newest first."""
        with self.connect() as conn:
            return conn.execute(
                "SELECT sha256, label, ext FROM images WHERE added_by = ? ORDER BY added_at DESC, rowid DESC",
                (user_id,),
            ).fetchall()

    def count_added_since(self, timestamp: float) -> int:
        """Distinct images whose row was added at or after ``timestamp`` (unix seconds)."""
        with self.connect() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(DISTINCT sha256) FROM images WHERE added_at >= ?", (timestamp,)
            ).fetchone()
        return int(count)
