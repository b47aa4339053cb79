"""Label names: normalisation, refusal of hostile names, and the comparison key."""

from __future__ import annotations

import unicodedata
from pathlib import PurePosixPath, PureWindowsPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store.errors import LabelError, LabelgramError
from model_store.labels import MAX_LABEL_LENGTH, label_key, normalize_label

E_COMBINING = "e\u0301"  # e + COMBINING ACUTE ACCENT
E_PRECOMPOSED = "\u00e9"  # é


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("shoes", "shoes"),
        ("T-Shirt", "T-Shirt"),
        ("Розы", "Розы"),
        ("👗 dress", "👗 dress"),
        ("  red   dress  ", "red dress"),
        ("red\u00a0\u3000dress", "red dress"),  # no-break and ideographic spaces collapse
        (f"caf{E_COMBINING}", f"caf{E_PRECOMPOSED}"),
        ("👩\u200d💻 coder", "👩\u200d💻 coder"),  # zero-width joiner inside an emoji sequence
        ("می\u200cخواهم", "می\u200cخواهم"),  # Persian zero-width non-joiner
        ("shoes (men's) & boots, 2024!", "shoes (men's) & boots, 2024!"),
        ("a.b", "a.b"),
        ("console", "console"),  # only the exact device names are reserved
        ("com10", "com10"),
        ("x" * MAX_LABEL_LENGTH, "x" * MAX_LABEL_LENGTH),
    ],
)
def test_accepts_and_normalizes(raw: str, expected: str) -> None:
    assert normalize_label(raw) == expected
    assert unicodedata.is_normalized("NFC", normalize_label(raw))


HOSTILE = [
    ("../../etc", "/"),
    ("a/b", "/"),
    ("a\\b", "\\"),
    ("..", "dot"),
    (".", "dot"),
    (".hidden", "dot"),
    ("", "empty"),
    ("   ", "empty"),
    ("\u3000", "empty"),
    ("x" * 300, "300 characters"),
    ("x" * (MAX_LABEL_LENGTH + 1), "65 characters"),
    ("👗" * MAX_LABEL_LENGTH, "too long"),  # 64 characters but 256 UTF-8 bytes
    ("a\x00b", "NUL"),
    ("a\nb", "line break"),
    ("shoes\n", "line break"),
    ("a\tb", "tab"),
    ("a\rb", "line break"),
    ("a\u2028b", "single line"),
    ("\u202eevil", "invisible"),  # right-to-left override
    ("a\u200bb", "invisible"),  # zero-width space
    ("\u200dshoes", "no effect"),  # a joiner with nothing to join
    ("shoes \u200d", "no effect"),
    ("a\ue000b", "invisible"),  # private use
    ("a\ufffeb", "invisible"),  # non-character
    ("CON", "reserved"),
    ("con", "reserved"),
    ("Con.txt", "reserved"),
    ("nul.tar.gz", "reserved"),
    ("AUX ", "reserved"),
    ("prn", "reserved"),
    ("COM1", "reserved"),
    ("lpt9", "reserved"),
    ("COM¹", "reserved"),
    ("a:b", ":"),
    ("a<b", "<"),
    ("a>b", ">"),
    ('a"b', '"'),
    ("a|b", "|"),
    ("what?", "?"),
    ("a*", "*"),
    ("shoes.", "end with a dot"),
]


@pytest.mark.parametrize(("raw", "hint"), HOSTILE)
def test_refuses_hostile_names_with_a_clear_message(raw: str, hint: str) -> None:
    with pytest.raises(LabelError) as info:
        normalize_label(raw)
    message = info.value.message
    assert isinstance(info.value, LabelgramError)
    assert str(info.value) == message
    assert hint.lower() in message.lower()
    assert message.endswith((".", "!")), message
    assert len(message) < 300
    assert "\x00" not in message and "\n" not in message and "\u202e" not in message
    with pytest.raises(LabelError):
        label_key(raw)


def test_messages_say_what_is_allowed() -> None:
    with pytest.raises(LabelError) as info:
        normalize_label("a/b")
    assert "letters" in info.value.message and str(MAX_LABEL_LENGTH) in info.value.message


def test_refuses_non_text() -> None:
    with pytest.raises(LabelError):
        normalize_label(b"shoes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("T-Shirt", "t-shirt"),
        ("T-SHIRT", " t-shirt "),
        (E_COMBINING, E_PRECOMPOSED),
        (f"Caf{E_COMBINING}", f"CAF{E_PRECOMPOSED.upper()}"),
        ("Straße", "STRASSE"),
        ("РОЗЫ", "розы"),
        ("red  dress", "red dress"),
    ],
)
def test_same_label_same_key(a: str, b: str) -> None:
    assert label_key(a) == label_key(b)


@pytest.mark.parametrize(("a", "b"), [("shirt", "t-shirt"), ("e", E_PRECOMPOSED), ("dress", "👗 dress")])
def test_different_labels_different_keys(a: str, b: str) -> None:
    assert label_key(a) != label_key(b)


def test_normalize_keeps_case_key_folds_it() -> None:
    assert normalize_label("T-Shirt") == "T-Shirt"
    assert label_key("T-Shirt") == "t-shirt"
    assert label_key(E_COMBINING) == E_PRECOMPOSED


def _is_single_safe_component(label: str) -> bool:
    for pure in (PurePosixPath, PureWindowsPath):
        parts = pure(label).parts
        if parts != (label,) or pure(label).is_absolute() or pure(label).anchor:
            return False
    return label not in (".", "..")


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_any_text_is_refused_or_a_safe_idempotent_label(raw: str) -> None:
    try:
        label = normalize_label(raw)
    except LabelError as exc:
        assert exc.message
        return
    assert label == label.strip() and "  " not in label
    assert 0 < len(label) <= MAX_LABEL_LENGTH
    assert not label.startswith(".") and not label.endswith(".")
    assert not any(ch in label for ch in '/\\:<>"|?*')
    assert not any(unicodedata.category(ch) in ("Cc", "Cs", "Co") for ch in label)
    assert _is_single_safe_component(label)
    assert normalize_label(label) == label
    assert label_key(label) == label_key(raw)
