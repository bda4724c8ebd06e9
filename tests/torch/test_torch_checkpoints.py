"""Checkpoints move between xnorm, torch's parametrizations.weight_norm and torch's legacy weight_norm."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import xnorm

LEGACY_KEYS = {"weight_g", "weight_v", "bias"}
PARAMETRIZATION_KEYS = {"parametrizations.weight.original0", "parametrizations.weight.original1", "bias"}


def legacy_weight_norm(module: nn.Module, dim) -> nn.Module:
    # Deprecated in torch, but old checkpoints were written with it: that is what is under test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module, dim=dim)


def seeded_conv(seed: int) -> nn.Conv1d:
    torch.manual_seed(seed)
    return nn.Conv1d(4, 6, 3, padding=1)


def saved_and_loaded(state_dict):
    """The state_dict as torch.save/torch.load give it back, as a real checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def input_batch() -> torch.Tensor:
    return torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dim", [0, 1, 2, -2, None])
def test_legacy_checkpoint_loads_strictly_into_xnorm_module(dim):
    legacy = legacy_weight_norm(seeded_conv(0), dim=dim)
    checkpoint = saved_and_loaded(legacy.state_dict())
    assert set(checkpoint) == LEGACY_KEYS

    # A differently initialised module proves the values come from the checkpoint.
    ours = xnorm.wrap(seeded_conv(1), dim=dim)
    result = ours.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    assert torch.equal(ours.parametrizations.weight.original0, legacy.weight_g)
    assert torch.equal(ours.parametrizations.weight.original1, legacy.weight_v)
    assert torch.equal(ours.bias, legacy.bias)
    x = input_batch()
    assert torch.equal(ours(x), legacy(x))


def test_legacy_checkpoint_loads_into_xnorm_module_nested_in_a_model():
    legacy_model = nn.Sequential(nn.ReLU(), legacy_weight_norm(seeded_conv(0), dim=0))
    checkpoint = saved_and_loaded(legacy_model.state_dict())
    assert set(checkpoint) == {f"1.{key}" for key in LEGACY_KEYS}

    ours_model = nn.Sequential(nn.ReLU(), xnorm.wrap(seeded_conv(1), dim=0))
    ours_model.load_state_dict(checkpoint, strict=True)
    x = input_batch()
    assert torch.equal(ours_model(x), legacy_model(x))


def test_the_callers_legacy_checkpoint_dict_is_not_renamed_in_place():
    legacy = legacy_weight_norm(seeded_conv(0), dim=0)
    checkpoint = legacy.state_dict()
    xnorm.wrap(seeded_conv(1), dim=0).load_state_dict(checkpoint, strict=True)
    assert set(checkpoint) == LEGACY_KEYS


@pytest.mark.parametrize("dim", [0, -2, None])
def test_xnorm_checkpoint_loads_into_torch_weight_norm_module(dim):
    ours = xnorm.wrap(seeded_conv(0), dim=dim)
    checkpoint = saved_and_loaded(ours.state_dict())
    assert set(checkpoint) == PARAMETRIZATION_KEYS

    theirs = torch_weight_norm(seeded_conv(1), dim=dim)
    theirs.load_state_dict(checkpoint, strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
    x = input_batch()
    assert torch.equal(theirs(x), ours(x))


@pytest.mark.parametrize("dim", [0, -2, None])
def test_torch_weight_norm_checkpoint_loads_into_xnorm_module(dim):
    theirs = torch_weight_norm(seeded_conv(0), dim=dim)
    checkpoint = saved_and_loaded(theirs.state_dict())

    ours = xnorm.wrap(seeded_conv(1), dim=dim)
    ours.load_state_dict(checkpoint, strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    x = input_batch()
    assert torch.equal(ours(x), theirs(x))


def test_legacy_key_hook_is_gone_after_remove():
    legacy_checkpoint = legacy_weight_norm(seeded_conv(0), dim=0).state_dict()
    module = seeded_conv(1)
    hooks_before_wrap = len(module._load_state_dict_pre_hooks)
    xnorm.remove(xnorm.wrap(module, dim=0))

    assert len(module._load_state_dict_pre_hooks) == hooks_before_wrap
    with pytest.raises(RuntimeError, match="weight_g"):
        module.load_state_dict(legacy_checkpoint, strict=True)


def test_removed_module_loads_a_plain_checkpoint():
    plain = seeded_conv(0)
    module = xnorm.remove(xnorm.wrap(seeded_conv(1), dim=0))
    module.load_state_dict(plain.state_dict(), strict=True)
    x = input_batch()
    assert torch.equal(module(x), plain(x))
