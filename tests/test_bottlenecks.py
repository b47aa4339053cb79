"""BottleneckCache: compute once, reuse, recompute corrupt entries, report unreadable images, views."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from model_store.backbones import Backbone
from model_store.bottlenecks import PREPROCESSING_MODE, BottleneckCache, make_views, parse_view, view_name
from model_store.images import decode_image, to_model_input
from tests.auxil.modelstore import CASES, clothing_photos

#: two centre-crop scales and their mirror images (the default training views)
VIEWS4 = ("crop875", "crop875-flip", "crop1000", "crop1000-flip")


def _items(paths: list[Path]) -> list[tuple[str, Path]]:
    return [(hashlib.sha256(p.read_bytes()).hexdigest(), p) for p in paths]


@pytest.fixture(scope="module")
def photo_items() -> list[tuple[str, Path]]:
    """Six real photos from six labels, as (sha256, path)."""
    photos = clothing_photos()
    return _items([photos[label][1] for label in ("dress", "hat", "pants", "shoes", "skirt", "t-shirt")])


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, backbone: Backbone, photo_items):
    """A cache folder filled by one get() of the six photos (read-only for tests)."""
    root = tmp_path_factory.mktemp("bottlenecks")
    cache = BottleneckCache(root, backbone)
    progress: list[tuple[int, int]] = []
    feats, failed = cache.get(photo_items, views=VIEWS4, progress=lambda d, n: progress.append((d, n)))
    return root, feats, failed, dict(cache.stats), progress


def test_first_get_computes_every_image(warm_cache, photo_items, backbone: Backbone) -> None:
    root, feats, failed, stats, progress = warm_cache
    n = len(photo_items)
    assert failed == []
    assert stats == {"computed": n, "cached": 0, "corrupt": 0}
    assert feats.shape == (n, 4, backbone.feature_dim) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (np.abs(feats).sum(axis=2) > 0).all()
    assert progress[0] == (0, n) and progress[-1] == (n, n)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    cache = BottleneckCache(root, backbone)
    for sha, _ in photo_items:
        for view in VIEWS4:
            p = cache.path(sha, view)
            assert p.is_file()
            assert p.is_relative_to(root / backbone.id / f"{PREPROCESSING_MODE}-{view}")
            stored = np.load(p)
            assert stored.dtype == np.float32 and stored.shape == (backbone.feature_dim,)
    assert not [p for p in root.rglob(".tmp-*")], "temp files left in the cache"


def test_features_match_the_backbone_on_the_same_inputs(warm_cache, photo_items, backbone: Backbone) -> None:
    _, feats, _, _, _ = warm_cache
    sha, path = photo_items[0]
    inputs = make_views(decode_image(path.read_bytes()), backbone.input_size, VIEWS4)
    direct = backbone.features(np.stack(inputs))
    np.testing.assert_allclose(feats[0], direct, rtol=1e-4, atol=1e-4)


def test_second_get_loads_everything_from_the_cache(warm_cache, photo_items, backbone: Backbone) -> None:
    root, feats, _, _, _ = warm_cache
    cache = BottleneckCache(root, backbone)  # a new instance: nothing kept in memory
    progress: list[tuple[int, int]] = []
    again, failed = cache.get(photo_items, views=VIEWS4, progress=lambda d, n: progress.append((d, n)))
    assert failed == []
    assert cache.stats == {"computed": 0, "cached": len(photo_items), "corrupt": 0}
    assert np.array_equal(again, feats)
    assert progress == [(0, 0)]


def test_views_are_returned_in_the_requested_order(warm_cache, photo_items, backbone: Backbone) -> None:
    root, feats, _, _, _ = warm_cache
    cache = BottleneckCache(root, backbone)
    flip_only, _ = cache.get(photo_items, views=("crop875-flip",))
    swapped, _ = cache.get(photo_items, views=("crop1000", "crop875"))
    assert cache.stats["computed"] == 0
    assert np.array_equal(flip_only[:, 0], feats[:, 1])
    assert np.array_equal(swapped[:, 0], feats[:, 2]) and np.array_equal(swapped[:, 1], feats[:, 0])


def test_every_view_differs_from_the_others(warm_cache, photo_items) -> None:
    _, feats, _, _, _ = warm_cache
    for i in range(len(photo_items)):
        for a in range(4):
            for b in range(a + 1, 4):
                assert not np.allclose(feats[i, a], feats[i, b], atol=1e-3), (i, VIEWS4[a], VIEWS4[b])


def test_make_views_are_crops_and_mirrors(photo_items) -> None:
    rgb = decode_image(photo_items[0][1].read_bytes())
    crop875, flip875, crop1000, flip1000 = make_views(rgb, (224, 224), VIEWS4)
    assert crop875.shape == (224, 224, 3) and crop875.dtype == np.float32
    assert np.array_equal(flip875, crop875[:, ::-1]) and not np.array_equal(flip875, crop875)
    assert np.array_equal(flip1000, crop1000[:, ::-1])
    assert np.array_equal(crop875, to_model_input(rgb, (224, 224), mode="center_crop", crop_fraction=0.875))
    assert np.array_equal(crop1000, to_model_input(rgb, (224, 224), mode="center_crop", crop_fraction=1.0))
    assert not np.array_equal(crop875, crop1000)


def test_view_names_round_trip() -> None:
    assert view_name(0.875) == "crop875" and view_name(1.0, True) == "crop1000-flip"
    assert view_name(0.5, flip=False) == "crop500"
    for name in VIEWS4:
        assert view_name(*parse_view(name)) == name
    assert parse_view("crop875-flip") == (0.875, True)


@pytest.mark.parametrize(
    "name", ["plain", "flip", "rotate", "crop0", "crop2000", "crop875-mirror", "cropx", ""]
)
def test_make_views_rejects_unknown_views(name: str) -> None:
    with pytest.raises(ValueError, match="view"):
        make_views(np.zeros((10, 10, 3), np.uint8), (32, 32), [name])


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00garbage, not numpy\xff" * 40)


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _wrong_shape(p: Path) -> None:
    with open(p, "wb") as fh:
        np.save(fh, np.ones(17, np.float32))


def _wrong_dtype(p: Path) -> None:
    with open(p, "wb") as fh:
        np.save(fh, np.ones(1280, np.float64))


def _nan(p: Path) -> None:
    arr = np.load(p)
    arr[3] = np.nan
    with open(p, "wb") as fh:
        np.save(fh, arr)


def _pickled_object(p: Path) -> None:
    with open(p, "wb") as fh:
        np.save(fh, np.array([{"evil": 1}], dtype=object), allow_pickle=True)


@pytest.mark.parametrize(
    "damage", [_truncate, _garbage, _empty, _wrong_shape, _wrong_dtype, _nan, _pickled_object]
)
def test_corrupt_cache_entry_is_recomputed(
    damage,
    warm_cache,
    photo_items,
    backbone: Backbone,
    tmp_path: Path,
) -> None:
    root, feats, _, _, _ = warm_cache
    work = tmp_path / "cache"
    shutil.copytree(root, work)
    cache = BottleneckCache(work, backbone)
    sha, _ = photo_items[2]
    damage(cache.path(sha, "crop875"))
    again, failed = cache.get(photo_items, views=VIEWS4)
    assert failed == []
    assert cache.stats["corrupt"] == 1
    assert cache.stats["computed"] == 1
    assert cache.stats["cached"] == len(photo_items) - 1
    np.testing.assert_allclose(again, feats, rtol=1e-4, atol=1e-4)
    # the entry was rewritten: the next get() loads it without complaint
    third, _ = BottleneckCache(work, backbone).get(photo_items, views=VIEWS4)
    repaired = np.load(cache.path(sha, "crop875"), allow_pickle=False)
    assert repaired.shape == (backbone.feature_dim,) and repaired.dtype == np.float32
    np.testing.assert_allclose(repaired, feats[2, 0], rtol=1e-4, atol=1e-4)
    assert np.array_equal(third, again)


def test_unreadable_images_are_reported_in_failed(tmp_path: Path, photo_items, backbone: Backbone) -> None:
    text = (CASES / "text.jpg").read_bytes()
    html = (CASES / "html.png").read_bytes()
    missing = tmp_path / "gone.jpg"
    items = [
        photo_items[0],
        (hashlib.sha256(text).hexdigest(), CASES / "text.jpg"),
        (hashlib.sha256(b"").hexdigest(), CASES / "empty.jpg"),
        photo_items[1],
        ("ab" * 32, missing),
        (hashlib.sha256(html).hexdigest(), html),  # bytes source
    ]
    cache = BottleneckCache(tmp_path / "cache", backbone)
    feats, failed = cache.get(items, views=VIEWS4)
    assert failed == [1, 2, 4, 5]
    for i in failed:
        assert not feats[i].any(), "a failed image must have an all-zero row"
        for view in VIEWS4:
            assert not cache.path(items[i][0], view).exists(), "nothing cached for an unreadable image"
    for i in (0, 3):
        assert np.isfinite(feats[i]).all() and np.abs(feats[i]).sum() > 0
        assert cache.path(items[i][0], "crop875").is_file()
    # a second call still reports them (they are never cached), and loads the good ones
    _, failed_again = cache.get(items, views=VIEWS4)
    assert failed_again == [1, 2, 4, 5]
    assert cache.stats["cached"] == 2


def test_bytes_and_path_sources_give_the_same_bottleneck(
    tmp_path: Path, warm_cache, photo_items, backbone: Backbone
) -> None:
    _, feats, _, _, _ = warm_cache
    sha, path = photo_items[3]
    cache = BottleneckCache(tmp_path / "c", backbone)
    from_bytes, failed = cache.get([(sha, path.read_bytes())], views=VIEWS4)
    assert failed == [] and cache.stats["computed"] == 1
    np.testing.assert_allclose(from_bytes[0], feats[3], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_entries_are_namespaced_by_backbone_id(warm_cache, photo_items, backbone: Backbone) -> None:
    root, feats, _, _, _ = warm_cache
    other = Backbone(
        id="another-backbone",
        name="same network, other id",
        input_size=backbone.input_size,
        feature_dim=backbone.feature_dim,
        model=backbone.model,
    )
    cache = BottleneckCache(root, other)
    got, _ = cache.get(photo_items[:2], views=("crop875",))
    assert cache.stats == {"computed": 2, "cached": 0, "corrupt": 0}
    assert (root / "another-backbone").is_dir()
    np.testing.assert_allclose(got[:, 0], feats[:2, 0], rtol=1e-4, atol=1e-4)
    shutil.rmtree(root / "another-backbone")  # keep the module's warm cache as it was


def test_many_images_in_several_batches(tmp_path: Path, backbone: Backbone) -> None:
    photos = clothing_photos()
    items = _items([p for label in ("shoes", "hat") for p in photos[label]])  # 16 photos
    cache = BottleneckCache(tmp_path / "c", backbone, batch_size=5, decode_threads=2)
    progress: list[tuple[int, int]] = []
    feats, failed = cache.get(items, views=("crop875",), progress=lambda d, n: progress.append((d, n)))
    assert failed == []
    assert progress == [(0, 16), (5, 16), (10, 16), (15, 16), (16, 16)]
    assert cache.stats == {"computed": 16, "cached": 0, "corrupt": 0}
    big = BottleneckCache(tmp_path / "c2", backbone, batch_size=32)
    feats_big, _ = big.get(items, views=("crop875",))
    np.testing.assert_allclose(feats, feats_big, rtol=1e-4, atol=1e-4)


def test_training_and_serving_decode_through_decode_for_model_with_max_side_when_offered(
    tmp_path: Path, monkeypatch
) -> None:
    import inspect
    import io

    from PIL import Image

    from model_store import bottlenecks
    from model_store.classifier import Classifier
    from model_store.workspace import Workspace

    rgb = np.random.default_rng(0).integers(0, 255, (1800, 2400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    real = bottlenecks.decode_image
    if "max_side" in inspect.signature(real).parameters:  # images.py with DCT-scaled decoding
        small = bottlenecks.decode_for_model(jpeg)
        assert bottlenecks.DECODE_SIDE <= max(small.shape[:2]) < 2400
    else:
        np.testing.assert_array_equal(bottlenecks.decode_for_model(jpeg), real(jpeg))

    calls: list[dict] = []

    def recording(data, **kwargs):
        calls.append(kwargs)
        return real(data)

    monkeypatch.setattr(bottlenecks, "decode_image", recording)
    monkeypatch.setattr(bottlenecks, "_DECODE_HAS_MAX_SIDE", True)
    Classifier(Workspace(tmp_path / "store").registry).prepare(jpeg)  # serving
    assert calls == [{"max_side": bottlenecks.DECODE_SIDE}]
    monkeypatch.setattr(bottlenecks, "_DECODE_HAS_MAX_SIDE", False)
    assert bottlenecks.decode_for_model(jpeg).shape == (1800, 2400, 3)
    assert calls[-1] == {}
