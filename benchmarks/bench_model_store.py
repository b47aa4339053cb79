"""Model-store benchmark: retrain times, bottleneck throughput, classify latency, peak RSS, accuracy.

Usage::

    python benchmarks/bench_model_store.py --image_dir ../shared/data/clothing-small/dev

Prints one JSON object per line (figure name, value, unit, and the target where one exists).
The 50 images held back for the incremental run are the 50 with the highest content hash, so they
are spread over all labels and the same on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def emit(name: str, value, unit: str = "", target: str | None = None, **extra) -> None:
    rec = {"figure": name, "value": value, "unit": unit}
    if target:
        rec["target"] = target
    rec.update(extra)
    print(json.dumps(rec), flush=True)


def classify_rss(store_dir: Path, image: Path, n: int) -> None:
    """Child process: load the classifier, classify ``image`` n times, print the peak RSS in MiB."""
    from model_store.classifier import Classifier
    from model_store.images import decode_image
    from model_store.registry import ModelRegistry

    clf = Classifier(ModelRegistry(store_dir / "models"))
    data = image.read_bytes()
    for _ in range(n):
        clf.classify([decode_image(data)], top_k=3)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image_dir", required=True, help="labelled folders, e.g. ../shared/data/clothing-small/dev")
    ap.add_argument("--work_dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--latency_runs", type=int, default=200)
    ap.add_argument("--_rss_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._rss_child:
        classify_rss(Path(args._rss_child[0]), Path(args._rss_child[1]), 50)
        return 0

    from model_store.backbones import load_backbone
    from model_store.classifier import Classifier
    from model_store.images import IMAGE_EXTENSIONS, decode_image
    from model_store.pipeline import retrain
    from model_store.training import TrainConfig
    from model_store.workspace import Workspace

    src = Path(args.image_dir)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="labelgram-bench-"))
    files = sorted(p for p in src.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    held = set(sorted(files, key=lambda p: digests[p])[-50:])

    ws = Workspace(work / "store")
    t = time.perf_counter()
    for p in files:
        if p not in held:
            ws.store.add(p.read_bytes(), p.parent.name)
    emit("import_images", round(time.perf_counter() - t, 2), "s", images=len(files) - len(held))

    config = TrainConfig()
    t = time.perf_counter()
    cold = retrain(ws, config)
    cold_s = time.perf_counter() - t
    m = cold.metrics
    emit("cold_retrain", round(cold_s, 2), "s", target="<= 60", status=cold.status, timings=m.get("timings"))
    n_views = len(config.train_views())
    bn_s = m["timings"]["bottlenecks_s"]
    n_imgs = m["bottleneck_cache"]["computed"]
    emit("bottleneck_throughput", round(n_imgs / bn_s, 1), "images/s", views_per_image=n_views,
         forward_passes_per_s=round(n_imgs * n_views / bn_s, 1))
    emit("test_accuracy_cold", round(m["accuracy"], 4), "", target=">= 0.90", test_images=m["test_images"])

    backbone = load_backbone()
    t = time.perf_counter()
    warm = retrain(ws, config, backbone=backbone)
    emit("warm_retrain", round(time.perf_counter() - t, 2), "s", target="<= 10", status=warm.status,
         cached=warm.metrics["bottleneck_cache"]["cached"], timings=warm.metrics["timings"])

    for p in held:
        ws.store.add(p.read_bytes(), p.parent.name)
    t = time.perf_counter()
    inc = retrain(ws, config, backbone=backbone)
    mi = inc.metrics
    emit("incremental_retrain_50", round(time.perf_counter() - t, 2), "s", target="<= 15", status=inc.status,
         computed=mi["bottleneck_cache"]["computed"], timings=mi["timings"])
    emit("test_accuracy", round(mi["accuracy"], 4), "", target=">= 0.90", test_images=mi["test_images"],
         per_label={k: round(v["recall"], 3) for k, v in mi["per_label"].items()})

    # classify latency: one JPEG, warm, in-process, decode + preprocess + forward pass + top-k
    clf = Classifier(ws.registry)
    sample = sorted(held)[0]
    data = sample.read_bytes()
    for _ in range(10):
        clf.classify([decode_image(data)], top_k=3)
    lat = []
    for _ in range(args.latency_runs):
        t = time.perf_counter()
        clf.classify([decode_image(data)], top_k=3)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    emit("classify_latency_p50", round(statistics.median(lat), 2), "ms", target="<= 30", runs=len(lat))
    emit("classify_latency_p95", round(lat[int(0.95 * (len(lat) - 1))], 2), "ms", runs=len(lat))

    out = subprocess.run(
        [sys.executable, __file__, "--image_dir", str(src), "--_rss_child", str(work / "store"), str(sample)],
        capture_output=True, text=True, check=True,
    )
    emit("classify_peak_rss", round(float(out.stdout.strip().splitlines()[-1]), 1), "MiB",
         note="separate process: load current model, 50 classifications")
    return 0


if __name__ == "__main__":
    sys.exit(main())
