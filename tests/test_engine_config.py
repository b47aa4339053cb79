"""The [engine] settings: config file, environment, CLI flags, the training subprocess, and the texts naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bot.__main__ import _engine_settings, _parser
from bot.config import ConfigError, load_config
from bot.models import engine_line
from bot.reports import format_report
from bot.training_runner import TrainingOutcome, retrain_command
from model_store.engine import EngineSettings, available_cores


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_engine_defaults_to_litert_on_every_core(monkeypatch) -> None:
    for key in [k for k in os.environ if k.startswith("LABELGRAM_")]:
        monkeypatch.delenv(key)
    cfg = load_config(None)
    assert (cfg.engine.engine, cfg.engine.threads) == ("litert", 0)
    assert cfg.engine.settings() == EngineSettings("litert", 0)
    assert cfg.engine.settings().num_threads == available_cores()
    assert _engine_settings(_parser().parse_args(["classify", "x.jpg"])) == EngineSettings("litert", 0)


def test_engine_from_file_environment_and_flags(tmp_path: Path, monkeypatch) -> None:
    path = _config(tmp_path, '[engine]\nengine = "tensorflow"\nthreads = 3\n')
    cfg = load_config(path)
    assert cfg.engine.settings() == EngineSettings("tensorflow", 3)
    monkeypatch.setenv("LABELGRAM_ENGINE__THREADS", "1")
    assert load_config(path).engine.threads == 1
    # the CLI reads the config file; an explicit flag wins
    args = _parser().parse_args(["retrain", "--config", str(path)])
    assert _engine_settings(args) == EngineSettings("tensorflow", 1)
    args = _parser().parse_args(["classify", "x.jpg", "--config", str(path), "--engine", "litert"])
    assert _engine_settings(args) == EngineSettings("litert", 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[engine]\nengine = "onnx"\n', "config error: engine.engine: must be 'litert' or 'tensorflow'"),
        ("[engine]\nthreads = -2\n", "config error: engine.threads: must be greater than or equal to 0"),
        ("[engine]\ndelegate = 1\n", "config error: engine.delegate: unknown setting"),
    ],
)
def test_bad_engine_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, text))
    assert str(err.value).startswith(expected), str(err.value)


def test_the_training_subprocess_gets_the_engine_settings(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, '[engine]\nengine = "tensorflow"\nthreads = 2\n'))
    cmd = retrain_command(cfg, store_dir=tmp_path)
    args = _parser().parse_args(cmd[3:])  # drop "python -m bot"
    assert _engine_settings(args) == EngineSettings("tensorflow", 2)


def test_status_and_report_name_the_backbone_and_the_engine() -> None:
    metrics = {
        "accuracy": 0.9,
        "test_images": 10,
        "backbone": {"id": "efficientnet_lite0-imagenet-ab", "name": "efficientnet_lite0"},
        "engine": {"bottlenecks": "LiteRT/XNNPACK, 2 threads", "serving": "LiteRT/XNNPACK, 2 threads"},
        "per_label": {},
    }
    assert engine_line(metrics) == "Backbone: efficientnet_lite0, engine: LiteRT/XNNPACK, 2 threads"
    fallback = "TensorFlow (fallback: conversion failed: ConverterError: tf.BesselI1e not supported)"
    assert engine_line(metrics, fallback) == f"Backbone: efficientnet_lite0, engine: {fallback}"
    # a version trained before the engine existed
    assert engine_line({"backbone": {"name": "mobilenet_v2"}}) == "Backbone: mobilenet_v2, engine: TensorFlow"
    report = format_report(TrainingOutcome("promoted", "ok", version="v1", metrics=metrics))
    assert "Backbone: efficientnet_lite0, engine: LiteRT/XNNPACK, 2 threads" in report
