"""Flood-control benchmark (issue 12): teaching and a busy group against Telegram-like per-chat limits.

Usage::

    python benchmarks/bench_flood.py                       # this checkout's bot, both scenarios
    python benchmarks/bench_flood.py --bot_root /tmp/old --code before   # another version of the bot

The Bot API stand-in (``tests/botapi_standin.py``, from THIS checkout) serves on 127.0.0.1 from a
thread and enforces ``FloodLimits``: 1 message/s per private chat after a burst of 20, 20 messages
per minute per group (burst 20), 30/s overall (429 ``retry_after`` beyond them, as Telegram). The
bot runs as a subprocess ``python -m bot run`` with ``PYTHONPATH=--bot_root``, so the same run
measures an older version of the bot (e.g. ``git archive 5f0ad23 | tar -x -C /tmp/old``) on the
same machine, stand-in and inputs. Scenarios (``--scenario``):

* ``teach``: an admin teaches ``--photos`` (400) distinct photos of ../shared/data/clothing-small/dev
  (or generated ones if it is missing), each captioned ``/add hat``, in bursts of 4, with at most
  4 not yet stored (the store's files are counted). Waits until all are stored and the admin's
  chat has been quiet for ``--quiet`` seconds.
* ``group``: 20 users send 5 photos each (tests/data/clothing, not used for training) in one
  group, as fast as they can; the bot serves a model trained once on tests/data/clothing
  (EfficientNet-Lite0, cached in ``--work_dir``). Waits until every photo is answered, or the
  group has been quiet for ``--quiet`` seconds.

Prints one JSON object per scenario: ``http_429`` (answers of 429 in that chat), ``messages_sent``
(successful sendMessage to it), ``edits``, ``t_last_ack_s`` (first photo sent -> last message or
edit to that chat), ``tracebacks`` (in the bot's log), ``apologies`` ("Sorry, something went
wrong"), ``unanswered`` (photos the chat was never told about), ``answered_twice`` (group),
``stored`` (teach), ``wall_s``. ``--scale 10`` makes every window ten times shorter (the bot's
``[limits]`` keys are set to match, so only for versions that have them). Figures:
docs/flood_control.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.botapi_standin import BotApiStandIn, FloodLimits  # noqa: E402

TOKEN = "7000000002:AAbenchmarkFLOOD-not-a-real-one_xx"
ADMIN = 900001
GROUP = -100777
USERS = range(3000, 3020)
APOLOGY = "Sorry, something went wrong"
SHARED_DEV = ROOT.parent / "shared" / "data" / "clothing-small" / "dev"
CLOTHING = ROOT / "tests" / "data" / "clothing"
TRAINED = ("shoes", "pants", "t-shirt")
TRAIN_PER_LABEL = 6
_TEACHING = re.compile(r"^Teaching: (\d+) photos")
_ADDED_N = re.compile(r"^Added (\d+) images? to ")


def log(msg: str) -> None:
    print(f"[bench_flood] {msg}", file=sys.stderr, flush=True)


def photos_told(text: str) -> int:
    """Photos one (final) teaching acknowledgement accounts for: 1 for "Added to ..." (one reply per
    photo, both versions), the header's count for a coalesced one (bot/acks.py), else 0."""
    if (m := _TEACHING.match(text)) is not None:
        return int(m.group(1))
    if (m := _ADDED_N.match(text)) is not None:
        lines = text.split("\n")[1:]
        extra = sum(int(x.split()[0]) for x in lines if "already there" in x or "could not be added" in x)
        return int(m.group(1)) + extra
    return 1 if text.startswith(("Added to ", "That image is already in ")) else 0


def teach_images(n: int) -> list[bytes]:
    """``n`` distinct photos: the dev set's (sorted, first n) or, without ../shared, generated ones."""
    files = sorted(p for p in SHARED_DEV.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(files) >= n:
        return [p.read_bytes() for p in files[:n]]
    import numpy as np
    from PIL import Image

    log(f"{SHARED_DEV} not found: generated images")
    rng = np.random.default_rng(12)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def trained_store(cache: Path) -> Path:
    """A store with a model trained on tests/data/clothing (6 photos of 3 labels), made once."""
    store = cache / "trained-store"
    if (store / "models" / "CURRENT").exists():
        return store
    from model_store.backbones import load_backbone
    from model_store.pipeline import retrain
    from model_store.training import TrainConfig
    from model_store.workspace import Workspace

    tmp = cache / "trained-store.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ws = Workspace(tmp)
    for label in TRAINED:
        for path in sorted((CLOTHING / label).glob("*.jpg"))[:TRAIN_PER_LABEL]:
            ws.store.add(path.read_bytes(), label, added_by=ADMIN, chat_id=ADMIN)
    report = retrain(ws, TrainConfig(epochs=20, accuracy_floor=0.0, max_accuracy_drop=1.0),
                     backbone=load_backbone("efficientnet_lite0"))
    if report.status != "promoted":
        raise SystemExit(f"training the benchmark's store failed: {report.message}")
    tmp.rename(store)
    return store


def write_config(path: Path, api: BotApiStandIn, store: Path, scale: float) -> None:
    lines = [
        f"admins = [{ADMIN}]", f"store_dir = {json.dumps(str(store))}", "",
        "[telegram]", f"base_url = {json.dumps(api.base_url)}", f"base_file_url = {json.dumps(api.base_file_url)}", "",
        "[limits]", "min_free_disk_mb = 0",
    ]
    if scale != 1:  # keys of the new version only (older ones refuse unknown keys)
        lines += [f"chat_messages_per_second = {1.0 * scale}", f"group_messages_per_minute = {20.0 * scale}"]
    lines += ["", "[logging]", 'level = "INFO"', ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def start_bot(bot_root: Path, config: Path, work: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("LABELGRAM_", "TELEGRAM_"))}
    env.update(TELEGRAM_BOT_TOKEN=TOKEN, PYTHONPATH=str(bot_root), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    log_path = work / "bot.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bot", "run", "--config", str(config)], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
    return proc, log_path


def stop_bot(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def quiet_for(api: BotApiStandIn, chat: int, seconds: float) -> bool:
    """No request to ``chat`` (failed ones included) for ``seconds``."""
    last = max((c.timestamp for c in api.calls if c.chat_id == chat), default=0.0)
    return time.monotonic() - last >= seconds


def chat_figures(api: BotApiStandIn, chat: int, start: float) -> dict[str, Any]:
    sent = api.sent_calls("sendMessage", chat_id=chat)
    edits = api.sent_calls("editMessageText", chat_id=chat)
    last = max((c.timestamp for c in [*sent, *edits]), default=start)
    return {
        "http_429": api.refusals(chat),
        "messages_sent": len(sent),
        "edits": len(edits),
        "t_last_ack_s": round(last - start, 1),
        "apologies": sum(1 for c in sent if APOLOGY in str(c.params.get("text", ""))),
    }


def run_teach(api: BotApiStandIn, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    images = teach_images(args.photos)
    store = work / "teach-store"
    config = work / "teach.toml"
    write_config(config, api, store, args.scale)
    proc, log_path = start_bot(args.bot_root, config, work)
    try:
        api.wait_for_sync(lambda c: c.method == "deleteWebhook", timeout=120)  # polling starts next
        folder = store / "images" / "hat"

        def stored() -> int:
            return sum(1 for p in folder.glob("*") if not p.name.startswith(".")) if folder.is_dir() else 0

        start = time.monotonic()
        for i in range(0, len(images), 4):
            for data in images[i:i + 4]:
                api.push_update(api.make_photo_update(ADMIN, ADMIN, data, caption="/add hat"))
            while stored() < i and time.monotonic() - start < args.timeout:  # at most 4 in flight
                time.sleep(0.01)
        while (stored() < len(images) or not quiet_for(api, ADMIN, args.quiet)) and time.monotonic() - start < args.timeout:
            time.sleep(0.2)
        wall = time.monotonic() - start
    finally:
        stop_bot(proc)
    sent = api.sent_calls("sendMessage", chat_id=ADMIN)
    told = sum(photos_told(str(api.message(ADMIN, c.result["message_id"])["text"])) for c in sent)
    return {
        "scenario": "teach", "photos": len(images), **chat_figures(api, ADMIN, start),
        "tracebacks": log_path.read_text(errors="replace").count("Traceback"),
        "unanswered": len(images) - told, "stored": stored(), "wall_s": round(wall, 1),
    }


def run_group(api: BotApiStandIn, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    source = trained_store(args.work_dir)
    store = work / "group-store"
    shutil.copytree(source, store, symlinks=True)
    pool = [p.read_bytes() for label in TRAINED for p in sorted((CLOTHING / label).glob("*.jpg"))[TRAIN_PER_LABEL:]]
    config = work / "group.toml"
    write_config(config, api, store, args.scale)
    proc, log_path = start_bot(args.bot_root, config, work)
    try:
        api.wait_for_sync(lambda c: c.method == "deleteWebhook", timeout=120)  # polling starts next
        warm = api.make_photo_update(ADMIN, ADMIN, pool[0])
        api.push_update(warm)
        api.wait_for_sync(lambda c: c.method == "sendMessage" and c.reply_to == warm["message"]["message_id"], timeout=300)
        start = time.monotonic()
        mids = []
        for round_ in range(5):
            for user in USERS:
                update = api.make_photo_update(GROUP, user, pool[(user + round_) % len(pool)], chat_type="supergroup")
                api.push_update(update)
                mids.append(update["message"]["message_id"])
        while time.monotonic() - start < args.timeout:
            if all(api.replies_to(GROUP, m) for m in mids) or (time.monotonic() - start > 30 and quiet_for(api, GROUP, args.quiet)):
                break
            time.sleep(0.2)
        time.sleep(1)
        wall = time.monotonic() - start
    finally:
        stop_bot(proc)
    replies = [api.replies_to(GROUP, m) for m in mids]
    return {
        "scenario": "group", "photos": len(mids), **chat_figures(api, GROUP, start),
        "tracebacks": log_path.read_text(errors="replace").count("Traceback"),
        "unanswered": sum(1 for r in replies if not r), "answered_twice": sum(1 for r in replies if len(r) > 1),
        "wall_s": round(wall, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bot_root", type=Path, default=ROOT, help="folder holding the bot and model_store packages to run")
    ap.add_argument("--code", default="this checkout", help="name of that version in the output")
    ap.add_argument("--scenario", choices=("teach", "group", "both"), default="both")
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--scale", type=float, default=1.0, help="limits' windows this many times shorter")
    ap.add_argument("--quiet", type=float, default=20.0, help="seconds without a request to the chat that end a scenario")
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "labelgram-bench-flood")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    limits = FloodLimits().scaled(args.scale)
    for scenario in ("teach", "group") if args.scenario == "both" else (args.scenario,):
        work = Path(tempfile.mkdtemp(prefix=f"{scenario}-", dir=args.work_dir))
        api = BotApiStandIn(token=TOKEN, flood_limits=limits).start_in_thread()
        try:
            figures = run_teach(api, args, work) if scenario == "teach" else run_group(api, args, work)
        finally:
            api.stop()
        print(json.dumps({"code": args.code, "scale": args.scale, "limits": {
            "private": f"{limits.private_burst} then {limits.private_per_second:g}/s",
            "group": f"{limits.group_burst} then {limits.group_per_minute:g}/min"}, **figures}), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
