"""Simulated active learning: does labelling the photos the review queue puts first teach more than random ones?

The protocol of issue 10: start from ``--start`` photos per label, add ``--batch`` photos per round
for ``--rounds`` rounds, chosen from the photos not yet labelled (the "pool") either

* ``random``: uniformly at random;
* ``margin``: by the review queue's order, ``model_store.active_learning.priority`` on the current
  head's softmax (the mean over the eval crops, as served), highest first: the smallest margin
  between the two most probable labels first (margin sampling, Scheffer et al. 2001);
* ``queue``: the same, with the open-set check's "unknown" flag as the review queue gets it
  (``model_store.openset.fit_calibrated`` on the labelled photos, as a training run does: an
  unknown photo counts as maximally uncertain and comes first).

Ties in the queue's order (every unknown photo has uncertainty 1.0) are broken in a random
arrival order, as photos reach the queue from a chat (the pool's own order groups photos by
label, which would hand the first labels alphabetically all the tied picks).

The "admin" labels the chosen photos with their true label (the folder they are in). After each
round the head is retrained from scratch as a training run does (``training.train_head``, default
``TrainConfig``, every cached view of the labelled training photos; early stopping on the labelled
photos whose hash puts them in a 10% validation share, ``validation_share``) and its top-1
accuracy measured on a fixed held-out test split that is never in the pool.

Folds and repeats: the test split of fold k is hash bin 2k of ``benchmarks/cv_accuracy.py``
(``hash_percentage // 10``; 5 folds, ~265 photos each), the pool the other 9 bins; each fold is
repeated with ``--seeds`` different random starting sets (and random picks). The three strategies
of one (fold, seed) share the same starting set and round-0 head, so their differences are
paired. One JSON line per (fold, seed, strategy) with the accuracy after each round, then one
summary line per strategy (mean and population std over the runs, per round) and one line with
the paired differences ``margin - random`` and ``queue - random`` per round.

Bottlenecks come from the project's ``BottleneckCache`` in ``--cache_dir`` (shared with
``cv_accuracy.py`` and ``bench_open_set.py``: a filled cache costs only the head trainings).
Example::

    python benchmarks/bench_active_learning.py --image_dir ../shared/data/clothing-small/dev
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_store.active_learning import priority  # noqa: E402

STRATEGIES = ("random", "margin", "queue")


def queue_order(probs: np.ndarray, unknown: np.ndarray | None = None) -> np.ndarray:
    """Indices of the pool photos in the review queue's order (``active_learning.priority``, highest first).

    Args:
        probs: float ``(N, C)`` softmax probabilities of the N pool photos.
        unknown: bool ``(N,)`` open-set flags, or None (no flag).

    Returns:
        int ``(N,)`` permutation; ties keep the pool's order (a stable sort).
    """
    keys = [priority(p, unknown=None if unknown is None else bool(unknown[i])) for i, p in enumerate(probs)]
    return np.array(sorted(range(len(keys)), key=lambda i: keys[i], reverse=True), dtype=np.int64)


def choose(strategy: str, pool: np.ndarray, n: int, rng: np.random.Generator, probs=None, unknown=None) -> np.ndarray:
    """``n`` photos of ``pool`` (int indices into the whole set) chosen by ``strategy``.

    ``probs`` (``(len(pool), C)``) is needed by ``margin`` and ``queue``, ``unknown``
    (``(len(pool),)`` bool) by ``queue``.

    Raises:
        ValueError: unknown strategy, or the probabilities / flags it needs missing.
    """
    n = min(n, len(pool))
    if strategy == "random":
        return rng.choice(pool, size=n, replace=False)
    if probs is None:
        raise ValueError(f"{strategy} needs the pool's softmax probabilities")
    if strategy not in ("margin", "queue"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "queue" and unknown is None:
        raise ValueError("queue needs the pool's unknown flags")
    # Photos reach the queue in the order people send them, not grouped by label as the pool's
    # indices are: ties (every unknown photo has uncertainty 1.0) are broken in a random order.
    arrival = rng.permutation(len(pool))
    flags = None if strategy == "margin" else np.asarray(unknown)[arrival]
    return pool[arrival[queue_order(np.asarray(probs)[arrival], flags)[:n]]]


def starting_set(y: np.ndarray, pool: np.ndarray, per_label: int, rng: np.random.Generator) -> np.ndarray:
    """``per_label`` random photos of each label from ``pool`` (fewer if a label has fewer)."""
    picks = [rng.choice(pool[y[pool] == c], size=min(per_label, int((y[pool] == c).sum())), replace=False)
             for c in np.unique(y[pool])]
    return np.concatenate(picks)


def validation_share(shas: list[str]) -> np.ndarray:
    """bool ``(N,)``: the ~10% of photos used for early stopping, by a hash digit independent of the
    fold's bin (``hash_percentage`` uses the first 10 hex digits; this the next 10, modulo 10)."""
    return np.array([int(s[10:20], 16) % 10 == 0 for s in shas])


def _head_and_probs(feats, y, labelled, val_mask, num_labels, config, eval_sets):
    """Train a head on the labelled photos; mean softmax over views for each of ``eval_sets``."""
    from model_store.training import softmax, train_head

    lab = np.asarray(labelled)
    va = lab[val_mask[lab]]
    tr = lab[~val_mask[lab]]
    v = feats.shape[1]
    head, _ = train_head(feats[tr].reshape(-1, feats.shape[2]), np.repeat(y[tr], v), feats[va, 0], y[va], num_labels, config)
    out = [np.mean([softmax(np.asarray(head(feats[idx, i], training=False))) for i in range(v)], axis=0) for idx in eval_sets]
    return head, tr, va, out


def _unknown_flags(head, feats, y, tr, va, pool) -> np.ndarray:
    """Open-set flags of the pool photos as a training run would serve them (``openset.fit_calibrated``)."""
    from model_store.openset import fit_calibrated
    from model_store.stages.gate import head_weights

    scorer, _, _ = fit_calibrated(feats[tr], y[tr], feats[va], head_weights=head_weights(head))
    return scorer.is_unknown(scorer.score(feats[pool]))


def simulate(feats, y, shas, bins, fold: int, seed: int, args, config) -> dict[str, list[dict]]:
    """Accuracy after each round for every strategy on one (fold, seed)."""
    num_labels = int(y.max()) + 1
    test = np.flatnonzero(bins == 2 * fold)
    everything = np.flatnonzero(bins != 2 * fold)
    val_mask = validation_share(shas)
    rng0 = np.random.default_rng(1000 * seed + fold)
    start = starting_set(y, everything, args.start, rng0)
    cfg = replace(config, seed=seed)
    runs: dict[str, list[dict]] = {}
    first = None
    for strategy in STRATEGIES:
        rng = np.random.default_rng(1000 * seed + fold + 1)
        labelled = start.copy()
        rows = []
        for r in range(args.rounds + 1):
            pool = np.setdiff1d(everything, labelled)
            if r == 0 and first is not None:
                head, tr, va, (p_test, p_pool) = first  # same start, same seed: same round-0 head
            else:
                head, tr, va, (p_test, p_pool) = _head_and_probs(feats, y, labelled, val_mask, num_labels, cfg, (test, pool))
                if r == 0:
                    first = (head, tr, va, (p_test, p_pool))
            row = {"round": r, "labelled": len(labelled), "accuracy": float((p_test.argmax(1) == y[test]).mean())}
            if r == args.rounds:
                rows.append(row)
                break
            unknown = _unknown_flags(head, feats, y, tr, va, pool) if strategy == "queue" else None
            picked = choose(strategy, pool, args.batch, rng, probs=p_pool, unknown=unknown)
            row["picked_unknown"] = int(unknown[np.isin(pool, picked)].sum()) if unknown is not None else None
            row["picked_labels"] = int(len(np.unique(y[picked])))
            rows.append(row)
            labelled = np.concatenate([labelled, picked])
        runs[strategy] = rows
    return runs


def main(argv: list[str] | None = None) -> int:
    """CLI: JSON lines per (fold, seed, strategy), then summaries per strategy and paired differences."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image_dir", type=Path, required=True, help="folder of <label>/<image> files")
    ap.add_argument("--backbone", default=None, help="backbone spec (default: the shipped default)")
    ap.add_argument("--cache_dir", type=Path, default=Path("/work/cv-cache"))
    ap.add_argument("--start", type=int, default=10, help="photos per label to start from")
    ap.add_argument("--batch", type=int, default=50, help="photos labelled per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--folds", type=int, default=5, help="test bins 0, 2, .. (at most 5)")
    ap.add_argument("--seeds", type=int, default=2, help="random starting sets per fold")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from benchmarks.cv_accuracy import list_images
    from model_store.backbones import load_backbone
    from model_store.bottlenecks import BottleneckCache
    from model_store.training import TrainConfig, hash_percentage

    t0 = time.perf_counter()
    config = TrainConfig()
    images = list_images(args.image_dir)
    labels = sorted({lab for _, _, lab in images})
    backbone = load_backbone(args.backbone)
    feats, failed = BottleneckCache(args.cache_dir, backbone).get([(s, p) for s, p, _ in images], views=config.train_views())
    keep = np.array([i not in set(failed) for i in range(len(images))])
    feats = feats[keep]
    y = np.array([labels.index(lab) for _, _, lab in images])[keep]
    shas = [s for (s, _, _), k in zip(images, keep, strict=True) if k]
    bins = np.array([int(hash_percentage(s) // 10) for s in shas])

    acc: dict[str, list[list[float]]] = {s: [] for s in STRATEGIES}
    for seed in range(args.seeds):
        for fold in range(min(5, args.folds)):
            runs = simulate(feats, y, shas, bins, fold, seed, args, config)
            for strategy, rows in runs.items():
                acc[strategy].append([r["accuracy"] for r in rows])
                print(json.dumps({"fold": fold, "seed": seed, "strategy": strategy, "test_images": int((bins == 2 * fold).sum()),
                                  "rounds": rows}), flush=True)
    labelled = [len(labels) * args.start + r * args.batch for r in range(args.rounds + 1)]
    for strategy, runs_acc in acc.items():
        a = np.array(runs_acc)
        print(json.dumps({"summary": strategy, "runs": len(a), "labelled": labelled,
                          "mean_accuracy": [round(float(v), 4) for v in a.mean(0)],
                          "std_accuracy": [round(float(v), 4) for v in a.std(0)]}))
    base = np.array(acc["random"])
    print(json.dumps({
        "paired_difference_vs_random": {
            s: {"mean": [round(float(v), 4) for v in (np.array(acc[s]) - base).mean(0)],
                "std": [round(float(v), 4) for v in (np.array(acc[s]) - base).std(0)],
                "runs_better_last_round": int(((np.array(acc[s]) - base)[:, -1] > 0).sum()),
                "runs_worse_last_round": int(((np.array(acc[s]) - base)[:, -1] < 0).sum())}
            for s in STRATEGIES if s != "random"
        },
        "backbone_id": backbone.id, "images": int(len(y)), "labels": len(labels),
        "seconds_total": round(time.perf_counter() - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
