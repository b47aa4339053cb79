"""What an operator sees on stderr from ``python -m bot retrain``: progress that fits where it goes
(a live bar on a terminal, a few plain lines in a log) and no TensorFlow start-up chatter."""

from __future__ import annotations

import importlib.metadata
import io
import os
import platform
import pty
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bot.quiet_start import is_startup_chatter
from bot.retrain_progress import LINE_STEP_PERCENT, BarProgress, LineProgress, progress_for
from tests.auxil.modelstore import PYTHON, REPO, cli_env, clothing_photos

STAGES = ("bottlenecks", "training", "evaluating", "saving")
#: a stage's plain lines: one when it starts, one per 10 % step
MAX_LINES_PER_STAGE = 100 // LINE_STEP_PERCENT + 1
PROGRESS_LINE = re.compile(r"^(?P<stage>\w+): (?P<done>\d+)/(?P<total>\d+) \((?P<percent>\d+)%\)$")
#: words of TensorFlow's start-up lines an operator must not see on a CPU machine
NOISE = re.compile(r"cuda|cuinit|absl|onednn|cpu_feature_guard", re.IGNORECASE)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _run_stages(progress, photos: int = 2600, epochs: int = 200) -> None:
    """Drive a progress callback as model_store.pipeline.retrain does, with many small steps."""
    for done in range(0, photos + 1, 32):
        progress("bottlenecks", done, photos)
    progress("bottlenecks", photos, photos)
    for epoch in range(1, 57):  # early stopping: the stage ends before its total
        progress("training", epoch, epochs)
    for stage in ("evaluating", "saving"):
        progress(stage, 0, 1)
        progress(stage, 1, 1)


# ----------------------------------------------------------------------------- choosing the display
def test_a_terminal_gets_the_live_bar_anything_else_plain_lines() -> None:
    assert isinstance(progress_for(_Stream(tty=True)), BarProgress)
    assert isinstance(progress_for(_Stream(tty=False)), LineProgress)
    assert isinstance(progress_for(io.StringIO()), LineProgress)  # StringIO.isatty() is False


def test_the_bar_redraws_in_place_on_a_terminal() -> None:
    stream = _Stream(tty=True)
    bar = progress_for(stream)
    _run_stages(bar)
    bar.close()
    out = stream.getvalue()
    assert out.count("\r") > 80  # redrawn in place, not one line per step
    for stage in STAGES:
        assert f"{stage}:" in out
    assert "2600/2600" in out


def test_a_real_pseudo_terminal_gets_a_drawn_bar_even_when_nobody_sized_it() -> None:
    """A pty that reports 0 columns (``script``, ``docker run -t``): the bar is drawn at 80 columns."""
    master, slave = pty.openpty()  # a new pty has a 0 x 0 window
    try:
        with os.fdopen(os.dup(slave), "w", encoding="utf-8") as stream:
            bar = progress_for(stream)
            assert isinstance(bar, BarProgress)
            for done in range(5):
                bar("bottlenecks", done, 4)
            bar.close()
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(slave)
        os.close(master)
    text = out.decode("utf-8", "replace")
    assert "bottlenecks: 100%|" in text
    assert "\u2588" * 20 in text  # the bar itself, not an empty line


def test_plain_lines_are_few_whatever_the_number_of_steps() -> None:
    stream = _Stream(tty=False)
    _run_stages(progress_for(stream))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    per_stage: dict[str, list[int]] = {}
    for line in lines:
        m = PROGRESS_LINE.match(line)
        assert m, line
        per_stage.setdefault(m["stage"], []).append(int(m["percent"]))
    assert list(per_stage) == list(STAGES)
    # one line per 10 % step: 83 bottleneck calls -> 11 lines; 56 of 200 epochs (early stop) -> 3
    assert [p // LINE_STEP_PERCENT for p in per_stage["bottlenecks"]] == list(range(11))
    assert per_stage["bottlenecks"][-1] == 100
    assert [p // LINE_STEP_PERCENT for p in per_stage["training"]] == [0, 1, 2]
    assert all(len(p) <= MAX_LINES_PER_STAGE for p in per_stage.values())


# ------------------------------------------------------------------------------ start-up chatter
@pytest.mark.parametrize(
    ("line", "chatter"),
    [
        ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", True),
        (
            "I0000 00:00:1796301968.179639    9609 port.cc:153] oneDNN custom operations are on. You may see",
            True,
        ),
        (
            "I0000 00:00:1796301968.180106    9609 cudart_stub.cc:31] Could not find cuda drivers on your machine",
            True,
        ),
        (
            "I0000 00:00:1796301968.540123    9609 cpu_feature_guard.cc:227] This TensorFlow binary is optimized",
            True,
        ),
        (
            "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow",
            True,
        ),
        ("E0000 00:00:1796301984.130575    9609 cuda_platform.cc:52] failed call to cuInit: INTERNAL", False),
        ("W0000 00:00:1796301984.130575    9609 port.cc:153] something went wrong", False),
        ("I0000 00:00:1796301984.130575    9609 some_other.cc:12] a different message", False),
        ("Traceback (most recent call last):", False),
    ],
)
def test_only_the_informational_start_up_lines_are_dropped(line: str, chatter: bool) -> None:
    assert is_startup_chatter(line) is chatter


def _cpu_wheel_installed() -> bool:
    try:
        importlib.metadata.distribution("tensorflow-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_retrain_in_a_log_writes_a_few_progress_lines_and_no_tensorflow_chatter(tmp_path: Path) -> None:
    """``retrain`` as systemd / cron / CI run it: no terminal (pipes), no TF_CPP_MIN_LOG_LEVEL set."""
    src = tmp_path / "photos"
    for label, files in list(clothing_photos().items())[:2]:
        (src / label).mkdir(parents=True)
        for f in files:
            shutil.copy(f, src / label / f.name)
    env = {k: v for k, v in cli_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [PYTHON, "-m", "bot", "retrain", "--image_dir", str(src), "--store_dir", str(tmp_path / "store")]
        + ["--backbone", "efficientnet_lite0", "--epochs", "30", "--min_images_per_label", "3"]
        + ["--accuracy_floor", "0"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr  # no bar redraws in a log
    lines = proc.stderr.splitlines()
    per_stage: dict[str, list[str]] = {}
    for line in lines:
        m = PROGRESS_LINE.match(line)
        if m:
            per_stage.setdefault(m["stage"], []).append(line)
    assert list(per_stage) == list(STAGES), proc.stderr
    assert all(len(v) <= MAX_LINES_PER_STAGE for v in per_stage.values()), per_stage
    assert per_stage["bottlenecks"][-1] == "bottlenecks: 16/16 (100%)"
    assert len(per_stage["training"]) >= 3  # 30 epochs reported in 10 % steps, not 30 lines
    noise = [line for line in lines if NOISE.search(line)]
    if not _cpu_wheel_installed() and sys.platform == "linux" and platform.machine() == "x86_64":
        # an environment installed before tensorflow-cpu (the CUDA wheel) still logs cuInit when the
        # first op runs (an ERROR line, not start-up chatter): `pip uninstall tensorflow; pip install -e .`
        noise = [line for line in noise if "cuInit" not in line]
    assert not noise, noise
