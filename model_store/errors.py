"""Typed errors of the model store: each carries data, and a plain English sentence for logs and the CLI.

The data says what went wrong (a ``reason`` from a :class:`~enum.StrEnum`, the label, the image
size, the limit, ...); ``str(error)`` is a sentence made from it for logs and the command line (no
paths outside the store, no tracebacks, no secrets). The bot writes its own chat texts from the
data (``bot.wording.error_text``).

``error.message`` is the same text as ``str(error)``: kept for callers written before the data
existed. An error raised with an explicit message (``LabelError("...")``) has ``reason`` None.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BackboneUnavailableError",
    "DecodeProblem",
    "DuplicateImageError",
    "ImageDecodeError",
    "LabelError",
    "LabelProblem",
    "LabelgramError",
    "ModelProblem",
    "NoModelError",
    "NotYourPhotoError",
    "ReviewItemGoneError",
    "StoreFullError",
    "TrainingError",
    "UnknownAnswerError",
    "describe_character",
    "label_rules_hint",
]


class LabelgramError(Exception):
    """Base class of every error the model store raises on purpose.

    Args:
        message: the sentence for logs and the CLI; None makes it from the error's data.
    """

    def __init__(self, message: str | None = None) -> None:
        text = message if message is not None else self._describe()
        super().__init__(text)
        self.message = text

    def _describe(self) -> str:
        return "The model store refused the request."


# ------------------------------------------------------------------------------------------------
# images


class DecodeProblem(StrEnum):
    """Why bytes could not be decoded as an image."""

    EMPTY = "empty"
    NOT_IMAGE = "not_image"
    """Not one of the accepted formats (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC, AVIF)."""
    INCOMPLETE = "incomplete"
    """Truncated: the file ends before the image data does."""
    DAMAGED = "damaged"
    COLOURS = "colours"
    """A colour mode that cannot be converted to RGB."""
    NO_MEMORY = "no_memory"
    """The decode does not fit in the memory available right now."""
    TOO_LARGE = "too_large"
    """More pixels than the limit (``limit_pixels``; ``size`` when the header gave it)."""


class ImageDecodeError(LabelgramError):
    """The bytes are not an image we can read (empty, not an image, truncated, too large, ...).

    Attributes:
        reason: a :class:`DecodeProblem` (None when raised with a message only).
        size: ``(width, height)`` in pixels from the header, for ``TOO_LARGE`` when known.
        limit_pixels: the pixel limit that was exceeded, for ``TOO_LARGE``.
        image_format: the format the limit is specific to ("JPEG", "progressive JPEG", "WebP",
            ...), or "" when the general limit applies.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: DecodeProblem | None = None,
        size: tuple[int, int] | None = None,
        limit_pixels: int | None = None,
        image_format: str = "",
    ) -> None:
        self.reason = DecodeProblem(reason) if reason is not None else None
        self.size = size
        self.limit_pixels = limit_pixels
        self.image_format = image_format
        super().__init__(message)

    def _describe(self) -> str:
        reason = self.reason or DecodeProblem.DAMAGED
        if reason is DecodeProblem.TOO_LARGE:
            limit = f"{(self.limit_pixels or 0) / 1_000_000:.3g} megapixels"
            if self.image_format:
                limit += f" for {self.image_format} images"
            if self.size is None:
                return f"That image is too large; the limit is {limit}."
            return f"That image is too large ({self.size[0]}×{self.size[1]} pixels); the limit is {limit}."
        return _DECODE_SENTENCES[reason]


_DECODE_SENTENCES = {
    DecodeProblem.EMPTY: "That file is empty.",
    DecodeProblem.NOT_IMAGE: "That doesn't look like an image I can read (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC or AVIF).",
    DecodeProblem.INCOMPLETE: "That image file is incomplete; it may have been cut off while sending.",
    DecodeProblem.DAMAGED: "That image file is damaged and I can't read it.",
    DecodeProblem.COLOURS: "That image uses a colour format I can't read.",
    DecodeProblem.NO_MEMORY: "That image is too large for me to process right now.",
}


# ------------------------------------------------------------------------------------------------
# labels


class LabelProblem(StrEnum):
    """Why a label name is refused (``model_store.labels.normalize_label``)."""

    NOT_TEXT = "not_text"
    EMPTY = "empty"
    TOO_LONG = "too_long"
    """More than ``limit`` characters (``length`` gives how many)."""
    TOO_MANY_BYTES = "too_many_bytes"
    """More than ``limit`` bytes in UTF-8 (many multi-byte characters such as emoji)."""
    FORBIDDEN_CHARACTERS = "forbidden_characters"
    """One or more of ``/ \\ : < > " | ? *`` (``characters``)."""
    LEADING_DOT = "leading_dot"
    TRAILING_DOT = "trailing_dot"
    RESERVED_NAME = "reserved_name"
    """A Windows device name (CON, PRN, AUX, NUL, COM1, LPT1, ...)."""
    LINE_BREAK = "line_break"
    """A line break, tab or other whitespace control character (``characters``: the first one)."""
    CONTROL_CHARACTER = "control_character"
    """An invisible, control or non-character code point (``characters``: the first one)."""
    MISPLACED_JOINER = "misplaced_joiner"
    """A zero-width (non-)joiner not between two visible characters (``characters``)."""


#: the longest label, in characters (``model_store.labels.MAX_LABEL_LENGTH`` is this number)
_MAX_LABEL_LENGTH = 64


def label_rules_hint(max_length: int = _MAX_LABEL_LENGTH) -> str:
    """The sentence saying what a label may contain."""
    return (
        "Labels may use letters of any language, digits, emoji, spaces and punctuation such as - _ ( ) &, "
        f"up to {max_length} characters."
    )


def describe_character(ch: str) -> str:
    """A character refused in a label, in words ("a line break", "an invisible or control character (...)")."""
    import unicodedata

    named = {"\n": "a line break", "\r": "a line break", "\t": "a tab", "\x00": "a NUL character"}
    if ch in named:
        return named[ch]
    name = unicodedata.name(ch, "")
    if name:
        return f"an invisible or control character ({name.title()}, U+{ord(ch):04X})"
    return f"an invisible or control character (U+{ord(ch):04X})"


class LabelError(LabelgramError):
    """A label name is refused (empty, too long, a path, control characters, unknown label, ...).

    Attributes:
        reason: a :class:`LabelProblem` (None when raised with a message only).
        label: the refused label as normalised so far (None when not text).
        characters: the offending characters, for the character problems.
        length / limit: for ``TOO_LONG`` (characters) and ``TOO_MANY_BYTES`` (limit in bytes).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: LabelProblem | None = None,
        label: str | None = None,
        characters: str = "",
        length: int | None = None,
        limit: int | None = None,
    ) -> None:
        self.reason = LabelProblem(reason) if reason is not None else None
        self.label = label
        self.characters = characters
        self.length = length
        self.limit = limit
        super().__init__(message)

    def _describe(self) -> str:
        hint = label_rules_hint()
        first = describe_character(self.characters[:1]) if self.characters else "a character"
        match self.reason:
            case LabelProblem.NOT_TEXT:
                return f"A label must be text. {hint}"
            case LabelProblem.EMPTY:
                return f"The label is empty. Please type a name for it. {hint}"
            case LabelProblem.TOO_LONG:
                return (
                    f"That label is {self.length} characters long; please keep it to {self.limit} "
                    "characters or fewer."
                )
            case LabelProblem.TOO_MANY_BYTES:
                return (
                    "That label is too long to store (it uses many multi-byte characters such as emoji); "
                    "please make it shorter."
                )
            case LabelProblem.FORBIDDEN_CHARACTERS:
                shown = " ".join(self.characters)
                return (
                    f"Labels cannot contain these characters: {shown} (they have a special meaning in file "
                    f"paths). {hint}"
                )
            case LabelProblem.LEADING_DOT:
                return f"A label cannot start with a dot. {hint}"
            case LabelProblem.TRAILING_DOT:
                return f"A label cannot end with a dot. {hint}"
            case LabelProblem.RESERVED_NAME:
                return (
                    f"“{self.label}” is a reserved device name on Windows (like CON, PRN, AUX, NUL, COM1 or "
                    "LPT1), so it cannot be used as a label. Please choose another name."
                )
            case LabelProblem.LINE_BREAK:
                return f"A label must be a single line without tabs, but this one contains {first}. {hint}"
            case LabelProblem.CONTROL_CHARACTER:
                return f"That label contains {first}, which is not allowed. {hint}"
            case LabelProblem.MISPLACED_JOINER:
                return f"That label contains {first} in a place where it has no effect. {hint}"
        return "That label cannot be used."


class DuplicateImageError(LabelgramError):
    """The same image (same content hash) is already stored under a different label.

    Attributes:
        existing_label: the label it is stored under.
    """

    def __init__(self, message: str | None = None, existing_label: str = "") -> None:
        self.existing_label = existing_label
        super().__init__(message)

    def _describe(self) -> str:
        return (
            f"This image is already saved under the label “{self.existing_label}”. "
            "Remove it there first if it belongs to a different label."
        )


class StoreFullError(LabelgramError):
    """Free disk space is below the configured floor; nothing was written."""

    def _describe(self) -> str:
        return (
            "The image store is almost out of disk space, so the image was not saved. "
            "Please ask the bot's administrator to free some space."
        )


class BackboneUnavailableError(LabelgramError):
    """A backbone cannot be loaded (unknown name, weights not downloadable offline, bad file)."""


# ------------------------------------------------------------------------------------------------
# models


class ModelProblem(StrEnum):
    """Why there is no model to use."""

    NOT_TRAINED = "not_trained"
    """No version has been promoted yet."""
    NO_SUCH_VERSION = "no_such_version"
    INCOMPLETE_VERSION = "incomplete_version"
    """The version folder lacks a file; it is not promoted."""
    NOTHING_TO_ROLL_BACK = "nothing_to_roll_back"


class NoModelError(LabelgramError):
    """No (usable) trained model version exists.

    Attributes:
        reason: a :class:`ModelProblem` (default ``NOT_TRAINED``; None when raised with a message only).
        version: the version name concerned, for ``NO_SUCH_VERSION`` and ``INCOMPLETE_VERSION``.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: ModelProblem | None = None,
        version: str | None = None,
    ) -> None:
        if reason is None and message is None:
            reason = ModelProblem.NOT_TRAINED
        self.reason = ModelProblem(reason) if reason is not None else None
        self.version = version
        super().__init__(message)

    def _describe(self) -> str:
        match self.reason:
            case ModelProblem.NO_SUCH_VERSION:
                return f"There is no model version {self.version!r}."
            case ModelProblem.INCOMPLETE_VERSION:
                return f"Model version {self.version!r} is not complete; not promoting it."
            case ModelProblem.NOTHING_TO_ROLL_BACK:
                return "There is no earlier model version to roll back to."
        return "No model has been trained yet."


class TrainingError(LabelgramError):
    """Retraining cannot run or failed (too few labels or images, a crash in the trainer, ...)."""


# ------------------------------------------------------------------------------------------------
# review queue and feedback (model_store.review)


class UnknownAnswerError(LabelgramError):
    """Feedback on an answer the store does not hold (expired, withdrawn, evicted or never recorded).

    Attributes:
        answer_id: the answer id given.
    """

    def __init__(self, message: str | None = None, *, answer_id: int = 0) -> None:
        self.answer_id = answer_id
        super().__init__(message)

    def _describe(self) -> str:
        return f"Answer {self.answer_id} is no longer kept, so feedback on it cannot be recorded."


class NotYourPhotoError(LabelgramError):
    """Feedback from someone other than the person who sent the photo; nothing was recorded.

    Attributes:
        answer_id: the answer concerned.
        user_id: who tried to give feedback.
    """

    def __init__(self, message: str | None = None, *, answer_id: int = 0, user_id: int = 0) -> None:
        self.answer_id = answer_id
        self.user_id = user_id
        super().__init__(message)

    def _describe(self) -> str:
        return "Only the person who sent the photo can say whether the answer was right."


class ReviewItemGoneError(LabelgramError):
    """A review item is no longer pending: another admin resolved it, or it expired or was withdrawn.

    Attributes:
        item_id: the item concerned.
        status: ``"accepted"`` or ``"discarded"`` when an admin resolved it, None when it is gone
            (expired, withdrawn by its sender, evicted from a full queue, or never existed).
    """

    def __init__(self, message: str | None = None, *, item_id: int = 0, status: str | None = None) -> None:
        self.item_id = item_id
        self.status = status
        super().__init__(message)

    def _describe(self) -> str:
        if self.status is not None:
            return f"Review item {self.item_id} was already {self.status}."
        return f"Review item {self.item_id} is no longer in the queue."
