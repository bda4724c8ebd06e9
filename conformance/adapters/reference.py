"""A conformance adapter made of xnorm's float64 NumPy reference itself: the smallest complete adapter.

It passes every check by construction, so it tests the suite (a correct backend passes, a subclass that
breaks one method fails the checks that concern it) and shows a third-party backend what the
protocol asks for: ``xnorm conformance --backend xnorm.conformance.adapters.reference:ReferenceAdapter``.
It runs float64 on the "cpu" device only and reports "gpu" absent.
"""

from __future__ import annotations

import copy

import numpy as np

from xnorm import reference

from .. import layers
from ..adapter import Adapter

__all__ = ["ReferenceAdapter"]


class ReferenceAdapter(Adapter):
    """A backend made of the reference itself: everything must pass."""

    name = "numpy-reference"
    backend = "numpy"
    dtypes = ("float64",)
    devices = ("cpu", "gpu")

    def supports_device(self, device):
        return device == "cpu"

    def build(self, layer, weight, bias, dtype):
        return {
            "layer": layer,
            "weight": np.array(weight, np.float64),
            "bias": None if bias is None else np.array(bias),
        }

    def wrap(self, handle, dim):
        g, v = reference.init(handle["weight"], dim)
        return {"layer": handle["layer"], "dim": dim, "g": g, "v": v, "bias": handle["bias"]}

    def remove(self, handle):
        return {"layer": handle["layer"], "weight": self.weight(handle), "bias": handle["bias"]}

    def parameters(self, handle):
        keys = ("g", "v", "bias") if "g" in handle else ("weight", "bias")
        return {k: handle[k] for k in keys if handle.get(k) is not None}

    def parameter_names(self, handle):
        return list(self.parameters(handle))

    def weight(self, handle):
        return reference.weight_norm(handle["g"], handle["v"], handle["dim"]) if "g" in handle else handle["weight"]

    def forward(self, handle, x, *, training=True):
        return layers.forward(handle["layer"], self.weight(handle), handle["bias"], x)

    def gradients(self, handle, x, grad_output):
        grad_w, grad_b = layers.backward(handle["layer"], self.weight(handle), x, grad_output)
        grad_g, grad_v = reference.weight_norm_grads(handle["g"], handle["v"], grad_w, handle["dim"])
        out = {"g": grad_g, "v": grad_v}
        if handle["bias"] is not None:
            out["bias"] = grad_b
        return out

    def sgd_step(self, handle, x, target, lr):
        y = self.forward(handle, x)
        grads = self.gradients(handle, x, (y - target) / y.size)
        new = dict(handle)
        for key, grad in grads.items():
            new[key] = handle[key] - lr * grad
        return new

    def state_roundtrip(self, handle, fresh):
        loaded = dict(fresh)
        loaded.update(copy.deepcopy(self.parameters(handle)))
        return loaded
