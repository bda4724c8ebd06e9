"""The catalogue of conformance cases: reparametrizations x layer kinds x dims x dtypes x devices, with fixed seeds.

A weight-norm case id reads ``<layer>-dim<dim>-<dtype>-<device>``, for example ``conv1d-dim0-float32-cpu``
or ``conv_transpose1d-g2-s2-op1-dimNone-bfloat16-gpu``; other reparametrizations put their label after
the layer (``conv1d-sn3-dimNone-float32-cpu``: spectral norm, 3 power iterations, the default dim), and
one without a ``dim`` leaves it out (``linear-wide-orth-cayley-direct-float64-cpu``: the orthogonal
parametrization, Cayley map, without trivialization).
Every array a case uses is drawn from a seed derived from its id, so each case is reproducible on its
own and identical in every backend.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from xnorm.reference import round_to_dtype
from xnorm.spec import (
    FLOATING_DTYPES,
    ORTHOGONAL_MAPS,
    LayerKind,
    Orthogonal,
    Reparametrization,
    SpectralNorm,
    WeightNorm,
    spectral_matrix_shape,
)

__all__ = [
    "LayerCase",
    "Case",
    "LAYERS",
    "CATALOGUE_DTYPES",
    "CATALOGUE_REPARAMETRIZATIONS",
    "catalogue",
    "dims_for",
    "spectral_variants",
    "ORTHOGONAL_LAYERS",
    "ORTHOGONAL_DTYPES",
    "orthogonal_variants",
]

#: Every dtype the catalogue holds cases for. An adapter runs those it lists in ``Adapter.dtypes``; the
#: others are reported as not run, with the adapter's reason (``Adapter.dtype_reasons``).
CATALOGUE_DTYPES = ("float32", "float64", "bfloat16", "float16")
assert sorted(CATALOGUE_DTYPES) == sorted(FLOATING_DTYPES), "the catalogue covers every dtype of the spec"


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """A layer configuration, in torch's terms (the canonical ones).

    ``weight_shape`` is canonical; ``input_shape`` is ``(N, C, *spatial)`` for convolutions,
    ``(N, in)`` for Linear and the index array's shape for Embedding. ``stride``, ``padding``,
    ``dilation`` and ``output_padding`` have one entry per spatial axis; padding is symmetric zeros.
    """

    label: str
    kind: str
    weight_shape: Tuple[int, ...]
    input_shape: Tuple[int, ...]
    bias: bool = True
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] = ()
    dilation: Tuple[int, ...] = ()
    output_padding: Tuple[int, ...] = ()
    groups: int = 1

    @property
    def spatial(self) -> int:
        return LayerKind.spatial_dims(self.kind)

    @property
    def in_channels(self) -> int:
        if self.kind in LayerKind.CONV_TRANSPOSE:
            return self.weight_shape[0]
        return self.weight_shape[1] * (self.groups if self.kind in LayerKind.CONV else 1)

    @property
    def out_channels(self) -> int:
        if self.kind in LayerKind.CONV_TRANSPOSE:
            return self.weight_shape[1] * self.groups
        return self.weight_shape[0]

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def bias_size(self) -> int:
        return self.out_channels


def _conv(
    label,
    kind,
    weight_shape,
    input_shape,
    *,
    stride=None,
    padding=None,
    dilation=None,
    output_padding=None,
    groups=1,
    bias=True,
) -> LayerCase:
    n = LayerKind.spatial_dims(kind)
    return LayerCase(
        label=label,
        kind=kind,
        weight_shape=weight_shape,
        input_shape=input_shape,
        bias=bias,
        stride=stride or (1,) * n,
        padding=padding or (0,) * n,
        dilation=dilation or (1,) * n,
        output_padding=output_padding or (0,) * n,
        groups=groups,
    )


#: Every layer configuration of the catalogue. Small shapes keep graph-mode compiles cheap; the
#: variants cover groups, stride, dilation, padding, output_padding and missing bias.
LAYERS: Tuple[LayerCase, ...] = (
    LayerCase("linear", "linear", (4, 6), (3, 6)),
    LayerCase("linear-nobias", "linear", (5, 3), (4, 3), bias=False),
    _conv("conv1d", "conv1d", (6, 4, 3), (2, 4, 9), padding=(1,)),
    _conv("conv1d-g2-s2-d2", "conv1d", (6, 2, 3), (2, 4, 11), stride=(2,), dilation=(2,), padding=(2,), groups=2),
    _conv("conv2d", "conv2d", (4, 3, 3, 2), (2, 3, 6, 5), padding=(1, 0)),
    _conv("conv2d-g2-s2-nobias", "conv2d", (4, 2, 3, 3), (2, 4, 7, 6), stride=(2, 1), groups=2, bias=False),
    _conv("conv3d", "conv3d", (3, 2, 2, 3, 2), (1, 2, 4, 5, 4)),
    _conv("conv_transpose1d", "conv_transpose1d", (4, 6, 3), (2, 4, 7)),
    _conv(
        "conv_transpose1d-g2-s2-op1",
        "conv_transpose1d",
        (4, 3, 4),
        (2, 4, 6),
        stride=(2,),
        padding=(1,),
        output_padding=(1,),
        groups=2,
    ),
    _conv("conv_transpose2d-s2", "conv_transpose2d", (3, 4, 3, 3), (2, 3, 4, 5), stride=(2, 2), padding=(1, 1)),
    _conv("conv_transpose3d-s2", "conv_transpose3d", (2, 2, 2, 2, 2), (1, 2, 3, 3, 2), stride=(2, 2, 2)),
    LayerCase("embedding", "embedding", (10, 5), (3, 4), bias=False),
)


def dims_for(ndim: int) -> Tuple[Optional[int], ...]:
    """0, 1, last, a negative one, None and -1 (whole tensor), without repeating a value."""
    dims: List[Optional[int]] = []
    for dim in (0, 1, ndim - 1, -2, None, -1):
        if dim not in dims:
            dims.append(dim)
    return tuple(dims)


def spectral_variants(layer: LayerCase) -> Tuple[SpectralNorm, ...]:
    """Spectral-norm cases of a layer: the default dim with one power iteration, and the other channel axis
    with three (each dim and each iteration count once, without their product: compiles are the cost)."""
    other = 0 if layer.kind in LayerKind.CONV_TRANSPOSE else 1
    return (SpectralNorm(), SpectralNorm(dim=other, n_power_iterations=3))


#: Layers of the orthogonal cases: a square, a tall and a wide matrix, and a batch of matrices (a Conv2d
#: weight: every 3x3 kernel slice is one). The orthogonal parametrization works on matrices, so the
#: weight-norm layers' shapes (kernel axes of size 2, Embedding) say little about it.
ORTHOGONAL_LAYERS: Tuple[LayerCase, ...] = (
    LayerCase("linear-square", "linear", (5, 5), (3, 5)),
    LayerCase("linear-tall", "linear", (6, 3), (3, 3)),
    LayerCase("linear-wide", "linear", (3, 6), (3, 6)),
    _conv("conv2d-kernels", "conv2d", (3, 2, 3, 3), (2, 2, 5, 5), padding=(1, 1)),
)
#: The orthogonal cases' dtypes (its maps are matrix functions computed in the weight's dtype; the
#: half-precision ones are not part of its spec yet).
ORTHOGONAL_DTYPES = ("float32", "float64")


def orthogonal_variants(layer: LayerCase) -> Tuple[Orthogonal, ...]:
    """Every map, with and without trivialization."""
    return tuple(Orthogonal(orthogonal_map=m, use_trivialization=t) for m in ORTHOGONAL_MAPS for t in (True, False))


#: The reparametrizations the catalogue holds cases for, by ``kind``, and ``"freeze"``: the fine-tuning
#: case of ``xnorm.freeze`` (:mod:`xnorm.conformance.fine_tuning`), reported beside them.
CATALOGUE_REPARAMETRIZATIONS = ("weight_norm", "spectral_norm", "orthogonal", "freeze")


@dataclasses.dataclass(frozen=True)
class Case:
    """One case. ``options`` is the reparametrization without its ``dim`` (kept in ``dim`` so that ids
    and the many places reading ``case.dim`` stay simple); :attr:`spec` puts them together."""

    layer: LayerCase
    dim: Optional[int]
    dtype: str
    device: str
    options: Reparametrization = WeightNorm()

    @property
    def spec(self) -> Reparametrization:
        """The reparametrization under test, ``dim`` included: what the adapter passes to ``xnorm.wrap``."""
        if not self._has_dim:
            return self.options
        return dataclasses.replace(self.options, dim=self.dim)

    @property
    def _has_dim(self) -> bool:
        return "dim" in {field.name for field in dataclasses.fields(self.options)}

    @property
    def reparametrization(self) -> str:
        return self.options.kind

    @property
    def _stem(self) -> str:
        label = "" if isinstance(self.options, WeightNorm) else f"-{self.options.label}"
        dim = f"-dim{self.dim}" if self._has_dim else ""
        return f"{self.layer.label}{label}{dim}-{self.dtype}"

    @property
    def id(self) -> str:
        return f"{self._stem}-{self.device}"

    @property
    def seed(self) -> int:
        # Independent of the device: every device sees the same numbers.
        return zlib.crc32(self._stem.encode())

    def arrays(self) -> Dict[str, np.ndarray]:
        """The case's data, rounded to its dtype (float32 storage for bfloat16; float64 stays float64).

        ``weight``, ``bias`` (absent without bias), ``other_weight``/``other_bias`` (the values a fresh
        layer starts from in the state round-trip), ``x`` (integer indices for Embedding),
        ``grad_output`` and ``target`` (for the training steps).
        """
        rng = np.random.default_rng(self.seed)
        layer = self.layer
        fan_in = int(np.prod(layer.weight_shape[1:]))
        scale = 1.0 if layer.kind == LayerKind.EMBEDDING else 1.0 / np.sqrt(fan_in)

        def draw(shape, s=1.0):
            return round_to_dtype(rng.standard_normal(shape) * s, self.dtype)

        out = {"weight": draw(layer.weight_shape, scale), "other_weight": draw(layer.weight_shape, scale)}
        if layer.bias:
            out["bias"] = draw((layer.bias_size,), scale)
            out["other_bias"] = draw((layer.bias_size,), scale)
        if layer.kind == LayerKind.EMBEDDING:
            out["x"] = rng.integers(0, layer.weight_shape[0], size=layer.input_shape).astype(np.int64)
        else:
            out["x"] = draw(layer.input_shape)
        from .layers import output_shape

        shape = output_shape(layer)
        out["grad_output"] = draw(shape)
        out["target"] = draw(shape)
        if isinstance(self.options, SpectralNorm) and len(layer.weight_shape) > 1:
            # the raw draws spectral norm's state starts from (normalized and iterated by the oracle)
            dim = self.spec.resolved_dim(len(layer.weight_shape), layer.kind)
            h, w = spectral_matrix_shape(layer.weight_shape, dim)
            out["u0"] = rng.standard_normal(h)
            out["v0"] = rng.standard_normal(w)
        if isinstance(self.options, Orthogonal) and self.options.use_trivialization:
            # the random columns that complete a non-square weight before its QR (the backends draw their
            # own at registration; the oracle sets every backend's base from these afterwards)
            n, k = max(layer.weight_shape[-2:]), min(layer.weight_shape[-2:])
            out["completion"] = rng.standard_normal(tuple(layer.weight_shape[:-2]) + (n, n - k))
        return out


def catalogue(
    dtypes: Iterable[str],
    devices: Iterable[str] = ("cpu",),
    reparametrizations: Iterable[str] = CATALOGUE_REPARAMETRIZATIONS,
) -> List[Case]:
    """Every case for the given dtypes, devices and reparametrization kinds, in a stable order (each
    dtype's fine-tuning case after its layer cases)."""
    kinds, dtypes, devices = tuple(reparametrizations), tuple(dtypes), tuple(devices)
    cases = []
    for device in devices:
        for dtype in dtypes:
            for layer in LAYERS:
                if "weight_norm" in kinds:
                    for dim in dims_for(len(layer.weight_shape)):
                        cases.append(Case(layer, dim, dtype, device))
                if "spectral_norm" in kinds:
                    for spec in spectral_variants(layer):
                        cases.append(Case(layer, spec.dim, dtype, device, dataclasses.replace(spec, dim=None)))
            if "orthogonal" in kinds and dtype in ORTHOGONAL_DTYPES:
                for layer in ORTHOGONAL_LAYERS:
                    for spec in orthogonal_variants(layer):
                        cases.append(Case(layer, None, dtype, device, spec))
            if "freeze" in kinds:
                from .fine_tuning import fine_tuning_cases  # it builds on this module

                cases += fine_tuning_cases((dtype,), (device,))
    return cases
