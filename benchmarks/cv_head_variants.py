"""5-fold CV of head-training variants (feature normalisation, weight decay, label smoothing, refit on
train + validation) and of concatenated bottlenecks of several backbones.

An experiment script, not the training code: the head here is a Keras ``Dense`` softmax layer built
the way ``training.build_head`` builds it (dropout, Adam, batch 256, lr 4e-3, early stopping on
validation loss, patience 10), plus the variant's options. Folds, views and the prediction rule
(mean softmax over the eval crops) are those of ``benchmarks/cv_accuracy.py``; bottlenecks come
from its cache (``--cache_dir``), so run ``cv_accuracy.py --bottlenecks_only`` for each backbone
first. Prints one JSON line per variant: per-fold accuracy (mean over seeds), mean, std over folds.

Variant keys (JSON, ``--variants '[{...}, ...]'``):

* ``norm``: ``"none"`` | ``"std"`` (standardise each feature with the training set's mean / std) |
  ``"l2"`` (L2-normalise each vector, times sqrt(D)) | ``"sqrt"`` (signed square root, then l2);
* ``wd``: L2 weight decay on the kernel (Keras ``L2`` regulariser factor);
* ``ls``: label smoothing; ``dropout`` (default 0.2); ``refit``: after early stopping, train a
  fresh head on training + validation bottlenecks for the best epoch count;
* ``seeds``: number of head seeds (0..n-1).

Example::

    python benchmarks/cv_head_variants.py --image_dir ../shared/data/clothing-small/dev \\
        --backbone efficientnet_lite1 --variants '[{"norm": "sqrt"}, {"refit": true}]'
    # concatenated bottlenecks (2560-d) of two backbones:
    python benchmarks/cv_head_variants.py --image_dir ... --backbone efficientnet_lite0,efficientnet_lite1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_accuracy import list_images  # noqa: E402

from model_store.backbones import load_backbone  # noqa: E402
from model_store.bottlenecks import BottleneckCache  # noqa: E402
from model_store.training import hash_percentage  # noqa: E402


def normalise(x: np.ndarray, kind: str, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Feature normalisation ``(..., D)`` -> ``(..., D)`` float32; ``stats`` = training mean, std."""
    if kind == "none":
        return x
    if kind == "std":
        return (x - stats[0]) / stats[1]
    if kind == "sqrt":
        x = np.sign(x) * np.sqrt(np.abs(x))
    if kind in ("l2", "sqrt"):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * np.sqrt(x.shape[-1])
    raise ValueError(f"unknown norm {kind!r}")


def fit_head(xtr, ytr, xva, yva, xall, yall, num_labels, seed, *, dropout=0.2, wd=0.0, ls=0.0, refit=False):
    """A trained Keras head (features -> logits) for one variant; see the module docstring."""
    import keras

    def build():
        inp = keras.Input((xtr.shape[1],))
        x = keras.layers.Dropout(dropout)(inp) if dropout else inp
        out = keras.layers.Dense(num_labels, kernel_regularizer=keras.regularizers.L2(wd) if wd else None)(x)
        m = keras.Model(inp, out)
        m.compile(optimizer=keras.optimizers.Adam(4e-3),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=ls))
        return m

    def oh(y):
        return keras.utils.to_categorical(y, num_labels)

    keras.utils.set_random_seed(seed)
    m = build()
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)
    h = m.fit(xtr, oh(ytr), validation_data=(xva, oh(yva)), epochs=60, batch_size=256, verbose=0, callbacks=[stop])
    if refit:
        best = int(np.argmin(h.history["val_loss"])) + 1
        keras.utils.set_random_seed(seed)
        m = build()
        m.fit(xall, oh(yall), epochs=best, batch_size=256, verbose=0)
    return m


def cross_validate(feats, y, bins, variant: dict) -> np.ndarray:
    """Per-fold accuracy (mean over seeds) of one variant; feats ``(N, V, D)``, 5 folds as cv_accuracy."""
    import keras

    v = dict(variant)
    kind, seeds = v.pop("norm", "none"), v.pop("seeds", 1)
    num_labels, nv, d = int(y.max()) + 1, feats.shape[1], feats.shape[2]
    accs = np.zeros((seeds, 5))
    for s in range(seeds):
        for k in range(5):
            te, va = bins == 2 * k, bins == 2 * k + 1
            tr = ~(te | va)
            raw = feats[tr].reshape(-1, d)
            stats = (raw.mean(0), raw.std(0) + 1e-6)
            xtr, ytr = normalise(raw, kind, stats), np.repeat(y[tr], nv)
            xva = normalise(feats[va][:, 0], kind, stats)
            xall = np.concatenate([xtr, normalise(feats[va].reshape(-1, d), kind, stats)])
            yall = np.concatenate([ytr, np.repeat(y[va], nv)])
            m = fit_head(xtr, ytr, xva, y[va], xall, yall, num_labels, s, **v)
            p = np.mean(
                [keras.ops.convert_to_numpy(keras.ops.softmax(m(normalise(feats[te][:, j], kind, stats)))) for j in range(nv)],
                axis=0,
            )
            accs[s, k] = (p.argmax(1) == y[te]).mean()
    return accs.mean(0)


def main(argv: list[str] | None = None) -> int:
    """CLI: one JSON line per variant."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image_dir", type=Path, required=True)
    ap.add_argument("--backbone", default="efficientnet_lite1", help="backbone spec, or several comma-separated (concatenated)")
    ap.add_argument("--views", default="crop875,crop1000")
    ap.add_argument("--variants", default='[{"norm": "none"}]', help="JSON list of variant dicts")
    ap.add_argument("--cache_dir", type=Path, default=Path("/work/cv-cache"))
    args = ap.parse_args(argv)
    images = list_images(args.image_dir)
    labels = sorted({lab for _, _, lab in images})
    parts, failed_all = [], set()
    for spec in args.backbone.split(","):
        f, failed = BottleneckCache(args.cache_dir, load_backbone(spec)).get(
            [(sha, p) for sha, p, _ in images], views=args.views.split(",")
        )
        parts.append(f)
        failed_all |= set(failed)
    keep = np.array([i not in failed_all for i in range(len(images))])
    feats = np.concatenate(parts, axis=-1)[keep].astype(np.float32)
    y = np.array([labels.index(lab) for _, _, lab in images])[keep]
    bins = np.array([int(hash_percentage(sha) // 10) for sha, _, _ in images])[keep]
    for variant in json.loads(args.variants):
        t = time.perf_counter()
        fa = cross_validate(feats, y, bins, variant)
        print(json.dumps({"backbone": args.backbone, "variant": variant, "fold_accuracy": [round(float(a), 4) for a in fa],
                          "mean": round(float(fa.mean()), 4), "std": round(float(fa.std()), 4),
                          "train_s": round(time.perf_counter() - t, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
