"""Partitioning metadata through xnorm.wrap and xnorm.remove (backends/flax/partitioning.py).

A weight annotated for sharding (NNX ``nnx.with_partitioning``: the Variable's ``out_sharding``; linen
``nn.with_partitioning`` / ``nn.with_logical_partitioning`` boxes) must give every tensor the wrapper
derives from it a partition spec Flax's own readers (``nnx.get_partition_spec``, ``nn.get_partition_spec``,
``nn.logical_to_mesh_sharding``) turn into the right sharding. Every expected spec here is written out by
hand from the layer's Flax layout and the mapping rule (docs), never computed by the backend. No mesh is
needed for metadata: NNX layers are built without eager sharding, linen boxes carry names only; the
sharded runs are tests/flax/test_sharding.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import xnorm

LECUN = nnx.initializers.lecun_normal()


def _nnx_layer(kind: str, names):
    init = nnx.with_partitioning(LECUN, names)
    rngs = nnx.Rngs(0)
    with nnx.use_eager_sharding(False):  # annotations without a mesh: metadata only
        if kind == "linear":
            return nnx.Linear(6, 8, kernel_init=init, rngs=rngs)
        if kind == "linear-wide":  # torch's (6, 8): the orthogonal base's rows are the inputs
            return nnx.Linear(8, 6, kernel_init=init, rngs=rngs)
        if kind == "conv":
            return nnx.Conv(4, 8, (3, 2), kernel_init=init, rngs=rngs)
        if kind == "conv-transpose":
            return nnx.ConvTranspose(4, 8, (3, 2), kernel_init=init, rngs=rngs)
    raise AssertionError(kind)


def _specs(module) -> dict:
    return {key: variable.get_value() for key, variable in nnx.get_partition_spec(nnx.state(module)).items()}


# Flax layouts: Linear (in, out), Conv (kh, kw, in, out), ConvTranspose (kh, kw, in, out) with torch's
# (in, out, kh, kw), so its dim=0 is Flax's "i". "Last" is torch's last axis: the Linear's inputs, the
# kernel's kw.
LINEAR = ("i", "o")
KERNEL = ("kh", "kw", "i", "o")
WEIGHT_NORM_G = [
    ("linear", LINEAR, 0, P(None, "o")),
    ("linear", LINEAR, 1, P("i", None)),
    ("linear", LINEAR, None, P()),
    ("conv", KERNEL, 0, P(None, None, None, "o")),
    ("conv", KERNEL, 3, P(None, "kw", None, None)),
    ("conv", KERNEL, None, P()),
    ("conv-transpose", KERNEL, 0, P(None, None, "i", None)),
    ("conv-transpose", KERNEL, 1, P(None, None, None, "o")),
    ("conv-transpose", KERNEL, 3, P(None, "kw", None, None)),
]


@pytest.mark.parametrize("fused", [False, True], ids=["default", "fused"])
@pytest.mark.parametrize(("kind", "names", "dim", "g_spec"), WEIGHT_NORM_G)
def test_nnx_weight_norm_g_and_v_carry_the_kernels_names(kind, names, dim, g_spec, fused):
    layer = _nnx_layer(kind, names)
    wrapped = xnorm.wrap(layer, dim=dim, fused=fused)
    specs = _specs(wrapped)
    assert specs["kernel_v"] == P(*names)
    assert specs["kernel_g"] == g_spec
    assert wrapped.kernel_g.get_metadata("out_sharding") in (tuple(g_spec), ())
    assert specs["bias"] == P()
    plain = xnorm.remove(wrapped)
    assert _specs(plain)["kernel"] == P(*names)
    assert plain.kernel.get_metadata("out_sharding") == names


def test_nnx_dim_minus_two_of_a_conv_transpose_is_its_first_kernel_axis():
    # torch's (in, out, kh, kw): -2 is kh, Flax's axis 0 (-1 means one norm over the whole weight)
    wrapped = xnorm.wrap(_nnx_layer("conv-transpose", KERNEL), dim=-2)
    assert _specs(wrapped)["kernel_g"] == P("kh", None, None, None)


SPECTRAL = [
    ("linear", LINEAR, 0, P("o"), P("i")),
    ("linear", LINEAR, 1, P("i"), P("o")),
    ("conv", KERNEL, 0, P("o"), P(None)),  # v flattens (in, kh, kw): kh, kw are sharded too
    ("conv", (None, None, "i", "o"), 0, P("o"), P("i")),
    ("conv", (None, None, "i", "o"), 1, P("i"), P("o")),
    ("conv-transpose", (None, None, "i", "o"), None, P("o"), P("i")),  # dim=None is 1 (its outputs)
]


@pytest.mark.parametrize(("kind", "names", "dim", "u_spec", "v_spec"), SPECTRAL)
def test_nnx_spectral_norm_state_carries_the_names_of_its_axes(kind, names, dim, u_spec, v_spec):
    wrapped = xnorm.spectral_norm(_nnx_layer(kind, names), dim=dim, rngs=0)
    specs = _specs(wrapped)
    assert specs["kernel_orig"] == P(*names)
    assert specs["kernel_u"] == u_spec
    assert specs["kernel_v"] == v_spec
    assert _specs(xnorm.remove(wrapped))["kernel"] == P(*names)


ORTHOGONAL = [
    ("linear", LINEAR, P("o", None)),  # torch's (8, 6), tall: base (8, 8), rows the outputs
    ("linear-wide", LINEAR, P("i", None)),  # torch's (6, 8), wide: transposed, rows the inputs
    ("conv", KERNEL, P("o", "i", "kh", None)),  # torch's (8, 4, 3, 2): 32 bases (3, 3)
]


@pytest.mark.parametrize(("kind", "names", "base_spec"), ORTHOGONAL)
def test_nnx_orthogonal_base_carries_the_names_of_its_axes(kind, names, base_spec):
    wrapped = xnorm.orthogonal(_nnx_layer(kind, names), rngs=0)
    specs = _specs(wrapped)
    assert specs["kernel_orig"] == P(*names)
    assert specs["kernel_base"] == base_spec
    assert _specs(xnorm.remove(wrapped))["kernel"] == P(*names)


def test_nnx_sharding_rules_and_other_metadata_are_kept():
    rules = (("embed", None), ("mlp", "model"))
    init = nnx.with_metadata(LECUN, out_sharding=("embed", "mlp"), sharding_rules=rules, note="x")
    with nnx.use_eager_sharding(False):
        layer = nnx.Linear(6, 8, kernel_init=init, rngs=nnx.Rngs(0))
    assert _specs(layer)["kernel"] == P(None, "model")  # Flax's own reading of the rules
    wrapped = xnorm.wrap(layer)
    specs = _specs(wrapped)
    assert specs["kernel_v"] == P(None, "model")
    assert specs["kernel_g"] == P(None, "model")
    assert wrapped.kernel_g.get_metadata("note") == "x"
    assert wrapped.kernel_v.get_metadata("sharding_rules") == (("embed", None), ("mlp", "model"))


def test_nnx_unannotated_layer_gains_no_metadata():
    wrapped = xnorm.wrap(nnx.Linear(6, 8, rngs=nnx.Rngs(0)))
    assert _specs(wrapped) == {"bias": P(), "kernel_g": P(), "kernel_v": P()}
    assert "out_sharding" not in wrapped.kernel_g.get_metadata()


def test_nnx_training_keeps_the_metadata():
    import optax

    wrapped = xnorm.spectral_norm(_nnx_layer("linear", LINEAR), rngs=0)
    optimizer = nnx.Optimizer(wrapped, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

    step(wrapped, optimizer, jnp.ones((2, 6), jnp.float32))
    specs = _specs(wrapped)
    assert (specs["kernel_orig"], specs["kernel_u"], specs["kernel_v"]) == (P("i", "o"), P("o"), P("i"))


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
X = jnp.ones((2, 6), jnp.float32)
RULES = (("embed", "data"), ("mlp", "model"))


def _linen_dense(logical: bool) -> nn.Dense:
    init = nn.with_logical_partitioning(LECUN, ("embed", "mlp")) if logical else nn.with_partitioning(
        LECUN, ("embed", "mlp")
    )
    return nn.Dense(8, kernel_init=init)


def _mesh():
    # logical_to_mesh_sharding only reads the mesh's axis names: one device is enough
    return jax.make_mesh((1, 1), ("data", "model"))


LINEN = [
    ("wrap", {"dim": 0}, {"params": {"kernel_g": P(None, "mlp"), "kernel_v": P("embed", "mlp")}}),
    ("wrap", {"dim": 1}, {"params": {"kernel_g": P("embed", None), "kernel_v": P("embed", "mlp")}}),
    ("wrap", {"dim": None}, {"params": {"kernel_g": P(), "kernel_v": P("embed", "mlp")}}),
    ("wrap", {"dim": 0, "fused": True}, {"params": {"kernel_g": P(None, "mlp"), "kernel_v": P("embed", "mlp")}}),
    (
        "spectral_norm",
        {},
        {"params": {"kernel_orig": P("embed", "mlp")}, "batch_stats": {"kernel_u": P("mlp"), "kernel_v": P("embed")}},
    ),
    ("orthogonal", {}, {"params": {"kernel_orig": P("embed", "mlp")}, "batch_stats": {"kernel_base": P("mlp", None)}}),
]


def _call_options(how: str) -> dict:
    return {"update_stats": False} if how == "spectral_norm" else {}


@pytest.mark.parametrize("source", ["init", "variables="])
@pytest.mark.parametrize("logical", [False, True], ids=["partitioned", "logical"])
@pytest.mark.parametrize(("how", "options", "expected"), LINEN, ids=[f"{h}-{o}" for h, o, _ in LINEN])
def test_linen_boxes_map_to_every_tensor(how, options, expected, logical, source):
    dense = _linen_dense(logical)
    call = _call_options(how)
    if source == "init":
        module = getattr(xnorm, how)(dense, **options)
        variables = module.init(jax.random.key(0), X, **call)
    else:
        spec = {"wrap": xnorm.WeightNorm, "spectral_norm": xnorm.SpectralNorm, "orthogonal": xnorm.Orthogonal}[how]
        wrap_options = {k: v for k, v in options.items() if k != "fused"}
        extra = {"fused": True} if options.get("fused") else ({} if how == "wrap" else {"rngs": 0})
        module, variables = xnorm.wrap(
            dense, spec(**wrap_options), variables=dense.init(jax.random.key(0), X), **extra
        )
    specs = nn.get_partition_spec(variables)
    for collection, names in expected.items():
        for key, spec in names.items():
            assert specs[collection][key] == spec, (collection, key)
    assert specs["params"]["bias"] == P()
    if logical:
        mesh = _mesh()
        shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
        for collection, names in expected.items():
            for key, spec in names.items():
                mesh_spec = P(*(dict(RULES).get(name) for name in spec))
                assert shardings[collection][key].spec == mesh_spec, (collection, key)
    # the boxed variables run and train as they are, and keep their boxes through a training-mode update
    if how == "spectral_norm":
        _, state = module.apply(variables, X, update_stats=True, mutable=["batch_stats"])
        assert nn.get_partition_spec(state)["batch_stats"] == expected["batch_stats"]
    grads = jax.grad(lambda p: jnp.sum(module.apply({**variables, "params": p}, X, **call) ** 2))(variables["params"])
    assert nn.get_partition_spec({"params": grads})["params"] == specs["params"]
    _, plain_variables = xnorm.remove(module, variables, **call)
    assert nn.get_partition_spec(plain_variables)["params"]["kernel"] == P("embed", "mlp")


def test_linen_boxed_wrapper_computes_what_the_unboxed_one_does():
    # the boxes are metadata only: the same values without them give the same output and weight
    module = xnorm.wrap(_linen_dense(True), dim=0)
    variables = module.init(jax.random.key(0), X)
    plain = nn.meta.unbox(variables)
    assert isinstance(variables["params"]["kernel_v"], nn.Partitioned)
    assert jnp.array_equal(module.apply(variables, X), module.apply(plain, X))
    same = xnorm.wrap(nn.Dense(8, kernel_init=LECUN), dim=0).init(jax.random.key(0), X)
    assert jax.tree.map(jnp.array_equal, plain, same) == jax.tree.map(lambda _: True, same)
