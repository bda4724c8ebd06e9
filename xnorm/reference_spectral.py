"""The NumPy oracle for spectral normalization (:class:`xnorm.spec.SpectralNorm`).

Arrays are in the canonical (torch) layout; ``dim`` is already resolved
(:meth:`~xnorm.spec.SpectralNorm.resolved_dim`). Everything is computed in float64 unless ``dtype=``
names the dtype a backend computes for (then in :func:`xnorm.spec.compute_dtype`, the weight rounded
to ``dtype`` at the end), like :mod:`xnorm.reference`.

With the matrix view ``M`` of the weight (``dim`` first, the rest flattened), unit vectors ``u`` and
``v`` that carry no gradient, ``sigma = u . (M v)`` and ``w = W / sigma``, the gradient for a given
``G = dL/dw`` is::

    dL/dW = G / sigma - (<G, W> / sigma**2) * reshape(u v^T)

(``d sigma / d M = u v^T``), reshaped back to the weight's layout. A 1-D weight is
``W / max(||W||, eps)``; its gradient is that of ``F.normalize``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .reference import round_to_dtype
from .spec import SPECTRAL_INIT_ITERATIONS, compute_dtype

__all__ = [
    "matrix_view",
    "from_matrix_view",
    "normalize",
    "power_iteration",
    "init_state",
    "sigma",
    "spectral_norm",
    "training_call",
    "spectral_norm_grad",
]

_WORK = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32, "float64": np.float64}


def _work(dtype: Optional[str]):
    return np.float64 if dtype is None else _WORK[compute_dtype(dtype)]


def matrix_view(weight: np.ndarray, dim: int) -> np.ndarray:
    """The weight with axis ``dim`` moved first and the others flattened: shape ``(h, w)``."""
    weight = np.asarray(weight)
    return np.moveaxis(weight, dim, 0).reshape(weight.shape[dim], -1)


def from_matrix_view(matrix: np.ndarray, shape: Tuple[int, ...], dim: int) -> np.ndarray:
    """The inverse of :func:`matrix_view` for a weight of canonical ``shape``."""
    moved = (shape[dim],) + tuple(size for axis, size in enumerate(shape) if axis != dim)
    return np.moveaxis(np.asarray(matrix).reshape(moved), 0, dim)


def normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """``x / max(||x||, eps)`` (torch's ``F.normalize``): a zero vector stays zero."""
    return x / max(float(np.sqrt(np.sum(x * x))), eps)


def power_iteration(
    weight: np.ndarray, u: np.ndarray, v: np.ndarray, dim: int, iterations: int, eps: float, *, dtype=None
) -> Tuple[np.ndarray, np.ndarray]:
    """``iterations`` times: ``u = normalize(M v)``, then ``v = normalize(M^T u)``. Returns new ``(u, v)``."""
    work = _work(dtype)
    matrix = matrix_view(weight, dim).astype(work)
    u, v = np.asarray(u, dtype=work), np.asarray(v, dtype=work)
    for _ in range(iterations):
        u = normalize(matrix @ v, eps)
        v = normalize(matrix.T @ u, eps)
    return u, v


def init_state(
    weight: np.ndarray, u0: np.ndarray, v0: np.ndarray, dim: int, eps: float, *, dtype=None
) -> Tuple[np.ndarray, np.ndarray]:
    """The state right after wrapping, given the raw N(0, 1) draws ``u0`` (h) and ``v0`` (w): both
    normalized, then :data:`~xnorm.spec.SPECTRAL_INIT_ITERATIONS` iterations."""
    work = _work(dtype)
    u, v = normalize(np.asarray(u0, work), eps), normalize(np.asarray(v0, work), eps)
    return power_iteration(weight, u, v, dim, SPECTRAL_INIT_ITERATIONS, eps, dtype=dtype)


def sigma(weight: np.ndarray, u: np.ndarray, v: np.ndarray, dim: int, *, dtype=None) -> float:
    """``u . (M v)``, the estimate of the largest singular value."""
    work = _work(dtype)
    matrix = matrix_view(weight, dim).astype(work)
    return np.asarray(u, work) @ (matrix @ np.asarray(v, work))


def spectral_norm(
    weight: np.ndarray, u: Optional[np.ndarray], v: Optional[np.ndarray], dim: int, eps: float, *, dtype=None
) -> np.ndarray:
    """``W / sigma`` with the given state (no iteration: what eval mode computes); 1-D: ``W / max(||W||, eps)``."""
    work = _work(dtype)
    w = np.asarray(weight).astype(work)
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma = 0 gives NaN, as the spec says
        out = normalize(w, eps) if w.ndim == 1 else w / sigma(w, u, v, dim, dtype=dtype)
    return out if dtype is None else round_to_dtype(out, dtype)


def training_call(
    weight: np.ndarray, u: np.ndarray, v: np.ndarray, dim: int, n_power_iterations: int, eps: float, *, dtype=None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training-mode use: iterate, then compute the weight. Returns ``(w, u, v)`` with the new state."""
    if np.ndim(weight) == 1:
        return spectral_norm(weight, None, None, dim, eps, dtype=dtype), u, v
    u, v = power_iteration(weight, u, v, dim, n_power_iterations, eps, dtype=dtype)
    return spectral_norm(weight, u, v, dim, eps, dtype=dtype), u, v


def spectral_norm_grad(
    weight: np.ndarray, u: Optional[np.ndarray], v: Optional[np.ndarray], grad_w: np.ndarray, dim: int, eps: float
) -> np.ndarray:
    """``dL/dW`` in float64 for a given ``dL/dw``, with the state the forward used (u, v after its iterations)."""
    weight = np.asarray(weight, np.float64)
    grad_w = np.asarray(grad_w, np.float64)
    if weight.ndim == 1:
        norm = float(np.sqrt(np.sum(weight * weight)))
        if norm <= eps:  # the clamp is active: w = W / eps, a linear map
            return grad_w / eps
        return grad_w / norm - weight * (np.sum(grad_w * weight) / norm**3)
    u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
    s = sigma(weight, u64, v64, dim)
    outer = from_matrix_view(np.outer(u64, v64), weight.shape, dim)
    return grad_w / s - (np.sum(grad_w * weight) / (s * s)) * outer
