"""The torch backend: every xnorm reparametrization as a ``torch.nn.utils.parametrize`` parametrization.

Weight norm is here; spectral norm is :mod:`xnorm._backends.torch.spectral` (same mechanism, torch's
own keys, bit-equal to ``torch.nn.utils.parametrizations.spectral_norm``).

``xnorm.wrap(module, dim=0)`` registers :class:`WeightNormParametrization` on ``module.<name>``, in
place, exactly where ``torch.nn.utils.parametrizations.weight_norm`` would put torch's own:

* ``module.parametrizations.<name>.original0`` is g (shape: the weight's, every axis but ``dim``
  reduced to 1; 0-d for ``dim=None``/``-1``), ``original1`` is v (the weight's shape);
* ``state_dict`` keys are torch's (``parametrizations.weight.original0/1``), and a checkpoint with
  the legacy ``weight_g``/``weight_v`` keys loads too;
* the weight is ``torch._weight_norm(v, g, dim)``, the kernel torch's own weight norm calls with the
  same ``dim``, so outputs and gradients are bit-equal to torch's.

torch's layout is xnorm's canonical layout, so ``dim`` needs no mapping: any module with a floating
parameter of its own works (Linear, ConvNd, ConvTransposeNd, Embedding, custom modules), except the
normalization layers (:data:`NORMALIZATION_LAYERS`), refused as in every backend (docs/spec.md, "Supported
layers and errors").

``xnorm.wrap(module, fused=True)`` registers the same parametrization (same state, same ``module.weight``)
and lets the module's forward apply ``s = g / ||v||`` to its activations instead of computing w, where
the algebra allows: see :mod:`xnorm._backends.torch.fused` and docs/torch.md.

``xnorm.remove`` calls ``parametrize.remove_parametrizations(..., leave_parametrized=True)``: the
module gets its original class back and a plain ``Parameter`` under ``<name>`` holding w, ready for
``torch.jit.script``.

``xnorm.freeze`` / ``unfreeze`` / ``is_frozen`` (normalization layers' running statistics) are
:mod:`xnorm._backends.torch.freeze`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from xnorm import registry
from xnorm.api import _not_wrapped
from xnorm.errors import (
    AlreadyWrappedError,
    MissingParameterError,
    OptionError,
    UnsupportedLayerError,
)
from xnorm.spec import (
    FUSED_AUTO,
    LayerKind,
    Orthogonal,
    Reparametrization,
    SpectralNorm,
    WeightNorm,
    check_floating,
    check_fused_option,
    check_fused_spec,
)

from . import freeze as _freeze
from .orthogonal import OrthogonalParametrization
from .spectral import SpectralNormParametrization, legacy_spectral_keys_hook

__all__ = ["TorchBackend", "WeightNormParametrization", "SpectralNormParametrization"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class WeightNormParametrization(nn.Module):
    """``w = v * (g / ||v||)`` with the norm over every axis except ``dim``.

    ``dim`` is an int as the user gave it (``-1`` for the whole tensor): torch picks its fused kernel
    for ``0`` and the last axis and the composite one otherwise, so keeping the user's value (rather
    than a normalized one) keeps results bit-equal to torch's weight norm called with the same value.
    With ``eps`` (not torch's), the norm is ``sqrt(sum(v**2) + eps)``, computed in float32 for
    float16/bfloat16 weights.
    """

    def __init__(self, dim: int, eps: Optional[float], legacy_hook_id: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.legacy_hook_id = legacy_hook_id

    def _norm_with_eps(self, weight: torch.Tensor) -> torch.Tensor:
        work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
        if self.dim == -1:
            return torch.sqrt((work * work).sum() + self.eps)
        axes = [axis for axis in range(weight.dim()) if axis != self.dim % weight.dim()]
        return torch.sqrt((work * work).sum(dim=axes, keepdim=True) + self.eps)

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        if self.eps is None:
            return torch._weight_norm(weight_v, weight_g, self.dim)
        norm = self._norm_with_eps(weight_v)
        work = norm.dtype
        return (weight_v.to(work) * (weight_g.to(work) / norm)).to(weight_v.dtype)

    def right_inverse(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.eps is None:
            weight_g = torch.norm_except_dim(weight, 2, self.dim)
        else:
            weight_g = self._norm_with_eps(weight).to(weight.dtype)
        return weight_g, weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


def _legacy_keys_hook(name: str):
    """A load_state_dict pre-hook renaming ``<name>_g``/``<name>_v`` to torch's parametrization keys."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        legacy_g, legacy_v = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if legacy_g in state_dict and legacy_v in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(legacy_g)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(legacy_v)

    return hook


def _xnorm_parametrizations(module: nn.Module) -> List[str]:
    """Names of the tensors of ``module`` (itself, not its children) that xnorm wrapped."""
    if not parametrize.is_parametrized(module):
        return []
    return [
        name
        for name, stack in module.parametrizations.items()
        if any(isinstance(p, _XNORM_PARAMETRIZATIONS) for p in stack)
    ]


def _register_load_state_dict_pre_hook(module: nn.Module, hook: Any) -> Any:
    """``module.register_load_state_dict_pre_hook(hook)``: public from torch 2.5; torch 2.4 has the same hook
    (same call, same handle) only under the private name the public method calls."""
    register = getattr(module, "register_load_state_dict_pre_hook", None)
    if register is not None:
        return register(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


_XNORM_PARAMETRIZATIONS = (WeightNormParametrization, SpectralNormParametrization, OrthogonalParametrization)


#: Refused by ``wrap`` whatever ``name=``: their weight is a per-channel scale, not a weight matrix, and
#: MindSpore and Flax refuse them too; a BatchNorm's statistics are ``xnorm.freeze``'s business.
NORMALIZATION_LAYERS: Tuple[type, ...] = tuple(
    getattr(nn, cls)
    for cls in ("LayerNorm", "GroupNorm", "LocalResponseNorm", "CrossMapLRN2d", "RMSNorm")
    if hasattr(nn, cls)
) + (nn.modules.batchnorm._NormBase,)  # BatchNorm*, SyncBatchNorm, InstanceNorm*, their Lazy forms


def layer_kind(module: nn.Module) -> str:
    """The :class:`xnorm.spec.LayerKind` of a torch module (decides spectral norm's default ``dim``)."""
    for kind_class, kind in (
        (nn.ConvTranspose1d, "conv_transpose1d"),
        (nn.ConvTranspose2d, "conv_transpose2d"),
        (nn.ConvTranspose3d, "conv_transpose3d"),
    ):
        if isinstance(module, kind_class):
            return kind
    return LayerKind.GENERIC


class TorchBackend(registry.Backend):
    name = "torch"

    def owns(self, obj: Any) -> bool:
        return isinstance(obj, nn.Module)

    def is_wrapped(self, obj: Any) -> bool:
        return bool(_xnorm_parametrizations(obj))

    def _check(self, module: nn.Module, name: str) -> torch.Tensor:
        """Every reason ``wrap`` could refuse, checked before anything changes."""
        if isinstance(module, NORMALIZATION_LAYERS):
            raise UnsupportedLayerError(
                f"the torch backend cannot reparametrize a {type(module).__module__}.{type(module).__qualname__}: "
                "a normalization layer's weight is a per-channel scale, not a weight matrix. Wrap the Linear, "
                "Conv or Embedding layers around it; to keep a BatchNorm's running statistics fixed, use xnorm.freeze."
            )
        if parametrize.is_parametrized(module, name):
            what = "xnorm" if name in _xnorm_parametrizations(module) else "another parametrization"
            raise AlreadyWrappedError(
                f"{type(module).__name__}.{name} is already parametrized (by {what}). Call xnorm.remove(module) "
                "or torch.nn.utils.parametrize.remove_parametrizations(module, name) first."
            )
        for legacy, remover in ((f"{name}_g", "remove_weight_norm"), (f"{name}_orig", "remove_spectral_norm")):
            if name not in module._parameters and legacy in module._parameters:
                what = "weight norm" if legacy.endswith("_g") else "spectral norm"
                raise AlreadyWrappedError(
                    f"{type(module).__name__} already has torch's legacy {what} on {name!r} ({legacy}). "
                    f"Call torch.nn.utils.{remover}(module, {name!r}) first."
                )
        if not any(p is not None for p in module._parameters.values()):
            children = [child for child, _ in module.named_children()]
            raise UnsupportedLayerError(
                f"the torch backend cannot reparametrize a {type(module).__module__}.{type(module).__qualname__}: it "
                "holds no parameter of its own"
                + (f" (its sub-modules {children} do)" if children else "")
                + ". Wrap the submodule that owns the weight."
            )
        weight = module._parameters.get(name)
        if weight is None:
            floating = [n for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
            where = " (it is a buffer, not a parameter)" if name in module._buffers else ""
            raise MissingParameterError(
                f"{type(module).__name__} has no parameter {name!r}{where}; its own floating parameters are "
                f"{floating or 'none'}. Pass name= one of them, or wrap the submodule that owns the weight."
            )
        check_floating(dtype_name(weight.dtype), what=f"{type(module).__name__}.{name}")
        return weight

    def wrap(self, layer: Any, spec: Reparametrization, *, name: Optional[str] = None, **options: Any) -> nn.Module:
        fused = options.pop("fused", False)
        if options:
            raise OptionError(f"the torch backend takes no option(s) {sorted(options)}; remove them.")
        check_fused_option(fused, "torch", auto=True)
        check_fused_spec(fused, spec)
        name = "weight" if name is None else name
        weight = self._check(layer, name)
        if isinstance(spec, SpectralNorm):
            return self._wrap_spectral(layer, spec, name, weight)
        if isinstance(spec, Orthogonal):
            spec.resolved_map(tuple(weight.shape))  # DimError for a 1-D weight before anything changes
            # unsafe=True, as torch registers its own: right_inverse sets base and original = -I
            parametrize.register_parametrization(layer, name, OrthogonalParametrization(weight, spec), unsafe=True)
            return layer
        if not isinstance(spec, WeightNorm):
            raise UnsupportedLayerError(
                f"the torch backend does not implement {type(spec).__name__}; it implements WeightNorm, "
                "SpectralNorm and Orthogonal."
            )
        spec.resolved_dim(weight.dim())  # raises DimError before anything changes
        torch_dim = -1 if spec.dim is None else int(spec.dim)
        if fused:
            from .fused import fused_parametrization, install_forward  # imports this module: not at the top

            parametrization = fused_parametrization(layer, name, weight, spec, torch_dim, auto=fused == FUSED_AUTO)
        else:
            parametrization = WeightNormParametrization(torch_dim, spec.eps)
        parametrize.register_parametrization(layer, name, parametrization, unsafe=True)
        if fused:
            install_forward(layer)  # a no-op where the fused path falls back to materialising w
        handle = _register_load_state_dict_pre_hook(layer, _legacy_keys_hook(name))
        parametrization.legacy_hook_id = handle.id
        return layer

    def _wrap_spectral(self, layer: nn.Module, spec: SpectralNorm, name: str, weight: torch.Tensor) -> nn.Module:
        dim = spec.resolved_dim(weight.dim(), layer_kind(layer))  # raises DimError before anything changes
        parametrization = SpectralNormParametrization(weight, spec, dim)
        # unsafe=False, as torch registers its own: one consistency evaluation, which iterates in training mode.
        parametrize.register_parametrization(layer, name, parametrization)
        handle = _register_load_state_dict_pre_hook(layer, legacy_spectral_keys_hook(name))
        parametrization.legacy_hook_id = handle.id
        return layer

    def remove(self, obj: Any, *args: Any, **options: Any) -> nn.Module:
        if args or options:
            raise OptionError("xnorm.remove takes no extra arguments for torch modules; call xnorm.remove(module).")
        targets = [(module, name) for module in obj.modules() for name in _xnorm_parametrizations(module)]
        if not targets:
            raise _not_wrapped(obj)
        for module, name in targets:
            if len(module.parametrizations[name]) != 1:
                raise UnsupportedLayerError(
                    f"{type(module).__name__}.{name} has other parametrizations stacked on xnorm's; "
                    "remove them first with torch.nn.utils.parametrize.remove_parametrizations."
                )
        for module, name in targets:
            hook_id = module.parametrizations[name][0].legacy_hook_id
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            module._load_state_dict_pre_hooks.pop(hook_id, None)
        return obj

    # -- freeze ---------------------------------------------------------------------------------
    def freeze(self, obj: Any, *, affine: bool, layers: Any) -> nn.Module:
        """See :func:`xnorm.freeze` and :mod:`xnorm._backends.torch.freeze` (how it survives ``train()``,
        deepcopy and ``torch.compile``)."""
        return _freeze.freeze(obj, affine=affine, layers=layers)

    def unfreeze(self, obj: Any) -> nn.Module:
        return _freeze.unfreeze(obj)

    def is_frozen(self, obj: Any) -> bool:
        return _freeze.is_frozen(obj)
