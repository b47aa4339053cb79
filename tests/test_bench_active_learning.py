"""The selection logic of benchmarks/bench_active_learning.py: the queue's order picks the photos with
the smallest margin first, unknown photos before all, random picks are random, the starting set has
its photos per label. Synthetic probabilities; no training."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from benchmarks.bench_active_learning import choose, queue_order, starting_set, validation_share
from model_store.active_learning import margin_uncertainty


def _probs(rng: np.random.Generator, n: int = 200, c: int = 10) -> np.ndarray:
    logits = rng.normal(scale=3.0, size=(n, c))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_queue_order_picks_the_lowest_margin_photos() -> None:
    rng = np.random.default_rng(0)
    probs = _probs(rng)
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    pool = np.arange(1000, 1200)  # indices into the whole set, not 0..N-1
    picked = choose("margin", pool, 50, rng, probs=probs)
    assert len(set(picked.tolist())) == 50
    expected = pool[np.argsort(margin, kind="stable")[:50]]
    assert set(picked.tolist()) == set(expected.tolist())
    # every picked photo has a margin no larger than every photo left in the pool
    left = np.setdiff1d(pool, picked) - 1000
    assert margin[picked - 1000].max() <= margin[left].min()
    assert list(queue_order(probs)[:5]) == list(np.argsort(-np.array([margin_uncertainty(p) for p in probs]), kind="stable")[:5])


def test_unknown_photos_come_first_then_the_lowest_margin() -> None:
    rng = np.random.default_rng(1)
    probs = _probs(rng, 100)
    probs[7] = np.eye(10)[3] * 0.99 + 0.001  # very sure, but flagged unknown
    unknown = np.zeros(100, bool)
    unknown[[7, 42]] = True
    order = queue_order(probs, unknown)
    assert set(order[:2].tolist()) == {7, 42}
    assert order[0] == 7  # both count as uncertainty 1.0; ties keep the pool's order in queue_order
    picked = choose("queue", np.arange(100), 10, rng, probs=probs, unknown=unknown)
    assert {7, 42} <= set(picked.tolist())
    rest = [i for i in queue_order(probs) if i not in (7, 42)][:8]  # then the lowest margins
    assert set(picked.tolist()) == {7, 42, *rest}
    with pytest.raises(ValueError):
        choose("queue", np.arange(100), 10, rng, probs=probs)


def test_ties_are_broken_in_a_random_arrival_order_not_by_label() -> None:
    """60 unknown photos, pool grouped by label (as the benchmark's indices are): the 50 picked
    among them are not simply the first 50 of the pool."""
    rng = np.random.default_rng(2)
    probs = _probs(rng, 300)
    unknown = np.zeros(300, bool)
    unknown[:60] = True
    picked = choose("queue", np.arange(300), 50, rng, probs=probs, unknown=unknown)
    assert set(picked.tolist()) <= set(range(60))
    assert set(picked.tolist()) != set(range(50))


def test_random_picks_are_distinct_from_the_pool_and_seeded() -> None:
    pool = np.arange(500, 900)
    a = choose("random", pool, 50, np.random.default_rng(3))
    b = choose("random", pool, 50, np.random.default_rng(3))
    c = choose("random", pool, 50, np.random.default_rng(4))
    assert (a == b).all() and set(a.tolist()) != set(c.tolist())
    assert len(set(a.tolist())) == 50 and set(a.tolist()) <= set(pool.tolist())
    assert len(choose("random", pool[:5], 50, np.random.default_rng(0))) == 5  # never more than the pool
    with pytest.raises(ValueError):
        choose("margin", pool, 5, np.random.default_rng(0))
    with pytest.raises(ValueError):
        choose("alphabetical", pool, 5, np.random.default_rng(0), probs=np.zeros((400, 2)))


def test_starting_set_has_its_photos_per_label_and_validation_is_a_tenth() -> None:
    y = np.repeat(np.arange(4), [30, 30, 30, 6])
    pool = np.arange(len(y))
    start = starting_set(y, pool, 10, np.random.default_rng(0))
    assert np.bincount(y[start]).tolist() == [10, 10, 10, 6]
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    share = validation_share(shas).mean()
    assert 0.07 < share < 0.13
