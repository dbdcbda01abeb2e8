"""The import contract of ``pyproject.toml`` ([tool.importlinter]): layers, engines apart from
the commands, no cycles. ``lint-imports`` checks the installed sources; a copy with one cycle
added on purpose shows that the contract catches it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(source_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(source_root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"),
                           "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contract_holds():
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_a_cycle_added_on_purpose_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "src" / "tinkerkit", tmp_path / "tinkerkit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    checkpoint = tmp_path / "tinkerkit" / "checkpoint.py"
    # checkpoint imports models here, and models imports checkpoint: a cycle, and models and
    # checkpoint stand on one layer of independent modules
    checkpoint.write_text(checkpoint.read_text() + "\nfrom tinkerkit import models  # noqa\n")
    models = tmp_path / "tinkerkit" / "models.py"
    models.write_text(models.read_text() + "\nfrom tinkerkit import checkpoint  # noqa\n")

    result = lint_imports(tmp_path)

    assert result.returncode == 1
    assert "No import cycles between the modules of any package BROKEN" in result.stdout
    assert "Layers from errors up to cli BROKEN" in result.stdout
