"""What durable bottleneck-cache writes cost (issue 8, point 8), next to the raw backbone figure.

Usage::

    python benchmarks/bench_durable_writes.py [--dir DIR] [--entries 1000]

Writes ``--entries`` float32 (1280,) cache entries under ``--dir`` (default: a temp folder inside
the current directory, so on the store's usual disk) four ways, side by side in one run:

* ``plain``: temp file + ``os.replace``, no fsync (the cache before issue 8);
* ``durable_serial``: ``fs.write_atomic`` one entry after the other (fsync file, rename,
  fsync folder);
* ``durable_concurrent``: ``BottleneckCache._store_many`` (the same writes, several at once, as
  ``BottleneckCache.get`` does for each computed batch);

and then times the shipped backbone on a batch of 32 random images (ms per image), the work each
entry's computation costs. Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from model_store.bottlenecks import BottleneckCache
from model_store.fs import write_atomic


def _paths(root: Path, tag: str, n: int) -> list[tuple[str, Path]]:
    out = []
    for i in range(n):
        sha = f"{i:064x}"[::-1]
        p = root / tag / sha[:2] / f"{sha}.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        out.append((sha, p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder in the cwd)")
    ap.add_argument("--entries", type=int, default=1000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-durable-", dir=args.dir or "."))
    vec = np.random.default_rng(0).random(1280, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, vec, allow_pickle=False)
    data = buf.getvalue()
    n = args.entries
    try:
        t = time.perf_counter()
        for _, p in _paths(root, "plain", n):
            tmp = p.with_name(".tmp-" + p.name)
            tmp.write_bytes(data)
            os.replace(tmp, p)
        plain = (time.perf_counter() - t) / n * 1000

        t = time.perf_counter()
        for _, p in _paths(root, "serial", n):
            write_atomic(p, data)
        serial = (time.perf_counter() - t) / n * 1000

        cache = BottleneckCache(root / "concurrent", SimpleNamespace(id="bench", feature_dim=1280))
        entries = [(f"{i:064x}"[::-1], "crop875", vec) for i in range(n)]
        t = time.perf_counter()
        for k in range(0, n, 64):  # one computed batch at a time, as BottleneckCache.get writes them
            cache._store_many(entries[k : k + 64])
        concurrent = (time.perf_counter() - t) / n * 1000
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, value in (("plain", plain), ("durable_serial", serial), ("durable_concurrent", concurrent)):
        print(json.dumps({"metric": f"cache_write_ms_per_entry_{name}", "value": round(value, 3), "entries": n}))

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
