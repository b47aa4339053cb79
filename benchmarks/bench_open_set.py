"""Open-set ("none of my labels") figures on a folder of labelled photos, leaving each label out in turn.

For each label u of ``--image_dir`` (10 labels in clothing-small/dev): the other labels are
"known", split by content hash exactly as a training run splits them (``training.assign_split``,
10% validation, 10% test); the head is trained on the known training photos
(``training.train_head``, default ``TrainConfig``, every cached view), the scorers are fitted on
them and their thresholds calibrated on the known validation photos, as
``stages.gate.fit_open_set`` does at training time. Then, on the known test photos and on every
photo of u (never trained on):

* ``auroc``: area under the ROC curve of the unknown score separating u's photos from the known
  test photos (Mann-Whitney U, ties counted half);
* ``unknown_caught``: share of u's photos above the threshold;
* ``known_rejected``: share of known test photos above it;
* ``top1`` / ``top1_with_rejection``: top-1 accuracy of the head on the known test photos, and the
  same counting every rejected known photo as a miss; ``top1_change_points`` the difference in
  points. The score is computed beside the softmax and never changes the head's output.

Methods (one JSON line per left-out label and method, then one summary line per method); the
first two are the old and the new served method, side by side:

* ``knn@95 (old)``: served before: 1 - cosine to the k-th nearest training photo (Sun et al., ICML
  2022), k by ``openset.choose_k`` (2 here), threshold the empirical 95% quantile of validation;
* ``knn+msp@99 (new)``: served now (``model_store.openset.METHOD``): the kNN distance and one minus
  the max softmax probability, each over its own threshold, the larger ratio; both thresholds one
  common conformal quantile so that 99% of validation photos pass both (``openset.calibrate_union``);
* the parts and the alternatives considered, each at the 99% conformal threshold
  (``openset.calibrate_threshold``): ``knn@99``, ``msp@99`` (Hendrycks and Gimpel, ICLR 2017),
  ``energy@99`` (minus logsumexp of the logits, Liu et al., NeurIPS 2020) and ``vim@99``
  (Virtual-logit Matching, Wang et al., CVPR 2022, class :class:`ViM`).

``--far_dir DIR`` (repeatable): photos of another domain (any image files): trained on every label
of ``--image_dir`` as a training run, its test photos vs those (one line per method).

Serving cost (last line but one): the classifier's forward pass for 8 photos x 2 crops (the
backbone on the serving engine, LiteRT by default, plus the softmax head in NumPy) timed side by
side with the same plus the served open-set score against all the dev photos' vectors (a bank of
~2,600), alternating, median of ``--repeats``; the added milliseconds per photo and the ratio.

Bottlenecks come from the project's ``BottleneckCache`` in ``--cache_dir`` (computed once; a rerun
with a filled cache costs only the 10 head trainings). Example::

    python benchmarks/bench_open_set.py --image_dir ../shared/data/clothing-small/dev
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cv_accuracy import IMAGE_SUFFIXES, list_images  # noqa: E402
from model_store.backbones import load_backbone  # noqa: E402
from model_store.bottlenecks import BottleneckCache  # noqa: E402
from model_store.openset import OpenSet, calibrate_threshold  # noqa: E402
from model_store.stages.gate import head_weights  # noqa: E402
from model_store.training import TESTING, TRAINING, VALIDATION, TrainConfig, assign_split, softmax, train_head  # noqa: E402


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(score of an unknown photo > score of a known one), ties counted half (Mann-Whitney U)."""
    allv = np.concatenate([known, unknown])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_unknown = ranks[len(known) :].sum()
    n1, n0 = len(unknown), len(known)
    return float((r_unknown - n1 * (n1 + 1) / 2) / (n1 * n0))


def mean_softmax(head, feats: np.ndarray) -> np.ndarray:
    """Mean softmax of ``head`` over the views of ``feats`` ``(N, V, D)``."""
    return np.mean([softmax(np.asarray(head(feats[:, v], training=False))) for v in range(feats.shape[1])], axis=0)


class ViM:
    """Virtual-logit Matching (Wang, Li, Feng and Zhang, CVPR 2022) on crop-averaged bottlenecks.

    Origin ``u = -pinv(W^T) b``; principal subspace: the top ``dim`` eigenvectors of the uncentred
    covariance of the training features minus u (the paper's ``EmpiricalCovariance(assume_centered=True)``);
    virtual logit ``alpha * ||residual||`` with ``alpha`` = mean max-logit / mean residual norm on the
    training photos; unknown score = virtual logit - energy (logsumexp of the logits). ``dim``: half
    the feature dimension (the paper: 1,000 of 2,048 features for BiT, 512 of 768 for ViT), fewer
    than the training photos.
    """

    def __init__(self, feats: np.ndarray, kernel: np.ndarray, bias: np.ndarray):
        x = feats.mean(axis=1).astype(np.float64)
        self.w, self.b = kernel.astype(np.float64), bias.astype(np.float64)
        self.u = -np.linalg.pinv(self.w.T) @ self.b
        z = x - self.u
        eigval, eigvec = np.linalg.eigh(z.T @ z / len(z))
        dim = min(x.shape[1] // 2, len(x) - 1)
        self.ns = eigvec[:, np.argsort(eigval)[::-1][dim:]]
        logits = x @ self.w + self.b
        self.alpha = logits.max(1).mean() / np.linalg.norm(z @ self.ns, axis=1).mean()

    def energy(self, feats: np.ndarray) -> np.ndarray:
        """logsumexp of the logits of the crop-averaged bottleneck (Liu et al., NeurIPS 2020: minus
        the free energy; higher = more known)."""
        logits = feats.mean(axis=1).astype(np.float64) @ self.w + self.b
        m = logits.max(1, keepdims=True)
        return (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]

    def score(self, feats: np.ndarray) -> np.ndarray:
        x = feats.mean(axis=1).astype(np.float64)
        return self.alpha * np.linalg.norm((x - self.u) @ self.ns, axis=1) - self.energy(feats)


def old_threshold(scores: np.ndarray) -> float:
    """The threshold as served before: the empirical 95% quantile (``inverted_cdf``) of the validation scores."""
    return float(np.quantile(np.asarray(scores, np.float64), 0.95, method="inverted_cdf"))


def leave_one_out(feats, y, shas, labels, u, config) -> tuple[dict[str, dict], float]:
    """Figures of every candidate with label ``u`` left out; also the seconds the served scoring took."""
    known = y != u
    return known_vs_unknown(feats[known], y[known], np.asarray(shas)[known], labels, feats[~known], config)


def known_vs_unknown(kf, ky, shas, labels, unk, config) -> tuple[dict[str, dict], float]:
    """Train on the known photos ``kf`` ``(N, V, D)`` (labels ``ky``) split as a training run splits
    them, score their test split against the photos ``unk`` never trained on; figures of every candidate."""
    splits, _ = assign_split(
        [(s, labels[c]) for s, c in zip(shas, ky, strict=True)],
        validation_percentage=config.validation_percentage,
        testing_percentage=config.testing_percentage,
        min_images_per_label=1,
    )
    splits = np.array(splits)
    remap = {c: n for n, c in enumerate(sorted(set(ky.tolist())))}
    ky = np.array([remap[c] for c in ky])
    tr, va, te = splits == TRAINING, splits == VALIDATION, splits == TESTING
    head, _ = train_head(
        kf[tr].reshape(-1, kf.shape[2]), np.repeat(ky[tr], kf.shape[1]), kf[va, 0], ky[va], len(remap), config
    )
    weights = head_weights(head)
    assert weights is not None
    p_te = mean_softmax(head, kf[te])
    correct = p_te.argmax(1) == ky[te]

    t = time.perf_counter()
    served = OpenSet.fit(kf[tr], ky[tr], head_weights=weights)
    served.calibrate(kf[va])
    served_scores = (served.score(kf[va]), served.score(kf[te]), served.score(unk))
    served_s = time.perf_counter() - t
    knn = (served.knn_scores(kf[va]), served.knn_scores(kf[te]), served.knn_scores(unk))
    msp = (served.msp_scores(kf[va]), served.msp_scores(kf[te]), served.msp_scores(unk))
    vim = ViM(kf[tr], *weights)
    # (method name, (validation, test, unknown) scores, threshold rule)
    candidates = [
        ("knn@95 (old)", knn, old_threshold),
        ("knn+msp@99 (new)", served_scores, lambda s: served.threshold),
        ("knn@99", knn, calibrate_threshold),
        ("msp@99", msp, calibrate_threshold),
        ("energy@99", tuple(-vim.energy(f) for f in (kf[va], kf[te], unk)), calibrate_threshold),
        ("vim@99", (vim.score(kf[va]), vim.score(kf[te]), vim.score(unk)), calibrate_threshold),
    ]
    out = {}
    for name, (s_va, s_te, s_unk), rule in candidates:
        thr = rule(s_va)
        rejected = s_te > thr
        top1 = float(correct.mean())
        top1_rej = float((correct & ~rejected).mean())
        out[name] = {
            "auroc": auroc(s_te, s_unk),
            "unknown_caught": float((s_unk > thr).mean()),
            "known_rejected": float(rejected.mean()),
            "top1": top1,
            "top1_with_rejection": top1_rej,
            "top1_change_points": 100 * (top1_rej - top1),
            "known_test": int(te.sum()),
            "unknown_photos": len(unk),
            "validation": int(va.sum()),
            "k": served.k,
        }
    return out, served_s


def serving_cost(backbone, cache_dir: Path, paths: list[Path], feats: np.ndarray, y: np.ndarray, repeats: int) -> dict:
    """Forward pass + head vs forward pass + head + open-set score, per photo (ms), side by side."""
    from model_store.bottlenecks import decode_for_model
    from model_store.engine import EngineSettings
    from model_store.preprocessing import to_model_input

    config = TrainConfig()
    engine = backbone.use_engine(EngineSettings(), cache_dir=cache_dir / backbone.id)
    crops = config.crop_fractions
    batch = np.stack(
        [to_model_input(decode_for_model(p.read_bytes()), backbone.input_size, mode="center_crop", crop_fraction=f)
         for p in paths[:8] for f in crops]
    )
    rng = np.random.default_rng(0)
    kernel = (0.05 * rng.normal(size=(feats.shape[2], int(y.max()) + 1))).astype(np.float32)  # a head's shape
    bias = np.zeros(kernel.shape[1], np.float32)
    scorer = OpenSet.fit(feats, y, head_weights=(kernel, bias))  # the served combination
    scorer.calibrate(feats[:100])

    def plain() -> None:
        f = backbone.features(batch, batch_size=len(batch))
        softmax(f @ kernel)

    def with_score() -> None:
        f = backbone.features(batch, batch_size=len(batch))
        softmax(f @ kernel)
        scorer.is_unknown(scorer.score(f.reshape(8, len(crops), -1)))

    times: dict[str, list[float]] = {"plain": [], "with_score": []}
    for fn in (plain, with_score):
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("with_score", with_score)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    t_score = []
    for _ in range(repeats):
        f = rng.normal(size=(8, len(crops), feats.shape[2])).astype(np.float32)
        t = time.perf_counter()
        scorer.score(f)
        t_score.append(time.perf_counter() - t)
    plain_ms = 1000 * float(np.median(times["plain"])) / 8
    with_ms = 1000 * float(np.median(times["with_score"])) / 8
    return {
        "serving_engine": engine,
        "bank_images": len(scorer.bank),
        "photos_per_batch": 8,
        "ms_per_photo_forward_and_head": round(plain_ms, 2),
        "ms_per_photo_with_open_set": round(with_ms, 2),
        "ratio": round(with_ms / plain_ms, 3),
        "ms_per_photo_score_alone": round(1000 * float(np.median(t_score)) / 8, 3),
        "open_set_file_bytes": len(scorer.to_bytes()),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: JSON lines per left-out label and method, then a summary line per method."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image_dir", type=Path, required=True, help="folder of <label>/<image> files")
    ap.add_argument("--backbone", default=None, help="backbone spec (default: the shipped default)")
    ap.add_argument("--cache_dir", type=Path, default=Path("/work/cv-cache"))
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats of the serving comparison")
    ap.add_argument("--serving_only", action="store_true", help="only the serving-cost line")
    ap.add_argument("--far_dir", type=Path, action="append", default=[],
                    help="a folder of photos of another domain (any files of images, no labels): "
                         "trained on every label of --image_dir, its test photos vs these; repeatable")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()

    config = TrainConfig()
    views = config.train_views()
    images = list_images(args.image_dir)
    labels = sorted({lab for _, _, lab in images})
    backbone = load_backbone(args.backbone)
    cache = BottleneckCache(args.cache_dir, backbone)
    feats, failed = cache.get([(sha, p) for sha, p, _ in images], views=views)
    keep = np.array([i not in set(failed) for i in range(len(images))])
    feats = feats[keep]
    y = np.array([labels.index(lab) for _, _, lab in images])[keep]
    shas = [sha for (sha, _, _), k in zip(images, keep, strict=True) if k]
    t_bottlenecks = time.perf_counter() - t0
    paths = [p for (_, p, _), k in zip(images, keep, strict=True) if k]
    if args.serving_only:
        print(json.dumps(serving_cost(backbone, args.cache_dir, paths, feats[:, :2], y, args.repeats)))
        return 0

    for far_dir in args.far_dir:
        far = [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in sorted(far_dir.iterdir())
               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        far_feats, far_failed = cache.get(far, views=views)
        far_feats = far_feats[[i for i in range(len(far)) if i not in set(far_failed)]]
        res, _ = known_vs_unknown(feats, y, shas, labels, far_feats, config)
        for name, r in res.items():
            print(json.dumps({"far_domain": str(far_dir), "method": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)

    per_method: dict[str, list[dict]] = {}
    knn_times = []
    for u in range(len(labels)):
        res, knn_s = leave_one_out(feats, y, shas, labels, u, config)
        knn_times.append(knn_s)
        for name, r in res.items():
            per_method.setdefault(name, []).append(r)
            print(json.dumps({"left_out": labels[u], "method": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)
    for name, rows in per_method.items():
        mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("auroc", "unknown_caught", "known_rejected", "top1", "top1_with_rejection", "top1_change_points")}
        print(
            json.dumps(
                {
                    "summary": name,
                    "backbone_id": backbone.id,
                    "images": int(len(y)),
                    "labels": len(labels),
                    "min_auroc": round(float(min(r["auroc"] for r in rows)), 4),
                    **{f"mean_{k}": v for k, v in mean.items()},
                }
            )
        )
    print(json.dumps(serving_cost(backbone, args.cache_dir, paths, feats[:, :2], y, args.repeats)))
    print(
        json.dumps(
            {
                "seconds_total": round(time.perf_counter() - t0, 1),
                "seconds_bottlenecks": round(t_bottlenecks, 1),
                "served_fit_calibrate_score_s_per_run": round(float(np.mean(knn_times)), 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
