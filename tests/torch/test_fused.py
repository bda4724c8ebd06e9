"""``xnorm.wrap(module, fused=True)``: the same math as the materialised path, without materialising w.

Outputs and gradients are compared with the float64 NumPy reference (``xnorm.reference`` and
``xnorm.conformance.layers``) and with the non-fused wrapper, at the conformance tolerances. Where the
fused path falls back, the module must be the non-fused wrapper exactly (bitwise). The conformance
catalogue runs the same cases in float32 and bfloat16 through the ``torch-fused`` adapter.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import xnorm
from xnorm import reference
from xnorm._backends.torch import WeightNormParametrization
from xnorm._backends.torch.fused import fused_side, runs_fused
from xnorm.conformance import layers
from xnorm.conformance.adapters.torch import build_torch_layer
from xnorm.conformance.cases import LAYERS, Case, dims_for
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import AlreadyWrappedError, DimError, MissingParameterError, NonFloatingParameterError
from xnorm.spec import fused_scale_side, normalize_dim

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
CATALOGUE = [Case(layer, dim, "float64", "cpu") for layer in LAYERS for dim in dims_for(len(layer.weight_shape))]
LAYERS_BY_LABEL = {layer.label: layer for layer in LAYERS}
ROOT = Path(__file__).resolve().parents[2]


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy().copy()  # a copy: optimizers update in place


def build(case: Case, *, fused: bool, wrap: bool = True) -> nn.Module:
    """The case's layer holding the case's weight and bias, wrapped (fused or not) with the case's dim."""
    dtype = TORCH_DTYPES[case.dtype]
    arrays = case.arrays()
    module = build_torch_layer(case.layer).to(dtype)
    with torch.no_grad():
        module.weight.copy_(_tensor(arrays["weight"], dtype))
        if case.layer.bias:
            module.bias.copy_(_tensor(arrays["bias"], dtype))
    return xnorm.wrap(module, dim=case.dim, fused=fused) if wrap else module


def case_input(case: Case) -> torch.Tensor:
    x = case.arrays()["x"]
    return torch.from_numpy(x) if x.dtype.kind == "i" else _tensor(x, TORCH_DTYPES[case.dtype])


def g_and_v(module: nn.Module):
    return module.parametrizations.weight.original0, module.parametrizations.weight.original1


def trainable(module: nn.Module):
    """``{"g", "v"[, "bias"]}`` of a wrapped module."""
    g, v = g_and_v(module)
    out = {"g": g, "v": v}
    if getattr(module, "bias", None) is not None:
        out["bias"] = module.bias
    return out


def gradients(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    tensors = trainable(module)
    grads = torch.autograd.grad(module(x), list(tensors.values()), grad_output)
    return dict(zip(tensors, grads, strict=True))


def expected_side(case: Case):
    dim = normalize_dim(case.dim, len(case.layer.weight_shape))
    return fused_scale_side(case.layer.kind, dim)


# -- the catalogue, float64: reference and non-fused wrapper -----------------------------------------


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda case: case.id)
def test_fused_matches_the_reference_and_the_materialised_path(case):
    arrays = case.arrays()
    fused, plain_wrapper = build(case, fused=True), build(case, fused=False)
    assert fused_side(fused) == expected_side(case), "fused where the spec's algebra applies, else materialised"
    assert fused_side(plain_wrapper) is None
    x = case_input(case)
    g, v = (_numpy(t) for t in g_and_v(fused))
    bias = _numpy(fused.bias) if case.layer.bias else None
    w = reference.weight_norm(g, v, case.dim)

    y = fused(x)
    assert_close(_numpy(y), layers.forward(case.layer, w, bias, arrays["x"]), "float64", "forward", what="output")
    assert_close(_numpy(y), _numpy(plain_wrapper(x)), "float64", "forward", what="output vs non-fused")

    grad_output = _tensor(arrays["grad_output"], torch.float64)
    grads = gradients(fused, x, grad_output)
    grad_w, grad_b = layers.backward(case.layer, w, arrays["x"], arrays["grad_output"])
    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, case.dim)
    assert_close(_numpy(grads["g"]), grad_g, "float64", "gradient", what="dL/dg")
    assert_close(_numpy(grads["v"]), grad_v, "float64", "gradient", what="dL/dv")
    if case.layer.bias:
        assert_close(_numpy(grads["bias"]), grad_b, "float64", "gradient", what="dL/dbias")
    for key, value in gradients(plain_wrapper, x, grad_output).items():
        assert_close(_numpy(grads[key]), _numpy(value), "float64", "gradient", what=f"dL/d{key} vs non-fused")


@pytest.mark.parametrize("case", [c for c in CATALOGUE if c.layer.label in ("linear", "conv1d-g2-s2-d2",
                                                                           "conv_transpose1d-g2-s2-op1", "embedding")],
                         ids=lambda case: case.id)
def test_an_sgd_step_matches_the_reference_step(case):
    arrays = case.arrays()
    module = build(case, fused=True)
    g0, v0 = (_numpy(t) for t in g_and_v(module))
    bias0 = _numpy(module.bias) if case.layer.bias else None
    lr = 0.5
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    y = module(case_input(case))
    target = _tensor(arrays["target"], torch.float64)
    (0.5 * ((y - target) ** 2).mean()).backward()
    optimizer.step()

    w = reference.weight_norm(g0, v0, case.dim)
    y_ref = layers.forward(case.layer, w, bias0, arrays["x"])
    grad_w, grad_b = layers.backward(case.layer, w, arrays["x"], (y_ref - arrays["target"]) / y_ref.size)
    grad_g, grad_v = reference.weight_norm_grads(g0, v0, grad_w, case.dim)
    g1, v1 = g_and_v(module)
    assert_close(_numpy(g1), g0 - lr * grad_g, "float64", "training", what="g after one step")
    assert_close(_numpy(v1), v0 - lr * grad_v, "float64", "training", what="v after one step")
    if case.layer.bias:
        assert_close(_numpy(module.bias), bias0 - lr * grad_b, "float64", "training", what="bias after one step")


# -- low precision: s and the norm in float32, one cast --------------------------------------------


@pytest.mark.parametrize("label", ["linear", "conv1d", "conv_transpose1d", "embedding"])
def test_bfloat16_stays_within_the_dtype_tolerance(label):
    # float16 is not in the torch adapter's dtypes: torch's float16 CPU kernels (the materialised path's
    # too) exceed the float16 row of the tolerance table for gradients and convolutions. The fused
    # path's own float16 concern, the norm's precision, is tested below.
    dtype = "bfloat16"
    layer = LAYERS_BY_LABEL[label]
    for dim in (0, 1, None):
        case = Case(layer, dim, dtype, "cpu")
        arrays = case.arrays()
        fused = build(case, fused=True)
        assert fused_side(fused) is not None
        g, v = g_and_v(fused)
        assert g.dtype == v.dtype == TORCH_DTYPES[dtype]
        x = case_input(case)
        y = fused(x)
        assert y.dtype == TORCH_DTYPES[dtype]
        g64, v64 = _numpy(g), _numpy(v)
        bias = _numpy(fused.bias) if layer.bias else None
        w = reference.weight_norm(g64, v64, dim)
        assert_close(_numpy(y), layers.forward(layer, w, bias, arrays["x"]), dtype, "forward", what=f"dim={dim} output")
        grads = gradients(fused, x, _tensor(arrays["grad_output"], TORCH_DTYPES[dtype]))
        assert grads["g"].dtype == grads["v"].dtype == TORCH_DTYPES[dtype]
        grad_w, _ = layers.backward(layer, w, arrays["x"], arrays["grad_output"])
        grad_g, grad_v = reference.weight_norm_grads(g64, v64, grad_w, dim)
        assert_close(_numpy(grads["g"]), grad_g, dtype, "gradient", what=f"dim={dim} dL/dg")
        assert_close(_numpy(grads["v"]), grad_v, dtype, "gradient", what=f"dim={dim} dL/dv")


@pytest.mark.parametrize("dim", [0, 1, None])
def test_float16_norm_is_computed_in_float32(dim):
    # Rows of 16 values near 100: the sum of squares (~1.6e5) overflows float16 (max 65504).
    weight = 100.0 + torch.linspace(-5.0, 5.0, 64, dtype=torch.float64).reshape(4, 16)
    module = nn.Linear(16, 4, bias=False).half()
    with torch.no_grad():
        module.weight.copy_(weight)
    assert torch.isinf((module.weight.detach() ** 2).sum()), "the check must be able to fail"
    fused = xnorm.wrap(module, dim=dim, fused=True)
    assert fused_side(fused) is not None
    x = torch.linspace(-0.01, 0.01, 48, dtype=torch.float64).reshape(3, 16)
    y = fused(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    g, v = (_numpy(t) for t in g_and_v(fused))
    expected = x.numpy() @ reference.weight_norm(g, v, dim).T
    assert_close(_numpy(y), expected, "float16", "forward", what="float16 output")


# -- layer options the catalogue does not vary ----------------------------------------------------


def _twins(factory, dim=0, eps=None, dtype=torch.float64):
    torch.manual_seed(0)
    first = factory().to(dtype)
    second = factory().to(dtype)
    second.load_state_dict(first.state_dict())
    return xnorm.wrap(first, dim=dim, eps=eps, fused=True), xnorm.wrap(second, dim=dim, eps=eps)


def _assert_same_function(fused, materialised, x, *, call=None, dtype="float64"):
    """Output, dL/dx (for a floating x) and the parameter gradients agree with the non-fused wrapper."""
    call = call or (lambda module, inp: module(inp))
    results = []
    for module in (fused, materialised):
        inp = x.clone().requires_grad_(x.is_floating_point())
        y = call(module, inp)
        targets = [p for p in module.parameters() if p.requires_grad] + ([inp] if inp.requires_grad else [])
        grads = torch.autograd.grad(y, targets, torch.ones_like(y) + 0.5 * torch.arange(y.numel()).reshape(y.shape))
        results.append((y, grads))
    (y_f, grads_f), (y_m, grads_m) = results
    assert y_f.shape == y_m.shape
    assert_close(_numpy(y_f), _numpy(y_m), dtype, "forward", what="output vs non-fused")
    for a, b in zip(grads_f, grads_m, strict=True):
        assert_close(_numpy(a), _numpy(b), dtype, "gradient", what="gradient vs non-fused")


OPTION_CASES = {
    "conv1d-reflect": (lambda: nn.Conv1d(4, 6, 3, padding=2, padding_mode="reflect"), (2, 4, 9), 0),
    "conv2d-circular-s2": (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2, padding_mode="circular"), (2, 4, 7, 6), 1),
    "conv1d-replicate-same": (lambda: nn.Conv1d(4, 6, 3, padding="same", padding_mode="replicate"), (2, 4, 9), 0),
    "conv1d-same-even-kernel": (lambda: nn.Conv1d(4, 6, 4, padding="same"), (2, 4, 9), 0),
    "conv2d-same-dilated": (lambda: nn.Conv2d(4, 6, (3, 2), padding="same", dilation=(2, 1)), (2, 4, 7, 6), 1),
    "conv1d-valid": (lambda: nn.Conv1d(4, 6, 3, padding="valid"), (2, 4, 9), None),
    "conv1d-unbatched": (lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2), (4, 9), 1),
    "conv_transpose2d-unbatched": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (4, 3, 3), 1),
    "conv3d-groups": (lambda: nn.Conv3d(4, 6, 2, groups=2), (1, 4, 3, 3, 3), 1),
    "linear-3d-input": (lambda: nn.Linear(6, 4), (2, 3, 6), 0),
    "linear-1d-input": (lambda: nn.Linear(6, 4), (6,), 1),
    "linear-large-batch": (lambda: nn.Linear(3, 2), (50, 3), 0),  # dL/dy larger than w: the other backward
}


@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # torch's, from the non-fused twin
@pytest.mark.parametrize("label", sorted(OPTION_CASES))
def test_layer_options_match_the_materialised_path(label):
    factory, shape, dim = OPTION_CASES[label]
    for eps in (None, 1e-3):
        fused, materialised = _twins(factory, dim=dim, eps=eps)
        assert fused_side(fused) is not None
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        _assert_same_function(fused, materialised, x)


def test_conv_transpose_output_size_argument():
    fused, materialised = _twins(lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), dim=0)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    _assert_same_function(fused, materialised, x, call=lambda module, inp: module(inp, output_size=[12]))
    assert fused(x, output_size=[12]).shape[-1] == 12


@pytest.mark.parametrize("dim", [0, 1, None])
def test_embedding_padding_idx_and_frequency_scaling(dim):
    def factory():
        return nn.Embedding(10, 5, padding_idx=3, scale_grad_by_freq=True)

    torch.manual_seed(0)
    first = factory().double()
    with torch.no_grad():
        first.weight.normal_()  # the zero padding row would make its norm 0 and every output NaN
    second = factory().double()
    second.load_state_dict(first.state_dict())
    fused, materialised = xnorm.wrap(first, dim=dim, fused=True), xnorm.wrap(second, dim=dim)
    ids = torch.tensor([[3, 1, 1, 7], [3, 3, 0, 1]])
    _assert_same_function(fused, materialised, ids)
    grads = torch.autograd.grad(fused(ids).sum(), list(g_and_v(fused)))
    if dim == 0:  # padding_idx's row gets no gradient, as in torch's own Embedding
        assert torch.all(grads[0][3] == 0) and torch.all(grads[1][3] == 0)


def test_a_zero_slice_gives_nan_where_the_materialised_path_does():
    fused, materialised = _twins(lambda: nn.Linear(3, 4), dim=0)
    for module in (fused, materialised):
        with torch.no_grad():
            g_and_v(module)[1][2].zero_()
    x = torch.randn(2, 3, dtype=torch.float64)
    y_f, y_m = fused(x), materialised(x)
    assert torch.equal(torch.isnan(y_f), torch.isnan(y_m)) and torch.isnan(y_f[:, 2]).all()
    keep = [0, 1, 3]
    assert_close(_numpy(y_f[:, keep]), _numpy(y_m[:, keep]), "float64", "forward", what="the other outputs")


def test_second_derivatives_match_a_gradient_penalty():
    for factory, shape in ((lambda: nn.Linear(6, 4), (3, 6)), (lambda: nn.Linear(6, 4), (20, 6)),
                           (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
                           (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 5))):
        for dim in (0, 1):
            fused, materialised = _twins(factory, dim=dim)
            results = []
            for module in (fused, materialised):
                x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                                requires_grad=True)
                (grad_x,) = torch.autograd.grad(torch.tanh(module(x)).sum(), x, create_graph=True)
                results.append(torch.autograd.grad((grad_x ** 2).sum(), list(module.parameters())))
            for a, b in zip(*results, strict=True):
                assert_close(_numpy(a), _numpy(b), "float64", "gradient", what="gradient-penalty gradient")


def test_frozen_g_and_input_gradients():
    fused, materialised = _twins(lambda: nn.Conv1d(4, 6, 3, padding=1), dim=0)
    for module in (fused, materialised):
        g_and_v(module)[0].requires_grad_(False)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    _assert_same_function(fused, materialised, x)


@pytest.mark.parametrize("dim", [0, 1])
def test_cpu_autocast_gives_the_materialised_path_s_dtypes_and_values(dim):
    for factory, shape in ((lambda: nn.Linear(6, 4), (3, 6)), (lambda: nn.Linear(6, 4), (30, 6)),
                           (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
                           (lambda: nn.ConvTranspose1d(4, 6, 3), (2, 4, 5))):
        fused, materialised = _twins(factory, dim=dim, dtype=torch.float32)
        results = []
        for module in (fused, materialised):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(x)
            grads = torch.autograd.grad(y.float().square().sum(), [*module.parameters(), x])
            results.append((y, grads))
        (y_f, grads_f), (y_m, grads_m) = results
        assert y_f.dtype == y_m.dtype == torch.bfloat16
        assert_close(_numpy(y_f), _numpy(y_m), "bfloat16", "forward", what="autocast output vs non-fused")
        for a, b in zip(grads_f, grads_m, strict=True):
            assert a.dtype == b.dtype == torch.float32
            assert_close(_numpy(a), _numpy(b), "bfloat16", "gradient", what="autocast gradient vs non-fused")


# -- where it falls back: the non-fused wrapper exactly ----------------------------------------------


class CausalConv1d(nn.Conv1d):
    """A subclass with its own forward: the fused path cannot know what it computes."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (2, 0)))


class InheritingLinear(nn.Linear):
    """A subclass that keeps Linear's forward: fused like Linear."""


FALLBACKS = {
    "conv1d-kernel-axis": (lambda: nn.Conv1d(4, 6, 3), (2, 4, 9), {"dim": 2}),
    "conv_transpose2d-kernel-axis": (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 4, 4), {"dim": -1 + 4}),
    "embedding-max-norm": (lambda: nn.Embedding(10, 5, max_norm=1.0), None, {"dim": 0}),
    "embedding-sparse": (lambda: nn.Embedding(10, 5, sparse=True), None, {"dim": 1}),
    "subclass-with-forward": (lambda: CausalConv1d(4, 6, 3), (2, 4, 9), {"dim": 0}),
    "bias-reparametrized": (lambda: nn.Linear(6, 4), (3, 6), {"dim": 0, "name": "bias"}),
    "bilinear": (lambda: nn.Bilinear(3, 4, 2), None, {"dim": 0}),
}


@pytest.mark.parametrize("label", sorted(FALLBACKS))
def test_fallbacks_are_the_non_fused_wrapper_bitwise(label):
    factory, shape, options = FALLBACKS[label]
    torch.manual_seed(0)
    first, second = factory(), factory()
    second.load_state_dict(first.state_dict())
    fused = xnorm.wrap(first, fused=True, **options)
    materialised = xnorm.wrap(second, **options)
    assert fused_side(fused) is None
    assert type(fused.parametrizations[options.get("name", "weight")][0]) is WeightNormParametrization
    assert "forward" not in type(fused).__dict__, "a fallback keeps the layer's own forward"
    if label == "bilinear":
        args = (torch.randn(2, 3), torch.randn(2, 4))
    elif shape is None:
        args = (torch.tensor([[1, 2], [2, 9]]),)
    else:
        args = (torch.randn(shape),)
    assert torch.equal(fused(*args), materialised(*args))
    if label == "embedding-sparse":
        return  # torch's sparse gradient does not go through the weight-norm kernel either way
    for a, b in zip(torch.autograd.grad(fused(*args).sum(), list(fused.parameters())),
                    torch.autograd.grad(materialised(*args).sum(), list(materialised.parameters())), strict=True):
        assert torch.equal(a, b)


def test_conv_transpose_padding_mode_is_refused_as_torch_refuses_it():
    torch.manual_seed(0)
    before, after = nn.ConvTranspose1d(4, 6, 3), nn.ConvTranspose1d(4, 6, 3)
    before.padding_mode = "reflect"  # the constructor refuses it; set afterwards, torch's forward does
    xnorm.wrap(before, fused=True)
    assert fused_side(before) is None
    xnorm.wrap(after, fused=True)
    after.padding_mode = "reflect"
    assert fused_side(after) == "input"
    x = torch.randn(2, 4, 5)
    for module in (before, after):
        with pytest.raises(ValueError, match="Only `zeros` padding mode is supported for ConvTranspose1d"):
            module(x)


def test_a_subclass_that_inherits_forward_is_fused():
    torch.manual_seed(0)
    module = xnorm.wrap(InheritingLinear(6, 4), fused=True)
    assert fused_side(module) == "output"
    assert isinstance(module, InheritingLinear)


def test_a_parametrization_stacked_on_top_turns_the_fused_forward_off():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    fused, materialised = _twins(lambda: nn.Linear(6, 4))
    for module in (fused, materialised):
        parametrize.register_parametrization(module, "weight", Double())
    assert fused_side(fused) is None
    x = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(fused(x), materialised(x))


# -- w is never materialised where the algebra applies -------------------------------------------


class _Recorder(TorchDispatchMode):
    """Every tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.outputs.append((str(func), item.detach().clone()))
        return out


def _tensors_equal_to_w(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    """Ops of a forward and backward pass that returned a tensor holding w (to float64 rounding)."""
    with torch.no_grad():
        w = module.weight.clone()  # computed here, outside the recording
    with _Recorder() as recorder:
        torch.autograd.backward(module(x), grad_output)
    return [name for name, t in recorder.outputs if t.shape == w.shape and torch.allclose(t, w, rtol=1e-12, atol=0)]


@pytest.mark.parametrize("label", ["linear", "conv1d-g2-s2-d2", "conv_transpose1d-g2-s2-op1", "embedding"])
def test_w_is_never_computed_where_the_algebra_applies(label, monkeypatch):
    for dim in (0, 1, None):
        case = Case(LAYERS_BY_LABEL[label], dim, "float64", "cpu")
        arrays = case.arrays()
        x, grad_output = case_input(case), _tensor(arrays["grad_output"], torch.float64)
        fused, materialised = build(case, fused=True), build(case, fused=False)
        for module in (fused, materialised):
            with torch.no_grad():  # g = ||v|| exactly would make w equal to v: tell them apart
                g_and_v(module)[0].mul_(1.25)

        # 1. No tensor of a fused forward + backward holds w; the materialised path does compute it.
        assert _tensors_equal_to_w(fused, x, grad_output) == [], f"dim={dim}"
        assert _tensors_equal_to_w(materialised, x, grad_output), "the check must be able to fail"

        # 2. The parametrization (torch._weight_norm) is never called by a fused forward/backward.
        calls = []

        def counting(self, *args, calls=calls, original=WeightNormParametrization.forward):
            calls.append(1)
            return original(self, *args)

        monkeypatch.setattr(WeightNormParametrization, "forward", counting)
        torch.autograd.backward(fused(x), grad_output)
        assert calls == [], "the fused forward computed w"
        materialised(x)
        assert calls, "the materialised path calls the parametrization"
        monkeypatch.undo()


# -- state, remove, copies, compile: the non-fused wrapper's behaviour ----------------------------


def _saved(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_checkpoints_move_between_fused_and_non_fused(dim):
    torch.manual_seed(0)
    fused = xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1), dim=dim, fused=True)
    with torch.no_grad():
        fused.parametrizations.weight.original0.mul_(1.5)  # a trained state, not the initial one
    materialised = xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1), dim=dim)
    assert list(fused.state_dict()) == list(materialised.state_dict())
    materialised.load_state_dict(_saved(fused.state_dict()), strict=True)
    for key, value in fused.state_dict().items():
        assert torch.equal(value, materialised.state_dict()[key])
    x = torch.randn(2, 4, 9)
    assert_close(_numpy(fused(x)), _numpy(materialised(x)), "float32", "forward", what="after fused -> non-fused")

    torch.manual_seed(5)
    again = xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1), dim=dim, fused=True)
    again.load_state_dict(_saved(materialised.state_dict()), strict=True)
    assert torch.equal(again(x), fused(x)), "non-fused -> fused gives the fused module back exactly"


def test_a_legacy_checkpoint_loads_into_a_fused_module():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy = torch.nn.utils.weight_norm(nn.Conv1d(4, 6, 3, padding=1))
    fused = xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1), fused=True)
    fused.load_state_dict(_saved(legacy.state_dict()), strict=True)
    x = torch.randn(2, 4, 9)
    assert_close(_numpy(fused(x)), _numpy(legacy(x)), "float32", "forward", what="legacy checkpoint output")


def test_remove_gives_the_plain_layer_with_w():
    torch.manual_seed(0)
    fused = xnorm.wrap(nn.ConvTranspose1d(4, 6, 3, groups=2), dim=1, fused=True)
    materialised = copy.deepcopy(xnorm.wrap(nn.ConvTranspose1d(4, 6, 3, groups=2), dim=1))
    materialised.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 5)
    y = fused(x)
    removed = xnorm.remove(fused)
    assert type(removed) is nn.ConvTranspose1d and not xnorm.is_wrapped(removed)
    assert sorted(name for name, _ in removed.named_parameters()) == ["bias", "weight"]
    assert torch.equal(removed.weight, materialised.weight), "w is the parametrization's, as without fused"
    assert_close(_numpy(removed(x)), _numpy(y), "float32", "forward", what="output after remove")
    xnorm.wrap(removed, dim=1, fused=True)  # and it can be wrapped again
    assert fused_side(removed) == "output"


def test_torch_remove_parametrizations_also_restores_the_layer():
    torch.manual_seed(0)
    module = xnorm.wrap(nn.Linear(6, 4), fused=True)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    assert type(module) is nn.Linear and type(module).forward is nn.Linear.forward
    assert isinstance(module.weight, nn.Parameter)


def test_deepcopy_is_fused_and_independent_and_pickling_is_torch_s():
    torch.manual_seed(0)
    original = xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1), fused=True)
    x = torch.randn(2, 4, 9)
    y = original(x).detach()
    duplicate = copy.deepcopy(original)
    assert fused_side(duplicate) == "output" and torch.equal(duplicate(x), y)
    with torch.no_grad():
        duplicate.parametrizations.weight.original0.mul_(2.0)
    assert torch.equal(original(x), y) and not torch.equal(duplicate(x), y)

    materialised = xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1))
    with pytest.raises(RuntimeError, match="state_dict") as fused_error:
        pickle.dumps(original)
    with pytest.raises(RuntimeError, match="state_dict") as plain_error:
        pickle.dumps(materialised)
    assert str(fused_error.value) == str(plain_error.value)
    assert set(_saved(original.state_dict())) == set(original.state_dict())


def test_module_weight_still_computes_w():
    torch.manual_seed(0)
    fused, materialised = _twins(lambda: nn.Conv2d(3, 4, 3), dim=1)
    assert torch.equal(fused.weight, materialised.weight)


@pytest.mark.filterwarnings("ignore:`torch\\.jit\\.:DeprecationWarning")
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    module = xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1, groups=2), dim=1, fused=True)
    x = torch.randn(2, 4, 9)
    eager = module(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(module.parameters()))
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(module.parameters()))
    assert_close(_numpy(out), _numpy(eager), "float32", "forward", what="compiled output")
    for a, b in zip(grads, eager_grads, strict=True):
        assert_close(_numpy(a), _numpy(b), "float32", "gradient", what="compiled gradient")


@pytest.mark.filterwarnings("ignore:`torch\\.jit\\.:DeprecationWarning")
@pytest.mark.parametrize("dim", [0, 1])
def test_jit_trace_records_plain_ops_that_save_load_and_differentiate(dim):
    torch.manual_seed(0)
    module = xnorm.wrap(nn.ConvTranspose1d(4, 6, 3, stride=2), dim=dim, fused=True)
    x = torch.randn(2, 4, 5)
    traced = torch.jit.trace(module, x)  # its own check re-runs the module without gradients
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    eager = module(x)
    assert torch.equal(traced(x), eager) and torch.equal(loaded(x), eager)
    params = list(module.parameters())
    for a, b in zip(torch.autograd.grad(traced(x).square().sum(), params),
                    torch.autograd.grad(eager.square().sum(), params), strict=True):
        assert_close(_numpy(a), _numpy(b), "float32", "gradient", what="gradient through the trace")


# -- errors: the non-fused wrapper's, layer untouched --------------------------------------------


def _int_linear():
    module = nn.Linear(3, 2)
    module.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int64), requires_grad=False)
    return module


ERROR_CASES = {
    "dim": (lambda: nn.Linear(3, 2), {"dim": 2}, DimError),
    "missing": (lambda: nn.Linear(3, 2), {"name": "kernel"}, MissingParameterError),
    "non-floating": (_int_linear, {}, NonFloatingParameterError),
    "already": (lambda: xnorm.wrap(nn.Linear(3, 2)), {}, AlreadyWrappedError),
    "already-fused": (lambda: xnorm.wrap(nn.Linear(3, 2), fused=True), {}, AlreadyWrappedError),
}


@pytest.mark.parametrize("label", sorted(ERROR_CASES))
def test_errors_are_the_non_fused_errors_and_leave_the_layer_untouched(label):
    factory, options, error = ERROR_CASES[label]
    messages = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = factory()
        before_type, before_state = type(module), {k: v.clone() for k, v in module.state_dict().items()}
        with pytest.raises(error) as caught:
            xnorm.wrap(module, fused=fused, **options)
        messages.append(str(caught.value))
        assert type(module) is before_type
        assert all(torch.equal(before_state[k], v) for k, v in module.state_dict().items())
    assert messages[0] == messages[1]


# -- fused="auto": per call, fused where it pays -----------------------------------------------------

#: label -> (layer factory, dim, input factory, whether the call runs fused); the thresholds are
#: xnorm.spec.fused_pays's: a weight of at least 2**18 elements, the scaled activation at most half of it.
AUTO_CASES = {
    "linear-1024-b64": (lambda: nn.Linear(1024, 1024), 0, lambda: torch.randn(64, 1024), True),
    "linear-1024-b1024": (lambda: nn.Linear(1024, 1024), 0, lambda: torch.randn(1024, 1024), False),
    "linear-1024-dim1-b64": (lambda: nn.Linear(1024, 1024), 1, lambda: torch.randn(64, 1024), True),
    "linear-64-b8": (lambda: nn.Linear(64, 64), 0, lambda: torch.randn(8, 64), False),
    "conv1d-512-k3-l8": (lambda: nn.Conv1d(512, 512, 3, padding=1), 0, lambda: torch.randn(1, 512, 8), True),
    "conv1d-512-k3-l2048": (lambda: nn.Conv1d(512, 512, 3, padding=1), 0, lambda: torch.randn(1, 512, 2048), False),
    # 512 x 600 output elements at stride 1 would not pay; the stride halves them to about 512 x 300
    "conv1d-512-k3-s2-l600": (lambda: nn.Conv1d(512, 512, 3, stride=2, padding=1), 0,
                              lambda: torch.randn(1, 512, 600), True),
    # 512 x 256 input elements would pay; the stride makes the output about 512 x 1024, which does not
    "conv_transpose1d-512-k3-s4-l256": (lambda: nn.ConvTranspose1d(512, 512, 3, stride=4), 1,
                                        lambda: torch.randn(1, 512, 256), False),
    "conv2d-64-3x3": (lambda: nn.Conv2d(64, 64, 3, padding=1), 0, lambda: torch.randn(2, 64, 16, 16), False),
    "embedding-1024x512-rows": (lambda: nn.Embedding(1024, 512), 0, lambda: torch.randint(0, 1024, (16,)), True),
}


def _wrapped_pair(factory, dim):
    """The layer (float64, seed 0) wrapped with fused="auto" and, from the same values, without fused."""
    torch.manual_seed(0)
    layer = factory().double()
    return xnorm.wrap(copy.deepcopy(layer), dim=dim, fused="auto"), xnorm.wrap(layer, dim=dim)


def _calls_of_the_parametrization(monkeypatch, module, x):
    """How often a forward and backward of ``module`` on ``x`` computed w with the parametrization."""
    calls = []

    def counting(self, *args, original=WeightNormParametrization.forward):
        calls.append(1)
        return original(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(WeightNormParametrization, "forward", counting)
        y = module(x)
        y.backward(torch.ones_like(y))
    return len(calls)


@pytest.mark.parametrize("label", sorted(AUTO_CASES))
def test_auto_runs_fused_exactly_where_it_pays_and_computes_the_same(label, monkeypatch):
    factory, dim, make_input, expect_fused = AUTO_CASES[label]
    auto, materialised = _wrapped_pair(factory, dim)
    torch.manual_seed(1)
    x = make_input()
    x = x if x.dtype == torch.int64 else x.double()
    assert fused_side(auto) is not None
    assert runs_fused(auto, x) is expect_fused
    assert (_calls_of_the_parametrization(monkeypatch, copy.deepcopy(auto), x) == 0) is expect_fused

    y, y_materialised = auto(x), materialised(x)
    grad_output = torch.randn(y.shape, dtype=y.dtype)
    grads = dict(zip(trainable(auto), torch.autograd.grad(y, list(trainable(auto).values()), grad_output),
                     strict=True))
    expected = gradients(materialised, x, grad_output)
    if expect_fused:  # same math, another rounding order
        assert_close(_numpy(y), _numpy(y_materialised), "float64", "forward", what="output vs non-fused")
        for key, value in expected.items():
            assert_close(_numpy(grads[key]), _numpy(value), "float64", "gradient", what=f"dL/d{key} vs non-fused")
    else:  # the non-fused wrapper's own forward: bit for bit
        assert torch.equal(y, y_materialised)
        assert all(torch.equal(grads[key], value) for key, value in expected.items())


def test_auto_decides_on_every_call_and_keeps_the_wrapper_s_state_and_remove():
    auto, materialised = _wrapped_pair(lambda: nn.Linear(1024, 1024), 0)
    assert "fused=output (auto)" in repr(auto.parametrizations.weight)
    small, large = torch.randn(64, 1024, dtype=torch.float64), torch.randn(2048, 1024, dtype=torch.float64)
    assert runs_fused(auto, small) and not runs_fused(auto, large)
    for x in (small, large, small):  # gradients accumulate across the two paths
        auto(x).sum().backward()
        materialised(x).sum().backward()
    for key, value in trainable(materialised).items():
        assert_close(_numpy(trainable(auto)[key].grad), _numpy(value.grad), "float64", "gradient",
                     what=f"accumulated dL/d{key}")
    assert auto.state_dict().keys() == materialised.state_dict().keys()
    assert all(torch.equal(auto.state_dict()[k], v) for k, v in materialised.state_dict().items())
    removed = xnorm.remove(auto)
    assert type(removed) is nn.Linear and torch.equal(removed.weight, xnorm.remove(materialised).weight)


@pytest.mark.parametrize("fused", ["Auto", "fused", 1])
def test_fused_takes_true_false_or_auto_only_and_leaves_the_layer_untouched(fused):
    layer = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(xnorm.OptionError, match="fused must be True, False or 'auto'"):
        xnorm.wrap(layer, fused=fused)
    assert type(layer) is nn.Linear and all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


# -- the benchmark script runs ----------------------------------------------------------------------


def test_benchmark_quick_smoke_run(tmp_path):
    script = ROOT / "benchmarks" / "bench_torch.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--sizes", "linear-64", "--orthogonal-sizes", "linear-256",
         "--spectral-sizes", "linear-64", "--compiled-sizes", "", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "torch.json").read_text())["rows"]
    seen = {(row["task"], row["variant"]) for row in rows}
    assert {("train", v) for v in ("plain", "xnorm", "xnorm-fused", "xnorm-auto", "native:parametrizations",
                                   "native:legacy")} <= seen
    assert ("inference", "removed") in seen and ("inference", "native:parametrizations-cached") in seen
    orthogonal = {(row["group"], row["size"], row["variant"]) for row in rows if "/orth-" in row["group"]}
    assert orthogonal == {(f"cpu/orth-{m}", "linear-256", v) for m in ("matrix_exp", "cayley", "householder")
                          for v in ("plain", "xnorm", "native:parametrizations")}
    spectral = {(row["group"], row["size"], row["variant"]) for row in rows if row["group"].endswith("/spectral")}
    assert spectral == {("cpu/spectral", "linear-64", v)
                        for v in ("plain", "xnorm", "native:parametrizations", "native:legacy")}
    assert not [row for row in rows if "/compiled" in row["group"]]  # --compiled-sizes '' times none
    assert all(row["per_call_ms"] and all(t > 0 for t in row["per_call_ms"]) for row in rows)


@pytest.mark.extended  # an inductor compile of three modules: about 40 s of C++ builds on this 2-core machine
def test_benchmark_compiled_rows(tmp_path):
    script = ROOT / "benchmarks" / "bench_torch.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--sizes", "", "--orthogonal-sizes", "", "--spectral-sizes", "",
         "--compiled-sizes", "linear-64", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "torch.json").read_text())["rows"]
    assert {(row["group"], row["size"], row["task"], row["variant"]) for row in rows} == {
        ("cpu/compiled", "linear-64", "train", v) for v in ("plain", "xnorm", "xnorm-fused")}
