"""Classifier.prepare: preprocessing off the model thread gives the same answers, and survives a version change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model_store.classifier import Classifier, Prepared
from model_store.images import decode_image
from tests.auxil.modelstore import TrainedStore, copy_store

PHOTOS = sorted((Path(__file__).parent / "data" / "clothing").glob("*/*.jpg"))[:6]


def test_prepared_images_classify_like_raw_images(clothing_store: TrainedStore, tmp_path: Path) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    clf = Classifier(ws.registry, max_batch=4)
    rgbs = [decode_image(p.read_bytes()) for p in PHOTOS]
    prepared = [clf.prepare(p.read_bytes()) for p in PHOTOS]
    crops = ws.registry.current().metrics["preprocessing"]["crop_fractions"]
    assert all(isinstance(p, Prepared) for p in prepared)
    assert prepared[0].inputs.shape == (len(crops), 224, 224, 3) and prepared[0].inputs.dtype == np.float32
    direct = clf.classify(rgbs, top_k=3)
    via_prepare = clf.classify(prepared, top_k=3)
    for a, b in zip(direct, via_prepare, strict=True):
        assert [lab for lab, _ in a] == [lab for lab, _ in b]
        np.testing.assert_allclose([p for _, p in a], [p for _, p in b], rtol=1e-4, atol=1e-6)


def test_a_stale_prepared_image_is_prepared_again_for_the_new_version(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    clf = Classifier(ws.registry)
    photo = PHOTOS[0].read_bytes()
    stale = clf.prepare(photo)
    # A "new version" that evaluates a single crop: same weights, different preprocessing.
    current = ws.registry.current()
    metrics_path = current.path / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["preprocessing"]["crop_fractions"] = [1.0]
    name, tmp = ws.registry.new_version_dir()
    for f in current.path.iterdir():
        if f.is_file():
            (tmp / f.name).write_bytes(f.read_bytes())
    (tmp / "metrics.json").write_text(json.dumps(metrics))
    ws.registry.promote(ws.registry.commit(name, tmp))
    (fresh,) = clf.classify([decode_image(photo)], top_k=2)
    (again,) = clf.classify([stale], top_k=2)
    assert clf.version == name
    assert stale.inputs.shape[0] != 1  # it was made for the two-crop version
    assert [lab for lab, _ in again] == [lab for lab, _ in fresh]
    np.testing.assert_allclose([p for _, p in again], [p for _, p in fresh], rtol=1e-4, atol=1e-6)


def test_a_version_that_cannot_load_leaves_the_serving_one_answering(
    clothing_store: TrainedStore, tmp_path: Path, caplog
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    clf = Classifier(ws.registry)
    photo = decode_image(PHOTOS[0].read_bytes())
    (before,) = clf.classify([photo])
    good = clf.version
    current = ws.registry.current()
    name, tmp = ws.registry.new_version_dir()
    for f in current.path.iterdir():
        if f.is_file():
            (tmp / f.name).write_bytes(f.read_bytes())
    (tmp / "model.keras").write_bytes(b"this is not a keras file")
    ws.registry.promote(ws.registry.commit(name, tmp))
    for _ in range(3):
        (after,) = clf.classify([photo])
        assert after == before
    assert clf.version == good
    assert sum("could not be loaded" in r.getMessage() for r in caplog.records) == 1
    ws.registry.rollback()
    (again,) = clf.classify([photo])
    assert again == before and clf.version == good


def test_a_prepared_large_photo_keeps_only_a_small_copy(clothing_store: TrainedStore, tmp_path: Path) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    clf = Classifier(ws.registry)
    small = decode_image(PHOTOS[1].read_bytes())
    big = np.repeat(np.repeat(small, 20, axis=0), 20, axis=1)  # ~3200 px on the longer side
    prepared = clf.prepare(big)
    assert max(prepared.rgb.shape[:2]) == 1024 and prepared.rgb.dtype == np.uint8
    (direct,) = clf.classify([big], top_k=1)
    (queued,) = clf.classify([prepared], top_k=1)
    assert direct[0][0] == queued[0][0]
