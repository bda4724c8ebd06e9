"""Spectral normalization in torch: bit-equal to torch's own parametrization, equal to the NumPy
reference, legacy checkpoints, the GAN two-forward pattern, removal, and every refusal."""

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import xnorm
from xnorm import reference_spectral
from xnorm.errors import AlreadyWrappedError, DimError, NonFloatingParameterError, OptionError

LAYERS = {
    "linear": lambda: nn.Linear(6, 4),
    "conv1d": lambda: nn.Conv1d(4, 6, 3),
    "conv2d-g2": lambda: nn.Conv2d(4, 6, (3, 2), groups=2),
    "conv_transpose1d": lambda: nn.ConvTranspose1d(4, 6, 3),  # default dim 1
    "conv_transpose2d-g2": lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    "embedding": lambda: nn.Embedding(10, 5),
}
INPUTS = {
    "linear": (3, 6),
    "conv1d": (2, 4, 9),
    "conv2d-g2": (2, 4, 6, 5),
    "conv_transpose1d": (2, 4, 7),
    "conv_transpose2d-g2": (2, 4, 4, 5),
}


def _input(label, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    if label == "embedding":
        return torch.randint(0, 10, (3, 4), generator=gen)
    return torch.randn(INPUTS[label], generator=gen, dtype=dtype)


def _twins(label, dtype=torch.float32, **options):
    """(torch's own, xnorm's) on equal copies of one layer, registered from the same RNG state."""
    torch.manual_seed(0)
    theirs = LAYERS[label]().to(dtype)
    ours = copy.deepcopy(theirs)
    torch.manual_seed(1)
    parametrizations.spectral_norm(theirs, **options)
    torch.manual_seed(1)
    xnorm.spectral_norm(ours, **options)
    return theirs, ours


def _assert_identical(a, b, what):
    assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: max |diff| {(a - b).abs().max().item()}"


@pytest.mark.parametrize("options", [{}, {"n_power_iterations": 3}, {"dim": 1}, {"eps": 1e-3}], ids=str)
@pytest.mark.parametrize("label", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bit_equal_to_torch_through_training_eval_and_remove(label, dtype, options):
    if label.startswith("conv_transpose") and options.get("dim") == 1:
        options = {"dim": 0}
    theirs, ours = _twins(label, dtype, **options)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # torch's own keys, in torch's order
    for key, value in theirs.state_dict().items():
        _assert_identical(ours.state_dict()[key], value, f"{key} after registration")
    x = _input(label, dtype)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.3)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.3)
    for step in range(4):
        for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
            opt.zero_grad()
            model(x).square().mean().backward()
        _assert_identical(ours(x), theirs(x), f"output at step {step}")  # another training-mode call each
        _assert_identical(
            ours.parametrizations.weight.original.grad, theirs.parametrizations.weight.original.grad, "dL/dW"
        )
        opt_theirs.step()
        opt_ours.step()
        for key, value in theirs.state_dict().items():
            _assert_identical(ours.state_dict()[key], value, f"{key} after step {step}")
    ours.eval(), theirs.eval()
    _assert_identical(ours(x), theirs(x), "eval output")
    ours.train(), theirs.train()
    parametrize.remove_parametrizations(theirs, "weight")  # training mode: one more iteration, both
    xnorm.remove(ours)
    assert type(ours) is type(theirs) and not parametrize.is_parametrized(ours)
    _assert_identical(ours.weight, theirs.weight, "weight after remove")


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("label", ["linear", "conv1d", "conv_transpose1d"])
def test_equal_to_the_float64_reference_over_training_mode_calls(label, n):
    torch.manual_seed(3)
    module = LAYERS[label]().double()
    plain = copy.deepcopy(module)  # computes dL/dw for a given w
    xnorm.spectral_norm(module, n_power_iterations=n)
    sn = module.parametrizations.weight[0]
    dim = 1 if label.startswith("conv_transpose") else 0
    weight = module.parametrizations.weight.original.detach().numpy()
    u, v = sn._u.numpy().copy(), sn._v.numpy().copy()
    x = _input(label, torch.float64)
    for _ in range(3):
        y = module(x)
        w_ref, u, v = reference_spectral.training_call(weight, u, v, dim, n, 1e-12)
        np.testing.assert_allclose(sn._u.numpy(), u, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(sn._v.numpy(), v, rtol=1e-12, atol=1e-14)
        grad_out = torch.randn_like(y)
        module.parametrizations.weight.original.grad = None
        y.backward(grad_out)
        # dL/dw from the plain layer holding the reference w, then the reference's dL/dW
        with torch.no_grad():
            plain.weight.copy_(torch.from_numpy(w_ref))
        plain.weight.grad = None
        plain(x).backward(grad_out)
        expected = reference_spectral.spectral_norm_grad(weight, u, v, plain.weight.grad.numpy(), dim, 1e-12)
        np.testing.assert_allclose(module.parametrizations.weight.original.grad.numpy(), expected, rtol=1e-10,
                                   atol=1e-12)


def test_sigma_converges_to_the_largest_singular_value():
    torch.manual_seed(0)
    module = xnorm.spectral_norm(nn.Linear(30, 20).double())
    weight = module.parametrizations.weight.original.detach().numpy()
    for _ in range(200):
        module(torch.zeros(1, 30, dtype=torch.float64))
    sn = module.parametrizations.weight[0]
    sigma = reference_spectral.sigma(weight, sn._u.numpy(), sn._v.numpy(), 0)
    np.testing.assert_allclose(sigma, np.linalg.svd(weight, compute_uv=False)[0], rtol=1e-9)
    module.eval()
    np.testing.assert_allclose(np.linalg.svd(module.weight.detach().numpy(), compute_uv=False)[0], 1.0, rtol=1e-9)


def test_eval_mode_does_not_iterate_and_training_mode_access_does():
    _, ours = _twins("conv1d")
    sn = ours.parametrizations.weight[0]
    before = sn._u.clone()
    ours.eval()
    ours(_input("conv1d"))
    _ = ours.weight
    _assert_identical(sn._u, before, "u after eval-mode calls")
    ours.train()
    _ = ours.weight  # every training-mode access iterates, as torch's own does
    assert not torch.equal(sn._u, before)


def test_remove_in_eval_mode_keeps_the_current_sigma():
    theirs, ours = _twins("linear")
    ours.eval(), theirs.eval()
    expected = theirs.weight.detach().clone()
    u_before = ours.parametrizations.weight[0]._u.clone()
    xnorm.remove(ours)
    _assert_identical(ours.weight.detach(), expected, "weight after an eval-mode remove")
    assert torch.equal(u_before, theirs.parametrizations.weight[0]._u)


def test_gan_pattern_two_forwards_then_one_backward():
    _, ours = _twins("conv1d")
    x = _input("conv1d")
    loss = ours(x).mean() - ours(2 * x).mean()  # both forwards iterate; u, v are cloned before use
    loss.backward()
    assert torch.isfinite(ours.parametrizations.weight.original.grad).all()


def test_one_dimensional_weight_is_normalized_like_torch():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(7))

        def forward(self, x):
            return x * self.weight

    torch.manual_seed(0)
    theirs = Scale()
    ours = copy.deepcopy(theirs)
    parametrizations.spectral_norm(theirs)
    xnorm.spectral_norm(ours)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["parametrizations.weight.original"]
    _assert_identical(ours.weight, theirs.weight, "1-D weight")
    np.testing.assert_allclose(np.linalg.norm(ours.weight.detach().numpy()), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_keeps_the_state_in_float32(dtype):
    torch.manual_seed(0)
    module = xnorm.spectral_norm(nn.Linear(6, 4).to(dtype))
    sn = module.parametrizations.weight[0]
    assert sn._u.dtype == sn._v.dtype == torch.float32
    weight = module.parametrizations.weight.original.detach().float().numpy()
    u, v = sn._u.numpy().copy(), sn._v.numpy().copy()
    w = module.weight  # a training-mode access: one iteration in float32, w rounded once
    assert w.dtype == dtype
    expected, _, _ = reference_spectral.training_call(weight, u, v, 0, 1, 1e-12, dtype=str(dtype)[6:])
    np.testing.assert_array_equal(w.detach().float().numpy(), expected)


def test_a_legacy_checkpoint_loads_and_gives_the_same_eval_output():
    torch.manual_seed(0)
    legacy = nn.utils.spectral_norm(nn.Conv1d(4, 6, 3))
    x = _input("conv1d")
    for _ in range(3):
        legacy(x)  # training-mode calls move the legacy u, v
    state = legacy.state_dict()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    ours = xnorm.spectral_norm(nn.Conv1d(4, 6, 3))
    ours.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    legacy.eval(), ours.eval()
    _assert_identical(ours.parametrizations.weight[0]._u, legacy.weight_u, "u")
    _assert_identical(ours.parametrizations.weight[0]._v, legacy.weight_v, "v")
    torch.testing.assert_close(ours(x), legacy(x), rtol=0, atol=1e-6)
    # torch's own parametrization refuses the same checkpoint
    theirs = parametrizations.spectral_norm(nn.Conv1d(4, 6, 3))
    with pytest.raises(RuntimeError, match="Missing key"):
        theirs.load_state_dict(state, strict=True)


def test_deepcopy_is_independent():
    _, ours = _twins("linear")
    twin = copy.deepcopy(ours)
    twin(_input("linear"))
    assert not torch.equal(twin.parametrizations.weight[0]._u, ours.parametrizations.weight[0]._u)


def _snapshot(module):
    return type(module), {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snapshot):
    kind, state = snapshot
    assert type(module) is kind and list(module.state_dict()) == list(state)
    for key, value in state.items():
        assert torch.equal(module.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: xnorm.spectral_norm(m, n_power_iterations=0), OptionError, "n_power_iterations must be an int >= 1"),
        (lambda m: xnorm.spectral_norm(m, n_power_iterations=1.5), OptionError, "n_power_iterations"),
        (lambda m: xnorm.spectral_norm(m, eps=-1.0), OptionError, "eps must be a non-negative float"),
        (lambda m: xnorm.spectral_norm(m, dim=2), DimError, "dim=2 is out of range"),
        (lambda m: xnorm.spectral_norm(m, dim=True), DimError, "bool"),
        (lambda m: xnorm.spectral_norm(m, name="bias_missing"), xnorm.MissingParameterError, "no parameter"),
        (lambda m: xnorm.wrap(m, xnorm.SpectralNorm(), fused=True), OptionError, "weight norm only"),
        (lambda m: xnorm.wrap(m, xnorm.SpectralNorm(), dim=0), OptionError, "inside the spec"),
        (lambda m: xnorm.wrap(m, "spectral"), xnorm.UnknownBackendError, "unknown backend"),
        (lambda m: xnorm.wrap(m, 3), OptionError, "spec must be a reparametrization"),
    ],
)
def test_bad_options_raise_and_leave_the_layer_untouched(call, error, match):
    module = nn.Linear(6, 4)
    before = _snapshot(module)
    with pytest.raises(error, match=match):
        call(module)
    _unchanged(module, before)


@pytest.mark.parametrize(
    "first",
    [
        lambda m: xnorm.spectral_norm(m),
        lambda m: xnorm.weight_norm(m),
        lambda m: parametrizations.spectral_norm(m),
        lambda m: parametrizations.orthogonal(m),
        lambda m: nn.utils.spectral_norm(m),
        lambda m: nn.utils.weight_norm(m),
    ],
    ids=["xnorm-sn", "xnorm-wn", "torch-sn", "torch-orthogonal", "torch-legacy-sn", "torch-legacy-wn"],
)
@pytest.mark.parametrize("second", [xnorm.spectral_norm, xnorm.weight_norm], ids=["then-sn", "then-wn"])
def test_a_weight_with_any_reparametrization_is_refused(first, second):
    module = first(nn.Linear(6, 6))
    before = _snapshot(module)
    with pytest.raises(AlreadyWrappedError, match="already"):
        second(module)
    _unchanged(module, before)


def test_a_non_floating_weight_is_refused():
    module = nn.Linear(3, 2)
    module.counts = nn.Parameter(torch.zeros(2, 3, dtype=torch.int64), requires_grad=False)
    before = _snapshot(module)
    with pytest.raises(NonFloatingParameterError, match="int64"):
        xnorm.spectral_norm(module, name="counts")
    _unchanged(module, before)


def test_remove_takes_a_whole_model_with_both_reparametrizations():
    model = nn.Sequential(xnorm.spectral_norm(nn.Conv1d(4, 6, 3)), nn.ReLU(), xnorm.weight_norm(nn.Conv1d(6, 2, 3)))
    model.eval()
    x = _input("conv1d")
    y = model(x)
    xnorm.remove(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    with pytest.raises(xnorm.NotWrappedError):
        xnorm.remove(model)


def test_a_legacy_checkpoint_with_state_of_the_wrong_size_names_the_key():
    legacy = nn.utils.spectral_norm(nn.Conv1d(4, 6, 3))
    state = legacy.state_dict()
    state["weight_u"] = torch.ones(5)  # h is 6
    ours = xnorm.spectral_norm(nn.Conv1d(4, 6, 3))
    with pytest.raises(RuntimeError, match=r"size mismatch for parametrizations\.weight\.0\._u"):
        ours.load_state_dict(state, strict=True)
