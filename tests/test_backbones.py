"""Backbones: the shipped default, keras.applications networks, local files, offline failures."""

from __future__ import annotations

import urllib.error

import keras
import keras.src.backend.config as keras_config
import keras.src.utils.file_utils as keras_file_utils
import numpy as np
import pytest

from model_store import backbones as backbones_module
from model_store.backbones import (
    DEFAULT_BACKBONE,
    SHIPPED_BACKBONE_FILE,
    SHIPPED_BACKBONES,
    Backbone,
    load_backbone,
)
from model_store.errors import BackboneUnavailableError
from model_store.images import decode_image, to_model_input
from tests.auxil.modelstore import clothing_photos


def _model_inputs(paths, size) -> np.ndarray:
    return np.stack([to_model_input(decode_image(p.read_bytes()), size, mode="center_crop") for p in paths])


def _tiny_extractor(size: int = 32, filters: int = 4, seed: int = 0) -> keras.Model:
    """A small real feature extractor: float32 RGB (N, size, size, 3) -> (N, filters)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3), dtype="float32")
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(filters, 3, activation="relu")(x)
    out = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, out)


# ------------------------------------------------------------------------------ shipped backbones
def test_shipped_lite0_loads_with_the_documented_shape(backbone: Backbone) -> None:
    assert isinstance(backbone, Backbone)
    assert backbone.name == "efficientnet_lite0"
    assert backbone.input_size == (224, 224)
    assert backbone.feature_dim == 1280
    assert backbone.id.startswith("efficientnet_lite0-imagenet-")
    assert backbone.model.trainable is False
    assert tuple(backbone.model.input_shape) == (None, 224, 224, 3)
    assert tuple(backbone.model.output_shape) == (None, 1280)


@pytest.mark.slow
def test_shipped_default_is_lite1_at_its_own_input_size_with_a_stable_id() -> None:
    default = load_backbone()
    by_name = load_backbone(DEFAULT_BACKBONE)
    assert DEFAULT_BACKBONE == "efficientnet_lite1" and default.name == DEFAULT_BACKBONE
    assert default.input_size == (240, 240) and default.feature_dim == 1280
    assert tuple(default.model.input_shape) == (None, 240, 240, 3)
    assert default.model.trainable is False
    assert default.id.startswith("efficientnet_lite1-imagenet-")
    assert default.id == by_name.id and default is not by_name  # really loaded twice


@pytest.mark.slow
def test_shipped_lite0_id_is_stable_across_loads(backbone: Backbone) -> None:
    again = load_backbone("efficientnet_lite0")
    assert again.id == backbone.id
    assert again is not backbone  # really loaded twice
    assert again.id != load_backbone().id  # a different backbone keys a different cache


def test_shipped_default_features_of_real_photos(backbone: Backbone) -> None:
    photos = clothing_photos()
    batch = _model_inputs([photos["shoes"][0], photos["hat"][0]], backbone.input_size)
    feats = backbone.features(batch)
    assert feats.dtype == np.float32
    assert feats.shape == (2, 1280)
    assert np.isfinite(feats).all()
    assert np.abs(feats).sum() > 0
    assert not np.allclose(feats[0], feats[1]), "two different photos gave the same bottleneck"
    # batching does not change the result; the same input gives the same features
    one_by_one = np.concatenate([backbone.features(batch[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(one_by_one, feats, rtol=1e-4, atol=1e-4)
    small_batches = backbone.features(batch, batch_size=1)
    np.testing.assert_allclose(small_batches, feats, rtol=1e-4, atol=1e-4)


def test_features_of_an_empty_batch(backbone: Backbone) -> None:
    out = backbone.features(np.zeros((0, 224, 224, 3), np.float32))
    assert out.shape == (0, 1280) and out.dtype == np.float32


# --------------------------------------------------------------------------- keras.applications
@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "size", "dim", "expected_id"),
    [
        ("mobilenet_v3_small", 224, 576, "mobilenet_v3_small-random"),
        ("mobilenet_0.25_128", 128, 256, "mobilenet_0.25_128-random"),
        ("mobilenet_0.5_160", 160, 512, "mobilenet_0.50_160-random"),
    ],
)
def test_keras_application_by_name_without_weights(
    spec: str,
    size: int,
    dim: int,
    expected_id: str,
    backbone: Backbone,
) -> None:
    bb = load_backbone(spec, weights=None)
    assert bb.input_size == (size, size)
    assert bb.feature_dim == dim
    assert bb.id == expected_id
    assert bb.id != backbone.id
    assert bb.model.trainable is False
    photo = clothing_photos()["pants"][0]
    feats = bb.features(_model_inputs([photo], bb.input_size))
    assert feats.shape == (1, dim) and feats.dtype == np.float32 and np.isfinite(feats).all()


def test_retrain_py_quantized_spelling_is_refused_with_the_float_alternative() -> None:
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone("mobilenet_0.25_128_quantized", weights=None)
    assert "mobilenet_0.25_128" in err.value.message
    assert "uantized" in err.value.message


# keras.applications fetches ImageNet weights with keras.src.utils.file_utils.get_file, which looks in
# <keras home>/models first (keras_home() reads config._KERAS_DIR) and downloads with urllib's
# urlretrieve otherwise.
@pytest.fixture
def offline_keras(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """No ImageNet weights in the Keras cache, and every download fails as without a network."""
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    (tmp_path / "keras_home").mkdir()
    calls: list[str] = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras_file_utils, "urlretrieve", no_network)
    return calls


@pytest.mark.parametrize("spec", ["mobilenet_0.25_128", "mobilenet_v3_small"])
def test_imagenet_weights_offline_give_backbone_unavailable_mentioning_weights_flag(
    spec: str, offline_keras: list[str]
) -> None:
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone(spec, weights="imagenet")
    assert offline_keras, "keras.applications did not try to download the weights"
    msg = err.value.message
    assert "--weights" in msg
    assert spec in msg
    assert DEFAULT_BACKBONE in msg  # the no-download alternative is named
    assert str(err.value) == msg


def test_get_file_oserror_gives_backbone_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(keras_file_utils, "get_file", fail)
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone("mobilenet_0.25_128")
    assert "--weights" in err.value.message
    assert "OSError" in err.value.message


def test_missing_local_weights_file(tmp_path) -> None:
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone("mobilenet_0.25_128", weights=str(tmp_path / "nope.h5"))
    assert "does not exist" in err.value.message


def test_garbage_local_weights_file(tmp_path) -> None:
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone("mobilenet_0.25_128", weights=str(bad))
    assert "mobilenet_0.25_128" in err.value.message


@pytest.mark.parametrize(
    "spec", ["resnet9000", "mobilenet_0.33_224", "mobilenet_1.0_512", "EfficientNet_Lite0"]
)
def test_unknown_backbone_name_gives_a_clear_error(spec: str) -> None:
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone(spec)
    msg = err.value.message
    assert "Unknown backbone" in msg
    assert repr(spec) in msg
    assert DEFAULT_BACKBONE in msg and "mobilenet_v2" in msg  # the valid names are listed


# --------------------------------------------------------------------------------- local files
def test_local_keras_file_loads_by_path(tmp_path) -> None:
    model = _tiny_extractor()
    path = tmp_path / "tiny.keras"
    model.save(path)
    bb = load_backbone(str(path))
    assert bb.id.startswith("file-tiny-")
    assert bb.input_size == (32, 32)
    assert bb.feature_dim == 4
    assert bb.name == str(path)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(bb.features(x), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    # the id is stable for the same file, and changes with the file's content
    assert load_backbone(str(path)).id == bb.id
    other = tmp_path / "other" / "tiny.keras"
    other.parent.mkdir()
    _tiny_extractor(seed=1).save(other)
    assert load_backbone(str(other)).id != bb.id


def test_local_savedmodel_folder_loads_by_path(tmp_path) -> None:
    model = _tiny_extractor()
    folder = tmp_path / "exported"
    model.export(str(folder), verbose=False)
    bb = load_backbone(str(folder))
    assert bb.id.startswith("file-exported-")
    assert bb.input_size == (32, 32)
    assert bb.feature_dim == 4
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(bb.features(x), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("junk.keras", b"this is not a keras model"),
        ("empty.keras", b""),
        ("photo.keras", None),  # a real JPEG renamed
        ("notes.txt", b"hello"),
    ],
)
def test_non_model_file_gives_backbone_unavailable(tmp_path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    path.write_bytes(content if content is not None else clothing_photos()["hat"][0].read_bytes())
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone(str(path))
    assert name in err.value.message


def test_folder_that_is_not_a_savedmodel(tmp_path) -> None:
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone(str(folder))
    assert "SavedModel" in err.value.message


def test_model_with_wrong_output_shape_is_refused(tmp_path) -> None:
    inp = keras.Input((16, 16, 3))
    out = keras.layers.Conv2D(2, 3)(inp)  # (N, h, w, 2): not one vector per image
    path = tmp_path / "conv.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone(str(path))
    assert "one feature vector per image" in err.value.message


def test_model_with_variable_input_size_is_refused(tmp_path) -> None:
    inp = keras.Input((None, None, 3))
    out = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inp))
    path = tmp_path / "anysize.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone(str(path))
    assert "fixed-size" in err.value.message


def test_shipped_file_is_present_and_listed() -> None:
    assert SHIPPED_BACKBONE_FILE.is_file()
    assert all(p.is_file() for p in SHIPPED_BACKBONES.values())
    names = backbones_module.available_backbones()
    assert names[0] == DEFAULT_BACKBONE and "mobilenet_v3_small" in names
    assert set(SHIPPED_BACKBONES) <= set(names)
