"""Spectral normalization for the torch backend: ``xnorm.spectral_norm(module)``.

:class:`SpectralNormParametrization` is registered with ``torch.nn.utils.parametrize`` exactly where
torch's own ``parametrizations.spectral_norm`` puts its ``_SpectralNorm``, computes what it computes
op for op, and draws its initial vectors from torch's RNG in the same order, so with the same RNG
state the buffers, outputs, gradients and the state after any number of training steps are
bit-equal to torch's (float32 and float64 weights):

* ``module.parametrizations.<name>.original`` is W; ``...<name>[0]._u`` (h) and ``._v`` (w) are the
  power-iteration vectors (buffers, so ``state_dict`` keys are torch's);
* registration draws u, v, normalizes them and runs 15 iterations; torch's registration then
  evaluates the parametrization once (``unsafe=False``), which in training mode runs
  ``n_power_iterations`` more, and xnorm registers the same way;
* every training-mode use of ``module.weight`` iterates first; eval mode does not.

float16/bfloat16 weights keep u and v in float32 and compute the iteration, sigma and W/sigma in
float32, casting w back once (torch's own iterates in the weight's dtype). A checkpoint saved with
torch's legacy ``torch.nn.utils.spectral_norm`` (``weight_orig``, ``weight_u``, ``weight_v``) loads
through a ``load_state_dict`` pre-hook; docs/torch.md says what its other iteration order means for
continued training.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from xnorm.spec import SPECTRAL_INIT_ITERATIONS, SpectralNorm

__all__ = ["SpectralNormParametrization", "legacy_spectral_keys_hook"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class SpectralNormParametrization(nn.Module):
    """``w = W / (u . (M v))`` with M the matrix view of W (``dim`` first, the rest flattened).

    ``dim`` is resolved (``0 <= dim < W.ndim``). A 1-D weight is ``F.normalize(W, eps)`` and has no
    buffers. ``legacy_hook_id`` is the id of the ``load_state_dict`` pre-hook that reads legacy keys.
    """

    def __init__(self, weight: torch.Tensor, spec: SpectralNorm, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.eps = spec.eps
        self.n_power_iterations = spec.n_power_iterations
        self.legacy_hook_id = -1
        if weight.ndim > 1:
            matrix = self._matrix(weight)
            h, w = matrix.shape
            # The same draws in the same order as torch's _SpectralNorm: u first, then v.
            u = matrix.new_empty(h).normal_(0, 1)
            v = matrix.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            self._power_method(matrix, SPECTRAL_INIT_ITERATIONS)

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dtype in _LOW_PRECISION:
            weight = weight.float()
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.ndim) if d != self.dim))
        return weight.flatten(1)

    @torch.no_grad()
    def _power_method(self, matrix: torch.Tensor, iterations: int) -> None:
        # In place (out=), as torch does, so DataParallel replicas write back into the original buffers.
        for _ in range(iterations):
            self._u = F.normalize(torch.mv(matrix, self._v), dim=0, eps=self.eps, out=self._u)
            self._v = F.normalize(torch.mv(matrix.H, self._u), dim=0, eps=self.eps, out=self._v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            work = weight.float() if weight.dtype in _LOW_PRECISION else weight
            return F.normalize(work, dim=0, eps=self.eps).to(weight.dtype)
        matrix = self._matrix(weight)
        if self.training:
            self._power_method(matrix, self.n_power_iterations)
        # Clones, so that two forwards before one backward (a GAN discriminator on real and fake) work.
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = torch.vdot(u, torch.mv(matrix, v))
        if weight.dtype in _LOW_PRECISION:
            return (weight.float() / sigma).to(weight.dtype)
        return weight / sigma

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}"


def legacy_spectral_keys_hook(name: str, parametrization: Optional[SpectralNormParametrization] = None):
    """A ``load_state_dict`` pre-hook reading torch's legacy ``<name>_orig``/``_u``/``_v`` keys."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        legacy = {suffix: f"{prefix}{name}{suffix}" for suffix in ("_orig", "_u", "_v")}
        if legacy["_orig"] not in state_dict:
            return
        state_dict[f"{prefix}parametrizations.{name}.original"] = state_dict.pop(legacy["_orig"])
        for suffix in ("_u", "_v"):
            if legacy[suffix] in state_dict:
                state_dict[f"{prefix}parametrizations.{name}.0.{suffix}"] = state_dict.pop(legacy[suffix])
        # The legacy module also keeps the computed weight as a plain attribute; some checkpoints hold it.
        state_dict.pop(f"{prefix}{name}", None)

    return hook
