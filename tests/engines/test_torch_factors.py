"""The torch engine's factored query gradients (the spectral complement's ``g_zᵀ g_x``).

Oracle: the engine's own ``per_example_grads`` (itself checked against autograd one example
at a time by the layer matrix), multiplied out. Models where factoring would be wrong must
take the formed route, with the same numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import krylov_influence  # noqa: E402
from krylov_influence_torch import RouteFallbackWarning  # noqa: E402
from krylov_influence_torch._model import FACTORED_LINEAR, FORMED_GRADIENTS  # noqa: E402


def cross_entropy(logits, y):
    return nn.functional.cross_entropy(logits, y, reduction="none")


class Tokens(nn.Module):
    """A dense layer over ``positions`` steps of each example, shared by two calls."""

    def __init__(self, positions: int, width: int):
        super().__init__()
        self.positions = positions
        self.mix = nn.Linear(4, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        steps = x.view(x.shape[0], self.positions, 4)
        hidden = torch.tanh(self.norm(self.mix(steps)))
        again = torch.tanh(self.mix(steps.flip(1)))  # the same weight, a second call
        return self.head((hidden * again).mean(dim=1))


class Tied(nn.Module):
    """The head's weight is also used outside the head's forward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        hidden = torch.tanh(self.body(x))
        return self.head(hidden) + nn.functional.linear(hidden, self.head.weight.T)


class Centred(nn.Module):
    """Subtracts the batch mean: the examples of a batch interact."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)

    def forward(self, x):
        hidden = self.body(x)
        return hidden - hidden.mean(dim=0, keepdim=True)


class Table(nn.Module):
    """A dense layer applied to a parameter table, not to the batch."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 4))
        self.project = nn.Linear(4, 3)

    def forward(self, x):
        return x[:, :5] @ self.project(self.table)


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), 4),
    "tokens, factored (T = 2)": (lambda: Tokens(2, 16), 8),
    "tokens, formed (T = 8)": (lambda: Tokens(8, 4), 32),
}
FALLBACKS = {
    "weight used outside its layer": (Tied, 4),
    "examples interact": (Centred, 4),
    "layer on a parameter table": (Table, 5),
}


def bound(factory, features: int, dtype: str, l2: float, seed: int = 0):
    torch.manual_seed(seed)
    module = factory().to(getattr(torch, dtype)).eval()
    model = krylov_influence.InfluenceModel(module, cross_entropy, l2=l2, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(11, features, generator=generator, dtype=getattr(torch, dtype))
    y = torch.randint(0, 3, (11,), generator=generator)
    return model, (x[:4], y[:4]), (x[4:], y[4:])


def tolerance(dtype: str) -> float:
    return 100 * float(np.finfo(dtype).eps)


def assert_matches_formed(model, query, train, dtype: str) -> None:
    gradients = model.query_gradients(query)
    formed_query = model.per_example_grads(query)
    expected = (formed_query @ model.per_example_grads(train).T).numpy()
    found = model.gradient_inner_products(gradients, train).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(found, expected, rtol=0, atol=tolerance(dtype) * scale)
    projector = torch.randn(3, model.num_parameters, dtype=formed_query.dtype)
    expected = (formed_query @ projector.T).numpy()
    found = model.project_query_gradients(gradients, projector).numpy()
    np.testing.assert_allclose(found, expected, rtol=0, atol=tolerance(dtype) * scale)


@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_factored_inner_products_equal_the_formed_ones(name, dtype, l2):
    model, query, train = bound(*MODELS[name], dtype, l2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouteFallbackWarning)
        assert_matches_formed(model, query, train, dtype)
    assert model.routes["query gradients"] == FACTORED_LINEAR


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_a_model_that_cannot_be_factored_takes_the_formed_route(name):
    model, query, train = bound(*FALLBACKS[name], "float64", 0.1)
    with pytest.warns(RouteFallbackWarning, match="query gradients"):
        assert_matches_formed(model, query, train, "float64")
    assert model.routes["query gradients"] == FORMED_GRADIENTS


def test_the_complement_scores_equal_the_dense_formula():
    """The calculator's scores with ``complement="mean"`` on an ``nn.Linear`` model, against
    ``P_z Λ⁻¹ P_xᵀ + w (g_zᵀ g_x − P_z P_xᵀ)`` from formed gradients and the fitted ``G``."""
    model, query, train = bound(*MODELS["tokens, factored (T = 2)"], "float64", 0.1)
    calc = krylov_influence.ArnoldiInfluenceCalculator(
        model, [train], 40, True, 10, damping=0.01, complement="mean", show_progress=False
    )
    scores = calc.influence_matrix([query], [train])
    assert model.routes["query gradients"] == FACTORED_LINEAR
    basis = calc.eigenbasis
    projector = calc.model.to_numpy(calc._placed(None).projector)
    inverse = np.asarray(basis.inverse_eigenvalues)
    weight = basis.complement.weight(basis.damping)
    g_query = model.per_example_grads(query).numpy()
    g_train = model.per_example_grads(train).numpy()
    p_query, p_train = g_query @ projector.T, g_train @ projector.T
    expected = (p_query * inverse) @ p_train.T + weight * (
        g_query @ g_train.T - p_query @ p_train.T
    )
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_a_training_batch_past_the_gradient_budget_is_contracted_in_chunks(monkeypatch):
    model, query, train = bound(*MODELS["tokens, factored (T = 2)"], "float64", 0.1)
    row = model.num_parameters * 8
    monkeypatch.setattr(type(model), "GRADIENT_PROJECTION_BYTES", 2 * row)  # 2 examples a chunk
    assert_matches_formed(model, query, train, "float64")  # 7 training examples: 4 chunks


@pytest.mark.parametrize("l2", [0.0, 0.3])
def test_projections_with_norms_in_chunks_equal_the_formed_gradients(l2, monkeypatch):
    """Self-influence with the complement: ``G g`` and ``‖g‖²`` from one pass, in chunks."""
    model, _, train = bound(*MODELS["tokens, factored (T = 2)"], "float64", l2)
    monkeypatch.setattr(type(model), "GRADIENT_PROJECTION_BYTES", 2 * model.num_parameters * 8)
    projector = torch.randn(3, model.num_parameters, dtype=torch.float64)
    projected, norms = model.project_with_norms(projector, train)  # 7 examples: 4 chunks
    formed = model.per_example_grads(train)
    scale = float(formed.abs().max()) ** 2
    np.testing.assert_allclose(projected, formed @ projector.T, rtol=0, atol=1e-12 * scale)
    expected = (formed * formed).sum(dim=1)
    np.testing.assert_allclose(norms, expected, rtol=1e-12)
