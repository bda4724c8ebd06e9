"""xnorm.freeze / unfreeze / is_frozen in torch: the fine-tuning scenario of issue 17 against a hand-built
eval-mode reference, the drift without freeze, survival through train(), deepcopy, pickle, torch.compile
and state_dict round trips, the layer kinds, what an optimizer built before freeze does, the torch
convention measured on nn.BatchNorm2d, and every refusal leaving the model as it was."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xnorm
from xnorm import batchnorm
from xnorm.errors import (
    AlreadyFrozenError,
    BackendDetectionError,
    NotFrozenError,
    OptionError,
    UnsupportedLayerError,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        )

    def forward(self, x):
        return self.head(self.backbone(x))


def _batches(count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(count)]


FIXED = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(99))


def pretrained_net():
    """A Net whose BatchNorms hold statistics and affine values far from their defaults, as after pretraining."""
    torch.manual_seed(0)
    net = Net()
    net.train()
    with torch.no_grad():
        for x, _ in _batches(3, seed=5):
            net(x * 2 + 1)
        for bn in (net.backbone[1], net.head[1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


class EvalModeBN(nn.Module):
    """The reference for a frozen BatchNorm, written with torch's eval-mode call directly."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def train_steps(model, batches, *, before_each=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    record = []
    for x, y in batches:
        model.train()  # what every training loop does, and what undoes bn.eval()
        if before_each:
            before_each(model)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        with torch.no_grad():
            in_training = model.backbone(FIXED).clone()
            in_eval = model.backbone.eval()(FIXED).clone()  # what inference sees
        record.append((loss.detach().clone(), (in_training, in_eval), copy.deepcopy(model.head.state_dict())))
    return record


def snapshot(model):
    """Everything a refused call must leave alone: tensors, requires_grad, modes, hooks, instance overrides."""
    tensors = {
        key: value if isinstance(value, nn.parameter.UninitializedTensorMixin) else value.clone()
        for key, value in model.state_dict().items()
    }
    flags = [(name, p.requires_grad) for name, p in model.named_parameters()]
    modules = [
        (name, type(m), m.training, "train" in m.__dict__, len(m._forward_pre_hooks), getattr(m, "momentum", None))
        for name, m in model.named_modules()
    ]
    return tensors, flags, modules


def assert_unchanged(model, before):
    tensors, flags, modules = snapshot(model)
    assert tensors.keys() == before[0].keys()
    for key, value in tensors.items():
        if isinstance(value, nn.parameter.UninitializedTensorMixin):
            assert value is before[0][key], key
        else:
            assert torch.equal(value, before[0][key]), key
    assert flags == before[1]
    assert modules == before[2]


def bn_state(bn):
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def assert_same_state(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# -- the fine-tuning scenario --------------------------------------------------------------------------
def test_fine_tuning_frozen_backbone_matches_the_eval_mode_reference():
    model = pretrained_net()
    reference = copy.deepcopy(model)
    reference.backbone[1] = EvalModeBN(reference.backbone[1])
    reference.backbone.requires_grad_(False)
    model.backbone[0].requires_grad_(False)  # the user freezes the conv; xnorm.freeze(affine=True) does BN's affine

    stats_before = bn_state(model.backbone[1])
    affine_before = (model.backbone[1].weight.clone(), model.backbone[1].bias.clone())
    assert xnorm.freeze(model, layers=r"^backbone\.") is model
    assert not model.backbone[1].weight.requires_grad and not model.backbone[1].bias.requires_grad
    assert xnorm.is_frozen(model) and xnorm.is_frozen(model.backbone[1]) and not xnorm.is_frozen(model.head)

    batches = _batches(5)
    ours, theirs = train_steps(model, batches), train_steps(reference, batches)

    assert_same_state(bn_state(model.backbone[1]), stats_before)  # bit-identical, counter included
    assert torch.equal(model.backbone[1].weight, affine_before[0])
    assert torch.equal(model.backbone[1].bias, affine_before[1])
    first_output = ours[0][1][0]
    for (loss, outs, head), (ref_loss, ref_outs, ref_head) in zip(ours, theirs, strict=True):
        for out, ref_out in zip(outs, ref_outs, strict=True):
            assert torch.equal(out, first_output)  # the frozen branch answers the same every step, in both modes
            assert torch.equal(out, ref_out)
        assert torch.equal(loss, ref_loss)
        assert head.keys() == ref_head.keys()
        for key in head:
            assert torch.equal(head[key], ref_head[key]), key
    # The head did train, in training mode: its parameters and statistics moved.
    assert not torch.equal(ours[-1][2]["5.weight"], ours[0][2]["5.weight"])
    assert int(model.head[1].num_batches_tracked) == int(pretrained_net().head[1].num_batches_tracked) + 5


def test_without_freeze_bn_eval_is_undone_by_train_and_the_statistics_drift():
    """The trap itself: requires_grad_(False) and bn.eval() before the loop, model.train() inside it."""
    model = pretrained_net()
    model.backbone.requires_grad_(False)
    model.backbone[1].eval()
    stats_before = bn_state(model.backbone[1])
    record = train_steps(model, _batches(5))
    after = bn_state(model.backbone[1])
    assert not torch.equal(after[0], stats_before[0]) and not torch.equal(after[1], stats_before[1])
    assert int(after[2]) == int(stats_before[2]) + 10  # each step and each probe on FIXED, in training mode
    assert not torch.equal(record[0][1][1], record[-1][1][1])  # inference output drifts step to step


def test_unfreeze_brings_back_the_normal_behaviour():
    model = pretrained_net()
    bn = model.backbone[1]
    bn.bias.requires_grad_(False)  # a setting of the user's own, to be restored as it was
    xnorm.freeze(model, layers=(nn.BatchNorm2d,))
    train_steps(model, _batches(2))
    model.train()  # asked for while frozen: the mode unfreeze gives back
    assert bn.training is False
    assert xnorm.unfreeze(model) is model
    assert not xnorm.is_frozen(model)
    assert bn.training is True  # the mode the model asked for
    assert bn.weight.requires_grad is True and bn.bias.requires_grad is False
    assert bn.momentum == 0.3
    assert "train" not in bn.__dict__ and len(bn._forward_pre_hooks) == 0

    # Now it is a plain BatchNorm2d again: one training-mode call moves it as a fresh one does.
    plain = nn.BatchNorm2d(4, momentum=0.3)
    plain.load_state_dict(bn.state_dict())
    plain.train()
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(bn(x), plain(x))
    assert_same_state(bn_state(bn), bn_state(plain))
    assert int(bn.num_batches_tracked) == int(pretrained_net().backbone[1].num_batches_tracked) + 1


def test_unfreeze_restores_eval_mode_when_no_train_call_happened():
    bn = nn.BatchNorm1d(3).eval()
    xnorm.freeze(bn)
    xnorm.unfreeze(bn)
    assert bn.training is False and bn.weight.requires_grad and bn.bias.requires_grad


def test_affine_false_freezes_only_the_statistics():
    model = pretrained_net()
    xnorm.freeze(model, affine=False)
    assert all(p.requires_grad for p in model.parameters())
    stats = bn_state(model.head[1])
    train_steps(model, _batches(1))
    assert_same_state(bn_state(model.head[1]), stats)


# -- what survives -----------------------------------------------------------------------------------
def _eval_output(bn, x):
    twin = copy.deepcopy(bn)
    for key in ("train", "_xnorm_frozen"):
        twin.__dict__.pop(key, None)
    twin._forward_pre_hooks.clear()
    return twin.eval()(x)


def test_train_eval_and_direct_assignment_keep_it_frozen():
    bn = pretrained_net().backbone[1]
    xnorm.freeze(bn)
    x = torch.randn(8, 4, 5, 5)
    expected = _eval_output(bn, x)
    stats = bn_state(bn)
    switches = (lambda: bn.train(), lambda: bn.eval(), lambda: bn.train(True), lambda: setattr(bn, "training", True))
    for switch in switches:
        switch()
        assert torch.equal(bn(x), expected)
        assert_same_state(bn_state(bn), stats)
    xnorm.unfreeze(bn)
    assert bn.training is True  # the direct assignment counts as the requested mode
    with pytest.raises(ValueError, match="boolean"):
        xnorm.freeze(bn).train("yes")


def test_deepcopy_and_pickle_give_independent_frozen_copies():
    model = pretrained_net()
    xnorm.freeze(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        bn = clone.backbone[1]
        assert xnorm.is_frozen(clone) and bn.train.args[0] is bn  # bound to the copy, not the original
        stats = bn_state(bn)
        train_steps(clone, _batches(1))
        assert_same_state(bn_state(bn), stats)
        xnorm.unfreeze(clone.train())
        assert bn.training and bn.weight.requires_grad
        assert model.backbone[1].training is False and not model.backbone[1].weight.requires_grad
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert xnorm.is_frozen(loaded) and loaded.train().backbone[1].training is False


def test_state_dict_round_trips_with_strict_true_both_ways():
    frozen, plain = pretrained_net(), pretrained_net()
    xnorm.freeze(frozen)
    assert list(frozen.state_dict()) == list(plain.state_dict())
    assert "backbone.1.num_batches_tracked" in frozen.state_dict()
    train_steps(frozen, _batches(2))
    assert int(frozen.backbone[1].num_batches_tracked) == int(plain.backbone[1].num_batches_tracked)

    other = Net()  # a normal checkpoint with other values
    frozen.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(frozen.backbone[1].running_var, other.backbone[1].running_var)
    assert xnorm.is_frozen(frozen) and frozen.train().backbone[1].training is False
    plain.load_state_dict(frozen.state_dict(), strict=True)
    for key, value in frozen.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)


def test_torch_compile_follows_freeze_before_and_after_compiling():
    """backend="aot_eager" (CPU, no inductor build): the graph dynamo traces is the one checked."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    # Frozen, then compiled, called in training mode.
    model = pretrained_net()
    xnorm.freeze(model)
    expected = copy.deepcopy(model)(x)  # eager frozen output
    compiled = torch.compile(model, backend="aot_eager")
    compiled.train()
    stats = bn_state(model.backbone[1])
    torch.testing.assert_close(compiled(x), expected)
    assert_same_state(bn_state(model.backbone[1]), stats)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # compiled, in one graph

    # Compiled and run in training mode first, then frozen: the training-mode graph is not reused.
    model = pretrained_net()
    compiled = torch.compile(model, backend="aot_eager")
    compiled.train()
    compiled(x)
    xnorm.freeze(model)
    compiled.train()
    stats = bn_state(model.head[1])
    compiled(x)
    assert_same_state(bn_state(model.head[1]), stats)
    # (dynamo may reuse the first model's frozen graph here: its guards are on the modules' flags, not their ids)
    assert not counters["graph_break"]
    xnorm.unfreeze(model)
    compiled(x)
    assert int(model.head[1].num_batches_tracked) == int(stats[2]) + 1


# -- layer kinds -----------------------------------------------------------------------------------
def _materialized_lazy():
    layer = nn.LazyBatchNorm2d()
    layer(torch.randn(4, 3, 5, 5))
    return layer


KINDS = {
    "batchnorm1d": (lambda: nn.BatchNorm1d(3), (6, 3, 4)),
    "batchnorm3d": (lambda: nn.BatchNorm3d(3), (2, 3, 2, 3, 3)),
    "syncbatchnorm": (lambda: nn.SyncBatchNorm(3), (4, 3, 5, 5)),
    "lazy-materialized": (_materialized_lazy, (4, 3, 5, 5)),
    "instancenorm-with-stats": (lambda: nn.InstanceNorm2d(3, track_running_stats=True, affine=True), (4, 3, 5, 5)),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_layer_with_running_statistics_freezes(kind):
    make, shape = KINDS[kind]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Identity(), layer)
    xnorm.freeze(model)
    model.train()
    x = torch.randn(shape)
    stats = (layer.running_mean.clone(), layer.running_var.clone())
    out = model(x)
    assert torch.equal(layer.running_mean, stats[0]) and torch.equal(layer.running_var, stats[1])
    assert torch.equal(out, _eval_output(layer, x))
    # and the float64 reference of the eval-mode formula (InstanceNorm with running stats computes it too)
    weight = layer.weight.detach().numpy() if layer.weight is not None else None
    bias = layer.bias.detach().numpy() if layer.bias is not None else None
    reference = batchnorm.eval_batchnorm(x.numpy(), stats[0].numpy(), stats[1].numpy(), weight, bias, layer.eps)
    np.testing.assert_allclose(out.detach().numpy(), reference, rtol=1e-5, atol=1e-5)


class FrozenBatchNorm2d(nn.Module):
    """Stands in for torchvision.ops.misc.FrozenBatchNorm2d (not installed here): four buffers."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


def test_torchvision_frozen_batchnorm_counts_as_frozen_and_is_left_alone():
    fixed = FrozenBatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), fixed)
    assert xnorm.is_frozen(model) and xnorm.is_frozen(fixed)
    before = snapshot(model)
    with pytest.raises(AlreadyFrozenError, match="FrozenBatchNorm2d"):
        xnorm.freeze(model)
    assert_unchanged(model, before)
    with pytest.raises(NotFrozenError, match="FrozenBatchNorm2d .*replace it"):
        xnorm.unfreeze(model)
    assert_unchanged(model, before)
    mixed = nn.Sequential(FrozenBatchNorm2d(4), nn.BatchNorm2d(4))
    xnorm.freeze(mixed)
    assert "train" in mixed[1].__dict__ and "train" not in mixed[0].__dict__


def test_part_frozen_model_freezes_the_rest():
    model = pretrained_net()
    xnorm.freeze(model, layers="backbone")
    xnorm.freeze(model)
    assert "train" in model.head[1].__dict__
    xnorm.unfreeze(model)
    assert not xnorm.is_frozen(model)


def test_predicate_selection():
    model = pretrained_net()
    xnorm.freeze(model, layers=lambda name, layer: name.startswith("head"))
    assert xnorm.is_frozen(model.head) and not xnorm.is_frozen(model.backbone)


# -- the optimizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_an_optimizer_built_before_freeze(optimizer, set_to_none):
    """docs/freeze.md: with the default zero_grad(set_to_none=True) the frozen weight's grad stays None and
    SGD/AdamW skip it; zeroed-but-kept grads let momentum and weight decay keep moving it."""
    model = pretrained_net()
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    )
    x, y = _batches(1)[0]
    F.mse_loss(model(x), y).backward()
    opt.step()  # momentum / Adam moments now exist for the BN weight
    xnorm.freeze(model)
    weight = model.backbone[1].weight.detach().clone()
    opt.zero_grad(set_to_none=set_to_none)
    F.mse_loss(model.train()(x), y).backward()
    opt.step()
    moved = not torch.equal(model.backbone[1].weight, weight)
    assert moved is (not set_to_none)


# -- the torch convention, measured ------------------------------------------------------------------
def test_torch_batchnorm_update_is_the_documented_convention():
    bn = nn.BatchNorm2d(3, momentum=0.3, eps=1e-3).double()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    mean0, var0 = bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()
    x = torch.randn(5, 3, 2, 3, generator=gen, dtype=torch.float64) * 2 + 1
    y = bn.train()(x)
    expected_y, expected_mean, expected_var = batchnorm.batchnorm_training_step(
        "torch", x.numpy(), mean0, var0, momentum=0.3, eps=1e-3,
        weight=bn.weight.detach().numpy(), bias=bn.bias.detach().numpy(),
    )
    np.testing.assert_allclose(bn.running_mean.numpy(), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), expected_var, rtol=1e-12)
    np.testing.assert_allclose(y.detach().numpy(), expected_y, rtol=1e-10, atol=1e-12)
    # The eval-mode output is the formula the frozen layer computes.
    np.testing.assert_allclose(
        bn.eval()(x).detach().numpy(),
        batchnorm.eval_batchnorm(x.numpy(), expected_mean, expected_var, bn.weight.detach().numpy(),
                                 bn.bias.detach().numpy(), 1e-3),
        rtol=1e-10, atol=1e-12,
    )


# -- refusals ----------------------------------------------------------------------------------------
def _refusal_cases():
    def with_layernorm():
        return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(2, 4))

    def no_stats_plus_one():
        return nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))

    return {
        "nothing to freeze": (lambda: nn.Sequential(nn.Linear(3, 3), nn.ReLU()), {}, UnsupportedLayerError,
                              "no normalization layer with running statistics"),
        "only layernorm": (with_layernorm, {}, UnsupportedLayerError, "LayerNorm '1' has no running statistics"),
        "layernorm type selected": (with_layernorm, {"layers": (nn.LayerNorm,)}, UnsupportedLayerError,
                                    "no running statistics"),
        "groupnorm by predicate": (with_layernorm, {"layers": lambda n, m: isinstance(m, nn.GroupNorm)},
                                   UnsupportedLayerError, "GroupNorm '2' has no running statistics"),
        "track_running_stats=False": (no_stats_plus_one, {}, UnsupportedLayerError, "track_running_stats=False"),
        "lazy not materialized": (lambda: nn.Sequential(nn.LazyBatchNorm2d()), {}, UnsupportedLayerError,
                                  "not materialized"),
        "pattern selects none": (pretrained_net, {"layers": r"^decoder\."}, OptionError,
                                 r"selects no layer in Net; its normalization layers are BatchNorm2d 'backbone.1'"),
        "type not a norm": (pretrained_net, {"layers": (nn.Conv2d,)}, OptionError, "not a normalization layer"),
        "empty tuple": (pretrained_net, {"layers": ()}, OptionError, "at least one"),
        "tuple of strings": (pretrained_net, {"layers": ("bn",)}, OptionError, "layer classes"),
        "bad regex": (pretrained_net, {"layers": "("}, OptionError, "not a valid regular expression"),
        "bad layers type": (pretrained_net, {"layers": 42}, OptionError, "layers= takes None"),
        "affine not bool": (pretrained_net, {"affine": "yes"}, OptionError, "affine must be True or False"),
    }


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_freeze_refusals_change_nothing(case):
    make, kwargs, error, match = _refusal_cases()[case]
    model = make()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        xnorm.freeze(model, **kwargs)
    assert_unchanged(model, before)
    assert not xnorm.is_frozen(model)


def test_freezing_twice_and_unfreezing_what_is_not_frozen_change_nothing():
    model = pretrained_net()
    with pytest.raises(NotFrozenError, match="nothing in Net was frozen by xnorm.freeze"):
        xnorm.unfreeze(model)
    xnorm.freeze(model, affine=False)
    model.train()
    before = snapshot(model)
    with pytest.raises(AlreadyFrozenError, match="call xnorm.unfreeze"):
        xnorm.freeze(model)
    assert_unchanged(model, before)
    with pytest.raises(AlreadyFrozenError):
        xnorm.freeze(model.head[1])
    assert_unchanged(model, before)
    xnorm.unfreeze(model)
    before = snapshot(model)
    with pytest.raises(NotFrozenError):
        xnorm.unfreeze(model)
    assert_unchanged(model, before)


def test_not_a_module():
    with pytest.raises(BackendDetectionError):
        xnorm.freeze([1.0], backend="torch")
    assert xnorm.is_frozen(object()) is False


def test_the_docs_examples_run():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "freeze.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    # the torch example and the framework-free one; the MindSpore and Flax blocks run in their environments
    blocks = [code for code in blocks if not re.search(r"^(import|from) (mindspore|flax|jax|optax)\b", code, re.M)]
    assert len(blocks) == 2
    for number, code in enumerate(blocks):
        exec(compile(code, f"docs/freeze.md (python block {number})", "exec"), {})
