"""Engine benchmark: the TensorFlow path vs LiteRT/XNNPACK, side by side in one run.

Usage::

    python benchmarks/bench_engine.py --image_dir ../shared/data/clothing-small/dev \\
        [--backbones efficientnet_lite0,...] [--retrain_backbone NAME] [--threads 0]

Prints one JSON object per line (figure, value, unit, plus the context and, for ratios, the target):

* ``raw_backbone``: ms per image of the bare backbone on a fixed input, per engine, batch 1 and 16
  (the machine's raw speed: absolute figures only mean something next to it);
* ``bottleneck_throughput``: images/s of ``BottleneckCache.get`` (decode + crops + backbone, the
  default training views) on ``--images`` photos, per backbone and engine (best of ``--repeats``,
  the engines alternating), and the ratio LiteRT / TensorFlow (target >= 3 for Lite0);
* ``classify_latency_p50`` / ``_p95``: one JPEG, warm, through ``Classifier.classify`` (decode +
  crops + forward pass + top-k) of a version trained on those photos, per backbone and engine, and
  the ratio LiteRT / TensorFlow of the p50 (target <= 1/3);
* ``cold_retrain`` / ``warm_retrain`` / ``incremental_retrain_50`` for ``--retrain_backbone`` on
  all photos of ``--image_dir`` (the 50 with the highest content hash held back for the
  incremental run) on LiteRT, ``cold_retrain`` of ``--baseline_backbone`` (today's Lite0) on the
  TensorFlow path (the path before issue 7), and ``cold_retrain_ratio``: the new default's cold
  retrain time over that baseline's (target <= 1).

The machine is usually shared: compare the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far: less disturbed than wall time on a shared machine."""
    return time.process_time()  # CLOCK_PROCESS_CPUTIME_ID: all threads, ns resolution (os.times() ticks 10 ms)


def emit(name: str, value, unit: str = "", target: str | None = None, **extra) -> None:
    rec = {"figure": name, "value": value, "unit": unit}
    if target:
        rec["target"] = target
    rec.update(extra)
    print(json.dumps(rec), flush=True)


def _settings(engine: str, threads: int):
    from model_store.engine import EngineSettings

    return EngineSettings(engine, threads)


def raw_backbone(spec: str, threads: int, work: Path) -> None:
    """ms/image of the bare backbone on each engine, batch 1 and 16 (same fixed input)."""
    import numpy as np

    from model_store.backbones import load_backbone
    from model_store.engine import open_frozen, probe_input

    bb = load_backbone(spec)
    x = np.concatenate([probe_input(bb.input_size, 2)] * 8)  # (16, h, w, 3)
    runners = {
        engine: open_frozen(bb.model, key=bb.id, cache_dir=work / "raw" / bb.id, settings=_settings(engine, threads))
        for engine in ("tensorflow", "litert")
    }
    for batch in (1, 16):
        best, cpu = {}, {}
        for fm in runners.values():
            fm(x[:batch], batch_size=batch)  # warm
        for _ in range(3):
            for engine, fm in runners.items():
                n = batch * max(1, 16 // batch)
                t, c = time.perf_counter(), _cpu()
                for _ in range(max(1, 16 // batch)):
                    fm(x[:batch], batch_size=batch)
                best[engine] = min(best.get(engine, 1e9), (time.perf_counter() - t) * 1000 / n)
                cpu[engine] = min(cpu.get(engine, 1e9), (_cpu() - c) * 1000 / n)
        for engine, ms in best.items():
            emit("raw_backbone", round(ms, 2), "ms/image", backbone=spec, engine=runners[engine].description,
                 batch=batch, cpu_ms_per_image=round(cpu[engine], 2))
        emit("raw_backbone_speedup", round(best["tensorflow"] / best["litert"], 2), "x", backbone=spec, batch=batch,
             cpu_ratio=round(cpu["tensorflow"] / cpu["litert"], 2))


def bottleneck_throughput(spec: str, items: list, threads: int, repeats: int, work: Path) -> Path:
    """Images/s of BottleneckCache.get per engine (fresh cache each time); returns the LiteRT cache root."""
    import numpy as np

    from model_store.backbones import load_backbone
    from model_store.bottlenecks import BottleneckCache
    from model_store.training import TrainConfig

    views = TrainConfig().train_views()
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    desc: dict[str, str] = {}
    keep = work / f"bn-{spec}-litert"
    for rep in range(repeats):
        for engine in ("tensorflow", "litert"):
            bb = load_backbone(spec)
            root = keep if engine == "litert" and rep == repeats - 1 else work / f"bn-{spec}-{engine}-{rep}"
            convert_dir = work / "engine-cache" / bb.id
            t = time.perf_counter()
            desc[engine] = bb.use_engine(_settings(engine, threads), cache_dir=convert_dir)
            setup = time.perf_counter() - t
            bb.features(np.zeros((1, *bb.input_size, 3), np.float32))  # trace / allocate
            cache = BottleneckCache(root, bb)
            t, c = time.perf_counter(), _cpu()
            _, failed = cache.get(items, views=views)
            s, cs = time.perf_counter() - t, _cpu() - c
            rate = (len(items) - len(failed)) / s
            best[engine] = max(best.get(engine, 0.0), rate)
            cpu[engine] = min(cpu.get(engine, 1e9), cs * 1000 / (len(items) - len(failed)))
            emit("bottleneck_run", round(rate, 1), "images/s", backbone=spec, engine=desc[engine], repeat=rep,
                 images=len(items), views=len(views), engine_setup_s=round(setup, 2),
                 cpu_ms_per_image=round(cs * 1000 / (len(items) - len(failed)), 1))
    for engine in ("tensorflow", "litert"):
        emit("bottleneck_throughput", round(best[engine], 1), "images/s", backbone=spec, engine=desc[engine],
             images=len(items), views_per_image=len(views), note=f"best of {repeats}")
    emit("bottleneck_speedup", round(best["litert"] / best["tensorflow"], 2), "x", backbone=spec,
         target=">= 3 (Lite0)", cpu_ratio=round(cpu["tensorflow"] / cpu["litert"], 2),
         note="cpu_ratio: CPU time per image, TensorFlow / LiteRT (decoding and crops included in both)")
    return keep


def classify_latency(spec: str, items: list, files: list, bn_root: Path, threads: int, runs: int, work: Path) -> None:
    """p50/p95 of Classifier.classify on one JPEG, per engine, for a version trained on ``items``."""
    from model_store.classifier import Classifier
    from model_store.images import decode_image
    from model_store.pipeline import retrain
    from model_store.training import TrainConfig
    from model_store.workspace import Workspace

    ws = Workspace(work / f"store-{spec}")
    for p in files:
        ws.store.add(p.read_bytes(), p.parent.name)
    ws.bottleneck_dir = bn_root  # warm: the throughput run computed them
    report = retrain(ws, TrainConfig(), backbone=spec, engine=_settings("litert", threads))
    emit("latency_model", report.status, "", backbone=spec, version=report.version,
         accuracy=round(report.metrics.get("accuracy", 0.0), 4), engine=report.metrics.get("engine"))
    data = files[0].read_bytes()
    clfs = {e: Classifier(ws.registry, engine=_settings(e, threads)) for e in ("tensorflow", "litert")}
    lat: dict[str, list[float]] = {e: [] for e in clfs}
    fwd: dict[str, list[float]] = {e: [] for e in clfs}
    cpu: dict[str, list[float]] = {e: [] for e in clfs}
    for clf in clfs.values():
        for _ in range(10):
            clf.classify([decode_image(data)], top_k=3)
    prepared = {e: clf.prepare(data) for e, clf in clfs.items()}
    for _ in range(runs):  # alternate, so both see the same load
        for engine, clf in clfs.items():
            t, c = time.perf_counter(), _cpu()
            clf.classify([decode_image(data)], top_k=3)
            lat[engine].append((time.perf_counter() - t) * 1000)
            cpu[engine].append((_cpu() - c) * 1000)
            t = time.perf_counter()
            clf.classify([prepared[engine]], top_k=3)  # forward pass + top-k only
            fwd[engine].append((time.perf_counter() - t) * 1000)
    p50, f50, c50 = {}, {}, {}
    for engine, values in lat.items():
        values.sort()
        p50[engine] = statistics.median(values)
        f50[engine] = statistics.median(fwd[engine])
        c50[engine] = statistics.median(cpu[engine])
        desc = clfs[engine].engine_description
        emit("classify_latency_p50", round(p50[engine], 2), "ms", backbone=spec, engine=desc, runs=runs,
             cpu_ms_p50=round(c50[engine], 2))
        emit("classify_latency_p95", round(values[int(0.95 * (len(values) - 1))], 2), "ms", backbone=spec,
             engine=desc, runs=runs)
        emit("classify_forward_p50", round(f50[engine], 2), "ms", backbone=spec, engine=desc, runs=runs,
             note="a prepared image: the forward pass of its crops + top-k, no decoding")
    emit("classify_p50_ratio", round(p50["litert"] / p50["tensorflow"], 3), "litert/tensorflow", backbone=spec,
         target="<= 0.333", cpu_ratio=round(c50["litert"] / c50["tensorflow"], 3),
         note="cpu_ratio: median CPU time per request (all threads), LiteRT / TensorFlow")
    emit("classify_forward_p50_ratio", round(f50["litert"] / f50["tensorflow"], 3), "litert/tensorflow",
         backbone=spec)


def retrain_times(spec: str, baseline: str, files: list, threads: int, work: Path) -> None:
    """A cold retrain of ``baseline`` on the TensorFlow path, then cold / warm / incremental of ``spec`` on LiteRT."""
    from model_store.pipeline import retrain
    from model_store.training import TrainConfig
    from model_store.workspace import Workspace

    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    held = set(sorted(files, key=lambda p: digests[p])[-50:])
    config = TrainConfig()
    cold_seconds = {}
    for engine, backbone in (("tensorflow", baseline), ("litert", spec)):
        ws = Workspace(work / f"retrain-{backbone}-{engine}")
        for p in files:
            if p not in held:
                ws.store.add(p.read_bytes(), p.parent.name)
        settings = _settings(engine, threads)
        t = time.perf_counter()
        cold = retrain(ws, config, backbone=backbone, engine=settings)
        cold_seconds[engine] = time.perf_counter() - t
        m = cold.metrics
        emit("cold_retrain", round(cold_seconds[engine], 2), "s", backbone=backbone,
             engine=(m.get("engine") or {}).get("bottlenecks"), status=cold.status, accuracy=round(m["accuracy"], 4),
             images=len(files) - len(held), timings={k: round(v, 2) for k, v in m["timings"].items()})
        if engine == "tensorflow":
            continue
        emit("cold_retrain_ratio", round(cold_seconds["litert"] / cold_seconds["tensorflow"], 3), "x",
             new=f"{spec} on LiteRT", old=f"{baseline} on TensorFlow", target="<= 1")
        t = time.perf_counter()
        warm = retrain(ws, config, backbone=spec, engine=settings)
        emit("warm_retrain", round(time.perf_counter() - t, 2), "s", backbone=spec, status=warm.status,
             cached=warm.metrics["bottleneck_cache"]["cached"],
             timings={k: round(v, 2) for k, v in warm.metrics["timings"].items()})
        for p in held:
            ws.store.add(p.read_bytes(), p.parent.name)
        t = time.perf_counter()
        inc = retrain(ws, config, backbone=spec, engine=settings)
        emit("incremental_retrain_50", round(time.perf_counter() - t, 2), "s", backbone=spec, status=inc.status,
             computed=inc.metrics["bottleneck_cache"]["computed"],
             timings={k: round(v, 2) for k, v in inc.metrics["timings"].items()})


def main() -> int:
    from model_store.backbones import DEFAULT_BACKBONE
    from model_store.images import IMAGE_EXTENSIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image_dir", required=True, help="labelled folders, e.g. ../shared/data/clothing-small/dev")
    ap.add_argument("--backbones", default=None,
                    help=f"comma-separated backbone specs (default: efficientnet_lite0 and {DEFAULT_BACKBONE})")
    ap.add_argument("--retrain_backbone", default=DEFAULT_BACKBONE, help="backbone of the retrain timings")
    ap.add_argument("--baseline_backbone", default="efficientnet_lite0",
                    help="backbone of the cold retrain on the TensorFlow path (the path before the engine)")
    ap.add_argument("--images", type=int, default=300, help="photos for the throughput and latency runs")
    ap.add_argument("--repeats", type=int, default=2, help="throughput runs per engine (best is reported)")
    ap.add_argument("--latency_runs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="LiteRT threads (0 = all cores)")
    ap.add_argument("--skip_retrain", action="store_true", help="only the backbone / throughput / latency figures")
    ap.add_argument("--work_dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    from model_store.engine import available_cores

    specs = args.backbones.split(",") if args.backbones else list(dict.fromkeys(["efficientnet_lite0", DEFAULT_BACKBONE]))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="labelgram-bench-engine-"))
    files = sorted(p for p in Path(args.image_dir).glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    step = max(1, len(files) // args.images)
    subset = files[::step][: args.images]  # spread over every label
    items = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in subset]
    emit("machine", available_cores(), "cores", threads=args.threads or available_cores(),
         load_average=[round(x, 2) for x in os.getloadavg()])
    for spec in specs:
        raw_backbone(spec, args.threads, work)
        bn_root = bottleneck_throughput(spec, items, args.threads, args.repeats, work)
        classify_latency(spec, items, subset, bn_root, args.threads, args.latency_runs, work)
    if not args.skip_retrain:
        retrain_times(args.retrain_backbone, args.baseline_backbone, files, args.threads, work)
    emit("machine_after", available_cores(), "cores", load_average=[round(x, 2) for x in os.getloadavg()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
