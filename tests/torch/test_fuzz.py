"""Fuzzed agreement, torch (issue 14): random layers, dims, dtypes, eps, fused or not, and every
reparametrization, checked against the float64 NumPy reference (tests/fuzz_strategies.py has the
strategies, the profiles and the properties). Budgets: ``XNORM_FUZZ_PROFILE`` (ci by default)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.utils import parametrizations

import xnorm
from xnorm.conformance import layers
from xnorm.conformance.adapters.torch import TorchAdapter, TorchFusedAdapter
from xnorm.conformance.cases import Case, LayerCase
from xnorm.conformance.tolerances import assert_close
from xnorm.porting_tables import (
    canonical_torch_key,
    framework_name_of,
    layout,
    torch_name_of,
)
from xnorm.spec import SpectralNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fuzz_strategies.py, shared by the three backends
import fuzz_strategies as fz  # noqa: E402

# off the path again: tests/ on it makes tests/mindspore/, tests/flax/ look like installed frameworks
sys.path.remove(str(Path(__file__).resolve().parents[1]))

PLAIN, FUSED = TorchAdapter(), TorchFusedAdapter()
# float16 is not offered: its tolerance row was never measured for torch's CPU kernels (docs/torch.md)
DTYPES = TorchAdapter.dtypes
# torch 2.13's CPU bfloat16 Conv2d is wrong for some strided, grouped, dilated configurations: the plain
# layer, no xnorm involved, misses the reference by up to 100x the bfloat16 tolerance
# (test_torch_bfloat16_conv2d_is_wrong_on_the_cpu pins the example the fuzzer found). Until torch fixes
# it, bfloat16 is drawn for the layers whose plain torch kernels agree with the reference.
BFLOAT16_KINDS = ("linear", "conv1d", "conv_transpose1d", "embedding")


def _dtypes_for(layer):
    return DTYPES if layer.kind in BFLOAT16_KINDS else tuple(d for d in DTYPES if d != "bfloat16")


@fz.fuzz(ci=250, large=6000)
@given(fz.fuzz_cases(dtypes_for=_dtypes_for))
def test_wrap_agrees_with_the_reference_and_remove_restores(example):
    fz.check_lifecycle(FUSED if example.fused else PLAIN, example)


@fz.fuzz(ci=120, large=3000)
@given(fz.fused_cases(dtypes_for=_dtypes_for))
def test_fused_agrees_with_the_reference(example):
    fz.check_lifecycle(FUSED, example)


@pytest.mark.xfail(strict=True, reason=fz.FUSED_ZERO_SLICE_BUG)
@pytest.mark.parametrize("example", [fz.FUSED_ZERO_SLICE_INPUT, fz.FUSED_ZERO_SLICE_GAPS], ids=["conv1d", "gaps"])
def test_fused_zero_slice_of_a_padded_conv_is_nan_like_the_plain_layer(example):
    fz.check_lifecycle(FUSED, example)


@pytest.mark.xfail(torch.__version__ < "2.15", strict=True,
                   reason="torch's float32 matrix_exp before 2.15 (parametrizations.orthogonal, which xnorm "
                   "matches bit for bit) misses the float32 weight tolerance on this 1x2 weight: 1.43e-5 off the "
                   "float64 reference, 1.35x the allowed error (torch 2.4 and 2.13; 2.15 passes); the table's "
                   "float32 row was not measured for the orthogonal maps")
def test_orthogonal_float32_matrix_exp_within_the_weight_tolerance():
    example = fz.ORTHOGONAL_FLOAT32
    native = PLAIN.build(example.case.layer, example.arrays()["weight"], None, "float32")
    parametrizations.orthogonal(native, orthogonal_map="matrix_exp", use_trivialization=False)
    ours = xnorm.wrap(PLAIN.build(example.case.layer, example.arrays()["weight"], None, "float32"), example.spec)
    assert torch.equal(ours.weight, native.weight), "xnorm departs from torch's own orthogonal parametrization"
    fz.check_lifecycle(PLAIN, example)


TORCH_BFLOAT16_CONV2D = LayerCase(
    "conv2d-w4x1x2x2-i1x2x4x3-s1x2-p1x0-d1x2-op0x0-g2-nobias-r0", "conv2d", (4, 1, 2, 2), (1, 2, 4, 3), bias=False,
    stride=(1, 2), padding=(1, 0), dilation=(1, 2), output_padding=(0, 0), groups=2,
)


# Not strict: which kernel torch runs here depends on the machine. On the machine of 2026-12-01 the plain layer
# was 2.25 off; on the AMD EPYC with avx512_bf16 of 2026-12-02 (oneDNN's gemm:jit kernel) it passes, also with
# oneDNN capped at AVX2 and with torch.backends.mkldnn disabled, so the condition could not be pinned down.
@pytest.mark.xfail(strict=False, reason="torch 2.13 CPU bfloat16 conv2d (groups=2, stride (1, 2), dilation (1, 2), "
                   "padding (1, 0)) missed the float64 reference by 2.25 (74x the bfloat16 forward tolerance) on "
                   "one CI machine and is right on another; not xnorm: the plain layer")
def test_torch_bfloat16_conv2d_is_wrong_on_the_cpu():
    case = Case(TORCH_BFLOAT16_CONV2D, None, "bfloat16", "cpu", SpectralNorm())
    data = case.arrays()
    plain = PLAIN.build(case.layer, data["weight"], None, "bfloat16")
    assert_close(PLAIN.forward(plain, data["x"], training=False),
                 layers.forward(case.layer, data["weight"], None, data["x"]), "bfloat16", "forward",
                 what="torch's plain bfloat16 conv2d")


def _wrapped_state(example: fz.FuzzCase):
    data = example.arrays()
    module = PLAIN.build(example.case.layer, data["weight"], data.get("bias"), example.case.dtype)
    torch.manual_seed(0)  # spectral norm's draws and an orthogonal completion: any values will do
    return module, xnorm.wrap(module, example.spec, fused=example.fused).state_dict()


def _as_framework(framework: str, kind: str, state: dict) -> dict:
    """A torch state dict in ``framework``'s names and storage layouts, through xnorm's porting tables."""
    out = {}
    for key, tensor in state.items():
        name = canonical_torch_key(key)
        array = tensor.detach().numpy()
        target = framework_name_of(framework, kind, name)
        assert target is not None, f"no {framework} name for {name!r} of a {kind}"
        out[target] = layout(framework, kind, name, array.ndim).to_storage(array) if array.ndim else array
    return out


def _back_to_torch(framework: str, kind: str, converted: dict, like: dict) -> dict:
    """The inverse: each torch key of ``like`` found again from its framework name, in torch's layout."""
    out = {}
    by_torch_name = {torch_name_of(framework, kind, name): (name, array) for name, array in converted.items()}
    assert len(by_torch_name) == len(converted), f"two {framework} names map to one torch name: {sorted(converted)}"
    for key, tensor in like.items():
        name = canonical_torch_key(key)
        _, array = by_torch_name[name]
        out[key] = layout(framework, kind, name, tensor.dim()).to_canonical(array) if tensor.dim() else array
    return out


@fz.fuzz(ci=150, large=4000)
@given(fz.fuzz_cases(dtypes=("float32", "float64")), st.sampled_from(("mindspore", "flax")))
def test_state_dict_to_each_frameworks_names_and_layouts_and_back_is_bit_exact(example, framework):
    """In the torch environment neither MindSpore nor Flax is installed, so the conversion is checked on
    the tables xnorm.convert reads (names, storage layouts, both torch key styles); the MindSpore and Flax
    test_fuzz.py files run xnorm.convert itself in both directions."""
    module, state = _wrapped_state(example)
    converted = _as_framework(framework, example.case.layer.kind, state)
    assert len(converted) == len(state), f"keys collide in {framework}'s names: {sorted(converted)}"
    back = _back_to_torch(framework, example.case.layer.kind, converted, state)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].shape == tuple(tensor.shape) and back[key].dtype == tensor.detach().numpy().dtype, key
        np.testing.assert_array_equal(back[key], tensor.detach().numpy(), err_msg=f"{example.case.id}: {key}")
    fresh = PLAIN.build(example.case.layer, example.arrays()["weight"], example.arrays().get("bias"),
                        example.case.dtype)
    xnorm.wrap(fresh, example.spec, fused=example.fused)
    fresh.load_state_dict({key: torch.from_numpy(np.ascontiguousarray(a)) for key, a in back.items()}, strict=True)
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[key]), f"{example.case.id}: {key} after loading the round trip"
