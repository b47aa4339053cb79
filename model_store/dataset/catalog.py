"""The store's SQLite catalog: ``<root>/catalog.sqlite`` (SQLite, WAL).

Tables:

* ``images``: one row per stored image and label folder: who added it (``added_by``, the admin who
  taught or accepted it), who suggested its label (``suggested_by``, a user whose feedback an admin
  accepted from the review queue), from which chat, when. The folders are the source of truth; these
  rows only add provenance.
* ``review_answers`` / ``review_items``: the bot's answers, users' feedback on them and the admins'
  review queue (:mod:`model_store.review` reads and writes them; their DDL lives here so that the
  catalog has one schema and one migration path).

Schema versions (``PRAGMA user_version``): version 1 (``images`` without ``suggested_by``, the layout
of every catalog written before issue 10; its ``user_version`` is 0) is **upgraded in place** by
:meth:`Catalog.open` in one transaction (a column added, the review tables created), so ``added_by``
provenance survives; version 2 is the current one. :meth:`Catalog.open` rebuilds a catalog that is
missing, empty, not a database, damaged (``PRAGMA quick_check``) or of a layout that is neither
(a foreign SQLite file), keeping the bad file as ``catalog.sqlite.corrupt-<UTC time>``, and
:meth:`Catalog.reconcile` makes the ``images`` rows match the files.
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

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Catalog"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of the current layout (version 1 catalogs say 0)."""

_IMAGES_V1 = """
CREATE TABLE IF NOT EXISTS images (
    sha256   TEXT NOT NULL,
    label    TEXT NOT NULL,   -- the folder name under images/
    ext      TEXT NOT NULL,
    added_by INTEGER,
    chat_id  INTEGER,
    added_at REAL NOT NULL,
    PRIMARY KEY (sha256, label)
)
"""

_INDEXES_V1 = [
    "CREATE INDEX IF NOT EXISTS images_added_by ON images (added_by, added_at)",
    "CREATE INDEX IF NOT EXISTS images_added_at ON images (added_at)",
]

# Version 2 (issue 10): who suggested an accepted image's label, and the review tables.
_ADD_SUGGESTED_BY = "ALTER TABLE images ADD COLUMN suggested_by INTEGER"

_REVIEW_TABLES = [
    # One row per classified photo the bot answered; the sender's feedback on it in the same row
    # (only the sender may give it; a second verdict replaces the first).
    """
    CREATE TABLE IF NOT EXISTS review_answers (
        answer_id        INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: safe in callback data
        chat_id          INTEGER NOT NULL,
        chat_type        TEXT NOT NULL,
        reply_message_id INTEGER NOT NULL,
        sender_id        INTEGER NOT NULL,
        file_id          TEXT NOT NULL,
        file_unique_id   TEXT NOT NULL,
        predictions      TEXT NOT NULL,    -- JSON [[label, probability], ...], best first
        is_unknown       INTEGER,          -- open-set flag: NULL (no check), 0 or 1
        model_version    TEXT,
        uncertainty      REAL NOT NULL,    -- active_learning.margin_uncertainty
        auto_queued      INTEGER NOT NULL, -- 1: entered the queue as uncertain (active learning)
        created_at       REAL NOT NULL,
        verdict          TEXT,             -- NULL, 'right', 'wrong' or 'none'
        verdict_label    TEXT,             -- the label the user gave (right: the top-1 label)
        verdict_at       REAL
    )
    """,
    "CREATE INDEX IF NOT EXISTS review_answers_sender ON review_answers (sender_id)",
    "CREATE INDEX IF NOT EXISTS review_answers_file ON review_answers (file_unique_id)",
    "CREATE INDEX IF NOT EXISTS review_answers_created ON review_answers (created_at)",
    # One row per photo (file_unique_id) in the admins' queue; resolved rows stay until they expire
    # so that the same photo is not queued again right after an admin decided on it.
    """
    CREATE TABLE IF NOT EXISTS review_items (
        item_id        INTEGER PRIMARY KEY AUTOINCREMENT,
        file_unique_id TEXT NOT NULL UNIQUE,
        status         TEXT NOT NULL,      -- 'pending', 'accepted' or 'discarded'
        reason         TEXT NOT NULL,      -- 'uncertain' or 'feedback'
        uncertainty    REAL NOT NULL,      -- active_learning.priority, first key
        disagreement   REAL NOT NULL,      -- active_learning.priority, second key
        queued_at      REAL NOT NULL,
        resolved_at    REAL,
        resolved_by    INTEGER,
        resolved_label TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS review_items_order ON review_items (status, uncertainty, disagreement, queued_at)",
]

_IMAGES_V2 = """
CREATE TABLE IF NOT EXISTS images (
    sha256       TEXT NOT NULL,
    label        TEXT NOT NULL,   -- the folder name under images/
    ext          TEXT NOT NULL,
    added_by     INTEGER,         -- who taught it (/add) or accepted it (/review)
    chat_id      INTEGER,
    added_at     REAL NOT NULL,
    suggested_by INTEGER,         -- whose feedback suggested it (review queue), else NULL
    PRIMARY KEY (sha256, label)
)
"""

_STATEMENTS = [_IMAGES_V2, *_INDEXES_V1, *_REVIEW_TABLES]

SCHEMA = ";\n".join(s.strip() for s in _STATEMENTS) + ";\n"
"""The whole current layout (``executescript`` form)."""

_MIGRATIONS: dict[int, list[str]] = {1: [_ADD_SUGGESTED_BY, *_REVIEW_TABLES]}
"""Statements that take a catalog from version ``key`` to ``key + 1``, run in one transaction."""


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


def _layout_of(statements: list[str]) -> dict[str, list[tuple[str, str, int, int]]]:
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        for statement in statements:
            conn.execute(statement)
        return _table_layout(conn)


_LAYOUTS = {1: _layout_of([_IMAGES_V1, *_INDEXES_V1]), SCHEMA_VERSION: _layout_of(_STATEMENTS)}
"""The tables and columns of each known schema version."""


def _version_of(layout: dict[str, list[tuple[str, str, int, int]]]) -> int | None:
    """The schema version whose tables and columns are exactly ``layout`` (None: foreign)."""
    return next((version for version, known in _LAYOUTS.items() if known == layout), None)


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
        """Create, upgrade or open the catalog (WAL, schema) and check it (``PRAGMA quick_check``).

        A version-1 catalog (before issue 10) is upgraded in place, in one transaction: its rows,
        and so who added each image, are kept (:data:`_MIGRATIONS`).

        Raises:
            sqlite3.DatabaseError: the file is not a database, is damaged (``quick_check`` failed)
                or has other tables or columns than any version of ours (a foreign file).
        """
        with contextlib.closing(sqlite3.connect(self.path, timeout=60, isolation_level=None)) as conn:
            self._check_layout(conn)  # read before anything is written to a foreign file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._check_layout(conn)  # again, now that no other writer can change it
                if version is None:  # a new, empty catalog
                    for statement in _STATEMENTS:
                        conn.execute(statement)
                while version is not None and version < SCHEMA_VERSION:
                    for statement in _MIGRATIONS[version]:
                        conn.execute(statement)
                    logger.info("catalog %s upgraded in place from schema %d to %d", self.path, version, version + 1)
                    version += 1
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"quick_check: {'; '.join(map(str, problems[:3]))}")

    @staticmethod
    def _check_layout(conn: sqlite3.Connection) -> int | None:
        """The catalog's schema version, None for an empty database.

        Raises:
            _SchemaMismatch: the tables are not those of any version of ours.
            sqlite3.OperationalError: a layout we do not know from a newer schema version (not set
                aside: the program must be upgraded).
        """
        layout = _table_layout(conn)
        if not layout:
            return None
        version = _version_of(layout)
        (stamped,) = conn.execute("PRAGMA user_version").fetchone()
        if version is None and int(stamped) > SCHEMA_VERSION:
            # Written by a newer labelgram: setting it aside would lose that version's data.
            raise sqlite3.OperationalError(
                f"the catalog was written by a newer version of this program (schema {stamped}, this "
                f"one knows up to {SCHEMA_VERSION}): upgrade the program, or move the file aside"
            )
        if version is None:
            raise _SchemaMismatch(
                f"its tables are not this program's (found {sorted(layout)}, images columns "
                f"{[c[0] for c in layout.get('images', [])]}): a foreign file or an older schema"
            )
        return version

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
                (label, sha): (ext, added_by, chat_id, added_at, suggested_by)
                for sha, label, ext, added_by, chat_id, added_at, suggested_by in conn.execute(
                    "SELECT sha256, label, ext, added_by, chat_id, added_at, suggested_by FROM images"
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
                    _, added_by, chat_id, added_at, suggested_by = orphans[sha]
                else:
                    added_by, chat_id, suggested_by = None, None, None
                    try:
                        added_at = file.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                conn.execute(
                    "INSERT INTO images (sha256, label, ext, added_by, chat_id, added_at, suggested_by) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (sha, folder, file.ext, added_by, chat_id, added_at, suggested_by),
                )
                added += 1
        if gone or added:
            logger.info("catalog reconciled: %d rows dropped, %d rows added", len(gone), added)
        return added

    # ------------------------------------------------------------------ rows

    def add(
        self,
        sha: str,
        folder: str,
        ext: str,
        added_by: int | None,
        chat_id: int | None,
        *,
        replace: bool = True,
        suggested_by: int | None = None,
    ) -> None:
        """Record an image added now (``replace=False``: keep an existing row for it)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self.connect() as conn:
            conn.execute(
                f"{verb} INTO images (sha256, label, ext, added_by, chat_id, added_at, suggested_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sha, folder, ext, added_by, chat_id, time.time(), suggested_by),
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
