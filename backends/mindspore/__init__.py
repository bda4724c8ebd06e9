"""MindSpore backend: weight normalization computed in ``construct`` (spectral normalization: :mod:`.spectral`;
the orthogonal parametrization: :mod:`.orthogonal`).

``xnorm.wrap(layer, backend="mindspore", dim=0)`` returns a :class:`WeightNormCell` around a
``mindspore.nn`` layer. On every call the wrapper computes ::

    norm = sqrt(sum(v ** 2 over every axis except dim, keepdims) [+ eps])
    w    = v * (g / norm)

and runs the layer's operation (``MatMul``, ``Conv2D``, ``Conv2DBackpropInput``..., built by the wrapper from
the layer's public configuration, see :mod:`.layer_ops`) on ``w``. Because
``w`` is an ordinary value of the compiled graph, automatic differentiation carries ``dL/dw`` back to
``g`` and ``v`` in GRAPH_MODE, in PYNATIVE_MODE and inside ``mindspore.jit`` functions. The pattern
this replaces (``ops.Assign(inner.weight, g * v / ||v||)`` followed by ``inner(x)``) has no such path:
the gradient lands on ``inner.weight``, which the next call overwrites, and ``g`` and ``v`` get zeros.

Parameters and names
    The wrapper's trainable parameters are exactly ``<name>_g``, ``<name>_v`` and the layer's other
    parameters under their own names (``weight_g``, ``weight_v``, ``bias``; ``embedding_table_g`` and
    ``embedding_table_v`` for an Embedding), so that once it is attached as ``net.conv`` they read
    ``conv.weight_g``, ``conv.weight_v``, ``conv.bias`` like torch's legacy ``weight_norm``. The wrapped
    layer itself is held outside the Cell tree: its old ``weight`` is not a parameter of the wrapper and
    does not appear in checkpoints.

Layouts
    ``dim`` is read in the canonical (torch) layout of :class:`xnorm.spec.LayerKind`. MindSpore stores
    Conv1d weights as ``(out, in/groups, 1, k)`` and Conv1dTranspose weights as ``(in, out/groups, 1, k)``;
    the extra unit axis is skipped (``StorageLayout(perm=(0, 1, 2), unit_axes=(2,))``), so ``dim=2``
    means the kernel axis, as on a torch Conv1d. ``g`` and ``v`` keep MindSpore's storage rank: ``v`` has
    the weight's stored shape and ``g`` that shape with every axis but ``dim`` reduced to 1 (a 0-d
    scalar for ``dim=None``/``-1``). All other layers store the canonical layout unchanged.

Precision
    float16 and bfloat16 weights: ``g`` and ``v`` keep the weight's dtype, the norm and ``w`` are
    computed in float32 and ``w`` is cast back to the weight's dtype once. float32 and float64 are
    computed as they are. MindSpore 2.10's CPU kernels run convolutions in float16 and float32 only (no
    float64, no bfloat16) and MatMul in float16/float32/float64; those limits are MindSpore's, not the
    wrapper's.

Spectral normalization
    ``xnorm.wrap(layer, xnorm.SpectralNorm(...))`` returns a
    :class:`~xnorm._backends.mindspore.spectral.SpectralNormCell` (``spectral.py``): the same
    :class:`ReparametrizedCell` machinery (layer held outside the Cell tree, the layer's primitive run on
    ``w``, ``remove``), with ``w = W / sigma`` and the power-iteration state ``<name>_u``/``<name>_v``.

Orthogonal parametrization
    ``xnorm.wrap(layer, xnorm.Orthogonal(...))`` returns an
    :class:`~xnorm._backends.mindspore.orthogonal.OrthogonalCell` (``orthogonal.py``): the same machinery
    with ``<name>_orig`` and the fixed ``<name>_base``; its maps are built from primitives that have
    gradients (MindSpore 2.10 has no CPU ``MatrixExp`` kernel and no ``Qr`` bprop).

Fused path
    ``xnorm.wrap(layer, fused=True)`` returns a :class:`~xnorm._backends.mindspore.fused.FusedWeightNormCell`
    (same parameters, checkpoints, ``remove`` and errors) whose construct runs the primitive on ``v`` and
    scales the output or input by ``g / ||v||`` instead of building ``w``; see ``fused.py``.

Removal and compiled graphs
    ``xnorm.remove(wrapper)`` returns the original layer object with ``weight`` replaced by a new
    Parameter holding ``w``. ``xnorm.remove(model)`` swaps every wrapper inside ``model`` for its plain
    layer in place. MindSpore caches a compiled graph per Cell under a key made of the Cell's
    ``create_time``, its ``id`` and its argument signature, and does not look at child Cells again:
    after a child is swapped, the old graph would keep running. ``remove`` therefore gives ``model``
    and every Cell inside it a new ``create_time``, which makes the next call compile afresh. Cells
    *outside* ``model`` (a larger network holding it, a ``mindspore.jit`` function closing over it) are
    not reachable from ``model``: call ``remove`` on the outermost Cell you call, and rebuild jit
    functions after removing.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import mindspore
from mindspore import Parameter, Tensor, nn, ops

from xnorm.api import _not_wrapped
from xnorm.errors import (
    AlreadyWrappedError,
    BackendDetectionError,
    MissingParameterError,
    NotFrozenError,
    OptionError,
    UnsupportedLayerError,
)
from xnorm.registry import Backend
from xnorm.spec import (
    LayerKind,
    Orthogonal,
    Reparametrization,
    SpectralNorm,
    StorageLayout,
    WeightNorm,
    check_floating,
    check_fused_option,
    check_fused_spec,
)

from . import freeze as _freeze  # imports nothing from this package when loaded
from .layer_ops import LayerOperation

__all__ = ["MindSporeBackend", "ReparametrizedCell", "WeightNormCell", "SUPPORTED_LAYERS"]

#: Layer class -> (canonical kind, name of its weight parameter). Exact classes only: a subclass may
#: override ``construct``, and the wrapper reproduces the construct of these classes, nothing else.
SUPPORTED_LAYERS: Dict[type, Tuple[str, str]] = {
    nn.Dense: (LayerKind.LINEAR, "weight"),
    nn.Conv1d: ("conv1d", "weight"),
    nn.Conv2d: ("conv2d", "weight"),
    nn.Conv3d: ("conv3d", "weight"),
    nn.Conv1dTranspose: ("conv_transpose1d", "weight"),
    nn.Conv2dTranspose: ("conv_transpose2d", "weight"),
    nn.Conv3dTranspose: ("conv_transpose3d", "weight"),
    nn.Embedding: (LayerKind.EMBEDDING, "embedding_table"),
}

# MindSpore dtype -> spec dtype name; anything missing here is not floating.
_DTYPE_NAMES = {
    mindspore.float16: "float16",
    mindspore.bfloat16: "bfloat16",
    mindspore.float32: "float32",
    mindspore.float64: "float64",
}

def _supported_list() -> str:
    return ", ".join(f"mindspore.nn.{cls.__name__}" for cls in SUPPORTED_LAYERS)


def _storage_layout(kind: str, storage_ndim: int) -> StorageLayout:
    """How MindSpore stores a weight of ``kind`` relative to the canonical layout."""
    if kind in ("conv1d", "conv_transpose1d") and storage_ndim == 4:
        return StorageLayout(perm=(0, 1, 2), unit_axes=(2,))
    return StorageLayout.identity(storage_ndim)


def _dtype_name(dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).lower())


class ReparametrizedCell(LayerOperation):
    """What every xnorm wrapper shares, whatever its reparametrization: a MindSpore layer whose parameter
    ``wrapped_name`` is computed in ``construct`` (by :meth:`_weight`) and passed to the layer's operation.

    Not built directly: :class:`WeightNormCell`, :class:`~xnorm._backends.mindspore.spectral.SpectralNormCell`
    and :class:`~xnorm._backends.mindspore.fused.FusedWeightNormCell` are. A subclass sets its own
    parameters first, then calls :meth:`_adopt_layer`, and implements :meth:`_weight` (differentiable,
    storage layout, the weight's dtype), and lists its own parameters in ``own_parameter_names``.

    The wrapped layer is held as a plain attribute, outside the Cell tree, so its stale ``<name>`` is not
    a parameter of the wrapper and is not saved. The layer's other parameters (``bias``) and its child
    Cells (a Dense ``activation``) become the wrapper's under the same names. The layer's operation is
    rebuilt from its public configuration with the wrapper's own primitives
    (:class:`~.layer_ops.LayerOperation`): the wrapper reads none of the layer's undocumented attributes.

    Attributes:
        wrapped_name: the name of the reparametrized parameter (``"weight"``, ``"embedding_table"``).
        kind: the canonical layer kind (:class:`xnorm.spec.LayerKind`).
        own_parameter_names: the wrapper's own parameters (trainable tensors, then state), the ones
            ``remove`` replaces by ``<name>``.
    """

    own_parameter_names: Tuple[str, ...] = ()
    #: what the wrapper did to the parameter, for messages ("weight-normalized")
    description: str = "reparametrized"
    #: child Cells the wrapper made for itself (not the layer's), which ``remove`` does not hand to the layer
    helper_cells: Tuple[str, ...] = ()

    def __init__(self, layer: nn.Cell, kind: str, name: str):
        super().__init__()
        # A plain attribute, not a child Cell: the layer's own ``weight`` must stay out of
        # parameters_and_names(), checkpoints and the compiled graph.
        object.__setattr__(self, "_xnorm_layer", layer)
        self.wrapped_name = name
        self.kind = kind
        self._weight_attr = SUPPORTED_LAYERS[type(layer)][1]

    def _adopt_layer(self, layer: nn.Cell) -> None:
        """Take over the layer's other parameters and child Cells and build its operation
        (:meth:`~.layer_ops.LayerOperation._build_operation`); called by a subclass once its own
        parameters are set, so that they come first."""
        for param_name, param in list(layer._params.items()):
            if param_name != self.wrapped_name and param is not None:
                setattr(self, param_name, param)
        if "bias" not in self._params:
            # Layers built with has_bias=False keep ``bias = None`` as a plain attribute.
            object.__setattr__(self, "bias", getattr(layer, "bias", None))
        # The wrapper's own primitives, built from the layer's public configuration: the layer's own
        # primitive attributes have undocumented names a release may change (see layer_ops.py).
        self._build_operation(layer)
        for child_name, child in list(layer._cells.items()):
            if child is not None:
                setattr(self, child_name, child)
        if self.kind == LayerKind.LINEAR and not isinstance(getattr(layer, "activation", None), nn.Cell):
            # A Primitive (or None) activation is not a child Cell; keep it as a constant attribute.
            object.__setattr__(self, "activation", getattr(layer, "activation", None))
        # Names relative to the wrapper (the layer may have carried a prefix from an earlier parent).
        self.update_parameters_name("")

    # -- the reparametrization (subclasses) ----------------------------------------------------------
    def _weight(self):
        """``w`` in the weight's dtype and storage layout, differentiable with respect to the tensors."""
        raise NotImplementedError

    def _weight_for_removal(self) -> Tensor:
        """The ``w`` :func:`xnorm.remove` puts back on the layer (the subclass may first update its state)."""
        return self.compute_weight()

    def construct(self, *inputs):
        w = self._weight()
        if self.wrapped_name == self._weight_attr:
            weight = w
            bias = self.bias if self.kind != LayerKind.EMBEDDING else None
        else:
            weight = getattr(self, self._weight_attr)
            bias = w
        return self._apply(inputs[0], weight, bias)

    # -- conveniences --------------------------------------------------------------------------------
    @property
    def layer(self) -> nn.Cell:
        """The wrapped layer. Its ``<name>`` parameter is stale while wrapped; use :meth:`compute_weight`."""
        return self._xnorm_layer

    def compute_weight(self) -> Tensor:
        """``w`` as an eval-mode forward computes it (storage layout, the weight's dtype)."""
        return self._weight()


class WeightNormCell(ReparametrizedCell):
    """A MindSpore layer whose weight is reparametrized as ``w = v * (g / ||v||)``.

    Built by :func:`xnorm.wrap`; not meant to be constructed directly.

    Parameters (trainable, in this order): ``<name>_g`` with the weight's stored shape reduced to 1 on
    every axis but ``dim`` (0-d when ``dim`` is None), ``<name>_v`` with the weight's stored shape, then
    the layer's other parameters under their own names. Child Cells of the layer (a Dense
    ``activation``) become children of the wrapper under the same names (:class:`ReparametrizedCell`).

    Inputs and outputs are those of the wrapped layer.

    Attributes (in addition to :class:`ReparametrizedCell`'s):
        dim: the canonical ``dim`` after :func:`xnorm.spec.normalize_dim` (None: whole tensor).
        storage_dim: the same axis in MindSpore's storage layout.
        eps: None or the value added to the sum of squares.
    """

    description = "weight-normalized"

    def __init__(self, layer: nn.Cell, kind: str, name: str, spec: WeightNorm, g: Tensor, v: Tensor,
                 dim: Optional[int], storage_dim: Optional[int], axes: Tuple[int, ...]):
        super().__init__(layer, kind, name)
        self.dim = dim
        self.storage_dim = storage_dim
        self.eps = spec.eps
        self._axes = axes
        self._sum_squares = ops.ReduceSum(keep_dims=storage_dim is not None)
        self._weight_dtype = v.dtype
        self._compute_dtype = mindspore.float32 if _dtype_name(v.dtype) in ("float16", "bfloat16") else v.dtype
        self._low_precision = self._compute_dtype != v.dtype
        self._g_name = name + "_g"
        self._v_name = name + "_v"
        self.own_parameter_names = (self._g_name, self._v_name)

        requires_grad = getattr(layer, name).requires_grad
        setattr(self, self._g_name, Parameter(g, name=self._g_name, requires_grad=requires_grad))
        setattr(self, self._v_name, Parameter(v, name=self._v_name, requires_grad=requires_grad))
        self._adopt_layer(layer)

    # -- the reparametrization ---------------------------------------------------------------------
    def _g_v_and_scale(self):
        """``(v, s)`` in the compute dtype (float32 for float16/bfloat16 weights): ``s = g / ||v||``, g's shape.

        The one place the norm is computed: the default path multiplies v by s, the fused path
        (:mod:`.fused`) applies s to the layer's output or input instead.
        """
        g = getattr(self, self._g_name)
        v = getattr(self, self._v_name)
        if self._low_precision:
            g = ops.cast(g, self._compute_dtype)
            v = ops.cast(v, self._compute_dtype)
        squares = self._sum_squares(v * v, self._axes)
        if self.eps is not None:
            squares = squares + self.eps
        return v, g / ops.sqrt(squares)

    def _weight(self):
        """``w`` in the weight's dtype and storage layout, differentiable with respect to g and v."""
        v, s = self._g_v_and_scale()
        w = v * s
        if self._low_precision:
            w = ops.cast(w, self._weight_dtype)
        return w

    def extend_repr(self) -> str:
        return (f"layer={type(self._xnorm_layer).__name__}, name={self.wrapped_name!r}, dim={self.dim}, "
                f"eps={self.eps}")


def _new_create_time() -> int:
    # Strictly increasing even when two calls fall in the same clock tick.
    now = time.time_ns()
    _new_create_time.last = max(now, getattr(_new_create_time, "last", 0) + 1)
    return _new_create_time.last


def _force_recompile(cell: nn.Cell) -> None:
    """Give ``cell`` and every Cell inside it a new compile key, so their next call compiles afresh."""
    for _, sub in cell.cells_and_names():
        object.__setattr__(sub, "_create_time", _new_create_time())


class MindSporeBackend(Backend):
    """The ``"mindspore"`` backend (MindSpore >= 2.10, GRAPH_MODE and PYNATIVE_MODE)."""

    name = "mindspore"

    def owns(self, obj: Any) -> bool:
        """True for any ``mindspore.nn.Cell`` (layers, models and wrappers)."""
        return isinstance(obj, nn.Cell)

    def is_wrapped(self, obj: Any) -> bool:
        """True when ``obj`` is an xnorm wrapper (:class:`ReparametrizedCell`: weight norm, fused or not, or
        spectral norm); a model containing one is not itself wrapped."""
        return isinstance(obj, ReparametrizedCell)

    def freeze(self, obj: Any, *, affine: bool, layers: Any) -> Any:
        """Freeze the BatchNorm1d/2d/3d cells in ``obj`` (or those ``layers`` selects): see
        :mod:`.freeze` for the mechanism and the recompilation it forces."""
        if not isinstance(obj, nn.Cell):
            raise UnsupportedLayerError(f"xnorm.freeze takes a mindspore.nn.Cell, got {type(obj).__name__}.")
        return _freeze.freeze(obj, affine=affine, layers=layers)

    def unfreeze(self, obj: Any) -> Any:
        if not isinstance(obj, nn.Cell):
            raise NotFrozenError(f"xnorm.unfreeze takes a mindspore.nn.Cell, got {type(obj).__name__}.")
        return _freeze.unfreeze(obj)

    def is_frozen(self, obj: Any) -> bool:
        return isinstance(obj, nn.Cell) and _freeze.is_frozen(obj)

    # -- wrap ----------------------------------------------------------------------------------------
    def wrap(self, layer: Any, spec: Reparametrization, *, name: Optional[str], **options: Any) -> ReparametrizedCell:
        """Return a :class:`WeightNormCell` or a :class:`~xnorm._backends.mindspore.spectral.SpectralNormCell`
        around ``layer``; ``layer`` itself is not modified.

        Args:
            layer: one of :data:`SUPPORTED_LAYERS` (exact class), any pad_mode, group and bias setting.
            spec: a :class:`xnorm.spec.WeightNorm` (``dim`` in the canonical layout, ``eps``), a
                :class:`xnorm.spec.SpectralNorm` (``dim=None`` is 1 for the ConvTranspose layers, else 0;
                its state is drawn from NumPy's global RNG, see :mod:`.spectral`) or a
                :class:`xnorm.spec.Orthogonal` (a non-square weight's completion is drawn from NumPy's
                global RNG, see :mod:`.orthogonal`).
            name: the parameter to reparametrize; None means the layer's weight (``"weight"``, or
                ``"embedding_table"`` for an Embedding). Another floating parameter (``"bias"``) may be
                named; its canonical layout is its own.
            **options: ``fused=True`` (from ``xnorm.wrap(..., fused=True)``) returns a
                :class:`~xnorm._backends.mindspore.fused.FusedWeightNormCell`, which scales the layer's
                output or input by ``g / ||v||`` instead of building ``w`` where the algebra allows it
                (same parameters, checkpoints and ``remove``); weight norm only. No other option is accepted.

        Raises:
            OptionError: an unknown keyword option, ``fused`` that is not a bool, or ``fused=True`` with
                spectral norm.
            BackendDetectionError: ``layer`` is not a ``mindspore.nn.Cell``.
            AlreadyWrappedError: ``layer`` is an xnorm wrapper (:class:`ReparametrizedCell`), of any kind.
            UnsupportedLayerError: ``spec`` is not WeightNorm, SpectralNorm or Orthogonal, or ``layer``'s
                class is not in :data:`SUPPORTED_LAYERS` (the message lists them).
            MissingParameterError: ``layer`` has no parameter ``name`` (or it is None, as a missing bias).
            NonFloatingParameterError: the parameter's dtype is not float16/bfloat16/float32/float64.
            DimError: ``dim`` is not None or an int within the canonical rank; for Orthogonal, a parameter
                with fewer than 2 canonical axes.
        """
        if not isinstance(spec, (WeightNorm, SpectralNorm, Orthogonal)):
            raise UnsupportedLayerError(
                f"the mindspore backend does not implement {type(spec).__name__}; it implements WeightNorm, "
                "SpectralNorm and Orthogonal."
            )
        fused = options.pop("fused", False)
        if options:
            raise OptionError(
                f"the mindspore backend takes no options besides fused=, got {', '.join(sorted(options))}. "
                "Pass only name=, dim=, eps= and fused= to xnorm.wrap."
            )
        check_fused_option(fused, "mindspore")
        check_fused_spec(fused, spec)
        if not isinstance(layer, nn.Cell):
            raise BackendDetectionError(
                f"the mindspore backend wraps mindspore.nn.Cell layers, got an object of type "
                f"{type(layer).__module__}.{type(layer).__qualname__}. Pass one of: {_supported_list()}."
            )
        if isinstance(layer, ReparametrizedCell):
            raise AlreadyWrappedError(
                f"this {type(layer.layer).__name__} is already {layer.description} by xnorm (its parameter "
                f"{layer.wrapped_name!r} is held as {', '.join(map(repr, layer.own_parameter_names))}). "
                "Call xnorm.remove on it first to wrap it again, with the same or another reparametrization."
            )
        if type(layer) not in SUPPORTED_LAYERS:
            raise UnsupportedLayerError(
                f"the mindspore backend cannot reparametrize a {type(layer).__module__}.{type(layer).__qualname__}; "
                f"supported layers (exact classes): {_supported_list()}. Wrap those layers inside your Cell instead."
            )
        kind, default_name = SUPPORTED_LAYERS[type(layer)]
        name = default_name if name is None else name
        param = layer._params.get(name) if isinstance(name, str) else None
        if param is None:
            available = [n for n, p in layer._params.items() if p is not None]
            raise MissingParameterError(
                f"{type(layer).__name__} has no parameter {name!r}; its parameters are "
                f"{', '.join(map(repr, available)) or 'none'}. Pass name= one of them, or None for the weight."
            )
        dtype_name = _dtype_name(param.dtype)
        check_floating(dtype_name, what=f"{type(layer).__name__}.{name}")

        if name != default_name:
            kind_for_dim = LayerKind.GENERIC
        else:
            kind_for_dim = kind
        layout = _storage_layout(kind_for_dim, len(param.shape))
        if isinstance(spec, SpectralNorm):
            from .spectral import wrap_spectral  # imported on first use, as fused: it imports this module

            return wrap_spectral(layer, kind, kind_for_dim, name, spec, layout)
        if isinstance(spec, Orthogonal):
            from .orthogonal import wrap_orthogonal  # imported on first use, as fused: it imports this module

            return wrap_orthogonal(layer, kind, name, spec, layout)
        dim = spec.resolved_dim(layout.canonical_ndim)  # raises DimError before anything changes
        storage_dim = layout.storage_dim(dim)
        axes = layout.storage_reduction_axes(dim) if dim is not None else tuple(range(len(param.shape)))

        v = param.value().copy()
        g = _initial_g(v, axes, keep_dims=dim is not None, eps=spec.eps)
        if fused:
            from .fused import FusedWeightNormCell  # imported on first use: the default path never needs it

            return FusedWeightNormCell(layer, kind, name, spec, g, v, dim, storage_dim, axes)
        return WeightNormCell(layer, kind, name, spec, g, v, dim, storage_dim, axes)

    # -- remove --------------------------------------------------------------------------------------
    def remove(self, obj: Any, *args: Any) -> Any:
        """Undo :meth:`wrap`.

        * ``obj`` is a wrapper (:class:`ReparametrizedCell`): returns the original layer object, of its
          original class, whose ``<name>`` is a new Parameter holding ``w`` (dtype and storage shape of the
          old weight) and whose other parameters are the wrapper's (trained values included). A spectral
          norm wrapper in training mode first runs its power iterations, as a training-mode forward would
          (:meth:`~xnorm._backends.mindspore.spectral.SpectralNormCell.compute_weight`); in eval mode it
          does not.
        * ``obj`` is a Cell containing wrappers: each is replaced in its parent by its plain layer, in
          place, parameter names keep their full prefix, and ``obj`` and every Cell in it are made to
          recompile on their next call; returns ``obj``.

        Raises:
            OptionError: extra positional arguments (this backend takes none).
            NotWrappedError: ``obj`` neither is nor contains a wrapper; nothing is changed.
        """
        if args:
            raise OptionError(f"the mindspore backend's remove takes no extra arguments, got {len(args)}.")
        if isinstance(obj, ReparametrizedCell):
            plain = _unwrap(obj)
            _force_recompile(plain)
            return plain
        if not isinstance(obj, nn.Cell):
            raise _not_wrapped(obj)
        found: List[Tuple[nn.Cell, str, ReparametrizedCell]] = []
        for _, parent in obj.cells_and_names():
            if isinstance(parent, ReparametrizedCell):
                continue  # a wrapper's children (a Dense activation) cannot hold wrappers of interest
            for key, child in parent._cells.items():
                if isinstance(child, ReparametrizedCell):
                    found.append((parent, key, child))
        if not found:
            raise _not_wrapped(obj)
        for parent, key, wrapper in found:
            plain = _unwrap(wrapper)
            parent._cells[key] = plain
            if isinstance(getattr(parent, "cell_list", None), list):
                # SequentialCell runs the list it built from _cells, not _cells itself.
                object.__setattr__(parent, "cell_list", list(parent._cells.values()))
        _force_recompile(obj)
        return obj


def _initial_g(v: Tensor, axes: Tuple[int, ...], *, keep_dims: bool, eps: Optional[float]) -> Tensor:
    """``g = norm(v)`` over ``axes`` in the weight's dtype.

    Computed with the same MindSpore kernels and precision as the forward's norm, so that
    ``v * (g / norm(v))`` reproduces the old weight as closely as the dtype allows.
    """
    work = ops.cast(v, mindspore.float32) if _dtype_name(v.dtype) in ("float16", "bfloat16") else v
    squares = ops.ReduceSum(keep_dims=keep_dims)(work * work, axes)
    if eps is not None:
        squares = squares + eps
    return ops.cast(ops.sqrt(squares), v.dtype)


def _unwrap(wrapper: ReparametrizedCell) -> nn.Cell:
    """Put ``w`` and the wrapper's other parameters back on the layer; names keep the wrapper's prefix, and
    the layer takes the wrapper's training flag (the mode its parent set)."""
    layer = wrapper.layer
    first = getattr(wrapper, wrapper.own_parameter_names[0])
    prefix = first.name[: len(first.name) - len(wrapper.own_parameter_names[0])]
    w = wrapper._weight_for_removal()
    old = layer._params[wrapper.wrapped_name]
    layer._params[wrapper.wrapped_name] = Parameter(w, name=wrapper.wrapped_name, requires_grad=first.requires_grad)
    del old
    for param_name, param in wrapper._params.items():
        if param_name not in wrapper.own_parameter_names and param is not None:
            layer._params[param_name] = param
    for child_name, child in wrapper._cells.items():
        if child is not None and child_name not in wrapper.helper_cells:
            layer._cells[child_name] = child
    layer.update_parameters_name(prefix)
    layer.set_train(wrapper.training)
    return layer
