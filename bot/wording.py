"""What the bot says in chat about the model store's errors, written from the errors' data.

The model store's errors carry data (``reason``, ``label``, ``size``, ``limit_pixels``,
``existing_label``, ``version``, ...) and a plain English ``str(error)`` for logs and the CLI;
the chat texts, in the bot's voice, are written here. :func:`error_text` is the one function
handlers call; an error raised with an explicit message and no data (``reason`` None) is shown as
that message.
"""

from __future__ import annotations

import unicodedata

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
from model_store.labels import MAX_LABEL_LENGTH

__all__ = ["error_text"]

LABEL_RULES = (
    "Labels may use letters of any language, digits, emoji, spaces and punctuation such as - _ ( ) &, "
    f"up to {MAX_LABEL_LENGTH} characters."
)

NOT_TRAINED = "I haven't been trained yet."

STORE_FULL = (
    "The image store is almost out of disk space, so the image was not saved. "
    "Please ask the bot's administrator to free some space."
)

_DECODE_TEXTS = {
    DecodeProblem.EMPTY: "That file is empty.",
    DecodeProblem.NOT_IMAGE: "That doesn't look like an image I can read (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC or AVIF).",
    DecodeProblem.INCOMPLETE: "That image file is incomplete; it may have been cut off while sending.",
    DecodeProblem.DAMAGED: "That image file is damaged and I can't read it.",
    DecodeProblem.COLOURS: "That image uses a colour format I can't read.",
    DecodeProblem.NO_MEMORY: "That image is too large for me to process right now.",
}


def error_text(exc: LabelgramError) -> str:
    """The chat text for a model-store error.

    Args:
        exc: any :class:`~model_store.errors.LabelgramError` (also the bot's own subclasses).

    Returns:
        One or a few polite sentences (no paths, no secrets): made from the error's data, or its
        message when it has no data.
    """
    if isinstance(exc, StoreFullError):
        return STORE_FULL
    if isinstance(exc, DuplicateImageError) and exc.existing_label:
        return (
            f"This image is already saved under the label “{exc.existing_label}”. "
            "Remove it there first if it belongs to a different label."
        )
    if isinstance(exc, NoModelError) and exc.reason is not None:
        return _no_model_text(exc)
    if isinstance(exc, ImageDecodeError) and exc.reason is not None:
        return _decode_text(exc)
    if isinstance(exc, LabelError) and exc.reason is not None:
        return _label_text(exc)
    return exc.message


def _no_model_text(exc: NoModelError) -> str:
    match exc.reason:
        case ModelProblem.NO_SUCH_VERSION:
            return f"There is no model version {exc.version!r}."
        case ModelProblem.INCOMPLETE_VERSION:
            return f"Model version {exc.version!r} is not complete; not promoting it."
        case ModelProblem.NOTHING_TO_ROLL_BACK:
            return "There is no earlier model version to roll back to."
    return NOT_TRAINED


def _decode_text(exc: ImageDecodeError) -> str:
    reason = exc.reason or DecodeProblem.DAMAGED
    if reason is not DecodeProblem.TOO_LARGE:
        return _DECODE_TEXTS[reason]
    limit = f"{(exc.limit_pixels or 0) / 1_000_000:.3g} megapixels"
    if exc.image_format:
        limit += f" for {exc.image_format} images"
    if exc.size is None:
        return f"That image is too large; the limit is {limit}."
    width, height = exc.size
    return f"That image is too large ({width}×{height} pixels); the limit is {limit}."


def _character(ch: str) -> str:
    named = {"\n": "a line break", "\r": "a line break", "\t": "a tab", "\x00": "a NUL character"}
    if ch in named:
        return named[ch]
    name = unicodedata.name(ch, "") if ch else ""
    if name:
        return f"an invisible or control character ({name.title()}, U+{ord(ch):04X})"
    return f"an invisible or control character (U+{ord(ch):04X})" if ch else "a character that is not allowed"


def _label_text(exc: LabelError) -> str:
    first = _character(exc.characters[:1])
    match exc.reason:
        case LabelProblem.NOT_TEXT:
            return f"A label must be text. {LABEL_RULES}"
        case LabelProblem.EMPTY:
            return f"The label is empty. Please type a name for it. {LABEL_RULES}"
        case LabelProblem.TOO_LONG:
            return f"That label is {exc.length} characters long; please keep it to {exc.limit} characters or fewer."
        case LabelProblem.TOO_MANY_BYTES:
            return (
                "That label is too long to store (it uses many multi-byte characters such as emoji); "
                "please make it shorter."
            )
        case LabelProblem.FORBIDDEN_CHARACTERS:
            return (
                f"Labels cannot contain these characters: {' '.join(exc.characters)} (they have a special "
                f"meaning in file paths). {LABEL_RULES}"
            )
        case LabelProblem.LEADING_DOT:
            return f"A label cannot start with a dot. {LABEL_RULES}"
        case LabelProblem.TRAILING_DOT:
            return f"A label cannot end with a dot. {LABEL_RULES}"
        case LabelProblem.RESERVED_NAME:
            return (
                f"“{exc.label}” is a reserved device name on Windows (like CON, PRN, AUX, NUL, COM1 or LPT1), "
                "so it cannot be used as a label. Please choose another name."
            )
        case LabelProblem.LINE_BREAK:
            return f"A label must be a single line without tabs, but this one contains {first}. {LABEL_RULES}"
        case LabelProblem.CONTROL_CHARACTER:
            return f"That label contains {first}, which is not allowed. {LABEL_RULES}"
        case LabelProblem.MISPLACED_JOINER:
            return f"That label contains {first} in a place where it has no effect. {LABEL_RULES}"
    return exc.message
