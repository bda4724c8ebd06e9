"""The NumPy oracle for weight normalization.

Every function takes arrays in the canonical (torch) layout and a ``dim`` read by
:func:`xnorm.spec.normalize_dim`. By default everything is computed in float64, whatever the input's
dtype: that is the value every backend is compared against. Pass ``dtype=`` (a name from
:data:`xnorm.spec.FLOATING_DTYPES`) to compute the way the spec says a backend does for that dtype
instead: in :func:`xnorm.spec.compute_dtype` and rounded to ``dtype`` at the end. NumPy has no
bfloat16, so bfloat16 values are held in float32 arrays whose values are exactly representable in
bfloat16 (see :func:`round_to_dtype`).

The gradients are the analytic ones. With ``n = norm_except_dim(v)`` and ``G = dL/dw``::

    s     = sum(G * v over every axis except dim, keepdims)
    dL/dg = s / n
    dL/dv = (g / n) * (G - v * s / n**2)

which holds with or without ``eps`` because ``d n / d v = v / n`` in both cases.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .spec import check_floating, compute_dtype, normalize_dim, reduction_axes

__all__ = [
    "round_to_dtype",
    "norm_except_dim",
    "weight_norm",
    "init",
    "weight_norm_grads",
]

_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round ``x`` to ``dtype`` (round to nearest, ties to even).

    Returns a float16/float32/float64 array; for ``"bfloat16"`` a float32 array holding bfloat16 values.
    """
    check_floating(dtype, what="round_to_dtype's target")
    if dtype != "bfloat16":
        return np.asarray(x).astype(_NUMPY_DTYPES[dtype])
    as_f32 = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    bits = as_f32.view(np.uint32).astype(np.uint64)
    ties_to_even = ((bits >> 16) & 1) + 0x7FFF
    rounded = (((bits + ties_to_even) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(as_f32), as_f32, rounded).reshape(np.shape(x))


def _working_dtype(dtype: Optional[str]):
    return np.float64 if dtype is None else _NUMPY_DTYPES[compute_dtype(dtype)]


def _finish(x: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    return x if dtype is None else round_to_dtype(x, dtype)


def norm_except_dim(
    v: np.ndarray, dim: Optional[int] = 0, *, eps: Optional[float] = None, dtype: Optional[str] = None
) -> np.ndarray:
    """2-norm of ``v`` over every axis except ``dim``, with size-1 axes kept.

    ``dim=None`` or ``-1`` give a 0-d array (one norm over the whole tensor). With ``eps`` the result is
    ``sqrt(sum(v**2) + eps)``. Returned in float64, or in ``compute_dtype(dtype)`` when ``dtype`` is given
    (the norm is not rounded to a low-precision dtype: the spec keeps it in float32).
    """
    dim = normalize_dim(dim, np.ndim(v))
    work = np.asarray(v).astype(_working_dtype(dtype))
    squares = np.sum(work * work, axis=reduction_axes(dim, work.ndim), keepdims=dim is not None)
    if eps is not None:
        squares = squares + work.dtype.type(eps)
    return np.sqrt(squares)


def weight_norm(
    g: np.ndarray,
    v: np.ndarray,
    dim: Optional[int] = 0,
    *,
    eps: Optional[float] = None,
    dtype: Optional[str] = None,
) -> np.ndarray:
    """``w = v * (g / norm_except_dim(v, dim))``, in float64 or as the spec computes ``dtype``."""
    work = _working_dtype(dtype)
    norm = norm_except_dim(v, dim, eps=eps, dtype=dtype)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero slice gives NaN, as the spec says
        w = np.asarray(v).astype(work) * (np.asarray(g).astype(work) / norm)
    return _finish(w, dtype)


def init(
    weight: np.ndarray, dim: Optional[int] = 0, *, eps: Optional[float] = None, dtype: Optional[str] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """The function-preserving ``(g, v)`` for an existing weight: ``g = norm_except_dim(weight)``, ``v = weight``."""
    g = _finish(norm_except_dim(weight, dim, eps=eps, dtype=dtype), dtype)
    v = np.array(weight, dtype=np.float64 if dtype is None else None, copy=True)
    return g, v


def weight_norm_grads(
    g: np.ndarray,
    v: np.ndarray,
    grad_w: np.ndarray,
    dim: Optional[int] = 0,
    *,
    eps: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """``(dL/dg, dL/dv)`` in float64 for a given ``dL/dw``; shapes match ``g`` and ``v``."""
    dim = normalize_dim(dim, np.ndim(v))
    v64 = np.asarray(v, dtype=np.float64)
    g64 = np.asarray(g, dtype=np.float64)
    grad64 = np.asarray(grad_w, dtype=np.float64)
    norm = norm_except_dim(v64, dim, eps=eps)
    projection = np.sum(grad64 * v64, axis=reduction_axes(dim, v64.ndim), keepdims=dim is not None)
    grad_g = (projection / norm).reshape(np.shape(g))
    grad_v = (g64.reshape(norm.shape) / norm) * (grad64 - v64 * projection / (norm * norm))
    return grad_g, grad_v
