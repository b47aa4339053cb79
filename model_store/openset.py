""""None of my labels": how far a photo's bottleneck is from every photo the model was trained on.

Open-set recognition beside the softmax. The softmax always spreads 100% over the known labels, so
a photo of something never taught still gets one of them; the score here measures instead how
unlike the training photos it is in the backbone's feature space:

* method: k-nearest-neighbour distance on L2-normalised bottlenecks (Sun, Ming, Zhu and Li,
  "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022): the score of a photo is
  ``1 - cos`` to its k-th nearest training photo (0 = identical direction, 2 = opposite). It needs
  no training, no assumption on the shape of the classes, and works with a handful of photos per
  label. It was chosen over class-conditional Mahalanobis distance with a shared covariance (Lee
  et al., NeurIPS 2018) and the maximum softmax probability (Hendrycks and Gimpel, ICLR 2017) by
  leaving each label of the dev photos out in turn (``benchmarks/bench_open_set.py``, figures in
  docs/open_set.md);
* views: each of the version's eval crops is L2-normalised, the crops are averaged and the mean
  normalised again (one vector per photo, for the training photos and the served ones alike);
* k: a rule fixed a priori from Sun et al.'s choices (k = 50 for CIFAR-10's 5,000 training images
  per class, k = 10 for ImageNet subsampled to 1%, ~13 per class): about 1% of a label's training
  photos (:data:`K_FRACTION` of the mean count per label, at least 1, at most
  :data:`MAX_K`; 2 for the ~230 photos per label of the dev set, 1 for a small store). A k near a
  label's own photo count would make a label with few photos "far" from itself;
* threshold: calibrated at training time on the validation split, the score below which
  :data:`PASS_RATE` (95%) of known validation photos fall (the usual "TPR 95%" operating point of
  the papers above); above it a photo is "unknown". With fewer than
  :data:`MIN_CALIBRATION_IMAGES` validation photos (a small store: 3 validation photos make the
  threshold their maximum, which a quarter of new known photos exceed) the leave-one-out scores of
  the training photos (:meth:`OpenSet.leave_one_out_scores`) are added to them.

What a version stores (:data:`OPENSET_FILE`, written through :mod:`model_store.fs`): the training
photos' normalised vectors as float16 (at most :data:`MAX_BANK` of them, an even subsample beyond:
Sun et al. also subsample), k and the threshold: 2,600 photos x 1,280 features x 2 bytes = 6.7 MB.
A version without the file (trained before this module) serves without the flag.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store.fs import write_atomic

__all__ = [
    "K_FRACTION",
    "MAX_K",
    "MAX_BANK",
    "METHOD",
    "MIN_CALIBRATION_IMAGES",
    "OPENSET_FILE",
    "PASS_RATE",
    "OpenSet",
    "calibrate_threshold",
    "choose_k",
    "embed",
    "load_open_set",
]

log = logging.getLogger(__name__)

#: file in a version folder holding the open-set data
OPENSET_FILE = "openset.npz"
#: name of the method in the version's metrics
METHOD = "knn-cosine"
#: share of a label's training photos taken as k (Sun et al.'s k / images per class), fixed a priori
K_FRACTION = 0.01
#: largest k
MAX_K = 50
#: share of known validation photos under the threshold
PASS_RATE = 0.95
#: fewer validation photos than this: the training photos' leave-one-out scores are added for calibration
MIN_CALIBRATION_IMAGES = 50
#: most training photos kept in the file (float16: 1,280 features -> 51 MB at this bound)
MAX_BANK = 20_000


def embed(feats: np.ndarray) -> np.ndarray:
    """One unit vector per photo from its bottlenecks.

    Args:
        feats: float ``(N, V, D)`` (V eval crops) or ``(N, D)`` bottlenecks.

    Returns:
        float32 ``(N, D)``: each view L2-normalised, the views averaged, the mean L2-normalised.
    """
    x = np.asarray(feats, np.float32)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3:
        raise ValueError(f"bottlenecks must be (N, V, D) or (N, D), not {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    m = x.mean(axis=1)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def choose_k(train_counts: list[int] | np.ndarray) -> int:
    """k for a training set: :data:`K_FRACTION` of the mean number of training photos per label,
    rounded, within [1, :data:`MAX_K`] (``train_counts``: photos per label; empty labels ignored)."""
    counts = [int(c) for c in train_counts if int(c) > 0]
    if not counts:
        return 1
    return int(min(MAX_K, max(1, round(K_FRACTION * sum(counts) / len(counts)))))


def calibrate_threshold(scores: np.ndarray, pass_rate: float = PASS_RATE) -> float:
    """The score under which ``pass_rate`` of the known photos ``scores`` fall.

    Args:
        scores: float ``(N,)`` unknown scores of known photos (the validation split), N >= 1.
        pass_rate: share in (0, 1] that should pass (be called known).

    Returns:
        The smallest observed score with at least ``ceil(pass_rate * N)`` scores at or below it
        (``numpy.quantile`` with ``method="inverted_cdf"``): the empirical quantile, so a photo
        scoring exactly the threshold passes.

    Raises:
        ValueError: no scores, or ``pass_rate`` outside (0, 1].
    """
    s = np.asarray(scores, np.float64).ravel()
    if s.size == 0:
        raise ValueError("no scores to calibrate on")
    if not 0 < pass_rate <= 1:
        raise ValueError("pass_rate must be in (0, 1]")
    return float(np.quantile(s, pass_rate, method="inverted_cdf"))


@dataclass
class OpenSet:
    """The kNN scorer of one model version and its threshold.

    Attributes:
        bank: float32 ``(M, D)`` unit vectors of the training photos (:func:`embed`).
        k: neighbour whose distance is the score (1 <= k <= M).
        threshold: scores above it are "unknown" (None before :meth:`calibrate`).
        pass_rate: share of known validation photos the threshold lets pass.
    """

    bank: np.ndarray
    k: int
    threshold: float | None = None
    pass_rate: float = PASS_RATE

    @classmethod
    def fit(
        cls, train_feats: np.ndarray, train_y: np.ndarray, *, k: int | None = None, max_bank: int = MAX_BANK
    ) -> OpenSet:
        """Build the scorer from the training photos.

        Args:
            train_feats: float ``(N, V, D)`` bottlenecks of the training photos (eval views).
            train_y: int ``(N,)`` their label indices (only used for :func:`choose_k`).
            k: neighbours (default: :func:`choose_k` of the photos per label).
            max_bank: most photos kept (an even, deterministic subsample beyond).

        Raises:
            ValueError: no training photo.
        """
        if len(train_feats) == 0:
            raise ValueError("no training photos")
        bank = embed(train_feats)
        if len(bank) > max_bank:
            keep = np.linspace(0, len(bank) - 1, max_bank).round().astype(int)
            bank = bank[keep]
        if k is None:
            k = choose_k(np.bincount(np.asarray(train_y, np.int64)))
        return cls(bank, max(1, min(k, len(bank))))

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Unknown scores: ``1 - cosine`` similarity to the k-th nearest training photo.

        Args:
            feats: float ``(N, V, D)`` or ``(N, D)`` bottlenecks (the same views as the bank).

        Returns:
            float32 ``(N,)`` in [0, 2]; higher = less like anything trained.
        """
        q = embed(feats)
        if len(q) == 0:
            return np.zeros(0, np.float32)
        sims = q @ self.bank.T  # (N, M)
        kth = np.partition(sims, -self.k, axis=1)[:, -self.k]
        return np.clip(1.0 - kth, 0.0, 2.0).astype(np.float32)

    def leave_one_out_scores(self) -> np.ndarray:
        """float32 ``(M,)``: the score of each bank photo against the others (itself left out:
        the (k+1)-th nearest, its own vector being the nearest), a held-out score per training
        photo without a second split (the jackknife of conformal prediction). Needs M > k."""
        if len(self.bank) <= self.k:
            return np.zeros(0, np.float32)
        sims = self.bank @ self.bank.T
        kth = np.partition(sims, -(self.k + 1), axis=1)[:, -(self.k + 1)]
        return np.clip(1.0 - kth, 0.0, 2.0).astype(np.float32)

    def calibrate(self, val_feats: np.ndarray, pass_rate: float = PASS_RATE) -> float:
        """Set :attr:`threshold` from known validation photos (``(N, V, D)``, N >= 1) and return it."""
        self.pass_rate = pass_rate
        self.threshold = calibrate_threshold(self.score(val_feats), pass_rate)
        return self.threshold

    def is_unknown(self, scores: np.ndarray) -> np.ndarray:
        """bool ``(N,)``: scores above the threshold (all False while uncalibrated)."""
        s = np.asarray(scores)
        if self.threshold is None:
            return np.zeros(s.shape, bool)
        return s > self.threshold

    def to_bytes(self) -> bytes:
        """The ``.npz`` content (bank as float16)."""
        buf = io.BytesIO()
        np.savez(
            buf,
            bank=self.bank.astype(np.float16),
            k=np.int64(self.k),
            threshold=np.float64(np.nan if self.threshold is None else self.threshold),
            pass_rate=np.float64(self.pass_rate),
            method=np.str_(METHOD),
        )
        return buf.getvalue()

    def save(self, version_dir: Path) -> int:
        """Write :data:`OPENSET_FILE` in ``version_dir`` (``fs.write_atomic``). Returns its size in bytes."""
        data = self.to_bytes()
        write_atomic(Path(version_dir) / OPENSET_FILE, data, mode=0o644)
        return len(data)


def load_open_set(version_dir: Path) -> OpenSet | None:
    """The version's :class:`OpenSet`, or None when it has none (an older version) or it is unusable
    (logged; the version then serves without the flag)."""
    path = Path(version_dir) / OPENSET_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["method"]) != METHOD:
                log.warning("%s: unknown open-set method %s; serving without it", path, z["method"])
                return None
            bank = np.asarray(z["bank"], np.float32)
            threshold = float(z["threshold"])
            k, pass_rate = int(z["k"]), float(z["pass_rate"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("%s cannot be read (%s); serving without the unknown-photo check", path, exc)
        return None
    if bank.ndim != 2 or not 1 <= k <= len(bank) or np.isnan(threshold):
        log.warning("%s is inconsistent; serving without the unknown-photo check", path)
        return None
    return OpenSet(bank, k, threshold, pass_rate)
