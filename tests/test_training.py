"""training: the hash split, the softmax head, evaluation and the confusion-matrix plot."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_store.evaluation import Evaluation, evaluate, plot_confusion_matrix
from model_store.training import (
    TESTING,
    TRAINING,
    VALIDATION,
    TrainConfig,
    assign_split,
    hash_percentage,
    softmax,
    train_head,
)

LABELS5 = ["dress", "hat", "pants", "shoes", "skirt"]


def fake_sha(rng: random.Random) -> str:
    return f"{rng.getrandbits(256):064x}"


def sha_at(percentage: float, rng: random.Random) -> str:
    """A fake sha256 whose hash_percentage is ``percentage`` (to within 1e-12)."""
    prefix = f"{int(percentage / 100.0 * 16**15):015x}"
    return prefix + f"{rng.getrandbits(49 * 4):049x}"


def natural_split(sha: str, val: float, test: float) -> str:
    """retrain.py's which_set rule alone, without forced picks."""
    p = hash_percentage(sha)
    return TESTING if p < test else VALIDATION if p < test + val else TRAINING


def make_items(n: int, labels: list[str], seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(fake_sha(rng), labels[rng.randrange(len(labels))]) for _ in range(n)]


# -------------------------------------------------------------------------------- hash split
def test_hash_percentage_range_and_examples() -> None:
    assert hash_percentage("0" * 64) == 0.0
    assert 99.9999 < hash_percentage("f" * 64) <= 100.0  # 1 - 2**-60 rounds to 1.0 in float64
    assert hash_percentage("8" + "0" * 63) == pytest.approx(50.0)
    rng = random.Random(1)
    for p in (0.5, 9.99, 10.01, 37.0, 99.5):
        assert hash_percentage(sha_at(p, rng)) == pytest.approx(p, abs=1e-9)


def test_assign_split_is_deterministic_and_order_independent() -> None:
    items = make_items(500, LABELS5, seed=7)
    a, ex_a = assign_split(items, validation_percentage=10, testing_percentage=10)
    b, ex_b = assign_split(list(items), validation_percentage=10, testing_percentage=10)
    assert a == b and ex_a == ex_b
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    c, _ = assign_split(shuffled, validation_percentage=10, testing_percentage=10)
    by_sha = dict(zip((s for s, _ in shuffled), c, strict=True))
    assert [by_sha[s] for s, _ in items] == a
    assert set(a) <= {TRAINING, VALIDATION, TESTING}


def test_split_is_stable_when_images_are_added() -> None:
    rng = random.Random(11)
    # 5 labels, 500 images; two of them small, so forced picks really happen
    sizes = {"dress": 200, "hat": 150, "pants": 138, "shoes": 6, "skirt": 6}
    items = [(fake_sha(rng), label) for label, n in sizes.items() for _ in range(n)]
    assert len(items) == 500
    val, test = 10.0, 10.0
    before, _ = assign_split(items, validation_percentage=val, testing_percentage=test)
    more = [(fake_sha(rng), LABELS5[rng.randrange(5)]) for _ in range(200)]
    after, _ = assign_split(items + more, validation_percentage=val, testing_percentage=test)

    forced_before = {i for i, (s, _) in enumerate(items) if before[i] != natural_split(s, val, test)}
    forced_after = {i for i, (s, _) in enumerate(items) if after[i] != natural_split(s, val, test)}
    moved = {i for i in range(len(items)) if before[i] != after[i]}
    # only forced picks (of the old or the new split) may change split ...
    assert moved <= forced_before | forced_after
    # ... and there are at most two forced picks (one test, one validation) per label per split
    for forced, splits in ((forced_before, before), (forced_after, after)):
        per_label = collections.Counter(items[i][1] for i in forced)
        assert all(n <= 2 for n in per_label.values()), per_label
        assert all(splits[i] in (TESTING, VALIDATION) for i in forced)
    # every image of a big label (no forced pick needed there) keeps its split
    for i, (_, label) in enumerate(items):
        if sizes[label] >= 100:
            assert before[i] == after[i]
    assert len(moved) <= 4


@pytest.mark.parametrize("seed", range(5))
def test_every_label_with_enough_images_gets_validation_and_test_images(seed: int) -> None:
    rng = random.Random(seed)
    items = []
    for k in range(12):  # labels of 5..16 images, plus some below the minimum
        n = 2 + k
        items += [(fake_sha(rng), f"label{k:02d}") for _ in range(n)]
    splits, excluded = assign_split(
        items, validation_percentage=10, testing_percentage=10, min_images_per_label=5
    )
    assert excluded == ["label00", "label01", "label02"]  # 2, 3 and 4 images
    by_label: dict[str, list[str]] = collections.defaultdict(list)
    for (_, label), s in zip(items, splits, strict=True):
        by_label[label].append(s)
    for label, ss in by_label.items():
        if label in excluded:
            assert set(ss) == {"excluded"}
        else:
            assert TESTING in ss and VALIDATION in ss and TRAINING in ss, (label, ss)


@pytest.mark.parametrize(
    ("name", "percentages"),
    [
        # by hash: 4 validation images and 1 training image -> the test split gets nothing
        ("4 validation + 1 training", [12.0, 13.0, 14.0, 15.0, 50.0]),
        # by hash: all 5 in the test split -> no validation and no training image at all
        ("5 testing", [1.0, 2.0, 3.0, 4.0, 5.0]),
        # by hash: 3 testing + 2 validation -> no training image for the label
        ("3 testing + 2 validation", [1.0, 2.0, 3.0, 12.0, 13.0]),
    ],
)
def test_small_label_whose_hashes_cluster_still_gets_every_split(name: str, percentages: list[float]) -> None:
    """Documented: "every label with enough images has at least one validation and one test image"
    (and min_images_per_label=5 "gives each label a training, validation and test image")."""
    rng = random.Random(5)
    items = [(sha_at(p, rng), "rare") for p in percentages]
    items += [(fake_sha(rng), "common") for _ in range(40)]
    splits, excluded = assign_split(
        items, validation_percentage=10, testing_percentage=10, min_images_per_label=5
    )
    assert excluded == []
    rare = collections.Counter(s for (_, label), s in zip(items, splits, strict=True) if label == "rare")
    assert rare[TESTING] >= 1 and rare[VALIDATION] >= 1 and rare[TRAINING] >= 1, f"{name}: {dict(rare)}"


def test_labels_below_the_minimum_are_excluded_and_listed() -> None:
    rng = random.Random(2)
    items = [(fake_sha(rng), "big") for _ in range(30)]
    items += [(fake_sha(rng), "Zebra") for _ in range(3)]
    items += [(fake_sha(rng), "apple") for _ in range(4)]
    items += [(fake_sha(rng), "ok") for _ in range(5)]
    splits, excluded = assign_split(
        items, validation_percentage=10, testing_percentage=10, min_images_per_label=5
    )
    assert excluded == ["apple", "Zebra"]  # sorted by label_key (case-insensitive)
    for (_, label), s in zip(items, splits, strict=True):
        assert (s == "excluded") == (label in ("apple", "Zebra"))
    # min_images_per_label=1 excludes nothing
    _, none = assign_split(items, validation_percentage=10, testing_percentage=10, min_images_per_label=1)
    assert none == []


@pytest.mark.parametrize(("val", "test"), [(10, 10), (15, 15), (20, 5), (0, 25), (30, 0)])
def test_percentages_are_roughly_respected(val: float, test: float) -> None:
    items = make_items(2000, LABELS5, seed=int(val * 100 + test))
    splits, _ = assign_split(items, validation_percentage=val, testing_percentage=test)
    counts = collections.Counter(splits)
    assert abs(100 * counts[TESTING] / 2000 - test) <= 3
    assert abs(100 * counts[VALIDATION] / 2000 - val) <= 3
    assert abs(100 * counts[TRAINING] / 2000 - (100 - val - test)) <= 3


def test_zero_percentages_still_give_each_label_one_test_and_one_validation_image() -> None:
    items = make_items(100, LABELS5, seed=4)
    splits, _ = assign_split(items, validation_percentage=0, testing_percentage=0)
    counts = collections.Counter((label, s) for (_, label), s in zip(items, splits, strict=True))
    for label in LABELS5:
        assert counts[(label, TESTING)] == 1 and counts[(label, VALIDATION)] == 1
    # the forced picks are the training images with the smallest hash
    for label in LABELS5:
        idx = sorted((hash_percentage(s), i) for i, (s, lab) in enumerate(items) if lab == label)
        assert {splits[idx[0][1]], splits[idx[1][1]]} == {TESTING, VALIDATION}


@pytest.mark.parametrize(
    ("val", "test"), [(-1, 10), (10, -0.5), (100, 0), (0, 100), (60, 50), (50, 50), (150, 10)]
)
def test_bad_percentages_raise_value_error(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="percentages"):
        assign_split(make_items(10, LABELS5, 0), validation_percentage=val, testing_percentage=test)


# --------------------------------------------------------------------------------- evaluation
def _probs(pred: list[int], c: int, top: float = 0.7) -> np.ndarray:
    out = np.full((len(pred), c), (1 - top) / (c - 1), np.float32)
    out[np.arange(len(pred)), pred] = top
    return out


def test_evaluate_known_confusion_matrix() -> None:
    labels = ["cat", "dog", "fox"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = [0, 0, 0, 1, 1, 1, 0, 2, 1, 2]
    probs = _probs(pred, 3)
    probs[3, 1] = 0.9  # a confident mistake
    shas = [f"{i:064x}" for i in range(10)]
    paths = [f"/store/images/{labels[t]}/{s}.jpg" for t, s in zip(y_true, shas, strict=True)]
    ev = evaluate(probs, y_true, labels, sha256s=shas, paths=paths)
    assert isinstance(ev, Evaluation)
    assert ev.confusion_matrix == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
    assert ev.labels == labels and ev.count == 10
    assert ev.accuracy == pytest.approx(0.7)
    cat, dog, fox = (ev.per_label[x] for x in labels)
    assert cat["precision"] == pytest.approx(3 / 4) and cat["recall"] == pytest.approx(3 / 4)
    assert dog["precision"] == pytest.approx(2 / 4) and dog["recall"] == pytest.approx(2 / 3)
    assert fox["precision"] == pytest.approx(1.0) and fox["recall"] == pytest.approx(2 / 3)
    assert dog["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert [d["support"] for d in (cat, dog, fox)] == [4, 3, 3]
    assert ev.misclassified == [
        {
            "sha256": shas[3],
            "path": paths[3],
            "label": "cat",
            "predicted": "dog",
            "probability": pytest.approx(0.9),
        },
        {
            "sha256": shas[6],
            "path": paths[6],
            "label": "dog",
            "predicted": "cat",
            "probability": pytest.approx(0.7),
        },
        {
            "sha256": shas[8],
            "path": paths[8],
            "label": "fox",
            "predicted": "dog",
            "probability": pytest.approx(0.7),
        },
    ]
    json.dumps(ev.to_dict())  # JSON-safe


def test_evaluate_never_predicted_label_and_missing_ids() -> None:
    labels = ["a", "b", "c"]
    y_true = np.array([0, 1, 2, 2])
    ev = evaluate(_probs([0, 0, 0, 0], 3), y_true, labels)
    assert ev.accuracy == pytest.approx(0.25)
    assert ev.per_label["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert ev.per_label["a"]["precision"] == pytest.approx(0.25) and ev.per_label["a"]["recall"] == 1.0
    assert [m["sha256"] for m in ev.misclassified] == [None, None, None]
    assert [m["path"] for m in ev.misclassified] == [None, None, None]


def test_evaluate_perfect_and_empty() -> None:
    labels = ["x", "y"]
    ev = evaluate(_probs([1, 0, 1], 2), np.array([1, 0, 1]), labels)
    assert ev.accuracy == 1.0 and ev.misclassified == []
    assert all(v["f1"] == 1.0 for v in ev.per_label.values())
    empty = evaluate(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), labels)
    assert empty.accuracy == 0.0 and empty.count == 0 and empty.confusion_matrix == [[0, 0], [0, 0]]
    assert empty.per_label["x"]["support"] == 0


def test_softmax_rows_sum_to_one_and_are_stable() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0], [-5.0, -5.0, -5.0]])
    p = softmax(logits)
    assert p.dtype == np.float32 and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0], atol=1e-6)
    assert p[0].argmax() == 2


# DejaVu Sans has no emoji: matplotlib warns and draws a box for them; the PNG is still written.
@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
@pytest.mark.parametrize("labels", [["cat", "dog", "fox"], [f"label {i} Розы 👗" for i in range(25)]])
def test_plot_confusion_matrix_writes_a_valid_png(tmp_path: Path, labels: list[str]) -> None:
    c = len(labels)
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, c, 60)
    pred = np.where(rng.random(60) < 0.7, y_true, rng.integers(0, c, 60))
    ev = evaluate(_probs(list(pred), c), y_true, labels)
    out = tmp_path / "cm.png"
    assert plot_confusion_matrix(ev, out, title="v1: test") == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width >= 300 and im.height >= 300
        w = im.width
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]  # no temp file left
    if c > 10:
        assert w > 1000  # the figure grows with the number of labels


# ------------------------------------------------------------------------------- head training
def _blobs(n_per: int, c: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (c, d))
    y = np.repeat(np.arange(c), n_per)
    x = centers[y] + rng.normal(0, 0.5, (len(y), d))
    return x.astype(np.float32), y.astype(np.int64)


@pytest.mark.slow
def test_train_head_learns_separable_bottlenecks() -> None:
    x, y = _blobs(40, 4, 32, seed=0)
    vx, vy = _blobs(10, 4, 32, seed=0)
    cfg = TrainConfig(epochs=40, hidden_units=0, dropout=0.0, learning_rate=1e-2)
    epochs_seen: list[tuple[int, int]] = []
    head, history = train_head(x, y, vx, vy, 4, cfg, on_epoch=lambda e, n: epochs_seen.append((e, n)))
    logits = np.asarray(head(vx, training=False))
    assert logits.shape == (40, 4)
    assert (logits.argmax(1) == vy).mean() >= 0.95
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert history["loss"][-1] < history["loss"][0]
    assert epochs_seen[0] == (1, 40) and [e for e, _ in epochs_seen] == list(range(1, len(epochs_seen) + 1))


def test_train_head_steps_override_epochs_and_no_validation_set() -> None:
    x, y = _blobs(32, 4, 16, seed=1)  # 128 examples
    cfg = TrainConfig(
        how_many_training_steps=10, train_batch_size=64, hidden_units=8, early_stopping_patience=50
    )
    head, history = train_head(x, y, np.zeros((0, 16), np.float32), np.zeros(0, np.int64), 4, cfg)
    assert len(history["loss"]) == 5  # ceil(10 steps * 64 / 128 examples)
    assert "val_loss" not in history
    assert [layer.name for layer in head.layers if layer.name in ("hidden", "logits")] == ["hidden", "logits"]


def test_train_config_to_dict_is_json_safe() -> None:
    cfg = TrainConfig(validation_percentage=12.5, crop_fractions=(0.875, 1.0), summaries_dir=None)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["validation_percentage"] == 12.5 and d["crop_fractions"] == [0.875, 1.0]
    assert set(d) == set(TrainConfig.__dataclass_fields__)
    # train views: every crop (and its mirror when flipping); eval views: one per crop
    flip = TrainConfig(crop_fractions=(0.875, 1.0), flip_left_right=True)
    assert flip.train_views() == ["crop875", "crop875-flip", "crop1000", "crop1000-flip"]
    assert flip.eval_views() == ["crop875", "crop1000"]
    assert TrainConfig(crop_fractions=(0.875,), flip_left_right=False).train_views() == ["crop875"]


@pytest.mark.parametrize(("val", "test"), [(-1, 10), (100, 0), (60, 50), (50, 50)])
def test_retrain_and_assign_split_refuse_bad_percentages_with_one_check(tmp_path, val: float, test: float) -> None:
    """One check (training.split_percentages_problem): the chat text from retrain, the ValueError of assign_split."""
    from model_store.pipeline import retrain
    from model_store.training import split_percentages_problem
    from model_store.workspace import Workspace

    problem = split_percentages_problem(val, test)
    assert problem == (
        f"validation_percentage ({val:g}) and testing_percentage ({test:g}) must each be in 0..100 "
        "and add up to less than 100."
    )
    report = retrain(Workspace(tmp_path / "store"), TrainConfig(validation_percentage=val, testing_percentage=test))
    assert report.status == "failed" and report.message == problem
    with pytest.raises(ValueError, match="percentages") as info:
        assign_split(make_items(10, LABELS5, 0), validation_percentage=val, testing_percentage=test)
    assert problem in str(info.value)
    assert split_percentages_problem(10, 10) is None
