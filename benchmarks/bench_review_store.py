"""What the review store costs per classified photo (issue 10), next to the raw backbone figure.

Usage::

    python benchmarks/bench_review_store.py [--dir DIR] [--answers 10000] [--calls 300]

Fills a fresh store (under ``--dir``, default a temp folder in the current directory, so on the
store's usual disk) with ``--answers`` answers (the default bound ``ReviewSettings.max_answers``),
then times ``--calls`` calls of each method the bot makes, two ways side by side in one run:

* ``shared``: the shipped :class:`model_store.review.ReviewStore` (one connection under a lock);
* ``per_call``: the same class opening and closing a connection for every call (the first
  implementation: closing the last connection to a WAL database checkpoints it and fsyncs).

and the catalog's size on disk when full, then the shipped backbone on a batch of 32 random images
(ms per image), the work each classified photo costs anyway. Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model_store.dataset import ImageStore
from model_store.review import ReviewSettings, ReviewStore


class PerCallStore(ReviewStore):
    """The review store with a connection opened and closed per call (for comparison only)."""

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            try:
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()


def _record(review: ReviewStore, i: int) -> int:
    p1 = 0.4 + (i % 60) / 100
    return review.record_answer(
        chat_id=-(i % 7) - 1,
        chat_type="group",
        reply_message_id=i,
        sender_id=i % 500,
        file_id=f"AgACAgIAAxkBAAI{i:012d}" * 3,
        file_unique_id=f"AQAD{i:012d}",
        predictions=[("t-shirt", p1), ("shirt", (1 - p1) * 0.7), ("dress", (1 - p1) * 0.3)],
        unknown=i % 50 == 0,
        model_version="20261203-120000",
        auto_queue=True,
    )


def _time_calls(review: ReviewStore, start: int, calls: int) -> dict[str, float]:
    t = time.perf_counter()
    ids = [_record(review, start + k) for k in range(calls)]
    record = (time.perf_counter() - t) / calls * 1000
    t = time.perf_counter()
    for k, aid in enumerate(ids):
        review.set_feedback(answer_id=aid, user_id=(start + k) % 500, verdict="wrong", label="dress")
    feedback = (time.perf_counter() - t) / calls * 1000
    t = time.perf_counter()
    for _ in range(calls):
        review.next_item()
    next_item = (time.perf_counter() - t) / calls * 1000
    return {"record_answer": record, "set_feedback": feedback, "next_item": next_item}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="where to put the store (default: a temp folder in the cwd)")
    ap.add_argument("--answers", type=int, default=ReviewSettings().max_answers)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-review-", dir=args.dir or "."))
    try:
        settings = ReviewSettings(max_answers=args.answers)
        shared = ReviewStore(ImageStore(root), settings)
        for i in range(args.answers):
            _record(shared, i)
        size = sum(p.stat().st_size for p in root.glob("catalog.sqlite*"))
        figures = {"shared": _time_calls(shared, args.answers, args.calls)}
        shared.close()
        per_call = PerCallStore(ImageStore(root), settings)
        figures["per_call"] = _time_calls(per_call, args.answers + args.calls, args.calls)
        t = time.perf_counter()
        withdrawn = per_call.withdraw(1)
        withdraw_ms = (time.perf_counter() - t) * 1000
        per_call.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for method in ("record_answer", "set_feedback", "next_item"):
        for way in ("shared", "per_call"):
            print(json.dumps({"metric": f"review_{method}_ms_{way}", "value": round(figures[way][method], 3),
                              "answers_kept": args.answers, "calls": args.calls}))
        ratio = figures["per_call"][method] / figures["shared"][method]
        print(json.dumps({"metric": f"review_{method}_per_call_over_shared", "value": round(ratio, 1)}))
    print(json.dumps({"metric": "review_withdraw_ms", "value": round(withdraw_ms, 2), "answers_deleted": withdrawn}))
    print(json.dumps({"metric": "review_catalog_bytes_full", "value": size, "answers_kept": args.answers}))

    from model_store.backbones import load_backbone

    backbone = load_backbone()
    h, w = backbone.input_size
    x = np.random.default_rng(1).random((32, h, w, 3), dtype=np.float32) * 255
    backbone.model(x, training=False)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        backbone.model(x, training=False)
        runs.append((time.perf_counter() - t) / 32 * 1000)
    print(json.dumps({"metric": "backbone_ms_per_image_batch32", "value": round(sorted(runs)[1], 2)}))


if __name__ == "__main__":
    main()
