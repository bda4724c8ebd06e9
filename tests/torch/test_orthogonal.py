"""xnorm.orthogonal on torch modules: bit-equal to torch's own parametrizations.orthogonal (registration with
the same RNG state, weight, gradients, buffers, keys, training steps), remove, and refusals that change
nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import xnorm
from xnorm import reference_orthogonal as ref
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import AlreadyWrappedError, DimError, OptionError

LAYERS = {
    "linear-square": lambda: nn.Linear(4, 4),
    "linear-tall": lambda: nn.Linear(3, 5),  # weight (5, 3)
    "linear-wide": lambda: nn.Linear(5, 3),  # weight (3, 5)
    "conv2d": lambda: nn.Conv2d(2, 3, 3),  # a batch of 3x3 matrices
}


def _pair(make, orthogonal_map, trivialization, dtype=torch.float32, seed=0):
    """(torch's own, xnorm's), each registered from the same weights and the same RNG state."""
    torch.manual_seed(seed)
    theirs = make().to(dtype)
    ours = copy.deepcopy(theirs)
    torch.manual_seed(seed + 1)
    parametrizations.orthogonal(theirs, orthogonal_map=orthogonal_map, use_trivialization=trivialization)
    torch.manual_seed(seed + 1)
    xnorm.orthogonal(ours, orthogonal_map, use_trivialization=trivialization)
    return theirs, ours


def _cases():
    for label, make in LAYERS.items():
        for orthogonal_map in (None, "matrix_exp", "cayley", "householder"):
            for trivialization in (True, False):
                name = f"{label}-{orthogonal_map or 'default'}-{'trivialized' if trivialization else 'direct'}"
                yield pytest.param(make, orthogonal_map, trivialization, id=name)


@pytest.mark.parametrize(("make", "orthogonal_map", "trivialization"), list(_cases()))
def test_bit_equal_to_torchs_own(make, orthogonal_map, trivialization):
    theirs, ours = _pair(make, orthogonal_map, trivialization)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # parametrizations.weight.original, .0.base
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert torch.equal(ours.weight, theirs.weight)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (theirs, ours)]
    x = torch.randn(2, theirs.in_features) if isinstance(theirs, nn.Linear) else torch.randn(2, 2, 5, 5)
    for _ in range(3):
        for module, optimizer in zip((theirs, ours), optimizers, strict=True):
            optimizer.zero_grad()
            (module(x) ** 2).mean().backward()
            optimizer.step()
        original = "parametrizations.weight.original"
        assert torch.equal(dict(ours.named_parameters())[original].grad, dict(theirs.named_parameters())[original].grad)
        assert torch.equal(ours.weight, theirs.weight)


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_the_weight_is_the_reference_and_stays_orthogonal_in_training(orthogonal_map):
    torch.manual_seed(0)
    layer = xnorm.orthogonal(nn.Linear(3, 5).double(), orthogonal_map)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.2)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(20):
        optimizer.zero_grad()
        (layer(x) ** 2).mean().backward()
        optimizer.step()
    original = layer.parametrizations.weight.original.detach().numpy()
    base = layer.parametrizations.weight[0].base.numpy()
    weight = layer.weight.detach().numpy()
    assert_close(weight, ref.forward(original, orthogonal_map, base), "float64", "weight", what="w")
    assert_close(weight.T @ weight, np.eye(3), "float64", "weight", what="W^T W after 20 steps")


def test_remove_leaves_a_plain_layer_holding_the_orthogonal_weight():
    torch.manual_seed(0)
    layer = xnorm.orthogonal(nn.Linear(4, 4))
    weight = layer.weight.detach().clone()
    plain = xnorm.remove(layer)
    assert not parametrize.is_parametrized(plain)
    assert sorted(n for n, _ in plain.named_parameters()) == ["bias", "weight"]
    assert torch.equal(plain.weight, weight)


def test_refusals_change_nothing():
    layer = nn.Linear(3, 3)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(DimError, match="matrix or a batch of matrices"):
        xnorm.orthogonal(layer, name="bias")
    with pytest.raises(OptionError, match="orthogonal_map must be one of"):
        xnorm.orthogonal(layer, "qr")
    with pytest.raises(OptionError, match="use_trivialization must be True or False"):
        xnorm.orthogonal(layer, use_trivialization="yes")
    assert not parametrize.is_parametrized(layer)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    wrapped = xnorm.orthogonal(layer)
    state = copy.deepcopy(wrapped.state_dict())
    with pytest.raises(AlreadyWrappedError):
        xnorm.orthogonal(wrapped)
    with pytest.raises(AlreadyWrappedError):
        xnorm.weight_norm(wrapped)
    assert list(wrapped.state_dict()) == list(state)


def test_without_trivialization_matrix_exp_and_cayley_cannot_be_assigned_to():
    layer = xnorm.orthogonal(nn.Linear(3, 3), "cayley", use_trivialization=False)
    with pytest.raises(NotImplementedError, match="cannot be assigned .* without trivialization"):
        layer.weight = torch.eye(3)
