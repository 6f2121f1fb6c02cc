"""The package's shape: import-linter's layer contracts hold, the low layers stay light, and
argparse lives only in oneword/cli."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_PACKAGES = ("oneword.inversion", "oneword.encoder", "oneword.evaluation", "oneword.world")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_import_linter_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.is_file():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
    assert result.stdout.count("KEPT") >= 5  # layers, core, inversion, datasets, root scripts


def test_importing_datasets_pulls_in_no_method():
    code = (
        "import sys, oneword.datasets, oneword.datasets.world, oneword.datasets.suite, "
        "oneword.datasets.shards; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('oneword'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    assert "oneword.datasets.world" in loaded
    assert not [m for m in loaded if m.startswith(METHOD_PACKAGES)], loaded


def test_argparse_only_in_the_cli_package():
    users = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "oneword").rglob("*.py"))
        if "argparse" in path.read_text() and "cli" not in path.relative_to(ROOT).parts
    ]
    assert users == []
