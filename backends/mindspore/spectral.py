"""Spectral normalization for the MindSpore backend: ``xnorm.spectral_norm(cell)``.

``xnorm.wrap(layer, xnorm.SpectralNorm(...))`` (or ``xnorm.spectral_norm(layer)``) returns a
:class:`SpectralNormCell` around a ``mindspore.nn`` layer. It computes what
:class:`xnorm.spec.SpectralNorm` defines (torch's ``parametrizations.spectral_norm``): with ``M`` the
matrix view of the weight ``W`` (the canonical, torch layout with ``dim`` moved first and the other
axes flattened: ``(h, w)``) and the unit vectors ``u`` (h) and ``v`` (w), every call of ``construct``
does ::

    if self.training:                       # n_power_iterations times, no gradient, written back
        u = normalize(M v);  v = normalize(M^T u)
    sigma = u . (M v)
    w     = W / sigma                       # gradient flows through W and through sigma's M

where ``normalize(x) = x / max(||x||, eps)``, and runs the layer's own primitive on ``w``
(:class:`~xnorm._backends.mindspore.ReparametrizedCell`), so that ``dL/dw`` reaches ``W`` in GRAPH_MODE,
in PYNATIVE_MODE and inside ``mindspore.jit`` functions. A 1-D parameter (``name="bias"``) is
``W / max(||W||, eps)`` and has no state.

Parameters and names
    ``<name>_orig`` (W, trainable as the layer's weight was, MindSpore's storage layout and dtype),
    then ``<name>_u`` and ``<name>_v`` (``requires_grad=False``: optimizers built from
    ``trainable_params()`` leave them alone, checkpoints hold them), then the layer's other parameters:
    ``weight_orig``, ``weight_u``, ``weight_v``, ``bias``, torch's legacy ``spectral_norm`` names
    (``embedding_table_orig``/``_u``/``_v`` for an Embedding).

State
    u and v are 1-D, in the compute dtype: float32 for float16/bfloat16 weights, else the weight's.
    The matrix view is built from the canonical layout (MindSpore's Conv1d/Conv1dTranspose unit axis
    skipped), so u and v are torch's vectors for the same layer: a torch ``weight_u``/``_u`` copies in
    unchanged. At wrap, ``numpy.random.standard_normal`` draws u, then v, from NumPy's global RNG (which
    ``mindspore.set_seed`` and ``numpy.random.seed`` seed: the same seed gives the same state); they are
    normalized and iterated :data:`~xnorm.spec.SPECTRAL_INIT_ITERATIONS` times with the forward's kernels.
    A training-mode ``construct`` writes them back with ``ops.assign``, a side effect MindSpore keeps in
    compiled graphs, also under ``mindspore.grad``/``value_and_grad`` (the forward runs once, so one
    training step iterates ``n_power_iterations`` times, as in torch).

Training mode
    The wrapper starts in training mode, whatever the wrapped layer's flag: a torch Module starts in
    training mode, and so does the graph a fresh MindSpore Cell compiles (its phase is ``"train"``
    although its ``training`` flag is False). The flag is a constant of a compiled graph, and a Cell's
    graph key holds its phase (``"train"``/``"predict"``), not the flags of the Cells inside it: had the
    wrapper started in eval mode, a model called once before ``set_train(True)`` would have compiled its
    ``"train"`` graph without the iteration and kept it. ``net.set_train(False)`` (phase ``"predict"``)
    stops the iteration and ``net.set_train(True)`` resumes it, from the next call of ``net``. A
    ``mindspore.jit`` function keeps the mode it was compiled in, and a child's own ``set_train`` does not
    reach the graph of a parent that already ran (MindSpore's rule for every layer, BatchNorm included):
    call ``set_train`` on the Cell you call.

Precision
    float16 and bfloat16 weights: W is cast to float32, the iteration, sigma and ``W / sigma`` are computed
    in float32 and ``w`` is cast back once. float32 and float64 are computed as they are.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mindspore
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from xnorm.spec import (
    LOW_PRECISION_DTYPES,
    SPECTRAL_INIT_ITERATIONS,
    SpectralNorm,
    StorageLayout,
    spectral_matrix_shape,
)

from . import ReparametrizedCell, _dtype_name

__all__ = ["SpectralNormCell", "wrap_spectral"]


def _normalize(x, eps: float):
    """``x / max(||x||, eps)`` for a 1-D ``x`` (torch's ``F.normalize``): a zero vector stays zero."""
    return x / ops.maximum(ops.sqrt(ops.reduce_sum(x * x)), eps)


def _power_iteration(matrix, u, v, iterations: int, eps: float):
    """``iterations`` times ``u = normalize(M v)``, then ``v = normalize(M^T u)``; returns ``(u, v)``.

    ``matrix`` is ``(h, w)``; the caller stops its gradient. Used in ``construct`` (compiled) and eagerly.
    """
    for _ in range(iterations):
        u = _normalize(ops.matmul(matrix, v), eps)
        v = _normalize(ops.matmul(u, matrix), eps)
    return u, v


def _sigma(matrix, u, v):
    """``u . (M v)`` with no gradient through ``u`` and ``v``."""
    return ops.reduce_sum(ops.stop_gradient(u) * ops.matmul(matrix, ops.stop_gradient(v)))


def _matrix_plan(layout: StorageLayout, dim: int, storage_shape: Tuple[int, ...]):
    """How to get the matrix view from a weight in storage layout: ``(perm, (h, w))``.

    ``perm`` transposes storage axes into canonical order with ``dim`` first (MindSpore's unit axes last,
    where their size 1 leaves the flattening unchanged), or is None when the storage order already is that
    order up to unit axes and a reshape suffices.
    """
    canonical = layout.canonical_shape(storage_shape)
    order = (dim,) + tuple(axis for axis in range(len(canonical)) if axis != dim)
    positions = tuple(layout.storage_axis(axis) for axis in order)
    perm = positions + tuple(sorted(layout.unit_axes))
    needed = list(positions) != sorted(positions)
    return (perm if needed else None), spectral_matrix_shape(canonical, dim)


def _matrix(weight, perm: Optional[Tuple[int, ...]], shape: Tuple[int, int]):
    """The ``(h, w)`` matrix view of ``weight`` (storage layout) per :func:`_matrix_plan`."""
    if perm is not None:
        weight = ops.transpose(weight, perm)
    return ops.reshape(weight, shape)


class SpectralNormCell(ReparametrizedCell):
    """A MindSpore layer whose weight is ``W / sigma(W)`` (spectral normalization); see the module docstring.

    Built by :func:`xnorm.wrap` with a :class:`xnorm.spec.SpectralNorm`; not meant to be constructed directly.

    Parameters, in this order: ``<name>_orig`` (W in the weight's storage shape and dtype, trainable when
    the weight was), ``<name>_u`` (h) and ``<name>_v`` (w), not trainable, in the compute dtype (absent for
    a 1-D parameter), then the layer's other parameters under their own names.

    Inputs and outputs are those of the wrapped layer.

    Attributes (in addition to :class:`~xnorm._backends.mindspore.ReparametrizedCell`'s):
        dim: the canonical axis that becomes the matrix's rows (resolved: ``0 <= dim < ndim``).
        n_power_iterations: iterations per training-mode call (>= 1).
        eps: the floor of every norm in ``normalize``.
        matrix_shape: ``(h, w)``, or None for a 1-D parameter.
    """

    description = "spectral-normalized"

    def __init__(self, layer: nn.Cell, kind: str, name: str, spec: SpectralNorm, dim: int, weight: Tensor,
                 state: Optional[Tuple[Tensor, Tensor]], perm: Optional[Tuple[int, ...]],
                 matrix_shape: Optional[Tuple[int, int]]):
        super().__init__(layer, kind, name)
        self.dim = dim
        self.n_power_iterations = spec.n_power_iterations
        self.eps = spec.eps
        self.matrix_shape = matrix_shape
        self._perm = perm
        self._weight_dtype = weight.dtype
        self._compute_dtype = _compute_dtype(weight.dtype)
        self._low_precision = self._compute_dtype != weight.dtype
        self._orig_name = name + "_orig"
        self._u_name = name + "_u"
        self._v_name = name + "_v"
        self.own_parameter_names = (self._orig_name,) + ((self._u_name, self._v_name) if state else ())

        requires_grad = getattr(layer, name).requires_grad
        setattr(self, self._orig_name, Parameter(weight, name=self._orig_name, requires_grad=requires_grad))
        if state is not None:
            setattr(self, self._u_name, Parameter(state[0], name=self._u_name, requires_grad=False))
            setattr(self, self._v_name, Parameter(state[1], name=self._v_name, requires_grad=False))
        self._adopt_layer(layer)
        self.set_train(True)  # see "Training mode" in the module docstring

    # -- the reparametrization ---------------------------------------------------------------------
    def _work(self):
        """W in the compute dtype (storage layout), differentiable."""
        weight = getattr(self, self._orig_name)
        return ops.cast(weight, self._compute_dtype) if self._low_precision else weight

    def _normalized(self, work, iterate: bool):
        """``W / sigma`` in the compute dtype; ``iterate``: run the power iterations first and write u, v back."""
        if self.matrix_shape is None:
            return _normalize(work, self.eps)
        matrix = _matrix(work, self._perm, self.matrix_shape)
        u_param = getattr(self, self._u_name)
        v_param = getattr(self, self._v_name)
        u = u_param
        v = v_param
        if iterate:
            u, v = _power_iteration(ops.stop_gradient(matrix), u, v, self.n_power_iterations, self.eps)
            ops.assign(u_param, u)
            ops.assign(v_param, v)
        return work / _sigma(matrix, u, v)

    def _cast_back(self, w):
        return ops.cast(w, self._weight_dtype) if self._low_precision else w

    def _weight(self):
        """``w`` as this call computes it: iterating first in training mode (compiled as a constant branch)."""
        return self._cast_back(self._normalized(self._work(), self.training))

    def compute_weight(self) -> Tensor:
        """``w`` as an eval-mode forward computes it, from the current u and v, which it leaves unchanged
        (storage layout, the weight's dtype). The next training-mode forward iterates first."""
        return self._cast_back(self._normalized(self._work(), False))

    def _weight_for_removal(self) -> Tensor:
        """In training mode the iterations a training-mode forward would run (u, v written back), then
        ``w``; in eval mode ``w`` from the current state (torch's removal does the same)."""
        return self._cast_back(self._normalized(self._work(), self.training))

    @property
    def sigma(self) -> Tensor:
        """The current estimate ``u . (M v)`` in the compute dtype (0-d; ``||W||`` for a 1-D parameter)."""
        work = self._work()
        if self.matrix_shape is None:
            return ops.sqrt(ops.reduce_sum(work * work))
        return _sigma(_matrix(work, self._perm, self.matrix_shape), getattr(self, self._u_name),
                      getattr(self, self._v_name))

    def extend_repr(self) -> str:
        return (f"layer={type(self._xnorm_layer).__name__}, name={self.wrapped_name!r}, dim={self.dim}, "
                f"n_power_iterations={self.n_power_iterations}, eps={self.eps}")


def _compute_dtype(dtype):
    """The dtype u, v, sigma and ``W / sigma`` are computed in for a weight of ``dtype`` (the spec's rule)."""
    return mindspore.float32 if _dtype_name(dtype) in LOW_PRECISION_DTYPES else dtype


def wrap_spectral(layer: nn.Cell, kind: str, kind_for_dim: str, name: str, spec: SpectralNorm,
                  layout: StorageLayout) -> SpectralNormCell:
    """The :class:`SpectralNormCell` of ``layer``'s parameter ``name`` (already checked: it exists and is
    floating), with its state drawn and iterated. ``kind_for_dim`` decides ``dim=None`` (1 for the
    ConvTranspose kinds); ``layout`` maps the parameter's storage onto the canonical layout.

    Raises:
        DimError: ``spec.dim`` is not None or an int within the canonical rank; nothing has changed.
    """
    param = layer._params[name]
    dim = spec.resolved_dim(layout.canonical_ndim, kind_for_dim)  # raises DimError before anything changes
    weight = param.value().copy()
    if layout.canonical_ndim < 2:
        return SpectralNormCell(layer, kind, name, spec, dim, weight, None, None, None)
    perm, (h, w) = _matrix_plan(layout, dim, tuple(param.shape))
    compute = _compute_dtype(weight.dtype)
    host = np.float64 if compute == mindspore.float64 else np.float32
    # u first, then v, as torch draws them; NumPy's global RNG, which mindspore.set_seed seeds.
    u = Tensor(np.random.standard_normal(h).astype(host))
    v = Tensor(np.random.standard_normal(w).astype(host))
    matrix = _matrix(ops.cast(weight, compute), perm, (h, w))
    u, v = _power_iteration(matrix, _normalize(u, spec.eps), _normalize(v, spec.eps), SPECTRAL_INIT_ITERATIONS,
                            spec.eps)
    return SpectralNormCell(layer, kind, name, spec, dim, weight, (u, v), perm, (h, w))
