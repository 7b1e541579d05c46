"""Resumable fits (``checkpoint_path=``): a fit stopped at any step and resumed equals the
uninterrupted fit; a checkpoint of another fit, model or Hessian data is refused, intact.

The oracle is the uninterrupted fit of the same calculator settings (bitwise: the resumed
iteration takes the same steps with the same restart vectors), and, through it, the exact
eigenvalues of the model's Hessian for a full-rank fit.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from calculator_support import build, engine_class, softmax_hessian, training_spec

from krylov_influence import ArnoldiInfluenceCalculator
from krylov_influence.errors import IncompatibleStoreError
from krylov_influence.testing import random_mlp_spec

ROOT = Path(__file__).resolve().parents[2]


class Stopped(Exception):
    """Raised by :class:`StoppingOperator` in place of a crash."""


class StoppingOperator:
    """The model's Hessian operator, raising :class:`Stopped` at product number ``after``."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.products = inner, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _count(self, m: int) -> None:
        self.products += m
        if self.products >= self.after:
            raise Stopped(f"stopped at product {self.products}")

    def mv(self, vector):
        self._count(1)
        return self.inner.mv(vector)

    def mm(self, vectors):  # only looked up when the inner operator has it
        self._count(int(vectors.shape[0]))
        return self.inner.mm(vectors)


def stop_fits_after(model, after: int) -> None:
    """Make every fit of ``model`` (a bound InfluenceModel) stop at product ``after``."""
    original = model.hessian_operator
    model.hessian_operator = lambda batches: StoppingOperator(original(batches), after)


def mlp_problem(engine_name: str):
    spec = random_mlp_spec(np.random.default_rng(4), (4, 5, 3), num_examples=23, batch_size=5)
    return spec, build(engine_class(engine_name), spec)


def fit(model, train, path, **options):
    settings = {"checkpoint_every": 4, "damping": 0.0, "show_progress": False}
    settings.update(options)
    return ArnoldiInfluenceCalculator(
        model, train, settings.pop("n", 30), True, 6, "float64", checkpoint_path=path, **settings
    )


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("stop_at", [5, 17, 29])
def test_a_stopped_fit_resumes_to_the_uninterrupted_result(engine, block_size, stop_at, tmp_path):
    if engine == "numpy":
        spec = training_spec()
        model, train = build(engine_class("numpy"), spec)
        n = 12  # p = 15
    else:
        spec, (model, train) = mlp_problem(engine)
        n = 30  # p = 43
    stop_at = min(stop_at, n - 1)
    path = tmp_path / "fit.npz"
    whole = fit(model, train, None, n=n, block_size=block_size)

    stopped_model, stopped_train = build(engine_class(engine), spec)
    stop_fits_after(stopped_model, stop_at)
    with pytest.raises(Stopped):
        fit(stopped_model, stopped_train, path, n=n, block_size=block_size)
    assert path.exists(), "a checkpoint is written every 4 products"
    resumed = fit(*build(engine_class(engine), spec), path, n=n, block_size=block_size)
    assert 0 < resumed.resumed_from < stop_at
    assert not path.exists(), "a finished fit removes its checkpoint"
    np.testing.assert_array_equal(resumed.eigenbasis.ritz.spectrum, whole.eigenbasis.ritz.spectrum)
    np.testing.assert_array_equal(np.asarray(resumed.G), np.asarray(whole.G))
    assert resumed.eigenbasis.arnoldi_restarts == whole.eigenbasis.arnoldi_restarts


def test_a_full_rank_fit_with_restarts_resumes_exactly(tmp_path):
    # n = p on softmax regression: the Krylov space of one start vector is smaller than p,
    # so the fit restarts after the checkpoint it resumes from. (The restarts fall in the
    # degenerate l2 eigenspace, which the kept pairs do not see; tests/core/test_arnoldi.py
    # checks that the restart generator itself is restored.)
    spec = training_spec()
    model, train = build(engine_class("numpy"), spec)
    whole = fit(model, train, None, n=15, checkpoint_every=2)
    assert whole.eigenbasis.arnoldi_restarts, "the case needs restarts"
    path = tmp_path / "fit.npz"
    stopped_model, stopped_train = build(engine_class("numpy"), spec)
    stop_fits_after(stopped_model, 14)
    with pytest.raises(Stopped):
        fit(stopped_model, stopped_train, path, n=15, checkpoint_every=2)
    resumed = fit(model, train, path, n=15, checkpoint_every=2)
    assert resumed.resumed_from == 12
    np.testing.assert_array_equal(np.asarray(resumed.G), np.asarray(whole.G))
    exact = np.sort(np.linalg.eigvalsh(softmax_hessian(spec)))[::-1][:6]
    np.testing.assert_allclose(np.sort(resumed.eigenbasis.eigenvalues)[::-1], exact, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "when", "resumed_from"), [("product", 22, 21), ("write", 3, 6)])
def test_a_killed_process_resumes_to_the_uninterrupted_result(where, when, resumed_from, tmp_path):
    """SIGKILL at Hessian-vector product ``when``, or in the middle of writing checkpoint
    number ``when`` (every 3 products); a new process resumes from the last whole one."""
    path = tmp_path / "fit.npz"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests" / "calculator")!r})
        import numpy as np
        import krylov_influence._checkpoint as checkpoints
        from calculator_support import build, engine_class
        from krylov_influence import ArnoldiInfluenceCalculator
        from krylov_influence.testing import random_mlp_spec
        spec = random_mlp_spec(np.random.default_rng(4), (4, 5, 3), num_examples=23, batch_size=5)
        model, train = build(engine_class("torch"), spec)
        original = model.hessian_operator
        counts = {{"product": 0, "write": 0}}

        def count(where):
            counts[where] += 1
            if where == {where!r} and counts[where] == {when}:
                os.kill(os.getpid(), signal.SIGKILL)

        class Killing:
            def __init__(self, inner):
                self.inner = inner
            def __getattr__(self, name):
                return getattr(self.inner, name)
            def mv(self, v):
                count("product")
                return self.inner.mv(v)

        write_array = checkpoints.AtomicArchiveWriter.write_array
        def killing_write(self, name, array):
            write_array(self, name, array)
            if name == "hessenberg":  # after the basis, before the metadata
                count("write")
        checkpoints.AtomicArchiveWriter.write_array = killing_write
        model.hessian_operator = lambda batches: Killing(original(batches))
        ArnoldiInfluenceCalculator(model, train, 30, True, 6, "float64",
                                   checkpoint_path={str(path)!r}, checkpoint_every=3,
                                   show_progress=False)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert path.exists()
    leftovers = sorted(os.listdir(tmp_path))
    if where == "write":  # the interrupted write left its temporary file, not a checkpoint
        assert len(leftovers) == 2 and leftovers[0].startswith(".fit.npz."), leftovers
    spec, (model, train) = mlp_problem("torch")
    resumed = fit(model, train, path, checkpoint_every=3)
    whole = fit(*build(engine_class("torch"), spec), None, checkpoint_every=3)
    assert resumed.resumed_from == resumed_from
    np.testing.assert_array_equal(np.asarray(resumed.G), np.asarray(whole.G))
    np.testing.assert_array_equal(resumed.eigenbasis.ritz.spectrum, whole.eigenbasis.ritz.spectrum)
    # The resumed fit's own writes removed the dead process's temporary file, and the
    # finished fit its checkpoint.
    assert os.listdir(tmp_path) == []


def _stopped_checkpoint(spec, path, **options):
    model, train = build(engine_class("numpy"), spec)
    stop_fits_after(model, 9)
    with pytest.raises(Stopped):
        fit(model, train, path, n=12, **options)
    assert path.exists()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 11}, "subspace_dim=12"),
        ({"seed": 1}, "seed=0"),
        ({"block_size": 2}, "block_size=1"),
    ],
)
def test_a_checkpoint_of_other_settings_is_refused_and_kept(change, message, tmp_path):
    spec = training_spec()
    path = tmp_path / "fit.npz"
    content = _stopped_checkpoint(spec, path)
    model, train = build(engine_class("numpy"), spec)
    with pytest.raises(IncompatibleStoreError, match=rf"checkpoint_path=.*{message}"):
        fit(model, train, path, **{"n": 12, **change})
    assert path.read_bytes() == content


def test_a_checkpoint_of_another_model_or_data_is_refused(tmp_path):
    spec = training_spec()
    path = tmp_path / "fit.npz"
    content = _stopped_checkpoint(spec, path)
    other_weights = dataclasses.replace(spec, biases=(spec.biases[0] + 0.5,))
    with pytest.raises(IncompatibleStoreError, match="another model"):
        fit(*build(engine_class("numpy"), other_weights), path, n=12)
    flipped = spec.y.copy()
    flipped[7] = (flipped[7] + 1) % 3
    other_labels = dataclasses.replace(spec, y=flipped)
    with pytest.raises(IncompatibleStoreError, match="example 2 of batch 1 of hessian_dataset"):
        fit(*build(engine_class("numpy"), other_labels), path, n=12)
    fewer = dataclasses.replace(spec, x=spec.x[:20], y=spec.y[:20])
    with pytest.raises(IncompatibleStoreError, match="Hessian data"):
        fit(*build(engine_class("numpy"), fewer), path, n=12)
    assert path.read_bytes() == content
    # The same model and data resume it.
    resumed = fit(*build(engine_class("numpy"), spec), path, n=12)
    assert resumed.resumed_from == 8


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    spec = training_spec()
    path = tmp_path / "fit.npz"
    content = _stopped_checkpoint(spec, path)
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(IncompatibleStoreError, match="checkpoint_path="):
        fit(*build(engine_class("numpy"), spec), path, n=12)


def test_checkpoint_arguments(tmp_path):
    model, train = build(engine_class("numpy"), training_spec())
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        fit(model, train, tmp_path / "fit.npz", n=12, checkpoint_every=0)
    # An existing directory holds the checkpoint under a fixed name (and is left empty).
    calc = fit(model, train, tmp_path, n=12)
    assert calc.resumed_from is None
    assert os.listdir(tmp_path) == []
