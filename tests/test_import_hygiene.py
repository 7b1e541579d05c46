"""``import krylov_influence`` (with ``krylov_influence.ray``) and a NumPy-engine computation
load no deep-learning framework, nor Ray or zarr."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_core_and_numpy_engine_import_no_framework():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import krylov_influence as ki
        import krylov_influence.testing
        import krylov_influence.evaluation as evaluation
        import krylov_influence.ray  # the Ray integration imports Ray only when used
        from krylov_influence.reference import SoftmaxRegression

        engines = ki.available_engines()          # loads every engine plugin class
        assert "numpy" in engines, engines
        rng = np.random.default_rng(0)
        batches = [(rng.standard_normal((8, 3)), rng.integers(0, 2, 8))]
        model = SoftmaxRegression(rng.standard_normal((3, 2)), np.zeros(2), l2=0.1)
        calc = ki.ArnoldiInfluenceCalculator(model, batches, 8, True, 4, "float64")
        values = [v for _, v in calc.compute_influence_values(batches)]
        assert values[0].shape == (8,)
        detected = evaluation.mislabel_detection(values[0], np.arange(8) < 2, losses=np.ones(8))
        assert 0.0 <= detected.influence.auc <= 1.0
        frameworks = ("torch", "jax", "jaxlib", "tensorflow", "keras", "ray", "zarr")
        loaded = sorted(m for m in frameworks if m in sys.modules)
        print(",".join(loaded))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"frameworks imported: {out.stdout.strip()}"
