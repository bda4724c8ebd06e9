"""The fused path of the torch backend: ``xnorm.wrap(module, fused=True)``.

With ``w = v * s`` and ``s = g / ||v||`` constant along every axis but ``dim``, a layer that is linear
in its weight computes the same thing when ``s`` scales its output (or its input, or the looked-up
rows) instead of ``v``; :func:`xnorm.spec.fused_scale_side` says which side for each layer kind and
``dim``. Where it applies, the forward pass computes ``s`` (a reduction over ``v``), runs the layer's
own op with ``v`` and applies ``s`` to the activations, so ``w`` is never materialised.

The backward pass
-----------------

Left to autograd, the fused forward is *slower* than materialising ``w``: the norm's generic
backward and the sum of v's two gradient contributions each cost passes over a weight-sized tensor,
and the scale's backward costs passes over the (often much larger) activations. Each layer kind
therefore runs as one ``torch.autograd.Function`` whose backward uses what the algebra gives:

* ``G = dL/dw`` is the plain layer's weight gradient, which depends on the input and ``dL/dy`` only,
  never on ``w``: the same ``mm`` / ``convolution_backward`` / ``embedding_dense_backward`` call the
  plain layer makes, with the unscaled input and output gradient;
* then ``dL/ds = sum(G * v)`` over the norm's axes, ``dL/dg = dL/ds / ||v||`` and
  ``dL/dv = s * G - (dL/ds * s / ||v||**2) * v``, in place in ``G``'s buffer where the dtype allows;
* the input gradient is the layer's with ``v``, its output gradient scaled by ``s`` (output side) or
  its result scaled by ``s`` (input side).

For a Linear whose output gradient is smaller than its weight (the usual batch sizes), ``s`` scales
``dL/dy`` before the ``mm`` instead, so ``dL/dv`` is one in-place ``addcmul`` on the ``mm``'s result
and ``dL/ds`` a sum over the (small) saved bias-free output. When the backward itself is
differentiated (``create_graph=True``: gradient penalties), ``s`` and ``||v||`` are recomputed from
the saved ``g`` and ``v`` with differentiable ops and nothing is done in place, so second derivatives
are exact. Without gradients (``torch.no_grad``, inference mode) and under ``torch.jit.trace`` (a
Python ``Function`` cannot be serialized), the same forward ops run outside the ``Function``; a traced
module then differentiates through autograd's own formulas. Under autocast the layer op is the
functional one autocast casts (``F.linear``, ``F.conv1d``...), and the backward feeds the layer's
weight-gradient op the same dtypes.

How it is hooked in, and why that way
-------------------------------------

Everything but the layer's forward stays the non-fused wrapper's: the same
``torch.nn.utils.parametrize`` registration (a :class:`FusedWeightNormParametrization`, a subclass of
the backend's :class:`WeightNormParametrization` that only adds the fused plan and computes ``w``
exactly as it does), so ``module.weight`` still computes ``w`` on access, ``state_dict`` keys and
values are identical (a checkpoint moves freely between fused and non-fused wrappers), legacy
``weight_g``/``weight_v`` checkpoints load, and ``xnorm.remove`` is unchanged.

``forward`` is overridden on the class ``parametrize.register_parametrization`` creates for this
module (``ParametrizedLinear``...; torch makes a new one for every module it parametrizes, and puts
its ``weight`` property there too). That class is the only per-module place torch already controls:

* ``remove`` (ours or torch's ``remove_parametrizations``) restores the original class, so the
  override goes with it and nothing of the fused path can outlive the parametrization;
* ``deepcopy`` shares the class with the copy, as it already shares the ``weight`` property, and the
  override reads everything from the instance, so the copy is fused too and independent;
* no wrapper module is inserted, so module paths, hooks, ``type_before_parametrizations`` and
  ``isinstance`` are what the non-fused wrapper gives; torch.compile traces the override like any
  ``forward``. Pickling the whole module raises torch's own "only through state_dict()" error, as for
  every parametrized module.

The override checks, on each call, that the module's ``weight`` still has exactly one
parametrization and that it is a fused one; otherwise (another parametrization stacked on top,
xnorm's removed while another tensor stays parametrized) it runs the original class's ``forward``,
which reads ``module.weight``: never wrong, only not fused.

Where it applies
----------------

Only the exact forward of ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and
``nn.Embedding`` is re-expressed (a subclass that overrides ``forward`` computes something this module
cannot know, so it falls back; one that inherits it is fused), and only for ``name="weight"``. It
also falls back, materialising ``w`` exactly as without ``fused``, for kernel axes of a convolution
(``dim >= 2``), a ConvTranspose with a padding mode other than zeros (which torch rejects anyway),
and an Embedding with ``max_norm`` (torch renormalises the weight it is given in place, which must be
``w``, not ``v``) or ``sparse=True`` (a sparse gradient for ``v`` is not what the non-fused path
gives). :func:`fused_side` tells which side a wrapped module uses.

Choosing per call: ``fused="auto"``
-----------------------------------

The same registration, plus a decision at each call: the override runs the fused forward when
:func:`xnorm.spec.fused_pays` says it saves more than it costs (a weight of at least 2**18 elements
and an activation on the scaled side of at most half as many), and the original class's ``forward``
otherwise, which reads ``module.weight`` and so computes exactly what the non-fused wrapper computes,
bit for bit. The activation's element count comes from the input's shape, before anything runs:
the input itself (input side), the output (output side: the input's count times ``out / in``
channels, divided by the strides of a convolution and multiplied by those of a transposed one,
which ignores the few elements padding and kernel size add or remove at the edges), or the looked-up
rows (the indices' count times the features). The choice costs a few integer operations per call;
``torch.compile`` specializes on it like on any shape test.

Precision
---------

``s``, ``||v||`` and the weight-norm part of the backward are computed in float32 for
float16/bfloat16 weights (the spec's norm precision) and in the weight's dtype otherwise; ``dL/dg``
and ``dL/dv`` are cast to the parameters' dtype once. The scaled activation is computed in the
promoted dtype and cast back to the activation's dtype once: the layer's output for the output side
and the rows side, the layer's input for the input side. In float32 and float64 this is the same math
with a different rounding order; with bfloat16 the layer rounds its bias-free output to bfloat16 once
before the scale (the non-fused path rounds ``w`` instead). Both stay within the conformance
tolerances (docs/torch.md gives the measured differences).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from xnorm.spec import (
    FUSED_INPUT,
    FUSED_OUTPUT,
    FUSED_ROWS,
    LayerKind,
    WeightNorm,
    fused_pays,
    fused_scale_side,
    reduction_axes,
)

from . import WeightNormParametrization

__all__ = [
    "FusedWeightNormParametrization",
    "fused_parametrization",
    "install_forward",
    "fused_side",
    "runs_fused",
    "layer_kind",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: The forwards whose algebra this module re-expresses with v, keyed by the function object, so a
#: subclass that overrides ``forward`` is never mistaken for the layer it derives from.
_FORWARD_KINDS: Dict[Callable, str] = {
    nn.Linear.forward: LayerKind.LINEAR,
    nn.Conv1d.forward: "conv1d",
    nn.Conv2d.forward: "conv2d",
    nn.Conv3d.forward: "conv3d",
    nn.ConvTranspose1d.forward: "conv_transpose1d",
    nn.ConvTranspose2d.forward: "conv_transpose2d",
    nn.ConvTranspose3d.forward: "conv_transpose3d",
    nn.Embedding.forward: LayerKind.EMBEDDING,
}


def layer_kind(module: nn.Module, name: str) -> str:
    """The :class:`xnorm.spec.LayerKind` of ``module``'s parameter ``name`` as the fused path sees it.

    ``LayerKind.GENERIC`` unless ``name`` is ``"weight"`` and the module's class (before any
    parametrization) runs one of the supported torch forwards unchanged.
    """
    if name != "weight":
        return LayerKind.GENERIC
    original = parametrize.type_before_parametrizations(module)
    return _FORWARD_KINDS.get(getattr(original, "forward", None), LayerKind.GENERIC)


class FusedWeightNormParametrization(WeightNormParametrization):
    """:class:`WeightNormParametrization` (``module.weight`` still computes w with it, unchanged) plus
    the fused plan: the layer ``kind``, the ``side`` s goes to (``"output"``, ``"input"``, ``"rows"``),
    the axes the norm sums over (``axes``; None for the whole tensor) and ``tile``, how many times s
    repeats over the channel axis (the groups of a grouped conv's ``dim=1``). ``auto``: ``fused="auto"``,
    the forward decides per call (module docstring).
    """

    def __init__(
        self,
        dim: int,
        eps: Optional[float],
        *,
        kind: str,
        side: str,
        axes: Optional[Tuple[int, ...]],
        tile: int = 1,
        auto: bool = False,
    ) -> None:
        super().__init__(dim, eps)
        self.kind = kind
        self.side = side
        self.axes = axes
        self.tile = tile
        self.auto = auto

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.side}{' (auto)' if self.auto else ''}"


def fused_parametrization(
    module: nn.Module, name: str, weight: torch.Tensor, spec: WeightNorm, torch_dim: int, *, auto: bool = False
) -> WeightNormParametrization:
    """The parametrization ``xnorm.wrap(..., fused=True)`` (``fused="auto"``: ``auto=True``) registers on
    ``module.<name>``.

    A :class:`FusedWeightNormParametrization` where :func:`xnorm.spec.fused_scale_side` and the layer
    allow it (see the module docstring), else the plain :class:`WeightNormParametrization`, so the
    fallback is the non-fused wrapper exactly. Nothing is changed on ``module``.
    """
    kind = layer_kind(module, name)
    dim = spec.resolved_dim(weight.dim())
    side = fused_scale_side(kind, dim)
    if kind in LayerKind.CONV_TRANSPOSE and module.padding_mode != "zeros":
        side = None
    if kind == LayerKind.EMBEDDING and (module.max_norm is not None or module.sparse):
        side = None
    if side is None:
        return WeightNormParametrization(torch_dim, spec.eps)
    # conv's dim=1 (in/groups) and conv_transpose's dim=1 (out/groups) index one group's channels:
    # s repeats once per group along the full channel axis.
    tile = module.groups if kind in LayerKind.CONV + LayerKind.CONV_TRANSPOSE and dim == 1 else 1
    axes = None if dim is None else reduction_axes(dim, weight.dim())
    return FusedWeightNormParametrization(torch_dim, spec.eps, kind=kind, side=side, axes=axes, tile=tile, auto=auto)


def _active(module: nn.Module) -> Optional[FusedWeightNormParametrization]:
    """The module's fused parametrization of ``weight`` when it is the only one there, else None."""
    parametrizations = module._modules.get("parametrizations")
    stack = None if parametrizations is None else parametrizations._modules.get("weight")
    if stack is None or len(stack) != 1:
        return None
    found = stack[0]
    return found if isinstance(found, FusedWeightNormParametrization) else None


def fused_side(module: nn.Module) -> Optional[str]:
    """Where a wrapped module applies s (``"output"``, ``"input"``, ``"rows"``), or None when its
    forward materialises w (not fused, or a fallback). With ``fused="auto"`` the side of the calls
    :func:`runs_fused` accepts."""
    found = _active(module)
    return None if found is None else found.side


def _scaled_elements(module: nn.Module, p: FusedWeightNormParametrization, input: torch.Tensor) -> int:
    """How many elements the fused forward of ``module`` scales for ``input`` (module docstring)."""
    count = input.numel()
    if p.side == FUSED_INPUT:
        return count
    if p.kind == LayerKind.EMBEDDING:
        return count * module.embedding_dim
    if p.kind == LayerKind.LINEAR:
        return count // module.in_features * module.out_features
    count = count // module.in_channels * module.out_channels
    strides = math.prod(module.stride)
    return count * strides if p.kind in LayerKind.CONV_TRANSPOSE else count // strides


def _fused_for(module: nn.Module, p: FusedWeightNormParametrization, input: torch.Tensor) -> bool:
    """Whether ``module``, whose active fused parametrization is ``p``, runs fused on ``input``."""
    if not p.auto:
        return True
    return fused_pays(module.parametrizations["weight"].original1.numel(), _scaled_elements(module, p, input))


def runs_fused(module: nn.Module, input: torch.Tensor) -> bool:
    """Whether a call of the wrapped ``module`` on ``input`` takes the fused forward: always with
    ``fused=True`` where :func:`fused_side` is not None, per :func:`xnorm.spec.fused_pays` with
    ``fused="auto"``, never otherwise."""
    p = _active(module)
    return p is not None and _fused_for(module, p, input)


# -- the weight-norm algebra ------------------------------------------------------------------------


def _norm_and_scale(
    g: torch.Tensor, v: torch.Tensor, axes: Optional[Tuple[int, ...]], eps: Optional[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, ||v||)`` with g's shape (0-d for the whole tensor), in float32 for 16-bit weights.

    A zero slice of v gives ``s = inf`` and NaN outputs where w would hold NaN, as without ``fused``;
    ``eps`` is added to the sum of squares as in the non-fused path.
    """
    work = torch.float32 if v.dtype in _LOW_PRECISION else v.dtype
    if eps is None:
        norm = torch.linalg.vector_norm(v, 2, dim=axes, keepdim=axes is not None, dtype=work)
    else:
        vw = v.to(work)
        squares = (vw * vw).sum() if axes is None else (vw * vw).sum(dim=axes, keepdim=True)
        norm = torch.sqrt(squares + eps)
    return g.to(work) / norm, norm


def _weight_norm_backward(
    grad_w: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    norm: torch.Tensor,
    axes: Optional[Tuple[int, ...]],
    *,
    grad_s: Optional[torch.Tensor] = None,
    in_place: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dg, dL/dv)`` from ``grad_w = dL/dw``, or from ``grad_w = s * dL/dw`` and ``grad_s`` given.

    ``dL/ds = sum(dL/dw * v)`` over ``axes``; ``dL/dg = dL/ds / ||v||``;
    ``dL/dv = s * dL/dw - (dL/ds * s / ||v||**2) * v``. ``in_place`` reuses ``grad_w``'s buffer (a
    fresh tensor of the caller's) when it is already in the working dtype.
    """
    work = s.dtype
    gw, vw = grad_w.to(work), v.to(work)
    in_place = in_place and grad_w.dtype == work  # .to() returned grad_w itself
    if grad_s is None:
        products = gw * vw
        grad_s = products.sum() if axes is None else products.sum(dim=axes, keepdim=True)
        gw = gw.mul_(s) if in_place else gw * s
    coefficient = -grad_s * s / (norm * norm)
    grad_v = gw.addcmul_(vw, coefficient) if in_place else gw + vw * coefficient
    return (grad_s / norm).to(g.dtype), grad_v.to(v.dtype)


def _channels(s: torch.Tensor, tile: int, trailing: int) -> torch.Tensor:
    """s as one value per channel, repeated ``tile`` times, shaped to broadcast against a channel axis
    followed by ``trailing`` axes (spatial axes of a convolution; 0 for a last-axis feature)."""
    if s.dim() == 0:
        return s
    s = s.reshape(-1)
    if tile != 1:
        s = s.repeat(tile)
    return s.reshape((-1,) + (1,) * trailing)


def _scaled(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x * s`` computed in the promoted dtype (float32 for 16-bit x), cast back to x's dtype once."""
    out = x * s
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _scaled_plus_bias(
    y: torch.Tensor, s: torch.Tensor, bias: Optional[torch.Tensor], trailing: int, *, in_place: bool = False
) -> torch.Tensor:
    """``y * s + bias`` (bias on the channel axis) in the promoted dtype, cast back to y's dtype once.

    ``in_place`` writes into ``y`` (a fresh tensor nobody else holds) where no cast is needed, which
    spares a large convolution output an allocation.
    """
    if bias is None:
        if in_place and s.dtype == y.dtype:
            return y.mul_(s)
        return _scaled(y, s)
    bias = bias.reshape((-1,) + (1,) * trailing)
    if in_place and s.dtype == y.dtype == bias.dtype:
        return torch.addcmul(bias, y, s, out=y)
    out = torch.addcmul(bias, y, s)
    return out if out.dtype == y.dtype else out.to(y.dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: under autocast the layer op ran on cast copies of its input and of v, and
    its backward must see the same dtypes (elsewhere they already match and nothing is copied)."""
    return t if t.dtype == dtype else t.to(dtype)


def _needs_graph(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_function(*tensors: Optional[torch.Tensor]) -> bool:
    """Run the custom ``Function`` (a recorded backward is needed), or the same forward ops directly.

    ``torch.jit.trace`` records the direct ops: a Python ``Function`` cannot be serialized, and the
    trace's own check re-runs the module without gradients. A traced module still differentiates
    correctly, through autograd's formulas for those ops.
    """
    return _needs_graph(*tensors) and not torch.jit.is_tracing()


# -- Linear -----------------------------------------------------------------------------------------


def _linear_forward(input, g, v, bias, side, axes, eps):
    s, norm = _norm_and_scale(g, v, axes, eps)
    s_in = _channels(s, 1, 0)
    if side == FUSED_INPUT:
        return F.linear(_scaled(input, s_in), v, bias), s, norm, None
    y_v = F.linear(input, v)
    return _scaled_plus_bias(y_v, s_in, bias, 0), s, norm, y_v


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, g, v, bias, side, axes, eps):
        out, s, norm, y_v = _linear_forward(input, g, v, bias, side, axes, eps)
        # Scaling dL/dy instead of dL/dw pays off while dL/dy is the smaller of the two; it needs y_v.
        keep = side == FUSED_OUTPUT and y_v.numel() <= v.numel()
        ctx.side, ctx.axes, ctx.eps = side, axes, eps
        ctx.save_for_backward(input, g, v, s, norm, y_v if keep else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, g, v, s, norm, y_v = ctx.saved_tensors
        need_x, need_g, need_v, need_b = ctx.needs_input_grad[:4]
        double = torch.is_grad_enabled()  # create_graph=True: every step must be differentiable
        if double:
            s, norm = _norm_and_scale(g, v, ctx.axes, ctx.eps)
        s_vec = _channels(s, 1, 0)
        out_features = grad_out.shape[-1]
        grad_2d = grad_out.reshape(-1, out_features)
        input_2d = _as(input.reshape(-1, input.shape[-1]), grad_out.dtype)
        v_op = _as(v, grad_out.dtype)
        grad_x = grad_g = grad_v = grad_b = None
        if need_b:
            grad_b = grad_2d.sum(0)
        if ctx.side == FUSED_INPUT:
            if need_x:
                grad_x = _scaled(grad_out.matmul(v_op), s_vec)
            if need_g or need_v:
                grad_g, grad_v = _weight_norm_backward(
                    grad_2d.t().mm(input_2d), g, v, s, norm, ctx.axes, in_place=not double
                )
            return grad_x, grad_g, grad_v, grad_b, None, None, None
        scaled_grad = _scaled(grad_out, s_vec)
        if need_x:
            grad_x = scaled_grad.matmul(v_op)
        if need_g or need_v:
            if y_v is not None and not double:
                products = (grad_out.to(s.dtype) * y_v.to(s.dtype)).reshape(-1, out_features).sum(0)
                grad_s = products.sum() if s.dim() == 0 else products.reshape(s.shape)
                grad_w = scaled_grad.reshape(-1, out_features).t().mm(input_2d)
                grad_g, grad_v = _weight_norm_backward(grad_w, g, v, s, norm, ctx.axes, grad_s=grad_s, in_place=True)
            else:
                grad_g, grad_v = _weight_norm_backward(
                    grad_2d.t().mm(input_2d), g, v, s, norm, ctx.axes, in_place=not double
                )
        return grad_x, grad_g, grad_v, grad_b, None, None, None


def _linear(module: nn.Linear, p: FusedWeightNormParametrization, g, v, input: torch.Tensor) -> torch.Tensor:
    if _use_function(input, g, v, module.bias):
        return _FusedLinear.apply(input, g, v, module.bias, p.side, p.axes, p.eps)
    return _linear_forward(input, g, v, module.bias, p.side, p.axes, p.eps)[0]


# -- Conv and ConvTranspose -------------------------------------------------------------------------


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _convolution(input, weight, bias, conv_args):
    """The layer's functional op (which autocast knows, unlike ``aten.convolution``) with the
    ``aten.convolution`` arguments ``convolution_backward`` takes."""
    stride, padding, dilation, transposed, output_padding, groups = conv_args
    n = input.dim() - 2
    if transposed:
        return _CONV_TRANSPOSE[n](input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _CONV[n](input, weight, bias, stride, padding, dilation, groups)


def _conv_forward(input, g, v, bias, side, axes, eps, tile, conv_args, in_place=True):
    s, norm = _norm_and_scale(g, v, axes, eps)
    s_c = _channels(s, tile, input.dim() - 2)
    if side == FUSED_INPUT:
        return _convolution(_scaled(input, s_c), v, bias, conv_args), s, norm
    y_v = _convolution(input, v, None, conv_args)
    return _scaled_plus_bias(y_v, s_c, bias, input.dim() - 2, in_place=in_place), s, norm


class _FusedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, g, v, bias, side, axes, eps, tile, conv_args):
        out, s, norm = _conv_forward(input, g, v, bias, side, axes, eps, tile, conv_args)
        ctx.side, ctx.axes, ctx.eps, ctx.tile, ctx.conv_args = side, axes, eps, tile, conv_args
        ctx.save_for_backward(input, g, v, s, norm)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, g, v, s, norm = ctx.saved_tensors
        need_x, need_g, need_v, need_b = ctx.needs_input_grad[:4]
        double = torch.is_grad_enabled()
        if double:
            s, norm = _norm_and_scale(g, v, ctx.axes, ctx.eps)
        s_c = _channels(s, ctx.tile, input.dim() - 2)
        need_w = need_g or need_v
        grad_x = grad_g = grad_v = grad_b = grad_w = None
        if need_b:
            grad_b = grad_out.sum(dim=[0, *range(2, grad_out.dim())])
        backward = torch.ops.aten.convolution_backward
        input_op, v_op = _as(input, grad_out.dtype), _as(v, grad_out.dtype)
        if ctx.side == FUSED_INPUT:
            if need_x or need_w:
                grad_x, grad_w, _ = backward(grad_out, input_op, v_op, None, *ctx.conv_args, [need_x, need_w, False])
            if need_x:
                grad_x = _scaled(grad_x, s_c)
        else:
            if need_w:  # dL/dw depends on the input and dL/dy only: the plain layer's own weight gradient
                grad_w = backward(grad_out, input_op, v_op, None, *ctx.conv_args, [False, True, False])[1]
            if need_x:
                scaled = _scaled(grad_out, s_c)
                grad_x = backward(scaled, input_op, v_op, None, *ctx.conv_args, [True, False, False])[0]
        if need_w:
            grad_g, grad_v = _weight_norm_backward(grad_w, g, v, s, norm, ctx.axes, in_place=not double)
        return grad_x, grad_g, grad_v, grad_b, None, None, None, None, None


def _same_padding(module: nn.Module, input: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """``padding="same"`` as explicit symmetric padding, the odd extra element padded on the right
    (where torch's own "same" convolution puts it)."""
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    extra = [t % 2 for t in total]
    if any(extra):
        pad = []
        for e in reversed(extra):
            pad += [0, e]
        input = F.pad(input, pad)
    return input, tuple(t // 2 for t in total)


def _conv_call(module: nn.Module, input: torch.Tensor, n: int, transposed: bool, output_size=None):
    """The module's input and ``aten.convolution`` arguments after padding modes, string padding and
    unbatched inputs are resolved as the layer's own forward resolves them; plus "was unbatched"."""
    if transposed:
        if module.padding_mode != "zeros":  # set after wrapping (wrap falls back): torch's own refusal
            raise ValueError(f"Only `zeros` padding mode is supported for ConvTranspose{n}d")
        output_padding = module._output_padding(
            input, output_size, module.stride, module.padding, module.kernel_size, n, module.dilation
        )
        padding = module.padding
    else:
        output_padding = (0,) * n
        if module.padding_mode != "zeros":
            input = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = (0,) * n
        elif module.padding == "valid":
            padding = (0,) * n
        elif module.padding == "same":
            input, padding = _same_padding(module, input)
        else:
            padding = module.padding
    unbatched = input.dim() == n + 1
    if unbatched:
        input = input.unsqueeze(0)
    args = (
        list(module.stride),
        list(padding),
        list(module.dilation),
        transposed,
        list(output_padding),
        module.groups,
    )
    return input, args, unbatched


def _conv(module: nn.Module, p: FusedWeightNormParametrization, g, v, input, output_size=None) -> torch.Tensor:
    transposed = p.kind in LayerKind.CONV_TRANSPOSE
    n = LayerKind.spatial_dims(p.kind)
    input, conv_args, unbatched = _conv_call(module, input, n, transposed, output_size)
    bias = module.bias
    if _use_function(input, g, v, bias):
        out = _FusedConv.apply(input, g, v, bias, p.side, p.axes, p.eps, p.tile, conv_args)
    else:  # in place only with no graph to record, and never in a trace (it must not depend on grad mode)
        in_place = not _needs_graph(input, g, v, bias) and not torch.jit.is_tracing()
        out = _conv_forward(input, g, v, bias, p.side, p.axes, p.eps, p.tile, conv_args, in_place)[0]
    return out.squeeze(0) if unbatched else out


def _conv_only(module, p, g, v, input):
    return _conv(module, p, g, v, input)


# -- Embedding --------------------------------------------------------------------------------------


def _embedding_forward(ids, g, v, side, axes, eps, padding_idx, scale_grad_by_freq):
    s, norm = _norm_and_scale(g, v, axes, eps)
    rows = F.embedding(ids, v, padding_idx, None, 2.0, scale_grad_by_freq, False)
    factor = F.embedding(ids, s, padding_idx) if side == FUSED_ROWS else _channels(s, 1, 0)
    return _scaled(rows, factor), s, norm


class _FusedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, g, v, side, axes, eps, padding_idx, scale_grad_by_freq):
        out, s, norm = _embedding_forward(ids, g, v, side, axes, eps, padding_idx, scale_grad_by_freq)
        ctx.axes, ctx.eps, ctx.padding_idx, ctx.scale_grad_by_freq = axes, eps, padding_idx, scale_grad_by_freq
        ctx.save_for_backward(ids, g, v, s, norm)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, g, v, s, norm = ctx.saved_tensors
        double = torch.is_grad_enabled()
        if double:
            s, norm = _norm_and_scale(g, v, ctx.axes, ctx.eps)
        grad_g = grad_v = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            padding_idx = -1 if ctx.padding_idx is None else ctx.padding_idx
            grad_w = torch.ops.aten.embedding_dense_backward(
                grad_out, ids, v.shape[0], padding_idx, ctx.scale_grad_by_freq
            )
            grad_g, grad_v = _weight_norm_backward(grad_w, g, v, s, norm, ctx.axes, in_place=not double)
        return None, grad_g, grad_v, None, None, None, None, None


def _embedding(module: nn.Embedding, p: FusedWeightNormParametrization, g, v, input: torch.Tensor) -> torch.Tensor:
    args = (p.side, p.axes, p.eps, module.padding_idx, module.scale_grad_by_freq)
    if _use_function(g, v):
        return _FusedEmbedding.apply(input, g, v, *args)
    return _embedding_forward(input, g, v, *args)[0]


_FORWARDS = {
    LayerKind.LINEAR: _linear,
    **{kind: _conv_only for kind in LayerKind.CONV},
    **{kind: _conv for kind in LayerKind.CONV_TRANSPOSE},
    LayerKind.EMBEDDING: _embedding,
}


def install_forward(module: nn.Module) -> None:
    """Override ``forward`` on the parametrized class torch created for ``module`` (see the module
    docstring). Call after ``register_parametrization``; idempotent, and a no-op unless the module's
    weight has a fused parametrization (a fallback keeps the original forward untouched)."""
    if _active(module) is None:
        return
    cls = type(module)
    if getattr(cls.__dict__.get("forward"), "_xnorm_fused", False):
        return
    original_forward = cls.__bases__[0].forward

    def forward(self, *args, **kwargs):
        p = _active(self)
        if p is None:
            return original_forward(self, *args, **kwargs)
        if not _fused_for(self, p, args[0] if args else kwargs["input"]):
            return original_forward(self, *args, **kwargs)
        stack = self.parametrizations["weight"]
        return _FORWARDS[p.kind](self, p, stack.original0, stack.original1, *args, **kwargs)

    forward._xnorm_fused = True
    forward.__doc__ = original_forward.__doc__
    cls.forward = forward
