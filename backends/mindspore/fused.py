"""The fused path of the MindSpore backend: ``xnorm.wrap(layer, fused=True)``.

:class:`FusedWeightNormCell` has the parameters, names, checkpoint format, ``remove`` and errors of
:class:`~xnorm._backends.mindspore.WeightNormCell`, but where the algebra allows it its ``construct``
never builds ``w = v * (g / ||v||)``. With the per-slice scale ::

    s = g / sqrt(sum(v ** 2 over every axis but dim, keepdims) [+ eps])     # g's shape, as without fused

and the layer's primitive called on ``v`` instead of ``w``, :func:`xnorm.spec.fused_scale_side`
says where ``s`` goes:

``FUSED_OUTPUT`` (Dense and ConvNd with ``dim=0``, ConvTransposeNd with ``dim=1``, Embedding with
    ``dim=1``, every layer with ``dim=None``/``-1``): ``layer(x; w) = s * layer_without_bias(x; v) + bias``,
    s broadcast along the output-channel axis (axis 1 of MindSpore's NC... outputs, the last axis of
    Dense and Embedding outputs), or a scalar. A ConvTranspose's ``out/groups`` scale is tiled
    ``group`` times over the output channels. Dense's activation and Conv2dTranspose's
    ``output_padding`` zeros come after the bias, as in the layer.
``FUSED_INPUT`` (Dense and ConvNd with ``dim=1``, ConvTransposeNd with ``dim=0``):
    ``layer(x; w) = layer(x * s; v)``, s broadcast along the input-channel axis; a ConvNd's
    ``in/groups`` scale is tiled ``group`` times over the input channels.
``FUSED_ROWS`` (Embedding with ``dim=0``): each looked-up row of ``v`` is multiplied by its own
    ``s[id]`` (looked up with ``Gather``, also when the layer uses ``use_one_hot``).
``None`` (``dim`` on a kernel axis, or ``name=`` a parameter other than the layer's weight, such as
    ``"bias"``): ``w`` is materialised exactly as without ``fused``; the result is bit-equal to the
    default wrapper.

Numerics
    The same math in a different order: ``s`` is bit-equal to the factor the default path multiplies
    ``v`` by, but the fused path rounds ``sum(x * v) * s`` where the default rounds
    ``sum(x * round(v * s))``, so outputs and gradients differ by float rounding only (a few ulps of
    the output; docs/mindspore.md gives the measured difference). The conformance suite runs the
    whole catalogue through this path with the same tolerances (adapter ``mindspore-graph-fused``).

Precision
    float16 and bfloat16: ``s`` is computed in float32 (as the default path computes its norm); the
    primitive runs on ``v`` in the weight's dtype, its output (or, on the input side, ``x``) is cast
    to float32, multiplied by ``s`` and cast back to the weight's dtype once, before the bias is added.
    float32 and float64 are computed as they are.

Everything else is inherited: ``compute_weight`` (used by ``xnorm.remove``, and to inspect ``w``)
materialises ``w`` as the default path does, so a removed fused wrapper holds exactly the weight a
removed default wrapper would.
"""

from __future__ import annotations

from typing import Optional, Tuple

from mindspore import Tensor, nn, ops

from xnorm.spec import FUSED_INPUT, FUSED_OUTPUT, FUSED_ROWS, LayerKind, WeightNorm, fused_scale_side

from . import WeightNormCell

__all__ = ["FusedWeightNormCell"]

# Where the primitive of each conv kind puts its channels: the rank of the tensor the primitive
# consumes/produces (Conv1d and Conv1dTranspose run as 2-D convolutions on (N, C, 1, W)).
_PRIMITIVE_RANK = {"conv1d": 4, "conv2d": 4, "conv3d": 5, "conv_transpose1d": 4, "conv_transpose2d": 4,
                   "conv_transpose3d": 5}


def _channel_shape(rank: int) -> Tuple[int, ...]:
    """``(1, -1, 1, ...)`` of ``rank`` axes: s broadcast along axis 1 of an NC... tensor."""
    return (1, -1) + (1,) * (rank - 2)


class FusedWeightNormCell(WeightNormCell):
    """A :class:`WeightNormCell` that applies ``s = g / ||v||`` to the layer's output or input instead
    of building ``w``; built by ``xnorm.wrap(layer, fused=True)``, not meant to be constructed directly.

    Parameters, their names, shapes and order, inputs and outputs are those of :class:`WeightNormCell`
    (see its docstring); only ``construct`` differs.

    Attributes (in addition to :class:`WeightNormCell`'s):
        fused_side: :data:`~xnorm.spec.FUSED_OUTPUT`, :data:`~xnorm.spec.FUSED_INPUT`,
            :data:`~xnorm.spec.FUSED_ROWS`, or None where ``w`` is materialised as without ``fused``.
    """

    def __init__(self, layer: nn.Cell, kind: str, name: str, spec: WeightNorm, g: Tensor, v: Tensor,
                 dim: Optional[int], storage_dim: Optional[int], axes: Tuple[int, ...]):
        super().__init__(layer, kind, name, spec, g, v, dim, storage_dim, axes)
        # Only the layer's own weight enters a linear map; any other parameter (name="bias") is materialised.
        self.fused_side = fused_scale_side(kind, dim) if name == self._weight_attr else None
        # Fixed at construction so that the compiled graph has one static branch.
        self._side = self.fused_side or "materialise"
        # s in g's storage shape -> a shape that broadcasts against the tensor it scales; a scalar
        # (dim=None) needs no reshape.
        self._scale_shape: Optional[Tuple[int, ...]] = None
        self._scale_tile = 1
        if dim is not None and self.fused_side is not None:
            self._scale_shape, self._scale_tile = self._broadcast(kind, layer)

    def _broadcast(self, kind: str, layer: nn.Cell) -> Tuple[Tuple[int, ...], int]:
        """The shape s takes to scale the output (or input), and how often to tile it first."""
        side = self.fused_side
        if kind in (LayerKind.LINEAR, LayerKind.EMBEDDING):
            # Dense and Embedding: channels are the last axis of input and output; FUSED_ROWS
            # gathers s with its (num, 1) shape as it is.
            return ((-1,) if side != FUSED_ROWS else (-1, 1)), 1
        groups = int(getattr(layer, "group", 1))
        transposed = kind in LayerKind.CONV_TRANSPOSE
        if side == FUSED_OUTPUT:
            # Conv dim=0 indexes all output channels; ConvTranspose dim=1 only out/groups of them.
            return _channel_shape(_PRIMITIVE_RANK[kind]), groups if transposed else 1
        # FUSED_INPUT, applied to x as the user passes it: (N, C_in, *spatial).
        rank = 2 + LayerKind.spatial_dims(kind)
        return _channel_shape(rank), 1 if transposed else groups

    # -- the scale -----------------------------------------------------------------------------------
    def _scale(self):
        """``s = g / ||v||`` in the compute dtype, g's shape: the default path's factor, bit for bit."""
        return self._g_v_and_scale()[1]

    def _shaped(self, s):
        """s reshaped (and tiled over groups) to broadcast against the tensor it scales."""
        if self._scale_shape is None:
            return s
        if self._scale_tile > 1:
            s = ops.tile(ops.reshape(s, (-1,)), (self._scale_tile,))
        return ops.reshape(s, self._scale_shape)

    def _times(self, t, s):
        """``t * s`` rounded once to ``t``'s dtype; low precision multiplies in float32."""
        if self._low_precision:
            return ops.cast(ops.cast(t, self._compute_dtype) * s, self._weight_dtype)
        return t * s

    def _scale_and_bias(self, out, s):
        """``out * s + bias`` (the layer's BiasAdd), rounded once to the weight's dtype.

        In low precision both the product and the sum are taken in float32: rounding the product to
        float16 before a bias that cancels it would cost a second rounding the default path does not have.
        """
        if self._low_precision:
            out = ops.cast(out, self._compute_dtype) * s
            if self.has_bias:
                out = self._op_bias_add(out, ops.cast(self.bias, self._compute_dtype))
            return ops.cast(out, self._weight_dtype)
        out = out * s
        if self.has_bias:
            out = self._op_bias_add(out, self.bias)
        return out

    # -- construct -----------------------------------------------------------------------------------
    def construct(self, *inputs):
        x = inputs[0]
        if self._side == "materialise":
            w = self._weight()
            if self.wrapped_name == self._weight_attr:
                return self._apply(x, w, self.bias if self.kind != LayerKind.EMBEDDING else None)
            return self._apply(x, getattr(self, self._weight_attr), w)
        v = getattr(self, self._v_name)
        s = self._shaped(self._scale())
        if self._side == FUSED_INPUT:
            return self._apply(self._times(x, s), v, self.bias)
        if self._side == FUSED_ROWS:
            return self._embedding_rows(x, v, s)
        return self._apply_scaled_output(x, v, s)

    def _apply_scaled_output(self, x, v, s):
        """The layer's construct on ``v`` with the output scaled by ``s`` before the bias is added.

        Every stage but the bias is the layer's own (:class:`~.layer_ops.LayerOperation`): Dense's
        activation, the 1-D convolutions' squeeze and Conv2dTranspose's ``output_padding`` zeros come
        after the bias, as in the layer. A grouped Conv3d gets its bias from ``BiasAdd`` (NCDHW), which
        adds the same values as the layer's broadcast add.
        """
        if self.kind == LayerKind.EMBEDDING:
            return self._times(self._embedding(x, v), s)
        out = self._layer_core(self._layer_input(x), v)
        return self._layer_output(self._scale_and_bias(out, s), x)

    def _embedding_rows(self, ids, table, s):
        """Embedding with dim=0: the looked-up rows of ``v`` times their own ``s[id]`` ((num, 1) gathered)."""
        out_shape = ops.shape(ids) + (self.embedding_size,)
        flat_ids = ops.reshape(ids, (-1,))
        rows = self._embedding_lookup(flat_ids, table)
        # s has shape (num, 1): gathering it needs no one-hot matrix in the compute dtype.
        rows = self._times(rows, self._op_gather(s, flat_ids, 0))
        return ops.reshape(rows, out_shape)

    def extend_repr(self) -> str:
        return f"{super().extend_repr()}, fused={self.fused_side or 'no (w materialised)'}"

