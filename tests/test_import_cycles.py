"""No import cycles in ``bot/`` or ``model_store/`` (issue 9): import-linter's ``acyclic_siblings`` contract.

The contract lives in ``pyproject.toml`` (``[tool.importlinter]``); running it here makes CI fail on
a cycle, including one hidden by an import inside a function.
"""

from __future__ import annotations

import os
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_bot_and_model_store_have_no_import_cycle(capsys, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=os.fspath(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "No import cycles between the modules of bot/ or of model_store/ KEPT" in out, out
