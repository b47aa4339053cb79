"""The LiteRT engine: parity with Keras on real photos, on-disk cache keyed by content, fallback, pruning."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from model_store import engine as engine_module
from model_store.backbones import Backbone, load_backbone
from model_store.bottlenecks import BottleneckCache, make_views
from model_store.classifier import Classifier
from model_store.engine import EngineSettings, open_frozen
from model_store.images import decode_image
from model_store.pipeline import retrain
from model_store.serving import BACKBONE_CACHE_NAME, SERVING_CACHE_NAME, NumpyHead, open_serving_model
from tests.auxil import modelstore as fx
from tests.auxil.modelstore import TrainedStore, clothing_photos, copy_store

TWO = EngineSettings("litert", 2)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _photos(n_per_label: int = 2) -> list[Path]:
    return [p for paths in clothing_photos().values() for p in paths[:n_per_label]]


def _tiny(seed: int = 0, size: int = 32, odd: bool = False) -> keras.Model:
    """A small real feature extractor (N, size, size, 3) 0..255 -> (N, 8); ``odd`` adds an op LiteRT lacks."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3), dtype="float32")
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    if odd:
        x = _BesselI1e()(x)  # tf.math.special.bessel_i1e: no LiteRT builtin for it
    out = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, out)


class _BesselI1e(keras.layers.Layer):
    def call(self, x):
        return tf.math.special.bessel_i1e(x)


def _inputs(n: int = 5, size: int = 32) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------ parity on real photos
@pytest.fixture(scope="module")
def lite0_litert(tmp_path_factory, backbone: Backbone):
    """The shipped backbone converted to LiteRT (its own FrozenModel; the shared backbone is untouched)."""
    return open_frozen(backbone.model, key=backbone.id, cache_dir=tmp_path_factory.mktemp("engine"), settings=TWO)


@pytest.mark.slow
def test_litert_features_match_keras_on_real_photos(backbone: Backbone, lite0_litert) -> None:
    assert lite0_litert.engine == "litert", lite0_litert.description
    assert lite0_litert.description == "LiteRT/XNNPACK, 2 threads"
    rgbs = [decode_image(p.read_bytes()) for p in _photos()]
    batch = np.stack([v for rgb in rgbs for v in make_views(rgb, backbone.input_size, ("crop875", "crop1000"))])
    keras_out = np.concatenate([np.asarray(backbone.model(batch[i : i + 8], training=False)) for i in range(0, len(batch), 8)])
    # several batch sizes, so the interpreter is resized between calls
    for batch_size in (32, 5, 1):
        out = lite0_litert(batch, batch_size=batch_size)
        assert out.shape == keras_out.shape == (len(batch), 1280) and out.dtype == np.float32
        cos = _cosines(out, keras_out)
        assert cos.min() >= 1 - 1e-3, (batch_size, cos.min())
    assert np.isfinite(out).all() and not np.allclose(out[0], out[2])


@pytest.mark.slow
def test_bottleneck_cache_runs_the_backbone_on_litert_and_caches_it_by_backbone_id(
    tmp_path: Path, backbone: Backbone
) -> None:
    bb = load_backbone("efficientnet_lite0")  # its own copy of the fixture's backbone: the engine is set on it
    items = [(f"{i:064x}", p) for i, p in enumerate(_photos(1)[:4])]
    cache = BottleneckCache(tmp_path, bb, engine=TWO)
    feats, failed = cache.get(items, views=("crop875",))
    assert failed == []
    assert bb.engine is not None and bb.engine.engine == "litert"
    assert (tmp_path / bb.id / "litert.tflite").is_file()
    record = json.loads((tmp_path / bb.id / "litert.json").read_text())
    assert record["key"] == bb.id and record["probe_cosine"] >= 0.999
    ref = backbone.model(np.stack([make_views(decode_image(p.read_bytes()), bb.input_size, ["crop875"])[0]
                                   for _, p in items]), training=False)
    assert _cosines(feats[:, 0], np.asarray(ref)).min() >= 1 - 1e-3


# ---------------------------------------------------------------------------- cache and keying
@pytest.mark.slow
def test_cache_is_reused_for_the_same_key_and_redone_for_another(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real_convert = engine_module.convert
    monkeypatch.setattr(engine_module, "convert", lambda m: calls.append(m.name) or real_convert(m))
    model = _tiny()
    first = open_frozen(model, key="tiny-a", cache_dir=tmp_path, settings=TWO)
    again = open_frozen(lambda: pytest.fail("the cached model must not need the Keras model"),
                        key="tiny-a", cache_dir=tmp_path, settings=TWO)
    assert len(calls) == 1 and first.engine == again.engine == "litert"
    x = _inputs()
    np.testing.assert_allclose(again(x), np.asarray(model(x)), rtol=1e-4, atol=1e-5)
    other = _tiny(seed=1)
    changed = open_frozen(other, key="tiny-b", cache_dir=tmp_path, settings=TWO)
    assert len(calls) == 2
    np.testing.assert_allclose(changed(x), np.asarray(other(x)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(changed(x), again(x))
    assert not list(tmp_path.glob(".tmp-*")), "temp files left behind"


@pytest.mark.slow
def test_a_changed_backbone_file_gets_a_new_id_and_a_new_conversion(tmp_path: Path) -> None:
    path = tmp_path / "extractor.keras"
    _tiny(seed=0).save(path)
    old = load_backbone(str(path))
    items = [(f"{i:064x}", p) for i, p in enumerate(_photos(1)[:2])]
    BottleneckCache(tmp_path / "cache", old, engine=TWO).get(items)
    _tiny(seed=7).save(path)  # same file name, other weights
    new = load_backbone(str(path))
    assert new.id != old.id
    feats, _ = BottleneckCache(tmp_path / "cache", new, engine=TWO).get(items)
    assert (tmp_path / "cache" / old.id / "litert.tflite").is_file()
    assert (tmp_path / "cache" / new.id / "litert.tflite").is_file()
    assert new.engine.engine == "litert"
    rgb = make_views(decode_image(items[0][1].read_bytes()), new.input_size, ["crop875"])[0]
    np.testing.assert_allclose(feats[0, 0], np.asarray(new.model(rgb[None]))[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garbage", "garbage_with_its_checksum", "bad_record"])
def test_a_corrupted_cache_is_converted_again_logged_once_and_correct(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = _tiny(seed=3)
    key = f"tiny-corrupt-{damage}"
    open_frozen(model, key=key, cache_dir=tmp_path, settings=TWO)
    tflite, record = engine_module.cache_paths(tmp_path, "litert")
    if damage == "truncate":
        tflite.write_bytes(tflite.read_bytes()[: tflite.stat().st_size // 2])
    elif damage == "garbage":
        tflite.write_bytes(b"\x00garbage" * 100)
    elif damage == "garbage_with_its_checksum":  # passes the checksum, fails in the interpreter
        tflite.write_bytes(b"\x00garbage" * 100)
        data = json.loads(record.read_text())
        data["sha256"] = hashlib.sha256(tflite.read_bytes()).hexdigest()
        record.write_text(json.dumps(data))
    else:
        record.write_text("{not json")
    caplog.set_level(logging.INFO, logger="model_store.engine")
    healed = open_frozen(model, key=key, cache_dir=tmp_path, settings=TWO)
    x = _inputs()
    assert healed.engine == "litert"
    np.testing.assert_allclose(healed(x), np.asarray(model(x)), rtol=1e-4, atol=1e-5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if damage != "bad_record":  # an unreadable record is simply a missing cache
        assert len(warnings) == 1 and "unusable" in warnings[0].getMessage(), warnings
    # the cache was rewritten: the next open needs no conversion and no warning
    caplog.clear()
    again = open_frozen(lambda: pytest.fail("converted again"), key=key, cache_dir=tmp_path, settings=TWO)
    assert again.engine == "litert" and not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_model_litert_cannot_run_falls_back_to_tensorflow_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="model_store.engine")
    model = _tiny(odd=True)
    bb = Backbone(id="file-odd-0123456789ab", name="odd.keras", input_size=(32, 32), feature_dim=8, model=model)
    items = [(f"{i:064x}", p) for i, p in enumerate(_photos(1)[:3])]
    feats, failed = BottleneckCache(tmp_path, bb, engine=TWO).get(items)
    assert failed == []
    assert bb.engine.engine == "tensorflow"
    assert bb.engine.fallback_reason and bb.engine.fallback_reason.startswith("conversion failed")
    assert bb.engine.description.startswith("TensorFlow (fallback: conversion failed")
    rgb = make_views(decode_image(items[0][1].read_bytes()), (32, 32), ["crop875"])[0]
    np.testing.assert_allclose(feats[0, 0], np.asarray(model(rgb[None]))[0], rtol=1e-5, atol=1e-6)
    # The failure is remembered: a second run neither converts again nor logs again.
    record = json.loads((tmp_path / bb.id / "litert.json").read_text())
    assert record["failed"] == bb.engine.fallback_reason and not (tmp_path / bb.id / "litert.tflite").exists()
    again = open_frozen(model, key=bb.id, cache_dir=tmp_path / bb.id, settings=TWO)
    assert again.engine == "tensorflow" and again.fallback_reason == bb.engine.fallback_reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "odd" in warnings[0] and "using TensorFlow" in warnings[0], warnings


def test_engine_tensorflow_is_the_tensorflow_path_without_conversion(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(engine_module, "convert", lambda m: pytest.fail("no conversion for engine=tensorflow"))
    model = _tiny()
    fm = open_frozen(model, key="tiny-tf", cache_dir=tmp_path, settings=EngineSettings("tensorflow"))
    assert fm.engine == "tensorflow" and fm.description == "TensorFlow" and fm.fallback_reason is None
    x = _inputs()
    np.testing.assert_allclose(fm(x, batch_size=2), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.iterdir())


def test_settings_validate_and_default_to_every_available_core() -> None:
    assert EngineSettings().num_threads == engine_module.available_cores() >= 1
    assert EngineSettings("litert", 3).num_threads == 3
    with pytest.raises(ValueError, match="engine must be one of"):
        EngineSettings("onnx")
    with pytest.raises(ValueError, match="threads"):
        EngineSettings("litert", -1)


# ------------------------------------------------------------------------------------- serving
@pytest.mark.slow
def test_serving_on_litert_gives_the_tensorflow_top_k(clothing_store: TrainedStore, tmp_path: Path) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    current = ws.registry.current()
    # the training run copied its backbone's conversion into the version: no conversion per training
    assert (current.path / f"{BACKBONE_CACHE_NAME}.tflite").is_file()
    assert not (current.path / f"{SERVING_CACHE_NAME}.tflite").exists()
    assert current.metrics["engine"]["serving"].startswith("LiteRT/XNNPACK")
    lite = Classifier(ws.registry, engine=TWO)
    tf_path = Classifier(ws.registry, engine=EngineSettings("tensorflow"))
    photos = _photos(1)
    rgbs = [decode_image(p.read_bytes()) for p in photos]
    a, b = lite.classify(rgbs, top_k=3), tf_path.classify(rgbs, top_k=3)
    assert lite.engine_description == "LiteRT/XNNPACK, 2 threads"
    assert tf_path.engine_description == "TensorFlow"
    for x, y in zip(a, b, strict=True):
        assert [lab for lab, _ in x] == [lab for lab, _ in y]
        np.testing.assert_allclose([p for _, p in x], [p for _, p in y], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("state", ["trained_before_the_engine", "backbone_copy_corrupt"])
def test_a_version_without_a_usable_conversion_is_converted_at_load_and_keeps_serving(
    clothing_store: TrainedStore, tmp_path: Path, state: str
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    vdir = ws.registry.current().path
    if state == "trained_before_the_engine":
        for suffix in (".tflite", ".json"):
            (vdir / f"{BACKBONE_CACHE_NAME}{suffix}").unlink()
    else:
        (vdir / f"{BACKBONE_CACHE_NAME}.tflite").write_bytes(b"\0" * 1000)
    photo = decode_image(_photos(1)[0].read_bytes())
    expected = Classifier(ws.registry, engine=EngineSettings("tensorflow")).classify([photo])
    clf = Classifier(ws.registry, engine=TWO)
    (got,) = clf.classify([photo])
    assert clf.engine_description.startswith("LiteRT")
    assert [lab for lab, _ in got] == [lab for lab, _ in expected[0]]
    assert (vdir / f"{SERVING_CACHE_NAME}.tflite").is_file()
    assert not [p for p in vdir.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------- pruning
@pytest.mark.slow
def test_retraining_prunes_the_caches_of_backbones_no_longer_in_use(
    clothing_store: TrainedStore, tmp_path: Path, backbone: Backbone
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    old = ws.bottleneck_dir / "file-old_extractor-0123456789ab"
    (old / "center_crop-crop875" / "ab").mkdir(parents=True)
    np.save(old / "center_crop-crop875" / "ab" / ("ab" * 32 + ".npy"), np.zeros(8, np.float32))
    (old / "litert.tflite").write_bytes(b"x")
    (old / "litert.json").write_text("{}")
    mine = ws.bottleneck_dir / backbone.id
    n_entries = len(list(mine.rglob("*.npy")))
    assert n_entries > 0
    report = retrain(ws, fx.train_config(max_accuracy_drop=1.0), backbone=backbone, engine=TWO)
    assert report.status == "promoted", report.message
    assert report.metrics["bottleneck_cache"]["computed"] == 0
    assert not old.exists(), "the unused backbone's bottlenecks and converted model are gone"
    assert len(list(mine.rglob("*.npy"))) == n_entries, "the backbone in use keeps its cache"
    assert report.metrics["engine"]["serving"] == "LiteRT/XNNPACK, 2 threads"


def test_one_model_called_from_several_threads_gives_each_caller_its_own_answer(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = _tiny(seed=5)
    fm = open_frozen(model, key="tiny-threads", cache_dir=tmp_path, settings=TWO)
    assert fm.engine == "litert"
    inputs = [_inputs(n=1 + i % 4) * (1 + i / 10) for i in range(24)]  # different batch sizes: resizes
    expected = [np.asarray(model(x)) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: fm(x, batch_size=3), inputs))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- the serving head in NumPy
def _keras_probabilities(head: keras.Model, feats: np.ndarray) -> np.ndarray:
    return np.asarray(tf.nn.softmax(head(feats, training=False), axis=-1), np.float32)


def test_the_serving_head_runs_in_numpy_and_equals_the_keras_head_on_real_bottlenecks(
    clothing_store: TrainedStore, tmp_path: Path
) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    version = ws.registry.current()
    model = open_serving_model(version.path, TWO)
    assert model.head_engine == "numpy"  # no tf.function on the serving path
    inputs = np.concatenate(
        [np.stack(make_views(decode_image(p.read_bytes()), model.input_size, ["crop875", "crop1000"])) for p in _photos(2)]
    )
    feats = model.backbone(inputs)
    head = keras.models.load_model(version.path / "head.keras", compile=False)
    got, want = model(inputs), _keras_probabilities(head, feats)
    assert got.shape == want.shape == (len(inputs), len(version.labels)) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_a_head_with_other_layers_keeps_the_tensorflow_path(clothing_store: TrainedStore, tmp_path: Path) -> None:
    ws = copy_store(clothing_store.root, tmp_path / "store")
    version = ws.registry.current()
    trained = keras.models.load_model(version.path / "head.keras", compile=False)
    keras.utils.set_random_seed(3)
    inp = keras.Input((int(trained.input_shape[-1]),))
    x = keras.layers.LayerNormalization()(inp)  # not a Dense / Dropout layer: NumPy cannot run it
    odd = keras.Model(inp, keras.layers.Dense(int(trained.output_shape[-1]), activation="tanh")(x))
    odd.save(version.path / "head.keras")
    model = open_serving_model(version.path, TWO)
    assert model.head_engine == "tensorflow"
    inputs = np.stack(make_views(decode_image(_photos(1)[0].read_bytes()), model.input_size, ["crop875", "crop1000"]))
    np.testing.assert_allclose(model(inputs), _keras_probabilities(odd, model.backbone(inputs)), atol=1e-5)


def test_numpy_head_runs_a_hidden_relu_layer_like_keras() -> None:
    keras.utils.set_random_seed(4)
    inp = keras.Input((16,))
    x = keras.layers.Dropout(0.5)(inp)
    x = keras.layers.Dense(12, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    head = keras.Model(inp, keras.layers.Dense(5)(x))
    numpy_head = NumpyHead.from_keras(head)
    feats = np.random.default_rng(2).normal(0, 2, (7, 16)).astype(np.float32)
    np.testing.assert_allclose(numpy_head(feats), _keras_probabilities(head, feats), atol=1e-6)
    sigmoid = keras.Model(inp, keras.layers.Dense(5, activation="sigmoid")(inp))
    assert NumpyHead.from_keras(sigmoid) is None


# --------------------------------------------------------------------------- LiteRT batch cap
def test_litert_splits_large_batches_into_small_passes_with_the_same_features(tmp_path: Path, monkeypatch) -> None:
    fm = open_frozen(_tiny(), key="tiny-batches", cache_dir=tmp_path, settings=TWO)
    assert fm.engine == "litert"
    passes: list[int] = []
    runner = fm._run
    monkeypatch.setattr(fm, "_run", lambda x: passes.append(len(x)) or runner(x))
    x = _inputs(20)
    big = fm(x, batch_size=32)
    assert passes == [8, 8, 4] and max(passes) <= engine_module.LITERT_MAX_BATCH
    one_by_one = np.concatenate([fm(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(big, one_by_one, atol=1e-5)
