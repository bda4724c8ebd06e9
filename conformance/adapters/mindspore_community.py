"""The community weight-norm wrapper for MindSpore run through xnorm's suite (not xnorm).

MindSpore ships no weight norm. The wrapper that blog posts and ports pass around keeps ``g`` and ``v``
as Parameters of a wrapper Cell and, in ``construct``, ``ops.Assign``s ``g * v / ||v||`` into the
wrapped layer's own weight before calling the layer. :class:`AssignWeightNorm` is that pattern, written
for every catalogue layer (the weight in MindSpore's storage layout, the norm over every axis but
``dim``'s). Assign is a side effect, not part of the differentiated computation: the loss reaches the
layer's weight, never ``g`` and ``v``, so their gradients are exactly zero and they never train, while
the optimizer moves the layer's weight, which the next call overwrites. The adapter ``mindspore-assign``
runs it in GRAPH_MODE and the report shows where it departs from the spec
(``expected_failures/mindspore-assign.toml``).

Protocol: ``g`` and ``v`` are the wrapper's ``weight_g`` and ``weight_v`` (``g`` keeps the weight's rank
with size 1 on every axis but ``dim``'s, 0-d for ``dim=None``), ``weight`` is ``g * v / ||v||`` as the
next call would assign it, and ``remove`` takes the wrapped layer out, holding whatever was last
assigned into it and trained since (what a user of the pattern keeps).

MindSpore ships no spectral norm either; the one community port found (docs/spec.md's comparison) is
not a reparametrization to run through this suite: it replaces the weight in place on every call.
Only float32 runs (MindSpore's CPU convolutions reject float64; see the ``mindspore-graph`` adapter).
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from xnorm.spec import Reparametrization, StorageLayout

from .. import fine_tuning
from .mindspore import MindSporeGraphAdapter, _canonical, _to_numpy

__all__ = ["AssignWeightNorm", "MindSporeAssignAdapter"]


class AssignWeightNorm(nn.Cell):
    """The community wrapper: ``ops.Assign(layer.<weight>, g * v / ||v||)``, then ``layer(x)``.

    ``axes`` are the storage axes the norm runs over (every axis but the one holding ``dim``; all of
    them for ``dim=None``). ``g`` starts at ``||v||`` (the wrapper preserves the layer's function) and
    ``v`` at a copy of the weight.
    """

    def __init__(self, layer: nn.Cell, axes: tuple, weight_name: str = "weight") -> None:
        super().__init__()
        self.layer = layer
        self.axes = axes
        self.is_embedding = weight_name == "embedding_table"
        value = getattr(layer, weight_name).asnumpy()
        self.weight_g = Parameter(Tensor(np.sqrt((value * value).sum(axis=axes, keepdims=True))), name="weight_g")
        self.weight_v = Parameter(Tensor(value.copy()), name="weight_v")
        self.assign = ops.Assign()

    def compute_weight(self):
        norm = ops.sqrt((self.weight_v * self.weight_v).sum(self.axes, keepdims=True))
        return self.weight_v * (self.weight_g / norm)

    def construct(self, x):
        if self.is_embedding:
            self.assign(self.layer.embedding_table, self.compute_weight())
        else:
            self.assign(self.layer.weight, self.compute_weight())
        return self.layer(x)


class MindSporeAssignAdapter(MindSporeGraphAdapter):
    """:class:`AssignWeightNorm` in GRAPH_MODE (not xnorm); departures: ``expected_failures/mindspore-assign.toml``."""

    name = "mindspore-assign"
    dtypes = ("float32",)
    dtype_reasons = {
        **MindSporeGraphAdapter.dtype_reasons,
        "float64": "the community wrapper runs at float32 only: its departures (zero gradients for g and v) are "
        "structural, and MindSpore's CPU convolutions reject float64",
    }
    reparametrizations = ("weight_norm",)
    reparametrization_reasons = {
        "spectral_norm": "MindSpore has no spectral norm and the community port found is a projection in place, "
        "not a reparametrization (docs/spec.md)",
        "orthogonal": "MindSpore has an orthogonal initializer only; there is no community parametrization to run",
        "freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER,
    }

    def __init__(self) -> None:
        super().__init__()
        self._specs: weakref.WeakKeyDictionary[nn.Cell, Reparametrization] = weakref.WeakKeyDictionary()

    @property
    def _reuse(self) -> bool:
        # layers are built afresh: a wrapper's Assign writes into its layer, so no layer is shared
        return False

    def wrap(self, handle: nn.Cell, spec: Reparametrization) -> nn.Cell:
        layout: StorageLayout = self._layouts[handle]
        ndim = layout.storage_ndim
        dim = spec.resolved_dim(layout.canonical_ndim)
        axes = tuple(range(ndim)) if dim is None else tuple(a for a in range(ndim) if a != layout.storage_axis(dim))
        name = "embedding_table" if isinstance(handle, nn.Embedding) else "weight"
        wrapped = AssignWeightNorm(handle, axes, name)
        self._layouts[wrapped] = layout
        self._specs[wrapped] = spec
        return wrapped

    def remove(self, handle: nn.Cell) -> nn.Cell:
        plain = handle.layer
        self._layouts[plain] = self._layouts[handle]
        return plain

    def _tensors(self, handle: nn.Cell) -> Dict[str, Parameter]:
        if not isinstance(handle, AssignWeightNorm):
            return super()._tensors(handle)
        out = {"g": handle.weight_g, "v": handle.weight_v}
        if isinstance(getattr(handle.layer, "bias", None), Parameter):
            out["bias"] = handle.layer.bias
        return out

    def _g_protocol(self, handle: nn.Cell, values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """``g`` 0-d for ``dim=None`` (the storage keeps it with size-1 axes)."""
        spec: Optional[Reparametrization] = self._specs.get(handle)
        if "g" in values and spec is not None and spec.resolved_dim(self._layouts[handle].canonical_ndim) is None:
            values["g"] = values["g"].reshape(())
        return values

    def parameters(self, handle: nn.Cell) -> Dict[str, np.ndarray]:
        return self._g_protocol(handle, super().parameters(handle))

    def gradients(self, handle: nn.Cell, x: np.ndarray, grad_output: np.ndarray) -> Dict[str, np.ndarray]:
        return self._g_protocol(handle, super().gradients(handle, x, grad_output))

    def weight(self, handle: nn.Cell) -> np.ndarray:
        if isinstance(handle, AssignWeightNorm):
            return _canonical(_to_numpy(handle.compute_weight()), self._layouts[handle])
        return super().weight(handle)
