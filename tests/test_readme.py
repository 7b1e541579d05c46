"""The README's complete examples run as printed (each in a fresh interpreter)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
# Complete examples start with their imports; fragments (e.g. "The whole API") do not.
EXAMPLES = [block for block in _BLOCKS if block.startswith("import")]
FRAMEWORKS = {"torch": "torch", "jax": "jax", "keras": "tensorflow"}


def _needs(block: str) -> list[str]:
    return [m for key, m in FRAMEWORKS.items() if re.search(rf"^import {key}\b", block, re.M)]


def test_readme_has_an_example_per_engine():
    assert len(EXAMPLES) == 4, [block.splitlines()[0] for block in EXAMPLES]
    assert sorted(m for block in EXAMPLES for m in _needs(block)) == ["jax", "tensorflow", "torch"]


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda b: (_needs(b) or ["numpy"])[0])
def test_readme_example_runs_as_printed(block, tmp_path):
    for module in _needs(block):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, "-c", block],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "the example printed nothing"
