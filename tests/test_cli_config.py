"""`retrain --config FILE` reads [training] through the flags the bot gives its training subprocess."""

from __future__ import annotations

from pathlib import Path

from bot.__main__ import _parser, _train_config
from bot.config import load_config
from bot.training_runner import retrain_command


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
    assert (args.architecture, args.weights) == ("mobilenet_v2", "none")


def test_the_bot_subprocess_and_the_cli_agree_on_every_training_setting(tmp_path: Path) -> None:
    path = _config(tmp_path)
    from_file = _train_config(_parser().parse_args(["retrain", "--config", str(path)]))
    cmd = retrain_command(load_config(path), store_dir=tmp_path)
    from_subprocess_args = _parser().parse_args(cmd[3:])  # drop "python -m bot"
    assert _train_config(from_subprocess_args).to_dict() == from_file.to_dict()
    assert from_subprocess_args.store_dir == str(tmp_path) and from_subprocess_args.json


def test_without_a_config_the_library_defaults_apply(monkeypatch) -> None:
    monkeypatch.delenv("LABELGRAM_CONFIG", raising=False)
    from model_store.training import TrainConfig

    assert _train_config(_parser().parse_args(["retrain"])).to_dict() == TrainConfig().to_dict()
