"""Typed errors of the model store.

Every error carries ``.message``: a short, polite sentence that is safe to show to a chat user
(no paths outside the store, no tracebacks, no secrets). ``str(error)`` gives the same text.
"""

from __future__ import annotations


class LabelgramError(Exception):
    """Base class of every error the model store raises on purpose.

    Args:
        message: human-readable explanation, safe to show to the user who caused it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ImageDecodeError(LabelgramError):
    """The bytes are not an image we can read (empty, not an image, truncated, too large, ...)."""


class LabelError(LabelgramError):
    """A label name is refused (empty, too long, a path, control characters, unknown label, ...)."""


class DuplicateImageError(LabelgramError):
    """The same image (same content hash) is already stored under a different label."""

    def __init__(self, message: str, existing_label: str) -> None:
        super().__init__(message)
        self.existing_label = existing_label


class StoreFullError(LabelgramError):
    """Free disk space is below the configured floor; nothing was written."""


class BackboneUnavailableError(LabelgramError):
    """A backbone cannot be loaded (unknown name, weights not downloadable offline, bad file)."""


class NoModelError(LabelgramError):
    """No trained model version exists yet."""


class TrainingError(LabelgramError):
    """Retraining cannot run or failed (too few labels or images, a crash in the trainer, ...)."""

