"""Keep TensorFlow's start-up chatter off an operator's stderr, and nothing else.

Loading TensorFlow's shared libraries logs a few lines through C++ abseil logging *before*
TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` (so that variable cannot hide them)::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... port.cc:153] oneDNN custom operations are on. You may see slightly different ...
    I0000 00:00:... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    I0000 00:00:... cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use ...
    To enable the following instructions: AVX2 AVX512F ... in other operations, rebuild TensorFlow ...

They are written by C++ straight to file descriptor 2, so no Python logging setting reaches them.
:func:`install` puts a finder on ``sys.meta_path`` that, at the first ``import tensorflow``
(wherever it happens: Keras, the model store, the engine), points descriptor 2 at a temporary file
for the duration of that import, then restores it and writes back every captured line that is not
one of the informational lines above (:func:`is_startup_chatter`). Errors (``E``/``F`` lines),
Python warnings and anything unexpected still reach stderr, only later. oneDNN's kernels stay on
(``TF_ENABLE_ONEDNN_OPTS`` is left alone): only the sentence announcing them is dropped.

TensorFlow is not imported by :func:`install`: commands that never need it (``status``,
``rollback``) stay fast.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from types import ModuleType

__all__ = ["install", "is_startup_chatter", "uninstall"]

#: the module whose first import is made quiet
_TARGET = "tensorflow"

#: abseil's own notice, printed once per copy of abseil before its logging is initialised
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
#: informational (``I``) abseil/glog lines from these source files are start-up announcements
_INFO_SOURCES = ("port.cc", "cudart_stub.cc", "cpu_feature_guard.cc")
_INFO_LINE = re.compile(r"^I\d{4} [\d:.]+\s+\d+ (?P<source>[\w.]+):\d+\] ")
#: the second line of cpu_feature_guard.cc's message
_CPU_FEATURES_TAIL = "To enable the following instructions:"


def is_startup_chatter(line: str) -> bool:
    """Whether one stderr line (without its newline) is TensorFlow's start-up announcement.

    True for abseil's "before absl::InitializeLog()" notice, the informational lines of
    ``port.cc`` (oneDNN on), ``cudart_stub.cc`` (no CUDA driver) and ``cpu_feature_guard.cc``
    (CPU instructions), and the latter's continuation line. Warnings, errors (``W``/``E``/``F``
    lines) and any other text are not chatter.
    """
    if line.strip() == _ABSL_NOTICE or line.startswith(_CPU_FEATURES_TAIL):
        return True
    match = _INFO_LINE.match(line)
    return bool(match and match.group("source") in _INFO_SOURCES)


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader with descriptor 2 captured (see the module docstring)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module keeps its real loader (importlib set ours before this call)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        with _captured_stderr_fd():
            self._loader.exec_module(module)


class _captured_stderr_fd:
    """Context manager: descriptor 2 goes to a temporary file; on exit it is restored and the
    captured lines that are not start-up chatter are written to it. Does nothing when descriptor 2
    is not open or no temporary file can be made."""

    def __enter__(self) -> None:
        self._saved: int | None = None
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return
        try:
            self._capture = tempfile.TemporaryFile()
            os.dup2(self._capture.fileno(), 2)
        except OSError:  # no temporary file (e.g. a full disk): import loudly rather than not at all
            os.close(self._saved)
            self._saved = None

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._capture.seek(0)
        captured = self._capture.read().decode("utf-8", "replace")
        self._capture.close()
        kept = [
            line for line in captured.splitlines(keepends=True) if not is_startup_chatter(line.rstrip("\r\n"))
        ]
        data = "".join(kept).encode("utf-8", "replace")
        while data:
            data = data[os.write(2, data) :]


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` with the other finders and wraps its loader once."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        uninstall()  # once: later imports are cache hits, and this finder must not find itself
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


_FINDER = _QuietFinder()


def install() -> None:
    """Make the first ``import tensorflow`` of this process quiet (idempotent; no effect if
    TensorFlow is already imported)."""
    if _TARGET in sys.modules or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the finder put in place by :func:`install` (no effect if it is not there)."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
