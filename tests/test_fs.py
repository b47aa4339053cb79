"""model_store.fs: the one file-system layer (durable writes, folder publication, locks), and the
structure rules around it: no other model_store module writes, syncs or locks files by itself,
one ``tf.function`` wrapper, and no long module without a reason written at its top."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from model_store import fs
from model_store.fs import LockHeld, atomic_path, file_lock, publish_dir, write_atomic

PACKAGE = Path(fs.__file__).parent


class SyncLog:
    """Records every ``os.fsync`` (is a folder, inode) and ``os.replace`` / ``os.rename`` (src, dst), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[Any, ...]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.events.append(("fsync", stat.S_ISDIR(st.st_mode), st.st_ino))
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            self.events.append(("rename", Path(src).name, Path(dst)))
            real_replace(src, dst, **kw)

        def rename(src: Any, dst: Any, **kw: Any) -> None:
            self.events.append(("rename", Path(src).name, Path(dst)))
            real_rename(src, dst, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)


def test_write_atomic_syncs_the_file_renames_it_then_syncs_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    log = SyncLog(monkeypatch)
    write_atomic(target, b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"new content"
    kinds = [e[0] for e in log.events]
    assert kinds == ["fsync", "rename", "fsync"], log.events
    assert log.events[0][1] is False  # the temp file's content first
    assert log.events[1][1].startswith(fs.TMP_PREFIX) and log.events[1][2] == target
    assert log.events[2][1] is True and log.events[2][2] == tmp_path.stat().st_ino  # then its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_the_old_content_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "CURRENT"
    target.write_bytes(b"old")

    def no_space(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OSError) as info:
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert info.value.errno in fs.DISK_FULL_ERRNOS
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT"]


def test_atomic_path_publishes_only_a_complete_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "plot.png"
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".png") as tmp:
        assert tmp.name.startswith(fs.TMP_PREFIX) and tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer crashed")
    assert list(tmp_path.iterdir()) == []

    log = SyncLog(monkeypatch)
    with atomic_path(target, suffix=".png") as tmp:
        tmp.write_bytes(b"whole")
    monkeypatch.undo()
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    assert [e[0] for e in log.events] == ["fsync", "rename", "fsync"] and log.events[2][1] is True


def test_publish_dir_syncs_everything_inside_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / ".tmp-v1"
    (temp / "saved_model" / "variables").mkdir(parents=True)
    files = [temp / "model.keras", temp / "saved_model" / "variables" / "data"]
    for f in files:
        f.write_bytes(b"x")
    inodes = {f.stat().st_ino for f in files} | {temp.stat().st_ino, (temp / "saved_model").stat().st_ino}
    log = SyncLog(monkeypatch)
    final = publish_dir(temp, tmp_path / "v1")
    monkeypatch.undo()
    assert final == tmp_path / "v1" and (final / "model.keras").is_file() and not temp.exists()
    rename = next(i for i, e in enumerate(log.events) if e[0] == "rename")
    synced_before = {e[2] for e in log.events[:rename] if e[0] == "fsync"}
    assert inodes <= synced_before
    assert log.events[rename + 1 :] == [("fsync", True, tmp_path.stat().st_ino)]


def test_a_file_lock_excludes_other_processes_and_is_freed_when_they_die(tmp_path: Path) -> None:
    path = tmp_path / ".train.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from model_store.fs import file_lock\n"
            "with file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld):
            file_lock(path, blocking=False).acquire()
    finally:
        holder.kill()
        holder.wait()
    with file_lock(path, blocking=False):  # the kernel released the dead holder's lock
        assert path.exists()


def test_a_file_lock_excludes_other_threads(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    inside: list[int] = []
    overlaps: list[int] = []

    def work(n: int) -> None:
        for _ in range(5):
            with file_lock(path):
                inside.append(n)
                if len(inside) > 1:
                    overlaps.append(n)
                time.sleep(0.002)
                inside.remove(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []


# ------------------------------------------------------------------------------ structure rules


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts)


def _calls(path: Path) -> list[tuple[str, int]]:
    """Dotted names of every call and import in a module, with line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts = []
            func: ast.AST = node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            found.append((".".join(reversed(parts)), node.lineno))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                found.append((f"import {module or alias.name}", node.lineno))
    return found


def test_only_fs_writes_syncs_or_locks_files_durably() -> None:
    """Durable writes, temp names and locks go through model_store.fs; no module keeps its own copy.

    (Plain renames of complete files, e.g. merging two label folders, may stay where they are.)
    """
    forbidden = (
        "os.fsync",
        "tempfile.mkstemp",
        "tempfile.NamedTemporaryFile",
        "fcntl.flock",
        "FileLock",
        "import fcntl",
        "import filelock",
    )
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in _modules()
        if path.name != "fs.py"
        for name, line in _calls(path)
        if name in forbidden
    ]
    for path in _modules():
        if path.name != "fs.py":
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(".tmp-"):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: its own temp name {node.value!r}")
    assert offenders == [], offenders


def test_one_tf_function_wrapper() -> None:
    users = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for path in _modules()
        for name, line in _calls(path)
        if name == "tf.function"
    ]
    assert users == [f"engine.py:{line}" for name, line in _calls(PACKAGE / "engine.py") if name == "tf.function"]
    assert len(users) == 1


def test_long_modules_say_why_at_their_top() -> None:
    """No module of model_store/ or bot/ over ~400 lines without the reason written in its docstring."""
    silent = []
    for path in _modules() + sorted((PACKAGE.parent / "bot").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Why this module is long" not in doc:
                silent.append(f"{path.relative_to(PACKAGE.parent)} ({len(text.splitlines())} lines)")
    assert silent == [], silent
