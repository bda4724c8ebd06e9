"""float64 NumPy forward and weight/bias gradients of the catalogue's layers, in torch's semantics.

These are the oracle for outputs and for ``dL/dw``; :func:`xnorm.reference.weight_norm_grads` turns
``dL/dw`` into ``dL/dg`` and ``dL/dv``. Convolutions are written as a sum over kernel offsets of
strided slices, which keeps groups, stride, padding, dilation and output_padding explicit.
"""

from __future__ import annotations

import itertools
from typing import Optional, Tuple

import numpy as np

from xnorm.spec import LayerKind

from .cases import LayerCase

__all__ = ["output_shape", "forward", "backward"]


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_transpose_out(size, k, s, p, d, op):
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def output_shape(layer: LayerCase) -> Tuple[int, ...]:
    if layer.kind == LayerKind.LINEAR:
        return (layer.input_shape[0], layer.weight_shape[0])
    if layer.kind == LayerKind.EMBEDDING:
        return tuple(layer.input_shape) + (layer.weight_shape[1],)
    n, _, *spatial = layer.input_shape
    if layer.kind in LayerKind.CONV:
        sizes = [
            _conv_out(*a)
            for a in zip(spatial, layer.kernel_size, layer.stride, layer.padding, layer.dilation, strict=True)
        ]
    else:
        sizes = [
            _conv_transpose_out(*a)
            for a in zip(
                spatial,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.output_padding,
                strict=True,
            )
        ]
    return (n, layer.out_channels, *sizes)


def _window(offset, dilation, stride, count):
    """Slice picking ``count`` positions ``offset * dilation + i * stride``."""
    start = offset * dilation
    return slice(start, start + stride * (count - 1) + 1, stride)


def _conv_taps(layer: LayerCase, spatial_out):
    """(kernel offset, slice tuple into the padded input / full output) for every kernel position."""
    for offset in itertools.product(*(range(k) for k in layer.kernel_size)):
        index = tuple(
            _window(o, d, s, c) for o, d, s, c in zip(offset, layer.dilation, layer.stride, spatial_out, strict=True)
        )
        yield offset, index


def _conv_forward(layer, w, x):
    n, c, *spatial = x.shape
    g = layer.groups
    pad = [(0, 0), (0, 0)] + [(p, p) for p in layer.padding]
    xp = np.pad(x, pad)
    out_shape = output_shape(layer)
    y = np.zeros(out_shape)
    o = layer.out_channels
    wg = w.reshape(g, o // g, c // g, *layer.kernel_size)
    for offset, index in _conv_taps(layer, out_shape[2:]):
        xs = xp[(slice(None), slice(None)) + index].reshape(n, g, c // g, *out_shape[2:])
        tap = wg[(slice(None), slice(None), slice(None)) + offset]  # (g, o/g, c/g)
        y += np.einsum("gpc,ngc...->ngp...", tap, xs).reshape(out_shape)
    return y, xp


def _conv_backward(layer, w, x, grad_y):
    n, c, *spatial = x.shape
    g = layer.groups
    _, xp = _conv_forward(layer, w, x)
    o = layer.out_channels
    grad_w = np.zeros((g, o // g, c // g, *layer.kernel_size))
    gy = grad_y.reshape(n, g, o // g, -1)
    for offset, index in _conv_taps(layer, grad_y.shape[2:]):
        xs = xp[(slice(None), slice(None)) + index].reshape(n, g, c // g, -1)
        grad_w[(slice(None), slice(None), slice(None)) + offset] = np.einsum("ngps,ngcs->gpc", gy, xs)
    return grad_w.reshape(w.shape)


def _conv_transpose_full(layer, x):
    """Shape of the uncropped transposed-convolution output (before removing padding)."""
    n, _, *spatial = x.shape
    return (n, layer.out_channels) + tuple(
        (i - 1) * s + d * (k - 1) + 1 + op
        for i, s, d, k, op in zip(
            spatial, layer.stride, layer.dilation, layer.kernel_size, layer.output_padding, strict=True
        )
    )


def _crop(layer, full_shape):
    return (slice(None), slice(None)) + tuple(
        slice(p, size - p) for p, size in zip(layer.padding, full_shape[2:], strict=True)
    )


def _conv_transpose_forward(layer, w, x):
    n, c, *spatial = x.shape
    g = layer.groups
    o = layer.out_channels
    full = np.zeros(_conv_transpose_full(layer, x))
    wg = w.reshape(g, c // g, o // g, *layer.kernel_size)
    xg = x.reshape(n, g, c // g, *spatial)
    for offset, index in _conv_taps(layer, spatial):
        tap = wg[(slice(None), slice(None), slice(None)) + offset]  # (g, c/g, o/g)
        contribution = np.einsum("gcp,ngc...->ngp...", tap, xg).reshape(n, o, *spatial)
        full[(slice(None), slice(None)) + index] += contribution
    return full[_crop(layer, full.shape)]


def _conv_transpose_backward(layer, w, x, grad_y):
    n, c, *spatial = x.shape
    g = layer.groups
    o = layer.out_channels
    full_grad = np.zeros(_conv_transpose_full(layer, x))
    full_grad[_crop(layer, full_grad.shape)] = grad_y
    grad_w = np.zeros((g, c // g, o // g, *layer.kernel_size))
    xg = x.reshape(n, g, c // g, -1)
    for offset, index in _conv_taps(layer, spatial):
        gy = full_grad[(slice(None), slice(None)) + index].reshape(n, g, o // g, -1)
        grad_w[(slice(None), slice(None), slice(None)) + offset] = np.einsum("ngcs,ngps->gcp", xg, gy)
    return grad_w.reshape(w.shape)


def _bias_shape(layer, ndim):
    return (1, -1) + (1,) * (ndim - 2) if layer.kind not in (LayerKind.LINEAR, LayerKind.EMBEDDING) else (1, -1)


def forward(layer: LayerCase, weight: np.ndarray, bias: Optional[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The layer's output in float64 (inputs are upcast first)."""
    w = np.asarray(weight, dtype=np.float64)
    if layer.kind == LayerKind.EMBEDDING:
        return w[np.asarray(x)]
    x = np.asarray(x, dtype=np.float64)
    if layer.kind == LayerKind.LINEAR:
        y = x @ w.T
    elif layer.kind in LayerKind.CONV:
        y, _ = _conv_forward(layer, w, x)
    else:
        y = _conv_transpose_forward(layer, w, x)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(_bias_shape(layer, y.ndim))
    return y


def backward(
    layer: LayerCase, weight: np.ndarray, x: np.ndarray, grad_output: np.ndarray
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(dL/dweight, dL/dbias)`` in float64 for ``dL/doutput = grad_output``; dL/dbias is None without bias."""
    w = np.asarray(weight, dtype=np.float64)
    gy = np.asarray(grad_output, dtype=np.float64)
    if layer.kind == LayerKind.EMBEDDING:
        grad_w = np.zeros_like(w)
        np.add.at(grad_w, np.asarray(x).reshape(-1), gy.reshape(-1, w.shape[1]))
        return grad_w, None
    x = np.asarray(x, dtype=np.float64)
    if layer.kind == LayerKind.LINEAR:
        grad_w = gy.T @ x
    elif layer.kind in LayerKind.CONV:
        grad_w = _conv_backward(layer, w, x, gy)
    else:
        grad_w = _conv_transpose_backward(layer, w, x, gy)
    grad_b = gy.sum(axis=tuple(a for a in range(gy.ndim) if a != 1)) if layer.bias else None
    return grad_w, grad_b
