"""Fuzzed agreement, Flax linen and NNX (issue 14): random layers, dims, dtypes, eps, fused or not, and every
reparametrization, checked against the float64 NumPy reference; and xnorm.convert from torch to Flax and
back, bit for bit (tests/fuzz_strategies.py has the strategies, profiles and properties).

Every example has new shapes, so XLA compiles its programs anew (about a second each on this machine's
CPU): the ci budgets are small. The conformance adapters' persistent compilation cache makes a rerun
cheaper; ``XNORM_FUZZ_PROFILE=large`` (``nox -s fuzz``) searches harder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import xnorm
from xnorm.conformance.adapters.flax import LinenAdapter, LinenFusedAdapter, NNXAdapter, NNXFusedAdapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fuzz_strategies.py, shared by the three backends
import fuzz_strategies as fz  # noqa: E402

# off the path again: tests/ on it makes tests/mindspore/, tests/flax/ look like installed frameworks
sys.path.remove(str(Path(__file__).resolve().parents[1]))

ADAPTERS = {("linen", False): LinenAdapter(), ("linen", True): LinenFusedAdapter(),
            ("nnx", False): NNXAdapter(), ("nnx", True): NNXFusedAdapter()}
ADAPTERS[("linen", False)].setup("cpu")  # x64 on, and the compilation cache (the same for every adapter)
# Flax's ConvTranspose has no feature_group_count: a grouped transposed convolution has no Flax layer
LIMITS = fz.Limits(transpose_groups=False)
APIS = st.sampled_from(("linen", "nnx"))


@fz.fuzz(ci=20, large=1000)
@given(fz.fuzz_cases(dtypes=LinenAdapter.dtypes, limits=LIMITS), APIS)
def test_wrap_agrees_with_the_reference_and_remove_restores(example, api):
    fz.check_lifecycle(ADAPTERS[(api, example.fused)], example)


@fz.fuzz(ci=12, large=400)
@given(fz.fused_cases(dtypes=LinenAdapter.dtypes, limits=LIMITS), APIS)
def test_fused_agrees_with_the_reference(example, api):
    fz.check_lifecycle(ADAPTERS[(api, True)], example)


@pytest.mark.xfail(strict=True, reason=fz.FUSED_ZERO_SLICE_BUG)
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_fused_zero_slice_of_a_padded_conv_is_nan_like_the_plain_layer(api):
    fz.check_lifecycle(ADAPTERS[(api, True)], fz.FUSED_ZERO_SLICE_OUTPUT)


@fz.fuzz(ci=15, large=400)
@given(fz.fuzz_cases(dtypes=("float32", "float64"), limits=LIMITS), APIS)
def test_convert_from_torch_and_back_is_bit_exact(example, api):
    """torch state dict -> xnorm.convert -> the Flax model (values checked in the canonical layout against
    torch's, through the adapter's own layout table) -> xnorm.convert -> the same torch state dict, bit for bit."""
    torch = pytest.importorskip("torch", reason="torch rides along in the Flax test environment (noxfile EXTRAS)")
    from xnorm.conformance.adapters.torch import TorchAdapter

    case, data = example.case, example.arrays()
    torch.manual_seed(0)
    source = xnorm.wrap(TorchAdapter().build(case.layer, data["weight"], data.get("bias"), case.dtype), example.spec,
                        fused=example.fused)
    expected = {key: value.clone() for key, value in source.state_dict().items()}
    adapter = ADAPTERS[(api, example.fused)]
    handle = adapter.wrap(adapter.build(case.layer, data["other_weight"], data.get("other_bias"), case.dtype),
                          example.spec)
    if api == "linen":
        handle.variables = xnorm.convert(expected, to="flax", like=handle.variables)
        flax_source = handle.variables
    else:
        xnorm.convert(expected, to="flax", like=handle.module, load=True)
        flax_source = handle.module

    # both adapters speak the spec's neutral names in the canonical layout, each from its own layout table
    torch_adapter = TorchAdapter()
    for what, ours, theirs in (("parameter", adapter.parameters(handle), torch_adapter.parameters(source)),
                               ("state", adapter.state(handle), torch_adapter.state(source))):
        assert sorted(ours) == sorted(theirs), f"{case.id}: {what}s {sorted(ours)} in Flax, {sorted(theirs)} in torch"
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{case.id}: {what} {key} in Flax after convert")

    fresh = TorchAdapter().build(case.layer, data["other_weight"], data.get("other_bias"), case.dtype)
    torch.manual_seed(1)
    xnorm.wrap(fresh, example.spec, fused=example.fused)
    back = xnorm.convert(flax_source, to="torch", like=fresh)
    assert sorted(back) == sorted(expected), f"{case.id}: keys {sorted(back)} != {sorted(expected)}"
    for key, tensor in expected.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), f"{case.id}: {key} after the trip"
