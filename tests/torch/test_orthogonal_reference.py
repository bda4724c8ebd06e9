"""xnorm.reference_orthogonal against torch's own parametrizations.orthogonal, in float64: the weight for
given original and base, the gradient with respect to original, and registration (the QR rule, the
completion of non-square weights, -I in original), for every map, with and without trivialization, on
square, tall and wide matrices and a batch of matrices (a Conv2d weight)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from xnorm import reference_orthogonal as ref
from xnorm.conformance.tolerances import assert_close

SHAPES = {"square": (4, 4), "tall": (5, 3), "wide": (3, 5), "conv2d": (2, 3, 3, 3)}


class Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def _registered(shape, orthogonal_map, use_trivialization, seed=0):
    torch.manual_seed(seed)
    module = Holder(torch.randn(*shape, dtype=torch.float64))
    weight = module.weight.detach().numpy().copy()
    parametrizations.orthogonal(module, "weight", orthogonal_map, use_trivialization=use_trivialization)
    return module, weight


def _cases():
    for label, shape in SHAPES.items():
        for orthogonal_map in ref.MAPS:
            for trivialization in (True, False):
                case_id = f"{label}-{orthogonal_map}-{'trivialized' if trivialization else 'direct'}"
                yield pytest.param(shape, orthogonal_map, trivialization, id=case_id)


@pytest.mark.parametrize(("shape", "orthogonal_map", "trivialization"), list(_cases()))
def test_weight_and_gradient_equal_torchs_for_the_same_original_and_base(shape, orthogonal_map, trivialization):
    module, _ = _registered(shape, orthogonal_map, trivialization)
    # move original away from registration's -I so that every map does real work; householder reads its
    # diagonal as the integer signs of the columns (never differentiated), so that stays
    with torch.no_grad():
        original = module.parametrizations.weight.original
        noise = 0.3 * torch.randn(original.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        if orthogonal_map == "householder":
            noise.diagonal(dim1=-2, dim2=-1).zero_()
        original.add_(noise)
    base = module.parametrizations.weight[0].base.numpy() if trivialization else None
    x = original.detach().numpy().copy()
    weight = module.weight
    assert_close(weight.detach().numpy(), ref.forward(x, orthogonal_map, base), "float64", "weight", what="Q")
    grad_weight = np.random.default_rng(2).standard_normal(weight.shape)
    (weight * torch.from_numpy(grad_weight)).sum().backward()
    assert_close(original.grad.numpy(), ref.gradient(x, grad_weight, orthogonal_map, base), "float64", "gradient",
                 what="dL/doriginal")
    # orthonormal columns (rows for a wide matrix)
    q = ref.forward(x, orthogonal_map, base)
    tall = q if q.shape[-2] >= q.shape[-1] else np.swapaxes(q, -1, -2)
    assert_close(np.swapaxes(tall, -1, -2) @ tall, np.broadcast_to(np.eye(tall.shape[-1]), tall.shape[:-2] +
                 (tall.shape[-1],) * 2), "float64", "weight", what="Q^T Q")


@pytest.mark.parametrize(("shape", "orthogonal_map", "trivialization"), list(_cases()))
def test_registration_equals_torchs(shape, orthogonal_map, trivialization):
    module, weight = _registered(shape, orthogonal_map, trivialization, seed=3)
    n, k = max(shape[-2:]), min(shape[-2:])
    completion = None
    if trivialization and n != k:
        # torch draws the completing columns right after the weight: replay that draw
        torch.manual_seed(3)
        torch.randn(*shape, dtype=torch.float64)
        completion = torch.randn(*(shape[:-2] + (n, n - k)), dtype=torch.float64).numpy()
    original, base = ref.register(weight, orthogonal_map, use_trivialization=trivialization, completion=completion)
    assert_close(module.parametrizations.weight.original.detach().numpy(), original, "float64", "weight",
                 what="original")
    if trivialization:
        assert_close(module.parametrizations.weight[0].base.numpy(), base, "float64", "weight", what="base")
    assert_close(module.weight.detach().numpy(), ref.forward(original, orthogonal_map, base), "float64", "weight",
                 what="registered weight")


def test_a_square_orthogonal_weight_is_kept_and_others_are_made_orthogonal():
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((4, 4)))
    original, base = ref.register(q, "matrix_exp")
    np.testing.assert_array_equal(base, q)  # kept as it is
    assert_close(ref.forward(original, "matrix_exp", base), q, "float64", "weight", what="weight kept")
    w = np.random.default_rng(5).standard_normal((4, 4))
    _, base = ref.register(w, "matrix_exp")
    assert_close(base, ref.make_orthogonal(w), "float64", "weight", what="QR with diag(R) >= 0")
    assert np.all(np.diagonal(np.linalg.qr(w)[1]) * np.diagonal(base.T @ w) >= 0)


def test_bad_inputs_are_refused_as_torch_refuses_them():
    with pytest.raises(ValueError, match="matrix or a batch of matrices"):
        ref.forward(np.ones(3))
    with pytest.raises(ValueError, match="orthogonal_map must be one of"):
        ref.forward(np.ones((3, 3)), "qr")
    # torch refuses the same two; without trivialization matrix_exp and cayley register (original = the
    # weight) but refuse an assignment
    with pytest.raises(ValueError):
        parametrizations.orthogonal(nn.Linear(3, 1), "bias")
    with pytest.raises(ValueError):
        parametrizations.orthogonal(nn.Linear(3, 3), orthogonal_map="qr")
    module = parametrizations.orthogonal(nn.Linear(3, 3), orthogonal_map="cayley", use_trivialization=False)
    with pytest.raises(NotImplementedError):
        module.weight = torch.eye(3)
