"""The README's complete examples run as printed (each in a fresh interpreter), and what they
print is right: the self-influence values (and the NumPy example's top-k indices) against the
exact truncated inverse Hessian ``V_k diag(1/(λ+δ)) V_kᵀ`` of the example's own model and data,
computed in the same interpreter after the example (dense Hessian from the engine's HVPs,
eigen-decomposition and per-example gradients in NumPy: nothing of the Arnoldi pipeline).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
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


# Appended to each example, in its interpreter: the oracle for what the example printed.
_ORACLE = textwrap.dedent(
    """
    import json as _json
    import numpy as _np
    from krylov_influence import exact as _exact
    _model = calc.model
    _hessian = _exact.dense_hessian(_model, train)
    _kept = _exact.truncated_inverse_hessian(
        _hessian, calc.k_largest_eig_vals, damping=calc.damping
    )
    _result = {
        "oracle": _exact.exact_self_influence(_model, train, inverse=_kept).tolist(),
        "full": _exact.exact_self_influence(
            _model, train, inverse=_exact.inverse_hessian(_hessian, calc.damping)
        ).tolist(),
        "computed": _np.asarray(_model.to_numpy(calc.self_influence(train)), float).tolist(),
    }
    if "SoftmaxRegression" in globals():  # the NumPy example's top-k of its first query
        _scores = _exact.exact_influence(_model, train, train[:1], inverse=_kept)[0]
        _result["top_k"] = _np.argsort(-_scores, kind="stable")[:5].tolist()
    print("ORACLE", _json.dumps(_result))
    """
)
# How far the examples' self-influence may sit from the exact truncated inverse, relative to
# the largest value. NumPy: float64 with subspace_dim = p, so exact Ritz pairs (measured
# 1.5e-15). PyTorch and JAX: float32, 4 sqrt(eps) (measured 1.9e-7 and 3.7e-6). Keras: the
# example's 30 Krylov vectors for k = 10 of p = 178 leave the 10th kept eigenvalue (0.499,
# next 0.470) not fully converged: measured 1.5e-2 (seeded, so every run), bound 5e-2. The
# truncation itself moves the values by ~100 % (asserted), so every bound separates a right
# result from a wrong one.
_RTOL = {"numpy": 1e-9, "torch": 1.4e-3, "jax": 1.4e-3, "tensorflow": 5e-2}
_NUMBER = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?")


def _printed_numbers(line: str) -> list[tuple[float, float]]:
    """The decimals of a printed array, each with half a unit of its last printed digit."""
    numbers = []
    for text in _NUMBER.findall(line):
        mantissa, _, exponent = text.partition("e")
        decimals = len(mantissa.partition(".")[2])
        numbers.append((float(text), 0.5 * 10.0 ** (int(exponent or 0) - decimals)))
    return numbers


@pytest.mark.parametrize("block", EXAMPLES, ids=lambda b: (_needs(b) or ["numpy"])[0])
def test_readme_example_runs_as_printed(block, tmp_path):
    for module in _needs(block):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, "-c", block + _ORACLE],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    *printed, last = out.stdout.strip().splitlines()
    assert printed, "the example printed nothing"
    assert last.startswith("ORACLE ")
    result = {key: np.asarray(value) for key, value in json.loads(last[7:]).items()}
    oracle = result["oracle"]
    scale = np.max(np.abs(oracle))
    rtol = _RTOL[(_needs(block) or ["numpy"])[0]]
    # The calculator's self-influence of every training example, and the printed ones (the
    # first line: the first 3 or 5 examples, to the printed digits).
    np.testing.assert_allclose(result["computed"], oracle, rtol=0, atol=rtol * scale)
    shown = _printed_numbers(printed[0])
    assert len(shown) in (3, 5), printed[0]
    for i, (value, half_unit) in enumerate(shown):
        assert abs(value - oracle[i]) <= half_unit + rtol * scale, (i, value, oracle[i])
    # The truncation to k eigenpairs is visible far above every tolerance: a calculator that
    # inverted the full Hessian (or the wrong one) would fail.
    assert np.max(np.abs(result["full"] - oracle)) > 0.3 * scale
    if "top_k" in result:  # the NumPy example: 4 lines of values[:3], then the top-k line
        indices = [int(i) for i in re.findall(r"\d+", printed[4].partition("]")[0])]
        assert indices == result["top_k"].tolist(), printed[4]
