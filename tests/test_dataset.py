"""ImageStore: labelled folders on disk, the catalog, hostile labels, atomic writes, concurrency."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store import dataset as dataset_module
from model_store.dataset import AddResult, ImageRecord, ImageStore, LabelInfo
from model_store.errors import DuplicateImageError, ImageDecodeError, LabelError, StoreFullError
from model_store.labels import label_key

DATA = Path(__file__).parent / "data" / "clothing"

HOSTILE_LABELS = [
    "../../etc",
    "a/b",
    "..",
    ".",
    ".hidden",
    "",
    "   ",
    "x" * 300,
    "a\x00b",
    "a\nb",
    "CON",
    "con.txt",
    "..\\..\\evil",
    "/etc/passwd",
    "C:evil",
]
VALID_LABELS = ["Розы", "👗 dress", "T-Shirt", "e\u0301te"]


@pytest.fixture(scope="session")
def photos() -> dict[str, list[bytes]]:
    """Real phone photos of clothing: label -> JPEG bytes (8 per label, 10 labels)."""
    result = {
        folder.name: [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
        for folder in sorted(DATA.iterdir())
        if folder.is_dir()
    }
    assert len(result) >= 3 and all(len(v) >= 4 for v in result.values()), result.keys()
    return result


@pytest.fixture
def all_photos(photos: dict[str, list[bytes]]) -> list[bytes]:
    return [data for label in sorted(photos) for data in photos[label]]


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_contained(tmp_path: Path, store: ImageStore) -> None:
    """Every file anywhere under tmp_path is the catalog, the lock, or an image one level inside images/."""
    images = store.images_dir.resolve()
    for path in files_under(tmp_path):
        resolved = path.resolve()
        if resolved.parent == store.root.resolve():
            assert resolved.name.startswith(("catalog.sqlite", ".lock")), resolved
            continue
        assert resolved.parent.parent == images, f"file outside a label folder: {resolved}"
        assert not resolved.name.startswith(".tmp-"), resolved
        assert len(resolved.stem) == 64, resolved


def catalog_rows(store: ImageStore) -> list[tuple]:
    with sqlite3.connect(store.catalog_path) as conn:
        return conn.execute(
            "SELECT sha256, label, ext, added_by, chat_id, added_at FROM images ORDER BY sha256"
        ).fetchall()


# ---------------------------------------------------------------------------- adding


def test_add_stores_file_under_label_and_catalog(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    data = photos["hat"][0]
    before = time.time()
    result = store.add(data, "hat", added_by=42, chat_id=-100)
    assert isinstance(result, AddResult)
    assert result.created and result.label == "hat" and result.sha256 == sha(data)
    assert result.path == store.images_dir / "hat" / f"{sha(data)}.jpg"
    assert result.path.read_bytes() == data
    assert store.snapshot() == [ImageRecord(sha(data), "hat", result.path)]
    assert store.labels() == [LabelInfo("hat", 1)]
    assert store.image_count() == 1
    [row] = catalog_rows(store)
    assert row[:5] == (sha(data), "hat", "jpg", 42, -100)
    assert before - 1 <= row[5] <= time.time() + 1
    with sqlite3.connect(store.catalog_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("name", HOSTILE_LABELS)
def test_hostile_labels_refused_by_add_and_nothing_escapes(
    tmp_path: Path, photos: dict[str, list[bytes]], name: str
) -> None:
    store = ImageStore(tmp_path / "store")
    with pytest.raises(LabelError) as info:
        store.add(photos["hat"][0], name, added_by=1)
    assert info.value.message
    assert store.snapshot() == [] and store.labels() == [] and catalog_rows(store) == []
    assert_contained(tmp_path, store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list(store.images_dir.iterdir()) == []


def test_valid_unusual_labels_stay_inside_images(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    store = ImageStore(tmp_path / "store")
    for name, data in zip(VALID_LABELS, photos["shoes"], strict=False):
        result = store.add(data, name)
        assert result.created
        assert result.path.parent.parent == store.images_dir
        assert result.path.parent.name == result.label
    assert {info.name for info in store.labels()} == {"Розы", "👗 dress", "T-Shirt", "\u00e9te"}
    assert_contained(tmp_path, store)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(name=st.text(max_size=70))
def test_any_label_text_is_refused_or_stored_inside_images(name: str) -> None:
    data = sorted(DATA.glob("hat/*.jpg"))[0].read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        store = ImageStore(tmp_path / "store")
        try:
            result = store.add(data, name)
        except LabelError as exc:
            assert exc.message
            assert list(store.images_dir.iterdir()) == []
        else:
            assert result.path.parent.parent == store.images_dir
            assert store.snapshot() == [ImageRecord(sha(data), result.label, result.path)]
        assert_contained(tmp_path, store)


def test_symlinked_label_folder_is_never_written_through(
    tmp_path: Path, photos: dict[str, list[bytes]]
) -> None:
    store = ImageStore(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.images_dir / "evil").symlink_to(outside, target_is_directory=True)
    (store.images_dir / "file").write_bytes(b"x")
    for name in ("evil", "file"):
        with pytest.raises(LabelError):
            store.add(photos["hat"][0], name)
    assert list(outside.iterdir()) == []
    assert store.labels() == [] and catalog_rows(store) == []


def test_case_and_unicode_variants_are_the_same_label(
    store: ImageStore, photos: dict[str, list[bytes]]
) -> None:
    a, b, c, d = photos["t-shirt"][:4]
    assert store.add(a, "t-shirt").label == "t-shirt"
    second = store.add(b, "T-Shirt")
    assert second.label == "t-shirt" and second.path.parent.name == "t-shirt"
    assert store.add(c, "  T-SHIRT ").label == "t-shirt"
    assert store.add(d, "e\u0301").label == "\u00e9"
    assert store.add(photos["hat"][0], "\u00c9").label == "\u00e9"
    assert store.labels() == [LabelInfo("t-shirt", 3), LabelInfo("\u00e9", 2)]
    assert sorted(p.name for p in store.images_dir.iterdir()) == ["t-shirt", "\u00e9"]
    assert store.resolve_label("T-SHIRT") == "t-shirt"
    assert store.resolve_label("E\u0301") == "\u00e9"
    assert store.resolve_label("shorts") is None


def test_add_is_idempotent(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    data = photos["pants"][0]
    first = store.add(data, "pants", added_by=1)
    fingerprint = store.fingerprint()
    again = store.add(data, "PANTS", added_by=2)
    assert again == AddResult(first.sha256, "pants", first.path, created=False)
    assert store.image_count() == 1 and store.fingerprint() == fingerprint
    [row] = catalog_rows(store)
    assert row[3] == 1  # the original provenance is kept


def test_same_image_under_other_label_is_refused(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    data = photos["shirt"][0]
    store.add(data, "Shirt")
    with pytest.raises(DuplicateImageError) as info:
        store.add(data, "longsleeve")
    assert info.value.existing_label == "Shirt"
    assert "Shirt" in info.value.message
    assert store.resolve_label("longsleeve") is None  # no empty folder was created
    assert [r.label for r in store.snapshot()] == ["Shirt"]


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 100, b"<html><body>hi</body></html>"],
)
def test_corrupt_bytes_refused_nothing_stored(tmp_path: Path, data: bytes) -> None:
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageDecodeError) as info:
        store.add(data, "hat")
    assert info.value.message
    assert store.snapshot() == [] and store.labels() == [] and catalog_rows(store) == []
    assert_contained(tmp_path, store)


def test_truncated_photo_refused(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    data = photos["dress"][0]
    with pytest.raises(ImageDecodeError):
        store.add(data[: len(data) // 2], "dress")
    assert store.image_count() == 0


def test_max_pixels_is_applied(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    store = ImageStore(tmp_path / "store", max_pixels=100)
    with pytest.raises(ImageDecodeError):
        store.add(photos["hat"][0], "hat")
    assert store.image_count() == 0


def test_store_full_refuses_and_writes_nothing(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    store = ImageStore(tmp_path / "store", min_free_bytes=10**18)
    with pytest.raises(StoreFullError) as info:
        store.add(photos["hat"][0], "hat", added_by=1)
    assert "space" in info.value.message and str(tmp_path) not in info.value.message
    assert store.snapshot() == [] and store.labels() == [] and catalog_rows(store) == []
    assert_contained(tmp_path, store)


def test_disk_full_while_writing_is_store_full(
    store: ImageStore, photos: dict[str, list[bytes]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store.add(photos["hat"][0], "hat")

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dataset_module.os, "write", no_space)
    with pytest.raises(StoreFullError):
        store.add(photos["hat"][1], "hat")
    with pytest.raises(StoreFullError):
        store.add(photos["pants"][0], "pants")
    monkeypatch.undo()
    assert [r.label for r in store.snapshot()] == ["hat"]
    assert [i.name for i in store.labels()] == ["hat"]  # the new, empty "pants" folder was removed
    assert_contained(tmp_path, store)


def test_failed_replace_leaves_nothing(
    store: ImageStore, photos: dict[str, list[bytes]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store.add(photos["hat"][0], "hat")
    seen: list[str] = []

    def broken_replace(src: str | Path, dst: str | Path) -> None:
        seen.append(str(src))
        assert Path(src).name.startswith(".tmp-") and Path(src).exists()
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(dataset_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.add(photos["hat"][1], "hat", added_by=7)
    monkeypatch.undo()
    assert len(seen) == 1 and not Path(seen[0]).exists()
    assert [r.sha256 for r in store.snapshot()] == [sha(photos["hat"][0])]
    assert len(catalog_rows(store)) == 1 and store.last_added_by(7) == []
    assert_contained(tmp_path, store)
    assert store.add(photos["hat"][1], "hat").created  # and it works again afterwards


def test_no_temp_files_after_many_adds(store: ImageStore, all_photos: list[bytes], tmp_path: Path) -> None:
    for i, data in enumerate(all_photos[:20]):
        store.add(data, f"label {i % 3}")
    assert store.image_count() == 20
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    assert_contained(tmp_path, store)


# ---------------------------------------------------------------------------- remove / rename / delete


def test_remove(store: ImageStore, photos: dict[str, list[bytes]], tmp_path: Path) -> None:
    a, b = photos["skirt"][:2]
    store.add(a, "skirt", added_by=5)
    store.add(b, "skirt", added_by=5)
    assert store.remove(sha(a)) is True
    assert store.remove(sha(a)) is False
    assert store.remove(sha(b).upper()) is True
    assert store.snapshot() == [] and catalog_rows(store) == []
    assert store.labels() == [LabelInfo("skirt", 0)]  # the folder stays; the label still exists
    assert store.last_added_by(5) == []


@pytest.mark.parametrize(
    "bad", ["", "../../etc/passwd", "a" * 63, "g" * 64, "a" * 65, "/" + "a" * 63, "a" * 64 + "/..", 12]
)
def test_remove_refuses_anything_but_a_hash(store: ImageStore, bad: object) -> None:
    with pytest.raises(ValueError):
        store.remove(bad)  # type: ignore[arg-type]


def test_rename_label(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    a, b = photos["outwear"][:2]
    store.add(a, "outwear", added_by=3)
    store.add(b, "outwear", added_by=3)
    store.add(photos["hat"][0], "hat")
    fingerprint = store.fingerprint()
    assert store.rename_label("OUTWEAR", "  jackets ") == "jackets"
    assert store.labels() == [LabelInfo("hat", 1), LabelInfo("jackets", 2)]
    assert not (store.images_dir / "outwear").exists()
    assert {r.label for r in store.snapshot() if r.sha256 in {sha(a), sha(b)}} == {"jackets"}
    assert [r.label for r in store.last_added_by(3, 5)] == ["jackets", "jackets"]
    assert {row[1] for row in catalog_rows(store)} == {"hat", "jackets"}
    assert store.fingerprint() != fingerprint
    assert all(r.path.is_file() for r in store.snapshot())


def test_rename_case_only(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    store.add(photos["t-shirt"][0], "t-shirt")
    assert store.rename_label("t-shirt", "T-Shirt") == "T-Shirt"
    assert [p.name for p in store.images_dir.iterdir()] == ["T-Shirt"]
    assert store.labels() == [LabelInfo("T-Shirt", 1)]
    assert store.add(photos["t-shirt"][1], "t-shirt").label == "T-Shirt"
    assert {row[1] for row in catalog_rows(store)} == {"T-Shirt"}
    assert store.rename_label("T-Shirt", "T-Shirt") == "T-Shirt"


def test_rename_refusals(store: ImageStore, photos: dict[str, list[bytes]], tmp_path: Path) -> None:
    store.add(photos["hat"][0], "hat")
    store.add(photos["shoes"][0], "shoes")
    with pytest.raises(LabelError, match="no label"):
        store.rename_label("caps", "hats")
    with pytest.raises(LabelError, match="already exists"):
        store.rename_label("hat", "SHOES")
    for hostile in HOSTILE_LABELS:
        with pytest.raises(LabelError):
            store.rename_label("hat", hostile)
    assert store.labels() == [LabelInfo("hat", 1), LabelInfo("shoes", 1)]
    assert_contained(tmp_path, store)


def test_delete_label(store: ImageStore, photos: dict[str, list[bytes]], tmp_path: Path) -> None:
    for data in photos["shorts"][:3]:
        store.add(data, "shorts", added_by=9)
    store.add(photos["hat"][0], "hat", added_by=9)
    assert store.delete_label("SHORTS") == 3
    assert store.labels() == [LabelInfo("hat", 1)]
    assert [row[1] for row in catalog_rows(store)] == ["hat"]
    assert [r.label for r in store.last_added_by(9, 10)] == ["hat"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".trash-")]
    with pytest.raises(LabelError):
        store.delete_label("shorts")
    with pytest.raises(LabelError):
        store.delete_label("../images")
    assert store.add(photos["shorts"][0], "Shorts").created  # can be taught again from scratch
    assert_contained(tmp_path, store)


# ---------------------------------------------------------------------------- import_tree


def test_import_tree(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    src = tmp_path / "src"
    (src / "hat" / "nested" / "deeper").mkdir(parents=True)
    (src / "Shoes").mkdir()
    (src / ".hidden").mkdir()
    (src / "CON").mkdir()
    (src / "bad:name").mkdir()
    (src / "empty").mkdir()
    for i, data in enumerate(photos["hat"][:3]):
        (src / "hat" / f"{i}.jpg").write_bytes(data)
    (src / "hat" / "nested" / "deeper" / "UPPER.JPG").write_bytes(photos["hat"][3])
    (src / "hat" / "again.jpeg").write_bytes(photos["hat"][0])  # same image twice, same label
    (src / "hat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "hat" / "notes.txt").write_text("not an image")
    (src / "hat" / "README").write_text("no suffix")
    (src / "Shoes" / "a.jpg").write_bytes(photos["shoes"][0])
    (src / "Shoes" / "cross.jpg").write_bytes(photos["hat"][1])  # already under "hat"
    (src / ".hidden" / "x.jpg").write_bytes(photos["dress"][0])
    (src / "CON" / "x.jpg").write_bytes(photos["dress"][1])
    (src / "bad:name" / "x.jpg").write_bytes(photos["dress"][2])
    (src / "loose.jpg").write_bytes(photos["dress"][3])

    store = ImageStore(tmp_path / "store")
    report = store.import_tree(src)

    assert report.added == 5
    assert report.duplicates == 1
    reasons = dict(report.skipped)
    assert set(reasons) == {
        ".hidden",
        "CON",
        "bad:name",
        "loose.jpg",
        "hat/corrupt.jpg",
        "hat/notes.txt",
        "hat/README",
        "Shoes/cross.jpg",
    }
    assert "not in a label folder" in reasons["loose.jpg"]
    assert "not an image" in reasons["hat/notes.txt"]
    assert "hat" in reasons["Shoes/cross.jpg"]
    assert "image" in reasons["hat/corrupt.jpg"].lower()
    assert all(reason for reason in reasons.values())
    assert store.labels() == [LabelInfo("hat", 4), LabelInfo("Shoes", 1)]
    assert sha(photos["hat"][3]) in {r.sha256 for r in store.snapshot()}
    assert_contained(tmp_path / "store", store)

    again = store.import_tree(src)  # importing twice is harmless
    assert again.added == 0 and again.duplicates == 6
    assert store.image_count() == 5


def test_import_real_clothing_tree(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    report = store.import_tree(DATA)
    total = sum(len(v) for v in photos.values())
    assert report.added == total and report.duplicates == 0
    # Only the licence / provenance files next to the label folders are skipped.
    loose = {p.name for p in DATA.iterdir() if p.is_file()}
    assert report.skipped == [(name, "not in a label folder") for name in sorted(loose, key=str.casefold)]
    assert [i.name for i in store.labels()] == sorted(photos, key=label_key)
    assert [i.count for i in store.labels()] == [len(photos[k]) for k in sorted(photos, key=label_key)]


def test_import_tree_missing_source(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.import_tree(tmp_path / "nope")


# ---------------------------------------------------------------------------- reconcile on reopen


def test_reconcile_file_deleted_by_hand(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    store = ImageStore(tmp_path / "store")
    a = store.add(photos["hat"][0], "hat", added_by=1)
    b = store.add(photos["hat"][1], "hat", added_by=1)
    a.path.unlink()
    assert [r.sha256 for r in store.last_added_by(1, 5)] == [b.sha256]  # missing files never listed
    reopened = ImageStore(tmp_path / "store")
    assert [row[0] for row in catalog_rows(reopened)] == [b.sha256]
    assert reopened.count_added_since(0) == 1
    assert reopened.image_count() == 1


def test_reconcile_file_added_by_hand(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    store = ImageStore(tmp_path / "store")
    store.add(photos["hat"][0], "hat", added_by=1)
    data = photos["pants"][0]
    folder = store.images_dir / "pants"
    folder.mkdir()
    path = folder / f"{sha(data)}.jpg"
    path.write_bytes(data)
    os.utime(path, (1_000_000.0, 1_000_000.0))
    (folder / "holiday photo.jpg").write_bytes(photos["pants"][1])  # not hash-named: ignored
    assert store.snapshot()[-1] == ImageRecord(sha(data), "pants", path)  # folders are the truth

    reopened = ImageStore(tmp_path / "store")
    row = [r for r in catalog_rows(reopened) if r[0] == sha(data)]
    assert row == [(sha(data), "pants", "jpg", None, None, 1_000_000.0)]
    assert reopened.count_added_since(999_999.0) == 2
    assert reopened.count_added_since(time.time() + 10) == 0
    assert reopened.labels() == [LabelInfo("hat", 1), LabelInfo("pants", 1)]
    with pytest.raises(DuplicateImageError):
        reopened.add(data, "hat")


def test_reconcile_folder_renamed_by_hand_keeps_provenance(
    tmp_path: Path, photos: dict[str, list[bytes]]
) -> None:
    store = ImageStore(tmp_path / "store")
    store.add(photos["hat"][0], "hat", added_by=11, chat_id=22, suggested_by=33)
    os.rename(store.images_dir / "hat", store.images_dir / "caps")
    reopened = ImageStore(tmp_path / "store")
    [row] = catalog_rows(reopened)
    assert row[1:5] == ("caps", "jpg", 11, 22)
    assert suggested_by(reopened, photos["hat"][0]) == 33
    assert [r.label for r in reopened.last_added_by(11)] == ["caps"]


def suggested_by(store: ImageStore, data: bytes | None = None) -> object:
    """The ``suggested_by`` column: of one image (``data``), else {sha256: value} of all rows."""
    with sqlite3.connect(store.catalog_path) as conn:
        rows = dict(conn.execute("SELECT sha256, suggested_by FROM images").fetchall())
    return rows.get(sha(data)) if data is not None else rows


def test_add_records_who_suggested_the_label_and_a_duplicate_keeps_the_first_provenance(
    store: ImageStore, photos: dict[str, list[bytes]]
) -> None:
    data = photos["pants"][0]
    assert store.add(data, "pants", added_by=1, chat_id=-3, suggested_by=2).created
    assert store.add(data, "Pants", added_by=4, suggested_by=5).created is False
    [row] = catalog_rows(store)
    assert row[3:5] == (1, -3) and suggested_by(store, data) == 2
    assert store.add(photos["hat"][0], "hat", added_by=1).created
    assert suggested_by(store, photos["hat"][0]) is None


def test_reconcile_removes_leftover_temp_files(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    store = ImageStore(tmp_path / "store")
    store.add(photos["hat"][0], "hat")
    leftover = store.images_dir / "hat" / ".tmp-deadbeef"
    leftover.write_bytes(photos["hat"][1][:1000])
    top_leftover = store.images_dir / ".tmp-cafe"
    top_leftover.write_bytes(b"x")
    trash = store.root / ".trash-0123"
    (trash / "shoes").mkdir(parents=True)
    (trash / "shoes" / "x.jpg").write_bytes(b"x")
    assert store.image_count() == 1  # readers ignore temp files
    reopened = ImageStore(tmp_path / "store")
    assert not leftover.exists() and not top_leftover.exists() and not trash.exists()
    assert reopened.image_count() == 1
    assert_contained(tmp_path, reopened)


def test_reconcile_ignores_bad_folders(tmp_path: Path, photos: dict[str, list[bytes]]) -> None:
    store = ImageStore(tmp_path / "store")
    data = photos["hat"][0]
    for name in ["CON", "bad\nname", ".git"]:
        (store.images_dir / name).mkdir()
        (store.images_dir / name / f"{sha(data)}.jpg").write_bytes(data)
    reopened = ImageStore(tmp_path / "store")
    assert reopened.labels() == [] and reopened.snapshot() == [] and catalog_rows(reopened) == []
    assert reopened.add(data, "hat").created


def test_hand_made_case_duplicate_folders_are_one_label(
    tmp_path: Path, photos: dict[str, list[bytes]]
) -> None:
    store = ImageStore(tmp_path / "store")
    store.add(photos["hat"][0], "hat")
    (store.images_dir / "Hat").mkdir()
    (store.images_dir / "Hat" / f"{sha(photos['hat'][1])}.jpg").write_bytes(photos["hat"][1])
    reopened = ImageStore(tmp_path / "store")
    assert reopened.labels() == [LabelInfo("Hat", 2)]
    assert {r.label for r in reopened.snapshot()} == {"Hat"}
    assert reopened.rename_label("hat", "caps") == "caps"
    assert [p.name for p in reopened.images_dir.iterdir()] == ["caps"]
    assert reopened.labels() == [LabelInfo("caps", 2)]
    assert {row[1] for row in catalog_rows(reopened)} == {"caps"}


def test_rename_onto_one_of_two_hand_made_case_folders(
    tmp_path: Path, photos: dict[str, list[bytes]]
) -> None:
    store = ImageStore(tmp_path / "store")
    store.add(photos["hat"][0], "hat")
    (store.images_dir / "Hat").mkdir()
    (store.images_dir / "Hat" / f"{sha(photos['hat'][1])}.jpg").write_bytes(photos["hat"][1])
    (store.images_dir / "Hat" / f"{sha(photos['hat'][0])}.jpg").write_bytes(photos["hat"][0])
    assert store.rename_label("HAT", "hat") == "hat"
    assert [p.name for p in store.images_dir.iterdir()] == ["hat"]
    assert store.labels() == [LabelInfo("hat", 2)]
    assert len(catalog_rows(ImageStore(tmp_path / "store"))) == 2


# ---------------------------------------------------------------------------- snapshot / fingerprint / queries


def test_snapshot_sorted_and_only_complete_files(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    for label in ["shoes", "Dress", "hat"]:
        for data in photos[label.lower()][:3]:
            store.add(data, label)
    (store.images_dir / "hat" / ".tmp-123").write_bytes(b"partial")
    (store.images_dir / "hat" / ("f" * 64 + ".jpg.partial")).write_bytes(b"partial")
    (store.images_dir / "hat" / "thumbs.db").write_bytes(b"junk")
    (store.images_dir / "hat" / ("a" * 64 + ".jpg")).mkdir()
    snap = store.snapshot()
    assert len(snap) == 9
    assert snap == sorted(snap, key=lambda r: (label_key(r.label), r.sha256))
    assert [r.label for r in snap][:3] == ["Dress"] * 3
    assert all(r.path.is_file() and r.path.stem == r.sha256 for r in snap)
    assert store.image_count() == 9


def test_fingerprint_changes_iff_labelled_set_changes(
    store: ImageStore, photos: dict[str, list[bytes]]
) -> None:
    empty = store.fingerprint()
    assert empty == ImageStore(store.root).fingerprint()
    store.add(photos["hat"][0], "hat")
    one = store.fingerprint()
    assert one != empty
    store.add(photos["hat"][0], "hat")
    store.add(photos["hat"][0], "HAT")
    assert store.fingerprint() == one
    with pytest.raises(DuplicateImageError):
        store.add(photos["hat"][0], "caps")
    assert store.fingerprint() == one
    store.add(photos["hat"][1], "hat")
    two = store.fingerprint()
    assert two not in (empty, one)
    store.remove(sha(photos["hat"][1]))
    assert store.fingerprint() == one
    store.rename_label("hat", "caps")
    assert store.fingerprint() not in (empty, one, two)
    store.rename_label("caps", "hat")
    assert store.fingerprint() == one
    assert ImageStore(store.root).fingerprint() == one
    store.delete_label("hat")
    assert store.fingerprint() == empty


def test_last_added_by_newest_first(store: ImageStore, all_photos: list[bytes]) -> None:
    added = []
    for i, data in enumerate(all_photos[:6]):
        user = 100 if i % 2 == 0 else 200
        added.append((user, store.add(data, f"l{i % 3}", added_by=user)))
    mine = [r.sha256 for u, r in added if u == 100]
    assert [r.sha256 for r in store.last_added_by(100, 10)] == mine[::-1]
    assert [r.sha256 for r in store.last_added_by(100)] == [mine[-1]]
    assert [r.sha256 for r in store.last_added_by(100, 2)] == mine[::-1][:2]
    assert store.last_added_by(100, 0) == []
    assert store.last_added_by(300, 5) == []
    newest = store.last_added_by(200)[0]
    assert newest.path.is_file() and newest.label == "l2"
    store.remove(newest.sha256)
    assert store.last_added_by(200)[0].sha256 != newest.sha256


def test_count_added_since(store: ImageStore, photos: dict[str, list[bytes]]) -> None:
    store.add(photos["hat"][0], "hat")
    middle = time.time()
    time.sleep(0.01)
    store.add(photos["hat"][1], "hat")
    store.add(photos["hat"][2], "hat")
    assert store.count_added_since(0) == 3
    assert store.count_added_since(middle) == 2
    assert store.count_added_since(time.time() + 1) == 0


# ---------------------------------------------------------------------------- concurrency


def test_two_threads_adding_concurrently(store: ImageStore, all_photos: list[bytes], tmp_path: Path) -> None:
    photos = all_photos[:24]
    errors: list[BaseException] = []
    results: list[AddResult] = []
    barrier = threading.Barrier(2)

    def worker(chunk: list[bytes], user: int) -> None:
        barrier.wait()
        try:
            for data in chunk:
                # Both threads add every image once, half under each spelling of the label.
                results.append(store.add(data, "Mixed" if user == 1 else "MIXED", added_by=user))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(photos, u)) for u in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(r.created for r in results) == len(photos)
    assert store.labels() == [LabelInfo(results[0].label, len(photos))]
    assert len(catalog_rows(store)) == len(photos)
    assert_contained(tmp_path, store)


def _process_worker(root: str, paths: list[str], label: str, user: int) -> int:
    store = ImageStore(root)
    created = 0
    for p in paths:
        created += store.add(Path(p).read_bytes(), label, added_by=user).created
    return created


def test_two_processes_share_a_store(tmp_path: Path) -> None:
    paths = [str(p) for p in sorted(DATA.glob("*/*.jpg"))[:16]]
    root = str(tmp_path / "store")
    ImageStore(root)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        created = pool.starmap(_process_worker, [(root, paths, "both", 1), (root, paths, "Both", 2)])
    assert sum(created) == len(paths)
    store = ImageStore(root)
    assert [i.count for i in store.labels()] == [len(paths)]
    assert len(catalog_rows(store)) == len(paths)
    assert_contained(tmp_path, store)
