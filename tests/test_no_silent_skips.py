"""KRYLOV_INFLUENCE_REQUIRE_ALL=1 (set by CI) turns a skip for a missing dependency into a
failure, so a framework that failed to install cannot pass CI as skipped tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SKIPPING = """
import pytest

def test_missing_module():
    pytest.importorskip("no_such_framework_krylov")

def test_missing_engine():
    pytest.skip("engine 'plugin' not available: its entry point failed")

def test_skip_for_another_reason():
    pytest.skip("no CUDA")
"""


def _run(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "KRYLOV_INFLUENCE_REQUIRE_ALL"}
    if require is not None:
        env["KRYLOV_INFLUENCE_REQUIRE_ALL"] = require
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


def test_missing_dependencies_fail_when_required(tmp_path: Path) -> None:
    result = _run(tmp_path, "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 failed, 1 skipped" in result.stdout
    assert "a dependency is missing" in result.stdout


def test_missing_dependencies_skip_otherwise(tmp_path: Path) -> None:
    result = _run(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 skipped" in result.stdout
