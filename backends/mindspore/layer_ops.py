"""What each supported ``mindspore.nn`` layer computes, rebuilt from the layer's public configuration.

A wrapper runs its layer's operation on a weight it computes itself, so it needs that operation
with the weight passed in. MindSpore's layers keep their primitives and derived constants under
undocumented names (``matmul``, ``conv2d``, ``split_0``, ``padding_top``, ``is_valid``, ``shp_flat``...)
that any release may rename or drop. :class:`LayerOperation` therefore never reads them: it builds its
own primitives from the documented constructor arguments the layer stores under their own names
(``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``pad_mode``, ``padding``, ``dilation``,
``group``, ``has_bias``, ``output_padding``, ``data_format``, ``activation``, ``vocab_size``,
``embedding_size``, ``use_one_hot``, ``dtype``) and reproduces each layer's ``construct`` with the
same primitives, arguments and order of operations, so that a wrapper's output is bit-identical to the
plain layer's.

Stored forms
    The layers normalise some arguments before storing them (MindSpore 2.x): Conv1d and
    Conv1dTranspose keep ``kernel_size``, ``stride`` and ``dilation`` as ``(1, k)`` and ``padding`` as
    ``(0, 0, p, p)``; Conv2d/Conv3d keep tuples. Each value is read in either its stored or its
    constructor form (an int or a tuple), so a release that stores the other one still works.

What each layer computes (MindSpore's ``construct``, reproduced)
    Dense: N-d inputs are flattened to 2-D, ``MatMul(transpose_b=True)``, ``BiasAdd``, the activation,
    then reshaped back. Conv1d/Conv1dTranspose: a 2-D convolution on ``(N, C, 1, W)`` (unit axis
    inserted at 2, squeezed after the bias). Conv2d: ``Conv2D`` then ``BiasAdd``. Conv3d with
    ``group > 1``: one ungrouped ``Conv3D`` per group (split along the input channels and the weight's
    output channels, concatenated), the bias added by broadcasting. Conv1dTranspose/Conv2dTranspose:
    ``Conv2DBackpropInput``/``Conv2DTranspose`` with the output size of MindSpore's own rule
    (:func:`transpose_output_length`); Conv2dTranspose appends its ``output_padding`` as zeros after the
    bias. Conv3dTranspose: ``Conv3DTranspose`` (which applies ``output_padding`` itself), ``BiasAdd``.
    Embedding: ``Gather`` of rows, or with ``use_one_hot`` a ``OneHot`` matrix (values in the layer's
    ``dtype``) times the table.
"""

from __future__ import annotations

from typing import Tuple

from mindspore import Tensor, nn, ops

from xnorm.spec import LayerKind

__all__ = ["LayerOperation", "transpose_output_length"]


def transpose_output_length(is_valid, is_same, is_pad, size, kernel, stride, dilation, padding):
    """Output length of MindSpore's transposed convolutions along one axis (their own rule, pad modes included)."""
    span = kernel + (kernel - 1) * (dilation - 1)
    if is_valid:
        return size * stride + max(span - stride, 0)
    if is_same:
        return size * stride
    if is_pad:
        return size * stride - padding + span - stride
    return 0


def _ntuple(value, n: int) -> Tuple[int, ...]:
    """An int or an n-tuple as an n-tuple."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _one_d(value) -> Tuple[int, int]:
    """A Conv1d(Transpose) kernel_size/stride/dilation as the ``(1, v)`` pair its 2-D primitive takes."""
    return (1, value[-1]) if isinstance(value, (tuple, list)) else (1, value)


def _one_d_pad(padding) -> Tuple[int, int, int, int]:
    """A Conv1d(Transpose) padding as the ``(0, 0, before, after)`` its 2-D primitive takes."""
    if isinstance(padding, (tuple, list)):
        return (0, 0) + tuple(padding[-2:])
    return (0, 0, padding, padding)


class LayerOperation(nn.Cell):
    """A Cell that runs a supported layer's operation on a weight and bias passed in (base of the wrappers).

    :meth:`_build_operation` reads the layer's public configuration and sets the wrapper's own
    primitives and constants; ``kind`` (:class:`xnorm.spec.LayerKind`) must be set first. The
    operation is split in stages so that the fused path (:mod:`.fused`) can put its scale between the
    primitive and the bias: ``_layer_input`` (reshape/unit axis), ``_layer_core`` (the primitive, no
    bias), ``_layer_bias`` and ``_layer_output`` (activation, squeeze, output padding, reshape back).
    """

    kind: str = ""

    def _build_operation(self, layer: nn.Cell) -> None:
        """Set the primitives and constants of ``layer``'s operation from its public attributes only."""
        kind = self.kind
        if kind == LayerKind.EMBEDDING:
            self.vocab_size = layer.vocab_size
            self.embedding_size = layer.embedding_size
            self.use_one_hot = bool(layer.use_one_hot)
            self.has_bias = False
            self._op_gather = ops.Gather()
            self._op_one_hot = ops.OneHot()
            self._op_one_hot_matmul = ops.MatMul()
            # The layer's one-hot matrix holds these values in its constructor ``dtype``, not the table's.
            self._on_value = Tensor(1.0, layer.dtype)
            self._off_value = Tensor(0.0, layer.dtype)
            return
        self.has_bias = bool(layer.has_bias)
        self.out_channels = layer.out_channels
        if kind == LayerKind.LINEAR:
            self._op_matmul = ops.MatMul(transpose_b=True)
            self._op_bias_add = ops.BiasAdd()
            self._has_activation = getattr(layer, "activation", None) is not None
            return
        self.group = layer.group
        if kind == "conv1d":
            self._op_conv = ops.Conv2D(out_channel=layer.out_channels, kernel_size=_one_d(layer.kernel_size), mode=1,
                                       pad_mode=layer.pad_mode, pad=_one_d_pad(layer.padding),
                                       stride=_one_d(layer.stride), dilation=_one_d(layer.dilation), group=layer.group)
            self._op_bias_add = ops.BiasAdd()
        elif kind == "conv2d":
            self._op_conv = ops.Conv2D(out_channel=layer.out_channels, kernel_size=_ntuple(layer.kernel_size, 2),
                                       mode=1, pad_mode=layer.pad_mode, pad=layer.padding,
                                       stride=_ntuple(layer.stride, 2), dilation=_ntuple(layer.dilation, 2),
                                       group=layer.group, data_format=layer.data_format)
            self._op_bias_add = ops.BiasAdd(data_format=layer.data_format)
        elif kind == "conv3d":
            # Conv3d convolves each group separately with an ungrouped primitive of out/groups channels.
            self._op_conv = ops.Conv3D(out_channel=layer.out_channels // layer.group,
                                       kernel_size=_ntuple(layer.kernel_size, 3), mode=1, pad_mode=layer.pad_mode,
                                       pad=layer.padding, stride=_ntuple(layer.stride, 3),
                                       dilation=_ntuple(layer.dilation, 3), group=1, data_format=layer.data_format)
            self._op_bias_add = ops.BiasAdd(data_format=layer.data_format)
            self._op_split_weight = ops.Split(0, layer.group)
            self._op_split_input = ops.Split(1, layer.group)
            self._op_concat = ops.Concat(1)
        elif kind == "conv_transpose3d":
            self._op_conv = ops.Conv3DTranspose(
                in_channel=layer.in_channels, out_channel=layer.out_channels, kernel_size=_ntuple(layer.kernel_size, 3),
                mode=1, pad_mode=layer.pad_mode, pad=layer.padding, stride=_ntuple(layer.stride, 3),
                dilation=_ntuple(layer.dilation, 3), group=layer.group,
                output_padding=_ntuple(layer.output_padding, 3), data_format=layer.data_format)
            self._op_bias_add = ops.BiasAdd(data_format=layer.data_format)
        else:
            self._build_transpose_2d(layer, kind)

    def _build_transpose_2d(self, layer: nn.Cell, kind: str) -> None:
        """Conv1dTranspose and Conv2dTranspose: a 2-D backprop-input primitive and the output size's inputs."""
        if kind == "conv_transpose1d":
            kernel, stride, dilation = _one_d(layer.kernel_size), _one_d(layer.stride), _one_d(layer.dilation)
            pads = _one_d_pad(layer.padding)
            primitive, pad = ops.Conv2DBackpropInput, pads
            self._output_padding = (0, 0)  # Conv1dTranspose has none
        else:
            kernel, stride, dilation = (_ntuple(layer.kernel_size, 2), _ntuple(layer.stride, 2),
                                        _ntuple(layer.dilation, 2))
            # (top, bottom, left, right); MindSpore keeps them only under private names, so they are
            # derived from the public ``padding`` as its constructor does.
            pads = _ntuple(layer.padding, 4)
            primitive, pad = ops.Conv2DTranspose, layer.padding
            self._output_padding = _ntuple(layer.output_padding, 2)
        # The primitive's out_channel is that of the forward convolution it transposes: the layer's in_channels.
        self._op_conv = primitive(out_channel=layer.in_channels, kernel_size=kernel, mode=1, pad_mode=layer.pad_mode,
                                  pad=pad, stride=stride, dilation=dilation, group=layer.group)
        self._op_bias_add = ops.BiasAdd()
        self._is_valid = layer.pad_mode == "valid"
        self._is_same = layer.pad_mode == "same"
        self._is_pad = layer.pad_mode == "pad"
        self._kernel, self._stride, self._dilation = kernel, stride, dilation
        self._pad_sums = (pads[0] + pads[1], pads[2] + pads[3])

    # -- the operation -----------------------------------------------------------------------------
    def _apply(self, x, weight, bias):
        """The layer's construct with ``weight`` (and ``bias``) in place of its own parameters."""
        if self.kind == LayerKind.EMBEDDING:
            return self._embedding(x, weight)
        out = self._layer_core(self._layer_input(x), weight)
        if self.has_bias:
            out = self._layer_bias(out, bias)
        return self._layer_output(out, x)

    def _layer_input(self, x):
        """``x`` in the shape the primitive takes: 2-D for Dense, a unit axis at 2 for the 1-D convolutions."""
        kind = self.kind
        if kind == LayerKind.LINEAR:
            x_shape = ops.shape(x)
            if len(x_shape) != 2:
                x = ops.reshape(x, (-1, x_shape[-1]))
            return x
        if kind in ("conv1d", "conv_transpose1d"):
            return ops.expand_dims(x, 2)
        return x

    def _layer_core(self, x, weight):
        """The layer's primitive(s) on ``x`` (shaped by :meth:`_layer_input`) and ``weight``, before the bias."""
        kind = self.kind
        if kind == LayerKind.LINEAR:
            return self._op_matmul(x, weight)
        if kind in ("conv_transpose1d", "conv_transpose2d"):
            n, _, h, w = ops.shape(x)
            h_out = transpose_output_length(self._is_valid, self._is_same, self._is_pad, h, self._kernel[0],
                                            self._stride[0], self._dilation[0], self._pad_sums[0])
            w_out = transpose_output_length(self._is_valid, self._is_same, self._is_pad, w, self._kernel[1],
                                            self._stride[1], self._dilation[1], self._pad_sums[1])
            return self._op_conv(x, weight, (n, self.out_channels, h_out, w_out))
        if kind == "conv3d" and self.group > 1:
            features = self._op_split_input(x)
            weights = self._op_split_weight(weight)
            outputs = ()
            for i in range(self.group):
                outputs = outputs + (self._op_conv(features[i], weights[i]),)
            return self._op_concat(outputs)
        return self._op_conv(x, weight)

    def _layer_bias(self, out, bias):
        """``out + bias`` as the layer adds it: ``BiasAdd``, or a broadcast add for a grouped Conv3d."""
        if self.kind == "conv3d" and self.group > 1:
            shape = [1 for _ in range(out.ndim)]
            shape[1] = self.out_channels
            return out + bias.reshape(shape)
        return self._op_bias_add(out, bias)

    def _layer_output(self, out, x):
        """What the layer does after its bias; ``x`` is the input as passed to the layer."""
        kind = self.kind
        if kind == LayerKind.LINEAR:
            if self._has_activation:
                out = self.activation(out)
            x_shape = ops.shape(x)
            if len(x_shape) != 2:
                out = ops.reshape(out, x_shape[:-1] + (ops.shape(out)[-1],))
            return out
        if kind in ("conv1d", "conv_transpose1d"):
            return ops.squeeze(out, 2)
        if kind == "conv_transpose2d":
            # Conv2dTranspose appends output_padding as zeros after the bias; the wrapper does the same so
            # that wrapping never changes what the layer computes (MindSpore's rule, not torch's).
            extra = self._output_padding
            if extra[0] == 0 and extra[1] == 0:
                return out
            return ops.pad(out, (0, extra[1], 0, extra[0]))
        return out

    def _embedding_lookup(self, flat_ids, table):
        """The rows of ``table`` at the 1-D ``flat_ids``, by one-hot product or gather as the layer does."""
        if self.use_one_hot:
            one_hot = self._op_one_hot(flat_ids, self.vocab_size, self._on_value, self._off_value)
            return self._op_one_hot_matmul(one_hot, table)
        return self._op_gather(table, flat_ids, 0)

    def _embedding(self, ids, table):
        out_shape = ops.shape(ids) + (self.embedding_size,)
        rows = self._embedding_lookup(ops.reshape(ids, (-1,)), table)
        return ops.reshape(rows, out_shape)
