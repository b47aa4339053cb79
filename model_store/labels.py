"""Label names: normalisation, validation and the comparison key.

A label is what an admin types to name a class ("shoes", "T-Shirt", "Розы", "👗 dress"). The
normalised form is used both as the name shown to users and as the name of the label's folder in
the image store, so it must be safe as a single file-name component on Linux, macOS and Windows.

Rules applied by :func:`normalize_label`, in this order:

1. The name is put in Unicode NFC form (so "é" typed as ``e`` + U+0301 becomes U+00E9).
2. Control and format characters are refused (Unicode categories Cc, Cf, Cs, Co: NUL, newline, tab,
   bidi overrides, private-use characters, ...). Two exceptions keep real-world text working: the
   zero-width joiner and non-joiner (U+200D, U+200C) are allowed *between* two visible characters,
   because emoji sequences such as "👩‍💻" and Persian or Indic words need them. Line and paragraph
   separators (U+2028, U+2029) and Unicode non-characters (U+FFFE, ...) are refused as well.
   Unassigned code points are accepted, because phones know newer emoji than Python's Unicode
   database does.
3. Leading and trailing whitespace is stripped and every internal run of whitespace (spaces,
   no-break spaces, ideographic spaces, ...) becomes one ordinary space.
4. The result is refused if it is empty, longer than :data:`MAX_LABEL_LENGTH` characters (or longer
   than :data:`MAX_LABEL_BYTES` bytes in UTF-8, the file-name limit of common file systems),
   contains one of ``/ \\ : < > " | ? *``, starts with ``.`` (which also covers ``.`` and ``..``),
   ends with ``.`` (Windows silently drops a trailing dot), or is a Windows reserved device name
   (CON, PRN, AUX, NUL, COM1-COM9, LPT1-LPT9, in any letter case, alone or followed by an extension
   such as "con.txt").

Everything else is accepted: letters of any script, digits, emoji, spaces and punctuation such as
``- _ ( ) & + ' , !``.

:func:`label_key` gives the comparison key: labels whose keys are equal are the same label
("T-Shirt" and "t-shirt", or the two spellings of "é").
"""

from __future__ import annotations

import re
import unicodedata

from model_store.errors import LabelError, LabelProblem

__all__ = ["MAX_LABEL_BYTES", "MAX_LABEL_LENGTH", "label_key", "normalize_label"]

MAX_LABEL_LENGTH = 64
"""Longest accepted label, in characters (Unicode code points) after normalisation."""

MAX_LABEL_BYTES = 255
"""Longest accepted label in UTF-8 bytes: the usual limit for one file-name component."""

_FORBIDDEN_CHARS = frozenset('/\\:<>"|?*')
_JOINERS = frozenset("\u200c\u200d")
_LINE_SEPARATORS = frozenset("\u2028\u2029")
_WHITESPACE_RUN = re.compile(r"\s+")
_RESERVED_DEVICE_NAMES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"com{d}" for d in "123456789¹²³"] + [f"lpt{d}" for d in "123456789¹²³"]
)


def _is_noncharacter(ch: str) -> bool:
    cp = ord(ch)
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def _check_characters(text: str) -> None:
    for i, ch in enumerate(text):
        category = unicodedata.category(ch)
        if ch in _JOINERS:
            before = text[i - 1] if i > 0 else ""
            after = text[i + 1] if i + 1 < len(text) else ""
            if (
                before
                and after
                and not before.isspace()
                and not after.isspace()
                and (before not in _JOINERS and after not in _JOINERS)
            ):
                continue
            raise LabelError(reason=LabelProblem.MISPLACED_JOINER, label=text, characters=ch)
        if category in ("Cc", "Cf", "Cs", "Co") or ch in _LINE_SEPARATORS:
            if (ch.isspace() and category == "Cc") or ch in _LINE_SEPARATORS:
                raise LabelError(reason=LabelProblem.LINE_BREAK, label=text, characters=ch)
            raise LabelError(reason=LabelProblem.CONTROL_CHARACTER, label=text, characters=ch)
        if category == "Cn" and _is_noncharacter(ch):
            raise LabelError(reason=LabelProblem.CONTROL_CHARACTER, label=text, characters=ch)


def normalize_label(name: str) -> str:
    """Validate a label name and return its normalised display form.

    See the module docstring for the complete rules: NFC normalisation, refusal of control and
    format characters, whitespace stripped and collapsed, then refusal of empty names, names over
    64 characters, path and Windows-unsafe characters (``/ \\ : < > " | ? *``), names starting or
    ending with ``.``, and Windows device names such as ``CON`` or ``lpt1.txt``.

    Args:
        name: the label as typed by an admin (or a folder name being imported).

    Returns:
        The normalised label, e.g. ``"  Red   dress "`` -> ``"Red dress"``. Letter case is kept.

    Raises:
        LabelError: the name is refused; ``.message`` says what is wrong and what is allowed.
    """
    if not isinstance(name, str):
        raise LabelError(reason=LabelProblem.NOT_TEXT)
    text = unicodedata.normalize("NFC", name)
    _check_characters(text)
    text = _WHITESPACE_RUN.sub(" ", text).strip()
    if not text:
        raise LabelError(reason=LabelProblem.EMPTY, label=text)
    if len(text) > MAX_LABEL_LENGTH:
        raise LabelError(reason=LabelProblem.TOO_LONG, label=text, length=len(text), limit=MAX_LABEL_LENGTH)
    if len(text.encode("utf-8")) > MAX_LABEL_BYTES:
        raise LabelError(
            reason=LabelProblem.TOO_MANY_BYTES, label=text, length=len(text.encode("utf-8")), limit=MAX_LABEL_BYTES
        )
    bad = sorted({ch for ch in text if ch in _FORBIDDEN_CHARS})
    if bad:
        raise LabelError(reason=LabelProblem.FORBIDDEN_CHARACTERS, label=text, characters="".join(bad))
    if text.startswith("."):
        raise LabelError(reason=LabelProblem.LEADING_DOT, label=text)
    if text.endswith("."):
        raise LabelError(reason=LabelProblem.TRAILING_DOT, label=text)
    device = text.split(".", 1)[0].rstrip(" ").casefold()
    if device in _RESERVED_DEVICE_NAMES:
        raise LabelError(reason=LabelProblem.RESERVED_NAME, label=text)
    return text


def label_key(name: str) -> str:
    """Return the comparison key of a label: the case-folded NFC form of :func:`normalize_label`.

    Two names with the same key are the same label: ``label_key("T-Shirt") == label_key("t-shirt")``,
    and ``"e\\u0301"`` equals ``"\\u00e9"``. The key is for comparison only, never for display.

    Args:
        name: a label name (validated and normalised first).

    Returns:
        The key string.

    Raises:
        LabelError: the name is refused by :func:`normalize_label`.
    """
    return unicodedata.normalize("NFC", normalize_label(name).casefold())
