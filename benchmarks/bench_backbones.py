"""Backbone latency side by side: ms/image of each backbone's forward pass, in one run.

Usage::

    python benchmarks/bench_backbones.py --backbones efficientnet_lite0,efficientnet_lite2 \\
        --image_dir ../shared/data/clothing-small/dev

Each backbone runs through ``Backbone.features`` (the path bottleneck computation uses) on real
photos made into model inputs at that backbone's own input size. Rounds alternate between the
backbones so that load from other processes hits them alike. Prints one JSON line per backbone
and batch size: median and p95 ms/image over the rounds, and the ratio to the first backbone
(machines differ up to 3.5x: compare ratios, not absolute figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from model_store.backbones import load_backbone  # noqa: E402
from model_store.images import decode_image, to_model_input  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """CLI; prints JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite2")
    ap.add_argument("--image_dir", type=Path, required=True)
    ap.add_argument("--batch_sizes", default="1,32")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args(argv)

    photos = sorted(args.image_dir.glob("*/*.jpg"))[:32]
    rgbs = [decode_image(p.read_bytes()) for p in photos]
    specs = args.backbones.split(",")
    backbones = [load_backbone(s) for s in specs]
    inputs = {
        b.name: np.stack([to_model_input(r, b.input_size, mode="center_crop", crop_fraction=0.875) for r in rgbs])
        for b in backbones
    }
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        times: dict[str, list[float]] = {b.name: [] for b in backbones}
        for b in backbones:  # warm-up (tracing, first allocation)
            b.features(inputs[b.name][:bs], batch_size=bs)
            b.features(inputs[b.name][:bs], batch_size=bs)
        for r in range(args.rounds):
            for b in backbones:
                x = inputs[b.name][(r * bs) % len(rgbs) :][:bs] if bs < len(rgbs) else inputs[b.name][:bs]
                t = time.perf_counter()
                b.features(x, batch_size=bs)
                times[b.name].append((time.perf_counter() - t) * 1000 / len(x))
        base = statistics.median(times[backbones[0].name])
        for b in backbones:
            med = statistics.median(times[b.name])
            p95 = float(np.percentile(times[b.name], 95))
            print(
                json.dumps(
                    {
                        "figure": "backbone_ms_per_image",
                        "backbone": b.name,
                        "input_size": list(b.input_size),
                        "batch": bs,
                        "p50_ms": round(med, 2),
                        "p95_ms": round(p95, 2),
                        f"ratio_to_{backbones[0].name}": round(med / base, 2),
                        "engine": "tf.function over the Keras model",
                        "rounds": args.rounds,
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
