""""None of my labels" (model_store.openset): calibration, the score on real photos, a full
retrain -> classify that flags a photo of a label never taught, older versions, the CLI fields and
the bot's reply."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bot.classifying import format_predictions, reply_text, unknown_text
from model_store.bottlenecks import BottleneckCache
from model_store.classifier import Classifier, Predictions
from model_store.images import decode_image
from model_store.openset import MAX_K, OPENSET_FILE, OpenSet, calibrate_threshold, choose_k, load_open_set
from model_store.training import TrainConfig
from model_store.workspace import Workspace
from tests.auxil.bot_harness import TRAIN_PER_LABEL, TRAINED_LABELS, USER, bot_config, photos, running_bot
from tests.auxil.modelstore import TrainedStore, clothing_photos, json_lines, run_cli
from tests.botapi_standin import BotApiStandIn

#: labels of tests/data/clothing that the ``trained_store`` fixture never saw, unlike its three
UNSEEN = ("hat", "skirt", "dress")


# ------------------------------------------------------------------------------ synthetic features
def test_threshold_is_the_empirical_quantile_of_known_scores() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(200, dtype=np.float64))
    thr = calibrate_threshold(scores, 0.95)
    assert thr == 189.0  # the 190th smallest of 200: exactly 95% at or below it
    assert (scores <= thr).mean() == pytest.approx(0.95)
    assert calibrate_threshold(np.array([0.3]), 0.95) == 0.3
    with pytest.raises(ValueError):
        calibrate_threshold(np.array([]))
    with pytest.raises(ValueError):
        calibrate_threshold(scores, 0.0)


def test_calibrated_scorer_passes_95_percent_of_known_and_flags_a_far_cluster() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 64))
    y = np.repeat(np.arange(3), 200)
    feats = (centres[y] + 0.3 * rng.normal(size=(600, 64))).astype(np.float32)[:, None, :]  # (N, 1, D)
    train, val = np.arange(600) % 2 == 0, np.arange(600) % 2 == 1
    scorer = OpenSet.fit(feats[train], y[train], k=10)
    assert scorer.k == 10
    scorer.calibrate(feats[val])
    passed = ~scorer.is_unknown(scorer.score(feats[val]))
    assert passed.mean() == pytest.approx(0.95, abs=0.005)
    far = (rng.normal(size=(1, 64)) + 0.3 * rng.normal(size=(50, 64))).astype(np.float32)
    assert scorer.is_unknown(scorer.score(far)).mean() > 0.9


def test_k_is_about_one_percent_of_a_labels_training_photos() -> None:
    assert choose_k([230] * 9) == 2
    assert choose_k([6, 6, 6]) == 1 and choose_k([]) == 1
    assert choose_k([100_000] * 3) == MAX_K
    feats = np.random.default_rng(2).normal(size=(13, 2, 8)).astype(np.float32)
    assert OpenSet.fit(feats, np.array([0] * 10 + [1] * 3)).k == 1
    assert OpenSet.fit(feats, np.zeros(13, int), k=50).k == 13  # never more than the photos


def test_open_set_file_round_trip_and_unusable_files(tmp_path: Path) -> None:
    feats = np.random.default_rng(3).normal(size=(40, 2, 16)).astype(np.float32)
    scorer = OpenSet.fit(feats, np.zeros(40, int), k=5)
    scorer.calibrate(feats[:10])
    size = scorer.save(tmp_path)
    assert size == (tmp_path / OPENSET_FILE).stat().st_size
    loaded = load_open_set(tmp_path)
    assert loaded is not None and loaded.k == 5 and loaded.threshold == scorer.threshold
    np.testing.assert_allclose(loaded.score(feats), scorer.score(feats), atol=2e-3)  # float16 bank
    assert load_open_set(tmp_path / "absent") is None
    (tmp_path / OPENSET_FILE).write_bytes(b"not a zip")
    assert load_open_set(tmp_path) is None


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
    assert info["method"] == "knn-cosine"
    assert 0 < info["threshold"] < 2
    assert info["pass_rate"] == 0.95
    assert 0 <= info["test_rejected"] <= info["test_images"] == version.metrics["test_images"]
    assert info["file_bytes"] == (version.path / OPENSET_FILE).stat().st_size
    # float16 vectors of the training photos: bounded by the number of photos, not the model
    assert info["file_bytes"] < info["bank_images"] * version.metrics["backbone"]["feature_dim"] * 2 + 4096

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
