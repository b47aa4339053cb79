"""Issue 4.5: load, flooding users and Telegram's 429 flood control, against the local stand-in.

* ``test_fifty_chats_...`` (with the stand-in's Telegram-like flood limits on): the bot runs as its own process (``python -m bot run``) so its memory
  is its own; 50 chats send photos as fast as the bot answers them for :data:`LOAD_SECONDS` while
  an admin teaches new images and a retraining runs, and one user floods. Every update is answered
  exactly once (the flooder's over-limit photos: one polite warning, the rest dropped without being
  downloaded), the bot's RSS stays under :data:`RSS_LIMIT_MB`, and peak RSS and latency
  percentiles are printed (run with ``-s`` to see them).
* ``test_a_429_in_one_chat_...``: ``sendMessage`` to one chat answers 429 ``retry_after=2``; that
  chat's reply is retried after the pause, and other chats are answered during it (PTB's
  ``AIORateLimiter`` paused every chat for 2.1 s; ``bot/ratelimit.py`` pauses only that one).
* The limiter alone, and teaching and groups under Telegram-like per-chat limits enforced by the
  stand-in: tests/test_flood_pacing.py (issue 12).
* ``test_a_user_flooding_commands_...``: ``limits.messages_per_minute`` cuts off a non-admin who
  floods commands, ``/add`` captions and button presses (one polite sentence, the rest dropped),
  while admins and other users are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from model_store.dataset import ImageStore
from tests.auxil.bot_harness import (
    ADMIN,
    ROOT,
    TRAIN_PER_LABEL,
    USER,
    bot_config,
    labels_in,
    photos,
    running_bot,
)
from tests.auxil.standin_extras import HardenedStandIn
from tests.botapi_standin import Call, FloodLimits

#: how long the 50 chats keep sending (the issue's 60 s)
LOAD_SECONDS = 60.0
CHATS = 50
#: the flooder sends this many photos per second, without waiting for answers
FLOOD_RATE = 10.0
PHOTOS_PER_MINUTE = 60
#: the bot process (TensorFlow + the model + 50 chats in flight) must stay below this; measured
#: on 2 cores: about 0.75 GB with the model loaded, 1.3-1.6 GB peak (batches of 32 photos, and the
#: new version loaded after the promotion; reloading versions does not grow it further)
RSS_LIMIT_MB = 2500


def _is_reply(call: Call, chat: int, mid: int) -> bool:
    return call.method == "sendMessage" and call.chat_id == chat and call.reply_to == mid


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _write_config(path: Path, api: HardenedStandIn, store: Path) -> None:
    path.write_text(
        f"""admins = [{ADMIN}]
store_dir = "{store}"

[telegram]
token = "{api.token}"
base_url = "{api.base_url}"
base_file_url = "{api.base_file_url}"

[classify]
album_wait_ms = 300

[training]
epochs = 20
accuracy_floor = 0.0
max_accuracy_drop = 1.0
max_minutes = 5

[limits]
photos_per_minute = {PHOTOS_PER_MINUTE}
messages_per_minute = 600
min_free_disk_mb = 0

[logging]
level = "WARNING"
""",
        encoding="utf-8",
    )


@pytest.mark.slow
async def test_fifty_chats_an_admin_and_a_training_under_load(api: HardenedStandIn, store_copy: Path, tmp_path: Path) -> None:
    # Telegram-like flood limits on (issue 12): 1 message/s per chat after a burst of 20, 30/s in all
    api.set_flood_limits(FloodLimits())
    config_path = tmp_path / "config.toml"
    _write_config(config_path, api, store_copy)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("LABELGRAM_", "TELEGRAM_"))}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    stderr_path = tmp_path / "bot-stderr.txt"
    with open(stderr_path, "wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", "--config", str(config_path), cwd=tmp_path, env=env, stderr=stderr
        )
    bot = psutil.Process(proc.pid)
    rss: list[float] = []
    trainer_rss: list[float] = [0.0]
    stop_sampling = asyncio.Event()

    async def sample() -> None:
        while not stop_sampling.is_set():
            with contextlib.suppress(psutil.Error):
                rss.append(bot.memory_info().rss / 2**20)
                trainer_rss.append(sum(c.memory_info().rss for c in bot.children(recursive=True)) / 2**20)
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    try:
        await api.wait_for(lambda c: c.method == "setMyCommands", timeout=90)
        templates = [api.make_photo_update(1, 1, p.read_bytes()) for label in ("shoes", "pants", "t-shirt")
                     for p in photos(label)[TRAIN_PER_LABEL:]]
        flood_template = api.make_photo_update(1, 1, photos("shoes")[TRAIN_PER_LABEL + 1].read_bytes())
        warm = api.photo_like(templates[0], 4999, 4999)
        api.push_update(warm)
        await api.wait_for(lambda c: _is_reply(c, 4999, warm["message"]["message_id"]), timeout=90)

        start = time.monotonic()
        warm_rss = rss[-1] if rss else 0.0
        load_end = start + LOAD_SECONDS
        sent: list[tuple[int, int, int]] = []  # (chat, message id, update id)
        latencies: list[float] = []
        training: dict[str, float] = {}

        async def chat_user(chat: int) -> None:
            n = chat
            while time.monotonic() < load_end:
                began = time.monotonic()
                update = api.photo_like(templates[n % len(templates)], chat, chat)
                n += 1
                mid = update["message"]["message_id"]
                update_id = api.push_update(update)
                sent.append((chat, mid, update_id))
                reply = await api.wait_for(lambda c, m=mid: _is_reply(c, chat, m), timeout=120)
                latencies.append(reply.timestamp - api.pushed_at[update_id])
                # as fast as the bot answers, but within the per-user limit (60 a minute)
                await asyncio.sleep(max(0.0, began + 1.2 - time.monotonic()))

        flood_sent: list[int] = []

        async def flooder() -> None:
            await asyncio.sleep(2)
            flood_end = start + LOAD_SECONDS - 10
            while time.monotonic() < flood_end:
                update = api.photo_like(flood_template, 6000, 6000)
                api.push_update(update)
                flood_sent.append(update["message"]["message_id"])
                await asyncio.sleep(1 / FLOOD_RATE)

        admin_replies: list[str] = []

        async def admin() -> None:
            teach = [(p, "hat") for p in photos("hat")] + [(p, "skirt") for p in photos("skirt")]
            for i, (path, label) in enumerate(teach):
                update = api.make_photo_update(ADMIN, ADMIN, path.read_bytes(), caption=f"/add {label}")
                api.push_update(update)
                admin_replies.append(str((await api.wait_for_reply(ADMIN, update["message"]["message_id"], 120)).params["text"]))
                if i == 5:
                    retrain = api.make_text_update(ADMIN, ADMIN, "/retrain")
                    api.push_update(retrain)
                    training["started"] = time.monotonic()
                await asyncio.sleep(1.0)
            report = await api.wait_for(
                lambda c: c.method == "sendMessage" and c.chat_id == ADMIN and str(c.params["text"]).startswith("Retraining done"),
                timeout=240,
            )
            training["finished"] = report.timestamp
            training["report"] = report.params["text"]  # type: ignore[assignment]

        await asyncio.gather(*(chat_user(5000 + i) for i in range(CHATS)), flooder(), admin())
        # the flooder's last photos are answered (or dropped) within a moment
        await asyncio.sleep(3)
        stop_sampling.set()
        await sampler
        pending = api.pending_update_count
    finally:
        stop_sampling.set()
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 60)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    elapsed = time.monotonic() - start
    log_text = stderr_path.read_text(errors="replace")

    # every update answered exactly once, with labels
    answered = 0
    for chat, mid, _ in sent:
        replies = api.replies_to(chat, mid)
        assert len(replies) == 1, (chat, mid, [c.params["text"] for c in replies])
        assert labels_in(str(replies[0].params["text"])), replies[0].params["text"]
        answered += 1
    assert pending == 0, "every update was fetched by the bot"
    # the flooder: the first PHOTOS_PER_MINUTE answered, one polite warning, the rest dropped undownloaded
    flood_replies = [api.replies_to(6000, mid) for mid in flood_sent]
    assert all(len(r) <= 1 for r in flood_replies)
    flood_texts = [str(r[0].params["text"]) for r in flood_replies if r]
    flood_labels = sum(1 for t in flood_texts if labels_in(t))
    warnings = [t for t in flood_texts if "faster than I can look at them" in t]
    assert flood_labels == PHOTOS_PER_MINUTE, (flood_labels, len(flood_sent))
    assert len(warnings) == 1 and len(flood_texts) == PHOTOS_PER_MINUTE + 1
    big = max(flood_template["message"]["photo"], key=lambda s: s["width"] * s["height"])
    assert api.downloaded(big["file_id"]) == PHOTOS_PER_MINUTE, "dropped photos are not downloaded"
    # the admin taught 16 images and a training ran and was promoted, while photos kept being answered
    assert all(t.startswith("Added to") for t in admin_replies) and len(admin_replies) == 16, admin_replies
    assert "is now serving" in str(training["report"])
    answered_during_training = [
        c for c in api.sent_calls("sendMessage") if training["started"] < c.timestamp < training["finished"]
        and c.chat_id is not None and isinstance(c.chat_id, int) and 5000 <= c.chat_id < 5000 + CHATS
    ]
    assert len(answered_during_training) >= CHATS, "photos were answered while the training ran"
    problems = [line for line in log_text.splitlines() if "Traceback" in line or re.search(r" (ERROR|CRITICAL) [\w.]+: ", line)]
    assert problems == [], "\n".join(problems[:20])
    assert proc.returncode == 0, log_text[-3000:]
    peak = max(rss)
    p50, p95 = _percentile(latencies, 0.5), _percentile(latencies, 0.95)
    print(
        f"\nload: {CHATS} chats for {LOAD_SECONDS:.0f} s (+ drain, {elapsed:.0f} s in all): {len(sent)} photos sent, "
        f"{answered} answered exactly once ({answered / LOAD_SECONDS:.1f}/s); latency p50 {p50:.2f} s, p95 {p95:.2f} s, "
        f"max {max(latencies):.2f} s\n"
        f"flooder: {len(flood_sent)} photos at {FLOOD_RATE:g}/s -> {flood_labels} answered, {len(warnings)} warning, "
        f"{len(flood_sent) - len(flood_texts)} dropped undownloaded\n"
        f"admin: {len(admin_replies)} images added; training {training['finished'] - training['started']:.0f} s "
        f"({len(answered_during_training)} photos answered meanwhile)\n"
        f"bot RSS: {warm_rss:.0f} MB with the model loaded, peak {peak:.0f} MB, end {rss[-1]:.0f} MB; training process peak "
        f"{max(trainer_rss):.0f} MB"
    )
    assert peak < RSS_LIMIT_MB, f"bot RSS peaked at {peak:.0f} MB"


@pytest.mark.slow
async def test_a_429_in_one_chat_pauses_that_chat_only(api: HardenedStandIn, store_copy: Path) -> None:
    victim, others = USER, [3101, 3102, 3103, 3104, 3105]
    async with running_bot(api, bot_config(api, store_copy)) as bot:
        # warm up: the model is loaded and every chat has had its "typing…" action
        for chat in [victim, *others]:
            await bot.reply_text(chat, bot.send_photo(chat, photos("shoes")[TRAIN_PER_LABEL]))
        api.fail_next_in_chat("sendMessage", victim, retry_after=2)
        victim_mid = bot.send_photo(victim, photos("pants")[TRAIN_PER_LABEL])
        deadline = time.monotonic() + 30
        while not api.failed_calls("sendMessage", chat_id=victim):
            assert time.monotonic() < deadline, "the injected 429 was never hit"
            await asyncio.sleep(0.005)
        hit = api.failed_calls("sendMessage", chat_id=victim)[0]
        # while the victim's chat is paused, the others send photos and expect answers
        mids = {chat: bot.send_photo(chat, photos("t-shirt")[TRAIN_PER_LABEL]) for chat in others}
        other_replies = {chat: await bot.reply(chat, mid, timeout=30) for chat, mid in mids.items()}
        victim_reply = await bot.reply(victim, victim_mid, timeout=30)
        await asyncio.sleep(0.3)
        victim_calls = [c for c in api.calls if c.chat_id == victim and c.timestamp > hit.timestamp]

    assert hit.error_code == 429
    window_end = hit.timestamp + 2.0
    late = {chat: round(r.timestamp - hit.timestamp, 2) for chat, r in other_replies.items() if r.timestamp >= window_end}
    assert not late, f"other chats waited for the pause of chat {victim}: seconds after the 429: {late}"
    assert all(labels_in(str(r.params["text"]))[0] == "t-shirt" for r in other_replies.values())
    # the victim's chat is left alone for retry_after seconds, then answered exactly once
    assert victim_calls and victim_calls[0].timestamp >= window_end, [(c.method, c.timestamp - hit.timestamp) for c in victim_calls]
    assert victim_reply.timestamp >= window_end
    assert len(api.replies_to(victim, victim_mid)) == 1
    assert labels_in(str(victim_reply.params["text"]))[0] == "pants"


async def test_a_user_flooding_commands_buttons_and_captions_is_cut_off_politely(
    api: HardenedStandIn, store_copy: Path
) -> None:
    limit = 10
    config = bot_config(api, store_copy, limits={"messages_per_minute": limit, "photos_per_minute": 100})
    async with running_bot(api, config) as bot:
        ask = await bot.reply(ADMIN, bot.send_text(ADMIN, "/delete shoes"))
        button = ask.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
        flood = [bot.send_text(USER, "/help") for _ in range(3 * limit)]
        flood += [bot.send_photo(USER, photos("hat")[0], caption="/add hat") for _ in range(5)]
        presses = []
        for _ in range(5):
            update = api.make_callback_update(ADMIN, USER, button, ask.result)
            api.push_update(update)
            presses.append(update["callback_query"]["id"])
        # an admin is never limited, and another user is answered meanwhile
        admin_texts = [await bot.ask(ADMIN, "/labels") for _ in range(2 * limit)]
        other = await bot.ask(3100, "/help")
        await asyncio.sleep(0.5)
        answers = [api.replies_to(USER, mid) for mid in flood]
        button_answers = [api.callback_answer(q) for q in presses]

    texts = [str(a[0].params["text"]) for a in answers if a]
    assert all(len(a) <= 1 for a in answers)
    assert sum(1 for t in texts if t.startswith("Send me a photo")) == limit, texts
    assert sum(1 for t in texts if t.startswith("You're sending messages faster")) == 1
    assert len(texts) == limit + 1, "the rest is dropped without an answer"
    assert button_answers == [None] * 5, "over the limit, button presses are not even refused"
    assert all(t.startswith("3 labels") for t in admin_texts)
    assert other.startswith("Send me a photo")
    assert {i.name: i.count for i in ImageStore(store_copy).labels()} == {"pants": 6, "shoes": 6, "t-shirt": 6}
