"""What the runner expects of each reparametrization, from :mod:`xnorm.reference` and friends.

The runner's life cycle (:mod:`xnorm.conformance.runner`) is the same for every reparametrization; an
*oracle* answers its questions in float64 for one spec: the tensors right after wrapping, the weight
for given tensors and state, what a training-mode call does to the state, and the gradient of the
tensors for a given ``dL/dw``. Adding a reparametrization to the suite is one oracle here, cases in
:mod:`xnorm.conformance.cases`, and nothing in the runner.

Every array is in the canonical layout; ``tensors`` and ``state`` are dicts keyed by the spec's
neutral names (``spec.tensors``, ``spec.state``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from xnorm import reference, reference_orthogonal, reference_spectral
from xnorm.reference import round_to_dtype
from xnorm.spec import Orthogonal, Reparametrization, SpectralNorm, WeightNorm, compute_dtype

from .cases import Case

__all__ = ["Oracle", "WeightNormOracle", "SpectralNormOracle", "OrthogonalOracle", "oracle_for"]

Arrays = Dict[str, np.ndarray]
#: (actual, expected, what) triples a check folds in
Comparisons = List[Tuple[np.ndarray, np.ndarray, str]]


class Oracle:
    """The float64 answers for one case's spec; subclasses implement one reparametrization."""

    #: checks of :data:`xnorm.conformance.runner.CHECK_QUANTITY` this reparametrization has
    checks: Tuple[str, ...] = ()

    def __init__(self, case: Case) -> None:
        self.case = case
        self.spec: Reparametrization = case.spec
        self.layer = case.layer
        self.dim = self.spec.resolved_dim(len(case.layer.weight_shape), case.layer.kind)

    def init_comparisons(self, weight: np.ndarray, tensors: Arrays, state: Arrays) -> Comparisons:
        """What the backend's tensors and state right after wrapping ``weight`` must equal."""
        raise NotImplementedError

    def start_state(self, data: Arrays, tensors: Arrays) -> Optional[Arrays]:
        """State every backend is set to after the init check (so all continue from the same values), or
        None when the spec has no state."""
        return None

    def weight(self, tensors: Arrays, state: Arrays) -> np.ndarray:
        """The weight an eval-mode use computes (no state change)."""
        raise NotImplementedError

    def training_call(self, tensors: Arrays, state: Arrays) -> Tuple[np.ndarray, Arrays]:
        """One training-mode use: ``(weight, state after it)``."""
        return self.weight(tensors, state), state

    def gradients(self, tensors: Arrays, state: Arrays, grad_w: np.ndarray) -> Arrays:
        """``dL/d tensor`` for each tensor, given ``dL/dw`` and the state the forward used."""
        raise NotImplementedError

    def round_state(self, state: Arrays) -> Arrays:
        """The state as a backend storing it in the case's compute dtype holds it."""
        work = compute_dtype(self.case.dtype)
        return {k: round_to_dtype(v, work).astype(np.float64) for k, v in state.items()}


class WeightNormOracle(Oracle):
    checks = ("plain_forward", "init", "weight", "preserves", "forward", "gradient", "eval", "training", "state",
              "remove")

    def init_comparisons(self, weight, tensors, state):
        g_ref, v_ref = reference.init(weight, self.spec.dim)
        return [(tensors["g"], g_ref, "g after wrap"), (tensors["v"], v_ref, "v after wrap")]

    def weight(self, tensors, state):
        return reference.weight_norm(tensors["g"], tensors["v"], self.spec.dim)

    def gradients(self, tensors, state, grad_w):
        grad_g, grad_v = reference.weight_norm_grads(tensors["g"], tensors["v"], grad_w, self.spec.dim)
        return {"g": grad_g, "v": grad_v}


class SpectralNormOracle(Oracle):
    checks = ("plain_forward", "init", "weight", "forward", "gradient", "eval", "training", "state", "remove")
    spec: SpectralNorm

    def init_comparisons(self, weight, tensors, state):
        """W unchanged; u and v unit vectors, and v the last half-iteration's ``normalize(M^T u)`` (the
        initial draws are the framework's, so only the structure of the result can be checked)."""
        out = [(tensors["original"], weight, "W (original) after wrap")]
        if np.ndim(weight) > 1:
            u, v = state.get("u"), state.get("v")
            for key, vector in (("u", u), ("v", v)):
                # an implementation that stores no such vector fails here (Flax keeps no v)
                out.append((None if vector is None else np.linalg.norm(vector), np.float64(1.0),
                            f"||{key}|| after wrap"))
            if u is not None and v is not None:
                matrix = reference_spectral.matrix_view(tensors["original"], self.dim)
                out.append((v, reference_spectral.normalize(matrix.T @ np.asarray(u, np.float64), self.spec.eps),
                            "v == normalize(M^T u) after wrap"))
        return out

    def start_state(self, data, tensors):
        """The case's own state: its normalized draws after a single iteration. Far from converged, so one
        iteration more or less (or in the wrong mode) changes every later value; yet ``sigma = ||M^T u||``
        is well away from 0, where the division would amplify rounding (random unit vectors can give any
        sigma, 0 included)."""
        if np.ndim(tensors["original"]) == 1:
            return {}
        eps = self.spec.eps
        u, v = reference_spectral.power_iteration(
            tensors["original"],
            reference_spectral.normalize(data["u0"], eps),
            reference_spectral.normalize(data["v0"], eps),
            self.dim,
            1,
            eps,
        )
        return self.round_state({"u": u, "v": v})

    def weight(self, tensors, state):
        return reference_spectral.spectral_norm(
            tensors["original"], state.get("u"), state.get("v"), self.dim, self.spec.eps
        )

    def training_call(self, tensors, state):
        if not state:
            return self.weight(tensors, state), state
        u, v = reference_spectral.power_iteration(
            tensors["original"], state["u"], state["v"], self.dim, self.spec.n_power_iterations, self.spec.eps
        )
        state = {"u": u, "v": v}
        return self.weight(tensors, state), state

    def gradients(self, tensors, state, grad_w):
        grad = reference_spectral.spectral_norm_grad(
            tensors["original"], state.get("u"), state.get("v"), grad_w, self.dim, self.spec.eps
        )
        return {"original": grad}


class OrthogonalOracle(Oracle):
    """The orthogonal parametrization (:mod:`xnorm.reference_orthogonal`). Its state, ``base``, never
    changes after registration (training-mode and eval-mode uses are the same); registration draws the
    completion of a non-square weight from the framework's RNG, so only what follows from the weight is
    checked at init, and every backend then continues from the case's own base."""

    checks = ("plain_forward", "init", "weight", "forward", "gradient", "eval", "training", "state", "remove")
    spec: Orthogonal

    def __init__(self, case: Case) -> None:
        super().__init__(case)
        self.map = self.spec.resolved_map(case.layer.weight_shape)

    def _tall(self, matrix: np.ndarray) -> np.ndarray:
        return matrix if matrix.shape[-2] >= matrix.shape[-1] else np.swapaxes(matrix, -1, -2)

    def init_comparisons(self, weight, tensors, state):
        """Trivialized: ``original`` is ``-I``; ``base`` is orthogonal and its first k columns are the Q of
        the weight's QR (the random completion only fills the others). Otherwise ``original`` is what
        registration computes from the weight alone."""
        if not self.spec.use_trivialization:
            original, _ = reference_orthogonal.register(weight, self.map, use_trivialization=False)
            return [(tensors["original"], original, "original after wrap")]
        tall = self._tall(np.asarray(weight, np.float64))
        n, k = tall.shape[-2:]
        completion = np.zeros(tall.shape[:-2] + (n, n - k))
        original, expected_base = reference_orthogonal.register(weight, self.map, completion=completion)
        out = [(tensors["original"], original, "original after wrap (-I)")]
        base = state.get("base")
        if base is None:
            return out + [(None, expected_base, "base after wrap")]
        base = np.asarray(base, np.float64)
        out.append((np.swapaxes(base, -1, -2) @ base, np.broadcast_to(np.eye(n), base.shape), "base^T base == I"))
        out.append((base[..., :k], expected_base[..., :k], "base's first columns == Q of the weight's QR"))
        return out

    def start_state(self, data, tensors):
        if not self.spec.use_trivialization:
            return None
        _, base = reference_orthogonal.register(data["weight"], self.map, completion=data["completion"])
        return self.round_state({"base": base})

    def weight(self, tensors, state):
        return reference_orthogonal.forward(tensors["original"], self.map, state.get("base"))

    def gradients(self, tensors, state, grad_w):
        grad = reference_orthogonal.gradient(tensors["original"], grad_w, self.map, state.get("base"))
        return {"original": grad}


_ORACLES = {WeightNorm: WeightNormOracle, SpectralNorm: SpectralNormOracle, Orthogonal: OrthogonalOracle}


def oracle_for(case: Case) -> Oracle:
    """The oracle of ``case``'s reparametrization."""
    return _ORACLES[type(case.spec)](case)
