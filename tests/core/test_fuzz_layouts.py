"""Fuzzed: ``normalize_dim`` and the storage layouts are inverses of each other (issue 14), pure NumPy.

Random ranks, shapes, permutations and inserted unit axes: a canonical array survives the trip to storage
and back bit for bit; shapes and axes map consistently; a norm over every axis but ``dim`` computed in
storage layout (with :meth:`StorageLayout.storage_reduction_axes`) is the float64 reference's norm
(:func:`xnorm.reference.norm_except_dim`) moved to storage; and every dim the spec accepts names one
axis, in both layouts. The porting tables' name maps (torch <-> MindSpore, Flax) are inverses too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xnorm import reference
from xnorm.errors import DimError
from xnorm.porting_tables import FRAMEWORKS, NAMES, canonical_torch_key, framework_name_of, layout, torch_name_of
from xnorm.spec import REPARAMETRIZATIONS, LayerKind, StorageLayout, normalize_dim, reduction_axes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fuzz_strategies.py, shared by every test folder
import fuzz_strategies as fz  # noqa: E402

# off the path again: tests/ on it makes tests/mindspore/, tests/flax/ look like installed frameworks
sys.path.remove(str(Path(__file__).resolve().parents[1]))


@st.composite
def layouts_and_shapes(draw):
    ndim = draw(st.integers(1, 5))
    perm = tuple(draw(st.permutations(range(ndim))))
    extra = draw(st.integers(0, 2))
    storage_ndim = ndim + extra
    unit_axes = tuple(sorted(draw(st.lists(st.integers(0, storage_ndim - 1), min_size=extra, max_size=extra,
                                           unique=True))))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    return StorageLayout(perm, unit_axes), shape


@fz.fuzz(ci=300, large=20000)
@given(layouts_and_shapes(), st.integers(0, 2**32 - 1))
def test_storage_layouts_round_trip_arrays_shapes_and_axes(drawn, salt):
    storage, shape = drawn
    canonical = np.random.default_rng(salt).standard_normal(shape)
    stored = storage.to_storage(canonical)
    assert stored.shape == storage.storage_shape(shape)
    assert all(stored.shape[axis] == 1 for axis in storage.unit_axes)
    assert storage.canonical_shape(stored.shape) == shape
    back = storage.to_canonical(stored)
    assert back.shape == shape and np.array_equal(back, canonical)
    for axis in range(len(shape)):
        assert stored.shape[storage.storage_axis(axis)] == shape[axis]
        # moving that axis first and flattening the rest lists the same values in both layouts, up to order
        np.testing.assert_array_equal(np.sort(np.moveaxis(stored, storage.storage_axis(axis), 0).reshape(
            shape[axis], -1), axis=1), np.sort(np.moveaxis(canonical, axis, 0).reshape(shape[axis], -1), axis=1))


@fz.fuzz(ci=300, large=20000)
@given(layouts_and_shapes(), st.data())
def test_every_accepted_dim_names_the_same_axis_in_both_layouts(drawn, data):
    storage, shape = drawn
    ndim = len(shape)
    dim = data.draw(st.sampled_from((None,) + tuple(range(-ndim, ndim))))
    resolved = normalize_dim(dim, ndim)
    if dim is None or dim == -1:
        assert resolved is None
    else:
        assert 0 <= resolved < ndim and (resolved - dim) % ndim == 0
        assert normalize_dim(resolved, ndim) == resolved  # a normalized dim is a fixed point
    keep = storage.storage_dim(resolved)
    assert (keep is None) == (resolved is None)
    if keep is not None:
        assert storage.canonical_shape(storage.storage_shape(shape))[resolved] == storage.storage_shape(shape)[keep]
    summed = storage.storage_reduction_axes(resolved)
    assert set(summed) | ({keep} - {None}) == set(range(storage.storage_ndim))
    assert len(reduction_axes(resolved, ndim)) == ndim - (resolved is not None)

    v = np.random.default_rng(ndim).standard_normal(shape)
    stored = storage.to_storage(v)
    norm_in_storage = np.sqrt(np.sum(stored * stored, axis=summed, keepdims=resolved is not None))
    expected = reference.norm_except_dim(v, resolved)
    if resolved is None:
        np.testing.assert_allclose(norm_in_storage, expected, rtol=1e-12)
    else:
        np.testing.assert_allclose(storage.to_canonical(norm_in_storage), expected, rtol=1e-12)


@fz.fuzz(ci=100, large=5000)
@given(st.integers(1, 6), st.one_of(st.integers(-20, 20), st.none()))
def test_normalize_dim_accepts_exactly_the_documented_range(ndim, dim):
    if dim is None or -ndim <= dim < ndim:
        normalize_dim(dim, ndim)
    else:
        with pytest.raises(DimError, match="out of range"):
            normalize_dim(dim, ndim)


KINDS = tuple(kind for kind in LayerKind.ALL if kind != LayerKind.GENERIC)
SUFFIXES = ("",) + tuple(dict.fromkeys(s for spec in REPARAMETRIZATIONS.values() for s in spec.suffixes.values()))


@fz.fuzz(ci=200, large=5000)
@given(st.sampled_from([f for f in FRAMEWORKS if f != "torch"]), st.sampled_from(KINDS),
       st.sampled_from(("weight", "bias")), st.sampled_from(SUFFIXES), st.sampled_from(("full", "vector", "scalar")))
def test_porting_names_and_layouts_are_inverses(framework, kind, torch_base, suffix, rank):
    if kind == LayerKind.EMBEDDING and torch_base == "bias":
        return  # an Embedding has no bias
    if torch_base == "bias" and suffix:
        return  # reparametrizations wrap the weight
    torch_name = torch_base + suffix
    name = framework_name_of(framework, kind, torch_name)
    assert name is not None and name.endswith(suffix)
    assert name.removesuffix(suffix) == NAMES[framework][kind][torch_base]
    assert torch_name_of(framework, kind, name) == torch_name
    # torch's parametrization key style reads as the legacy one
    assert canonical_torch_key(f"a.{torch_name}") == f"a.{torch_name}"
    # the weight's own rank (w, v, g, original, base), a vector (spectral norm's u and v) or a 0-d g (dim=None)
    full = 1 if torch_base == "bias" else 2 + LayerKind.spatial_dims(kind)
    ndim = {"full": full, "vector": 1, "scalar": 0}[rank]
    storage = layout(framework, kind, torch_name, ndim)
    assert storage.canonical_ndim == ndim
    shape = tuple(range(2, 2 + ndim))
    canonical = np.arange(int(np.prod(shape))).reshape(shape)
    assert np.array_equal(storage.to_canonical(storage.to_storage(canonical)), canonical)
