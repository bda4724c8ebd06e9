"""xnorm.batchnorm: the eval-mode formula, one training step per framework convention and the momentum
mapping, against values worked out by hand (no framework imported)."""

import math

import numpy as np
import pytest

from xnorm import batchnorm
from xnorm.errors import OptionError

# Two channels, four samples (N, C). Channel 0: 1, 2, 3, 6 -> mean 3, squared deviations 4, 1, 0, 9
# (sum 14): biased variance 14/4 = 3.5, unbiased 14/3. Channel 1: 0, 0, 2, 2 -> mean 1, biased 1, unbiased 4/3.
X = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 2.0], [6.0, 2.0]])
START_MEAN = np.array([0.0, 0.0])
START_VAR = np.array([1.0, 1.0])


def test_eval_formula_by_hand():
    x = np.array([[1.0], [2.0], [5.0]])
    # (x - 1) / sqrt(4 + 0) * 3 + 0.5
    y = batchnorm.eval_batchnorm(x, [1.0], [4.0], weight=[3.0], bias=[0.5], eps=0.0)
    np.testing.assert_array_equal(y, [[0.5], [2.0], [6.5]])
    assert y.dtype == np.float64


def test_eval_formula_eps_goes_under_the_root_and_channels_last():
    x = np.array([[[3.0, 10.0]]])  # (N=1, W=1, C=2), Flax's layout
    y = batchnorm.eval_batchnorm(x, [1.0, 10.0], [3.0, 7.0], eps=1.0, channel_axis=-1)
    np.testing.assert_allclose(y, [[[2.0 / 2.0, 0.0]]], rtol=0, atol=1e-15)
    # Without weight and bias (affine=False) they count as 1 and 0.
    np.testing.assert_allclose(batchnorm.eval_batchnorm([[4.0]], [0.0], [3.0], eps=1.0), [[2.0]], rtol=1e-15)


def test_torch_step_new_batch_weight_and_unbiased_variance():
    _, mean, var = batchnorm.batchnorm_training_step("torch", X, START_MEAN, START_VAR, momentum=0.1, eps=0.0)
    np.testing.assert_allclose(mean, [0.1 * 3, 0.1 * 1], rtol=1e-15)
    np.testing.assert_allclose(var, [0.9 + 0.1 * 14 / 3, 0.9 + 0.1 * 4 / 3], rtol=1e-15)


def test_flax_step_old_value_weight_and_biased_variance():
    _, mean, var = batchnorm.batchnorm_training_step("flax", X, START_MEAN, START_VAR, momentum=0.99, eps=0.0)
    np.testing.assert_allclose(mean, [0.01 * 3, 0.01 * 1], rtol=1e-13)
    np.testing.assert_allclose(var, [0.99 + 0.01 * 3.5, 0.99 + 0.01 * 1.0], rtol=1e-15)


def test_mindspore_step_old_value_weight_and_unbiased_variance():
    # The defaults (momentum 0.9) are used when none is given.
    _, mean, var = batchnorm.batchnorm_training_step("mindspore", X, START_MEAN, START_VAR, eps=0.0)
    np.testing.assert_allclose(mean, [0.3, 0.1], rtol=1e-15)
    np.testing.assert_allclose(var, [0.9 + 0.1 * 14 / 3, 0.9 + 0.1 * 4 / 3], rtol=1e-15)


@pytest.mark.parametrize("framework", ["torch", "mindspore", "flax"])
def test_training_output_uses_the_biased_batch_variance_everywhere(framework):
    weight, bias = np.array([2.0, 1.0]), np.array([0.0, -1.0])
    y, _, _ = batchnorm.batchnorm_training_step(
        framework, X, START_MEAN, START_VAR, eps=0.0, weight=weight, bias=bias, channel_axis=1
    )
    expected_c0 = [(v - 3.0) / math.sqrt(3.5) * 2.0 for v in (1.0, 2.0, 3.0, 6.0)]
    expected_c1 = [(v - 1.0) / 1.0 - 1.0 for v in (0.0, 0.0, 2.0, 2.0)]
    np.testing.assert_allclose(y, np.stack([expected_c0, expected_c1], axis=1), rtol=1e-15, atol=1e-15)


def test_a_single_value_per_channel_has_no_unbiased_variance():
    with pytest.raises(OptionError, match="at least 2"):
        batchnorm.batchnorm_training_step("torch", [[1.0, 2.0]], START_MEAN, START_VAR)


@pytest.mark.parametrize(
    "source, target, momentum, expected",
    [
        ("torch", "mindspore", 0.1, 0.9),
        ("torch", "flax", 0.1, 0.9),
        ("mindspore", "torch", 0.9, 0.1),
        ("flax", "torch", 0.99, 0.01),
        ("flax", "mindspore", 0.99, 0.99),
        ("torch", "torch", 0.3, 0.3),
    ],
)
def test_equivalent_settings(source, target, momentum, expected):
    settings = batchnorm.equivalent_batchnorm_settings(source, target, momentum, 1e-3)
    assert settings.momentum == pytest.approx(expected, abs=1e-15)
    assert settings.eps == 1e-3
    m, eps = settings  # unpacks as a pair
    assert (m, eps) == tuple(settings)


def test_equivalent_settings_give_the_same_running_mean_and_the_variance_gap():
    """A torch step with m and a Flax step with the mapped momentum move the mean identically; the variance
    differs by exactly the n/(n-1) factor on the batch term, which no setting removes."""
    mapped = batchnorm.equivalent_batchnorm_settings("torch", "flax", 0.25, 1e-5)
    _, torch_mean, torch_var = batchnorm.batchnorm_training_step("torch", X, START_MEAN, START_VAR, momentum=0.25)
    _, flax_mean, flax_var = batchnorm.batchnorm_training_step(
        "flax", X, START_MEAN, START_VAR, momentum=mapped.momentum, channel_axis=1
    )
    np.testing.assert_allclose(flax_mean, torch_mean, rtol=1e-15)
    gap = 0.25 * (np.array([14 / 3, 4 / 3]) - np.array([3.5, 1.0]))  # momentum * (unbiased - biased)
    np.testing.assert_allclose(torch_var - flax_var, gap, rtol=1e-12)


@pytest.mark.parametrize(
    "args, match",
    [
        (("torch", "flax", None, 1e-5), "cumulative"),
        (("torch", "flax", 1.5, 1e-5), r"\[0, 1\]"),
        (("torch", "flax", 0.1, -1.0), "eps"),
        (("torch", "tensorflow", 0.1, 1e-5), "tensorflow"),
        (("keras", "torch", 0.1, 1e-5), "keras"),
    ],
)
def test_equivalent_settings_refusals(args, match):
    with pytest.raises(OptionError, match=match):
        batchnorm.equivalent_batchnorm_settings(*args)


def test_every_convention_is_stated_with_its_status():
    for name, convention in batchnorm.CONVENTIONS.items():
        assert convention.framework == name
        assert convention.momentum_weighs in ("new", "old")
        assert convention.running_var in ("unbiased", "biased")
        assert convention.status
    assert "unverified" in batchnorm.CONVENTIONS["mindspore"].status
