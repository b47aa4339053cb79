"""No import cycles in ``bot/`` or ``model_store/`` (issue 9): import-linter's ``acyclic_siblings`` contract.

The contract lives in ``pyproject.toml`` (``[tool.importlinter]``); running it here makes CI fail on
a cycle, including one hidden by an import inside a function. It runs in a child process: the
linter sets up its own logging and console output, which must not touch pytest's captured streams.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))"
)


def test_bot_and_model_store_have_no_import_cycle() -> None:
    # cwd ROOT: this checkout's bot/ and model_store/ are the ones analysed (sys.path[0] is "")
    done = subprocess.run([sys.executable, "-c", LINT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "No import cycles between the modules of bot/ or of model_store/ KEPT" in out, out
