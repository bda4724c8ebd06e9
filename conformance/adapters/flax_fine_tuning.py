"""The fine-tuning case of ``xnorm.freeze`` (conformance/fine_tuning.py's script) in linen and NNX, for the
``flax-linen`` and ``flax-nnx`` adapters: the case's conv net in Flax's layouts (NHWC, kernels
``(kh, kw, in, out)``), frozen with ``xnorm.freeze`` (linen: a frozen module and ``frozen_labels`` for
optax; NNX: in place), trained with optax SGD."""

from __future__ import annotations

from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import xnorm
from xnorm._backends.flax.freeze import frozen_labels

from .. import fine_tuning
from .flax import _DTYPES, _to_numpy

__all__ = ["fine_tune_linen", "fine_tune_nnx"]


def _fine_tuning_arrays(run: fine_tuning.FineTuningRun) -> Dict[str, Dict[str, Any]]:
    """``run.weights`` as Flax stores them, by layer: kernels (kh, kw, in, out) and (in, out), BatchNorm
    ``scale``/``bias``/``mean``/``var``."""
    dtype = _DTYPES[run.dtype]
    w = run.weights

    def array(value):
        return jnp.asarray(np.asarray(value), dtype=dtype)

    out: Dict[str, Dict[str, Any]] = {
        "conv1": {"kernel": array(np.transpose(w["conv1.weight"], (2, 3, 1, 0)))},
        "conv2": {"kernel": array(np.transpose(w["conv2.weight"], (2, 3, 1, 0))), "bias": array(w["conv2.bias"])},
        "fc": {"kernel": array(np.transpose(w["fc.weight"])), "bias": array(w["fc.bias"])},
    }
    for bn in fine_tuning.BATCHNORMS:
        out[bn] = {
            "scale": array(w[f"{bn}.weight"]),
            "bias": array(w[f"{bn}.bias"]),
            "mean": array(w[f"{bn}.running_mean"]),
            "var": array(w[f"{bn}.running_var"]),
        }
    return out


def _fine_tuning_record(arrays: Dict[str, Dict[str, Any]], backbone, output) -> Dict[str, np.ndarray]:
    """A record of conformance/fine_tuning.py (canonical layouts) from Flax's arrays and eval outputs (NHWC)."""
    record = {
        "conv1.weight": np.transpose(_to_numpy(arrays["conv1"]["kernel"]), (3, 2, 0, 1)),
        "conv2.weight": np.transpose(_to_numpy(arrays["conv2"]["kernel"]), (3, 2, 0, 1)),
        "conv2.bias": _to_numpy(arrays["conv2"]["bias"]),
        "fc.weight": np.transpose(_to_numpy(arrays["fc"]["kernel"])),
        "fc.bias": _to_numpy(arrays["fc"]["bias"]),
        "backbone_eval": np.moveaxis(_to_numpy(backbone), -1, 1),
        "output_eval": _to_numpy(output),
    }
    for bn in fine_tuning.BATCHNORMS:
        for name, key in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
            record[f"{bn}.{name}"] = _to_numpy(arrays[bn][key])
    return record


class _LinenFineTuningNet(nn.Module):
    momentum: float
    eps: float
    dtype: Any

    def setup(self):
        options = dict(dtype=self.dtype, param_dtype=self.dtype)
        norm = dict(momentum=self.momentum, epsilon=self.eps, **options)
        channels = fine_tuning.CHANNELS
        self.conv1 = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, **options)
        self.bn1 = nn.BatchNorm(**norm)
        self.conv2 = nn.Conv(channels, (1, 1), **options)
        self.bn2 = nn.BatchNorm(**norm)
        self.fc = nn.Dense(fine_tuning.CLASSES, **options)

    def backbone(self, x, train: bool):
        return nn.relu(self.bn1(self.conv1(x), use_running_average=not train))

    def __call__(self, x, train: bool):
        h = nn.relu(self.bn2(self.conv2(self.backbone(x, train)), use_running_average=not train))
        return self.fc(jnp.mean(h, axis=(1, 2)))


def _nchw_to_nhwc(x: np.ndarray, dtype: str):
    return jnp.asarray(np.moveaxis(np.asarray(x), 1, -1), dtype=_DTYPES[dtype])


def fine_tune_linen(run: fine_tuning.FineTuningRun) -> List[Dict[str, np.ndarray]]:
    momentum, eps = run.framework_settings("flax")
    plain = _LinenFineTuningNet(momentum, eps, _DTYPES[run.dtype])
    arrays = _fine_tuning_arrays(run)
    params = {layer: {k: v for k, v in values.items() if k not in ("mean", "var")} for layer, values in arrays.items()}
    stats = {bn: {"mean": arrays[bn]["mean"], "var": arrays[bn]["var"]} for bn in fine_tuning.BATCHNORMS}
    model = plain
    if run.freeze:
        model = xnorm.freeze(plain, layers=lambda name, layer: name == fine_tuning.FROZEN_LAYER)
    test_x = _nchw_to_nhwc(run.test_x, run.dtype)
    first_x = _nchw_to_nhwc(run.batches[0][0], run.dtype)

    def new_optimizer(module):
        """SGD over what trains: conv1 never (the user's own freezing of the backbone's convolution, an optax
        label), and with xnorm.freeze not the frozen scale and shift (xnorm's labels)."""
        if xnorm.is_frozen(module):
            labels = frozen_labels(module, {"params": params, "batch_stats": stats}, first_x, train=True)
        else:
            labels = jax.tree.map(lambda _: "trainable", params)
        labels = {**labels, fine_tuning.FIXED_LAYER: jax.tree.map(lambda _: "frozen", params[fine_tuning.FIXED_LAYER])}
        tx = optax.multi_transform({"trainable": optax.sgd(run.lr), "frozen": optax.set_to_zero()}, labels)
        return tx, tx.init(params)

    def make_step(module, tx):
        @jax.jit
        def step(params, stats, opt_state, x, target):
            def loss(params):
                y, updates = module.apply(
                    {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
                )
                return 0.5 * jnp.mean((y - target) ** 2), updates["batch_stats"]

            (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state

        return step

    def record():
        variables = {"params": params, "batch_stats": stats}
        backbone = model.apply(variables, test_x, False, method="backbone")
        output = model.apply(variables, test_x, False)
        merged = {layer: {**params[layer], **stats.get(layer, {})} for layer in params}
        return _fine_tuning_record(merged, backbone, output)

    def new_trainer():
        """The compiled step of the current module (linen's unfreeze returns a new one) and its optimizer
        state, which every step replaces."""
        tx, opt_state = new_optimizer(model)
        return {"step": make_step(model, tx), "opt_state": opt_state}

    def step(trainer, batch):
        nonlocal params, stats
        x, target = _nchw_to_nhwc(batch[0], run.dtype), _target(batch[1], run.dtype)
        params, stats, trainer["opt_state"] = trainer["step"](params, stats, trainer["opt_state"], x, target)

    def unfreeze():
        nonlocal model
        model = xnorm.unfreeze(model)

    return run.schedule(record=record, new_trainer=new_trainer, step=step, unfreeze=unfreeze)


def _target(target: np.ndarray, dtype: str):
    """A (N, classes) target: the same layout in every framework."""
    return jnp.asarray(np.asarray(target), dtype=_DTYPES[dtype])


class _NNXFineTuningNet(nnx.Module):
    def __init__(self, momentum: float, eps: float, dtype: Any):
        options = dict(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        norm = dict(momentum=momentum, epsilon=eps, **options)
        channels = fine_tuning.CHANNELS
        self.conv1 = nnx.Conv(
            fine_tuning.IN_CHANNELS, channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, **options
        )
        self.bn1 = nnx.BatchNorm(channels, **norm)
        self.conv2 = nnx.Conv(channels, channels, (1, 1), **options)
        self.bn2 = nnx.BatchNorm(channels, **norm)
        self.fc = nnx.Linear(channels, fine_tuning.CLASSES, **options)

    def backbone(self, x):
        return nnx.relu(self.bn1(self.conv1(x)))

    def __call__(self, x):
        return self.fc(jnp.mean(nnx.relu(self.bn2(self.conv2(self.backbone(x)))), axis=(1, 2)))


#: what the fine-tuning optimizer trains in NNX: the parameters but conv1's (the user's own freezing of the
#: backbone's convolution); xnorm.freeze's frozen scale and shift are not nnx.Param, so no filter names them
_FINE_TUNED = nnx.All(nnx.Param, nnx.Not(nnx.PathContains(fine_tuning.FIXED_LAYER)))


@nnx.jit
def _nnx_fine_tuning_step(model, optimizer, x, target):
    def loss(m):
        return 0.5 * jnp.mean((m(x) - target) ** 2)

    optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, _FINE_TUNED))(model))


def fine_tune_nnx(run: fine_tuning.FineTuningRun) -> List[Dict[str, np.ndarray]]:
    momentum, eps = run.framework_settings("flax")
    model = _NNXFineTuningNet(momentum, eps, _DTYPES[run.dtype])
    for layer, values in _fine_tuning_arrays(run).items():
        for name, value in values.items():
            getattr(getattr(model, layer), name).set_value(value)
    model.train()
    if run.freeze:
        xnorm.freeze(model, layers=lambda name, layer: name == fine_tuning.FROZEN_LAYER)
    test_x = _nchw_to_nhwc(run.test_x, run.dtype)

    def record():
        model.eval()
        backbone, output = model.backbone(test_x), model(test_x)
        model.train()
        arrays = {}
        for layer in ("conv1", "bn1", "conv2", "bn2", "fc"):
            module = getattr(model, layer)
            arrays[layer] = {key: var.get_value() for key, var in vars(module).items() if isinstance(var, nnx.Variable)}
        return _fine_tuning_record(arrays, backbone, output)

    def step(optimizer, batch):
        model.train()  # what undoes a hand-made bn.eval(), every epoch
        _nnx_fine_tuning_step(model, optimizer, _nchw_to_nhwc(batch[0], run.dtype), _target(batch[1], run.dtype))

    return run.schedule(record=record, new_trainer=lambda: nnx.Optimizer(model, optax.sgd(run.lr), wrt=_FINE_TUNED),
                        step=step, unfreeze=lambda: xnorm.unfreeze(model))
