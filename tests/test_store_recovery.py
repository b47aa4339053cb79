"""Hardening round 2 (issue 8, points 4, 5 and 8): catalog rebuild, one bot per store, durability.

* A corrupt or missing ``catalog.sqlite`` is rebuilt from the image folders (the source of truth),
  the damaged file kept aside, loudly logged; the store opens.
* One bot per store: a second ``run`` on the same store exits with code 3 and says why; every
  writer of ``CURRENT`` (``/rollback``, CLI ``rollback``, a retrain's promotion) holds the store's
  training lock.
* Durability: bottleneck cache writes and ``registry.commit`` fsync file, then rename, then folder;
  ``BotState.update`` changes memory only after the write succeeded; a full disk during training
  is reported as such and outputs get a free-space check first; the gate survives test images
  deleted during the training.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bot import app as bot_app
from bot.__main__ import main as cli_main
from bot.state import BotState
from model_store import pipeline
from model_store.bottlenecks import BottleneckCache
from model_store.dataset import ImageStore
from model_store.pipeline import retrain, training_lock
from model_store.registry import ModelRegistry
from model_store.stages.gate import gate_against_current
from model_store.workspace import Workspace
from tests.auxil import modelstore as fx
from tests.auxil.bot_harness import ADMIN, ROOT, bot_config, photos, running_bot
from tests.botapi_standin import BotApiStandIn


# ------------------------------------------------------------------------------ helpers
class FsyncLog:
    """Records, in order, every ``os.fsync`` (inode, is a folder), ``os.replace`` and ``os.rename``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[Any, ...]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real_replace(src, dst, **kw)
            self.events.append(("rename", Path(dst)))

        def rename(src: Any, dst: Any, **kw: Any) -> None:
            real_rename(src, dst, **kw)
            self.events.append(("rename", Path(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def index(self, event: tuple[Any, ...]) -> int:
        assert event in self.events, f"{event} not in {self.events}"
        return self.events.index(event)


def _store_with_images(root: Path, per_label: int = 3) -> ImageStore:
    store = ImageStore(root)
    for label in ("shoes", "hat"):
        for p in photos(label)[:per_label]:
            store.add(p.read_bytes(), label, added_by=ADMIN, chat_id=ADMIN)
    return store


def _dummy_versions(store_dir: Path, n: int = 2) -> list[str]:
    """``n`` promoted versions (placeholder files: enough for the pointer and its history)."""
    reg = ModelRegistry(store_dir / "models")
    names = []
    for i in range(n):
        name, tmp = reg.new_version_dir()
        name = f"20260101-00000{i}-{name[-6:]}"
        (tmp / "model.keras").write_bytes(b"placeholder")
        (tmp / "labels.txt").write_text("a\nb\n", encoding="utf-8")
        reg.promote(reg.commit(name, tmp))
        names.append(name)
    return names


def _current(store_dir: Path) -> str:
    return json.loads((store_dir / "models" / "CURRENT").read_text(encoding="utf-8"))["version"]


# ------------------------------------------------------------------------------ point 4: catalog
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_catalog_is_set_aside_and_rebuilt_from_the_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    root = tmp_path / "store"
    before = sorted((x.name, x.count) for x in _store_with_images(root).labels())
    catalog = root / "catalog.sqlite"
    with sqlite3.connect(catalog) as conn:  # fold the WAL into the main file, then damage it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    if damage == "garbage":
        catalog.write_bytes(b"this is not an SQLite database\n" * 200)
    else:
        data = catalog.read_bytes()
        catalog.write_bytes(data[:100] + b"\xff" * (len(data) - 100))  # header kept, pages destroyed
    damaged = catalog.read_bytes()

    with caplog.at_level(logging.WARNING, logger="model_store.dataset"):
        store = ImageStore(root)
    assert sorted((x.name, x.count) for x in store.labels()) == before
    aside = list(root.glob("catalog.sqlite.corrupt-*"))
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [damaged]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("damaged" in r.getMessage() and "corrupt-" in r.getMessage() for r in loud), caplog.text
    assert any("rebuilt it from the image folders (6 images)" in r.getMessage() for r in loud), caplog.text
    # the bot starts on it: a Workspace opens and a new image can be added
    ws = Workspace(root)
    assert ws.store.add(photos("pants")[0].read_bytes(), "pants").created


def test_a_missing_catalog_is_rebuilt_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    _store_with_images(root)
    for p in root.glob("catalog.sqlite*"):
        p.unlink()
    with caplog.at_level(logging.WARNING, logger="model_store.dataset"):
        store = ImageStore(root)
    assert sum(x.count for x in store.labels()) == 6
    assert any(
        r.levelno == logging.WARNING and "was missing: rebuilt it from the image folders (6 images)" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model_store.dataset"):
        ImageStore(tmp_path / "fresh")  # a new, empty store is no news
    assert not caplog.records


@pytest.mark.parametrize(
    "schema",
    [
        "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT)",  # an older schema
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",  # a foreign SQLite file
    ],
)
def test_a_catalog_with_another_schema_is_set_aside_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, schema: str
) -> None:
    # An older schema stopped start-up: "OperationalError: no such column: added_by".
    root = tmp_path / "store"
    _store_with_images(root)
    for p in root.glob("catalog.sqlite*"):
        p.unlink()
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        conn.execute(schema)
        conn.commit()
    foreign = (root / "catalog.sqlite").read_bytes()
    with caplog.at_level(logging.WARNING, logger="model_store.dataset"):
        store = ImageStore(root)
    assert sum(x.count for x in store.labels()) == 6
    assert [p.read_bytes() for p in root.glob("catalog.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))] == [foreign]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("older schema" in m and "corrupt-" in m for m in errors), caplog.text
    assert store.add(photos("pants")[0].read_bytes(), "pants", added_by=5, chat_id=5).created
    ImageStore(root)  # and our own catalog opens again without being set aside
    assert len(list(root.glob("catalog.sqlite.corrupt-*"))) == 1


def test_an_empty_catalog_file_warns_like_a_missing_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    _store_with_images(root)
    for p in root.glob("catalog.sqlite*"):
        p.unlink()
    (root / "catalog.sqlite").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="model_store.dataset"):
        store = ImageStore(root)
    assert sum(x.count for x in store.labels()) == 6
    assert any(
        r.levelno == logging.WARNING and "was empty: rebuilt it from the image folders (6 images)" in r.getMessage()
        and "who added those images is no longer known" in r.getMessage()
        for r in caplog.records
    ), caplog.text


# ------------------------------------------------------------------------------ point 5: one bot per store
def test_a_second_bot_on_the_same_store_exits_3_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            # what a running bot holds (bot.app.acquire_store_lock), taken here with filelock itself
            "import sys, time; from filelock import FileLock; "
            "lock = FileLock(sys.argv[1]); lock.acquire(timeout=0); print('held', flush=True); time.sleep(120)",
            str(store / ".bot.lock"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        config = tmp_path / "config.toml"
        config.write_text(
            f'store_dir = "{store}"\n[telegram]\ntoken = "123:ABCdefGHIjkl"\n'
            'base_url = "http://127.0.0.1:9/bot"\nbase_file_url = "http://127.0.0.1:9/file/bot"\n',
            encoding="utf-8",
        )
        code = bot_app.run(str(config))
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 3, code
    assert bot_app.EXIT_STORE_IN_USE == 3
    assert "another bot is already running on the store" in err and ".bot.lock" in err


def test_cli_rollback_takes_the_training_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    first, second = _dummy_versions(store)
    with training_lock(Workspace(store)):  # e.g. a CLI retrain about to promote
        assert cli_main(["rollback", "--store_dir", str(store)]) == 1
        assert _current(store) == second
    assert "Another training is already running" in capsys.readouterr().err
    assert cli_main(["rollback", "--store_dir", str(store)]) == 0
    assert _current(store) == first


async def test_bot_rollback_takes_the_training_lock(botapi: BotApiStandIn, tmp_path: Path) -> None:
    store = tmp_path / "store"
    _first, second = _dummy_versions(store)
    async with running_bot(botapi, bot_config(botapi, store)) as bot:
        with training_lock(Workspace(store)):  # a command-line retrain holds it
            answer = await bot.ask(ADMIN, "/rollback")
        assert _current(store) == second
    assert "A training is running on this store" in answer and "command line" in answer


# ------------------------------------------------------------------------------ point 8: durability
def test_bottleneck_cache_write_fsyncs_file_then_renames_then_fsyncs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = BottleneckCache(tmp_path / "bn", SimpleNamespace(id="stub-backbone", feature_dim=4))
    sha = "ab" * 32
    log = FsyncLog(monkeypatch)
    cache._store(sha, "c100", np.arange(4, dtype=np.float32))
    final = cache.path(sha, "c100")
    assert np.array_equal(np.load(final), np.arange(4, dtype=np.float32))
    file_sync = log.index(("fsync", final.stat().st_ino, False))
    renamed = log.index(("rename", final))
    dir_sync = log.index(("fsync", final.parent.stat().st_ino, True))
    assert file_sync < renamed < dir_sync


def test_registry_commit_fsyncs_the_version_folder_and_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = ModelRegistry(tmp_path / "models")
    name, tmp = reg.new_version_dir()
    (tmp / "model.keras").write_bytes(b"m")
    (tmp / "saved_model").mkdir()
    (tmp / "saved_model" / "saved_model.pb").write_bytes(b"s")
    version_ino, sub_ino = tmp.stat().st_ino, (tmp / "saved_model").stat().st_ino
    log = FsyncLog(monkeypatch)
    version = reg.commit(name, tmp)
    renamed = log.index(("rename", version.path))
    assert log.index(("fsync", version_ino, True)) < renamed, "the version folder is not fsynced before the rename"
    assert log.index(("fsync", sub_ino, True)) < renamed, "a folder inside the version is not fsynced"
    assert log.index(("fsync", (version.path / "model.keras").stat().st_ino, False)) < renamed
    assert renamed < log.index(("fsync", reg.root.stat().st_ino, True)), "the parent is not fsynced after"


def test_bot_state_update_changes_memory_only_after_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = BotState(tmp_path)
    state.update(last_failure_fingerprint="old", last_scheduled_check=1.0)

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bot.state.write_atomic", disk_full)
    with pytest.raises(OSError):
        state.update(last_failure_fingerprint="new", last_run={"status": "promoted"})
    assert state.get("last_failure_fingerprint") == "old"
    assert state.get("last_run") is None
    monkeypatch.undo()
    assert BotState(tmp_path).get("last_failure_fingerprint") == "old"  # disk and memory agree


def test_a_full_disk_during_training_is_reported_as_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fill_the_disk(*args: Any, **kwargs: Any) -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:  # as Keras / h5py wrap it
            raise RuntimeError("Unable to synchronously write data") from exc

    monkeypatch.setattr(pipeline, "_retrain", fill_the_disk)
    ws = Workspace(tmp_path / "store")
    report = retrain(ws)
    assert report.status == "failed" and report.message == pipeline.DISK_FULL_MESSAGE
    assert "disk is full" in report.message and "crashed" not in report.message
    # and the training subprocess the bot reads (--json), when the error escapes the library call
    monkeypatch.setattr(pipeline, "retrain", fill_the_disk)
    assert cli_main(["retrain", "--store_dir", str(tmp_path / "store"), "--json"]) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["event"] == "result" and result["status"] == "failed"
    assert "disk is full" in result["message"] and "crashed" not in result["message"]


def test_tensorflow_s_disk_full_error_is_recognised_as_disk_full() -> None:
    # Model.export writes the SavedModel through TensorFlow's file system, which raises
    # ResourceExhaustedError("<path>; No space left on device") with no errno: it was "crashed".
    import tensorflow as tf

    with pytest.raises(tf.errors.ResourceExhaustedError) as info:
        with tf.io.gfile.GFile("/dev/full", "wb") as f:  # every write there fails with ENOSPC
            f.write(b"x" * 100_000)
    assert "No space left on device" in str(info.value)
    assert pipeline.is_disk_full(info.value)
    try:
        raise RuntimeError("export failed") from info.value
    except RuntimeError as wrapped:
        assert pipeline.is_disk_full(wrapped)
    assert pipeline.is_disk_full(tf.errors.ResourceExhaustedError(None, None, "/x/variables.data; Disk quota exceeded"))
    # an out-of-memory ResourceExhaustedError is not a full disk, nor is another OSError
    assert not pipeline.is_disk_full(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"))
    assert not pipeline.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_training_outputs_get_a_free_space_check_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    for label, files in fx.clothing_photos().items():
        if label in ("shoes", "hat"):
            (src / label).mkdir(parents=True)
            for p in files[:6]:
                shutil.copy(p, src / label / p.name)
    ws = Workspace(tmp_path / "store")
    assert ws.store.import_tree(src).added == 12
    real = shutil.disk_usage
    Usage = namedtuple("Usage", "total used free")

    def low_on_models(path: Any) -> Any:
        u = real(path)
        if Path(path).resolve().is_relative_to(ws.registry.root.resolve()):
            return Usage(u.total, u.total - 3_000_000, 3_000_000)  # 3 MB left
        return u

    monkeypatch.setattr(shutil, "disk_usage", low_on_models)
    report = retrain(ws, fx.train_config(epochs=2, accuracy_floor=0.0), backbone=fx.shared_backbone())
    assert report.status == "failed", report.message
    assert report.message.startswith("Not enough free disk space to save the new model: 3 MB free")
    assert ws.registry.versions() == [] and not list(ws.registry.root.iterdir())


def test_gate_skips_test_images_deleted_during_the_training(tmp_path: Path) -> None:
    """The serving model has another backbone, so the gate reads the test images from disk."""
    import keras

    ws = Workspace(tmp_path / "store")
    name, tmp = ws.registry.new_version_dir()
    inp = keras.Input((32, 32, 3))
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inp))
    keras.Model(inp, out).save(tmp / "model.keras")
    (tmp / "labels.txt").write_text("hat\nshoes\n", encoding="utf-8")
    (tmp / "metrics.json").write_text(json.dumps({"backbone": {"id": "another-backbone"}}), encoding="utf-8")
    ws.registry.promote(ws.registry.commit(name, tmp))

    records = []
    for label in ("hat", "shoes"):
        for p in photos(label)[:3]:
            copy = tmp_path / f"{label}-{p.name}"
            shutil.copy(p, copy)
            records.append(SimpleNamespace(label=label, path=copy))
    records[0].path.unlink()  # an admin's /delete while the training ran
    records[4].path.unlink()
    new_probs = np.tile(np.array([[0.9, 0.1]], np.float32), (6, 1))
    result = gate_against_current(
        ws, SimpleNamespace(id="this-backbone"), np.zeros((6, 1, 4), np.float32), records, new_probs, ["hat", "shoes"]
    )
    assert result is not None
    assert result["images"] == 4 and result["missing_images"] == 2
    assert result["new_accuracy"] == pytest.approx(2 / 4)  # hat, hat right; shoes, shoes wrong
    assert 0.0 <= result["current_accuracy"] <= 1.0

    for r in records[1:4] + records[5:]:
        r.path.unlink()
    result = gate_against_current(
        ws, SimpleNamespace(id="this-backbone"), np.zeros((6, 1, 4), np.float32), records, new_probs, ["hat", "shoes"]
    )
    assert result is not None and result["images"] == 0 and result["current_accuracy"] is None


@pytest.mark.slow
async def test_scheduled_training_skips_quietly_while_a_cli_retrain_holds_the_store(
    botapi: BotApiStandIn, tmp_path: Path
) -> None:
    """Not "failed: another training is already running" to every admin: a skip, then a run later."""
    store = tmp_path / "store"
    _store_with_images(store)
    marker = tmp_path / "trained"
    fake_training = [
        sys.executable,
        "-c",
        "import json, pathlib, sys; pathlib.Path(sys.argv[1]).touch(); "
        "print(json.dumps({'event': 'result', 'status': 'failed', 'message': 'fake training'}))",
        str(marker),
    ]
    config = bot_config(botapi, store, training={"interval_seconds": 0.3})
    async with running_bot(botapi, config, train_command=fake_training) as bot:
        with training_lock(Workspace(store)):
            first = bot.svc.state.get("last_scheduled_check")
            deadline = asyncio.get_running_loop().time() + 20
            while bot.svc.state.get("last_scheduled_check") == first or not bot.svc.state.get("last_scheduled_check"):
                assert asyncio.get_running_loop().time() < deadline, "the scheduled job never fired"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a couple more fires
            assert not marker.exists(), "a training was started while the store's training lock was held"
            assert not botapi.sent_calls("sendMessage", chat_id=ADMIN), "admins were told of a failure"
        deadline = asyncio.get_running_loop().time() + 20
        while not marker.exists():  # the lock is free again: the next fire trains
            assert asyncio.get_running_loop().time() < deadline, "no training after the lock was released"
            await asyncio.sleep(0.05)
