"""Library errors carry data; the bot writes the chat texts from it (bot.wording.error_text).

The chat texts must be exactly those the bot showed before the texts moved to the bot: the
literal expectations below are copied from the library's messages of that time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.wording import NOT_TRAINED, STORE_FULL, error_text
from model_store.errors import (
    DecodeProblem,
    DuplicateImageError,
    ImageDecodeError,
    LabelError,
    LabelgramError,
    LabelProblem,
    ModelProblem,
    NoModelError,
    StoreFullError,
)
from model_store.images import decode_image
from model_store.labels import MAX_LABEL_LENGTH, normalize_label
from model_store.registry import ModelRegistry

CASES = Path(__file__).parent / "data" / "cases"
HINT = (
    "Labels may use letters of any language, digits, emoji, spaces and punctuation such as - _ ( ) &, "
    "up to 64 characters."
)


def _label_error(name: object) -> LabelError:
    with pytest.raises(LabelError) as err:
        normalize_label(name)  # type: ignore[arg-type]
    return err.value


@pytest.mark.parametrize(
    ("name", "reason", "text"),
    [
        (3, LabelProblem.NOT_TEXT, f"A label must be text. {HINT}"),
        ("   ", LabelProblem.EMPTY, f"The label is empty. Please type a name for it. {HINT}"),
        ("a" * 70, LabelProblem.TOO_LONG, "That label is 70 characters long; please keep it to 64 characters or fewer."),
        (
            "𓀀" * 64,
            LabelProblem.TOO_MANY_BYTES,
            "That label is too long to store (it uses many multi-byte characters such as emoji); please make it shorter.",
        ),
        (
            'a/b:c',
            LabelProblem.FORBIDDEN_CHARACTERS,
            f"Labels cannot contain these characters: / : (they have a special meaning in file paths). {HINT}",
        ),
        (".hidden", LabelProblem.LEADING_DOT, f"A label cannot start with a dot. {HINT}"),
        ("end.", LabelProblem.TRAILING_DOT, f"A label cannot end with a dot. {HINT}"),
        (
            "con.txt",
            LabelProblem.RESERVED_NAME,
            "“con.txt” is a reserved device name on Windows (like CON, PRN, AUX, NUL, COM1 or LPT1), so it cannot "
            "be used as a label. Please choose another name.",
        ),
        (
            "a\nb",
            LabelProblem.LINE_BREAK,
            f"A label must be a single line without tabs, but this one contains a line break. {HINT}",
        ),
        (
            "a\u202eb",
            LabelProblem.CONTROL_CHARACTER,
            "That label contains an invisible or control character (Right-To-Left Override, U+202E), which is "
            f"not allowed. {HINT}",
        ),
        (
            "\u200dab",
            LabelProblem.MISPLACED_JOINER,
            "That label contains an invisible or control character (Zero Width Joiner, U+200D) in a place where "
            f"it has no effect. {HINT}",
        ),
    ],
)
def test_label_errors_carry_the_reason_and_the_chat_text_is_unchanged(name, reason, text) -> None:
    exc = _label_error(name)
    assert exc.reason is reason
    assert error_text(exc) == text
    assert exc.message == str(exc) == text  # the library's own sentence (logs, CLI) is still the same


def test_label_error_data() -> None:
    exc = _label_error("a" * (MAX_LABEL_LENGTH + 3))
    assert (exc.label, exc.length, exc.limit) == ("a" * 67, 67, 64)
    assert _label_error("x|y?").characters == "?|"
    assert _label_error("ab\u0007").characters == "\u0007"


def test_image_decode_errors_carry_the_reason_and_the_chat_text_is_unchanged() -> None:
    expected = {
        "empty.jpg": (DecodeProblem.EMPTY, "That file is empty."),
        "text.jpg": (
            DecodeProblem.NOT_IMAGE,
            "That doesn't look like an image I can read (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC or AVIF).",
        ),
        "truncated.jpg": (
            DecodeProblem.INCOMPLETE,
            "That image file is incomplete; it may have been cut off while sending.",
        ),
    }
    for name, (reason, text) in expected.items():
        with pytest.raises(ImageDecodeError) as err:
            decode_image((CASES / name).read_bytes())
        assert err.value.reason is reason, name
        assert error_text(err.value) == text == err.value.message


def test_too_large_image_names_size_and_limit() -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image((CASES / "wide_2000x20.png").read_bytes(), max_pixels=10_000)
    exc = err.value
    assert exc.reason is DecodeProblem.TOO_LARGE and exc.size == (2000, 20) and exc.limit_pixels == 10_000
    assert error_text(exc) == "That image is too large (2000×20 pixels); the limit is 0.01 megapixels." == exc.message
    made = ImageDecodeError(reason=DecodeProblem.TOO_LARGE, limit_pixels=50_000_000, image_format="WebP")
    assert error_text(made) == "That image is too large; the limit is 50 megapixels for WebP images."


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        (DecodeProblem.DAMAGED, "That image file is damaged and I can't read it."),
        (DecodeProblem.COLOURS, "That image uses a colour format I can't read."),
        (DecodeProblem.NO_MEMORY, "That image is too large for me to process right now."),
    ],
)
def test_other_decode_reasons(reason: DecodeProblem, text: str) -> None:
    assert error_text(ImageDecodeError(reason=reason)) == text


def test_no_model_texts_the_bot_voice_lives_in_the_bot(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(NoModelError) as err:
        registry.rollback()
    assert err.value.reason is ModelProblem.NOTHING_TO_ROLL_BACK
    assert error_text(err.value) == "There is no earlier model version to roll back to." == err.value.message
    with pytest.raises(NoModelError) as err:
        registry.get("v-missing")
    assert (err.value.reason, err.value.version) == (ModelProblem.NO_SUCH_VERSION, "v-missing")
    assert error_text(err.value) == "There is no model version 'v-missing'."
    not_trained = NoModelError()
    assert not_trained.reason is ModelProblem.NOT_TRAINED
    assert error_text(not_trained) == NOT_TRAINED == "I haven't been trained yet."
    assert "I " not in str(not_trained)  # the library speaks plainly, not as the bot


def test_store_full_and_duplicate_texts() -> None:
    from model_store import dataset

    assert error_text(StoreFullError(dataset._STORE_FULL_MESSAGE)) == STORE_FULL == dataset._STORE_FULL_MESSAGE  # noqa: SLF001
    dup = DuplicateImageError("whatever the library said", existing_label="shoes")
    assert error_text(dup) == (
        "This image is already saved under the label “shoes”. Remove it there first if it belongs to a different label."
    )


def test_errors_without_data_show_their_message() -> None:
    class FileTooLarge(LabelgramError):
        pass

    assert error_text(FileTooLarge("That file is too big.")) == "That file is too big."
    assert error_text(LabelError("There is no label called “x”.")) == "There is no label called “x”."
    assert error_text(NoModelError("custom")) == "custom"


def test_every_reason_has_its_own_text() -> None:
    texts = {error_text(LabelError(reason=r, label="x", characters="\t", length=70, limit=64)) for r in LabelProblem}
    assert len(texts) == len(LabelProblem)
    texts = {error_text(ImageDecodeError(reason=r, limit_pixels=1_000_000)) for r in DecodeProblem}
    assert len(texts) == len(DecodeProblem)
    texts = {error_text(NoModelError(reason=r, version="v1")) for r in ModelProblem}
    assert len(texts) == len(ModelProblem)
