"""xnorm.freeze / unfreeze / is_frozen in MindSpore: the fine-tuning scenario of issue 17 against a model built
with MindSpore's own ``use_batch_statistics=False`` and against the float64 eval-mode formula, the drift without
freeze, graphs compiled before freeze and unfreeze (a TrainOneStepCell around the model, a mindspore.jit
function), set_train, deepcopy and checkpoint round trips, what an optimizer built before freeze does, the
MindSpore BatchNorm convention measured in GRAPH_MODE and PYNATIVE_MODE, and every refusal leaving the model as
it was. GRAPH_MODE compiles cost seconds: each GRAPH test compiles a handful of graphs and reuses them."""

import copy

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import xnorm
from xnorm import batchnorm
from xnorm.errors import (
    AlreadyFrozenError,
    BackendDetectionError,
    NotFrozenError,
    OptionError,
    UnsupportedLayerError,
)

MODES = pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])


class Net(nn.Cell):
    """A backbone (conv, BatchNorm, ReLU) and a head that trains. ``native_frozen`` builds the backbone's
    BatchNorm the MindSpore way, ``use_batch_statistics=False``: the reference for a frozen one."""

    def __init__(self, native_frozen=False):
        super().__init__()
        bn = nn.BatchNorm2d(4, momentum=0.7, use_batch_statistics=False if native_frozen else None)
        self.backbone = nn.SequentialCell([nn.Conv2d(3, 4, 3, has_bias=True), bn, nn.ReLU()])
        self.head = nn.SequentialCell(
            [nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dense(4 * 6 * 6, 2)]
        )

    def construct(self, x):
        return self.head(self.backbone(x))


def _array(rng, shape, low=None, high=None):
    values = rng.uniform(low, high, shape) if low is not None else rng.standard_normal(shape)
    return values.astype(np.float32)


def pretrained_net(native_frozen=False):
    """A Net whose every parameter comes from one seed, its BatchNorms holding statistics and affine values
    far from their defaults, as after pretraining."""
    net = Net(native_frozen)
    rng = np.random.default_rng(0)
    for key, param in net.parameters_and_names():
        shape = param.shape
        if key.endswith("moving_variance"):
            value = _array(rng, shape, 0.5, 2.0)
        elif key.endswith("gamma"):
            value = _array(rng, shape, 0.5, 1.5)
        elif key.endswith(("moving_mean", "beta")):
            value = _array(rng, shape, -0.5, 0.5)
        else:
            value = _array(rng, shape) * 0.3
        param.set_data(Tensor(value))
    return net


def _batches(count, seed=1):
    rng = np.random.default_rng(seed)
    return [(Tensor(_array(rng, (8, 3, 6, 6)) * 2 + 1), Tensor(_array(rng, (8, 2)))) for _ in range(count)]


FIXED = Tensor(_array(np.random.default_rng(99), (4, 3, 6, 6)))


def values(cell):
    return {key: param.asnumpy().copy() for key, param in cell.parameters_and_names()}


def bn_state(bn):
    return bn.moving_mean.asnumpy().copy(), bn.moving_variance.asnumpy().copy()


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def train_steps(net, batches, *, before_each=None):
    """SGD with momentum and weight decay over what trains, in a TrainOneStepCell (one compiled graph in
    GRAPH_MODE); after each step the backbone's output on FIXED in training mode and in eval mode."""
    opt = nn.SGD(net.trainable_params(), 0.05, momentum=0.9, weight_decay=1e-3)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), opt)
    record = []
    for x, y in batches:
        step.set_train(True)  # what every training loop does, and what undoes bn.set_train(False)
        if before_each:
            before_each(net)
        loss = step(x, y).asnumpy().copy()
        in_training = net.backbone(FIXED).asnumpy().copy()
        net.backbone.set_train(False)
        in_eval = net.backbone(FIXED).asnumpy().copy()  # what inference sees
        record.append((loss, (in_training, in_eval), values(net.head)))
    return record


# -- the fine-tuning scenario ------------------------------------------------------------------------
@MODES
def test_fine_tuning_frozen_backbone_matches_the_native_reference(mode):
    ms.set_context(mode=mode)
    net, reference = pretrained_net(), pretrained_net(native_frozen=True)
    net.backbone[0].weight.requires_grad = False  # the user freezes the conv; xnorm.freeze(affine=True) does BN's
    net.backbone[0].bias.requires_grad = False
    for param in reference.backbone.get_parameters():
        param.requires_grad = False
    bn = net.backbone[1]
    stats_before, affine_before = bn_state(bn), (bn.gamma.asnumpy().copy(), bn.beta.asnumpy().copy())
    head_before = values(net.head)

    assert xnorm.freeze(net, layers=r"^backbone\.") is net
    assert not bn.gamma.requires_grad and not bn.beta.requires_grad
    assert xnorm.is_frozen(net) and xnorm.is_frozen(bn) and not xnorm.is_frozen(net.head)
    assert [p.name for p in net.trainable_params()] == [p.name for p in reference.trainable_params()]

    batches = _batches(5)
    ours, theirs = train_steps(net, batches), train_steps(reference, batches)

    assert_same(bn_state(bn), stats_before)  # bit-identical after five training steps and ten probes
    assert_same((bn.gamma.asnumpy(), bn.beta.asnumpy()), affine_before)
    first_output = ours[0][1][0]
    for (loss, outs, head), (ref_loss, ref_outs, ref_head) in zip(ours, theirs, strict=True):
        for out, ref_out in zip(outs, ref_outs, strict=True):
            np.testing.assert_array_equal(out, first_output)  # the same answer every step, in both modes
            np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(loss, ref_loss)
        assert head.keys() == ref_head.keys()
        for key in head:
            np.testing.assert_array_equal(head[key], ref_head[key], err_msg=key)
    # The head did train, in training mode: its parameters and statistics moved.
    assert not np.array_equal(ours[-1][2]["4.weight"], head_before["4.weight"])
    assert not np.array_equal(net.head[1].moving_mean.asnumpy(), head_before["1.moving_mean"])


@MODES
def test_without_freeze_set_train_false_is_undone_and_the_statistics_drift(mode):
    """The trap itself: requires_grad=False and bn.set_train(False) before the loop, set_train(True) in it."""
    ms.set_context(mode=mode)
    net = pretrained_net()
    for param in net.backbone.get_parameters():
        param.requires_grad = False
    net.backbone[1].set_train(False)
    stats_before = bn_state(net.backbone[1])
    record = train_steps(net, _batches(3))
    after = bn_state(net.backbone[1])
    assert not np.array_equal(after[0], stats_before[0]) and not np.array_equal(after[1], stats_before[1])
    assert not np.array_equal(record[0][1][1], record[-1][1][1])  # the inference output drifts step to step


# -- compiled graphs ---------------------------------------------------------------------------------
@MODES
def test_graphs_compiled_before_freeze_and_unfreeze_are_not_reused(mode):
    """A TrainOneStepCell around the model and a mindspore.jit function calling it, both compiled and run in
    training mode, then ``freeze(net.backbone)``: neither is reachable from the frozen Cell, and neither may
    go on updating its statistics. After ``unfreeze`` they must update them again, by MindSpore's own rule."""
    ms.set_context(mode=mode)
    net = pretrained_net()
    bn = net.backbone[1]
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.SGD(net.trainable_params(), 0.01))
    step.set_train(True)

    @ms.jit
    def forward(x):
        return net(x)

    x, y = _batches(1)[0]
    for run in (lambda: step(x, y), lambda: forward(x)):
        before = bn_state(bn)
        run()
        assert not np.array_equal(bn_state(bn)[0], before[0])  # compiled in training mode: it updates

    xnorm.freeze(net.backbone)
    frozen = bn_state(bn)
    for run in (lambda: step(x, y), lambda: forward(x), lambda: net(x)):
        run()
        assert_same(bn_state(bn), frozen)

    xnorm.unfreeze(net.backbone)
    assert bn.training  # set_train(True) reached it while frozen
    for run in (lambda: forward(x), lambda: step(x, y)):
        mean, var = bn_state(bn)
        conv = net.backbone[0](x).asnumpy()  # what the BatchNorm sees (the conv is not trained by forward)
        run()
        _, expected_mean, expected_var = batchnorm.batchnorm_training_step(
            "mindspore", conv, mean, var, momentum=0.7
        )
        np.testing.assert_allclose(bn_state(bn)[0], expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn_state(bn)[1], expected_var, rtol=1e-5, atol=1e-6)


def test_freeze_after_compiling_the_layer_itself_recompiles_it():
    """The Cell given to freeze was compiled in training mode: its own graph is rebuilt too."""
    ms.set_context(mode=ms.GRAPH_MODE)
    bn = nn.BatchNorm1d(3)
    bn.set_train(True)
    x = Tensor(_array(np.random.default_rng(2), (6, 3)))
    bn(x)
    xnorm.freeze(bn)
    stats = bn_state(bn)
    out = bn(x).asnumpy()
    assert_same(bn_state(bn), stats)
    reference = batchnorm.eval_batchnorm(x.asnumpy(), *stats, bn.gamma.asnumpy(), bn.beta.asnumpy(), bn.eps)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)


# -- what a frozen layer computes ------------------------------------------------------------------
KINDS = {
    "batchnorm1d-2d-input": (lambda: nn.BatchNorm1d(3, momentum=0.8), (6, 3)),
    "batchnorm1d-3d-input": (lambda: nn.BatchNorm1d(3), (6, 3, 4)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3, eps=1e-3), (4, 3, 5, 5)),
    "batchnorm3d": (lambda: nn.BatchNorm3d(3), (2, 3, 2, 3, 3)),
}


def _fill(bn, seed=0):
    owner = bn.bn2d if isinstance(bn, nn.BatchNorm3d) else bn
    rng = np.random.default_rng(seed)
    owner.moving_mean.set_data(Tensor(_array(rng, (3,), -1, 1)))
    owner.moving_variance.set_data(Tensor(_array(rng, (3,), 0.5, 2.0)))
    owner.gamma.set_data(Tensor(_array(rng, (3,), 0.5, 1.5)))
    owner.beta.set_data(Tensor(_array(rng, (3,), -0.5, 0.5)))
    return owner


@MODES
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_batchnorm_kind_freezes_to_the_eval_formula(mode, kind):
    ms.set_context(mode=mode)
    make, shape = KINDS[kind]
    layer, twin = make(), make()
    owner = _fill(layer)
    _fill(twin)
    model = nn.SequentialCell([nn.Identity(), layer])
    xnorm.freeze(model)
    assert xnorm.is_frozen(model) and xnorm.is_frozen(layer)
    model.set_train(True)
    x = Tensor(_array(np.random.default_rng(3), shape) * 2 + 1)
    stats = bn_state(owner)
    out = model(x).asnumpy()
    assert_same(bn_state(owner), stats)
    reference = batchnorm.eval_batchnorm(
        x.asnumpy(), *stats, owner.gamma.asnumpy(), owner.beta.asnumpy(), owner.eps
    )
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    twin.set_train(False)  # MindSpore's own eval mode, on a plain layer
    np.testing.assert_array_equal(out, twin(x).asnumpy())


def test_set_train_never_unfreezes_and_affine_false_keeps_the_affine_training():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    bn = nn.BatchNorm2d(3)
    owner = _fill(bn)
    xnorm.freeze(bn, affine=False)
    assert bn.gamma.requires_grad and bn.beta.requires_grad
    x = Tensor(_array(np.random.default_rng(4), (4, 3, 2, 2)))
    stats = bn_state(owner)
    outputs = []
    for mode in (True, False, True):
        bn.set_train(mode)
        outputs.append(bn(x).asnumpy())
        assert_same(bn_state(bn), stats)
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])


def test_unfreeze_restores_the_previous_behaviour_exactly():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    forced = nn.BatchNorm2d(3, use_batch_statistics=True)  # a setting of the user's own
    plain = nn.BatchNorm2d(3, momentum=0.6)
    plain.beta.requires_grad = False  # also the user's own
    model = nn.SequentialCell([forced, plain])
    model.set_train(False)
    xnorm.freeze(model)
    assert forced.use_batch_statistics is False and plain.use_batch_statistics is False
    model.set_train(True)  # asked for while frozen: the mode unfreeze leaves
    assert xnorm.unfreeze(model) is model
    assert not xnorm.is_frozen(model) and "_xnorm_frozen" not in plain.__dict__
    assert forced.use_batch_statistics is True and plain.use_batch_statistics is None
    assert plain.training and plain.gamma.requires_grad and not plain.beta.requires_grad
    assert forced.gamma.requires_grad and forced.beta.requires_grad

    # A plain BatchNorm2d again: one training-mode call moves its statistics by MindSpore's rule.
    x = Tensor(_array(np.random.default_rng(5), (4, 3, 3, 3)))
    mean, var = bn_state(plain)
    plain(x)
    _, expected_mean, expected_var = batchnorm.batchnorm_training_step(
        "mindspore", x.asnumpy(), mean, var, momentum=0.6
    )
    np.testing.assert_allclose(bn_state(plain)[0], expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn_state(plain)[1], expected_var, rtol=1e-5, atol=1e-6)


def test_part_frozen_model_freezes_the_rest_and_selection_forms():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = pretrained_net()
    xnorm.freeze(net, layers="backbone")
    assert xnorm.is_frozen(net.backbone) and not xnorm.is_frozen(net.head)
    xnorm.freeze(net)  # the already frozen backbone is skipped
    assert net.head[1].use_batch_statistics is False
    xnorm.unfreeze(net)
    assert not xnorm.is_frozen(net)
    xnorm.freeze(net, layers=lambda name, cell: name.startswith("head"))
    assert xnorm.is_frozen(net.head) and not xnorm.is_frozen(net.backbone)
    xnorm.unfreeze(net)
    xnorm.freeze(net, layers=nn.BatchNorm2d)
    assert xnorm.is_frozen(net.head) and xnorm.is_frozen(net.backbone)
    bn3 = nn.SequentialCell([nn.BatchNorm3d(2), nn.BatchNorm2d(2)])
    xnorm.freeze(bn3, layers=(nn.BatchNorm3d,))
    assert xnorm.is_frozen(bn3[0]) and not xnorm.is_frozen(bn3[1])
    xnorm.unfreeze(bn3)
    # A BatchNorm3d runs a BatchNorm2d of its own (bn2d): that is its implementation, not a BatchNorm2d of
    # the model's, and predicates see the BatchNorm3d under its own name.
    xnorm.freeze(bn3, layers=(nn.BatchNorm2d,))
    assert xnorm.is_frozen(bn3[1]) and not xnorm.is_frozen(bn3[0])
    xnorm.unfreeze(bn3)
    seen = []
    xnorm.freeze(bn3, layers=lambda name, cell: seen.append((name, type(cell).__name__)) or name == "0")
    assert seen == [("0", "BatchNorm3d"), ("1", "BatchNorm2d")] and xnorm.is_frozen(bn3[0])


# -- copies and checkpoints ----------------------------------------------------------------------------
def test_deepcopy_gives_an_independent_frozen_copy():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = pretrained_net()
    xnorm.freeze(net)
    clone = copy.deepcopy(net)
    assert xnorm.is_frozen(clone) and clone.backbone[1] is not net.backbone[1]
    assert not clone.backbone[1].gamma.requires_grad
    stats = bn_state(clone.backbone[1])
    train_steps(clone, _batches(1))
    assert_same(bn_state(clone.backbone[1]), stats)
    xnorm.unfreeze(clone)
    assert clone.backbone[1].use_batch_statistics is None and clone.backbone[1].gamma.requires_grad
    assert net.backbone[1].use_batch_statistics is False and not net.backbone[1].gamma.requires_grad
    assert xnorm.is_frozen(net)


def test_checkpoints_round_trip_with_strict_loading_both_ways(tmp_path):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    frozen, plain = pretrained_net(), pretrained_net()
    xnorm.freeze(frozen)
    frozen_path, plain_path = str(tmp_path / "frozen.ckpt"), str(tmp_path / "plain.ckpt")
    ms.save_checkpoint(frozen, frozen_path)
    ms.save_checkpoint(plain, plain_path)
    frozen_ckpt, plain_ckpt = ms.load_checkpoint(frozen_path), ms.load_checkpoint(plain_path)
    assert list(frozen_ckpt) == list(plain_ckpt)
    assert "backbone.1.moving_mean" in frozen_ckpt and "backbone.1.gamma" in frozen_ckpt
    for key in frozen_ckpt:
        np.testing.assert_array_equal(frozen_ckpt[key].asnumpy(), plain_ckpt[key].asnumpy(), err_msg=key)

    other = Net()  # a normal checkpoint with other values
    other_path = str(tmp_path / "other.ckpt")
    ms.save_checkpoint(other, other_path)
    not_loaded = ms.load_param_into_net(frozen, ms.load_checkpoint(other_path), strict_load=True)
    assert not_loaded == ([], [])
    np.testing.assert_array_equal(
        frozen.backbone[1].moving_variance.asnumpy(), other.backbone[1].moving_variance.asnumpy()
    )
    assert xnorm.is_frozen(frozen) and not frozen.backbone[1].gamma.requires_grad
    stats = bn_state(frozen.backbone[1])
    train_steps(frozen, _batches(1))
    assert_same(bn_state(frozen.backbone[1]), stats)  # still frozen after loading

    not_loaded = ms.load_param_into_net(plain, ms.load_checkpoint(frozen_path), strict_load=True)
    assert not_loaded == ([], [])
    assert not xnorm.is_frozen(plain) and plain.backbone[1].gamma.requires_grad
    for key, value in values(plain).items():
        np.testing.assert_array_equal(value, frozen_ckpt[key].asnumpy(), err_msg=key)


# -- the optimizer -------------------------------------------------------------------------------------
def _sgd_step(net, momentum):
    opt = nn.SGD(net.trainable_params(), 0.1, momentum=momentum)
    return nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), opt)


@MODES
def test_an_optimizer_built_before_freeze(mode):
    """What docs/freeze.md says (measured on MindSpore 2.10, CPU): gamma and beta stay in an optimizer built
    before freeze. In GRAPH_MODE the gradient over ``optimizer.parameters`` ignores requires_grad=False and
    they keep training; in PYNATIVE their gradient is zero, so plain SGD leaves them, but momentum from
    earlier steps moves them. An optimizer built after freeze over ``net.trainable_params()`` never holds
    them."""
    ms.set_context(mode=mode)
    x, y = _batches(1)[0]
    moved = {}
    for case in ("sgd", "sgd-momentum", "built-after-freeze"):
        net = pretrained_net()
        momentum = 0.9 if case == "sgd-momentum" else 0.0
        step = None if case == "built-after-freeze" else _sgd_step(net, momentum)
        if case == "sgd-momentum":
            step.set_train(True)
            step(x, y)  # a momentum buffer exists for gamma and beta
        xnorm.freeze(net)
        if step is None:
            step = _sgd_step(net, momentum)
        affine = (net.backbone[1].gamma.asnumpy().copy(), net.backbone[1].beta.asnumpy().copy())
        step.set_train(True)
        step(x, y)
        moved[case] = not np.array_equal(net.backbone[1].gamma.asnumpy(), affine[0]) and not np.array_equal(
            net.backbone[1].beta.asnumpy(), affine[1]
        )
    graph = mode == ms.GRAPH_MODE
    assert moved == {"sgd": graph, "sgd-momentum": True, "built-after-freeze": False}


# -- the MindSpore convention, measured ----------------------------------------------------------------
@MODES
def test_mindspore_batchnorm_update_is_the_documented_convention(mode):
    """One training-mode step of nn.BatchNorm2d against xnorm.batchnorm's MindSpore convention (momentum
    weighs the old value, running variance updated with the unbiased batch variance), and against the two
    other readings, which must not fit: the measurement can tell them apart."""
    ms.set_context(mode=mode)
    bn = nn.BatchNorm2d(3, momentum=0.7, eps=1e-3)
    _fill(bn, seed=11)
    mean0, var0 = bn_state(bn)
    gamma, beta = bn.gamma.asnumpy().copy(), bn.beta.asnumpy().copy()
    x = _array(np.random.default_rng(12), (5, 3, 2, 3)) * 2 + 1  # 30 values a channel: n/(n-1) = 1.034
    bn.set_train(True)
    y = bn(Tensor(x)).asnumpy()
    expected_y, expected_mean, expected_var = batchnorm.batchnorm_training_step(
        "mindspore", x, mean0, var0, momentum=0.7, eps=1e-3, weight=gamma, bias=beta
    )
    assert batchnorm.CONVENTIONS["mindspore"].momentum_weighs == "old"
    assert batchnorm.CONVENTIONS["mindspore"].running_var == "unbiased"
    mean, var = bn_state(bn)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, expected_var, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, expected_y, rtol=1e-4, atol=1e-5)
    # The other readings are far outside that tolerance.
    _, flax_mean, flax_var = batchnorm.batchnorm_training_step(
        "flax", x, mean0, var0, momentum=0.7, channel_axis=1
    )
    _, torch_mean, _ = batchnorm.batchnorm_training_step("torch", x, mean0, var0, momentum=0.7)
    np.testing.assert_allclose(mean, flax_mean, rtol=1e-5, atol=1e-6)  # same momentum reading as Flax
    assert np.abs(var - flax_var).min() > 1e-3  # but not Flax's biased variance
    assert np.abs(mean - torch_mean).min() > 1e-3  # and not torch's reading of momentum
    # The eval-mode output from the updated statistics is the formula a frozen layer computes.
    bn.set_train(False)
    np.testing.assert_allclose(
        bn(Tensor(x)).asnumpy(),
        batchnorm.eval_batchnorm(x, mean, var, gamma, beta, 1e-3),
        rtol=1e-5, atol=1e-5,
    )
    plain = nn.BatchNorm2d(3)  # the defaults: MindSpore stores 1 - momentum for its primitive
    assert batchnorm.CONVENTIONS["mindspore"].default_momentum == 1.0 - plain.momentum
    assert batchnorm.CONVENTIONS["mindspore"].default_eps == plain.eps


# -- refusals ------------------------------------------------------------------------------------------
def snapshot(cell):
    """Everything a refused call must leave alone: parameter values and flags, every Cell's mode, switch,
    xnorm state and compile key (a refused call must not force a recompile either)."""
    params = [(key, p.requires_grad, p.asnumpy().copy()) for key, p in cell.parameters_and_names()]
    cells = [
        (key, type(c), c.training, getattr(c, "use_batch_statistics", "-"), "_xnorm_frozen" in c.__dict__,
         c.create_time)
        for key, c in cell.cells_and_names()
    ]
    return params, cells


def assert_unchanged(cell, before):
    params, cells = snapshot(cell)
    assert [p[:2] for p in params] == [p[:2] for p in before[0]]
    for (key, _, a), (_, _, b) in zip(params, before[0], strict=True):
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert cells == before[1]


def _refusal_cases():
    def with_layernorm():
        return nn.SequentialCell([nn.Dense(4, 4), nn.LayerNorm((4,)), nn.GroupNorm(2, 4)])

    def with_instancenorm():
        return nn.SequentialCell([nn.BatchNorm2d(4), nn.InstanceNorm2d(4)])

    def with_mint_batchnorm():
        from mindspore import mint

        return nn.SequentialCell([nn.BatchNorm2d(4), mint.nn.BatchNorm2d(4)])

    return {
        "nothing to freeze": (lambda: nn.SequentialCell([nn.Dense(3, 3), nn.ReLU()]), {}, UnsupportedLayerError,
                              "no normalization layer with running statistics"),
        "only layernorm": (with_layernorm, {}, UnsupportedLayerError, "LayerNorm '1' has no running statistics"),
        "layernorm type selected": (with_layernorm, {"layers": (nn.LayerNorm,)}, UnsupportedLayerError,
                                    "no running statistics.*leave its type out"),
        "groupnorm by predicate": (with_layernorm, {"layers": lambda n, c: isinstance(c, nn.GroupNorm)},
                                   UnsupportedLayerError, "GroupNorm '2' has no running statistics"),
        "instancenorm type selected": (with_instancenorm, {"layers": (nn.BatchNorm2d, nn.InstanceNorm2d)},
                                       UnsupportedLayerError, "InstanceNorm2d '1' has no running statistics"),
        "mint batchnorm inside": (with_mint_batchnorm, {}, UnsupportedLayerError, "mindspore.mint BatchNorm"),
        "pattern selects none": (pretrained_net, {"layers": r"^decoder\."}, OptionError,
                                 r"selects no layer in Net; its normalization layers are BatchNorm2d 'backbone.1'"),
        "type not a norm": (pretrained_net, {"layers": (nn.Conv2d,)}, OptionError, "not a normalization layer"),
        "empty tuple": (pretrained_net, {"layers": ()}, OptionError, "at least one"),
        "tuple of strings": (pretrained_net, {"layers": ("bn",)}, OptionError, "layer classes"),
        "bad regex": (pretrained_net, {"layers": "("}, OptionError, "not a valid regular expression"),
        "bad layers type": (pretrained_net, {"layers": 42}, OptionError, "layers= takes None"),
        "affine not bool": (pretrained_net, {"affine": "yes"}, OptionError, "affine must be True or False"),
        "affine an int": (pretrained_net, {"affine": 1}, OptionError, "affine must be True or False"),
    }


@pytest.mark.parametrize("case", list(_refusal_cases()))
def test_freeze_refusals_change_nothing(case):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    make, kwargs, error, match = _refusal_cases()[case]
    model = make()
    model.set_train(True)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        xnorm.freeze(model, **kwargs)
    assert_unchanged(model, before)
    assert not xnorm.is_frozen(model)


def test_freezing_twice_and_unfreezing_what_is_not_frozen_change_nothing():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = pretrained_net()
    with pytest.raises(NotFrozenError, match="nothing in Net was frozen by xnorm.freeze"):
        xnorm.unfreeze(net)
    xnorm.freeze(net, affine=False)
    net.set_train(True)
    before = snapshot(net)
    with pytest.raises(AlreadyFrozenError, match="call xnorm.unfreeze"):
        xnorm.freeze(net)
    assert_unchanged(net, before)
    with pytest.raises(AlreadyFrozenError):
        xnorm.freeze(net.head[1])
    assert_unchanged(net, before)
    bn3 = nn.BatchNorm3d(2)
    xnorm.freeze(bn3)
    with pytest.raises(AlreadyFrozenError, match="BatchNorm3d"):
        xnorm.freeze(bn3)
    xnorm.unfreeze(net)
    before = snapshot(net)
    with pytest.raises(NotFrozenError):
        xnorm.unfreeze(net)
    assert_unchanged(net, before)


def test_not_a_cell():
    with pytest.raises(BackendDetectionError):
        xnorm.freeze([1.0], backend="mindspore")
    with pytest.raises(BackendDetectionError):
        xnorm.unfreeze([1.0], backend="mindspore")
    assert xnorm.is_frozen(object()) is False
    backend = xnorm.registry.get_backend("mindspore")  # the backend's own guard, behind the registry's
    with pytest.raises(UnsupportedLayerError, match="takes a mindspore.nn.Cell"):
        backend.freeze([1.0], affine=True, layers=None)
    with pytest.raises(NotFrozenError, match="takes a mindspore.nn.Cell"):
        backend.unfreeze([1.0])
    assert backend.is_frozen([1.0]) is False


def test_the_docs_example_runs():
    """docs/freeze.md's MindSpore example (the python blocks that import mindspore)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "freeze.md").read_text()
    blocks = [code for code in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "import mindspore" in code]
    if not blocks:
        pytest.skip("docs/freeze.md has no MindSpore example yet")
    for number, code in enumerate(blocks):
        exec(compile(code, f"docs/freeze.md (MindSpore python block {number})", "exec"), {})


def test_xnorm_convert_works_on_frozen_models_both_ways():
    """A torch checkpoint loads strictly into a frozen MindSpore model and converts back into a frozen torch
    model, values unchanged; both stay frozen."""
    import torch

    ms.set_context(mode=ms.PYNATIVE_MODE)

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    source = TorchNet()
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(tensor.numel())))
    model = nn.SequentialCell([nn.Conv2d(3, 4, 3, pad_mode="valid", has_bias=True), nn.BatchNorm2d(4)])
    xnorm.freeze(model)
    converted = xnorm.convert({f"{'0' if k.startswith('conv') else '1'}.{k.split('.', 1)[1]}": v
                               for k, v in source.state_dict().items()}, to="mindspore", like=model, load=True)
    assert converted and xnorm.is_frozen(model)
    np.testing.assert_array_equal(model[1].gamma.asnumpy(), source.bn.weight.detach().numpy())
    np.testing.assert_array_equal(model[1].moving_variance.asnumpy(), source.bn.running_var.numpy())
    target = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    xnorm.freeze(target)
    xnorm.convert(model, to="torch", like=target, load=True)
    assert xnorm.is_frozen(target)
    np.testing.assert_array_equal(target[1].running_mean.numpy(), source.bn.running_mean.numpy())
    np.testing.assert_array_equal(target[0].weight.detach().numpy(), source.conv.weight.detach().numpy())


def test_freeze_survives_mindspores_recycle_tripping_over_its_own_cache(monkeypatch):
    """MindSpore 2.10's ms_memory_recycle can raise "dictionary changed size during iteration" when clearing a
    graph frees a Cell whose destructor drops its cache entry (seen in a full test run): freeze and unfreeze
    call it again, and any other error leaves the model untouched."""
    import mindspore

    real = mindspore.ms_memory_recycle
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        real()

    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = nn.SequentialCell([nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)])
    monkeypatch.setattr(mindspore, "ms_memory_recycle", flaky)
    xnorm.freeze(model)
    assert len(calls) == 2 and xnorm.is_frozen(model) and model[1].use_batch_statistics is False

    def broken():
        raise RuntimeError("device lost")

    monkeypatch.setattr(mindspore, "ms_memory_recycle", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        xnorm.unfreeze(model)
    assert xnorm.is_frozen(model) and model[1].use_batch_statistics is False  # nothing undone
    plain = nn.SequentialCell([nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)])
    with pytest.raises(RuntimeError, match="device lost"):
        xnorm.freeze(plain)
    assert not xnorm.is_frozen(plain) and plain[1].use_batch_statistics is None and plain[1].gamma.requires_grad
