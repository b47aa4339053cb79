"""Issue 4.4: SIGKILL at any moment loses nothing acknowledged and never leaves the bot without a model.

Complements tests/test_pipeline.py, which already kills ``python -m bot retrain --json`` during
bottlenecks (``test_sigkill_while_computing_bottlenecks_keeps_the_finished_ones``), training and
while writing the version folder, and checks the restart. Here:

* (a) a process looping ``ImageStore.add`` over many photos is killed at random points, again and
  again, on the same store: every image it acknowledged (printed its hash after ``add`` returned)
  is present and decodes, no temp file is visible, and catalog and folders agree after reopening;
* (a, over the bot) ``python -m bot run`` is killed while an admin's photos are being added: every
  photo the bot answered "Added to ..." is stored, and the restarted bot serves and teaches;
* (c, over the bot) a power cut while the bot's training writes a new version (the bot and its
  training process are both killed): the old version keeps serving after the restart, and the next
  ``/retrain`` works and removes the half-written folder;
* (d) a process promoting versions in a loop is killed at random points: ``CURRENT`` always names a
  complete version, the old or the new one, and the classifier loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from model_store.classifier import Classifier
from model_store.dataset import ImageStore
from model_store.images import decode_image
from model_store.registry import ModelRegistry
from tests.auxil.bot_harness import (
    ADMIN,
    CLOTHING,
    ROOT,
    TRAIN_PER_LABEL,
    USER,
    bot_config,
    labels_in,
    photos,
)
from tests.auxil.standin_extras import HardenedStandIn, serving_bot
from tests.auxil.store_checks import catalog_matches_folders

ADD_LOOP = """
import sys
from pathlib import Path
from model_store.dataset import ImageStore

root, labels, files = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
store = ImageStore(root)
print("open", flush=True)
for i, name in enumerate(files):
    result = store.add(Path(name).read_bytes(), labels[i % len(labels)], added_by=1, chat_id=1)
    print(result.sha256, result.label, flush=True)
print("done", flush=True)
"""

PROMOTE_LOOP = """
import sys
from model_store.registry import ModelRegistry

registry = ModelRegistry(sys.argv[1])
names = sys.argv[2:]
i = 0
while True:
    registry.promote(registry.get(names[i % len(names)]))
    print(names[i % len(names)], flush=True)
    i += 1
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("LABELGRAM_", "TELEGRAM_"))}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """240 distinct JPEG files (the clothing photos re-encoded, some 3x larger so writes take longer)."""
    out = tmp_path_factory.mktemp("many")
    sources = sorted(CLOTHING.glob("*/*.jpg"))
    files = []
    for i in range(240):
        img = Image.open(sources[i % len(sources)]).convert("RGB")
        if i % 3 == 0:
            img = img.resize((img.width * 3, img.height * 3))
        img.putpixel((0, 0), (i % 256, i // 256, 7))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80 + i % 15)
        path = out / f"p{i:03d}.jpg"
        path.write_bytes(buf.getvalue())
        files.append(path)
    assert len({hashlib.sha256(p.read_bytes()).digest() for p in files}) == len(files)
    return files


def _catalog(root: Path) -> set[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(root / "catalog.sqlite")) as conn:
        return set(conn.execute("SELECT sha256, label FROM images"))


@pytest.mark.slow
def test_sigkill_while_adding_images_loses_no_acknowledged_image(many_photos: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "store"
    script = tmp_path / "add_loop.py"
    script.write_text(ADD_LOOP)
    rng = random.Random(44)
    acknowledged: dict[str, str] = {}  # sha256 -> label
    kills = 0
    position = 0
    for round_no in range(10):
        batch = many_photos[position : position + 24]
        position += 24
        # a new label each round: the kill may also land while its folder is being created
        labels = ["shoes", "Hats", f"round {round_no}", "Розы"]
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), ",".join(labels), *map(str, batch)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(),
        )
        assert proc.stdout is not None
        if round_no % 4 == 3:
            # kill at a random moment from the start, acknowledged or not (opening, reconciling, adding)
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            lines = proc.stdout.read().split("\n")
        else:
            target = rng.randint(1, 20)
            lines = []
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if len(lines) - 1 >= target:  # the first line is "open"
                    time.sleep(rng.uniform(0.0, 0.02))
                    proc.send_signal(signal.SIGKILL)
                    lines += proc.stdout.read().split("\n")
                    break
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        kills += 1
        for line in lines:
            parts = line.split(" ", 1)
            if len(parts) == 2 and len(parts[0]) == 64:
                acknowledged[parts[0]] = parts[1]

        # what a restart sees
        store = ImageStore(root)
        snapshot = {r.sha256: r for r in store.snapshot()}
        for sha, label in acknowledged.items():
            assert sha in snapshot, f"round {round_no}: acknowledged image {sha[:12]} under {label!r} is gone"
            record = snapshot[sha]
            assert record.label == label
            data = record.path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha
            decode_image(data)
        assert not any(r.path.name.startswith(".tmp-") for r in snapshot.values())
        leftovers = [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]
        assert leftovers == [], f"leftovers after reopening: {leftovers}"
        assert _catalog(root) == {(r.sha256, r.path.parent.name) for r in snapshot.values()}
        for record in snapshot.values():  # images stored but not acknowledged are complete too
            assert hashlib.sha256(record.path.read_bytes()).hexdigest() == record.sha256
    assert kills == 10 and len(acknowledged) >= 20
    catalog_matches_folders(root)
    print(f"\nadd loop: {kills} kills survived, {len(acknowledged)} acknowledged images all present")


async def _start_bot(api: HardenedStandIn, config_path: Path, cwd: Path, stderr: Path) -> asyncio.subprocess.Process:
    with open(stderr, "ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", "--config", str(config_path), cwd=cwd, env=_env(), stderr=err,
            start_new_session=True,
        )


def _config_file(path: Path, api: HardenedStandIn, store: Path) -> Path:
    path.write_text(
        f'admins = [{ADMIN}]\nstore_dir = "{store}"\n\n[telegram]\ntoken = "{api.token}"\n'
        f'base_url = "{api.base_url}"\nbase_file_url = "{api.base_file_url}"\n\n'
        '[training]\nepochs = 20\naccuracy_floor = 0.0\nmax_accuracy_drop = 1.0\nmax_minutes = 5\n\n'
        '[limits]\nmin_free_disk_mb = 0\nteaching_edit_seconds = 0.5\n\n[logging]\nlevel = "INFO"\n',
        encoding="utf-8",
    )
    return path


def _acknowledged(text: str) -> dict[str, int]:
    """Images a teaching acknowledgement says were added, per label ("hat: 4 added (…)" lines, or
    "Added 9 images to hat (…)" once the burst is done; bot/acks.py)."""
    done = re.match(r"^Added (\d+) images? to (.+?) \(", text)
    if done:
        return {done.group(2): int(done.group(1))}
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(.+?): (\d+) added", text, re.M)}


def _power_cut(pid: int) -> None:
    """SIGKILL a process and every process below it (a training runs in its own session)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(pid)
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGKILL)
        parent.send_signal(signal.SIGKILL)


@pytest.mark.slow
async def test_sigkill_of_the_bot_while_an_admin_adds_photos(
    api: HardenedStandIn, store_copy: Path, tmp_path: Path, many_photos: list[Path]
) -> None:
    config_path = _config_file(tmp_path / "config.toml", api, store_copy)
    proc = await _start_bot(api, config_path, tmp_path, tmp_path / "stderr.txt")
    try:
        await api.wait_for(lambda c: c.method == "setMyCommands", timeout=90)
        sent = []
        for i, path in enumerate(many_photos[:80]):
            label = ("hat", "skirt")[i % 2]
            update = api.make_photo_update(ADMIN, ADMIN, path.read_bytes(), caption=f"/add {label}")
            api.push_update(update)
            sent.append((update["message"]["message_id"], path, label))
        # the burst is acknowledged by one message, edited as photos land (issue 12)
        await api.wait_for(lambda c: c.method in ("sendMessage", "editMessageText") and c.chat_id == ADMIN
                           and sum(_acknowledged(str(c.params["text"])).values()) >= 4, timeout=90)
    finally:
        _power_cut(proc.pid)
        await proc.wait()
    last = [c for c in api.sent if c.method in ("sendMessage", "editMessageText") and c.chat_id == ADMIN][-1]
    acknowledged = _acknowledged(str(last.params["text"]))
    assert 4 <= sum(acknowledged.values()) < len(sent), ("the kill landed in the middle of the adds", last.params["text"])

    store = ImageStore(store_copy)
    stored = {r.sha256: r for r in store.snapshot()}
    sent_shas = {hashlib.sha256(path.read_bytes()).hexdigest(): label for _, path, label in sent}
    for label, count in acknowledged.items():
        have = [r for sha, r in stored.items() if sent_shas.get(sha) == label and r.label == label]
        assert len(have) >= count, f"{count} acknowledged under {label}, {len(have)} stored"
        for record in have:
            decode_image(record.path.read_bytes())
    catalog_matches_folders(store_copy)
    assert not [p for p in store_copy.rglob("*") if p.name.startswith((".tmp-", ".trash-"))]

    # the restarted bot answers, and teaching the rest works (already stored ones are recognised)
    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        answer = await bot.reply_text(USER, bot.send_photo(USER, photos("shoes")[TRAIN_PER_LABEL]))
        texts = [await bot.reply_text(ADMIN, bot.send_photo(ADMIN, path, caption=f"/add {label}"))
                 for _, path, label in sent]
        labels = await bot.ask(ADMIN, "/labels")
    assert labels_in(answer)[0] == "shoes"
    assert all(t.startswith((f"Added to {lb}", f"That image is already in {lb}")) for t, (_, _, lb) in zip(texts, sent, strict=True))
    assert "hat — 40" in labels and "skirt — 40" in labels
    print(f"\nbot killed after {sum(acknowledged.values())} of {len(sent)} photos were acknowledged; all present after restart")


@pytest.mark.slow
async def test_power_cut_while_the_bot_writes_a_new_version(api: HardenedStandIn, store_copy: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(store_copy / "models")
    (old,) = [v.name for v in registry.versions()]
    ImageStore(store_copy).add(photos("hat")[0].read_bytes(), "hat", added_by=ADMIN)  # something new to train on
    config_path = _config_file(tmp_path / "config.toml", api, store_copy)
    proc = await _start_bot(api, config_path, tmp_path, tmp_path / "stderr.txt")
    leftovers: list[str] = []
    try:
        await api.wait_for(lambda c: c.method == "setMyCommands", timeout=90)
        api.push_update(api.make_text_update(ADMIN, ADMIN, "/retrain"))
        deadline = time.monotonic() + 180
        # the version folder appears as .tmp-<name> when the "saving" stage starts; cut the power then
        while not leftovers:
            assert time.monotonic() < deadline and proc.returncode is None, "the training never reached saving"
            leftovers = [p.name for p in registry.root.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
            await asyncio.sleep(0.01)
        trainers = psutil.Process(proc.pid).children(recursive=True)
        assert trainers, "the training runs in a child process"
    finally:
        _power_cut(proc.pid)
        await proc.wait()

    registry = ModelRegistry(store_copy / "models")
    assert json.loads(registry.pointer_path().read_text())["version"] == old
    assert registry.current() is not None and registry.current().name == old
    assert [v.name for v in registry.versions()] == [old], "the half-written version is not listed"
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".tmp-")] == leftovers

    async with serving_bot(api, bot_config(api, store_copy)) as bot:
        answer = await bot.reply_text(USER, bot.send_photo(USER, photos("pants")[TRAIN_PER_LABEL]))
        serving = bot.svc.classifier.version
        retrain_mid = bot.send_text(ADMIN, "/retrain")
        report = await api.wait_for(
            lambda c: c.method == "sendMessage" and c.reply_to == retrain_mid and str(c.params["text"]).startswith("Retraining done"),
            timeout=240,
        )
        after = bot.svc.classifier.version
    assert serving == old and labels_in(answer)[0] == "pants"
    assert "is now serving" in str(report.params["text"])
    registry = ModelRegistry(store_copy / "models")
    new = registry.current().name
    assert after == new != old
    assert [v.name for v in registry.versions()] == [old, new]
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".tmp-")] == [], "prune removed the leftover"


@pytest.mark.slow
def test_sigkill_during_promotion_always_leaves_a_complete_serving_version(store_copy: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(store_copy / "models")
    (first,) = registry.versions()
    names = [first.name]
    for suffix in ("aaaaaa", "bbbbbb"):
        name = f"29990101-000000-{suffix}"
        shutil.copytree(first.path, registry.root / name)
        names.append(name)
    script = tmp_path / "promote_loop.py"
    script.write_text(PROMOTE_LOOP)
    rng = random.Random(45)
    kills = promotions = 0
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, str(script), str(registry.root), *names], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
        assert proc.stdout is not None
        target = rng.randint(1, 60)
        acked: list[str] = []
        for line in proc.stdout:
            acked.append(line.strip())
            if len(acked) >= target:
                time.sleep(rng.uniform(0, 0.002))
                proc.send_signal(signal.SIGKILL)
                acked += [x for x in proc.stdout.read().split("\n") if x]
                break
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        promotions += len(acked)
        # the pointer names the last acknowledged version or the one being promoted when the power went
        last = acked[-1]
        in_flight = names[(names.index(last) + 1) % len(names)]
        pointer = json.loads(registry.pointer_path().read_text(encoding="utf-8"))
        current = ModelRegistry(registry.root).current()
        assert current is not None and current.name == pointer["version"] in (last, in_flight), (pointer, last)
        assert all(h in names for h in pointer["history"])
        assert [v.name for v in ModelRegistry(registry.root).versions()] == sorted(names)
    temp_files = [p for p in registry.root.iterdir() if p.name.startswith(".tmp-")]
    removed = ModelRegistry(registry.root).prune(keep=5)
    assert sorted(removed) == sorted(p.name for p in temp_files if p.is_dir())
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".tmp-")], "prune removed the temp pointers"
    classifier = Classifier(ModelRegistry(registry.root))
    top = classifier.classify([decode_image(photos("shoes")[TRAIN_PER_LABEL].read_bytes())], top_k=1)
    assert classifier.version == current.name and top[0][0][0] == "shoes"
    print(f"\npromotion loop: {kills} kills survived after {promotions} acknowledged promotions; "
          f"{len(temp_files)} temp pointer files left behind and pruned")
