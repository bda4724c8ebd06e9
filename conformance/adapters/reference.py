"""A conformance adapter made of xnorm's float64 NumPy reference itself: the smallest complete adapter.

It passes every check by construction, so it tests the suite (a correct backend passes, a subclass that
breaks one method fails the checks that concern it) and shows a third-party backend what the
protocol asks for: ``xnorm conformance --backend xnorm.conformance.adapters.reference:ReferenceAdapter``.
It runs float64 on the "cpu" device only and reports "gpu" absent.
"""

from __future__ import annotations

import copy

import numpy as np

from xnorm import reference, reference_orthogonal, reference_spectral
from xnorm.spec import Orthogonal, WeightNorm, spectral_matrix_shape

from .. import fine_tuning, layers
from ..adapter import Adapter
from ..cases import CATALOGUE_REPARAMETRIZATIONS

__all__ = ["ReferenceAdapter"]


class ReferenceAdapter(Adapter):
    """A backend made of the reference itself: everything must pass."""

    name = "numpy-reference"
    backend = "numpy"
    dtypes = ("float64",)
    devices = ("cpu", "gpu")
    reparametrizations = CATALOGUE_REPARAMETRIZATIONS

    def supports_device(self, device):
        return device == "cpu"

    def build(self, layer, weight, bias, dtype):
        bias = None if bias is None else np.array(bias)
        return {"layer": layer, "weight": np.array(weight, np.float64), "bias": bias}

    def wrap(self, handle, spec):
        weight, layer = handle["weight"], handle["layer"]
        out = {"layer": layer, "spec": spec, "bias": handle["bias"], "state": {}}
        if isinstance(spec, WeightNorm):
            out["tensors"] = dict(zip(("g", "v"), reference.init(weight, spec.dim), strict=True))
        elif isinstance(spec, Orthogonal):
            tall = weight if weight.shape[-2] >= weight.shape[-1] else np.swapaxes(weight, -1, -2)
            n, k = tall.shape[-2:]
            completion = self._rng.standard_normal(tall.shape[:-2] + (n, n - k))
            original, base = reference_orthogonal.register(
                weight, spec.resolved_map(weight.shape), use_trivialization=spec.use_trivialization,
                completion=completion,
            )
            out["tensors"] = {"original": original}
            if base is not None:
                out["state"] = {"base": base}
        else:
            out["tensors"] = {"original": weight.copy()}
            dim = spec.resolved_dim(weight.ndim, layer.kind)
            if weight.ndim > 1:
                h, w = spectral_matrix_shape(weight.shape, dim)
                u, v = reference_spectral.init_state(weight, self._rng.standard_normal(h),
                                                     self._rng.standard_normal(w), dim, spec.eps)
                out["state"] = {"u": u, "v": v}
        return out

    def __init__(self):
        self._rng = np.random.default_rng(0)

    def seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def _dim(self, handle):
        return handle["spec"].resolved_dim(handle["tensors"].get("original", handle["tensors"].get("v")).ndim,
                                           handle["layer"].kind)

    def _call(self, handle, training):
        """(w, new state) of one use; spectral norm iterates in training mode."""
        spec, tensors, state = handle["spec"], handle["tensors"], handle["state"]
        if isinstance(spec, WeightNorm):
            return reference.weight_norm(tensors["g"], tensors["v"], spec.dim), state
        if isinstance(spec, Orthogonal):
            original = tensors["original"]
            return reference_orthogonal.forward(original, spec.resolved_map(original.shape), state.get("base")), state
        dim = self._dim(handle)
        if training and state:
            w, u, v = reference_spectral.training_call(
                tensors["original"], state["u"], state["v"], dim, spec.n_power_iterations, spec.eps
            )
            return w, {"u": u, "v": v}
        w = reference_spectral.spectral_norm(tensors["original"], state.get("u"), state.get("v"), dim, spec.eps)
        return w, state

    def remove(self, handle):
        w, _ = self._call(handle, training=True)
        return {"layer": handle["layer"], "weight": w, "bias": handle["bias"]}

    def parameters(self, handle):
        out = dict(handle["tensors"]) if "tensors" in handle else {"weight": handle["weight"]}
        if handle["bias"] is not None:
            out["bias"] = handle["bias"]
        return out

    def state(self, handle):
        return dict(handle.get("state", {}))

    def set_state(self, handle, state):
        return {**handle, "state": {k: np.array(v, np.float64) for k, v in state.items()}}

    def parameter_names(self, handle):
        return list(self.parameters(handle))

    def weight(self, handle):
        return self._call(handle, training=False)[0] if "tensors" in handle else handle["weight"]

    def forward(self, handle, x, *, training=True):
        if "tensors" not in handle:
            return layers.forward(handle["layer"], handle["weight"], handle["bias"], x)
        w, state = self._call(handle, training)
        handle["state"] = state  # the state moves in place, as a framework's buffers do
        return layers.forward(handle["layer"], w, handle["bias"], x)

    def _gradients(self, handle, w, state, x, grad_output):
        spec, tensors = handle["spec"], handle["tensors"]
        grad_w, grad_b = layers.backward(handle["layer"], w, x, grad_output)
        if isinstance(spec, WeightNorm):
            grad_g, grad_v = reference.weight_norm_grads(tensors["g"], tensors["v"], grad_w, spec.dim)
            out = {"g": grad_g, "v": grad_v}
        elif isinstance(spec, Orthogonal):
            original = tensors["original"]
            out = {"original": reference_orthogonal.gradient(
                original, grad_w, spec.resolved_map(original.shape), state.get("base"))}
        else:
            out = {"original": reference_spectral.spectral_norm_grad(
                tensors["original"], state.get("u"), state.get("v"), grad_w, self._dim(handle), spec.eps)}
        if handle["bias"] is not None:
            out["bias"] = grad_b
        return out

    def gradients(self, handle, x, grad_output):
        w, handle["state"] = self._call(handle, training=True)
        return self._gradients(handle, w, handle["state"], x, grad_output)

    def sgd_step(self, handle, x, target, lr):
        w, state = self._call(handle, training=True)
        y = layers.forward(handle["layer"], w, handle["bias"], x)
        grads = self._gradients(handle, w, state, x, (y - target) / y.size)
        new = {**handle, "tensors": dict(handle["tensors"]), "state": state}
        for key, grad in grads.items():
            if key == "bias":
                new["bias"] = handle["bias"] - lr * grad
            else:
                new["tensors"][key] = handle["tensors"][key] - lr * grad
        return new

    def state_roundtrip(self, handle, fresh):
        return {**fresh, "tensors": copy.deepcopy(handle["tensors"]), "bias": copy.deepcopy(handle["bias"]),
                "state": copy.deepcopy(handle["state"])}

    def fine_tune(self, run):
        record = dict(run.weights)
        record.update(fine_tuning.reference_eval(record, run))
        records = [record]
        for index, batch in enumerate(run.batches):
            frozen = run.freeze and index < fine_tuning.FROZEN_STEPS  # unfreeze before the last step
            records.append(fine_tuning.reference_step(records[-1], batch, run, "torch", frozen=frozen))
        return records
