"""A wrapped module works with torch's tooling: compile, export, deepcopy, jit.trace, and jit.script after remove."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import xnorm
from xnorm.conformance.tolerances import assert_close

# torch.jit is deprecated in favour of compile/export, but script after remove is the documented
# deployment path and trace is still widely used, so both stay tested; torch.compile's own internals
# also call into torch.jit on the CPU and warn.
JIT_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch\\.jit\\.:DeprecationWarning")


def legacy_checkpoint(seed: int):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(nn.Conv1d(4, 6, 3, padding=1), dim=0).state_dict()


def wrapped_conv1d(seed: int = 0, dim=0) -> nn.Module:
    torch.manual_seed(seed)
    return xnorm.wrap(nn.Conv1d(4, 6, 3, padding=1), dim=dim)


def input_batch() -> torch.Tensor:
    return torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(3))


def g_and_v(module: nn.Module):
    return module.parametrizations.weight.original0, module.parametrizations.weight.original1


def eager_gradients(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor):
    module.zero_grad(set_to_none=True)
    module(x).backward(grad_output)
    grads = [p.grad.clone() for p in g_and_v(module)]
    module.zero_grad(set_to_none=True)
    return grads


@JIT_DEPRECATION
def test_torch_compile_fullgraph_matches_eager_and_trains_g_and_v():
    module = wrapped_conv1d()
    x = input_batch()
    eager_output = module(x).detach()
    grad_output = torch.randn_like(eager_output)
    expected_grads = eager_gradients(module, x, grad_output)

    compiled = torch.compile(module, fullgraph=True)
    output = compiled(x)
    output.backward(grad_output)

    assert_close(output.detach().numpy(), eager_output.numpy(), "float32", "forward", what="compiled output")
    for param, expected in zip(g_and_v(module), expected_grads, strict=True):
        assert param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert_close(param.grad.numpy(), expected.numpy(), "float32", "gradient", what="compiled gradient")


def test_torch_export_runs_and_matches_eager():
    module = wrapped_conv1d(dim=None)
    x = input_batch()
    exported = torch.export.export(module, (x,))
    other_input = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(4))
    for inputs in (x, other_input):
        assert_close(exported.module()(inputs).detach().numpy(), module(inputs).detach().numpy(),
                     "float32", "forward", what="exported output")


@JIT_DEPRECATION
def test_jit_trace_of_wrapped_module_matches_eager():
    module = wrapped_conv1d()
    x = input_batch()
    traced = torch.jit.trace(module, (x,))
    other_input = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(5))
    for inputs in (x, other_input):
        assert torch.equal(traced(inputs), module(inputs))


@JIT_DEPRECATION
def test_jit_script_after_remove_matches_the_wrapped_module():
    module = wrapped_conv1d()
    with torch.no_grad():
        module.parametrizations.weight.original0.mul_(0.5)
    x = input_batch()
    wrapped_output = module(x).detach()

    scripted = torch.jit.script(xnorm.remove(module))

    assert torch.equal(scripted(x), wrapped_output)


def test_deepcopy_is_an_independent_wrapped_module():
    original = wrapped_conv1d()
    x = input_batch()
    original_output = original(x).detach()
    original_g = original.parametrizations.weight.original0.detach().clone()

    duplicate = copy.deepcopy(original)
    assert xnorm.is_wrapped(duplicate)
    assert torch.equal(duplicate(x), original_output)

    with torch.no_grad():
        duplicate.parametrizations.weight.original0.mul_(2.0)
    assert torch.equal(original.parametrizations.weight.original0, original_g)
    assert torch.equal(original(x), original_output)
    assert not torch.equal(duplicate(x), original_output)


def test_deepcopy_keeps_a_working_legacy_hook_and_its_remove_clears_only_the_copy():
    original = wrapped_conv1d(seed=1)
    duplicate = copy.deepcopy(original)
    checkpoint = legacy_checkpoint(seed=0)

    duplicate.load_state_dict(checkpoint, strict=True)
    assert torch.equal(duplicate.parametrizations.weight.original1, checkpoint["weight_v"])

    xnorm.remove(duplicate)
    assert type(duplicate) is nn.Conv1d
    with pytest.raises(RuntimeError, match="weight_g"):
        duplicate.load_state_dict(checkpoint, strict=True)

    # The original keeps its wrapping and its own hook.
    assert xnorm.is_wrapped(original)
    original.load_state_dict(checkpoint, strict=True)
    assert torch.equal(original.parametrizations.weight.original0, checkpoint["weight_g"])
