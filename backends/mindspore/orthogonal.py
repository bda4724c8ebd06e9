"""The orthogonal parametrization for the MindSpore backend: ``xnorm.orthogonal(cell)``.

``xnorm.wrap(layer, xnorm.Orthogonal(...))`` (or ``xnorm.orthogonal(layer)``) returns an
:class:`OrthogonalCell` around a ``mindspore.nn`` layer. Every call of ``construct`` computes the
weight from ``original`` as :class:`xnorm.spec.Orthogonal` defines it (torch's
``parametrizations.orthogonal``; :mod:`xnorm.reference_orthogonal` has every rule) and runs the layer's
own primitive on it (:class:`~xnorm._backends.mindspore.ReparametrizedCell`), so ``dL/dw`` reaches
``original`` in GRAPH_MODE, PYNATIVE_MODE and inside ``mindspore.jit`` functions.

Shapes
    The weight is read in the canonical (torch) layout: MindSpore's Conv1d/Conv1dTranspose unit axis is
    dropped, so a Conv1d weight ``(out, in, 1, k)`` is the batch of ``out`` matrices ``in x k``, as on a
    torch Conv1d. Every matrix of the batch (the last two canonical axes) is made orthogonal: on a Conv2d
    weight ``(out, in, kh, kw)`` that is every ``kh x kw`` kernel slice, not the ``out x in*kh*kw``
    matrix; a wide matrix (``n < k``) is transposed first and has orthonormal rows.

Parameters and names
    ``<name>_orig`` (trainable as the layer's weight was, MindSpore's storage layout and dtype), then,
    with trivialization, ``<name>_base`` (``requires_grad=False``: optimizers built from
    ``trainable_params()`` leave it alone, checkpoints hold it), then the layer's other parameters:
    ``weight_orig``, ``weight_base``, ``bias``. ``base`` has the canonical batch shape plus ``(n, n)``
    (``n`` the larger side) and the weight's dtype; it never changes after wrapping.

Registration (at wrap, eagerly)
    With trivialization ``base`` is the tall weight itself when it is square and already orthogonal
    (torch's test: ``Q^T Q`` within ``10 n eps`` of ``I``), else the Q of its QR with ``diag(R) >= 0``; a
    non-square weight is first completed to ``n x n`` with columns drawn by
    ``numpy.random.standard_normal`` from NumPy's global RNG (which ``mindspore.set_seed`` and
    ``numpy.random.seed`` seed), and ``original`` becomes ``-I``. So wrapping changes the weight unless it
    is orthogonal. Without trivialization ``matrix_exp`` and ``cayley`` keep the weight as ``original`` (the
    weight becomes its map) and ``householder`` stores the reflectors of its QR (the weight becomes its Q).

The maps, from primitives that have gradients on every MindSpore device
    MindSpore 2.10 has no ``MatrixExp`` kernel on the CPU and no bprop for ``Qr``/``Orgqr``; ``MatrixSolve``,
    ``MatMul`` and elementwise ops have both, and the maps are built from them:

    * ``cayley``: ``Q = solve(I - A/2, I + A/2)`` (one ``MatrixSolve``), ``A = T - T^T``, ``T`` the lower
      triangle padded with zero columns to ``n x n``.
    * ``matrix_exp``: scaling and squaring with the degree-13 Pade approximant (Higham 2005): ``s`` per
      matrix from ``||A||_1`` (not differentiated), 6 matmuls and one solve for the approximant, then
      :data:`MAX_SQUARINGS` squarings, each kept only for the matrices that need it (a select): in a
      graph (GRAPH_MODE, ``mindspore.jit``) the squarings cost 16 matmuls per call whatever ``s`` is, the
      price of a graph with no data-dependent loop; run eagerly (PYNATIVE_MODE, outside ``jit``) the loop
      stops after the largest ``s`` of the batch, read on the host, with the same result to the bit.
      Beyond ``||A||_1 > 5.37 * 2**16`` (about 3.5e5) too few squarings remain: the result is still
      exactly orthogonal (a Pade approximant of a skew-symmetric matrix is) but no longer ``exp(A)`` to the
      dtype's precision.
    * ``householder``: the compact WY form of the product of the reflectors ``H_i = I - tau_i v_i v_i^T``,
      ``Q = I - V T V^T`` with ``T^{-1} = diag(1/tau) + striu(V^T V)`` (one ``k x k`` solve and two
      matmuls instead of ``k`` dependent rank-one updates, which would unroll into ``k`` graph nodes),
      times the sign of the diagonal, read as an integer and not differentiated, as torch does.

    With trivialization ``Q = base @ Q``.

Precision
    float16 and bfloat16 weights are computed in float32 and the weight is cast back once; float32 and
    float64 as they are.

Failure modes (at wrap; nothing changes): a parameter with fewer than 2 axes (``DimError``), an unknown
map (``OptionError``, from the spec). ``remove`` puts the orthogonal weight back on the layer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mindspore
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from xnorm.spec import LOW_PRECISION_DTYPES, Orthogonal, StorageLayout

try:  # where MindSpore keeps it (2.10); a release without trace-mode jit has none
    from mindspore.graph.jit_context import jit_context as _jit_context
except ImportError:  # pragma: no cover - other MindSpore releases
    try:
        from mindspore.common.jit_context import jit_context as _jit_context
    except ImportError:
        _jit_context = None

from . import ReparametrizedCell, _dtype_name

__all__ = ["OrthogonalCell", "wrap_orthogonal", "MAX_SQUARINGS"]

#: Squarings compiled into the matrix_exp graph (see the module docstring).
MAX_SQUARINGS = 16

# Higham (2005), "The scaling and squaring method for the matrix exponential revisited": the degree-13
# Pade coefficients and the 1-norm up to which it needs no scaling (double precision).
_PADE13 = (64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0, 129060195264000.0,
           10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0, 40840800.0, 960960.0, 16380.0, 182.0, 1.0)
_THETA13 = 5.371920351148152


class _Solve(nn.Cell):
    """``solve(A, B)`` with its own bprop: MindSpore 2.10's ``MatrixSolve`` bprop computes a float64 gradient
    to about 1e-7 (float32 precision) and fails on some float64 graphs with a float32/float64 Add; this one
    is exact in the input's dtype (``dB = solve(A^T, dX)``, ``dA = -dB X^T``)."""

    def __init__(self) -> None:
        super().__init__()
        self.solve = ops.MatrixSolve()
        self.solve_transposed = ops.MatrixSolve(adjoint=True)

    def construct(self, a, b):
        return self.solve(a, b)

    def bprop(self, a, b, out, dout):
        grad_b = self.solve_transposed(a, dout)
        return -ops.matmul(grad_b, _mT(out)), grad_b


def _runs_eagerly() -> bool:
    """Whether Python runs a Cell's ``construct`` op by op now: PYNATIVE_MODE and no trace-mode
    ``mindspore.jit`` recording the ops (that would bake a host value into its graph)."""
    if mindspore.get_context("mode") != mindspore.PYNATIVE_MODE:
        return False
    return _jit_context is None or _jit_context() is None


def _compute_dtype(dtype):
    return mindspore.float32 if _dtype_name(dtype) in LOW_PRECISION_DTYPES else dtype


def _mT(x):
    return ops.swapaxes(x, -1, -2)


class OrthogonalCell(ReparametrizedCell):
    """A MindSpore layer whose weight is kept orthogonal; see the module docstring.

    Built by :func:`xnorm.wrap` with a :class:`xnorm.spec.Orthogonal`; not meant to be constructed directly.

    Attributes (in addition to :class:`~xnorm._backends.mindspore.ReparametrizedCell`'s):
        orthogonal_map: the resolved map (``"matrix_exp"``, ``"cayley"``, ``"householder"``).
        use_trivialization: whether ``<name>_base`` multiplies the map's result.
        canonical_shape: the weight's shape in the canonical layout.
    """

    description = "orthogonalized"
    helper_cells = ("_solve",)

    def __init__(self, layer: nn.Cell, kind: str, name: str, spec: Orthogonal, original: Tensor,
                 base: Optional[Tensor], canonical_shape: Tuple[int, ...]):
        super().__init__(layer, kind, name)
        self.orthogonal_map = spec.resolved_map(canonical_shape)
        self.use_trivialization = spec.use_trivialization
        self.canonical_shape = tuple(canonical_shape)
        self._storage_shape = tuple(original.shape)
        self._weight_dtype = original.dtype
        self._compute_dtype = _compute_dtype(original.dtype)
        self._low_precision = self._compute_dtype != original.dtype
        rows, cols = canonical_shape[-2:]
        self._transposed = rows < cols
        n, k = max(rows, cols), min(rows, cols)
        self._n, self._k = n, k
        host = np.float64 if self._compute_dtype == mindspore.float64 else np.float32
        # constant masks and identities of the tall (n, k) matrix, built once on the host
        self._lower = Tensor(np.tril(np.ones((n, k)), -1).astype(host))
        self._lower_with_diagonal = Tensor(np.tril(np.ones((n, k))).astype(host))
        self._eye_nk = Tensor(np.eye(n, k).astype(host))
        self._eye_n = Tensor(np.eye(n).astype(host))
        self._eye_k = Tensor(np.eye(k).astype(host))
        self._strict_upper_k = Tensor(np.triu(np.ones((k, k)), 1).astype(host))
        # Pade coefficients as tensors of the compute dtype: a Python float becomes a float32 constant
        self._pade = tuple(Tensor(np.array(c, dtype=host)) for c in _PADE13)
        self._pad = Tensor(np.zeros(tuple(canonical_shape[:-2]) + (n, n - k)).astype(host)) if n != k else None
        self._solve = _Solve()
        self._orig_name = name + "_orig"
        self._base_name = name + "_base"
        self.own_parameter_names = (self._orig_name,) + ((self._base_name,) if base is not None else ())

        requires_grad = getattr(layer, name).requires_grad
        setattr(self, self._orig_name, Parameter(original, name=self._orig_name, requires_grad=requires_grad))
        if base is not None:
            setattr(self, self._base_name, Parameter(base, name=self._base_name, requires_grad=False))
        self._adopt_layer(layer)

    # -- the maps, on a tall (..., n, k) matrix in the compute dtype ----------------------------------
    def _skew(self, X):
        """``T - T^T``, ``T`` the lower triangle of X padded with zero columns to ``n x n``."""
        T = X * self._lower_with_diagonal
        if self._pad is not None:
            T = ops.concat((T, self._pad), -1)
        return T - _mT(T)

    def _matrix_exp(self, A):
        b = self._pade
        norm = ops.amax(ops.reduce_sum(ops.abs(A), -2), -1, keepdims=True)  # ||A||_1 per matrix, (..., 1)
        norm = ops.stop_gradient(ops.expand_dims(norm, -1))
        steps = ops.ceil(ops.log(norm / _THETA13 + 1e-30) / np.log(2.0))
        steps = ops.clip_by_value(steps, ops.zeros_like(steps), ops.full_like(steps, MAX_SQUARINGS))
        A = A / ops.pow(ops.full_like(steps, 2.0), steps)
        eye = self._eye_n
        A2 = ops.matmul(A, A)
        A4 = ops.matmul(A2, A2)
        A6 = ops.matmul(A4, A2)
        U = ops.matmul(A, ops.matmul(A6, b[13] * A6 + b[11] * A4 + b[9] * A2) + b[7] * A6 + b[5] * A4 + b[3] * A2
                       + b[1] * eye)
        V = ops.matmul(A6, b[12] * A6 + b[10] * A4 + b[8] * A2) + b[6] * A6 + b[4] * A4 + b[2] * A2 + b[0] * eye
        R = self._solve(V - U, V + U)
        if self._eager:
            return self._square_eagerly(R, steps)
        for i in range(MAX_SQUARINGS):
            R = ops.where(steps > i, ops.matmul(R, R), R)
        return R

    def _square_eagerly(self, R, steps):
        """The squarings of ``_matrix_exp`` up to the largest ``steps`` only: op by op, each squaring no
        matrix needs would be a select of R itself. Never in a graph (``_eager``): it reads ``steps`` on
        the host."""
        for i in range(int(steps.max())):
            R = ops.where(steps > i, ops.matmul(R, R), R)
        return R

    def _householder(self, X):
        """The compact WY form (module docstring), columns times the sign of X's diagonal."""
        V = X * self._lower + self._eye_nk
        below = X * self._lower
        tau = 2.0 / (1.0 + ops.reduce_sum(below * below, -2))  # (..., k)
        inverse_T = ops.matmul(_mT(V), V) * self._strict_upper_k + self._eye_k * ops.expand_dims(1.0 / tau, -2)
        top = V[..., : self._k, :]
        Q = self._eye_nk - ops.matmul(V, self._solve(inverse_T, _mT(top)))
        diagonal = ops.stop_gradient(ops.reduce_sum(X * self._eye_nk, -2))
        # the sign of each column is the diagonal read as an integer (0 or +-1), never differentiated, as torch does
        signs = ops.trunc(diagonal)
        return Q * ops.expand_dims(signs, -2)

    def _orthogonal(self, X):
        """The map of a tall ``(..., n, k)`` X, times base with trivialization."""
        if self.orthogonal_map == "householder":
            Q = self._householder(X)
        else:
            A = self._skew(X)
            if self.orthogonal_map == "matrix_exp":
                Q = self._matrix_exp(A)
            else:
                Q = self._solve(self._eye_n - 0.5 * A, self._eye_n + 0.5 * A)
            if self._n != self._k:
                Q = Q[..., : self._k]
        if self.use_trivialization:
            base = getattr(self, self._base_name)
            Q = ops.matmul(ops.cast(base, self._compute_dtype) if self._low_precision else base, Q)
        return Q

    def _weight(self):
        original = getattr(self, self._orig_name)
        X = ops.cast(original, self._compute_dtype) if self._low_precision else original
        X = ops.reshape(X, self.canonical_shape)  # drops a Conv1d's unit axis; a no-op elsewhere
        if self._transposed:
            X = _mT(X)
        Q = self._orthogonal(X)
        if self._transposed:
            Q = _mT(Q)
        Q = ops.reshape(Q, self._storage_shape)
        return ops.cast(Q, self._weight_dtype) if self._low_precision else Q

    #: True only while ``construct`` or :meth:`compute_weight` runs eagerly (PYNATIVE_MODE, outside any
    #: ``mindspore.jit``), where ``_matrix_exp`` may read a tensor on the host. A graph reads the class's
    #: False as a constant: in GRAPH_MODE and under ``mindspore.jit`` (whose AST parser never runs
    #: ``__call__``) the squarings stay a fixed sequence.
    _eager = False

    def __call__(self, *args, **kwargs):
        if not _runs_eagerly():
            return super().__call__(*args, **kwargs)
        object.__setattr__(self, "_eager", True)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            object.__delattr__(self, "_eager")

    def compute_weight(self) -> Tensor:
        if not _runs_eagerly():
            return super().compute_weight()
        object.__setattr__(self, "_eager", True)
        try:
            return super().compute_weight()
        finally:
            object.__delattr__(self, "_eager")

    def extend_repr(self) -> str:
        return (f"layer={type(self._xnorm_layer).__name__}, name={self.wrapped_name!r}, "
                f"orthogonal_map={self.orthogonal_map!r}, use_trivialization={self.use_trivialization}")


# -- registration ------------------------------------------------------------------------------------
def _positive_qr(A: Tensor) -> Tensor:
    """The Q of ``A = QR`` (A square or tall) with ``diag(R) >= 0`` (a zero on the diagonal zeroes its column)."""
    Q, R = ops.qr(A)
    diagonal = ops.reduce_sum(R * Tensor(np.eye(*R.shape[-2:]).astype(_host(A.dtype))), -2)
    return Q * ops.expand_dims(ops.sign(diagonal), -2)


def _host(dtype):
    return np.float64 if dtype == mindspore.float64 else np.float32


def _is_orthogonal(Q: Tensor) -> bool:
    n, k = Q.shape[-2:]
    gram = ops.matmul(_mT(Q), Q).asnumpy()
    eps = np.finfo(_host(Q.dtype)).eps
    return bool(np.allclose(gram, np.eye(k), rtol=1e-5, atol=10.0 * n * eps))


def _reflectors(Q: Tensor) -> Tensor:
    """``original`` of householder without trivialization: the weight's ``geqrf`` reflectors with the
    diagonal set to the sign of R's (flipped where LAPACK used no reflection, ``tau == 0``)."""
    A, tau = ops.Geqrf()(Q)
    A, tau = A.asnumpy().copy(), tau.asnumpy()
    k = A.shape[-1]
    index = np.arange(k)
    diagonal = np.sign(A[..., index, index])
    diagonal = np.where(tau == 0.0, -diagonal, diagonal)
    A[..., index, index] = diagonal
    return Tensor(A)


def wrap_orthogonal(layer: nn.Cell, kind: str, name: str, spec: Orthogonal, layout: StorageLayout) -> OrthogonalCell:
    """The :class:`OrthogonalCell` of ``layer``'s parameter ``name`` (already checked: it exists and is
    floating), registered as the module docstring says; ``layout`` maps its storage onto the canonical layout.

    Raises:
        DimError: the parameter has fewer than 2 canonical axes; nothing has changed.
    """
    param = layer._params[name]
    storage_shape = tuple(param.shape)
    canonical_shape = layout.canonical_shape(storage_shape)
    spec.resolved_map(canonical_shape)  # raises DimError before anything changes
    weight = param.value().copy()
    compute = _compute_dtype(weight.dtype)
    Q = ops.reshape(ops.cast(weight, compute), canonical_shape)
    rows, cols = canonical_shape[-2:]
    transposed = rows < cols
    if transposed:
        Q = _mT(Q)
    n, k = max(rows, cols), min(rows, cols)
    base = None
    if not spec.use_trivialization:
        if spec.resolved_map(canonical_shape) != "householder":
            original = weight
        else:
            reflectors = _reflectors(Q)
            if transposed:
                reflectors = _mT(reflectors)
            original = ops.cast(ops.reshape(reflectors, storage_shape), weight.dtype)
    else:
        if n == k:
            base = Q if _is_orthogonal(Q) else _positive_qr(Q)
        else:
            host = _host(compute)
            completion = np.random.standard_normal(tuple(canonical_shape[:-2]) + (n, n - k)).astype(host)
            base = _positive_qr(ops.concat((Q, Tensor(completion)), -1))
        base = ops.cast(base, weight.dtype)
        minus_eye = np.zeros(canonical_shape, dtype=_host(compute))
        index = np.arange(k)
        minus_eye[..., index, index] = -1.0
        original = ops.cast(Tensor(minus_eye.reshape(storage_shape)), weight.dtype)
    return OrthogonalCell(layer, kind, name, spec, original, base, canonical_shape)
