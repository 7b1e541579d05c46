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


# ------------------------------------------------------------------ the README's figures
def test_readme_demo_auc_is_what_the_demo_gives(tmp_path):
    """The README's AUC for seed 0, and its ranges, hold for the demo's default setting on
    the NumPy engine (the figures are read from the README, so the text and the test cannot
    drift apart)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from krylov_influence.demo import DemoConfig, run_demo

    text = " ".join(README.read_text(encoding="utf-8").split())
    claim = re.search(
        r"ROC AUC (0\.\d+) with seed 0; (0\.\d+)–(0\.\d+) over seeds 0–4, beside the loss-only "
        r"baseline it prints, which does as well or better on this data: (0\.\d+)–(0\.\d+)",
        text,
    )
    assert claim, "the README's demo claim moved: update this test with it"
    seed0, low, high, loss_low, loss_high = (float(v) for v in claim.groups())
    result = run_demo(DemoConfig(engine="numpy", seed=0, out=tmp_path, show_progress=False))
    auc = result.summary["results"]["detection_auc"]
    loss_auc = result.summary["results"]["loss_ranking_auc"]
    assert round(auc, 3) == seed0 and low <= round(auc, 3) <= high, auc
    assert loss_low <= round(loss_auc, 3) <= loss_high, loss_auc
    assert loss_auc >= auc  # "as well or better"
    assert auc > 0.9  # far above chance (0.5) and a reversed ranking (~0.02)


def test_torch_and_jax_give_the_same_eigenvalues(tmp_path):
    """README: every engine starts from the same vector and gives the same eigenvalues. On the
    README's model (the demo's 64-32-10 tanh MLP on the digits, float64, at its Glorot
    initial weights, which every framework draws alike) torch and JAX agree to round-off.
    The test fits 60 Arnoldi steps (k = 20) to stay quick; measured 4e-16 relative, as with
    the demo's 200 / 50."""
    pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    pytest.importorskip("sklearn")
    jax.config.update("jax_enable_x64", True)
    from krylov_influence import ArnoldiInfluenceCalculator
    from krylov_influence.demo.data import load_digits_data
    from krylov_influence.demo.training import MLP_SIZES, glorot_mlp
    from krylov_influence.registry import get_engine
    from krylov_influence.testing import MLPSpec

    data = load_digits_data(0, 0.1)
    layers = glorot_mlp(MLP_SIZES, 0)
    spec = MLPSpec(
        MLP_SIZES,
        "tanh",
        "cross_entropy",
        tuple(w for w, _ in layers),
        tuple(b for _, b in layers),
        data.x_train,
        data.y_train,
        512,
        1e-2,
    )
    eigenvalues = {}
    for name in ("torch", "jax"):
        model, train = get_engine(name).from_neutral_spec(spec, dtype="float64")
        calc = ArnoldiInfluenceCalculator(model, train, 60, True, 20, "float64", seed=0)
        eigenvalues[name] = np.asarray(model.to_numpy(calc.eig_vals), dtype=np.float64)
    scale = np.max(np.abs(eigenvalues["torch"]))
    difference = np.max(np.abs(eigenvalues["torch"] - eigenvalues["jax"])) / scale
    print(f"torch vs JAX eigenvalues: {difference:.1e} of the largest")
    assert difference <= 1e-14  # the README's bound: round-off, ~50 units of float64
