"""Every refusal of xnorm.wrap on a torch module: the right error, the documented builtin base class,
a message naming the fix, and a module left exactly as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

import xnorm


class WithIntegerParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))
        self.counts = nn.Parameter(torch.arange(6).reshape(2, 3), requires_grad=False)


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))
        self.scale = nn.Parameter(torch.randn(2))
        self.register_buffer("running", torch.zeros(2, 3))


def legacy_wrapped_linear() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(nn.Linear(3, 2))


def snapshot(module: nn.Module):
    """Everything a refused wrap must leave alone."""
    return {
        "class": type(module),
        "parametrized": parametrize.is_parametrized(module),
        "state": {key: value.detach().clone() for key, value in module.state_dict().items()},
        "parameters": [name for name, _ in module.named_parameters()],
        "load_hooks": len(module._load_state_dict_pre_hooks),
    }


def assert_unchanged(module: nn.Module, before) -> None:
    after = snapshot(module)
    assert after["class"] is before["class"]
    assert after["parametrized"] == before["parametrized"]
    assert after["parameters"] == before["parameters"]
    assert after["load_hooks"] == before["load_hooks"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert torch.equal(after["state"][key], value), key


# (id, module factory, wrap keyword arguments, error class, builtin base, phrase the message must contain)
REFUSALS = [
    ("missing-name", lambda: nn.Linear(3, 2), dict(name="nonexistent"),
     xnorm.MissingParameterError, ValueError, "['weight', 'bias']"),
    ("buffer-name", WithBuffer, dict(name="running"),
     xnorm.MissingParameterError, ValueError, "buffer"),
    ("integer-parameter", WithIntegerParameter, dict(name="counts"),
     xnorm.NonFloatingParameterError, TypeError, "floating"),
    ("dim-past-last-axis", lambda: nn.Linear(3, 2), dict(dim=2),
     xnorm.DimError, ValueError, "out of range"),
    ("dim-before-first-axis", lambda: nn.Linear(3, 2), dict(dim=-3),
     xnorm.DimError, ValueError, "out of range"),
    ("dim-float", lambda: nn.Linear(3, 2), dict(dim=1.5),
     xnorm.DimError, ValueError, "dim=None"),
    ("dim-bool", lambda: nn.Linear(3, 2), dict(dim=True),
     xnorm.DimError, ValueError, "bool"),
    ("unknown-backend", lambda: nn.Linear(3, 2), dict(backend="nope"),
     xnorm.UnknownBackendError, ValueError, "known backends"),
    ("negative-eps", lambda: nn.Linear(3, 2), dict(eps=-1),
     xnorm.OptionError, ValueError, "non-negative"),
    ("unknown-option", lambda: nn.Linear(3, 2), dict(unknown=True),
     xnorm.OptionError, ValueError, "takes no option(s) ['unknown']"),
    ("fused-not-bool", lambda: nn.Linear(3, 2), dict(fused="yes"),
     xnorm.OptionError, ValueError, "fused must be True, False or 'auto'"),
    ("already-wrapped-by-torch", lambda: torch_weight_norm(nn.Linear(3, 2)), {},
     xnorm.AlreadyWrappedError, ValueError, "remove_parametrizations"),
    ("already-wrapped-by-legacy-torch", legacy_wrapped_linear, {},
     xnorm.AlreadyWrappedError, ValueError, "remove_weight_norm"),
]


@pytest.mark.parametrize("build, kwargs, error, builtin, phrase",
                         [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refused_wrap_raises_and_leaves_the_module_unchanged(build, kwargs, error, builtin, phrase):
    torch.manual_seed(0)
    module = build()
    before = snapshot(module)

    with pytest.raises(error) as raised:
        xnorm.wrap(module, **kwargs)

    assert isinstance(raised.value, builtin)
    assert isinstance(raised.value, xnorm.XnormError)
    assert phrase in str(raised.value)
    assert_unchanged(module, before)


def test_missing_parameter_message_lists_only_floating_parameters():
    module = WithIntegerParameter()
    with pytest.raises(xnorm.MissingParameterError) as raised:
        xnorm.wrap(module, name="nonexistent")
    message = str(raised.value)
    assert "'weight'" in message
    assert "counts" not in message


def test_wrapping_twice_raises_and_keeps_the_first_wrapping():
    torch.manual_seed(0)
    module = xnorm.wrap(nn.Linear(3, 2), dim=0)
    x = torch.randn(4, 3)
    output = module(x)
    before = snapshot(module)

    with pytest.raises(xnorm.AlreadyWrappedError) as raised:
        xnorm.wrap(module, dim=1)

    assert isinstance(raised.value, ValueError)
    assert "xnorm.remove" in str(raised.value)
    assert_unchanged(module, before)
    assert len(module.parametrizations.weight) == 1
    assert module.parametrizations.weight[0].dim == 0
    assert torch.equal(module(x), output)


def test_a_framework_not_installed_here_raises_an_xnorm_error_and_leaves_the_module_unchanged():
    module = nn.Linear(3, 2)
    before = snapshot(module)
    with pytest.raises(xnorm.XnormError) as raised:
        xnorm.wrap(module, backend="mindspore")
    # Which of the two depends on whether MindSpore is installed; both are documented for this call.
    assert isinstance(raised.value, (xnorm.BackendNotInstalledError, xnorm.BackendDetectionError))
    if isinstance(raised.value, xnorm.BackendNotInstalledError):
        assert isinstance(raised.value, ImportError)
        assert "pip install" in str(raised.value)
    else:
        assert isinstance(raised.value, TypeError)
    assert_unchanged(module, before)


@pytest.mark.parametrize("obj", [object(), [1.0, 2.0], torch.randn(2, 3)], ids=["object", "list", "tensor"])
def test_non_module_without_backend_raises_detection_error(obj):
    with pytest.raises(xnorm.BackendDetectionError) as raised:
        xnorm.wrap(obj)
    assert isinstance(raised.value, TypeError)
    assert "backend=" in str(raised.value)


def test_torch_backend_refuses_a_non_module_even_when_named():
    with pytest.raises(xnorm.BackendDetectionError) as raised:
        xnorm.wrap(torch.randn(2, 3), backend="torch")
    assert isinstance(raised.value, TypeError)


def test_remove_with_extra_arguments_raises_option_error_and_leaves_the_module_wrapped():
    module = xnorm.wrap(nn.Linear(3, 2))
    before = snapshot(module)
    with pytest.raises(xnorm.OptionError) as raised:
        xnorm.remove(module, {"params": {}})
    assert isinstance(raised.value, ValueError)
    assert_unchanged(module, before)
    assert xnorm.is_wrapped(module)


class Doubling(nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_wrapping_over_another_parametrization_raises_and_leaves_it_in_place():
    module = nn.Linear(3, 2)
    parametrize.register_parametrization(module, "weight", Doubling())
    before = snapshot(module)
    with pytest.raises(xnorm.AlreadyWrappedError, match="another parametrization"):
        xnorm.wrap(module)
    assert_unchanged(module, before)


def test_remove_refuses_a_model_with_a_parametrization_stacked_on_xnorm_and_changes_nothing():
    # The first layer could be removed on its own; remove must check every layer before touching any.
    model = nn.Sequential(xnorm.wrap(nn.Linear(3, 3)), xnorm.wrap(nn.Linear(3, 2)))
    parametrize.register_parametrization(model[1], "weight", Doubling())
    before = [snapshot(layer) for layer in model]

    with pytest.raises(xnorm.UnsupportedLayerError) as raised:
        xnorm.remove(model)

    assert isinstance(raised.value, TypeError)
    assert "remove_parametrizations" in str(raised.value)
    for layer, layer_before in zip(model, before, strict=True):
        assert_unchanged(layer, layer_before)
    assert xnorm.is_wrapped(model[0]) and xnorm.is_wrapped(model[1])
