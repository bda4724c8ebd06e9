"""xnorm.freeze / unfreeze / is_frozen in Flax, NNX and linen: the fine-tuning scenario of issue 17 against
the float64 eval-mode reference and Flax's own use_running_average=True, the drift without freeze, survival
through train()/eval()/nnx.view/call arguments, clone, deepcopy, split/merge and nnx.jit, checkpoints both
ways, the linen training step with the optax labels, Flax's training-mode update measured against
xnorm.batchnorm's convention, and every refusal leaving the model as it was."""

import copy
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx, serialization

import xnorm
from xnorm import batchnorm
from xnorm._backends.flax import freeze as flax_freeze
from xnorm._backends.flax.freeze import FrozenBatchNorm, FrozenParam, frozen_labels, frozen_mask
from xnorm.errors import AlreadyFrozenError, NotFrozenError, OptionError, UnsupportedLayerError

F32 = jnp.float32
FIXED = np.random.default_rng(99).normal(size=(4, 3)).astype(np.float32)
FIXED4 = np.random.default_rng(98).normal(size=(4, 4)).astype(np.float32)


def _batches(count, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(8, 3)).astype(np.float32) * 2 + 1, rng.normal(size=(8, 2)).astype(np.float32))
        for _ in range(count)
    ]


def _stats(seed):
    """Per-channel values far from BatchNorm's defaults, as after pretraining."""
    rng = np.random.default_rng(seed)
    return {
        "mean": rng.normal(size=4).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, size=4).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, size=4).astype(np.float32),
        "bias": rng.normal(size=4).astype(np.float32),
    }


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------
class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.7, rngs=rngs)  # the "backbone" BatchNorm
        self.fc2 = nnx.Linear(4, 4, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, momentum=0.7, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn2(self.fc2(nnx.relu(self.bn1(self.fc1(x)))))))


def pretrained_net():
    net = Net(nnx.Rngs(0))
    for seed, bn in ((1, net.bn1), (2, net.bn2)):
        for key, value in _stats(seed).items():
            getattr(bn, key)[...] = jnp.asarray(value)
    return net


def _bn1_values(net):
    return {key: np.asarray(getattr(net.bn1, key)[...]) for key in ("mean", "var", "scale", "bias")}


def _same(a, b):
    return all(np.array_equal(a[key], b[key]) for key in a)


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def _nnx_snapshot(obj):
    state = nnx.to_pure_dict(nnx.state(obj))
    return (
        jax.tree.map(np.asarray, state),
        [(path, type(node), getattr(node, "use_running_average", None)) for path, node in nnx.iter_graph(obj)],
    )


def _assert_nnx_same(obj, saved):
    state, nodes = _nnx_snapshot(obj)
    jax.tree.map(np.testing.assert_array_equal, state, saved[0])
    assert nodes == saved[1]


def _train(net, steps, tx=None, seed=1):
    optimizer = nnx.Optimizer(net, tx or optax.adamw(0.05, weight_decay=0.1), wrt=nnx.Param)
    for x, y in _batches(steps, seed):
        net.train()  # what every training loop calls
        grads = nnx.grad(_loss)(net, jnp.asarray(x), jnp.asarray(y))
        optimizer.update(net, grads)
    return grads


def test_nnx_frozen_layer_matches_the_float64_reference_and_flax_eval_mode():
    net = pretrained_net()
    plain = nnx.clone(net.bn1)
    xnorm.freeze(net.bn1)
    net.train()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 4)), F32)
    got = np.asarray(net.bn1(x))
    s = _stats(1)
    want = batchnorm.eval_batchnorm(x, s["mean"], s["var"], s["scale"], s["bias"], eps=1e-5, channel_axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got, np.asarray(plain(x, use_running_average=True)))  # Flax's own eval mode
    assert not np.allclose(np.asarray(plain(x, use_running_average=False)), want, atol=1e-3)  # train mode differs
    assert _same(_bn1_values(net), s)  # nothing was updated


def test_nnx_fine_tuning_without_freeze_the_statistics_drift():
    net = pretrained_net()
    before = _bn1_values(net)
    net.bn1.eval()  # the usual fix...
    _train(net, 2)  # ...undone by net.train()
    after = _bn1_values(net)
    assert not np.array_equal(after["mean"], before["mean"]) and not np.array_equal(after["var"], before["var"])
    assert not np.array_equal(after["scale"], before["scale"])


def test_nnx_fine_tuning_with_freeze_keeps_the_layer_bit_identical_while_the_rest_trains():
    net = pretrained_net()
    before, bn2_mean, fc1 = _bn1_values(net), np.asarray(net.bn2.mean[...]), np.asarray(net.fc1.kernel[...])
    out = xnorm.freeze(net, layers=lambda name, layer: name == "bn1")
    assert out is net and xnorm.is_frozen(net) and type(net.bn1) is FrozenBatchNorm
    assert isinstance(net.bn1, nnx.BatchNorm) and type(net.bn2) is nnx.BatchNorm

    def frozen_branch():  # the frozen layer on a fixed batch of its own inputs
        return np.asarray(net.bn1(jnp.asarray(FIXED4)))

    grads = _train(net, 3)  # adamw with weight decay: a Param would move even with a zero gradient
    assert "bn1" not in grads and "scale" in grads["bn2"]  # no gradient for the frozen scale and bias
    assert _same(_bn1_values(net), before)
    assert not np.array_equal(np.asarray(net.bn2.mean[...]), bn2_mean)  # the other BatchNorm trains
    assert not np.array_equal(np.asarray(net.fc1.kernel[...]), fc1)
    epochs = [frozen_branch()]
    for seed in (7, 8):
        _train(net, 2, seed=seed)
        epochs.append(frozen_branch())
    for later in epochs[1:]:
        np.testing.assert_array_equal(later, epochs[0])  # identical epoch to epoch


def test_nnx_jit_traced_before_freeze_is_not_reused():
    net = pretrained_net()

    @nnx.jit
    def step(model, x):
        return model(x)

    net.train()
    step(net, jnp.asarray(FIXED))  # traced with bn1 updating
    before = _bn1_values(net)
    xnorm.freeze(net, layers="^bn1$")
    step(net, jnp.asarray(FIXED) * 3)
    assert _same(_bn1_values(net), before)
    assert not np.array_equal(np.asarray(net.bn2.mean[...]), _stats(2)["mean"])


@pytest.mark.parametrize("how", ["train", "set_attributes", "view", "with_attributes", "call_argument"])
def test_nnx_every_way_of_asking_for_training_mode_is_ignored(how):
    net = pretrained_net()
    xnorm.freeze(net, layers=(nnx.BatchNorm,))
    before = _bn1_values(net)
    x = jnp.asarray(FIXED)
    if how == "train":
        net.train()
        net(x)
    elif how == "set_attributes":
        net.set_attributes(use_running_average=False)
        net(x)
    elif how == "view":
        nnx.view(net, use_running_average=False)(x)
    elif how == "with_attributes":
        nnx.with_attributes(net, use_running_average=False)(x)
    else:
        net.bn1(net.fc1(x), use_running_average=False)
    assert _same(_bn1_values(net), before)


def test_nnx_clone_deepcopy_and_split_merge_stay_frozen_and_independent():
    net = pretrained_net()
    xnorm.freeze(net, layers="bn1")
    graphdef, state = nnx.split(net)
    copies = [nnx.clone(net), copy.deepcopy(net), nnx.merge(graphdef, state), pickle.loads(pickle.dumps(net))]
    for other in copies:
        assert type(other.bn1) is FrozenBatchNorm and type(other.bn1.scale) is FrozenParam
        before = _bn1_values(other)
        other.train()
        other(jnp.asarray(FIXED))
        assert _same(_bn1_values(other), before)
        assert not np.array_equal(np.asarray(other.bn2.mean[...]), _stats(2)["mean"])
    xnorm.unfreeze(copies[0])
    assert xnorm.is_frozen(net) and not xnorm.is_frozen(copies[0])
    assert type(copies[1].bn1) is FrozenBatchNorm


def test_nnx_unfreeze_restores_classes_types_and_the_mode_last_requested():
    net = pretrained_net()
    net.eval()
    xnorm.freeze(net)
    assert type(net.bn1.scale) is FrozenParam and type(net.bn2.bias) is FrozenParam
    net.train()  # requested while frozen: honoured on unfreeze
    assert xnorm.unfreeze(net) is net and not xnorm.is_frozen(net)
    for bn in (net.bn1, net.bn2):
        assert type(bn) is nnx.BatchNorm and bn.use_running_average is False and bn.momentum == 0.7
        assert type(bn.scale) is nnx.Param and type(bn.bias) is nnx.Param
    net(jnp.asarray(FIXED))
    assert not np.array_equal(np.asarray(net.bn1.mean[...]), _stats(1)["mean"])  # updates again
    net2 = pretrained_net()
    net2.eval()
    xnorm.freeze(net2)
    xnorm.unfreeze(net2)
    assert net2.bn1.use_running_average is True  # no train() while frozen: the mode it had


def test_nnx_affine_false_freezes_only_the_statistics():
    net = pretrained_net()
    xnorm.freeze(net, affine=False, layers="bn1")
    assert type(net.bn1.scale) is nnx.Param
    before = _bn1_values(net)
    _train(net, 2)
    after = _bn1_values(net)
    assert np.array_equal(after["mean"], before["mean"]) and np.array_equal(after["var"], before["var"])
    assert not np.array_equal(after["scale"], before["scale"])


def test_nnx_subclass_of_batchnorm_and_a_batchnorm_alone():
    class MyBN(nnx.BatchNorm):
        pass

    layer = MyBN(4, rngs=nnx.Rngs(0))
    xnorm.freeze(layer)
    assert isinstance(layer, MyBN) and type(layer).__name__ == "FrozenMyBN"
    layer.train()
    layer(jnp.asarray(np.ones((3, 4)) * np.arange(3)[:, None], F32))
    np.testing.assert_array_equal(np.asarray(layer.mean[...]), np.zeros(4))
    assert type(copy.deepcopy(layer)) is type(layer)
    xnorm.unfreeze(layer)
    assert type(layer) is MyBN


def test_nnx_checkpoints_are_unchanged_and_load_both_ways():
    plain = pretrained_net()
    frozen = pretrained_net()
    xnorm.freeze(frozen)
    plain_state, frozen_state = nnx.state(plain), nnx.state(frozen)
    assert [path for path, _ in nnx.to_flat_state(plain_state)] == [path for path, _ in nnx.to_flat_state(frozen_state)]
    plain_dict, frozen_dict = nnx.to_pure_dict(plain_state), nnx.to_pure_dict(frozen_state)
    jax.tree.map(np.testing.assert_array_equal, plain_dict, frozen_dict)
    # frozen model <- plain checkpoint, through bytes
    other = pretrained_net()
    for bn in (other.bn1, other.bn2):
        bn.mean[...] = bn.mean[...] + 1.0
        bn.scale[...] = bn.scale[...] * 2.0
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(other))))
    state = nnx.state(frozen)
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(blob))
    nnx.update(frozen, state)
    assert type(frozen.bn1.scale) is FrozenParam  # still frozen, new values
    np.testing.assert_array_equal(np.asarray(frozen.bn1.scale[...]), np.asarray(other.bn1.scale[...]))
    np.testing.assert_array_equal(np.asarray(frozen.bn2.mean[...]), np.asarray(other.bn2.mean[...]))
    # plain model <- frozen checkpoint
    state = nnx.state(plain)
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(frozen)))
    nnx.update(plain, state)
    assert type(plain.bn1.scale) is nnx.Param
    np.testing.assert_array_equal(np.asarray(plain.bn1.mean[...]), np.asarray(other.bn1.mean[...]))


def test_nnx_exhaustive_filters_must_cover_frozen_param():
    net = pretrained_net()
    xnorm.freeze(net, layers="bn1")
    with pytest.raises(ValueError, match="Non-exhaustive filters"):
        nnx.split(net, nnx.Param, nnx.BatchStat)
    _, params, stats, frozen = nnx.split(net, nnx.Param, nnx.BatchStat, FrozenParam)
    assert sorted(nnx.to_pure_dict(frozen)["bn1"]) == ["bias", "scale"] and "bn1" not in nnx.to_pure_dict(params)


def test_nnx_an_optimizer_built_before_freeze():
    """One with state for the scale and bias refuses to update; a stateless one leaves them alone."""
    x, y = jnp.asarray(FIXED), jnp.zeros((4, 2), F32)
    net = pretrained_net()
    optimizer = nnx.Optimizer(net, optax.adam(0.1), wrt=nnx.Param)
    xnorm.freeze(net, layers="bn1")
    with pytest.raises(ValueError, match="pytree structure"):
        optimizer.update(net, nnx.grad(_loss)(net, x, y))
    assert _same(_bn1_values(net), _stats(1))
    net = pretrained_net()
    optimizer = nnx.Optimizer(net, optax.sgd(0.1), wrt=nnx.Param)
    xnorm.freeze(net, layers="bn1")
    kernel = np.asarray(net.fc1.kernel[...])
    optimizer.update(net, nnx.grad(_loss)(net, x, y))
    assert _same(_bn1_values(net), _stats(1)) and not np.array_equal(np.asarray(net.fc1.kernel[...]), kernel)


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.7)(x)  # the field form
        return nn.relu(x)


class LNet(nn.Module):
    def setup(self):
        self.backbone = Backbone()
        self.fc = nn.Dense(4)
        self.bn = nn.BatchNorm(momentum=0.7)  # the call-argument form
        self.head = nn.Dense(2)

    def __call__(self, x, train: bool):
        return self.head(nn.relu(self.bn(self.fc(self.backbone(x, train)), use_running_average=not train)))

    def features(self, x):
        return self.backbone(x, True)


BACKBONE_BN = ("backbone", "BatchNorm_0")


def pretrained_variables():
    variables = LNet().init(jax.random.key(0), jnp.asarray(FIXED), train=False)
    params = jax.tree.map(np.asarray, dict(variables["params"]))
    stats = jax.tree.map(np.asarray, dict(variables["batch_stats"]))
    for seed, path in ((1, BACKBONE_BN), (2, ("bn",))):
        values = _stats(seed)
        _at(params, path).update(scale=values["scale"], bias=values["bias"])
        _at(stats, path).update(mean=values["mean"], var=values["var"])
    return {"params": params, "batch_stats": stats}


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _linen_train(model, variables, steps, labels=None, seed=1):
    inner = optax.adamw(0.05, weight_decay=0.1)
    tx = inner if labels is None else optax.multi_transform({"trainable": inner, "frozen": optax.set_to_zero()}, labels)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), updates["batch_stats"]

        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    for x, y in _batches(steps, seed):
        params, stats, opt_state = step(params, stats, opt_state, jnp.asarray(x), jnp.asarray(y))
    return {"params": params, "batch_stats": stats}


def test_linen_frozen_call_matches_the_float64_reference_and_flax_eval_mode():
    variables = pretrained_variables()
    frozen = xnorm.freeze(LNet(), layers=r"^backbone\.")
    x = jnp.asarray(FIXED)
    got, updates = frozen.apply(variables, x, mutable=["batch_stats"], method="features")
    want_flax = Backbone().apply(
        {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}, x, False
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want_flax))  # Flax's own use_running_average=True
    s = _stats(1)
    dense = variables["params"]["backbone"]["Dense_0"]
    h = FIXED.astype(np.float64) @ dense["kernel"].astype(np.float64) + dense["bias"]
    want = np.maximum(batchnorm.eval_batchnorm(h, s["mean"], s["var"], s["scale"], s["bias"], 1e-5, -1), 0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    # every BatchNorm frozen, the field form and the call-argument form: the training call is the eval call
    everything = xnorm.freeze(LNet())
    got, updates = everything.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(LNet().apply(variables, x, train=False)))
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def test_linen_fine_tuning_trap_and_the_training_step_with_frozen_labels():
    variables = pretrained_variables()
    # without freeze: the training call moves the backbone's statistics and the optimizer its scale
    drifted = _linen_train(LNet(), variables, 2)
    assert not np.array_equal(_at(drifted["batch_stats"], BACKBONE_BN)["mean"], _stats(1)["mean"])
    assert not np.array_equal(_at(drifted["params"], BACKBONE_BN)["scale"], _stats(1)["scale"])

    frozen = xnorm.freeze(LNet(), layers=lambda name, layer: name.startswith("backbone."))
    labels = frozen_labels(frozen, variables, jnp.asarray(FIXED), train=True)
    assert _at(labels, BACKBONE_BN) == {"scale": "frozen", "bias": "frozen"}
    assert labels["bn"] == {"scale": "trainable", "bias": "trainable"} and labels["fc"]["kernel"] == "trainable"
    mask = frozen_mask(frozen, variables, jnp.asarray(FIXED), train=True)
    assert sum(jax.tree.leaves(mask)) == 2
    trained = _linen_train(frozen, variables, 3, labels)
    for collection, keys in (("batch_stats", ("mean", "var")), ("params", ("scale", "bias"))):
        for key in keys:
            np.testing.assert_array_equal(_at(trained[collection], BACKBONE_BN)[key], _stats(1)[key])
    assert not np.array_equal(trained["batch_stats"]["bn"]["mean"], _stats(2)["mean"])
    assert not np.array_equal(trained["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    assert not np.array_equal(
        _at(trained["params"], ("backbone", "Dense_0"))["kernel"], variables["params"]["backbone"]["Dense_0"]["kernel"]
    )
    # same keys and shapes as the plain model: a plain checkpoint loads, and the plain model runs these
    assert jax.tree.structure(trained) == jax.tree.structure(variables)
    LNet().apply(trained, jnp.asarray(FIXED), train=False)


def test_linen_frozen_module_init_bind_and_field_use():
    x = jnp.asarray(FIXED)
    plain = LNet().init(jax.random.key(0), x, train=True)
    frozen = xnorm.freeze(LNet(), layers="backbone")
    jax.tree.map(np.testing.assert_array_equal, frozen.init(jax.random.key(0), x, train=True), plain)
    variables = pretrained_variables()
    bound = frozen.bind(variables, mutable=["batch_stats"])
    bound(x, train=True)
    np.testing.assert_array_equal(
        np.asarray(_at(bound.variables["batch_stats"], BACKBONE_BN)["mean"]), _stats(1)["mean"]
    )

    class Outer(nn.Module):  # the frozen module as a field of a bigger model
        inner: nn.Module

        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(self.inner(x, True))

    outer = Outer(inner=xnorm.freeze(Backbone()))
    inner_vars = {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}
    outer_vars = outer.init(jax.random.key(1), x)
    outer_vars = {
        "params": {**outer_vars["params"], "inner": inner_vars["params"]},
        "batch_stats": {**outer_vars["batch_stats"], "inner": inner_vars["batch_stats"]},
    }
    _, updates = outer.apply(outer_vars, x, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"]["inner"], inner_vars["batch_stats"])
    assert not np.array_equal(
        updates["batch_stats"]["BatchNorm_0"]["mean"], outer_vars["batch_stats"]["BatchNorm_0"]["mean"]
    )
    assert xnorm.is_frozen(outer) and not xnorm.is_frozen(Outer(inner=Backbone()))
    thawed = xnorm.unfreeze(outer)
    assert type(thawed.inner) is Backbone and not xnorm.is_frozen(thawed)


def test_linen_unfreeze_gives_back_the_plain_module():
    module = LNet()
    frozen = xnorm.freeze(module)
    assert frozen is not module and isinstance(frozen, LNet) and not xnorm.is_frozen(module)
    plain = xnorm.unfreeze(frozen)
    assert type(plain) is LNet and plain == module
    variables = pretrained_variables()
    _, updates = plain.apply(variables, jnp.asarray(FIXED), train=True, mutable=["batch_stats"])
    assert not np.array_equal(_at(updates["batch_stats"], BACKBONE_BN)["mean"], _stats(1)["mean"])


def test_linen_a_batchnorm_alone_with_its_field_set_to_false():
    layer = nn.BatchNorm(use_running_average=False, momentum=0.5)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 3)), F32)
    variables = layer.init(jax.random.key(0), x)
    frozen = xnorm.freeze(layer)
    y, updates = frozen.apply(variables, x, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    np.testing.assert_allclose(
        np.asarray(y),
        batchnorm.eval_batchnorm(x, np.zeros(3), np.ones(3), eps=1e-5, channel_axis=-1),
        rtol=1e-5,
        atol=1e-6,
    )


# ------------------------------------------------------------------------------------------------
# Flax's training-mode convention, measured
# ------------------------------------------------------------------------------------------------
def test_flax_batchnorm_update_is_the_documented_convention():
    """One training step of Flax's own BatchNorm (linen and NNX) against xnorm.batchnorm's "flax" convention:
    momentum weighs the old value, running_var moves with the biased batch variance. The torch convention
    gives a different variance on the same batch, so the check can tell them apart."""
    convention = batchnorm.CONVENTIONS["flax"]
    assert (convention.momentum_weighs, convention.running_var) == ("old", "biased")
    x = np.array([[1.0, -2.0], [2.0, 0.5], [3.0, 4.0], [6.0, 1.5]], np.float32)
    mean0, var0, momentum = np.array([0.5, -1.0], np.float32), np.array([1.0, 2.0], np.float32), 0.9
    want_y, want_mean, want_var = batchnorm.batchnorm_training_step("flax", x, mean0, var0, momentum=momentum)
    _, _, torch_var = batchnorm.batchnorm_training_step("torch", x, mean0, var0, momentum=1 - momentum, channel_axis=-1)
    assert not np.allclose(torch_var, want_var, rtol=1e-3)

    layer = nn.BatchNorm(use_running_average=False, momentum=momentum)
    variables = {"params": {"scale": np.ones(2, np.float32), "bias": np.zeros(2, np.float32)}}
    variables["batch_stats"] = {"mean": mean0, "var": var0}
    y, updates = layer.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    bn = nnx.BatchNorm(2, momentum=momentum, rngs=nnx.Rngs(0))
    bn.mean[...], bn.var[...] = jnp.asarray(mean0), jnp.asarray(var0)
    y_nnx = bn(jnp.asarray(x))
    for got_y, got_mean, got_var in (
        (y, updates["batch_stats"]["mean"], updates["batch_stats"]["var"]),
        (y_nnx, bn.mean[...], bn.var[...]),
    ):
        np.testing.assert_allclose(np.asarray(got_mean), want_mean, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got_var), want_var, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=1e-5, atol=1e-5)
    # the docs' worked example: var 1 -> 0.99 + 0.01 * 3.5 on the batch 1, 2, 3, 6 with the default momentum
    one = nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    one(jnp.asarray([[1.0], [2.0], [3.0], [6.0]], F32))
    np.testing.assert_allclose(np.asarray(one.var[...]), [0.99 + 0.01 * 3.5], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------
class WithLayerNorm(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 4, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)


def _hijax_batchnorm():
    layer = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    layer.scale = nnx.Param(jnp.ones(3, F32), hijax=True)
    return layer


NNX_REFUSALS = {
    "hijax scale": (_hijax_batchnorm, {}, UnsupportedLayerError, "hijax variables (scale)"),
    "nothing to freeze": (lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)), {}, UnsupportedLayerError, "nothing to freeze"),
    "layernorm alone": (lambda: nnx.LayerNorm(4, rngs=nnx.Rngs(0)), {}, UnsupportedLayerError, "no running statistics"),
    "layernorm type": (
        lambda: WithLayerNorm(nnx.Rngs(0)),
        {"layers": (nnx.LayerNorm, nnx.BatchNorm)},
        UnsupportedLayerError,
        "leave its type out",
    ),
    "layernorm by predicate": (
        lambda: WithLayerNorm(nnx.Rngs(0)),
        {"layers": lambda name, layer: name == "ln"},
        UnsupportedLayerError,
        "no running statistics",
    ),
    "not a normalization type": (
        lambda: WithLayerNorm(nnx.Rngs(0)),
        {"layers": nnx.Linear},
        OptionError,
        "not a normalization layer",
    ),
    "selects nothing": (lambda: WithLayerNorm(nnx.Rngs(0)), {"layers": "^nope"}, OptionError, "selects no layer"),
    "invalid pattern": (lambda: WithLayerNorm(nnx.Rngs(0)), {"layers": "("}, OptionError, "not a valid regular"),
    "layers of another kind": (lambda: WithLayerNorm(nnx.Rngs(0)), {"layers": 3}, OptionError, "layers= takes"),
    "affine not a bool": (lambda: WithLayerNorm(nnx.Rngs(0)), {"affine": "yes"}, OptionError, "affine must be"),
}


@pytest.mark.parametrize("case", sorted(NNX_REFUSALS))
def test_nnx_freeze_refusals_change_nothing(case):
    build, options, error, message = NNX_REFUSALS[case]
    model = build()
    saved = _nnx_snapshot(model)
    with pytest.raises(error, match=re.escape(message)):
        xnorm.freeze(model, **options)
    _assert_nnx_same(model, saved)
    assert not xnorm.is_frozen(model)


def test_nnx_freezing_twice_and_unfreezing_what_is_not_frozen_change_nothing():
    net = pretrained_net()
    with pytest.raises(NotFrozenError, match="nothing to unfreeze"):
        xnorm.unfreeze(net)
    xnorm.freeze(net, layers="bn1")
    saved = _nnx_snapshot(net)
    with pytest.raises(AlreadyFrozenError, match="frozen already"):
        xnorm.freeze(net, layers="bn1")
    _assert_nnx_same(net, saved)
    xnorm.freeze(net)  # bn2 is still free: the frozen bn1 is skipped
    assert type(net.bn2) is FrozenBatchNorm and type(net.bn1.scale) is FrozenParam


def test_linen_refusals_change_nothing():
    module = LNet()
    for call, error, message in (
        (lambda: xnorm.freeze(nn.Dense(3)), UnsupportedLayerError, "nothing to freeze"),
        (lambda: xnorm.freeze(nn.LayerNorm()), UnsupportedLayerError, "no running statistics"),
        (lambda: xnorm.freeze(module, layers=(nn.LayerNorm,)), UnsupportedLayerError, "leave its type out"),
        (lambda: xnorm.freeze(module, layers=nn.Dense), OptionError, "not a normalization layer"),
        (lambda: xnorm.freeze(module, affine=1), OptionError, "affine must be"),
        (lambda: xnorm.unfreeze(module), NotFrozenError, "nothing to unfreeze"),
        (lambda: xnorm.freeze(xnorm.freeze(module)), AlreadyFrozenError, "frozen already"),
        (
            lambda: xnorm.freeze(module.bind(pretrained_variables())),
            UnsupportedLayerError,
            "bound to variables",
        ),
    ):
        with pytest.raises(error, match=re.escape(message)):
            call()
        assert type(module) is LNet and module == LNet() and not xnorm.is_frozen(module)


def test_linen_frozen_labels_refusals():
    variables = pretrained_variables()
    x = jnp.asarray(FIXED)
    with pytest.raises(NotFrozenError):
        frozen_labels(LNet(), variables, x, train=True)
    with pytest.raises(OptionError, match="selects none of the BatchNorm"):
        frozen_labels(xnorm.freeze(LNet(), layers="^nope"), variables, x, train=True)
    with pytest.raises(UnsupportedLayerError, match="no nn.BatchNorm"):
        frozen_labels(xnorm.freeze(LNet()), variables, x, method=lambda m, x: m.head(jnp.ones((x.shape[0], 4), F32)))
    with pytest.raises(OptionError, match="'params'"):
        frozen_labels(xnorm.freeze(LNet()), [1], x, train=True)


def test_is_frozen_is_false_for_anything_else():
    assert xnorm.is_frozen(nnx.BatchNorm(2, rngs=nnx.Rngs(0))) is False
    assert xnorm.is_frozen(nn.BatchNorm()) is False
    assert flax_freeze.is_frozen(object()) is False


def test_linen_freeze_inside_setup_and_compact_keeps_paths_and_only_the_modules_own_layers():
    class Child(nn.Module):
        norm: nn.Module

        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(self.norm(x))

    class Parent(nn.Module):
        def setup(self):
            self.bn = nn.BatchNorm(use_running_average=False)  # owned by Parent, called by the frozen child
            self.child = xnorm.freeze(Child(norm=self.bn))

        def __call__(self, x):
            return self.child(x)

    class Inline(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(xnorm.freeze(nn.BatchNorm(use_running_average=False))(x))

    x = jnp.asarray(np.random.default_rng(5).normal(size=(5, 3)) * 2 + 1, F32)
    for model, frozen_path, free_path in (
        (Parent(), ("child", "BatchNorm_0"), ("bn",)),
        (Inline(), ("BatchNorm_1",), ("BatchNorm_0",)),  # the outer call is built first,
    ):
        variables = model.init(jax.random.key(0), x)
        assert sorted(variables["batch_stats"]) == sorted({frozen_path[0], free_path[0]})  # the plain paths
        _, updates = model.apply(variables, x, mutable=["batch_stats"])
        jax.tree.map(
            np.testing.assert_array_equal,
            _at(updates["batch_stats"], frozen_path),
            _at(variables["batch_stats"], frozen_path),
        )
        assert not np.array_equal(
            _at(updates["batch_stats"], free_path)["mean"], _at(variables["batch_stats"], free_path)["mean"]
        )


def test_xnorm_convert_works_on_frozen_models_both_ways():
    """A torch checkpoint loads into a frozen NNX model (its frozen scale and bias are FrozenParam, not
    nnx.Param), and the frozen NNX model converts back into a frozen torch model, values unchanged."""
    import torch

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    source = TorchNet()
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(tensor.numel())))
    model = xnorm.freeze(Net(nnx.Rngs(0)))
    xnorm.convert(source.state_dict(), to="flax", like=model, load=True)
    assert xnorm.is_frozen(model)
    np.testing.assert_array_equal(np.asarray(model.bn.scale[...]), source.bn.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(model.bn.var[...]), source.bn.running_var.numpy())
    target = xnorm.freeze(TorchNet())
    xnorm.convert(model, to="torch", like=target, load=True)
    assert xnorm.is_frozen(target)
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # no Flax counterpart: zero-filled into a torch target
        assert torch.equal(target.state_dict()[key], value), key
