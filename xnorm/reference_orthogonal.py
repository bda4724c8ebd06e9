"""Float64 NumPy reference of the orthogonal parametrization, as torch's ``parametrizations.orthogonal``
computes it (real weights; the issue's spec: docs/spec.md once the backends land).

Shapes. The weight ``X`` has ``ndim >= 2`` and is a batch of matrices over its last two axes (a Conv2d
weight ``(out, in, kh, kw)`` is ``out * in`` matrices of ``kh x kw``). A wide matrix (``n < k`` for
``(n, k)``) is transposed first, so every map works on a tall ``(n, k)`` matrix and the result has
orthonormal columns (orthonormal rows once transposed back).

Maps (``orthogonal_map``; :func:`default_map` is ``matrix_exp`` for square matrices, else
``householder``):

* ``matrix_exp``: ``A = T - T^T`` with ``T = tril(X)`` padded with zero columns to ``n x n``;
  ``Q = expm(A)[:, :k]``.
* ``cayley``: the same ``A``; ``Q = (I - A/2)^{-1} (I + A/2)``, first ``k`` columns.
* ``householder``: the reflectors below the diagonal of ``X`` (LAPACK's ``geqrf`` layout), ``tau_i =
  2 / (1 + ||a_i||^2)``; ``Q`` is their product (``orgqr``) times the sign of ``X``'s diagonal (0 or
  +-1 per column, read as an integer, not differentiated).

With trivialization (the default) a buffer ``base`` (``n x n``, per matrix of the batch) multiplies the
result: ``Q = base @ Q``. Registration (:func:`register`) makes ``base`` the weight itself when it is
square and already orthogonal, else the Q factor of a QR with ``diag(R) >= 0`` (a non-square weight is
first completed to ``n x n`` with random columns, which backends draw from their RNG and this reference
takes as an argument), and sets ``original`` to ``-I`` (so that every map gives the identity).

Derivatives are exact, no finite differences: :func:`directional_derivative` by the product rule and,
for ``matrix_exp``, the eigen-decomposition formula of the Frechet derivative of the exponential of a
normal matrix; :func:`gradient` is its adjoint, each step backwards: one pass, where one directional
derivative per entry of ``X`` took 100 to 400 times as long on a Conv2d kernel (6, 6, 3, 3).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = [
    "MAPS",
    "default_map",
    "forward",
    "directional_derivative",
    "gradient",
    "register",
    "is_orthogonal",
    "make_orthogonal",
]

MAPS = ("matrix_exp", "cayley", "householder")


def default_map(shape: Tuple[int, ...]) -> str:
    """torch's default: ``matrix_exp`` for square matrices, ``householder`` otherwise (real weights)."""
    if len(shape) < 2:
        raise ValueError(f"the orthogonal parametrization needs a matrix or a batch of matrices, got shape {shape}")
    return "matrix_exp" if shape[-1] == shape[-2] else "householder"


def _check(X: np.ndarray, orthogonal_map: str) -> None:
    if X.ndim < 2:
        raise ValueError(f"the orthogonal parametrization needs a matrix or a batch of matrices, got shape {X.shape}")
    if orthogonal_map not in MAPS:
        raise ValueError(f"orthogonal_map must be one of {MAPS}, got {orthogonal_map!r}")


def _skew(X: np.ndarray, n: int) -> np.ndarray:
    """``T - T^T`` with ``T = tril(X)`` padded with zero columns to ``n x n`` (X tall, ``(..., n, k)``)."""
    T = np.tril(X)
    k = X.shape[-1]
    if k != n:
        T = np.concatenate([T, np.zeros(X.shape[:-2] + (n, n - k))], axis=-1)
    return T - np.swapaxes(T, -1, -2)


def _expm_skew(A: np.ndarray) -> np.ndarray:
    """``exp(A)`` for real skew-symmetric ``A`` (a normal matrix): ``iA`` is Hermitian, so
    ``A = U diag(-i w) U^H`` with ``w, U = eigh(iA)`` and ``exp(A) = U diag(exp(-i w)) U^H``."""
    w, U = np.linalg.eigh(1j * A)
    return np.real((U * np.exp(-1j * w)[..., None, :]) @ np.conj(np.swapaxes(U, -1, -2)))


def _cayley(A: np.ndarray) -> np.ndarray:
    """``(I - A/2)^{-1} (I + A/2)`` of skew-symmetric ``A`` (one matrix or a batch)."""
    eye = np.eye(A.shape[-1])
    return np.linalg.solve(eye - A / 2, eye + A / 2)


def _reflector(X: np.ndarray, i: int) -> Tuple[np.ndarray, float]:
    """``(v_i, tau_i)`` of column ``i`` of tall ``X``: ``v_i = (0, ..., 0, 1, X[i+1:, i])`` and
    ``tau_i = 2 / (1 + ||X[i+1:, i]||^2)``, so that ``I - tau_i v_i v_i^T`` is a reflection."""
    v = np.zeros(X.shape[0])
    v[i] = 1.0
    v[i + 1:] = X[i + 1:, i]
    return v, 2.0 / (1.0 + X[i + 1:, i] @ X[i + 1:, i])


def _householder(X: np.ndarray) -> np.ndarray:
    """``orgqr`` of the reflectors below the diagonal of tall ``X`` (one matrix), columns times
    ``int(diag(X))``."""
    n, k = X.shape
    Q = np.eye(n)[:, :k]
    for i in reversed(range(k)):
        v, tau = _reflector(X, i)
        Q = Q - tau * np.outer(v, v @ Q)
    return Q * np.trunc(np.diagonal(X))[None, :]


def _tall(X: np.ndarray) -> Tuple[np.ndarray, bool]:
    if X.shape[-2] < X.shape[-1]:
        return np.swapaxes(X, -1, -2), True
    return X, False


def _per_matrix(function, *arrays):
    """Apply ``function`` to each matrix of a batch (the leading axes of the first array)."""
    batch = arrays[0].shape[:-2]
    flat = [a.reshape((-1,) + a.shape[-2:]) if a is not None else None for a in arrays]
    out = [function(*(f[i] if f is not None else None for f in flat)) for i in range(flat[0].shape[0])]
    return np.stack(out).reshape(batch + out[0].shape)


def forward(X, orthogonal_map: Optional[str] = None, base=None) -> np.ndarray:
    """The orthogonal weight for ``original = X`` (and ``base``, ``(..., n, n)`` with ``n`` the larger side,
    when trivialized), float64, the shape of ``X``."""
    X = np.asarray(X, dtype=np.float64)
    orthogonal_map = orthogonal_map or default_map(X.shape)
    _check(X, orthogonal_map)
    X, transposed = _tall(X)
    n, k = X.shape[-2:]
    if orthogonal_map == "householder":
        Q = _per_matrix(_householder, X)
    else:
        A = _skew(X, n)
        Q = _expm_skew(A) if orthogonal_map == "matrix_exp" else _cayley(A)
        Q = Q[..., :k]
    if base is not None:
        Q = np.asarray(base, dtype=np.float64) @ Q
    return np.swapaxes(Q, -1, -2) if transposed else Q


def _dexpm_skew(A: np.ndarray, E: np.ndarray) -> np.ndarray:
    """The Frechet derivative of ``exp`` at skew-symmetric ``A`` in direction ``E``: with
    ``A = U diag(d) U^H``, ``U [(U^H E U) * Phi] U^H``, ``Phi_ij = (e^{d_i} - e^{d_j}) / (d_i - d_j)``
    (``e^{d_i}`` where ``d_i = d_j``)."""
    w, U = np.linalg.eigh(1j * A)
    d = -1j * w
    e = np.exp(d)
    diff = d[:, None] - d[None, :]
    close = np.abs(diff) < 1e-12
    phi = np.where(close, e[:, None], (e[:, None] - e[None, :]) / np.where(close, 1.0, diff))
    Uh = np.conj(U.T)
    return np.real(U @ ((Uh @ E @ U) * phi) @ Uh)


def _d_householder(X: np.ndarray, dX: np.ndarray) -> np.ndarray:
    n, k = X.shape
    Q = np.eye(n)[:, :k]
    dQ = np.zeros((n, k))
    for i in reversed(range(k)):
        a, da = X[i + 1:, i], dX[i + 1:, i]
        v, tau = _reflector(X, i)
        dv = np.zeros(n)
        dv[i + 1:] = da
        dtau = -tau * tau * (a @ da)
        # Q <- (I - tau v v^T) Q
        dQ = dQ - dtau * np.outer(v, v @ Q) - tau * (np.outer(dv, v @ Q) + np.outer(v, dv @ Q) + np.outer(v, v @ dQ))
        Q = Q - tau * np.outer(v, v @ Q)
    return dQ * np.trunc(np.diagonal(X))[None, :]


def directional_derivative(X, dX, orthogonal_map: Optional[str] = None, base=None) -> np.ndarray:
    """``d forward(X + t dX) / dt`` at ``t = 0``, exactly (no finite difference)."""
    X = np.asarray(X, dtype=np.float64)
    dX = np.asarray(dX, dtype=np.float64)
    orthogonal_map = orthogonal_map or default_map(X.shape)
    _check(X, orthogonal_map)
    X, transposed = _tall(X)
    dX, _ = _tall(dX)
    n, k = X.shape[-2:]
    if orthogonal_map == "householder":
        dQ = _per_matrix(_d_householder, X, dX)
    else:
        A, dA = _skew(X, n), _skew(dX, n)
        if orthogonal_map == "matrix_exp":
            dQ = _per_matrix(_dexpm_skew, A, dA)
        else:
            eye = np.eye(n)
            dQ = np.linalg.solve(eye - A / 2, (dA / 2) @ (_cayley(A) + eye))
        dQ = dQ[..., :k]
    if base is not None:
        dQ = np.asarray(base, dtype=np.float64) @ dQ
    return np.swapaxes(dQ, -1, -2) if transposed else dQ


def _householder_adjoint(X: np.ndarray, G: np.ndarray) -> np.ndarray:
    """``dL/dX`` of :func:`_householder` (one tall matrix) given ``G = dL/dQ``: the reflections run backwards.
    Step ``i`` is ``Q <- H_i Q`` with ``H_i = I - tau_i v_i v_i^T`` (symmetric), so ``dL/dQ`` before it is
    ``H_i dL/dQ`` after it, and ``v_i``, ``tau_i`` collect ``-tau_i (G Q^T v + Q G^T v)`` and
    ``-v^T G Q^T v``; ``a_i = X[i+1:, i]`` gets its share of both (``dtau/da = -tau^2 a``)."""
    n, k = X.shape
    Q = np.eye(n)[:, :k]
    before = []  # Q before each step, in the forward's order (i = k-1 down to 0)
    reflectors = []
    for i in reversed(range(k)):
        v, tau = _reflector(X, i)
        before.append(Q)
        reflectors.append((i, v, tau))
        Q = Q - tau * np.outer(v, v @ Q)
    G = G * np.trunc(np.diagonal(X))[None, :]
    out = np.zeros_like(X)
    for Q, (i, v, tau) in zip(reversed(before), reversed(reflectors), strict=True):
        Gv, Qv = G.T @ v, Q.T @ v  # (k,), (k,)
        grad_v = -tau * (G @ Qv + Q @ Gv)
        grad_tau = -(Gv @ Qv)
        a = v[i + 1:]
        out[i + 1:, i] = grad_v[i + 1:] - grad_tau * tau * tau * a
        G = G - tau * np.outer(v, Gv)
    return out


def gradient(X, grad_weight, orthogonal_map: Optional[str] = None, base=None) -> np.ndarray:
    """``dL/dX`` given ``dL/dweight``, the adjoint of :func:`directional_derivative` (which tests compare
    it with, entry by entry): each step of :func:`forward` backwards. ``matrix_exp``: the adjoint of the
    Frechet derivative of ``exp`` at ``A`` is the Frechet derivative at ``A^T``; ``cayley``: ``dQ = M^{-1}
    (dA/2) (Q + I)`` with ``M = I - A/2``, so ``dL/dA = M^{-T} G (Q + I)^T / 2``; then ``A = T - T^T``
    gives ``dL/dT = dL/dA - dL/dA^T``, of which ``tril`` keeps the first ``k`` columns."""
    X = np.asarray(X, dtype=np.float64)
    G = np.asarray(grad_weight, dtype=np.float64)
    orthogonal_map = orthogonal_map or default_map(X.shape)
    _check(X, orthogonal_map)
    if G.shape != X.shape:
        raise ValueError(f"grad_weight has shape {G.shape}, the weight {X.shape}")
    X, transposed = _tall(X)
    G, _ = _tall(G)
    n, k = X.shape[-2:]
    if base is not None:
        G = np.swapaxes(np.asarray(base, dtype=np.float64), -1, -2) @ G
    if orthogonal_map == "householder":
        grad = _per_matrix(_householder_adjoint, X, G)
    else:
        A = _skew(X, n)
        G_full = np.concatenate([G, np.zeros(G.shape[:-1] + (n - k,))], axis=-1) if k != n else G
        if orthogonal_map == "matrix_exp":
            grad_A = _per_matrix(_dexpm_skew, np.swapaxes(A, -1, -2), G_full)
        else:
            eye = np.eye(n)
            Q_plus_eye = _cayley(A) + eye
            grad_A = np.linalg.solve(np.swapaxes(eye - A / 2, -1, -2), G_full) @ np.swapaxes(Q_plus_eye, -1, -2) / 2
        grad = np.tril((grad_A - np.swapaxes(grad_A, -1, -2))[..., :k])
    return np.swapaxes(grad, -1, -2) if transposed else grad


def is_orthogonal(Q: np.ndarray, eps: float) -> bool:
    """torch's test at registration: ``Q^T Q`` within ``10 * n * eps`` of the identity (``Q`` tall, one
    or a batch; ``eps`` the weight dtype's machine epsilon)."""
    n, k = Q.shape[-2:]
    return bool(np.allclose(np.swapaxes(Q, -1, -2) @ Q, np.eye(k), rtol=1e-5, atol=10.0 * n * eps))


def make_orthogonal(A: np.ndarray) -> np.ndarray:
    """The Q factor of ``A = QR`` (``A`` tall) with ``diag(R) >= 0``: LAPACK's Q times the signs of
    ``diag(R)`` (a zero on the diagonal zeroes its column, as torch's ``sgn`` does)."""
    def one(matrix):
        q, r = np.linalg.qr(matrix)
        return q * np.sign(np.diagonal(r))[None, :]

    return _per_matrix(one, np.asarray(A, dtype=np.float64))


def register(weight, orthogonal_map: Optional[str] = None, *, use_trivialization: bool = True,
             completion=None, eps: float = np.finfo(np.float64).eps) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(original, base)`` after registering ``weight`` (``base`` None without trivialization).

    ``completion``: for a non-square weight with trivialization, the random ``(..., n, n - k)`` columns
    that complete the tall weight before its QR (torch draws them with ``torch.randn``). ``eps``: the
    machine epsilon of the weight's dtype, for the orthogonality test of a square weight.

    Without trivialization, ``matrix_exp`` and ``cayley`` keep the weight as ``original`` (their inverse
    is not implemented, so the registered weight is the map of the old one, and assigning a weight later
    raises); ``householder`` stores the weight's QR reflectors, so the registered weight is its Q factor.

    Raises ValueError where torch does: fewer than 2 axes, an unknown map.
    """
    weight = np.asarray(weight, dtype=np.float64)
    orthogonal_map = orthogonal_map or default_map(weight.shape)
    _check(weight, orthogonal_map)
    Q, transposed = _tall(weight)
    n, k = Q.shape[-2:]
    if not use_trivialization:
        if orthogonal_map != "householder":
            return weight.copy(), None

        def reflectors(matrix):
            h, tau = np.linalg.qr(matrix, mode="raw")
            A = h.T.copy()
            diagonal = np.sign(np.diagonal(A)).copy()
            diagonal[tau == 0.0] *= -1
            A[np.arange(k), np.arange(k)] = diagonal
            return A

        original = _per_matrix(reflectors, Q)
        return (np.swapaxes(original, -1, -2) if transposed else original), None
    if n == k:
        base = Q.copy() if is_orthogonal(Q, eps) else make_orthogonal(Q)
    else:
        if completion is None:
            raise ValueError(f"a non-square weight needs completion= of shape {Q.shape[:-2] + (n, n - k)}")
        base = make_orthogonal(np.concatenate([Q, np.asarray(completion, dtype=np.float64)], axis=-1))
    original = np.zeros(weight.shape)
    idx = np.arange(min(weight.shape[-2:]))
    original[..., idx, idx] = -1.0
    return original, base
