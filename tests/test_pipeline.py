"""End to end: retrain -> version on disk -> gate -> promote -> classify; rollback, prune, failures, crashes.

Real TensorFlow, the shipped backbone, the 80 clothing photos. The trained stores come from
``tests.auxil.modelstore`` (built once per session, read-only); tests that change a store work on
a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_store.classifier import Classifier
from model_store.errors import ImageDecodeError, NoModelError
from model_store.images import decode_image
from model_store.pipeline import retrain
from model_store.registry import ModelRegistry
from model_store.training import TRAINING, assign_split
from model_store.workspace import Workspace
from tests.auxil import modelstore as fx
from tests.auxil.modelstore import (
    BASE_CONFIG,
    CASES,
    PYTHON,
    REPO,
    TrainedStore,
    cli_env,
    clothing_labels,
    clothing_photos,
    copy_store,
    train_config,
)

STAGES = ["bottlenecks", "training", "evaluating", "saving"]


def _pointer(ws: Workspace) -> dict:
    return json.loads(ws.registry.pointer_path().read_text(encoding="utf-8"))


def _tmp_entries(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.registry.root.iterdir() if p.name.startswith(".tmp-"))


def _assert_versions_complete(ws: Workspace) -> None:
    for v in ws.registry.versions():
        assert not v.name.startswith(".")
        for f in ("model.keras", "head.keras", "labels.txt", "metrics.json", "confusion_matrix.png"):
            assert (v.path / f).is_file(), f"{v.name} is visible but has no {f}"


def _shoes_photo() -> Path:
    return clothing_photos()["shoes"][0]


# ---------------------------------------------------------------------------------- round trip
def test_retrain_promotes_and_writes_a_complete_version(clothing_store: TrainedStore) -> None:
    report = clothing_store.report
    ws = Workspace(clothing_store.root)
    assert report.status == "promoted"
    assert report.version and report.version in report.message
    current = ws.registry.current()
    assert current is not None and current.name == report.version
    assert _pointer(ws) == {"version": report.version, "history": []}

    vdir = ws.registry.root / report.version
    for f in ("model.keras", "head.keras", "labels.txt", "metrics.json", "confusion_matrix.png"):
        assert (vdir / f).is_file() and (vdir / f).stat().st_size > 0, f
    assert _tmp_entries(ws) == []

    labels = (vdir / "labels.txt").read_text(encoding="utf-8").splitlines()
    metrics = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
    assert labels == metrics["labels"] == current.labels == clothing_labels()
    assert metrics == json.loads(json.dumps(report.metrics))
    assert metrics["version"] == report.version
    assert metrics["backbone"]["id"] == fx.shared_backbone().id
    assert metrics["bottleneck_cache"] == {"computed": 80, "cached": 0, "corrupt": 0}
    assert metrics["test_images"] + metrics["train_images"] + metrics["validation_images"] == 80
    assert metrics["images_per_label"] == {label: 8 for label in labels}
    assert set(metrics["per_label"]) == set(labels)
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == metrics["test_images"]
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert metrics["gate"] == {"passed": True, "reasons": [], "comparison": None}
    assert metrics["config"]["epochs"] == BASE_CONFIG["epochs"]
    assert metrics["preprocessing"]["mode"] == "center_crop"
    assert metrics["preprocessing"]["crop_fractions"] == list(train_config().crop_fractions)
    assert report.excluded_labels == [] and report.skipped_images == []
    assert f"{metrics['accuracy']:.1%}" in report.message

    assert report.confusion_png == vdir / "confusion_matrix.png"
    with Image.open(report.confusion_png) as im:
        assert im.format == "PNG"
        im.load()
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["status"] == "promoted" and d["confusion_png"] == str(vdir / "confusion_matrix.png")


def test_retrain_reports_progress_in_stage_order(clothing_store: TrainedStore) -> None:
    events = clothing_store.events
    stages = [s for s, _, _ in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == STAGES
    bottlenecks = [(d, n) for s, d, n in events if s == "bottlenecks"]
    assert bottlenecks[0] == (0, 80) and bottlenecks[-1] == (80, 80)
    training = [(d, n) for s, d, n in events if s == "training"]
    assert training[0] == (1, BASE_CONFIG["epochs"])
    assert [d for d, _ in training] == list(range(1, len(training) + 1))
    assert len(training) == clothing_store.report.metrics["epochs_run"]
    assert events[-1] == ("saving", 1, 1)


@pytest.mark.slow
def test_classifier_serves_the_trained_model(clothing_store: TrainedStore) -> None:
    ws = Workspace(clothing_store.root)
    clf = Classifier(ws.registry)
    assert clf.version == clothing_store.version
    assert clf.labels == clothing_labels()

    photos = clothing_photos()
    files = [(label, p) for label, ps in photos.items() for p in ps]
    results = clf.classify([p.read_bytes() for _, p in files], top_k=10)
    assert len(results) == 80
    for row in results:
        probs = [p for _, p in row]
        assert len(row) == 10 and {lab for lab, _ in row} == set(clothing_labels())
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs)
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)

    top1 = [row[0][0] == label for (label, _), row in zip(files, results, strict=True)]
    # shoes look like nothing else in the set: every shoe photo is recognised
    assert all(ok for (label, _), ok in zip(files, top1, strict=True) if label == "shoes")
    # the training split is (almost) memorised, and most of all 80 photos are right
    recs = ws.store.snapshot()
    splits, _ = assign_split(
        [(r.sha256, r.label) for r in recs],
        validation_percentage=BASE_CONFIG["validation_percentage"],
        testing_percentage=BASE_CONFIG["testing_percentage"],
        min_images_per_label=BASE_CONFIG["min_images_per_label"],
    )
    split_of = {r.sha256: s for r, s in zip(recs, splits, strict=True)}
    in_training = [split_of[hashlib.sha256(p.read_bytes()).hexdigest()] == TRAINING for _, p in files]
    train_hits = [ok for ok, t in zip(top1, in_training, strict=True) if t]
    assert len(train_hits) >= 40
    assert sum(train_hits) >= 0.95 * len(train_hits), f"{sum(train_hits)}/{len(train_hits)} training photos"
    assert sum(top1) >= 0.75 * 80, f"only {sum(top1)}/80 photos right"


def test_classifier_inputs_top_k_and_errors(clothing_store: TrainedStore) -> None:
    clf = Classifier(Workspace(clothing_store.root).registry)
    data = _shoes_photo().read_bytes()
    (from_bytes,) = clf.classify([data], top_k=3)
    (from_array,) = clf.classify([decode_image(data)], top_k=3)
    assert len(from_bytes) == 3 and from_bytes[0][0] == "shoes"
    assert [lab for lab, _ in from_array] == [lab for lab, _ in from_bytes]
    np.testing.assert_allclose([p for _, p in from_array], [p for _, p in from_bytes], atol=1e-5)
    assert len(clf.classify([data], top_k=100)[0]) == 10  # capped at the number of labels
    assert len(clf.classify([data], top_k=0)[0]) == 1
    assert clf.classify([]) == []
    with pytest.raises(ImageDecodeError):
        clf.classify([data, (CASES / "text.jpg").read_bytes()])
    # more images than one forward pass holds (each image is several crops)
    photos = [p.read_bytes() for label in ("shoes", "hat", "pants") for p in clothing_photos()[label][:3]]
    whole = clf.classify(photos, top_k=10)
    for max_batch in (1, 3, 4):
        small = Classifier(Workspace(clothing_store.root).registry, max_batch=max_batch)
        split = small.classify(photos, top_k=10)
        for a, b in zip(whole, split, strict=True):
            assert [lab for lab, _ in a] == [lab for lab, _ in b]
            np.testing.assert_allclose([p for _, p in a], [p for _, p in b], atol=1e-5)


def test_classifier_handles_every_readable_case_file(clothing_store: TrainedStore) -> None:
    clf = Classifier(Workspace(clothing_store.root).registry)
    rows = [line.split("\t") for line in (CASES / "cases.tsv").read_text().splitlines()[1:] if line.strip()]
    readable = [name for name, _, expected in rows if expected == "classify"]
    assert len(readable) >= 10
    results = clf.classify([(CASES / name).read_bytes() for name in readable], top_k=2)
    for name, row in zip(readable, results, strict=True):
        assert len(row) == 2 and row[0][1] >= row[1][1], name
        assert row[0][0] in clothing_labels()
    for name in (name for name, _, expected in rows if expected == "error"):
        with pytest.raises(ImageDecodeError):
            clf.classify([(CASES / name).read_bytes()])


def test_classifier_before_any_model_raises_no_model_error(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    clf = Classifier(registry)
    assert clf.version is None and clf.labels == []
    with pytest.raises(NoModelError) as err:
        clf.classify([np.zeros((8, 8, 3), np.uint8)])
    assert err.value.message
    # a pointer naming a version that does not exist, or garbage in the pointer: still no model
    registry.pointer_path().write_text(json.dumps({"version": "20990101-000000-abcdef", "history": []}))
    with pytest.raises(NoModelError):
        clf.classify([np.zeros((8, 8, 3), np.uint8)])
    registry.pointer_path().write_text("{not json")
    with pytest.raises(NoModelError):
        Classifier(registry).classify([np.zeros((8, 8, 3), np.uint8)])
    assert registry.versions() == []


# ------------------------------------------------------------------------ cache reuse, versions
def test_second_retrain_reuses_every_bottleneck(clothing_store_v2: TrainedStore) -> None:
    first, second = clothing_store_v2.reports
    assert second.status == "promoted"
    assert second.metrics["bottleneck_cache"] == {"computed": 0, "cached": 80, "corrupt": 0}
    bottleneck_events = [(d, n) for s, d, n in clothing_store_v2.events if s == "bottlenecks"]
    assert bottleneck_events == [(0, 0)]
    ws = Workspace(clothing_store_v2.root)
    v1, v2 = clothing_store_v2.versions
    assert v1 == first.version and v2 == second.version and v1 != v2
    assert [v.name for v in ws.registry.versions()] == [v1, v2]
    assert _pointer(ws) == {"version": v2, "history": [v1]}
    comparison = second.metrics["gate"]["comparison"]
    assert comparison["version"] == v1 and comparison["images"] == second.metrics["test_images"]
    assert second.metrics["store_fingerprint"] == first.metrics["store_fingerprint"]
    _assert_versions_complete(ws)


@pytest.mark.slow
def test_gate_accuracy_floor_refuses_and_the_old_model_keeps_serving(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    clf = Classifier(ws.registry)
    assert clf.version == clothing_store.version
    pointer_before = ws.registry.pointer_path().read_bytes()

    report = retrain(ws, train_config(accuracy_floor=1.01), backbone=fx.shared_backbone())
    assert report.status == "refused"
    assert "below the floor of 101.0%" in report.message
    assert "not promoted" in report.message and "current model keeps serving" in report.message
    assert ws.registry.pointer_path().read_bytes() == pointer_before
    assert ws.registry.current().name == clothing_store.version
    # the refused version is on disk, complete, and not serving
    assert report.version in [v.name for v in ws.registry.versions()]
    assert report.version != clothing_store.version
    assert ws.registry.get(report.version).metrics["gate"]["passed"] is False
    _assert_versions_complete(ws)
    # the running classifier still serves the old version
    assert clf.reload_if_changed() is False
    assert clf.version == clothing_store.version
    assert clf.classify([_shoes_photo().read_bytes()], top_k=1)[0][0][0] == "shoes"


@pytest.mark.slow
def test_gate_accuracy_drop_refuses_with_the_comparison_in_the_reason(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    pointer_before = ws.registry.pointer_path().read_bytes()
    # max_accuracy_drop=-1: the new model would have to beat the serving one by 100 points
    report = retrain(
        ws, train_config(accuracy_floor=0.0, max_accuracy_drop=-1.0), backbone=fx.shared_backbone()
    )
    assert report.status == "refused"
    gate = report.metrics["gate"]
    assert gate["passed"] is False and len(gate["reasons"]) == 1
    reason = gate["reasons"][0]
    comparison = gate["comparison"]
    assert comparison["version"] == clothing_store.version
    assert comparison["images"] == report.metrics["test_images"]
    assert f"below the serving model's {comparison['current_accuracy']:.1%}" in reason
    assert f"scores {comparison['new_accuracy']:.1%}" in reason
    assert "allowed drop -100.0%" in reason
    assert reason in report.message
    assert ws.registry.pointer_path().read_bytes() == pointer_before


def test_rollback_is_picked_up_by_a_running_classifier(
    clothing_store_v2: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store_v2.root, tmp_path / "store")
    v1, v2 = clothing_store_v2.versions
    clf = Classifier(ws.registry)
    assert clf.version == v2
    assert clf.classify([_shoes_photo().read_bytes()], top_k=1)[0][0][0] == "shoes"

    back = ws.registry.rollback()
    assert back.name == v1
    assert ws.registry.current().name == v1
    assert _pointer(ws) == {"version": v1, "history": []}
    assert clf.version == v1  # no restart needed
    assert clf.classify([_shoes_photo().read_bytes()], top_k=1)[0][0][0] == "shoes"

    with pytest.raises(NoModelError) as err:
        ws.registry.rollback()
    assert "no earlier model version" in err.value.message
    assert ws.registry.current().name == v1

    ws.registry.promote(ws.registry.get(v2))
    assert clf.version == v2
    assert _pointer(ws) == {"version": v2, "history": [v1]}


@pytest.mark.slow
def test_prune_keeps_keep_versions_plus_the_rollback_target(
    clothing_store_v2: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store_v2.root, tmp_path / "store")
    v1, v2 = clothing_store_v2.versions
    (ws.registry.root / ".tmp-20000101-000000-dead00").mkdir()
    (ws.registry.root / ".tmp-20000101-000000-dead00" / "head.keras").write_bytes(b"partial")
    (ws.registry.root / ".tmp-pointer").write_text("{}")

    report = retrain(ws, train_config(max_accuracy_drop=1.0, keep_versions=1), backbone=fx.shared_backbone())
    assert report.status == "promoted"
    v3 = report.version
    # keep_versions=1: the newest (serving) version, plus its rollback target v2; v1 is deleted
    assert [v.name for v in ws.registry.versions()] == [v2, v3]
    assert not (ws.registry.root / v1).exists()
    assert _tmp_entries(ws) == []
    assert _pointer(ws)["version"] == v3 and _pointer(ws)["history"][0] == v2
    assert ws.registry.prune(1) == []
    assert ws.registry.rollback().name == v2  # the rollback target survived
    _assert_versions_complete(ws)


@pytest.mark.slow
def test_an_unreadable_file_placed_by_hand_is_skipped_and_reported(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    """Operators may edit the label folders by hand; a broken file there must not stop training."""
    root = tmp_path / "store"
    shutil.copytree(clothing_store.root, root)
    junk = (CASES / "text.jpg").read_bytes()
    sha = hashlib.sha256(junk).hexdigest()
    (root / "images" / "hat" / f"{sha}.jpg").write_bytes(junk)
    ws = Workspace(root)
    assert sha in {r.sha256 for r in ws.store.snapshot()}
    report = retrain(ws, train_config(max_accuracy_drop=1.0), backbone=fx.shared_backbone())
    assert report.status == "promoted", report.message
    assert report.skipped_images == [(sha, "could not be read")]
    on_disk = ws.registry.get(report.version).metrics
    assert on_disk["skipped_images"] == [[sha, "could not be read"]]
    assert report.metrics["images_per_label"]["hat"] == 8
    assert report.metrics["bottleneck_cache"]["cached"] == 80


# ------------------------------------------------------------------------------------ failures
def _store_from(tmp_path: Path, labels_counts: dict[str, int]) -> Workspace:
    src = tmp_path / "src"
    photos = clothing_photos()
    for label, n in labels_counts.items():
        (src / label).mkdir(parents=True)
        for p in photos[label][:n]:
            shutil.copy(p, src / label / p.name)
    ws = Workspace(tmp_path / "store")
    assert ws.store.import_tree(src).added == sum(labels_counts.values())
    return ws


def test_retrain_with_one_label_fails_cleanly_and_writes_nothing(tmp_path: Path) -> None:
    ws = _store_from(tmp_path, {"hat": 8, "shirt": 3})
    report = retrain(ws, train_config(), backbone=fx.shared_backbone())
    assert report.status == "failed"
    assert "at least 2 labels" in report.message
    assert "I have 1" in report.message and "shirt" in report.message  # the label left out is named
    assert report.version is None and report.metrics == {} and report.confusion_png is None
    assert list(ws.registry.root.iterdir()) == []  # no version, no pointer, no temp folder
    assert not ws.bottleneck_dir.exists()
    d = report.to_dict()
    assert d["status"] == "failed" and json.loads(json.dumps(d)) == d


def test_retrain_of_an_empty_store_fails_cleanly(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "store")
    report = retrain(ws, train_config(), backbone=fx.shared_backbone())
    assert report.status == "failed" and "at least 2 labels" in report.message
    assert ws.registry.current() is None and list(ws.registry.root.iterdir()) == []


def test_retrain_with_an_unloadable_backbone_fails_cleanly(tmp_path: Path) -> None:
    ws = _store_from(tmp_path, {"hat": 5, "shoes": 5})
    report = retrain(ws, train_config(), backbone="no_such_network")
    assert report.status == "failed" and "Unknown backbone" in report.message
    assert list(ws.registry.root.iterdir()) == []


# -------------------------------------------------------------------------------------- crashes
def _start_cli_retrain(store: Path, stderr_path: Path, *extra: str) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "bot", "retrain", "--store_dir", str(store), "--json"]
    cmd += ["--min_images_per_label", "5", "--validation_percentage", "15", "--testing_percentage", "15"]
    cmd += ["--accuracy_floor", "0", "--max_accuracy_drop", "1", *extra]
    cmd += ["--architecture", fx.shared_backbone().name]  # the stores' backbone, so caches are shared
    with open(stderr_path, "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=err, text=True)


def _kill_at(proc: subprocess.Popen, should_kill) -> list[dict]:
    """Read JSON events until ``should_kill(event)`` is true, then SIGKILL the process."""
    events: list[dict] = []
    try:
        for line in proc.stdout:
            events.append(json.loads(line))
            if should_kill(events[-1]):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.stdout.close()
        proc.wait(timeout=120)
    return events


def _cache_files(ws: Workspace) -> list[Path]:
    """Complete bottleneck files (temp files of an interrupted write excluded)."""
    return [p for p in ws.bottleneck_dir.rglob("*.npy") if not p.name.startswith(".tmp-")]


def _some_image_complete(ws: Workspace, n_views: int) -> bool:
    """Whether every one of the ``n_views`` bottleneck files of at least one image is on disk."""
    counts: dict[str, int] = {}
    for f in _cache_files(ws):
        counts[f.stem] = counts.get(f.stem, 0) + 1
    return any(n >= n_views for n in counts.values())


def _assert_old_model_intact(ws: Workspace, old: str) -> None:
    assert _pointer(ws)["version"] == old
    assert ws.registry.current().name == old
    assert [v.name for v in ws.registry.versions()] == [old]
    _assert_versions_complete(ws)
    clf = Classifier(ws.registry)
    assert clf.version == old
    assert clf.classify([_shoes_photo().read_bytes()], top_k=1)[0][0][0] == "shoes"


def _retrain_after_crash(ws: Workspace, old: str) -> None:
    report = retrain(ws, train_config(max_accuracy_drop=1.0), backbone=fx.shared_backbone())
    assert report.status == "promoted", report.message
    assert [v.name for v in ws.registry.versions()] == [old, report.version]
    assert _tmp_entries(ws) == [], "prune did not remove the leftovers of the crashed run"
    assert _pointer(ws) == {"version": report.version, "history": [old]}
    _assert_versions_complete(ws)


@pytest.mark.slow
def test_sigkill_during_training_leaves_the_serving_model_untouched(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    old = clothing_store.version
    # batch size 1 and many epochs: the head trains for seconds (early stopping needs >= 11 epochs),
    # so the kill lands long before anything is written to models/
    proc = _start_cli_retrain(ws.root, tmp_path / "stderr.txt", "--epochs", "1000", "--train_batch_size", "1")
    events = _kill_at(proc, lambda e: e.get("event") == "progress" and e.get("stage") == "training")
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert events[-1]["stage"] == "training"
    assert not any(e.get("event") == "result" for e in events)

    _assert_old_model_intact(Workspace(ws.root), old)
    _retrain_after_crash(Workspace(ws.root), old)


@pytest.mark.slow
def test_sigkill_while_saving_leaves_a_temp_dir_that_prune_removes(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    old = clothing_store.version
    models = ws.registry.root
    leftovers: list[str] = []

    proc = _start_cli_retrain(ws.root, tmp_path / "stderr.txt", "--epochs", "5", "--export_savedmodel")

    def saving_started(event: dict) -> bool:
        if event.get("stage") != "saving":
            return False
        # the version folder is created right after this event; wait until it is there (writing
        # it, with a SavedModel export, takes seconds before the rename), then kill
        while not leftovers and proc.poll() is None:
            leftovers.extend(p.name for p in models.iterdir() if p.name.startswith(".tmp-") and p.is_dir())
            time.sleep(0.002)
        return bool(leftovers)

    events = _kill_at(proc, saving_started)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert events[-1] == {"event": "progress", "stage": "saving", "done": 0, "total": 1}

    ws = Workspace(ws.root)
    assert _tmp_entries(ws) == leftovers and len(leftovers) == 1
    with pytest.raises(NoModelError):
        ws.registry.get(leftovers[0])
    _assert_old_model_intact(ws, old)
    _retrain_after_crash(ws, old)


@pytest.mark.slow
def test_sigkill_while_computing_bottlenecks_keeps_the_finished_ones(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    shutil.rmtree(ws.bottleneck_dir)
    old = clothing_store.version
    n_views = len(train_config().train_views())  # the CLI's default views (crops and mirrors)
    proc = _start_cli_retrain(ws.root, tmp_path / "stderr.txt")

    def some_bottlenecks_stored(event: dict) -> bool:
        if event.get("stage") != "bottlenecks":
            return False
        # the first event is (0, 80); kill once some image has all its views on disk (the views of
        # a batch are written by several threads at once, so n_views files may belong to several images)
        while proc.poll() is None and not _some_image_complete(ws, n_views):
            time.sleep(0.002)
        return proc.poll() is None

    events = _kill_at(proc, some_bottlenecks_stored)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert events[-1] == {"event": "progress", "stage": "bottlenecks", "done": 0, "total": 80}

    ws = Workspace(ws.root)
    _assert_old_model_intact(ws, old)
    by_sha: dict[str, int] = {}
    for f in _cache_files(ws):
        by_sha[f.stem] = by_sha.get(f.stem, 0) + 1
    complete = sum(1 for n in by_sha.values() if n == n_views)  # every view of the image was written
    assert complete >= 1
    report = retrain(ws, train_config(max_accuracy_drop=1.0), backbone=fx.shared_backbone())
    assert report.status == "promoted", report.message
    assert report.metrics["bottleneck_cache"] == {"computed": 80 - complete, "cached": complete, "corrupt": 0}
