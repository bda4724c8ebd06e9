"""The protocol a backend implements to run the conformance suite.

An adapter speaks NumPy in the **canonical (torch) layout** on one side and its framework on the
other. The suite never touches a framework object: it hands the adapter arrays, gets arrays back and
compares them with :mod:`xnorm.reference` and :mod:`xnorm.conformance.layers`.

Layout rules for every array crossing the protocol:

* weights: canonical layout (Linear ``(out, in)``, ConvNd ``(out, in/groups, *k)``, ConvTransposeNd
  ``(in, out/groups, *k)``, Embedding ``(num, features)``);
* a reparametrization's tensors and state are keyed by the spec's neutral names (``spec.tensors``,
  ``spec.state``): weight norm's ``g`` (the weight's shape with every axis but ``dim`` of size 1, or
  0-d for ``dim=None``/``-1``) and ``v`` (canonical layout); spectral norm's ``original`` (W, canonical
  layout) and state ``u`` (h) and ``v`` (w) of its matrix view;
* inputs and outputs: ``(N, C, *spatial)`` for convolutions, ``(N, features)`` for Linear, integer
  indices of any shape for Embedding (output ``(*indices.shape, features)``);
* bfloat16 values travel as float32 arrays holding exactly representable values.

A *layer handle* is whatever the adapter wants (a module, a ``(module, variables)`` pair...); the
suite only passes it back. Methods may return a new handle (functional frameworks) or the same one.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from xnorm.spec import Reparametrization

from .cases import LayerCase
from .fine_tuning import FineTuningRun

__all__ = ["Adapter"]


class Adapter(abc.ABC):
    """One way of running a backend (a framework, plus a mode such as GRAPH_MODE)."""

    #: Name used in case ids, result folders and expected-failure files: "torch", "mindspore-graph".
    name: str = ""
    #: The :mod:`xnorm.registry` backend it exercises.
    backend: str = ""
    #: dtypes this adapter can run (names from xnorm.spec.FLOATING_DTYPES).
    dtypes: Sequence[str] = ("float32", "float64")
    #: Why a dtype of the catalogue is not in ``dtypes`` (shown in the report next to its not-run cases).
    dtype_reasons: Dict[str, str] = {}
    #: reparametrization kinds (``spec.kind``) this adapter runs; the catalogue's others are reported not run.
    reparametrizations: Sequence[str] = ("weight_norm",)
    #: Why a reparametrization of the catalogue is not in ``reparametrizations``.
    reparametrization_reasons: Dict[str, str] = {}
    #: devices the suite may ask for; ``supports_device`` says which are present on this machine.
    devices: Sequence[str] = ("cpu",)

    def versions(self) -> Dict[str, str]:
        """Framework versions, recorded in the saved results."""
        return {}

    @abc.abstractmethod
    def supports_device(self, device: str) -> bool:
        """True when ``device`` ("cpu", "gpu", "ascend") is present and usable in this process."""

    def setup(self, device: str) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called once before the cases of ``device`` run (select the device, set graph mode...)."""

    def seed(self, seed: int) -> None:
        """Called before each case with a number derived from the case's id: seed every random generator
        the backend may draw from while wrapping (spectral norm's u and v, the columns completing a
        non-square orthogonal weight), so that a case computes the same whichever cases ran before it
        and in whichever process. By default NumPy's global generator."""
        np.random.seed(seed)

    # -- life cycle -------------------------------------------------------------------------------
    @abc.abstractmethod
    def build(self, layer: LayerCase, weight: np.ndarray, bias: Optional[np.ndarray], dtype: str) -> Any:
        """A plain (unwrapped) layer of ``layer.kind`` holding ``weight`` and ``bias`` (canonical layout)."""

    @abc.abstractmethod
    def wrap(self, handle: Any, spec: Reparametrization) -> Any:
        """``xnorm.wrap(layer, spec)`` on the plain layer, in training mode; returns the wrapped handle."""

    @abc.abstractmethod
    def remove(self, handle: Any) -> Any:
        """``xnorm.remove`` on a wrapped layer in training mode; returns the plain handle."""

    # -- observation ------------------------------------------------------------------------------
    @abc.abstractmethod
    def parameters(self, handle: Any) -> Dict[str, np.ndarray]:
        """Trainable values, canonical layout: the spec's tensors and ``"bias"`` (``{"g", "v"[, "bias"]}``
        for weight norm) when wrapped, ``{"weight"[, "bias"]}`` when plain."""

    def state(self, handle: Any) -> Dict[str, np.ndarray]:
        """The reparametrization's non-trainable state (``{"u", "v"}`` for spectral norm); ``{}`` when it has none."""
        return {}

    def set_state(self, handle: Any, state: Dict[str, np.ndarray]) -> Any:
        """Overwrite the state with ``state`` (the suite sets every backend to the same values after the
        init check); returns the handle. Needed by adapters of reparametrizations with state."""
        raise NotImplementedError(f"{type(self).__name__} cannot set a reparametrization's state")

    @abc.abstractmethod
    def parameter_names(self, handle: Any) -> List[str]:
        """The framework's own names of the trainable parameters (to check ``remove`` left a plain layer)."""

    @abc.abstractmethod
    def weight(self, handle: Any) -> np.ndarray:
        """The weight an eval-mode use computes (``w`` when wrapped), canonical layout; the state must not change."""

    @abc.abstractmethod
    def forward(self, handle: Any, x: np.ndarray, *, training: bool = True) -> np.ndarray:
        """The layer's output. ``training=False`` runs inference the framework's way (eval mode, no
        gradient tape); ``training=True`` runs it as inside a training step."""

    @abc.abstractmethod
    def gradients(self, handle: Any, x: np.ndarray, grad_output: np.ndarray) -> Dict[str, np.ndarray]:
        """Gradients of ``sum(forward(x) * grad_output)``, a training-mode call, w.r.t. the spec's tensors
        and ``"bias"``, canonical layout."""

    @abc.abstractmethod
    def sgd_step(self, handle: Any, x: np.ndarray, target: np.ndarray, lr: float) -> Any:
        """One step of the framework's own SGD optimizer (no momentum, no weight decay) on
        ``loss = 0.5 * mean((forward(x) - target) ** 2)``; returns the updated handle. The optimizer
        may be created on the first call for a handle and kept with it."""

    @abc.abstractmethod
    def state_roundtrip(self, handle: Any, fresh: Any) -> Any:
        """Save ``handle``'s state the framework's usual way (state_dict, checkpoint, serialized
        variables), load it into ``fresh`` (a wrapped layer of the same case with other values) and
        return the loaded handle."""

    # -- the fine-tuning case (xnorm.freeze) ------------------------------------------------------------
    #: The BatchNorm convention (a key of :data:`xnorm.batchnorm.CONVENTIONS`) the fine-tuning reference
    #: uses for this adapter; None: ``backend``'s.
    batchnorm_convention: Optional[str] = None

    def fine_tune(self, run: FineTuningRun) -> List[Dict[str, np.ndarray]]:
        """Run the fine-tuning script of :mod:`xnorm.conformance.fine_tuning` (its docstring has the model
        and the steps) on ``run``'s data and return its ``FROZEN_STEPS + 2`` records: each a dict of every
        key of ``RECORD_KEYS``, canonical layout (NCHW outputs). Needed by adapters that list ``"freeze"``
        in :attr:`reparametrizations`."""
        raise NotImplementedError(f"{type(self).__name__} does not run the fine-tuning case")
