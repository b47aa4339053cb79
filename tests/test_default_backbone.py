"""A full retrain -> promote -> classify on the shipped default backbone (EfficientNet-Lite1, 240x240).

The other pipeline tests use the fast shipped Lite0 (``tests.auxil.modelstore``); this one
proves the default works end to end with its own input size. Kept small: 3 labels x 6 photos.
"""

from __future__ import annotations

import numpy as np
import pytest

from model_store.backbones import DEFAULT_BACKBONE, SHIPPED_BACKBONES
from model_store.classifier import Classifier
from model_store.images import decode_image
from model_store.pipeline import retrain
from model_store.workspace import Workspace
from tests.auxil.modelstore import clothing_photos, train_config

LABELS = ("shoes", "pants", "hat")


@pytest.mark.slow
def test_retrain_promote_classify_on_the_default_backbone(tmp_path) -> None:
    assert DEFAULT_BACKBONE == "efficientnet_lite1" and DEFAULT_BACKBONE in SHIPPED_BACKBONES
    photos = clothing_photos()
    ws = Workspace(tmp_path / "store")
    for label in LABELS:
        for p in photos[label][:6]:
            ws.store.add(p.read_bytes(), label, added_by=1, chat_id=1)

    report = retrain(ws, train_config(epochs=20, accuracy_floor=0.0))  # backbone: the default

    assert report.status == "promoted", report.message
    meta = report.metrics["backbone"]
    assert meta["id"].startswith("efficientnet_lite1-imagenet-")
    assert meta["input_size"] == [240, 240]
    current = ws.registry.current()
    assert current is not None and current.name == report.version

    clf = Classifier(ws.registry)
    held_out = [photos[label][7] for label in LABELS]  # never stored, never trained on
    results = clf.classify([decode_image(p.read_bytes()) for p in held_out], top_k=3)
    assert len(results) == 3
    for res in results:
        assert [lab for lab, _ in res] and {lab for lab, _ in res} <= set(LABELS)
        probs = np.array([pr for _, pr in res])
        assert np.all(np.diff(probs) <= 0) and abs(probs.sum() - 1.0) < 1e-4
    # The frozen Lite1 features separate these three garments from 6 examples each.
    assert sum(res[0][0] == label for res, label in zip(results, LABELS, strict=True)) >= 2
