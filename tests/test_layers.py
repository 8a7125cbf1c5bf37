"""The layering, checked by import-linter's contracts in pyproject.toml (`[tool.importlinter]`): preprocess <
pipeline < model < evaluation < train, and no import circle inside any package. The second test shows the
contracts bite: the same packages with one upward import, or one circle closed by an import inside a
function, fail naming that import. import-linter is a test dependency (`.[test]`; scripts/install.sh
installs it): without it these tests fail rather than skip, so the layering is never left unchecked."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("preprocess", "pipeline", "model", "evaluation", "train")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages and pyproject.toml under `root` (not on an installed copy elsewhere)."""
    command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
               "--no-cache", "--no-logo"]
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


@pytest.mark.parametrize("module, line, expected", [
    ("pipeline/recipe.py", "from train.config import TrainConfig", ["pipeline.recipe -> train.config"]),
    ("evaluation/knn.py", "import train.restore", ["evaluation.knn -> train.restore"]),
    # train.restore imports train.config: the circle of issue 24, closed again by an import inside a function
    ("train/config.py", "def _late():\n    from train.restore import load_teacher",
     ["No cycles are allowed in train", ("- .config -> .restore", "- .restore -> .config")]),
])
def test_an_upward_import_or_a_circle_breaks_a_contract(tmp_path, module, line, expected):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path).returncode == 0  # the copy alone keeps the contracts
    with open(tmp_path / module, "a") as source:
        source.write(f"\n\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "BROKEN" in result.stdout, result.stdout + result.stderr
    for text in expected:  # a text, or alternatives (which import of a circle it names is import-linter's choice)
        assert any(one in result.stdout for one in ((text,) if isinstance(text, str) else text)), result.stdout
