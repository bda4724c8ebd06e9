"""The orthogonal parametrization for the torch backend: ``xnorm.orthogonal(module)``.

:class:`OrthogonalParametrization` is registered with ``torch.nn.utils.parametrize`` where torch's own
``parametrizations.orthogonal`` puts its parametrization, computes what it computes op for op (the same
torch operations in the same order: ``matrix_exp``, ``linalg.solve`` for cayley,
``linalg.householder_product``) and draws the completion of a non-square weight from torch's RNG as
torch does, so with the same RNG state ``original``, ``base``, the weight and its gradients are bit-equal
to torch's. Keys: ``parametrizations.<name>.original`` and ``parametrizations.<name>.0.base``.
The rules: :class:`xnorm.spec.Orthogonal` and :mod:`xnorm.reference_orthogonal`. Real weights only.
"""

from __future__ import annotations

import torch
from torch import nn

from xnorm.spec import Orthogonal

__all__ = ["OrthogonalParametrization"]


def _is_orthogonal(Q: torch.Tensor) -> bool:
    n, k = Q.size(-2), Q.size(-1)
    eye = torch.eye(k, dtype=Q.dtype, device=Q.device)
    return torch.allclose(Q.mT @ Q, eye, atol=10.0 * n * torch.finfo(Q.dtype).eps)


def _make_orthogonal(A: torch.Tensor) -> torch.Tensor:
    """The Q of ``A = QR`` (A tall) with ``diag(R) >= 0``."""
    X, tau = torch.geqrf(A)
    Q = torch.linalg.householder_product(X, tau)
    return Q * X.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)


class OrthogonalParametrization(nn.Module):
    """``weight = [base @] map(original)`` over the last two axes (a wide matrix transposed first).

    ``legacy_hook_id`` is -1: there is no legacy key style to read for this parametrization.
    """

    def __init__(self, weight: torch.Tensor, spec: Orthogonal) -> None:
        super().__init__()
        self.shape = weight.shape
        self.orthogonal_map = spec.resolved_map(tuple(weight.shape))
        self.use_trivialization = spec.use_trivialization
        self.legacy_hook_id = -1
        if spec.use_trivialization:
            self.register_buffer("base", None)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        n, k = X.size(-2), X.size(-1)
        transposed = n < k
        if transposed:
            X = X.mT
            n, k = k, n
        if self.orthogonal_map == "householder":
            A = X.tril(diagonal=-1)
            tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
            Q = torch.linalg.householder_product(A, tau)
            # the diagonal holds each column's sign, read as an integer and never differentiated
            Q = Q * X.diagonal(dim1=-2, dim2=-1).int().unsqueeze(-2)
        else:
            X = X.tril()
            if n != k:
                X = torch.cat([X, X.new_zeros(n, n - k).expand(*X.shape[:-2], -1, -1)], dim=-1)
            A = X - X.mH
            if self.orthogonal_map == "matrix_exp":
                Q = torch.matrix_exp(A)
            else:
                eye = torch.eye(n, dtype=A.dtype, device=A.device)
                Q = torch.linalg.solve(torch.add(eye, A, alpha=-0.5), torch.add(eye, A, alpha=0.5))
            if n != k:
                Q = Q[..., :k]
        if self.use_trivialization:
            # a copy, as spectral norm's u and v: torch 2.4's DDP (broadcast_buffers=True) overwrites base in
            # place before each forward, which broke the backward of two forwards (a GAN discriminator)
            Q = self.base.clone() @ Q
        return Q.mT if transposed else Q

    @torch.autograd.no_grad()
    def right_inverse(self, Q: torch.Tensor) -> torch.Tensor:
        if Q.shape != self.shape:
            raise ValueError(f"expected a matrix or a batch of matrices of shape {tuple(self.shape)}, got "
                             f"{tuple(Q.shape)}")
        Q_init = Q
        n, k = Q.size(-2), Q.size(-1)
        transposed = n < k
        if transposed:
            Q = Q.mT
            n, k = k, n
        if not self.use_trivialization:
            if self.orthogonal_map != "householder":
                raise NotImplementedError(
                    f"a weight cannot be assigned to the {self.orthogonal_map} orthogonal parametrization without "
                    "trivialization (its inverse is not implemented): wrap with use_trivialization=True, or assign "
                    "to the parametrization's original."
                )
            A, tau = torch.geqrf(Q)
            # diag(R) > 0 (LAPACK gives tau == 0 where it uses no reflection)
            A.diagonal(dim1=-2, dim2=-1).sign_()
            A.diagonal(dim1=-2, dim2=-1)[tau == 0.0] *= -1
            return A.mT if transposed else A
        if n == k:
            Q = Q.clone() if _is_orthogonal(Q) else _make_orthogonal(Q)
        else:
            # complete to n x n with columns drawn as torch draws them
            N = torch.randn(*(Q.size()[:-2] + (n, n - k)), dtype=Q.dtype, device=Q.device)
            Q = _make_orthogonal(torch.cat([Q, N], dim=-1))
        self.base = Q
        minus_eye = torch.zeros_like(Q_init)
        minus_eye.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
        return minus_eye
