"""How dim is read, how storage layouts map to the canonical one, which dtypes are accepted."""

import numpy as np
import pytest

import xnorm
from xnorm.spec import LayerKind, StorageLayout, check_floating, normalize_dim, reduction_axes


@pytest.mark.parametrize("dim", [None, -1])
def test_none_and_minus_one_mean_the_whole_tensor(dim):
    assert normalize_dim(dim, 3) is None
    assert reduction_axes(normalize_dim(dim, 3), 3) == (0, 1, 2)


@pytest.mark.parametrize(
    ("dim", "ndim", "expected"), [(0, 2, 0), (1, 2, 1), (-2, 2, 0), (-2, 4, 2), (-4, 4, 0), (2, 3, 2)]
)
def test_other_dims_count_from_the_start_or_the_end(dim, ndim, expected):
    assert normalize_dim(dim, ndim) == expected


def test_numpy_integers_are_accepted():
    assert normalize_dim(np.int64(1), 3) == 1


@pytest.mark.parametrize(("dim", "ndim"), [(2, 2), (-3, 2), (5, 4), (0, 0)])
def test_out_of_range_dim_is_an_error_naming_the_valid_range(dim, ndim):
    with pytest.raises(xnorm.DimError, match="out of range") as info:
        normalize_dim(dim, ndim)
    assert isinstance(info.value, ValueError)
    assert "dim=-1 means one norm over the whole weight" in str(info.value)


@pytest.mark.parametrize("dim", [1.0, "0", True, [0]])
def test_non_integer_dim_is_an_error(dim):
    with pytest.raises(xnorm.DimError, match="int or None"):
        normalize_dim(dim, 2)


def test_flax_like_permutation_maps_canonical_axes_to_storage_axes():
    # A conv kernel stored (*k, in, out) while canonical is (out, in, *k).
    layout = StorageLayout(perm=(2, 3, 1, 0))
    canonical = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    stored = layout.to_storage(canonical)
    assert stored.shape == (4, 5, 3, 2) == layout.storage_shape(canonical.shape)
    assert layout.storage_axis(0) == 3 and layout.storage_axis(1) == 2 and layout.storage_axis(2) == 0
    np.testing.assert_array_equal(layout.to_canonical(stored), canonical)
    assert layout.canonical_shape(stored.shape) == canonical.shape
    assert stored[1, 2, 0, 1] == canonical[1, 0, 1, 2]


def test_inserted_unit_axis_like_mindspore_conv1d():
    layout = StorageLayout(perm=(0, 1, 2), unit_axes=(2,))
    canonical = np.arange(6 * 4 * 3).reshape(6, 4, 3)
    stored = layout.to_storage(canonical)
    assert stored.shape == (6, 4, 1, 3)
    assert layout.storage_dim(2) == 3  # the kernel axis, whatever the extra axis
    assert layout.storage_reduction_axes(0) == (1, 2, 3)
    np.testing.assert_array_equal(layout.to_canonical(stored), canonical)


def test_reduction_over_storage_axes_equals_reduction_over_canonical_axes():
    rng = np.random.default_rng(0)
    canonical = rng.standard_normal((3, 4, 5))
    for layout in (StorageLayout((2, 1, 0)), StorageLayout((0, 1, 2), unit_axes=(2,)), StorageLayout((1, 2, 0))):
        stored = layout.to_storage(canonical)
        for dim in (0, 1, 2):
            expected = np.sum(canonical**2, axis=reduction_axes(dim, 3), keepdims=True)
            got = np.sum(stored**2, axis=layout.storage_reduction_axes(dim), keepdims=True)
            np.testing.assert_allclose(layout.to_canonical(got), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool", "complex64", "uint8"])
def test_non_floating_dtypes_are_rejected(dtype):
    with pytest.raises(xnorm.NonFloatingParameterError, match="floating") as info:
        check_floating(dtype, what="layer.weight")
    assert isinstance(info.value, TypeError)


def test_weight_norm_spec_rejects_negative_eps():
    with pytest.raises(xnorm.OptionError, match="eps"):
        xnorm.WeightNorm(dim=0, eps=-1.0)
    assert xnorm.WeightNorm(dim=0).tensor_names("embedding_table") == ("embedding_table_g", "embedding_table_v")


def test_axis_names_follow_the_canonical_layouts():
    assert LayerKind.axis_names("conv_transpose2d", 4) == ("in", "out/groups", "k0", "k1")
    assert LayerKind.axis_names("linear", 2) == ("out", "in")


def test_fused_scale_side_table():
    from xnorm.spec import FUSED_INPUT, FUSED_OUTPUT, FUSED_ROWS, fused_scale_side

    # Each side follows from which axis of torch's layout dim indexes (LayerKind's table).
    assert fused_scale_side("linear", 0) == FUSED_OUTPUT and fused_scale_side("linear", 1) == FUSED_INPUT
    assert fused_scale_side("conv2d", 0) == FUSED_OUTPUT and fused_scale_side("conv2d", 1) == FUSED_INPUT
    assert fused_scale_side("conv2d", 2) is None and fused_scale_side("conv1d", 2) is None
    assert fused_scale_side("conv_transpose1d", 0) == FUSED_INPUT
    assert fused_scale_side("conv_transpose3d", 1) == FUSED_OUTPUT
    assert fused_scale_side("embedding", 0) == FUSED_ROWS and fused_scale_side("embedding", 1) == FUSED_OUTPUT
    assert fused_scale_side("conv3d", None) == FUSED_OUTPUT
    assert fused_scale_side("generic", None) is None and fused_scale_side("generic", 0) is None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_power_iterations": 0}, "n_power_iterations must be an int >= 1"),
        ({"n_power_iterations": -2}, "n_power_iterations must be an int >= 1"),
        ({"n_power_iterations": True}, "n_power_iterations must be an int >= 1"),
        ({"eps": -1e-3}, "eps must be a non-negative float"),
        ({"eps": None}, "eps must be a non-negative float"),
    ],
)
def test_spectral_norm_options_are_checked_when_the_spec_is_made(options, match):
    with pytest.raises(xnorm.OptionError, match=match):
        xnorm.SpectralNorm(**options)


def test_wrap_refuses_a_spec_that_is_not_one_and_options_beside_a_spec_without_a_framework():
    with pytest.raises(xnorm.OptionError, match="spec must be a reparametrization"):
        xnorm.wrap(object(), {"dim": 0})
    with pytest.raises(xnorm.OptionError, match="inside the spec"):
        xnorm.wrap(object(), xnorm.WeightNorm(), eps=1e-3)
    with pytest.raises(xnorm.OptionError, match="weight norm only"):
        xnorm.wrap(object(), xnorm.SpectralNorm(), fused=True)
