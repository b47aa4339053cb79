"""The shipped backbones against their PyTorch reference, and the conversion script's parity check.

CI has no torch: ``tools/convert_backbone.py`` recorded the reference network's pooled features of
four tests/data photos (``tests/data/backbone_parity/<name>.npy``) when it converted each shipped
backbone; here the shipped ``.keras`` files must reproduce them, and the script's own parity check
must reject a slightly wrong network or the wrong reference.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from model_store.backbones import SHIPPED_BACKBONES, load_backbone
from model_store.images import decode_image, to_model_input
from tests.auxil.modelstore import DATA
from tools.convert_backbone import DEFAULT_ATOL, FIXTURE_CROP, ParityError, check_parity, fixture_inputs

FIXTURES = DATA / "backbone_parity"
_LOADED: dict[str, object] = {}


def _shipped(name: str):
    if name not in _LOADED:
        _LOADED[name] = load_backbone(name)
    return _LOADED[name]


def _inputs(size: tuple[int, int]) -> np.ndarray:
    meta = json.loads((FIXTURES / "photos.json").read_text())
    assert meta["crop_fraction"] == FIXTURE_CROP
    return np.stack(
        [
            to_model_input(decode_image((DATA / p).read_bytes()), size, mode="center_crop", crop_fraction=FIXTURE_CROP)
            for p in meta["photos"]
        ]
    )


def test_every_shipped_backbone_has_a_reference_fixture() -> None:
    assert set(SHIPPED_BACKBONES) == {p.stem for p in FIXTURES.glob("*.npy")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED_BACKBONES))
def test_shipped_backbone_reproduces_the_pytorch_reference_features(name: str) -> None:
    backbone = _shipped(name)
    reference = np.load(FIXTURES / f"{name}.npy")
    batch = _inputs(backbone.input_size)
    # The fixture inputs are the ones the script made (same photos, same transform).
    names, script_batch = fixture_inputs(backbone.input_size[0])
    np.testing.assert_array_equal(batch, script_batch)
    assert reference.shape == (len(names), backbone.feature_dim)
    diff = check_parity(backbone.features(batch), reference, what=name)
    assert diff < 1e-4  # float32 round-off only; measured about 6e-6
    # The features are informative, not a constant: the four photos differ clearly.
    assert np.abs(reference - reference.mean(axis=0)).max() > 100 * DEFAULT_ATOL


@pytest.mark.slow
def test_parity_check_rejects_a_slightly_perturbed_network() -> None:
    backbone = _shipped("efficientnet_lite0")
    reference = np.load(FIXTURES / "efficientnet_lite0.npy")
    batch = _inputs(backbone.input_size)
    model = keras.models.clone_model(backbone.model)
    model.set_weights(backbone.model.get_weights())
    # One BatchNorm's offset moved by 0.05 in the head: a conversion slip of the smallest kind.
    bn = model.get_layer("head_bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta + 0.05, mean, var])
    with pytest.raises(ParityError, match="max abs difference"):
        check_parity(np.asarray(model(batch, training=False)), reference, what="perturbed")
    # ... while the unperturbed clone passes.
    model2 = keras.models.clone_model(backbone.model)
    model2.set_weights(backbone.model.get_weights())
    check_parity(np.asarray(model2(batch, training=False)), reference)


def test_parity_check_rejects_the_wrong_reference_and_bad_shapes() -> None:
    lite0 = np.load(FIXTURES / "efficientnet_lite0.npy")
    lite1 = np.load(FIXTURES / "efficientnet_lite1.npy")
    assert lite0.shape == lite1.shape  # same shape: only the values can tell them apart
    with pytest.raises(ParityError, match="max abs difference"):
        check_parity(lite0, lite1)
    with pytest.raises(ParityError, match="shape"):
        check_parity(lite0[:3], lite0)
    bad = lite0.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ParityError, match="non-finite"):
        check_parity(bad, lite0)
    assert check_parity(lite0, lite0) == 0.0
