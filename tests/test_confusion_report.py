"""Issue 8.3: labels never reach a parser, and the confusion-matrix report always reaches the admin.

* Labels such as ``price $5_$10`` or ``a$^$b`` made matplotlib's mathtext raise ``ValueError``
  (every training then failed); they are drawn as typed.
* 100 labels made a 5750x5175 PNG (over ``sendPhoto``'s width + height <= 10000): the figure is
  now bounded (the most confused labels), and the full matrix is a CSV next to it.
* A picture Telegram would refuse as a photo is sent as a document.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from telegram import Bot

from bot.reports import fits_as_photo, send_report
from bot.training_runner import TrainingOutcome
from model_store.evaluation import PLOT_MAX_LABELS, evaluate, most_confused, plot_confusion_matrix
from tests.auxil import modelstore as fx
from tests.auxil.bot_harness import ADMIN
from tests.auxil.crafted_images import solid_png
from tests.botapi_standin import BotApiStandIn

HOSTILE = ["price $5_$10", "a$^$b", "$", "$$", r"\frac{a}{b}", "_^", "x" * 300, "new\nline", "=cmd()", "Розы 👗"]


def _evaluation(labels: list[str], seed: int = 0):
    n = len(labels)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n, 12 * n)
    pred = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, n, len(y)))
    probs = np.full((len(y), n), 0.1 / n, np.float32)
    probs[np.arange(len(y)), pred] = 0.9
    return evaluate(probs, y, labels)


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
def test_labels_with_mathtext_syntax_are_plotted_as_plain_text(tmp_path: Path) -> None:
    out = plot_confusion_matrix(_evaluation(HOSTILE), tmp_path / "cm.png", title="v$1$: a_b ^")
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.width + im.height <= 10_000


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
def test_a_hundred_labels_give_a_bounded_picture_and_the_full_matrix_as_csv(tmp_path: Path) -> None:
    labels = [f"label {i}" for i in range(97)] + HOSTILE[:3]
    ev = _evaluation(labels)
    out = plot_confusion_matrix(ev, tmp_path / "confusion_matrix.png")
    with Image.open(out) as im:
        assert im.width <= 2000 and im.height <= 2000  # 5750x5175 before
    assert fits_as_photo(out.read_bytes())
    with open(tmp_path / "confusion_matrix.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == labels and [r[0] for r in rows[1:]] == labels
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == ev.confusion_matrix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.csv", "confusion_matrix.png"]


def test_few_labels_write_no_csv_and_most_confused_picks_the_confused(tmp_path: Path) -> None:
    plot_confusion_matrix(_evaluation(["a", "b", "c"]), tmp_path / "cm.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]
    m = np.diag([10, 10, 10, 10])
    m[1, 3] = 5
    m[2, 0] = 1
    assert most_confused(m, 2) == [1, 3]
    assert most_confused(m, 10) == [0, 1, 2, 3]
    assert PLOT_MAX_LABELS >= 10


def test_fits_as_photo_follows_telegrams_limits() -> None:
    assert fits_as_photo(solid_png(900, 800))
    assert not fits_as_photo(solid_png(5750, 5175))  # width + height > 10000
    assert not fits_as_photo(solid_png(4000, 100))  # ratio over 20
    assert not fits_as_photo(b"\0" * (10 * 1024 * 1024 + 1))
    assert not fits_as_photo(b"not an image")


async def test_a_report_that_cannot_be_a_photo_is_sent_as_a_document(tmp_path: Path) -> None:
    version = tmp_path / "v1"
    version.mkdir()
    (version / "confusion_matrix.png").write_bytes(solid_png(5750, 5175))
    (version / "confusion_matrix.csv").write_text("true \\ predicted,a\na,1\n", encoding="utf-8")
    outcome = TrainingOutcome("promoted", "done", version="v1", confusion_png=version / "confusion_matrix.png")
    async with BotApiStandIn() as api:
        api.make_text_update(ADMIN, ADMIN, "/start")  # the admin's private chat exists
        bot = Bot(api.token, base_url=api.base_url, base_file_url=api.base_file_url)
        async with bot:
            await send_report(bot, ADMIN, outcome)
        assert [c.method for c in api.sent_calls(chat_id=ADMIN)] == ["sendMessage", "sendDocument", "sendDocument"]
        assert all(c.ok for c in api.sent_calls())
        names = [c.result["document"]["file_name"] for c in api.sent_calls("sendDocument")]
        assert names == ["confusion_matrix.png", "confusion_matrix.csv"]
        # a small one still goes as a photo, and without a CSV nothing more is sent
        (version / "confusion_matrix.png").write_bytes(solid_png(900, 800))
        (version / "confusion_matrix.csv").unlink()
        async with bot:
            await send_report(bot, ADMIN, outcome)
        assert [c.method for c in api.sent_calls(chat_id=ADMIN)][3:] == ["sendMessage", "sendPhoto"]


# -------------------------------------------------------------------- a real training with them

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")
def test_a_training_with_labels_full_of_dollars_and_carets_succeeds(
    clothing_store: fx.TrainedStore, tmp_path: Path
) -> None:
    from model_store.pipeline import retrain

    ws = fx.copy_store(clothing_store.root, tmp_path / "store")
    old = fx.clothing_labels()
    ws.store.rename_label(old[0], "price $5_$10")
    ws.store.rename_label(old[1], "a$^$b")
    report = retrain(ws, fx.train_config(accuracy_floor=0.0, max_accuracy_drop=1.0), backbone=fx.shared_backbone())
    assert report.status == "promoted", report.message
    assert {"price $5_$10", "a$^$b"} <= set(report.metrics["labels"])
    with Image.open(report.confusion_png) as im:
        im.load()
        assert fits_as_photo(report.confusion_png.read_bytes())
