"""5-fold cross-validated accuracy of a backbone / views / head choice on a folder of labelled photos.

The method of docs/accuracy.md: every photo falls in one of 10 bins by its content hash
(``training.hash_percentage`` // 10); fold k tests on bin 2k, validates (early stopping) on bin
2k + 1 and trains on the 8 other bins. Bottlenecks come from the project's own
``BottleneckCache`` (same transform, same cache layout, kept in ``--cache_dir`` so a rerun costs
only the head training), the head from ``training.train_head`` with the default ``TrainConfig``
(override with ``--head``), predictions are the mean softmax over the eval views as in
``pipeline``. Prints one JSON line: per-fold accuracies, mean and std (population std over folds).

Examples::

    python benchmarks/cv_accuracy.py --image_dir ../shared/data/clothing-small/dev \\
        --backbone efficientnet_lite2 --views crop875,crop1000
    # mirrors in training, one hidden layer, one head per crop (ensemble):
    python benchmarks/cv_accuracy.py --image_dir ... --backbone efficientnet_lite2 \\
        --views crop875,crop875-flip,crop1000,crop1000-flip --eval_views crop875,crop1000 --head mlp512
    python benchmarks/cv_accuracy.py --image_dir ... --backbone efficientnet_lite2 \\
        --views crop875,crop1000 --ensemble
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_store.backbones import load_backbone  # noqa: E402
from model_store.bottlenecks import BottleneckCache  # noqa: E402
from model_store.training import TrainConfig, hash_percentage, softmax, train_head  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".heic", ".heif"}


def list_images(image_dir: Path) -> list[tuple[str, Path, str]]:
    """``(sha256, path, label)`` of every image in ``image_dir/<label>/``, sorted by path."""
    out = []
    for p in sorted(image_dir.glob("*/*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            out.append((hashlib.sha256(p.read_bytes()).hexdigest(), p, p.parent.name))
    return out


def mean_softmax(head, feats: np.ndarray) -> np.ndarray:
    """Mean softmax of ``head`` over views: ``(N, V, D)`` -> ``(N, C)`` (as ``pipeline`` predicts)."""
    return np.mean([softmax(np.asarray(head(feats[:, v], training=False))) for v in range(feats.shape[1])], axis=0)


def cross_validate(
    feats: np.ndarray,
    y: np.ndarray,
    bins: np.ndarray,
    views: list[str],
    eval_views: list[str],
    config: TrainConfig,
    *,
    folds: int = 5,
    ensemble: bool = False,
) -> list[float]:
    """Accuracy per fold.

    Args:
        feats: float32 ``(N, V, D)`` bottlenecks, one per view in ``views``.
        y: int ``(N,)`` label indices.
        bins: int ``(N,)`` hash bin 0..9 of each image.
        views / eval_views: cached view names; heads train on all ``views`` of training images,
            predictions average the softmax over ``eval_views``.
        config: head settings (``TrainConfig``).
        folds: 5 (fold k tests bin 2k, validates on bin 2k + 1, as docs/accuracy.md) or 10
            (fold k tests bin k, validates on bin k + 1 mod 10: every photo tested once).
        ensemble: one head per eval view (trained on that view and its mirror, if cached), the
            softmax outputs of the heads averaged, instead of one head on all views.

    Returns:
        list of test accuracies (0..1), one per fold.
    """
    eval_idx = [views.index(v) for v in eval_views]
    num_labels = int(y.max()) + 1
    accs = []
    if folds not in (5, 10):
        raise ValueError("folds must be 5 (test bins 0, 2, .., 8) or 10 (every bin tested once)")
    for k in range(folds):
        test_bin = 2 * k if folds == 5 else k
        te, va = bins == test_bin, bins == (test_bin + 1) % 10
        tr = ~(te | va)
        groups = (
            [[views.index(v)] + [views.index(w) for w in views if w == f"{v}-flip"] for v in eval_views]
            if ensemble
            else [list(range(len(views)))]
        )
        probs = []
        for g in groups:
            x = feats[tr][:, g].reshape(-1, feats.shape[2])
            head, _ = train_head(x, np.repeat(y[tr], len(g)), feats[va, g[0]], y[va], num_labels, config)
            ev = [g[0]] if ensemble else eval_idx
            probs.append(mean_softmax(head, feats[te][:, ev]))
        pred = np.mean(probs, axis=0).argmax(1)
        accs.append(float((pred == y[te]).mean()))
    return accs


def main(argv: list[str] | None = None) -> int:
    """CLI: prints one JSON line with the per-fold accuracies, their mean and std."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image_dir", type=Path, required=True, help="folder of <label>/<image> files")
    ap.add_argument("--backbone", default=None, help="backbone spec (default: the shipped default)")
    ap.add_argument("--views", default="crop875,crop1000", help="cached views the head trains on")
    ap.add_argument("--eval_views", default=None, help="views averaged at test time (default: --views without -flip)")
    ap.add_argument("--head", default="softmax", help="'softmax' (default head) or 'mlpN' (one ReLU layer of N units)")
    ap.add_argument("--ensemble", action="store_true", help="one head per eval view, softmax outputs averaged")
    ap.add_argument("--seeds", type=int, default=1, help="repeat with seeds 0..n-1 and average per fold")
    ap.add_argument("--folds", type=int, default=5, choices=(5, 10))
    ap.add_argument("--cache_dir", type=Path, default=Path("/work/cv-cache"))
    ap.add_argument("--bottlenecks_only", action="store_true", help="fill the cache and stop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    views = args.views.split(",")
    eval_views = args.eval_views.split(",") if args.eval_views else [v for v in views if not v.endswith("-flip")]
    config = TrainConfig()
    if args.head.startswith("mlp"):
        config = replace(config, hidden_units=int(args.head[3:]), dropout=0.5)
    elif args.head != "softmax":
        ap.error("--head must be softmax or mlpN")

    images = list_images(args.image_dir)
    labels = sorted({lab for _, _, lab in images})
    backbone = load_backbone(args.backbone)
    cache = BottleneckCache(args.cache_dir, backbone)
    t = time.perf_counter()
    feats, failed = cache.get([(sha, p) for sha, p, _ in images], views=views)
    t_bottlenecks = time.perf_counter() - t
    keep = np.array([i not in set(failed) for i in range(len(images))])
    if args.bottlenecks_only:
        print(json.dumps({"backbone": backbone.id, "images": len(images), "failed": len(failed),
                          "computed": cache.stats["computed"], "bottlenecks_s": round(t_bottlenecks, 1)}))
        return 0
    y = np.array([labels.index(lab) for _, _, lab in images])[keep]
    bins = np.array([int(hash_percentage(sha) // 10) for sha, _, _ in images])[keep]
    feats = feats[keep]

    per_seed = [
        cross_validate(feats, y, bins, views, eval_views, replace(config, seed=s), folds=args.folds, ensemble=args.ensemble)
        for s in range(args.seeds)
    ]
    fold_acc = np.mean(per_seed, axis=0)
    print(
        json.dumps(
            {
                "backbone": args.backbone or "default",
                "backbone_id": backbone.id,
                "input_size": list(backbone.input_size),
                "views": views,
                "eval_views": eval_views,
                "head": args.head,
                "ensemble": args.ensemble,
                "seeds": args.seeds,
                "images": int(len(y)),
                "fold_accuracy": [round(float(a), 4) for a in fold_acc],
                "mean": round(float(fold_acc.mean()), 4),
                "std": round(float(fold_acc.std()), 4),
                "bottlenecks_s": round(t_bottlenecks, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
