"""xnorm's torch backend against torch's own ``parametrizations.weight_norm``: bit for bit.

The backend promises the same storage (keys, shapes, dtypes, values) and the same kernel as torch's
weight norm, so everything here is compared with ``torch.equal``, not a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import xnorm
from xnorm.conformance.adapters.torch import build_torch_layer
from xnorm.conformance.cases import LAYERS, Case, dims_for

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
LAYERS_BY_LABEL = {layer.label: layer for layer in LAYERS}
# Low-precision dtypes go through the same kernel with different rounding; two layer kinds (a matmul
# and a convolution) are enough to catch a backend that casts differently from torch.
LOW_PRECISION_LAYERS = ("linear", "conv1d")


def _parity_cases():
    cases = [Case(layer, dim, dtype, "cpu")
             for dtype in ("float32", "float64")
             for layer in LAYERS
             for dim in dims_for(len(layer.weight_shape))]
    cases += [Case(LAYERS_BY_LABEL[label], dim, dtype, "cpu")
              for dtype in ("bfloat16", "float16")
              for label in LOW_PRECISION_LAYERS
              for dim in dims_for(len(LAYERS_BY_LABEL[label].weight_shape))]
    return cases


PARITY_CASES = _parity_cases()


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def build_twins(case: Case):
    """Two modules of the case's layer holding the case's weight and bias (bitwise identical)."""
    dtype = TORCH_DTYPES[case.dtype]
    arrays = case.arrays()
    first = build_torch_layer(case.layer).to(dtype)
    with torch.no_grad():
        first.weight.copy_(_tensor(arrays["weight"], dtype))
        if case.layer.bias:
            first.bias.copy_(_tensor(arrays["bias"], dtype))
    second = build_torch_layer(case.layer).to(dtype)
    second.load_state_dict(first.state_dict())
    return first, second, arrays


def layer_input(case: Case, arrays) -> torch.Tensor:
    x = arrays["x"]
    if x.dtype.kind == "i":  # Embedding indices
        return torch.from_numpy(x)
    return _tensor(x, TORCH_DTYPES[case.dtype])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual, expected), (
        f"{what} differs from torch's weight_norm: max abs diff "
        f"{(actual.double() - expected.double()).abs().max().item():.3g}"
    )


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda case: case.id)
def test_wrap_matches_torch_weight_norm_bitwise(case):
    ours_plain, theirs_plain, arrays = build_twins(case)
    ours = xnorm.wrap(ours_plain, dim=case.dim)
    theirs = torch_weight_norm(theirs_plain, dim=case.dim)
    assert ours is ours_plain, "torch modules are wrapped in place"

    expected_keys = {"parametrizations.weight.original0", "parametrizations.weight.original1"}
    if case.layer.bias:
        expected_keys.add("bias")
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert set(ours_state) == expected_keys
    assert list(ours_state) == list(theirs_state)
    for key in ours_state:
        assert_bitwise_equal(ours_state[key], theirs_state[key], f"state_dict[{key!r}]")
    assert_bitwise_equal(ours.weight, theirs.weight, "weight")

    x = layer_input(case, arrays)
    y_ours, y_theirs = ours(x), theirs(x)
    assert_bitwise_equal(y_ours, y_theirs, "forward output")

    grad_output = _tensor(arrays["grad_output"], y_ours.dtype)
    y_ours.backward(grad_output)
    y_theirs.backward(grad_output)
    grads = {"original0": (ours.parametrizations.weight.original0, theirs.parametrizations.weight.original0),
             "original1": (ours.parametrizations.weight.original1, theirs.parametrizations.weight.original1)}
    if case.layer.bias:
        grads["bias"] = (ours.bias, theirs.bias)
    for what, (ours_param, theirs_param) in grads.items():
        assert ours_param.grad is not None, f"no gradient reached {what}"
        assert_bitwise_equal(ours_param.grad, theirs_param.grad, f"gradient of {what}")


@pytest.mark.parametrize("optimizer_name", ["SGD", "Adam"])
@pytest.mark.parametrize("label, dim", [("conv1d", 0), ("linear", None), ("conv_transpose1d", 1)])
def test_optimizer_step_trains_g_and_v_like_torch_weight_norm(label, dim, optimizer_name):
    case = Case(LAYERS_BY_LABEL[label], dim, "float32", "cpu")
    ours_plain, theirs_plain, arrays = build_twins(case)
    ours = xnorm.wrap(ours_plain, dim=dim)
    theirs = torch_weight_norm(theirs_plain, dim=dim)
    before = {key: value.clone() for key, value in ours.state_dict().items()}

    x = layer_input(case, arrays)
    target = _tensor(arrays["target"], torch.float32)
    for module in (ours, theirs):
        optimizer = getattr(torch.optim, optimizer_name)(module.parameters(), lr=0.1)
        loss = 0.5 * ((module(x) - target) ** 2).mean()
        loss.backward()
        optimizer.step()

    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    for key in ("parametrizations.weight.original0", "parametrizations.weight.original1"):
        assert not torch.equal(ours_state[key], before[key]), f"{key} did not change in the optimizer step"
    for key in ours_state:
        assert_bitwise_equal(ours_state[key], theirs_state[key], f"state_dict[{key!r}] after one step")
    assert_bitwise_equal(ours.weight, theirs.weight, "weight after one step")
