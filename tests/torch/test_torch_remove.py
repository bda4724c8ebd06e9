"""xnorm.remove gives back a plain module, and xnorm.is_wrapped tells wrapped from plain."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import xnorm


def seeded(factory, seed: int = 0):
    torch.manual_seed(seed)
    return factory()


MODULE_FACTORIES = {
    "Linear": (lambda: nn.Linear(6, 4), lambda: torch.randn(3, 6)),
    "Conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 9)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, (3, 2)), lambda: torch.randn(2, 3, 6, 5)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), lambda: torch.randn(2, 4, 7)),
    "Embedding": (lambda: nn.Embedding(10, 5), lambda: torch.tensor([[1, 4, 9], [0, 0, 3]])),
}


def state_snapshot(module: nn.Module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_same_state(module: nn.Module, snapshot) -> None:
    state = module.state_dict()
    assert list(state) == list(snapshot)
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("dim", [0, None, -2])
@pytest.mark.parametrize("kind", sorted(MODULE_FACTORIES))
def test_remove_restores_a_plain_module_computing_the_wrapped_output(kind, dim):
    factory, make_input = MODULE_FACTORIES[kind]
    plain_keys = list(seeded(factory).state_dict())
    module = seeded(factory)
    original_class = type(module)
    xnorm.wrap(module, dim=dim)
    # Moving g away from its initial value makes the materialised weight differ from the original one,
    # so the comparison below checks that remove keeps w rather than the pre-wrap weight.
    with torch.no_grad():
        module.parametrizations.weight.original0.mul_(1.5)
    x = make_input()
    wrapped_output = module(x)
    wrapped_weight = module.weight.detach().clone()

    returned = xnorm.remove(module)

    assert returned is module
    assert type(module) is original_class
    assert not hasattr(module, "parametrizations")
    assert not parametrize.is_parametrized(module)
    assert isinstance(module.weight, nn.Parameter)
    assert module.weight.requires_grad
    assert "weight" in module._parameters
    # Same keys; the order differs (weight is re-registered after bias), exactly as after torch's own
    # parametrize.remove_parametrizations, and load_state_dict does not depend on it.
    assert sorted(module.state_dict()) == sorted(plain_keys)
    assert torch.equal(module.weight, wrapped_weight)
    assert torch.equal(module(x), wrapped_output)
    assert not xnorm.is_wrapped(module)


def test_remove_on_a_model_unwraps_every_wrapped_layer_and_keeps_the_model_object():
    torch.manual_seed(0)
    model = nn.Sequential(
        xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1), dim=0),
        nn.ReLU(),
        nn.Conv1d(6, 6, 1),
        xnorm.wrap(nn.Conv1d(6, 2, 3), dim=None),
    )
    untouched_plain = state_snapshot(model[2])
    x = torch.randn(2, 4, 9)
    wrapped_output = model(x)

    returned = xnorm.remove(model)

    assert returned is model
    for index, cls in ((0, nn.Conv1d), (2, nn.Conv1d), (3, nn.Conv1d)):
        assert type(model[index]) is cls
        assert not parametrize.is_parametrized(model[index])
        assert isinstance(model[index].weight, nn.Parameter)
    assert_same_state(model[2], untouched_plain)
    assert sorted(model.state_dict()) == sorted(
        f"{i}.{name}" for i in (0, 2, 3) for name in ("weight", "bias")
    )
    assert torch.equal(model(x), wrapped_output)


@pytest.mark.parametrize("build", [
    lambda: nn.Linear(3, 2),
    lambda: nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)),
    # torch's own weight norm is not xnorm's to remove.
    lambda: nn.Sequential(torch_weight_norm(nn.Linear(3, 2)), nn.Linear(2, 2)),
], ids=["plain-linear", "plain-sequential", "torch-weight-norm-sequential"])
def test_remove_without_any_xnorm_layer_raises_not_wrapped_and_changes_nothing(build):
    model = seeded(build)
    snapshot = state_snapshot(model)
    classes = [type(m) for m in model.modules()]
    parametrized = [parametrize.is_parametrized(m) for m in model.modules()]

    with pytest.raises(xnorm.NotWrappedError, match="nothing to remove") as raised:
        xnorm.remove(model)

    assert isinstance(raised.value, ValueError)
    assert_same_state(model, snapshot)
    assert [type(m) for m in model.modules()] == classes
    assert [parametrize.is_parametrized(m) for m in model.modules()] == parametrized


def test_is_wrapped_is_true_only_for_the_wrapped_layer_itself():
    wrapped = xnorm.wrap(nn.Linear(3, 2))
    plain = nn.Linear(3, 2)
    model = nn.Sequential(wrapped, plain)

    assert xnorm.is_wrapped(wrapped) is True
    assert xnorm.is_wrapped(plain) is False
    assert xnorm.is_wrapped(model) is False
    assert xnorm.is_wrapped(3) is False
    assert xnorm.is_wrapped(torch_weight_norm(nn.Linear(3, 2))) is False


def test_is_wrapped_follows_wrap_and_remove():
    module = nn.Conv1d(2, 3, 3)
    assert not xnorm.is_wrapped(module)
    xnorm.wrap(module)
    assert xnorm.is_wrapped(module)
    xnorm.remove(module)
    assert not xnorm.is_wrapped(module)
