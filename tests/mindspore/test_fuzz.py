"""Fuzzed agreement, MindSpore (issue 14): random layers, dims, dtypes, eps, fused or not, and every
reparametrization, checked against the float64 NumPy reference; and xnorm.convert from torch to MindSpore
and back, bit for bit (tests/fuzz_strategies.py has the strategies, profiles and properties).

PYNATIVE_MODE only: every example has new shapes, and a GRAPH_MODE compile costs seconds per example
(the conformance catalogue runs GRAPH_MODE on fixed cases). The wrapper Cells are the same in both modes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mindspore
import numpy as np
import pytest
from hypothesis import given

import xnorm
from xnorm.conformance.adapters.mindspore import HOST_BLOCKING_RUN, MindSporePyNativeAdapter
from xnorm.spec import LayerKind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fuzz_strategies.py, shared by the three backends
import fuzz_strategies as fz  # noqa: E402

# off the path again: tests/ on it makes tests/mindspore/, tests/flax/ look like installed frameworks
sys.path.remove(str(Path(__file__).resolve().parents[1]))


class PyNativeFused(MindSporePyNativeAdapter):
    """``fused=True`` in PYNATIVE_MODE (the catalogue's fused adapter is GRAPH_MODE)."""

    name = "mindspore-pynative-fused"
    fused = True


PLAIN, FUSED = MindSporePyNativeAdapter(), PyNativeFused()


@pytest.fixture(autouse=True, scope="module")
def _pynative():
    """PYNATIVE_MODE for this file whatever other files set, and their mode back afterwards."""
    before = mindspore.get_context("mode")
    dispatch = os.environ.get(HOST_BLOCKING_RUN)
    PLAIN.setup("cpu")
    if dispatch is None:  # the setup's switch is for conformance runs: unit tests keep MindSpore's default
        os.environ.pop(HOST_BLOCKING_RUN, None)
    yield
    mindspore.set_context(mode=before)

# MindSpore's 1-d/2-d transposed convs express torch's output_padding as an asymmetric crop, which cannot be
# negative (conformance/adapters/mindspore.py)
LIMITS = fz.Limits(output_padding_within_padding=True, accept=lambda layer: _buildable(layer))


def _buildable(layer) -> bool:
    """MindSpore 2.10's own rules for its layers (refused by MindSpore before xnorm is involved)."""
    if layer.kind == "conv_transpose3d" and layer.dilation[0] != 1:
        return False  # Conv3DTranspose: "the depth of parameter 'dilation' must be 1"
    if layer.kind == "conv_transpose3d" and any(op >= s for op, s in zip(layer.output_padding, layer.stride,
                                                                          strict=True)):
        return False  # torch allows output_padding < dilation too; the CPU (oneDNN) kernel has no primitive for it
    return True


def _dtypes_for(layer):
    """float64 for Dense and Embedding only: MindSpore 2.10's CPU convolution kernels reject it; bfloat16
    and float16 are not offered (MindSporePyNativeAdapter.dtype_reasons)."""
    return ("float32", "float64") if layer.kind in (LayerKind.LINEAR, LayerKind.EMBEDDING) else ("float32",)


def _can_step(example) -> bool:
    """MindSpore 2.10's CPU SGD kernel takes float16 and float32 parameters only."""
    return example.case.dtype != "float64"


@fz.fuzz(ci=35, large=1200)
@given(fz.fuzz_cases(limits=LIMITS, dtypes_for=_dtypes_for))
def test_wrap_agrees_with_the_reference_and_remove_restores(example):
    fz.check_lifecycle(FUSED if example.fused else PLAIN, example, step=_can_step(example))


@fz.fuzz(ci=25, large=600)
@given(fz.fused_cases(limits=LIMITS, dtypes_for=_dtypes_for))
def test_fused_agrees_with_the_reference(example):
    fz.check_lifecycle(FUSED, example, step=_can_step(example))


@pytest.mark.xfail(strict=True, reason=fz.FUSED_ZERO_SLICE_BUG)
def test_fused_zero_slice_of_a_padded_conv_is_nan_like_the_plain_layer():
    fz.check_lifecycle(FUSED, fz.FUSED_ZERO_SLICE_OUTPUT)


@fz.fuzz(ci=20, large=600)
@given(fz.fuzz_cases(limits=LIMITS, dtypes_for=_dtypes_for))
def test_convert_from_torch_and_back_is_bit_exact(example):
    """torch state dict -> xnorm.convert -> the MindSpore Cell (values checked in the canonical layout against
    torch's, through the adapter's own layout table) -> xnorm.convert -> the same torch state dict, bit for bit."""
    torch = pytest.importorskip("torch", reason="torch rides along in the MindSpore test environment (noxfile EXTRAS)")
    from xnorm.conformance.adapters.torch import TorchAdapter

    case, data = example.case, example.arrays()
    torch_adapter = TorchAdapter()
    torch.manual_seed(0)
    source = xnorm.wrap(torch_adapter.build(case.layer, data["weight"], data.get("bias"), case.dtype), example.spec,
                        fused=example.fused)
    expected = {key: value.clone() for key, value in source.state_dict().items()}
    adapter = FUSED if example.fused else PLAIN
    cell = adapter.wrap(adapter.build(case.layer, data["other_weight"], data.get("other_bias"), case.dtype),
                        example.spec)
    xnorm.convert(expected, to="mindspore", like=cell, load=True)

    # both adapters speak the spec's neutral names in the canonical layout, each from its own layout table
    for what, ours, theirs in (("parameter", adapter.parameters(cell), torch_adapter.parameters(source)),
                               ("state", adapter.state(cell), torch_adapter.state(source))):
        assert sorted(ours) == sorted(theirs), f"{case.id}: {what}s {sorted(ours)} in MindSpore, {sorted(theirs)}"
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{case.id}: {what} {key} after convert")

    fresh = torch_adapter.build(case.layer, data["other_weight"], data.get("other_bias"), case.dtype)
    torch.manual_seed(1)
    xnorm.wrap(fresh, example.spec, fused=example.fused)
    back = xnorm.convert(cell, to="torch", like=fresh)
    assert sorted(back) == sorted(expected), f"{case.id}: keys {sorted(back)} != {sorted(expected)}"
    for key, tensor in expected.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), f"{case.id}: {key} after the trip"

