""""None of my labels" (model_store.openset): calibration, the score on real photos, a full
retrain -> classify that flags a photo of a label never taught, older versions, the CLI fields and
the bot's reply."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from bot.classifying import format_predictions, reply_text, unknown_text
from model_store.bottlenecks import BottleneckCache
from model_store.classifier import Classifier, Predictions
from model_store.images import decode_image
from model_store.openset import (
    KNN_METHOD,
    MAX_K,
    METHOD,
    MSP_FLOOR,
    OPENSET_FILE,
    PASS_RATE,
    OpenSet,
    calibrate_threshold,
    calibrate_union,
    choose_k,
    fit_calibrated,
    load_open_set,
    max_softmax_scores,
)
from model_store.training import TrainConfig
from model_store.workspace import Workspace
from tests.auxil.bot_harness import TRAIN_PER_LABEL, TRAINED_LABELS, USER, bot_config, photos, running_bot
from tests.auxil.modelstore import TrainedStore, clothing_photos, json_lines, run_cli
from tests.botapi_standin import BotApiStandIn

#: labels of tests/data/clothing that the ``trained_store`` fixture never saw, unlike its three
UNSEEN = ("hat", "skirt", "dress")


# ------------------------------------------------------------------------------ synthetic features
def test_threshold_is_the_conformal_quantile_of_known_scores() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(200, dtype=np.float64))
    thr = calibrate_threshold(scores, 0.95)
    assert thr == 190.0  # the ceil(0.95 * 201) = 191st smallest of 200
    assert calibrate_threshold(scores) == 198.0  # 99% (default): the ceil(0.99 * 201) = 199th
    assert PASS_RATE == 0.99
    # fewer than 99 photos: no 99% quantile exists; the largest score is the threshold
    assert calibrate_threshold(np.arange(50.0)) == 49.0
    assert calibrate_threshold(np.array([0.3]), 0.95) == 0.3
    with pytest.raises(ValueError):
        calibrate_threshold(np.array([]))
    with pytest.raises(ValueError):
        calibrate_threshold(scores, 0.0)


def test_conformal_threshold_lets_99_percent_of_new_known_photos_pass() -> None:
    """Over many draws of 250 calibration scores, a fresh known score passes 99% of the time on
    average (the split-conformal guarantee); the empirical 99% quantile used before would give
    less (it is the 248th of 250, not the 249th)."""
    rng = np.random.default_rng(7)
    passed = [rng.normal() <= calibrate_threshold(rng.normal(size=250)) for _ in range(20_000)]
    assert np.mean(passed) >= 0.989


def _clusters(seed: int = 1, n: int = 600, dim: int = 64):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    y = np.repeat(np.arange(3), n // 3)
    feats = (centres[y] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)[:, None, :]  # (N, 1, D)
    kernel, bias = (0.2 * centres.T).astype(np.float32), np.zeros(3, np.float32)  # logits = 0.2 x . centre
    return rng, centres, y, feats, (kernel, bias)


def test_calibrated_knn_scorer_passes_its_rate_of_known_and_flags_a_far_cluster() -> None:
    rng, _, y, feats, _ = _clusters()
    train, val = np.arange(600) % 2 == 0, np.arange(600) % 2 == 1
    scorer = OpenSet.fit(feats[train], y[train], k=10)
    assert scorer.k == 10 and scorer.method == KNN_METHOD
    scorer.calibrate(feats[val], 0.95)
    passed = ~scorer.is_unknown(scorer.score(feats[val]))
    assert passed.mean() == pytest.approx(0.95, abs=0.005)
    far = (rng.normal(size=(1, 64)) + 0.3 * rng.normal(size=(50, 64))).astype(np.float32)
    assert scorer.is_unknown(scorer.score(far)).mean() > 0.9


def test_union_thresholds_let_the_rate_pass_both_scores() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=500), rng.normal(size=500)
    ta, tb = calibrate_union(a, b, 0.99)
    passing = (a <= ta) & (b <= tb)
    assert passing.sum() >= np.ceil(0.99 * 501)
    # the same quantile of each score: as many photos at or under each threshold
    assert (a <= ta).sum() == (b <= tb).sum()
    # and the smallest such: one rank lower lets too few pass
    sa, sb = np.sort(a), np.sort(b)
    j = int((a <= ta).sum())
    assert ((a <= sa[j - 2]) & (b <= sb[j - 2])).sum() < np.ceil(0.99 * 501)
    assert calibrate_union(a, a, 0.99) == (calibrate_threshold(a, 0.99),) * 2  # one score twice: as alone
    with pytest.raises(ValueError):
        calibrate_union(a, b[:10])


def test_combined_score_flags_a_far_photo_and_one_the_head_cannot_tell_apart() -> None:
    """The served method (kNN + max-softmax): a photo far from everything is flagged by the kNN
    part; a photo right between two labels, which the kNN distance alone passes (its like was
    trained on), is flagged by the softmax part. 99% of known validation photos pass."""
    rng, centres, y, feats, weights = _clusters()
    between = ((centres[0] + centres[1]) / 2 + 0.05 * rng.normal(size=(8, 64))).astype(np.float32)[:, None, :]
    train, val = np.arange(600) % 2 == 0, np.arange(600) % 2 == 1
    train_feats = np.concatenate([feats[train], between[:4]])  # taught: some photos look like it...
    train_y = np.concatenate([y[train], [0, 1, 0, 1]])  # ... and the labels disagree
    scorer = OpenSet.fit(train_feats, train_y, k=2, head_weights=weights)
    assert scorer.method == METHOD
    assert scorer.calibrate(feats[val]) == 1.0
    assert scorer.knn_threshold is not None and scorer.msp_threshold is not None
    s_val = scorer.score(feats[val])
    assert (~scorer.is_unknown(s_val)).mean() >= 0.99
    # the unknown score is the larger of the two scores, each over its own threshold
    np.testing.assert_allclose(
        s_val,
        np.maximum(scorer.knn_scores(feats[val]) / scorer.knn_threshold, scorer.msp_scores(feats[val]) / scorer.msp_threshold),
        rtol=1e-5,
    )
    far = (rng.normal(size=(1, 64)) + 0.3 * rng.normal(size=(20, 64))).astype(np.float32)
    assert scorer.is_unknown(scorer.score(far)).all()
    held_between = between[4:]
    knn_alone = OpenSet.fit(train_feats, train_y, k=2)
    knn_alone.calibrate(feats[val])
    assert not knn_alone.is_unknown(knn_alone.score(held_between)).any()  # the kNN distance misses them
    assert scorer.is_unknown(scorer.score(held_between)).all()


def test_a_small_store_calibrates_the_softmax_part_on_validation_photos_only() -> None:
    """Under MIN_CALIBRATION_IMAGES validation photos: the kNN part also on the training photos'
    leave-one-out scores, the softmax part on the validation photos alone (the head was trained on
    the others: their softmax is over-confident), each at 1 - (1 - 0.99) / 2 (Bonferroni); the
    softmax part only with the 199 validation photos that quantile needs."""
    _, _, y, feats, weights = _clusters(6, 90, 32)
    train, val = np.arange(90) % 3 != 0, np.arange(90) % 3 == 0  # 60 training, 30 validation photos
    scorer, calibration, n = fit_calibrated(feats[train], y[train], feats[val], head_weights=weights)
    assert calibration == "validation + training (leave-one-out)" and n == 90
    knn_all = np.concatenate([scorer.knn_scores(feats[val]), scorer.leave_one_out_scores()])
    assert scorer.knn_threshold == calibrate_threshold(knn_all, 0.995) == knn_all.max()  # 90 < 199 photos
    # 30 validation photos: too few for the softmax part's 99.5% quantile, which is not used
    assert scorer.msp_threshold == np.inf
    assert not scorer.is_unknown(scorer.score(feats[val])).any()
    # with enough of them (199 at 99.5%), the softmax part gets its conformal threshold
    _, _, y2, feats2, weights2 = _clusters(6, 420, 32)
    train2, val2 = np.arange(420) % 2 == 0, np.arange(420) % 2 == 1  # 210 training, 210 validation photos
    scorer2 = OpenSet.fit(feats2[train2], y2[train2], head_weights=weights2)
    msp2 = scorer2.msp_scores(feats2[val2])
    scorer2.calibrate_parts(scorer2.knn_scores(feats2[val2]), msp2)
    assert scorer2.msp_threshold == max(calibrate_threshold(msp2, 0.995), MSP_FLOOR) < np.inf
    # no validation photo at all: the softmax part is not used, the kNN part is as alone
    alone, calibration, _ = fit_calibrated(feats[train], y[train], feats[:0], head_weights=weights)
    assert alone.msp_threshold == np.inf and calibration == "validation + training (leave-one-out)"
    np.testing.assert_allclose(alone.score(feats), alone.knn_scores(feats) / alone.knn_threshold, rtol=1e-6)
    # enough validation photos: both jointly on them
    big = np.arange(600) % 2 == 1
    _, _, y2, feats2, w2 = _clusters(1)
    _, calibration, n = fit_calibrated(feats2[~big], y2[~big], feats2[big], head_weights=w2)
    assert (calibration, n) == ("validation", 300)
    with pytest.raises(ValueError):
        fit_calibrated(feats[:1], y[:1], feats[:0], head_weights=weights)  # 1 photo, k = 1: nothing held out


def test_max_softmax_score_is_one_minus_the_mean_softmax_top_probability() -> None:
    feats = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)  # one photo, two crops
    kernel, bias = np.array([[2.0, 0.0], [0.0, 2.0]], np.float32), np.zeros(2, np.float32)
    p = np.exp(2) / (np.exp(2) + 1)
    # crop 1 says label 0 with p, crop 2 label 1 with p: the mean is 50/50
    assert max_softmax_scores(feats, kernel, bias)[0] == pytest.approx(0.5)
    assert max_softmax_scores(feats[:, :1], kernel, bias)[0] == pytest.approx(1 - p)
    with pytest.raises(ValueError):
        OpenSet.fit(feats, np.zeros(1, int), head_weights=(kernel[:1], bias))


def test_k_is_about_one_percent_of_a_labels_training_photos() -> None:
    assert choose_k([230] * 9) == 2
    assert choose_k([6, 6, 6]) == 1 and choose_k([]) == 1
    assert choose_k([100_000] * 3) == MAX_K
    feats = np.random.default_rng(2).normal(size=(13, 2, 8)).astype(np.float32)
    assert OpenSet.fit(feats, np.array([0] * 10 + [1] * 3)).k == 1
    assert OpenSet.fit(feats, np.zeros(13, int), k=50).k == 13  # never more than the photos


def test_open_set_file_round_trip_and_unusable_files(tmp_path: Path) -> None:
    _, _, y, feats, weights = _clusters(3, 120, 16)
    scorer = OpenSet.fit(feats[:80], y[:80], k=5, head_weights=weights)
    scorer.calibrate(feats[80:])
    size = scorer.save(tmp_path)
    assert size == (tmp_path / OPENSET_FILE).stat().st_size
    loaded = load_open_set(tmp_path)
    assert loaded is not None and loaded.method == METHOD and loaded.k == 5
    assert (loaded.threshold, loaded.knn_threshold, loaded.msp_threshold) == (1.0, scorer.knn_threshold, scorer.msp_threshold)
    np.testing.assert_allclose(loaded.score(feats), scorer.score(feats), rtol=0.02)  # float16 bank
    assert (loaded.is_unknown(loaded.score(feats)) == scorer.is_unknown(scorer.score(feats))).mean() > 0.97
    assert load_open_set(tmp_path / "absent") is None
    (tmp_path / OPENSET_FILE).write_bytes(b"not a zip")
    assert load_open_set(tmp_path) is None
    # a combined file without its head copy is unusable, not half-loaded
    buf = io.BytesIO()
    np.savez(buf, bank=scorer.bank.astype(np.float16), k=np.int64(5), threshold=np.float64(1.0),
             pass_rate=np.float64(0.99), method=np.str_(METHOD))
    (tmp_path / OPENSET_FILE).write_bytes(buf.getvalue())
    assert load_open_set(tmp_path) is None


def test_a_version_written_before_the_combined_score_still_loads_as_knn(tmp_path: Path) -> None:
    """openset.npz as the previous release wrote it (kNN alone, 95% pass): served as it was."""
    feats = np.random.default_rng(5).normal(size=(40, 2, 16)).astype(np.float32)
    bank = OpenSet.fit(feats, np.zeros(40, int), k=3).bank
    buf = io.BytesIO()
    np.savez(buf, bank=bank.astype(np.float16), k=np.int64(3), threshold=np.float64(0.25),
             pass_rate=np.float64(0.95), method=np.str_("knn-cosine"))
    (tmp_path / OPENSET_FILE).write_bytes(buf.getvalue())
    old = load_open_set(tmp_path)
    assert old is not None and old.method == KNN_METHOD == "knn-cosine"
    assert (old.threshold, old.pass_rate, old.kernel) == (0.25, 0.95, None)
    scores = old.score(feats)
    np.testing.assert_allclose(scores, old.knn_scores(feats))
    assert (old.is_unknown(scores) == (scores > 0.25)).all()


# ------------------------------------------------------------------------------------ real photos
@pytest.mark.slow
def test_a_label_left_out_scores_higher_than_known_photos(clothing_store: TrainedStore, backbone) -> None:
    """Leave each of the 10 clothing labels out in turn (6 photos per known label fitted, the other
    2 held out): the left-out label's photos score higher than the held-out known ones, on average."""
    ws = Workspace(clothing_store.root)
    records = ws.store.snapshot()
    labels = sorted({r.label for r in records})
    cache = BottleneckCache(ws.bottleneck_dir, backbone)  # filled by the fixture's training
    feats, failed = cache.get([(r.sha256, r.path) for r in records], views=TrainConfig().eval_views())
    assert not failed
    y = np.array([labels.index(r.label) for r in records])
    rank = np.zeros(len(y), int)
    for c in range(len(labels)):
        rank[y == c] = np.arange((y == c).sum())
    gaps = []
    for u in range(len(labels)):
        fit = (y != u) & (rank < 6)
        held = (y != u) & (rank >= 6)
        scorer = OpenSet.fit(feats[fit], y[fit])
        gaps.append(scorer.score(feats[y == u]).mean() - scorer.score(feats[held]).mean())
    assert np.mean(gaps) > 0, gaps


# ------------------------------------------------------------------- retrain -> classify, serving
@pytest.mark.slow
def test_retrain_stores_the_threshold_and_classify_flags_a_label_never_taught(trained_store: Path) -> None:
    ws = Workspace(trained_store)
    version = ws.registry.current()
    assert version is not None
    info = version.metrics["open_set"]
    assert info["method"] == METHOD
    assert info["threshold"] == 1.0 and 0 < info["knn_threshold"] < 2
    # a small store (validation photos far fewer than the 199 the softmax part's quantile needs)
    assert info["msp_threshold"] is None and info["calibration"] == "validation + training (leave-one-out)"
    assert info["pass_rate"] == PASS_RATE
    assert 0 <= info["test_rejected"] <= info["test_images"] == version.metrics["test_images"]
    assert info["file_bytes"] == (version.path / OPENSET_FILE).stat().st_size
    # float16 vectors of the training photos and a float32 copy of the head's last layer: bounded
    # by the number of photos and labels, not the model
    dim, labels = version.metrics["backbone"]["feature_dim"], len(version.labels)
    assert info["file_bytes"] < info["bank_images"] * dim * 2 + (dim + 1) * labels * 4 + 4096

    clf = Classifier(ws.registry)
    unseen = [decode_image(p.read_bytes()) for label in UNSEEN for p in clothing_photos()[label][:4]]
    known = [decode_image(p.read_bytes()) for label in TRAINED_LABELS for p in photos(label)[:TRAIN_PER_LABEL]]
    out_unseen, out_known = clf.classify(unseen), clf.classify(known)
    for pred in out_unseen + out_known:
        assert isinstance(pred, Predictions) and pred.unknown_score is not None
        assert pred.unknown == (pred.unknown_score > info["threshold"])
        assert pred[0][0] in TRAINED_LABELS  # the labels are still given
    flagged_unseen = np.mean([p.unknown for p in out_unseen])
    flagged_known = np.mean([p.unknown for p in out_known])
    assert flagged_unseen >= 0.5, [p.unknown_score for p in out_unseen]
    assert flagged_known <= 0.1, [p.unknown_score for p in out_known]  # photos it was trained on
    assert np.mean([p.unknown_score for p in out_unseen]) > np.mean([p.unknown_score for p in out_known])
    text = reply_text(next(p for p in out_unseen if p.unknown), 0.5)
    assert text.startswith("This doesn't look like anything I've been taught")
    assert all(label in text for label in TRAINED_LABELS)


@pytest.mark.slow
def test_a_version_without_open_set_data_still_classifies_without_the_flag(store_copy: Path) -> None:
    ws = Workspace(store_copy)
    version = ws.registry.current()
    assert version is not None
    (version.path / OPENSET_FILE).unlink()
    (pred,) = Classifier(ws.registry).classify([decode_image(photos("shoes")[TRAIN_PER_LABEL].read_bytes())])
    assert pred.unknown is None and pred.unknown_score is None
    assert pred[0][0] == "shoes"
    assert reply_text(pred, 0.0) == format_predictions(pred, 0.0)


@pytest.mark.slow
def test_classify_json_has_unknown_and_its_score(store_copy: Path, tmp_path: Path) -> None:
    hat = clothing_photos()["hat"][0]
    shoe = photos("shoes")[0]
    proc = run_cli("classify", shoe, hat, "--store_dir", store_copy, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    known, unseen = json_lines(proc.stdout)
    threshold = Workspace(store_copy).registry.current().metrics["open_set"]["threshold"]  # type: ignore[union-attr]
    for obj in (known, unseen):
        assert isinstance(obj["unknown"], bool) and isinstance(obj["unknown_score"], float)
        assert obj["unknown"] == (obj["unknown_score"] > threshold)
    assert known["unknown"] is False and known["labels"][0]["label"] == "shoes"
    assert unseen["unknown_score"] > known["unknown_score"]

    old = tmp_path / "old"  # a version trained before open-set data existed: null, not an error
    shutil.copytree(store_copy, old, symlinks=True)
    current = Workspace(old).registry.current()
    assert current is not None
    (current.path / OPENSET_FILE).unlink()
    proc = run_cli("classify", shoe, "--store_dir", old, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (obj,) = json_lines(proc.stdout)
    assert obj["unknown"] is None and obj["unknown_score"] is None and obj["labels"]


# ------------------------------------------------------------------------------------ bot wording
def test_unknown_reply_names_the_labels_and_the_closest_one() -> None:
    pred = Predictions([("shoes", 0.6), ("pants", 0.3)], unknown=True, unknown_score=0.5, threshold=0.3,
                       labels=["pants", "shoes", "t-shirt"])
    text = reply_text(pred, 0.5)
    assert text == (
        "This doesn't look like anything I've been taught (my labels: pants, shoes, t-shirt). "
        "If it is one of them, the closest are:\nshoes — 60%\npants — 30%"
    )
    # known but uncertain keeps "I'm not sure"; no open-set data: as before
    unsure = Predictions([("shoes", 0.4), ("pants", 0.3)], unknown=False, unknown_score=0.1, threshold=0.3)
    assert reply_text(unsure, 0.5).startswith("I'm not sure")
    assert reply_text([("shoes", 0.9)], 0.5) == format_predictions([("shoes", 0.9)], 0.5)
    many = unknown_text([("a0", 0.2)], [f"a{i}" for i in range(20)])
    assert "and 8 more" in many


@pytest.mark.slow
async def test_the_bot_answers_a_photo_of_a_label_never_taught_politely(botapi: BotApiStandIn, store_copy: Path) -> None:
    """Over HTTP against the stand-in: a hat (the model knows shoes, pants, t-shirt) gets the
    open-set reply; a held-out shoe photo still gets its labels."""
    async with running_bot(botapi, bot_config(botapi, store_copy)) as bot:
        hat = bot.send_photo(USER, clothing_photos()["hat"][0])
        shoe = bot.send_photo(USER, photos("shoes")[TRAIN_PER_LABEL])
        hat_text, shoe_text = await bot.reply_text(USER, hat), await bot.reply_text(USER, shoe)
    assert hat_text.startswith("This doesn't look like anything I've been taught (my labels: pants, shoes, t-shirt)."), hat_text
    assert "If it is one of them, the closest are:" in hat_text and " — " in hat_text.splitlines()[1]
    assert shoe_text.splitlines()[0].startswith("shoes — "), shoe_text
