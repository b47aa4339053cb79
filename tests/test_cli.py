"""``python -m bot retrain | classify | status | rollback`` as a user (or the bot's scheduler) runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_store.backbones import DEFAULT_BACKBONE
from model_store.registry import ModelRegistry
from tests.auxil.modelstore import (
    CASES,
    CLOTHING,
    TrainedStore,
    clothing_labels,
    clothing_photos,
    json_lines,
    run_cli,
)

STAGES = ["bottlenecks", "training", "evaluating", "saving"]


@pytest.fixture(scope="module")
def cli_trained(tmp_path_factory) -> dict:
    """One real ``retrain --image_dir tests/data/clothing ... --json`` run into a fresh store."""
    tmp = tmp_path_factory.mktemp("cli")
    store = tmp / "store"
    labels_out = tmp / "labels.txt"
    proc = run_cli(
        "retrain",
        "--image_dir",
        CLOTHING,
        "--store_dir",
        store,
        "--epochs",
        "20",
        "--min_images_per_label",
        "5",
        "--output_labels",
        labels_out,
        "--output_graph",
        tmp / "graph.keras",
        # 10% of 80 photos is ~10 test images: keep the promotion gate's floor well below the ~60%
        # this small training reaches, so the run's outcome does not hinge on one photo
        "--accuracy_floor",
        "0.2",
        "--json",
    )
    return {"proc": proc, "store": store, "labels_out": labels_out, "tmp": tmp}


def _result(cli_trained: dict) -> dict:
    return json_lines(cli_trained["proc"].stdout)[-1]


# ------------------------------------------------------------------------------------- retrain
@pytest.mark.slow
def test_retrain_json_lines_import_progress_result(cli_trained: dict) -> None:
    proc = cli_trained["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    events = json_lines(proc.stdout)  # every stdout line is JSON

    first = events[0]
    assert first["event"] == "import"
    assert first["added"] == 80 and first["duplicates"] == 0
    assert sorted(s["file"] for s in first["skipped"]) == ["LICENSE", "PROVENANCE.md", "README.md"]
    assert all(s["reason"] for s in first["skipped"])

    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all(set(e) == {"event", "stage", "done", "total"} for e in progress)
    stages = [e["stage"] for e in progress]
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == STAGES
    bottlenecks = [(e["done"], e["total"]) for e in progress if e["stage"] == "bottlenecks"]
    assert bottlenecks[0] == (0, 80) and bottlenecks[-1] == (80, 80)
    assert all(e["total"] == 20 for e in progress if e["stage"] == "training")

    result = events[-1]
    assert result["event"] == "result"
    assert [e["event"] for e in events].count("result") == 1
    assert result["status"] == "promoted", result["message"]
    assert result["version"] and result["version"] in result["message"]
    assert result["metrics"]["labels"] == clothing_labels()
    assert result["metrics"]["config"]["epochs"] == 20
    assert result["metrics"]["bottleneck_cache"]["computed"] == 80
    assert Path(result["confusion_png"]).is_file()
    assert result["excluded_labels"] == [] and result["skipped_images"] == []


@pytest.mark.slow
def test_retrain_writes_the_version_output_labels_and_graph(cli_trained: dict) -> None:
    result = _result(cli_trained)
    registry = ModelRegistry(cli_trained["store"] / "models")
    assert registry.current().name == result["version"]
    vdir = registry.root / result["version"]
    assert cli_trained["labels_out"].read_text(encoding="utf-8") == (vdir / "labels.txt").read_text(
        encoding="utf-8"
    )
    assert cli_trained["labels_out"].read_text(encoding="utf-8").splitlines() == clothing_labels()
    assert (cli_trained["tmp"] / "graph.keras").read_bytes() == (vdir / "model.keras").read_bytes()
    assert json.loads((vdir / "metrics.json").read_text(encoding="utf-8")) == result["metrics"]
    assert sorted(p.name for p in (cli_trained["store"] / "images").iterdir()) == sorted(clothing_labels())


@pytest.mark.slow
def test_retrain_with_one_label_exits_1_with_a_failed_result(tmp_path: Path) -> None:
    src = tmp_path / "src" / "hat"
    src.mkdir(parents=True)
    for p in clothing_photos()["hat"]:
        shutil.copy(p, src / p.name)
    proc = run_cli("retrain", "--image_dir", src.parent, "--store_dir", tmp_path / "store", "--json")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    events = json_lines(proc.stdout)
    assert events[0]["event"] == "import" and events[0]["added"] == 8
    assert events[-1]["event"] == "result" and events[-1]["status"] == "failed"
    assert "at least 2 labels" in events[-1]["message"]
    assert events[-1]["version"] is None
    assert ModelRegistry(tmp_path / "store" / "models").versions() == []


def test_retrain_with_impossible_percentages_reports_an_error_not_a_traceback(tmp_path: Path) -> None:
    """validation 60% + testing 50% cannot be honoured; the user must get a message, not a crash."""
    proc = run_cli(
        "retrain",
        "--store_dir",
        tmp_path / "store",
        "--validation_percentage",
        "60",
        "--testing_percentage",
        "50",
        "--json",
    )
    assert proc.returncode in (1, 2)  # failed result, or an argparse usage error
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert "percentage" in proc.stdout + proc.stderr
    if proc.returncode == 1:  # --json promises a final result line
        result = json_lines(proc.stdout)[-1]
        assert result["event"] == "result" and result["status"] == "failed"


# ------------------------------------------------------------------------------------ classify
@pytest.mark.slow
def test_classify_json_one_object_per_file_and_exit_1_when_one_fails(cli_trained: dict) -> None:
    shoe = clothing_photos()["shoes"][0]
    missing = cli_trained["tmp"] / "no_such_photo.jpg"
    proc = run_cli(
        "classify",
        shoe,
        CASES / "text.jpg",
        missing,
        "--store_dir",
        cli_trained["store"],
        "--json",
        "--top_k",
        "3",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    good, text, gone = json_lines(proc.stdout)

    assert good["file"] == str(shoe)
    assert good["version"] == _result(cli_trained)["version"]
    assert "error" not in good
    assert len(good["labels"]) == 3
    probs = [x["probability"] for x in good["labels"]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert good["labels"][0]["label"] == "shoes"
    assert {x["label"] for x in good["labels"]} <= set(clothing_labels())

    assert text["file"] == str(CASES / "text.jpg")
    assert text["error"] and "labels" not in text
    assert gone["file"] == str(missing)
    assert "cannot read the file" in gone["error"]


@pytest.mark.slow
def test_classify_text_output_and_exit_0(cli_trained: dict) -> None:
    files = [clothing_photos()["shoes"][1], CASES / "photo.heic", CASES / "animated.gif", CASES / "cmyk.jpg"]
    proc = run_cli("classify", *files, "--store_dir", cli_trained["store"], "--top_k", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 * len(files)
    for k, f in enumerate(files):
        assert lines[3 * k] == str(f)
        for line in lines[3 * k + 1 : 3 * k + 3]:
            label, _, prob = line.strip().rpartition(" (")
            assert label in clothing_labels()
            assert 0.0 <= float(prob.rstrip(")")) <= 1.0
    assert lines[1].strip().startswith("shoes (")


def test_classify_without_a_model_exits_1_with_a_hint(tmp_path: Path) -> None:
    proc = run_cli("classify", clothing_photos()["hat"][0], "--store_dir", tmp_path / "empty", "--json")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "retrain" in proc.stderr
    assert proc.stdout.strip() == ""


# -------------------------------------------------------------------------------------- status
@pytest.mark.slow
def test_status_json(cli_trained: dict) -> None:
    proc = run_cli("status", "--store_dir", cli_trained["store"], "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (info,) = json_lines(proc.stdout)
    result = _result(cli_trained)
    assert info["version"] == result["version"]
    assert info["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert info["labels"] == {label: 8 for label in clothing_labels()}
    assert info["images_added_since_training"] == 0
    assert info["backbone"] == DEFAULT_BACKBONE
    assert info["engine"] == result["metrics"]["engine"]["serving"] and info["engine"].startswith("LiteRT/XNNPACK")


@pytest.mark.slow
def test_status_text_and_before_training(cli_trained: dict, tmp_path: Path) -> None:
    proc = run_cli("status", "--store_dir", cli_trained["store"])
    assert proc.returncode == 0
    assert f"serving version: {_result(cli_trained)['version']}" in proc.stdout
    assert "  shoes: 8 images" in proc.stdout
    assert f"backbone: {DEFAULT_BACKBONE}; engine when trained: LiteRT/XNNPACK" in proc.stdout
    empty = run_cli("status", "--store_dir", tmp_path / "new", "--json")
    assert empty.returncode == 0
    (info,) = json_lines(empty.stdout)
    assert info == {
        "version": None,
        "accuracy": None,
        "backbone": None,
        "engine": None,
        "labels": {},
        "images_added_since_training": 0,
    }


# ------------------------------------------------------------------------------------ rollback
@pytest.mark.slow
def test_rollback_with_only_one_version_exits_1(cli_trained: dict) -> None:
    pointer = cli_trained["store"] / "models" / "CURRENT"
    before = pointer.read_bytes()
    proc = run_cli("rollback", "--store_dir", cli_trained["store"])
    assert proc.returncode == 1
    assert "no earlier model version" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert pointer.read_bytes() == before


def test_rollback_to_the_previous_version(clothing_store_v2: TrainedStore, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(clothing_store_v2.root, store)
    v1, _ = clothing_store_v2.versions
    proc = run_cli("rollback", "--store_dir", store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"now serving {v1}"
    assert ModelRegistry(store / "models").current().name == v1
    again = run_cli("rollback", "--store_dir", store)
    assert again.returncode == 1 and "no earlier model version" in again.stderr
