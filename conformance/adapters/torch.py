"""Conformance adapter for the torch backend (eager mode; CPU, and CUDA where present)."""

from __future__ import annotations

import io
import weakref
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import xnorm
from xnorm._backends.torch import SpectralNormParametrization
from xnorm._backends.torch.orthogonal import OrthogonalParametrization
from xnorm.spec import LayerKind, Reparametrization

from .. import fine_tuning
from ..adapter import Adapter
from ..cases import LayerCase

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICES = {"cpu": "cpu", "gpu": "cuda"}


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy().astype(np.float64)


def build_torch_layer(layer: LayerCase) -> nn.Module:
    """The torch module a catalogue layer describes (random values; the adapter overwrites them)."""
    if layer.kind == LayerKind.LINEAR:
        return nn.Linear(layer.weight_shape[1], layer.weight_shape[0], bias=layer.bias)
    if layer.kind == LayerKind.EMBEDDING:
        return nn.Embedding(*layer.weight_shape)
    n = layer.spatial
    common = dict(
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=layer.bias
    )
    if layer.kind in LayerKind.CONV:
        conv = getattr(nn, f"Conv{n}d")
        return conv(layer.in_channels, layer.out_channels, layer.kernel_size, **common)
    conv_transpose = getattr(nn, f"ConvTranspose{n}d")
    return conv_transpose(
        layer.in_channels, layer.out_channels, layer.kernel_size, output_padding=layer.output_padding, **common
    )


class TorchAdapter(Adapter):
    name = "torch"
    backend = "torch"
    dtypes = ("float32", "float64", "bfloat16")
    dtype_reasons = {
        "float16": "torch's own float16 CPU kernels (convolutions, their gradients) already miss the tolerance "
        "table's float16 row for the plain layer; that row needs measuring first (docs/torch.md)"
    }
    devices = ("cpu", "gpu")
    reparametrizations = ("weight_norm", "spectral_norm", "orthogonal", "freeze")

    def __init__(self) -> None:
        self._device = "cpu"
        self._dtype: Dict[int, torch.dtype] = {}
        self._optimizers: weakref.WeakKeyDictionary[nn.Module, torch.optim.Optimizer] = weakref.WeakKeyDictionary()

    def versions(self) -> Dict[str, str]:
        return {"torch": torch.__version__}

    def supports_device(self, device: str) -> bool:
        return device == "cpu" or (device == "gpu" and torch.cuda.is_available())

    def setup(self, device: str) -> None:
        self._device = _DEVICES[device]

    def seed(self, seed: int) -> None:
        """torch's generator too: spectral norm's u and v and the orthogonal completion are drawn by torch."""
        super().seed(seed)
        torch.manual_seed(seed)

    def _tensor(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self._device, dtype)

    def build(self, layer: LayerCase, weight: np.ndarray, bias: Optional[np.ndarray], dtype: str) -> nn.Module:
        module = build_torch_layer(layer).to(self._device, _DTYPES[dtype])
        with torch.no_grad():
            module.weight.copy_(self._tensor(weight, _DTYPES[dtype]))
            if bias is not None:
                module.bias.copy_(self._tensor(bias, _DTYPES[dtype]))
        return module

    def wrap(self, handle: nn.Module, spec: Reparametrization) -> nn.Module:
        return xnorm.wrap(handle, spec)

    def remove(self, handle: nn.Module) -> nn.Module:
        return xnorm.remove(handle)

    def _is_wrapped(self, handle: nn.Module) -> bool:
        return xnorm.is_wrapped(handle)

    def parameters(self, handle: nn.Module) -> Dict[str, np.ndarray]:
        if self._is_wrapped(handle):
            out = {key: _to_numpy(t) for key, t in self._wrapped_tensors(handle).items()}
        else:
            out = {"weight": _to_numpy(handle.weight)}
            if getattr(handle, "bias", None) is not None:
                out["bias"] = _to_numpy(handle.bias)
        return out

    def _spectral(self, handle: nn.Module) -> Optional[SpectralNormParametrization]:
        found = handle.parametrizations.weight[0]
        return found if isinstance(found, SpectralNormParametrization) else None

    def _orthogonal(self, handle: nn.Module):
        found = handle.parametrizations.weight[0]
        return found if isinstance(found, OrthogonalParametrization) else None

    def state(self, handle: nn.Module) -> Dict[str, np.ndarray]:
        orthogonal = self._orthogonal(handle)
        if orthogonal is not None:
            return {"base": _to_numpy(orthogonal.base)} if getattr(orthogonal, "base", None) is not None else {}
        spectral = self._spectral(handle)
        if spectral is None or not hasattr(spectral, "_u"):
            return {}
        return {"u": _to_numpy(spectral._u), "v": _to_numpy(spectral._v)}

    def set_state(self, handle: nn.Module, state: Dict[str, np.ndarray]) -> nn.Module:
        owner = self._orthogonal(handle)
        prefix = ""
        if owner is None:
            owner, prefix = self._spectral(handle), "_"
        with torch.no_grad():
            for key, value in state.items():
                buffer = getattr(owner, f"{prefix}{key}")
                buffer.copy_(self._tensor(value, buffer.dtype))
        return handle

    def parameter_names(self, handle: nn.Module) -> List[str]:
        return [name for name, _ in handle.named_parameters()]

    def weight(self, handle: nn.Module) -> np.ndarray:
        # eval mode: a training-mode access to a spectral-normed weight would iterate
        handle.eval()
        try:
            with torch.no_grad():
                return _to_numpy(handle.weight)
        finally:
            handle.train()

    def _input(self, handle: nn.Module, x: np.ndarray) -> torch.Tensor:
        if isinstance(handle, nn.Embedding):
            return torch.from_numpy(x).to(self._device)
        return self._tensor(x, next(handle.parameters()).dtype)

    def forward(self, handle: nn.Module, x: np.ndarray, *, training: bool = True) -> np.ndarray:
        if training:
            handle.train()
            return _to_numpy(handle(self._input(handle, x)))
        handle.eval()
        try:
            with torch.inference_mode():
                return _to_numpy(handle(self._input(handle, x)))
        finally:
            handle.train()

    def _wrapped_tensors(self, handle: nn.Module) -> Dict[str, torch.Tensor]:
        originals = handle.parametrizations.weight
        if self._spectral(handle) is not None or self._orthogonal(handle) is not None:
            tensors = {"original": originals.original}
        else:
            tensors = {"g": originals.original0, "v": originals.original1}
        if getattr(handle, "bias", None) is not None:
            tensors["bias"] = handle.bias
        return tensors

    def gradients(self, handle: nn.Module, x: np.ndarray, grad_output: np.ndarray) -> Dict[str, np.ndarray]:
        handle.zero_grad(set_to_none=True)
        y = handle(self._input(handle, x))
        y.backward(self._tensor(grad_output, y.dtype))
        grads = {key: _to_numpy(t.grad) for key, t in self._wrapped_tensors(handle).items()}
        handle.zero_grad(set_to_none=True)
        return grads

    def sgd_step(self, handle: nn.Module, x: np.ndarray, target: np.ndarray, lr: float) -> nn.Module:
        optimizer = self._optimizers.get(handle)
        if optimizer is None:
            optimizer = self._optimizers[handle] = torch.optim.SGD(handle.parameters(), lr=lr)
        optimizer.zero_grad(set_to_none=True)
        y = handle(self._input(handle, x))
        loss = 0.5 * ((y - self._tensor(target, y.dtype)) ** 2).mean()
        loss.backward()
        optimizer.step()
        return handle

    def state_roundtrip(self, handle: nn.Module, fresh: nn.Module) -> nn.Module:
        buffer = io.BytesIO()
        torch.save(handle.state_dict(), buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        return fresh

    def fine_tune(self, run: fine_tuning.FineTuningRun) -> List[Dict[str, np.ndarray]]:
        from .torch_fine_tuning import fine_tune  # it builds on this module

        return fine_tune(run, self._device)


class TorchFusedAdapter(TorchAdapter):
    """The torch adapter with ``xnorm.wrap(..., fused=True)``: same catalogue, same tolerances."""

    name = "torch-fused"
    reparametrizations = ("weight_norm",)
    reparametrization_reasons = {
        "spectral_norm": "fused=True is a weight-norm path; spectral norm has none",
        "orthogonal": "fused=True is a weight-norm path; the orthogonal parametrization has none",
        "freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER,
    }

    def wrap(self, handle: nn.Module, spec: Reparametrization) -> nn.Module:
        return xnorm.wrap(handle, spec, fused=True)


# ----------------------------------------------------------------------------------------------
# torch's own implementations, through the same suite: where they depart from the spec
# ----------------------------------------------------------------------------------------------
class TorchParametrizationsAdapter(TorchAdapter):
    """torch's own ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` (not xnorm).

    The report shows, case by case, where they depart from xnorm's spec (expected failures with the
    reasons in ``expected_failures/torch-parametrizations.toml``)."""

    name = "torch-parametrizations"
    reparametrizations = ("weight_norm", "spectral_norm", "orthogonal")
    reparametrization_reasons = {"freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER}

    def wrap(self, handle: nn.Module, spec: Reparametrization) -> nn.Module:
        if isinstance(spec, xnorm.SpectralNorm):
            return parametrizations.spectral_norm(handle, n_power_iterations=spec.n_power_iterations,
                                                  eps=spec.eps, dim=spec.dim)
        if isinstance(spec, xnorm.Orthogonal):
            return parametrizations.orthogonal(handle, orthogonal_map=spec.orthogonal_map,
                                               use_trivialization=spec.use_trivialization)
        if spec.eps is not None:
            raise NotImplementedError("torch's weight_norm has no eps")
        return parametrizations.weight_norm(handle, dim=spec.dim)

    def remove(self, handle: nn.Module) -> nn.Module:
        return parametrize.remove_parametrizations(handle, "weight")

    def _is_wrapped(self, handle: nn.Module) -> bool:
        return parametrize.is_parametrized(handle, "weight")

    def _spectral(self, handle: nn.Module):
        found = handle.parametrizations.weight[0]
        return found if type(found).__name__ == "_SpectralNorm" else None

    def _orthogonal(self, handle: nn.Module):
        found = handle.parametrizations.weight[0]
        return found if type(found).__name__ == "_Orthogonal" else None


class TorchLegacyAdapter(TorchAdapter):
    """torch's legacy hooks ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (not xnorm): tensors
    ``weight_g``/``weight_v``, ``weight_orig`` with buffers ``weight_u``/``weight_v``, and ``weight`` a plain
    attribute recomputed by a forward pre-hook. Departures: ``expected_failures/torch-legacy.toml``."""

    name = "torch-legacy"
    reparametrizations = ("weight_norm", "spectral_norm")
    reparametrization_reasons = {
        "orthogonal": "torch has no legacy (hook-based) orthogonal parametrization",
        "freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER,
    }

    def _orthogonal(self, handle: nn.Module):
        return None

    def wrap(self, handle: nn.Module, spec: Reparametrization) -> nn.Module:
        if isinstance(spec, xnorm.SpectralNorm):
            return nn.utils.spectral_norm(handle, n_power_iterations=spec.n_power_iterations, eps=spec.eps,
                                          dim=spec.dim)
        if spec.eps is not None:
            raise NotImplementedError("torch's weight_norm has no eps")
        return nn.utils.weight_norm(handle, dim=spec.dim)

    def _hook(self, handle: nn.Module):
        return next((h for h in handle._forward_pre_hooks.values()
                     if type(h).__name__ in ("WeightNorm", "SpectralNorm")), None)

    def remove(self, handle: nn.Module) -> nn.Module:
        if type(self._hook(handle)).__name__ == "SpectralNorm":
            return nn.utils.remove_spectral_norm(handle)
        return nn.utils.remove_weight_norm(handle)

    def _is_wrapped(self, handle: nn.Module) -> bool:
        return self._hook(handle) is not None

    def _spectral(self, handle: nn.Module):
        hook = self._hook(handle)
        return hook if type(hook).__name__ == "SpectralNorm" else None

    def _wrapped_tensors(self, handle: nn.Module) -> Dict[str, torch.Tensor]:
        tensors = {"original": handle.weight_orig} if self._spectral(handle) else {"g": handle.weight_g,
                                                                                   "v": handle.weight_v}
        if getattr(handle, "bias", None) is not None:
            tensors["bias"] = handle.bias
        return tensors

    def state(self, handle: nn.Module) -> Dict[str, np.ndarray]:
        if self._spectral(handle) is None:
            return {}
        return {"u": _to_numpy(handle.weight_u), "v": _to_numpy(handle.weight_v)}

    def set_state(self, handle: nn.Module, state: Dict[str, np.ndarray]) -> nn.Module:
        with torch.no_grad():
            for key, value in state.items():
                buffer = getattr(handle, f"weight_{key}")
                buffer.copy_(self._tensor(value, buffer.dtype))
        return handle

    def weight(self, handle: nn.Module) -> np.ndarray:
        # ``handle.weight`` is whatever the last forward left; compute it as an eval-mode forward would
        hook = self._hook(handle)
        with torch.no_grad():
            if type(hook).__name__ == "SpectralNorm":
                return _to_numpy(hook.compute_weight(handle, do_power_iteration=False))
            return _to_numpy(hook.compute_weight(handle))
