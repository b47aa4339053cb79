""""None of my labels": how unlike a photo is of everything the model was trained on.

Why this module is long: the two scores, their joint calibration and the file format of both the
current and the previous method (versions trained before stay servable) belong together.

Open-set recognition beside the softmax. The softmax always spreads 100% over the known labels, so
a photo of something never taught still gets one of them. Two detectors answer two different
questions, and a photo is "unknown" when either says so:

* **far** (a cat sent to a clothing bot): k-nearest-neighbour distance on L2-normalised
  bottlenecks (Sun, Ming, Zhu and Li, "Out-of-Distribution Detection with Deep Nearest
  Neighbors", ICML 2022): ``1 - cos`` to the k-th nearest training photo (0 = identical
  direction, 2 = opposite). Each of the version's eval crops is L2-normalised, the crops averaged
  and the mean normalised again. k is about 1% of a label's training photos (:data:`K_FRACTION`,
  Sun et al.'s k = 50 for CIFAR-10's 5,000 images per class), at least 1, at most :data:`MAX_K`;
* **near** (a long-sleeve top for a model that knows shirts and t-shirts: in the backbone's
  features it *is* a shirt, so no feature distance separates it): one minus the maximum softmax
  probability of the head (Hendrycks and Gimpel, "A Baseline for Detecting Misclassified and
  Out-of-Distribution Examples", ICLR 2017), the mean softmax over the eval crops as served. The
  same paper shows this score also ranks the model's own mistakes first, so the known photos it
  rejects are mostly ones the model would have got wrong anyway: what keeps the top-1 cost of the
  check small (the issue's "no more than 1 point lost").

Combination (:data:`METHOD` ``"knn+msp"``): each score is divided by its own threshold and the
larger ratio is the unknown score; a photo is unknown when it exceeds 1 (= either score above its
threshold). Both thresholds are the same empirical quantile of their score over the known
calibration photos, the quantile chosen so that :data:`PASS_RATE` of those photos pass *both*
(:func:`calibrate_union`). Dividing by a threshold makes the two scores comparable without any
weight to tune: a photo twice as far as the far-detector's threshold scores 2.

Pass rate: 99% of known validation photos (:data:`PASS_RATE`), taken from the issue's budget
rather than the papers' usual 95%: every known photo rejected is at most one point of top-1 per
hundred photos lost, so a 1% rejection rate keeps the loss at or under 1 point by construction.
With n calibration photos the threshold is the ``ceil(p (n + 1))``-th smallest score (the
split-conformal quantile, Vovk et al. 2005; Angelopoulos and Bates, "A Gentle Introduction to
Conformal Prediction", 2021): a new known photo then passes with probability at least p. It needs
n >= p / (1 - p) = 99 photos. With fewer than :data:`MIN_CALIBRATION_IMAGES` validation photos (a
small store, :func:`fit_calibrated`), the kNN part is calibrated on them plus the training photos'
leave-one-out scores, the softmax part on the validation photos alone (the head has seen its
training photos), each part at ``1 - (1 - p) / 2`` so that ``p`` pass both (Bonferroni). Below the photos a
quantile needs, the kNN part takes the largest score as its threshold (the guarantee is then
n / (n + 1)) and the softmax part is not used: its largest score over a few validation photos would
call about one ordinary, merely uncertain known photo in n + 1 "unknown" (the bot's "I'm not sure"
reply is for those).

What a version stores (:data:`OPENSET_FILE`, written through :mod:`model_store.fs`): the training
photos' normalised vectors as float16 (at most :data:`MAX_BANK` of them, an even subsample beyond:
Sun et al. also subsample), k, a copy of the head's last layer (kernel and bias, to compute the
softmax from the same bottlenecks) and the thresholds: 2,600 photos x 1,280 features x 2 bytes =
6.7 MB. A head with a hidden layer, or a version trained before the combination
(:data:`KNN_METHOD`), is served with the kNN score alone; a version without the file serves without
the flag.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from model_store.fs import write_atomic

__all__ = [
    "K_FRACTION",
    "KNN_METHOD",
    "MAX_K",
    "MAX_BANK",
    "METHOD",
    "MIN_CALIBRATION_IMAGES",
    "MSP_FLOOR",
    "OPENSET_FILE",
    "PASS_RATE",
    "OpenSet",
    "calibrate_threshold",
    "calibrate_union",
    "choose_k",
    "embed",
    "fit_calibrated",
    "load_open_set",
    "max_softmax_scores",
]

log = logging.getLogger(__name__)

#: file in a version folder holding the open-set data
OPENSET_FILE = "openset.npz"
#: the method served: kNN distance and max-softmax, each against its own threshold, either flags
METHOD = "knn+msp"
#: the kNN distance alone (versions trained before :data:`METHOD`, heads with a hidden layer)
KNN_METHOD = "knn-cosine"
#: share of a label's training photos taken as k (Sun et al.'s k / images per class), fixed a priori
K_FRACTION = 0.01
#: largest k
MAX_K = 50
#: share of known calibration photos that pass (at most 1 point of top-1 lost per 100 photos)
PASS_RATE = 0.99
#: fewer validation photos than this: the training photos' leave-one-out scores are added for
#: calibration (99 photos are the fewest for which a 99% conformal quantile exists)
MIN_CALIBRATION_IMAGES = 100
#: most training photos kept in the file (float16: 1,280 features -> 51 MB at this bound)
MAX_BANK = 20_000


def embed(feats: np.ndarray) -> np.ndarray:
    """One unit vector per photo from its bottlenecks.

    Args:
        feats: float ``(N, V, D)`` (V eval crops) or ``(N, D)`` bottlenecks.

    Returns:
        float32 ``(N, D)``: each view L2-normalised, the views averaged, the mean L2-normalised.
    """
    x = _views(feats)
    x = x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    m = x.mean(axis=1)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def _views(feats: np.ndarray) -> np.ndarray:
    x = np.asarray(feats, np.float32)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"bottlenecks must be (N, V, D) or (N, D), not {x.shape}")
    return x


def max_softmax_scores(feats: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """One minus the maximum of the mean softmax over the views of a linear head (Hendrycks and Gimpel).

    Args:
        feats: float ``(N, V, D)`` or ``(N, D)`` bottlenecks.
        kernel: float ``(D, C)`` weights of the head's last (logits) layer; ``bias`` ``(C,)``.

    Returns:
        float64 ``(N,)`` in [0, 1 - 1/C]; computed in float64 so a confident photo's score is not
        rounded to 0.
    """
    x = _views(feats).astype(np.float64)
    logits = x @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)  # (N, V, C)
    z = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs = (z / z.sum(axis=2, keepdims=True)).mean(axis=1)
    return 1.0 - probs.max(axis=1) if len(probs) else np.zeros(0)


def choose_k(train_counts: list[int] | np.ndarray) -> int:
    """k for a training set: :data:`K_FRACTION` of the mean number of training photos per label,
    rounded, within [1, :data:`MAX_K`] (``train_counts``: photos per label; empty labels ignored)."""
    counts = [int(c) for c in train_counts if int(c) > 0]
    if not counts:
        return 1
    return int(min(MAX_K, max(1, round(K_FRACTION * sum(counts) / len(counts)))))


def _conformal_rank(n: int, pass_rate: float) -> int:
    """1-based rank of the conformal threshold among n sorted scores: ``ceil(p (n + 1))``, at most n."""
    if n == 0:
        raise ValueError("no scores to calibrate on")
    if not 0 < pass_rate <= 1:
        raise ValueError("pass_rate must be in (0, 1]")
    return min(n, max(1, math.ceil(pass_rate * (n + 1) - 1e-9)))


def calibrate_threshold(scores: np.ndarray, pass_rate: float = PASS_RATE) -> float:
    """The score a new known photo stays at or under with probability ``pass_rate`` (split conformal).

    Args:
        scores: float ``(N,)`` unknown scores of known photos (the validation split), N >= 1.
        pass_rate: share in (0, 1] that should pass (be called known).

    Returns:
        The ``ceil(pass_rate * (N + 1))``-th smallest score (the largest when that exceeds N), so a
        photo scoring exactly the threshold passes.

    Raises:
        ValueError: no scores, or ``pass_rate`` outside (0, 1].
    """
    s = np.sort(np.asarray(scores, np.float64).ravel())
    return float(s[_conformal_rank(len(s), pass_rate) - 1])


def calibrate_union(far: np.ndarray, near: np.ndarray, pass_rate: float = PASS_RATE) -> tuple[float, float]:
    """Thresholds of two scores of the same known photos such that ``pass_rate`` of them pass both.

    Both thresholds are the j-th smallest value of their own score (a common quantile); j is the
    smallest rank at which at least ``ceil(pass_rate * (N + 1))`` photos (at most N) are at or under
    both thresholds.

    Args:
        far / near: float ``(N,)`` scores of the same N >= 1 photos.
        pass_rate: in (0, 1].

    Returns:
        ``(far_threshold, near_threshold)``.

    Raises:
        ValueError: no photos, different lengths, or ``pass_rate`` outside (0, 1].
    """
    a, b = np.asarray(far, np.float64).ravel(), np.asarray(near, np.float64).ravel()
    if len(a) != len(b):
        raise ValueError(f"{len(a)} far scores but {len(b)} near scores")
    need = _conformal_rank(len(a), pass_rate)
    sa, sb = np.sort(a), np.sort(b)
    lo, hi = need, len(a)  # passing(j) is non-decreasing in j and passing(N) = N
    while lo < hi:
        mid = (lo + hi) // 2
        if int(((a <= sa[mid - 1]) & (b <= sb[mid - 1])).sum()) >= need:
            hi = mid
        else:
            lo = mid + 1
    return float(sa[lo - 1]), float(sb[lo - 1])


#: smallest threshold a score is divided by
_EPS = 1e-12
#: lowest max-softmax threshold: a photo whose top label has at least 1 - this probability is never
#: flagged by the near score (a head can be so sure of its validation photos that 99% of them score
#: 0 in float64, which would flag any photo not equally sure)
MSP_FLOOR = 1e-6


@dataclass
class OpenSet:
    """The open-set scorer of one model version and its thresholds.

    Attributes:
        bank: float32 ``(M, D)`` unit vectors of the training photos (:func:`embed`).
        k: neighbour whose distance is the kNN score (1 <= k <= M).
        threshold: scores above it are "unknown" (None before :meth:`calibrate`); 1.0 for
            :data:`METHOD`, the kNN distance's own threshold for :data:`KNN_METHOD`.
        pass_rate: share of known calibration photos the threshold lets pass.
        kernel / bias: float32 ``(D, C)`` / ``(C,)`` copy of the head's logits layer, or None
            (then the kNN score alone, :data:`KNN_METHOD`).
        knn_threshold / msp_threshold: the two scores' own thresholds (:data:`METHOD`, after
            :meth:`calibrate`).
    """

    bank: np.ndarray
    k: int
    threshold: float | None = None
    pass_rate: float = PASS_RATE
    kernel: np.ndarray | None = None
    bias: np.ndarray | None = None
    knn_threshold: float | None = None
    msp_threshold: float | None = None

    @property
    def method(self) -> str:
        """:data:`METHOD` with a head copy, :data:`KNN_METHOD` without."""
        return METHOD if self.kernel is not None else KNN_METHOD

    @classmethod
    def fit(
        cls,
        train_feats: np.ndarray,
        train_y: np.ndarray,
        *,
        k: int | None = None,
        max_bank: int = MAX_BANK,
        head_weights: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> OpenSet:
        """Build the scorer from the training photos.

        Args:
            train_feats: float ``(N, V, D)`` bottlenecks of the training photos (eval views).
            train_y: int ``(N,)`` their label indices (only used for :func:`choose_k`).
            k: neighbours (default: :func:`choose_k` of the photos per label).
            max_bank: most photos kept (an even, deterministic subsample beyond).
            head_weights: ``(kernel (D, C), bias (C,))`` of a linear head (its logits layer), for
                :data:`METHOD`; None for the kNN score alone.

        Raises:
            ValueError: no training photo, or head weights of the wrong shape.
        """
        if len(train_feats) == 0:
            raise ValueError("no training photos")
        bank = embed(train_feats)
        if len(bank) > max_bank:
            keep = np.linspace(0, len(bank) - 1, max_bank).round().astype(int)
            bank = bank[keep]
        if k is None:
            k = choose_k(np.bincount(np.asarray(train_y, np.int64)))
        kernel = bias = None
        if head_weights is not None:
            kernel, bias = (np.asarray(w, np.float32) for w in head_weights)
            if kernel.ndim != 2 or kernel.shape[0] != bank.shape[1] or bias.shape != (kernel.shape[1],):
                raise ValueError(f"head weights {kernel.shape} / {bias.shape} do not fit {bank.shape[1]} features")
        return cls(bank, max(1, min(k, len(bank))), kernel=kernel, bias=bias)

    def knn_scores(self, feats: np.ndarray) -> np.ndarray:
        """float32 ``(N,)`` in [0, 2]: ``1 - cosine`` to the k-th nearest training photo (``feats``
        ``(N, V, D)`` or ``(N, D)``, the same views as the bank); higher = less like anything trained."""
        q = embed(feats)
        if len(q) == 0:
            return np.zeros(0, np.float32)
        sims = q @ self.bank.T  # (N, M)
        kth = np.partition(sims, -self.k, axis=1)[:, -self.k]
        return np.clip(1.0 - kth, 0.0, 2.0).astype(np.float32)

    def msp_scores(self, feats: np.ndarray) -> np.ndarray:
        """float64 ``(N,)``: :func:`max_softmax_scores` with the stored head copy.

        Raises:
            ValueError: a scorer without a head copy (:data:`KNN_METHOD`).
        """
        if self.kernel is None or self.bias is None:
            raise ValueError("this open-set scorer has no copy of the head")
        return max_softmax_scores(feats, self.kernel, self.bias)

    def _combine(self, knn: np.ndarray, msp: np.ndarray) -> np.ndarray:
        assert self.knn_threshold is not None and self.msp_threshold is not None
        return np.maximum(knn / max(self.knn_threshold, _EPS), msp / max(self.msp_threshold, _EPS)).astype(np.float32)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Unknown scores of ``feats`` (``(N, V, D)`` or ``(N, D)``, the same views as the bank).

        Returns:
            float32 ``(N,)``, higher = less like anything trained. :data:`METHOD` once calibrated:
            ``max(knn / knn_threshold, msp / msp_threshold)`` (> 1 = unknown); otherwise the kNN
            distance (:meth:`knn_scores`).
        """
        if self.kernel is None or self.knn_threshold is None or self.msp_threshold is None:
            return self.knn_scores(feats)
        return self._combine(self.knn_scores(feats), self.msp_scores(feats))

    def leave_one_out_scores(self) -> np.ndarray:
        """float32 ``(M,)``: the kNN score of each bank photo against the others (itself left out:
        the (k+1)-th nearest, its own vector being the nearest), a held-out score per training
        photo without a second split (the jackknife of conformal prediction). Needs M > k."""
        if len(self.bank) <= self.k:
            return np.zeros(0, np.float32)
        sims = self.bank @ self.bank.T
        kth = np.partition(sims, -(self.k + 1), axis=1)[:, -(self.k + 1)]
        return np.clip(1.0 - kth, 0.0, 2.0).astype(np.float32)

    def calibrate_scores(self, knn: np.ndarray, msp: np.ndarray | None = None, pass_rate: float = PASS_RATE) -> float:
        """Set the thresholds from the scores of known photos and return :attr:`threshold`.

        Args:
            knn: float ``(N,)`` kNN scores of known photos (:meth:`knn_scores`, or leave-one-out).
            msp: float ``(N,)`` max-softmax scores of the same photos (:data:`METHOD`; ignored
                without a head copy). Its threshold is at least :data:`MSP_FLOOR`.
            pass_rate: share in (0, 1] to pass.

        Raises:
            ValueError: no scores, lengths differ, a head copy but no ``msp``, or a bad pass rate.
        """
        self.pass_rate = pass_rate
        if self.kernel is None:
            self.threshold = calibrate_threshold(knn, pass_rate)
            return self.threshold
        if msp is None:
            raise ValueError("the combined score needs the max-softmax scores of the calibration photos")
        self.knn_threshold, msp_threshold = calibrate_union(knn, msp, pass_rate)
        self.msp_threshold = max(msp_threshold, MSP_FLOOR)
        self.threshold = 1.0
        return self.threshold

    def calibrate_parts(self, knn: np.ndarray, msp: np.ndarray, pass_rate: float = PASS_RATE) -> float:
        """Set the two thresholds from different known photos (a small store, see :func:`fit_calibrated`)
        and return :attr:`threshold` (1.0).

        Each part gets the conformal threshold for ``1 - (1 - pass_rate) / 2`` of its own scores
        (Bonferroni: at least ``pass_rate`` then pass both); the max-softmax part is not used (its
        threshold infinite) without the photos that quantile needs (``ceil(q (M + 1)) <= M``, 199
        at the default pass rate).

        Args:
            knn: float ``(N,)`` kNN scores of known photos (validation and leave-one-out training).
            msp: float ``(M,)`` max-softmax scores of known photos the head was not trained on.

        Raises:
            ValueError: a scorer without a head copy, no kNN score, or a bad pass rate.
        """
        if self.kernel is None:
            raise ValueError("calibrate_parts needs a head copy; use calibrate_scores")
        each = 1 - (1 - pass_rate) / 2
        self.pass_rate = pass_rate
        self.knn_threshold = calibrate_threshold(knn, each)
        # The softmax part only where its quantile exists (ceil(each (M + 1)) <= M, M >= 199 at the
        # default pass rate): on a few validation photos "the largest score" rejects about 1 in M + 1
        # ordinary known photos that the model is merely unsure of ("I'm not sure" covers those).
        enough = len(msp) and math.ceil(each * (len(msp) + 1) - 1e-9) <= len(msp)
        self.msp_threshold = max(calibrate_threshold(msp, each), MSP_FLOOR) if enough else math.inf
        self.threshold = 1.0
        return self.threshold

    def calibrate(self, val_feats: np.ndarray, pass_rate: float = PASS_RATE) -> float:
        """Set the thresholds from known validation photos (``(N, V, D)``, N >= 1) and return :attr:`threshold`."""
        msp = self.msp_scores(val_feats) if self.kernel is not None else None
        return self.calibrate_scores(self.knn_scores(val_feats), msp, pass_rate)

    def is_unknown(self, scores: np.ndarray) -> np.ndarray:
        """bool ``(N,)``: scores above the threshold (all False while uncalibrated)."""
        s = np.asarray(scores)
        if self.threshold is None:
            return np.zeros(s.shape, bool)
        return s > self.threshold

    def to_bytes(self) -> bytes:
        """The ``.npz`` content (bank as float16)."""
        buf = io.BytesIO()
        arrays: dict[str, np.ndarray] = {
            "bank": self.bank.astype(np.float16),
            "k": np.asarray(self.k, np.int64),
            "threshold": np.asarray(np.nan if self.threshold is None else self.threshold, np.float64),
            "pass_rate": np.asarray(self.pass_rate, np.float64),
            "method": np.asarray(self.method),
        }
        if self.kernel is not None and self.bias is not None:
            arrays["kernel"] = self.kernel.astype(np.float32)
            arrays["bias"] = self.bias.astype(np.float32)
            arrays["knn_threshold"] = np.asarray(np.nan if self.knn_threshold is None else self.knn_threshold, np.float64)
            arrays["msp_threshold"] = np.asarray(np.nan if self.msp_threshold is None else self.msp_threshold, np.float64)
        np.savez(buf, **cast(dict[str, Any], arrays))  # (the stubs read ** as maybe allow_pickle)
        return buf.getvalue()

    def save(self, version_dir: Path) -> int:
        """Write :data:`OPENSET_FILE` in ``version_dir`` (``fs.write_atomic``). Returns its size in bytes."""
        data = self.to_bytes()
        write_atomic(Path(version_dir) / OPENSET_FILE, data, mode=0o644)
        return len(data)


def fit_calibrated(
    train_feats: np.ndarray,
    train_y: np.ndarray,
    val_feats: np.ndarray,
    *,
    head_weights: tuple[np.ndarray, np.ndarray] | None = None,
    pass_rate: float = PASS_RATE,
) -> tuple[OpenSet, str, int]:
    """The scorer of a training run: fitted on the training photos, calibrated on the validation ones.

    With at least :data:`MIN_CALIBRATION_IMAGES` validation photos, both thresholds jointly on them
    (:meth:`OpenSet.calibrate_scores`). With fewer (a small store), the kNN part also on the
    training photos' leave-one-out scores, and the max-softmax part on the validation photos only
    (the head has seen its training photos: their softmax is over-confident), each part at
    ``1 - (1 - pass_rate) / 2`` (:meth:`OpenSet.calibrate_parts`).

    Args:
        train_feats: float ``(N, V, D)`` eval views of the training photos (N >= 1); ``train_y`` ``(N,)``.
        val_feats: float ``(M, V, D)`` eval views of the validation photos (M may be 0).
        head_weights: the head's ``(kernel, bias)`` for :data:`METHOD`, None for the kNN alone.
        pass_rate: share of known photos to pass.

    Returns:
        ``(scorer, calibration, n)``: what it was calibrated on (``"validation"`` or
        ``"validation + training (leave-one-out)"``) and the number of kNN calibration scores.

    Raises:
        ValueError: no training photo, or no photo to calibrate on.
    """
    scorer = OpenSet.fit(train_feats, train_y, head_weights=head_weights)
    knn = scorer.knn_scores(val_feats)
    msp = scorer.msp_scores(val_feats) if head_weights is not None else None
    if len(knn) >= MIN_CALIBRATION_IMAGES:
        scorer.calibrate_scores(knn, msp, pass_rate)
        return scorer, "validation", len(knn)
    loo = scorer.leave_one_out_scores() if len(scorer.bank) == len(train_feats) else np.zeros(0, np.float32)
    if len(knn) + len(loo) == 0:
        raise ValueError("no photos to calibrate the open-set threshold on")
    calibration = "validation + training (leave-one-out)" if len(loo) else "validation"
    knn = np.concatenate([knn, loo])
    if msp is None:
        scorer.calibrate_scores(knn, None, pass_rate)
    else:
        scorer.calibrate_parts(knn, msp, pass_rate)
    return scorer, calibration, len(knn)


def load_open_set(version_dir: Path) -> OpenSet | None:
    """The version's :class:`OpenSet` (:data:`METHOD`, or :data:`KNN_METHOD` as older versions wrote
    it), or None when it has none or it is unusable (logged; the version then serves without the flag)."""
    path = Path(version_dir) / OPENSET_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            method = str(z["method"])
            if method not in (METHOD, KNN_METHOD):
                log.warning("%s: unknown open-set method %s; serving without it", path, method)
                return None
            bank = np.asarray(z["bank"], np.float32)
            threshold = float(z["threshold"])
            k, pass_rate = int(z["k"]), float(z["pass_rate"])
            scorer = OpenSet(bank, k, threshold, pass_rate)
            if method == METHOD:
                scorer.kernel = np.asarray(z["kernel"], np.float32)
                scorer.bias = np.asarray(z["bias"], np.float32)
                scorer.knn_threshold, scorer.msp_threshold = float(z["knn_threshold"]), float(z["msp_threshold"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("%s cannot be read (%s); serving without the unknown-photo check", path, exc)
        return None
    consistent = bank.ndim == 2 and 1 <= k <= len(bank) and not np.isnan(threshold)
    if consistent and scorer.kernel is not None:
        assert scorer.bias is not None and scorer.knn_threshold is not None and scorer.msp_threshold is not None
        consistent = (
            scorer.kernel.shape == (bank.shape[1], len(scorer.bias))
            and not np.isnan(scorer.knn_threshold)
            and not np.isnan(scorer.msp_threshold)
        )
    if not consistent:
        log.warning("%s is inconsistent; serving without the unknown-photo check", path)
        return None
    return scorer
