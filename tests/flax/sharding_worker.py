"""Run by tests/flax/test_sharding.py in a process of its own with 4 host CPU devices.

``python sharding_worker.py OUT_DIR``: trains the same small models (NNX and linen; weight norm default
and fused, spectral norm, orthogonal) for a few SGD steps twice, once on one device and once with the
parameters sharded over a ("data", "model") mesh of the 4 devices as the docs' recipe does, in float32
and float64, and writes what the test compares: ``OUT_DIR/results.npz`` (every variable and loss of
both runs) and ``OUT_DIR/shardings.json`` (the spec and device count of every sharded variable, before
and after training, and the spec its metadata asks for). The comparison itself is the test's.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import xnorm  # noqa: E402

STEPS = 4
LR = 0.05
LECUN = nnx.initializers.lecun_normal()
OUT = (None, "model")  # a Dense/Linear kernel (in, out) sharded along its output features
CONV_OUT = (None, None, "model")  # a 1-D Conv kernel (k, in, out)
# biases annotated too: an unannotated one is left to XLA's propagation, which may reshard it in a step
BIAS_NNX = nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",))
BIAS_LINEN = nn.with_partitioning(nn.initializers.zeros_init(), ("model",))


def _mesh(axis_type=AxisType.Auto):
    # Auto axes: XLA's partitioner places every intermediate. Explicit ones (jax.make_mesh's default)
    # put shardings in the types, where xnorm runs power iteration and the orthogonal maps with Auto axes.
    return jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type, axis_type))


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------
class NNXModel(nnx.Module):
    def __init__(self, dtype, rngs: nnx.Rngs, conv: bool = True):
        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, kernel_init=nnx.with_partitioning(LECUN, OUT), bias_init=BIAS_NNX,
                              param_dtype=dtype, dtype=dtype, rngs=rngs)

        if conv:
            layer = nnx.Conv(4, 8, (3,), kernel_init=nnx.with_partitioning(LECUN, CONV_OUT), bias_init=BIAS_NNX,
                             param_dtype=dtype, dtype=dtype, rngs=rngs)
            self.conv = xnorm.wrap(layer, dim=0)
        else:
            self.conv = None
        self.weight_norm = xnorm.wrap(linear(8, 16), dim=0)
        self.fused = xnorm.wrap(linear(16, 16), dim=0, fused=True)
        self.spectral = xnorm.spectral_norm(linear(16, 16), rngs=rngs)
        self.orthogonal = xnorm.orthogonal(linear(16, 8), rngs=rngs)  # torch's (8, 16): wide, householder

    def __call__(self, x):
        if self.conv is not None:
            x = jnp.tanh(self.conv(x)).mean(axis=1)  # (batch, length, channels) -> (batch, 8)
        h = jnp.tanh(self.weight_norm(x))
        h = jnp.tanh(self.fused(h))
        h = jnp.tanh(self.spectral(h))
        return self.orthogonal(h)


def _nnx_run(dtype, x, y, mesh, conv=True, context=contextlib.nullcontext):
    with nnx.use_eager_sharding(False):  # the same initial values in both runs, placed below
        model = NNXModel(dtype, nnx.Rngs(0), conv)
    if mesh is not None:
        state = nnx.state(model)
        specs = nnx.get_partition_spec(state)
        nnx.update(model, jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), state, specs))
        x = jax.device_put(x, NamedSharding(mesh, P("data")))
        y = jax.device_put(y, NamedSharding(mesh, P("data")))
    before = _placements(nnx.state(model))
    initial = {"initial/" + "/".join(map(str, path)): np.asarray(v.get_value())
               for path, v in nnx.to_flat_state(nnx.state(model))}
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    with context():
        losses = [step(model, optimizer, x, y) for _ in range(STEPS)]
    state = nnx.state(model)
    values = {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}
    values["loss"] = np.asarray(jnp.stack(losses))
    values.update(initial)
    metadata = {
        "/".join(map(str, path)): _spec_list(v.get_value())
        for path, v in nnx.to_flat_state(nnx.get_partition_spec(state))
    }
    return values, {"before": before, "after": _placements(state), "metadata": metadata}


def _nnx_eager_placements():
    """The recipe without device_put: the model built under the mesh (eager sharding, flax 0.12's
    default), where xnorm.wrap places g, v, u, base itself."""
    with jax.set_mesh(_mesh()):
        model = NNXModel(jnp.float32, nnx.Rngs(0))
    return _placements(nnx.state(model))


# ------------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------------
class LinenModel(nn.Module):
    dtype: object

    @nn.compact
    def __call__(self, x, train: bool):
        def dense(n):
            return nn.Dense(n, kernel_init=nn.with_partitioning(LECUN, OUT), bias_init=BIAS_LINEN,
                            param_dtype=self.dtype, dtype=self.dtype)

        h = jnp.tanh(xnorm.wrap(dense(16), dim=0)(x))
        h = jnp.tanh(xnorm.wrap(dense(16), dim=0, fused=True)(h))
        h = jnp.tanh(xnorm.spectral_norm(dense(16))(h, update_stats=train))
        return xnorm.orthogonal(dense(8))(h)


def _linen_run(dtype, x, y, mesh, context=contextlib.nullcontext):
    model = LinenModel(dtype)
    boxed = model.init(jax.random.key(0), x, train=False)
    variables = nn.unbox(boxed)
    if mesh is not None:
        specs = nn.get_partition_spec(boxed)
        variables = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), variables, specs)
        x = jax.device_put(x, NamedSharding(mesh, P("data")))
        y = jax.device_put(y, NamedSharding(mesh, P("data")))
    before = _placements(variables)
    initial = {"initial/" + "/".join(k.key for k in path): np.asarray(a)
               for path, a in jax.tree_util.tree_leaves_with_path(variables)}

    @jax.jit
    def step(variables, x, y):
        def loss(params):
            out, state = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((out - y) ** 2), state

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - LR * g, variables["params"], grads)
        return {**variables, **state, "params": params}, value

    losses = []
    with context():
        for _ in range(STEPS):
            variables, value = step(variables, x, y)
            losses.append(value)
    flat = {"/".join(k.key for k in path): np.asarray(a) for path, a in jax.tree_util.tree_leaves_with_path(variables)}
    flat["loss"] = np.asarray(jnp.stack(losses))
    flat.update(initial)
    metadata = {
        "/".join(k.key for k in path): _spec_list(s)
        for path, s in jax.tree_util.tree_leaves_with_path(
            nn.get_partition_spec(boxed), is_leaf=lambda s: isinstance(s, P)
        )
    }
    return flat, {"before": before, "after": _placements(variables), "metadata": metadata}


# ------------------------------------------------------------------------------------------------
def _spec_list(spec):
    return [None if name is None else str(name) for name in spec]


def _placements(tree):
    """Path -> (spec, number of devices, shard shape) of every array in ``tree``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    out = {}
    for path, array in leaves:
        key = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        key = key.removesuffix("/value")
        sharding = array.sharding
        spec = _spec_list(sharding.spec) if isinstance(sharding, NamedSharding) else None
        shard = list(array.addressable_shards[0].data.shape)
        out[key] = {"spec": spec, "devices": len(sharding.device_set), "shard_shape": shard}
    return out


def main(out_dir: str) -> None:
    assert len(jax.devices()) == 4, jax.devices()
    mesh, explicit = _mesh(), _mesh(AxisType.Explicit)
    results, shardings = {}, {}
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.float64):
        name = jnp.dtype(dtype).name
        x_conv = jnp.asarray(rng.standard_normal((8, 10, 4)), dtype)
        x_dense = jnp.asarray(rng.standard_normal((8, 8)), dtype)
        y = jnp.asarray(rng.standard_normal((8, 8)), dtype)
        # Flax's own nnx.Conv cannot run under Explicit axes (conv_general_dilated wants an out_sharding
        # it does not pass), so the Explicit runs use the model without its Conv, "nnx-dense"
        runs = (
            ("nnx", _nnx_run, x_conv, ("single", "sharded")),
            ("nnx-dense", functools.partial(_nnx_run, conv=False), x_dense, ("single", "explicit")),
            ("linen", _linen_run, x_dense, ("single", "sharded", "explicit")),
        )
        for api, run, x, wheres in runs:
            for where in wheres:
                m = {"single": None, "sharded": mesh, "explicit": explicit}[where]
                # Explicit axes: jit's sharding types come from the mesh in context; linen's init is
                # left outside it (a Partitioned box's constraint is an assert under Explicit axes)
                # (a factory: jax.set_mesh sets the mesh as soon as it is called)
                context = functools.partial(jax.set_mesh, explicit) if where == "explicit" else contextlib.nullcontext
                values, placements = run(dtype, x, y, m, context=context)
                for key, value in values.items():
                    results[f"{api}/{name}/{where}/{key}"] = value
                shardings[f"{api}/{name}/{where}"] = placements
    shardings["nnx/eager"] = _nnx_eager_placements()
    np.savez(os.path.join(out_dir, "results.npz"), **results)
    with open(os.path.join(out_dir, "shardings.json"), "w") as f:
        json.dump(shardings, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
