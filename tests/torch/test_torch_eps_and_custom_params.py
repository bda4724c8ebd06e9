"""The eps option (not torch's) and custom parameter names, against xnorm.reference in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import xnorm
from xnorm import reference
from xnorm.conformance.tolerances import assert_close

EPS = 1e-3

EPS_MODULES = {
    "linear": (lambda: nn.Linear(6, 4), (3, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, (3, 2)), (2, 3, 6, 5)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 7)),
}
EPS_CASES = [(kind, dim) for kind in EPS_MODULES for dim in (0, 1, -2, None, -1)]


def numpy64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def g_and_v(module: nn.Module, name: str = "weight"):
    stack = module.parametrizations[name]
    return stack.original0, stack.original1


def build(kind: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return EPS_MODULES[kind][0]().to(dtype)


@pytest.mark.parametrize("kind, dim", EPS_CASES, ids=[f"{k}-dim{d}" for k, d in EPS_CASES])
def test_eps_initialises_g_with_eps_and_preserves_the_function(kind, dim):
    plain = build(kind, torch.float64)
    module = build(kind, torch.float64)
    original_weight = numpy64(module.weight)
    x = torch.randn(*EPS_MODULES[kind][1], dtype=torch.float64)

    xnorm.wrap(module, dim=dim, eps=EPS)

    g, v = g_and_v(module)
    expected_g, _ = reference.init(original_weight, dim, eps=EPS)
    # g keeps torch's shape convention whatever eps is.
    assert g.shape == torch.norm_except_dim(plain.weight, 2, -1 if dim is None else dim).shape
    assert_close(numpy64(g), expected_g.reshape(g.shape), "float64", "weight", what="g at init")
    assert torch.equal(v, plain.weight)
    assert_close(numpy64(module.weight), original_weight, "float64", "weight", what="w at init")
    assert_close(numpy64(module(x)), numpy64(plain(x)), "float64", "forward", what="wrapped output")


@pytest.mark.parametrize("kind, dim", EPS_CASES, ids=[f"{k}-dim{d}" for k, d in EPS_CASES])
def test_eps_weight_and_gradients_match_the_reference(kind, dim):
    module = xnorm.wrap(build(kind, torch.float64), dim=dim, eps=EPS)
    g, v = g_and_v(module)
    generator = torch.Generator().manual_seed(1)
    # g away from its initial value (and of mixed signs), so w is not just the original weight.
    with torch.no_grad():
        g.copy_(torch.randn(g.shape, generator=generator, dtype=torch.float64))
        v.copy_(torch.randn(v.shape, generator=generator, dtype=torch.float64))
    grad_w = torch.randn(v.shape, generator=generator, dtype=torch.float64)

    weight = module.weight
    (weight * grad_w).sum().backward()

    expected_w = reference.weight_norm(numpy64(g), numpy64(v), dim, eps=EPS)
    expected_grad_g, expected_grad_v = reference.weight_norm_grads(numpy64(g), numpy64(v), numpy64(grad_w), dim,
                                                                    eps=EPS)
    assert_close(numpy64(weight), expected_w, "float64", "weight", what="w with eps")
    assert_close(numpy64(g.grad), expected_grad_g, "float64", "gradient", what="dL/dg with eps")
    assert_close(numpy64(v.grad), expected_grad_v, "float64", "gradient", what="dL/dv with eps")


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_eps_low_precision_weight_matches_the_reference_computed_the_spec_way(dtype, name):
    module = xnorm.wrap(build("conv1d", dtype), dim=0, eps=EPS)
    g, v = g_and_v(module)
    assert g.dtype == dtype and v.dtype == dtype
    assert module.weight.dtype == dtype
    expected = reference.weight_norm(numpy64(g), numpy64(v), 0, eps=EPS, dtype=name)
    assert_close(numpy64(module.weight), expected, name, "weight", what=f"{name} w with eps")


def linear_with_a_zero_row() -> nn.Linear:
    torch.manual_seed(0)
    module = nn.Linear(3, 4)
    with torch.no_grad():
        module.weight[1].zero_()
    return module


def test_zero_row_without_eps_gives_nan_in_that_row_like_torch():
    module = xnorm.wrap(linear_with_a_zero_row(), dim=0)
    theirs = torch_weight_norm(linear_with_a_zero_row(), dim=0)
    x = torch.randn(5, 3)

    weight = module.weight
    assert torch.isnan(weight[1]).all()
    assert torch.isfinite(weight[[0, 2, 3]]).all()
    assert torch.equal(torch.isnan(weight), torch.isnan(theirs.weight))
    output = module(x)
    assert torch.isnan(output[:, 1]).all()
    assert torch.isfinite(output[:, [0, 2, 3]]).all()


def test_zero_row_with_eps_stays_finite_and_zero():
    plain = linear_with_a_zero_row()
    module = xnorm.wrap(linear_with_a_zero_row(), dim=0, eps=EPS)
    x = torch.randn(5, 3)

    weight = module.weight
    assert torch.isfinite(weight).all()
    assert torch.equal(weight[1], torch.zeros(3))
    output = module(x)
    assert torch.isfinite(output).all()
    assert_close(output.detach().numpy(), plain(x).detach().numpy(), "float32", "forward", what="output with eps")


class Projection(nn.Module):
    """A custom module whose weight is not called ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
        self.offset = nn.Parameter(torch.randn(5, dtype=torch.float64))

    def forward(self, x):
        return x @ self.kernel + self.offset


def test_custom_parameter_name_is_wrapped_and_matches_the_reference():
    torch.manual_seed(0)
    module = Projection()
    original_kernel = numpy64(module.kernel)
    x = torch.randn(4, 3, dtype=torch.float64)
    plain_output = module(x).detach()

    assert xnorm.wrap(module, name="kernel", dim=1) is module

    assert xnorm.is_wrapped(module)
    assert set(module.state_dict()) == {"offset", "parametrizations.kernel.original0",
                                        "parametrizations.kernel.original1"}
    g, v = g_and_v(module, "kernel")
    assert g.shape == (1, 5)
    assert_close(numpy64(module.kernel), original_kernel, "float64", "weight", what="kernel at init")
    assert_close(numpy64(module(x)), numpy64(plain_output), "float64", "forward", what="wrapped output")

    with torch.no_grad():
        g.mul_(torch.linspace(0.5, 2.0, 5, dtype=torch.float64))
    expected = reference.weight_norm(numpy64(g), numpy64(v), 1)
    assert_close(numpy64(module.kernel), expected, "float64", "weight", what="kernel")


def test_custom_parameter_name_loads_legacy_keys_and_removes():
    torch.manual_seed(0)
    source = Projection()
    torch.manual_seed(1)
    module = xnorm.wrap(Projection(), name="kernel", dim=1)
    legacy_g = torch.rand(1, 5, dtype=torch.float64) + 0.5
    checkpoint = {"kernel_g": legacy_g, "kernel_v": source.kernel.detach().clone(),
                  "offset": source.offset.detach().clone()}

    module.load_state_dict(checkpoint, strict=True)
    expected = reference.weight_norm(numpy64(legacy_g), numpy64(source.kernel), 1)
    assert_close(numpy64(module.kernel), expected, "float64", "weight", what="kernel from legacy keys")

    wrapped_kernel = module.kernel.detach().clone()
    xnorm.remove(module)
    assert type(module) is Projection
    assert isinstance(module.kernel, nn.Parameter)
    assert torch.equal(module.kernel, wrapped_kernel)
    assert sorted(module.state_dict()) == ["kernel", "offset"]
