"""`retrain --config FILE` and the bot's training subprocess: one name per training setting
(the TrainConfig field), one source of defaults (TrainConfig)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from bot.__main__ import _backbone, _parser, _train_config
from bot.config import ConfigError, TrainingConfig, load_config
from bot.training_runner import retrain_command
from model_store.training import TrainConfig


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        "[training]\nepochs = 7\nlearning_rate = 0.01\nbatch_size = 32\nflip = true\n"
        'validation_percentage = 12\nbackbone = "mobilenet_v2"\nbackbone_weights = "none"\n'
    )
    return path


def test_config_file_settings_reach_the_train_config_and_flags_win(tmp_path: Path) -> None:
    args = _parser().parse_args(["retrain", "--config", str(_config(tmp_path)), "--epochs", "9"])
    cfg = _train_config(args)
    assert (cfg.epochs, cfg.learning_rate, cfg.train_batch_size) == (9, 0.01, 32)
    assert cfg.flip_left_right is True and cfg.validation_percentage == 12.0
    assert _backbone(args) == ("mobilenet_v2", "none")


def test_the_bot_subprocess_and_the_cli_agree_on_every_training_setting(tmp_path: Path) -> None:
    path = _config(tmp_path)
    from_file = _train_config(_parser().parse_args(["retrain", "--config", str(path)]))
    cmd = retrain_command(load_config(path), store_dir=tmp_path)
    from_subprocess_args = _parser().parse_args(cmd[3:])  # drop "python -m bot"
    assert _train_config(from_subprocess_args).to_dict() == from_file.to_dict()
    assert from_subprocess_args.store_dir == str(tmp_path) and from_subprocess_args.json


def test_without_a_config_the_library_defaults_apply(monkeypatch) -> None:
    monkeypatch.delenv("LABELGRAM_CONFIG", raising=False)
    assert _train_config(_parser().parse_args(["retrain"])).to_dict() == TrainConfig().to_dict()
    assert _backbone(_parser().parse_args(["retrain"])) == (None, "imagenet")


def test_config_keys_are_train_config_fields_with_its_defaults(tmp_path: Path) -> None:
    names = {f.name for f in fields(TrainConfig)}
    assert set(TrainingConfig.TRAIN_CONFIG_KEYS) <= names
    assert set(TrainingConfig.TRAIN_CONFIG_KEYS) <= set(TrainingConfig.model_fields)
    # an empty [training] section gives exactly the library's defaults
    path = tmp_path / "empty.toml"
    path.write_text("[training]\n")
    assert load_config(path).training.train_config() == TrainConfig()
    assert _train_config(_parser().parse_args(["retrain", "--config", str(path)])) == TrainConfig()


def test_every_retrain_training_flag_is_named_after_its_setting() -> None:
    retrain = _parser()._subparsers._group_actions[0].choices["retrain"]  # noqa: SLF001 - argparse has no public walk
    group = next(g for g in retrain._action_groups if g.title.startswith("training settings"))  # noqa: SLF001
    for action in group._group_actions:  # noqa: SLF001
        assert f"--{action.dest}" in action.option_strings
        assert action.dest in {f.name for f in fields(TrainConfig)} | {"backbone", "backbone_weights"}
    dests = {a.dest for a in group._group_actions}  # noqa: SLF001
    assert set(TrainingConfig.TRAIN_CONFIG_KEYS) | {"backbone", "backbone_weights"} <= dests


def test_retrain_py_spellings_are_cli_aliases(monkeypatch) -> None:
    monkeypatch.delenv("LABELGRAM_CONFIG", raising=False)
    args = _parser().parse_args(["retrain", "--architecture", "mobilenet_v2", "--weights", "w.h5"])
    assert _backbone(args) == ("mobilenet_v2", "w.h5")
    args = _parser().parse_args(["retrain", "--backbone", "mobilenet_v2", "--backbone_weights", "none"])
    assert _backbone(args) == ("mobilenet_v2", "none")


def test_config_files_with_the_older_key_names_keep_working(tmp_path: Path, monkeypatch) -> None:
    old = tmp_path / "old.toml"
    old.write_text("[training]\nbatch_size = 32\nflip = true\n")
    new = tmp_path / "new.toml"
    new.write_text("[training]\ntrain_batch_size = 32\nflip_left_right = true\n")
    for path in (old, new):
        training = load_config(path).training
        assert (training.train_batch_size, training.flip_left_right) == (32, True)
        cfg = _train_config(_parser().parse_args(["retrain", "--config", str(path)]))
        assert (cfg.train_batch_size, cfg.flip_left_right) == (32, True)
    both = tmp_path / "both.toml"
    both.write_text("[training]\nbatch_size = 32\ntrain_batch_size = 64\n")
    with pytest.raises(ConfigError, match=r"^config error: training.batch_size: is the older name of train_batch_size"):
        load_config(both)
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match=r"^config error: training.train_batch_size: must be greater than or equal to 1"):
        load_config(bad)
    # the environment beats the file, whichever spelling either uses
    monkeypatch.setenv("LABELGRAM_TRAINING__BATCH_SIZE", "16")
    assert load_config(new).training.train_batch_size == 16
    monkeypatch.delenv("LABELGRAM_TRAINING__BATCH_SIZE")
    monkeypatch.setenv("LABELGRAM_TRAINING__TRAIN_BATCH_SIZE", "8")
    assert load_config(old).training.train_batch_size == 8
