"""The framework-neutral definition of every reparametrization xnorm implements.

A reparametrization is a spec object (:class:`WeightNorm`, :class:`SpectralNorm`), a float64 NumPy
reference (:mod:`xnorm.reference`, :mod:`xnorm.reference_spectral`) and one small function per
backend; :class:`Reparametrization` is what they share. This module is the single place for the
facts every backend must agree on: how ``dim`` is read, the canonical (torch) weight layout of each
layer kind and how a framework's storage layout maps onto it, which dtypes are accepted and in which
precision the norm is computed, and the names each reparametrization's tensors take.
docs/spec.md explains the same choices in prose; :mod:`xnorm.reference` implements them in NumPy.

Nothing here imports a framework, or NumPy.

Weight normalization (Salimans & Kingma, 2016), as torch's ``_weight_norm`` computes it::

    norm = sqrt(sum(v ** 2 over every axis except dim, kept as size-1 axes) [+ eps])
    w    = v * (g / norm)

* ``g`` has the weight's shape with every axis but ``dim`` reduced to size 1 (``keepdims``); with
  ``dim=None`` (or ``-1``) it is a 0-d scalar and the norm runs over the whole tensor.
* Initialisation preserves the layer's function: ``v = W`` and ``g = norm(W)``, so ``w == W``.
* ``eps`` is ``None`` by default (torch's behaviour: a zero slice gives 0/0 = NaN). When given, it is
  added under the square root, to the sum of squares, both in the forward and in ``g``'s
  initialisation, so wrapping stays function-preserving.
* float16 and bfloat16 weights: the norm and ``w`` are computed in float32 and ``w`` is cast back to the
  weight's dtype once. float32 and float64 are computed as they are. Any other dtype is an error.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import ClassVar, Dict, Optional, Sequence, Tuple

from .errors import DimError, NonFloatingParameterError, OptionError

__all__ = [
    "FLOATING_DTYPES",
    "LOW_PRECISION_DTYPES",
    "LayerKind",
    "StorageLayout",
    "Reparametrization",
    "WeightNorm",
    "SpectralNorm",
    "SPECTRAL_INIT_ITERATIONS",
    "REPARAMETRIZATIONS",
    "Orthogonal",
    "ORTHOGONAL_MAPS",
    "spectral_matrix_shape",
    "normalize_dim",
    "reduction_axes",
    "compute_dtype",
    "check_floating",
    "fused_scale_side",
    "FUSED_AUTO",
    "AUTO_FUSED_MIN_WEIGHT",
    "AUTO_FUSED_MAX_ACTIVATION_SHARE",
    "fused_pays",
    "check_fused_option",
    "check_fused_spec",
    "FUSED_OUTPUT",
    "FUSED_INPUT",
    "FUSED_ROWS",
]

#: dtype names a reparametrized weight may have.
FLOATING_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: dtypes whose norm is computed in float32 and whose ``w`` is cast back once.
LOW_PRECISION_DTYPES = ("float16", "bfloat16")


def check_floating(dtype_name: str, *, what: str) -> None:
    """Raise :class:`NonFloatingParameterError` unless ``dtype_name`` is in :data:`FLOATING_DTYPES`."""
    if dtype_name not in FLOATING_DTYPES:
        raise NonFloatingParameterError(
            f"{what} has dtype {dtype_name}; a reparametrization needs a floating weight "
            f"({', '.join(FLOATING_DTYPES)}). Cast the layer to a floating dtype first, or pass name= "
            "to pick a floating parameter."
        )


def compute_dtype(dtype_name: str) -> str:
    """The dtype the norm and ``w`` are computed in for a weight of ``dtype_name``."""
    return "float32" if dtype_name in LOW_PRECISION_DTYPES else dtype_name


def normalize_dim(dim: Optional[int], ndim: int) -> Optional[int]:
    """Read a user's ``dim`` for a weight of ``ndim`` axes in the canonical layout.

    Returns ``None`` for "one norm over the whole tensor" and otherwise an axis in ``[0, ndim)``.

    * ``None`` and ``-1`` both mean the whole tensor (torch's rule: ``-1`` is **not** the last axis;
      write ``ndim - 1`` for that).
    * Other negative values count from the end: ``-2`` is axis ``ndim - 2``.
    * Anything else outside ``[-ndim, ndim)``, a bool, or a non-integer raises :class:`DimError`.
    """
    if dim is None:
        return None
    if isinstance(dim, bool):
        raise DimError(f"dim must be an int or None, got the bool {dim!r}. Pass dim=0 or dim=None.")
    try:
        dim = operator.index(dim)  # accepts NumPy integers and 0-d integer tensors
    except TypeError:
        raise DimError(
            f"dim must be an int or None, got {dim!r} of type {type(dim).__name__}. "
            "Pass dim=0 for the output-channel axis, or dim=None for one norm over the whole weight."
        ) from None
    if dim == -1:
        return None
    if not -ndim <= dim < ndim:
        raise DimError(
            f"dim={dim} is out of range for a weight with {ndim} axes (valid: {-ndim}..{ndim - 1}, or None). "
            f"Note that dim=-1 means one norm over the whole weight, as in torch; the last axis is dim={ndim - 1}."
        )
    return dim % ndim


def reduction_axes(dim: Optional[int], ndim: int) -> Tuple[int, ...]:
    """Axes the norm sums over for an already normalized ``dim``: every axis but ``dim``."""
    return tuple(axis for axis in range(ndim) if axis != dim)


class LayerKind:
    """Canonical (torch) weight layouts, the one way every backend reads ``dim``.

    ============================  =====================================
    kind                          canonical weight axes
    ============================  =====================================
    ``linear``                    (out, in)
    ``conv1d/2d/3d``              (out, in/groups, *kernel)
    ``conv_transpose1d/2d/3d``    (in, out/groups, *kernel)
    ``embedding``                 (num_embeddings, features)
    ``generic``                   the parameter's own axes
    ============================  =====================================
    """

    LINEAR = "linear"
    EMBEDDING = "embedding"
    GENERIC = "generic"
    CONV = tuple(f"conv{n}d" for n in (1, 2, 3))
    CONV_TRANSPOSE = tuple(f"conv_transpose{n}d" for n in (1, 2, 3))
    ALL = (LINEAR, *CONV, *CONV_TRANSPOSE, EMBEDDING, GENERIC)

    @staticmethod
    def spatial_dims(kind: str) -> int:
        """Number of kernel axes of a conv kind (0 for the others)."""
        return int(kind[-2]) if kind in LayerKind.CONV + LayerKind.CONV_TRANSPOSE else 0

    @staticmethod
    def axis_names(kind: str, ndim: int) -> Tuple[str, ...]:
        """Readable names of the canonical axes, used in docs and error messages."""
        if kind == LayerKind.LINEAR:
            return ("out", "in")
        if kind == LayerKind.EMBEDDING:
            return ("num_embeddings", "features")
        kernel = tuple(f"k{i}" for i in range(LayerKind.spatial_dims(kind)))
        if kind in LayerKind.CONV:
            return ("out", "in/groups") + kernel
        if kind in LayerKind.CONV_TRANSPOSE:
            return ("in", "out/groups") + kernel
        return tuple(f"axis{i}" for i in range(ndim))


@dataclasses.dataclass(frozen=True)
class StorageLayout:
    """How a framework stores a weight relative to the canonical layout.

    ``perm[i]`` is the canonical axis held by the i-th non-unit storage axis (NumPy's ``transpose``
    convention), and ``unit_axes`` are positions in the storage shape of extra size-1 axes the framework
    inserts (MindSpore keeps Conv1d weights as 4-D ``(out, in/groups, 1, k)``: ``perm=(0, 1, 2)``,
    ``unit_axes=(2,)``). Flax's Dense kernel ``(in, out)`` is ``perm=(1, 0)``.
    """

    perm: Tuple[int, ...]
    unit_axes: Tuple[int, ...] = ()

    @staticmethod
    def identity(ndim: int) -> StorageLayout:
        return StorageLayout(tuple(range(ndim)))

    @property
    def canonical_ndim(self) -> int:
        return len(self.perm)

    @property
    def storage_ndim(self) -> int:
        return len(self.perm) + len(self.unit_axes)

    def _storage_positions(self) -> Tuple[int, ...]:
        """Storage position of each entry of ``perm``."""
        return tuple(p for p in range(self.storage_ndim) if p not in self.unit_axes)

    def storage_axis(self, canonical_axis: int) -> int:
        """Storage position of a canonical axis."""
        return self._storage_positions()[self.perm.index(canonical_axis)]

    def storage_dim(self, dim: Optional[int]) -> Optional[int]:
        """A normalized canonical ``dim`` expressed in storage positions (None stays None)."""
        return None if dim is None else self.storage_axis(dim)

    def storage_reduction_axes(self, dim: Optional[int]) -> Tuple[int, ...]:
        """Storage axes to sum over for a normalized canonical ``dim`` (unit axes included: harmless)."""
        keep = self.storage_dim(dim)
        return tuple(axis for axis in range(self.storage_ndim) if axis != keep)

    def storage_shape(self, canonical_shape: Sequence[int]) -> Tuple[int, ...]:
        shape = [canonical_shape[c] for c in self.perm]
        for position in sorted(self.unit_axes):
            shape.insert(position, 1)
        return tuple(shape)

    def canonical_shape(self, storage_shape: Sequence[int]) -> Tuple[int, ...]:
        positions = self._storage_positions()
        shape = [0] * self.canonical_ndim
        for position, canonical_axis in zip(positions, self.perm, strict=True):
            shape[canonical_axis] = storage_shape[position]
        return tuple(shape)

    def to_storage(self, canonical_array):
        """A NumPy(-like) array in canonical layout, rearranged to storage layout."""
        out = canonical_array.transpose(self.perm)
        return out.reshape(self.storage_shape(canonical_array.shape))

    def to_canonical(self, storage_array):
        """A NumPy(-like) array in storage layout, rearranged to canonical layout."""
        squeezed = storage_array.reshape(
            tuple(size for p, size in enumerate(storage_array.shape) if p not in self.unit_axes)
        )
        inverse = tuple(self.perm.index(c) for c in range(self.canonical_ndim))
        return squeezed.transpose(inverse)


class Reparametrization:
    """What every part of xnorm needs to know about a reparametrization, whatever its math.

    A reparametrization replaces a layer's parameter ``name`` (its weight) by trainable tensors and,
    for some, non-trainable state, and computes the weight from them on every use. Subclasses are
    frozen dataclasses holding the user's options and set these class attributes:

    * ``kind``: its name in case ids, reports and error messages (``"weight_norm"``);
    * ``tensors``: the framework-neutral names of its trainable tensors, in order (``("g", "v")``);
    * ``state``: the names of its non-trainable state (``("u", "v")`` for spectral norm; empty for
      weight norm), which changes on each training-mode use and never in eval mode;
    * ``suffixes``: how each tensor and state entry is called next to the layer's other parameters,
      ``name + suffix`` (``weight_g``, ``weight_orig``, ``weight_u``): torch's legacy names, which
      MindSpore and Flax checkpoints use too;
    * ``preserves_function``: wrapping leaves the layer's output unchanged (weight norm) or not
      (spectral norm divides by sigma).

    The registry, :func:`xnorm.wrap`, :func:`xnorm.remove`, the conversion tables, the conformance
    adapters and the runner read these attributes; nothing outside a reparametrization's own spec,
    reference and backend functions knows its math. ``remove`` always computes the weight once and
    puts it back under ``name`` as an ordinary trainable parameter.
    """

    kind: ClassVar[str] = ""
    tensors: ClassVar[Tuple[str, ...]] = ()
    state: ClassVar[Tuple[str, ...]] = ()
    suffixes: ClassVar[Dict[str, str]] = {}
    preserves_function: ClassVar[bool] = True

    def tensor_names(self, name: str) -> Tuple[str, ...]:
        """The framework names of the trainable tensors for parameter ``name`` (``weight_g``, ``weight_v``)."""
        return tuple(name + self.suffixes[tensor] for tensor in self.tensors)

    def state_names(self, name: str) -> Tuple[str, ...]:
        """The framework names of the state entries for parameter ``name`` (``weight_u``, ``weight_v``)."""
        return tuple(name + self.suffixes[entry] for entry in self.state)

    def resolved_dim(self, ndim: int, layer_kind: str = "generic") -> Optional[int]:
        """The canonical axis this reparametrization treats specially, for a weight of ``ndim`` axes."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Short text naming the options, used in case ids (``sn1-dim0``); ``dim`` is added by the case."""
        return self.kind


def _check_eps(eps: object, *, allow_none: bool, default: str) -> None:
    if eps is None and allow_none:
        return
    if eps is None or isinstance(eps, bool) or not isinstance(eps, (int, float)) or not float(eps) >= 0.0:
        raise OptionError(
            f"eps must be {'None or ' if allow_none else ''}a non-negative float, got {eps!r}. "
            f"Leave the default ({default}), or pass a small value such as 1e-12."
        )


@dataclasses.dataclass(frozen=True)
class WeightNorm(Reparametrization):
    """``w = v * (g / norm_except_dim(v, dim))``; see the module docstring for every detail.

    ``dim`` is read in the canonical layout (:class:`LayerKind`) and normalized by
    :func:`normalize_dim` once the weight's rank is known; ``eps`` is None or a non-negative float.
    g and v are called ``<name>_g`` and ``<name>_v`` (torch's legacy names), in that order.
    """

    dim: Optional[int] = 0
    eps: Optional[float] = None

    kind: ClassVar[str] = "weight_norm"
    tensors: ClassVar[Tuple[str, ...]] = ("g", "v")
    suffixes: ClassVar[Dict[str, str]] = {"g": "_g", "v": "_v"}

    def __post_init__(self) -> None:
        _check_eps(self.eps, allow_none=True, default="None, torch's behaviour")

    def resolved_dim(self, ndim: int, layer_kind: str = "generic") -> Optional[int]:
        return normalize_dim(self.dim, ndim)

    @property
    def label(self) -> str:
        return "wn" if self.eps is None else f"wn-eps{self.eps:g}"


@dataclasses.dataclass(frozen=True)
class SpectralNorm(Reparametrization):
    """``w = W / sigma(W)``, sigma estimated by power iteration, as torch's
    ``parametrizations.spectral_norm`` computes it (docs/spec.md, "Spectral normalization").

    * The matrix view: W in the canonical layout, axis ``dim`` moved first, the rest flattened:
      ``(h, w) = (shape[dim], prod(other axes))``.
    * State: ``u`` (h) and ``v`` (w), unit vectors in the compute dtype (float32 for float16/bfloat16
      weights, else the weight's). At wrap: normalized N(0, 1) draws from the framework's RNG, then
      :data:`SPECTRAL_INIT_ITERATIONS` iterations.
    * One iteration: ``u = normalize(W v)``, then ``v = normalize(W^T u)``, where
      ``normalize(x) = x / max(||x||, eps)``; no gradient flows through u or v.
    * Each training-mode use runs ``n_power_iterations`` iterations first and writes u, v back; eval
      mode never iterates. ``sigma = u . (W v)``, gradients flow through W in the numerator and in sigma;
      there is no zero guard (a zero weight gives u = v = 0, sigma = 0 and w = NaN).
    * A 1-D weight is ``W / max(||W||, eps)`` and has no state.

    ``dim=None`` means 1 for ConvTranspose layers and 0 otherwise (torch's default); other values are
    read in the canonical layout like weight norm's (negative values count from the end; unlike weight
    norm, ``-1`` is the last axis and there is no whole-tensor form). ``n_power_iterations`` is an int
    >= 1, ``eps`` a non-negative float.
    """

    n_power_iterations: int = 1
    eps: float = 1e-12
    dim: Optional[int] = None

    kind: ClassVar[str] = "spectral_norm"
    tensors: ClassVar[Tuple[str, ...]] = ("original",)
    state: ClassVar[Tuple[str, ...]] = ("u", "v")
    suffixes: ClassVar[Dict[str, str]] = {"original": "_orig", "u": "_u", "v": "_v"}
    preserves_function: ClassVar[bool] = False

    def __post_init__(self) -> None:
        n = self.n_power_iterations
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(
                f"n_power_iterations must be an int >= 1, got {n!r}: each training-mode use runs that many "
                "power iterations. Pass 1 (the default) or more."
            )
        _check_eps(self.eps, allow_none=False, default="1e-12")

    def resolved_dim(self, ndim: int, layer_kind: str = "generic") -> Optional[int]:
        """``dim`` as an axis in ``[0, ndim)``; ``None`` resolves per layer kind. A 1-D weight gives 0."""
        dim = self.dim
        if dim is None:
            dim = 1 if layer_kind in LayerKind.CONV_TRANSPOSE and ndim > 1 else 0
        if isinstance(dim, bool):
            raise DimError(f"dim must be an int or None, got the bool {dim!r}. Pass dim=0 or dim=None.")
        try:
            dim = operator.index(dim)
        except TypeError:
            raise DimError(
                f"dim must be an int or None, got {dim!r} of type {type(dim).__name__}. Pass the output-channel "
                "axis (0; 1 for ConvTranspose), or None for that default."
            ) from None
        if not -ndim <= dim < max(ndim, 1):
            raise DimError(
                f"dim={dim} is out of range for a weight with {ndim} axes (valid: {-ndim}..{ndim - 1}, or None)."
            )
        return dim % max(ndim, 1)

    @property
    def label(self) -> str:
        return f"sn{self.n_power_iterations}" + ("" if self.eps == 1e-12 else f"-eps{self.eps:g}")


#: The maps of :class:`Orthogonal` (torch's ``orthogonal_map``).
ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")


@dataclasses.dataclass(frozen=True)
class Orthogonal(Reparametrization):
    """An orthogonal weight, as torch's ``parametrizations.orthogonal`` computes it
    (:mod:`xnorm.reference_orthogonal` has every rule).

    * The weight (``ndim >= 2``) is a batch of matrices over its last two axes; a wide matrix is
      transposed, so the result has orthonormal columns, or rows when wide.
    * ``orthogonal_map``: ``"matrix_exp"``, ``"cayley"`` or ``"householder"``; ``None`` means
      ``matrix_exp`` for square matrices and ``householder`` otherwise.
    * ``use_trivialization`` (default): a non-trainable ``base`` (``n x n``, n the larger side) multiplies
      the map's result; registration sets it from the weight (kept if square and orthogonal, else the Q
      of a QR with a non-negative diagonal of R, a non-square weight first completed with random
      columns drawn from the framework's RNG) and sets ``original`` to ``-I``. Wrapping therefore changes
      the weight unless it is already orthogonal. Without trivialization ``matrix_exp`` and ``cayley``
      keep the weight as ``original`` and refuse a later assignment; ``householder`` stores its QR.
    """

    orthogonal_map: Optional[str] = None
    use_trivialization: bool = True

    kind: ClassVar[str] = "orthogonal"
    tensors: ClassVar[Tuple[str, ...]] = ("original",)
    state: ClassVar[Tuple[str, ...]] = ("base",)
    suffixes: ClassVar[Dict[str, str]] = {"original": "_orig", "base": "_base"}
    preserves_function: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.orthogonal_map is not None and self.orthogonal_map not in ORTHOGONAL_MAPS:
            raise OptionError(
                f"orthogonal_map must be one of {', '.join(map(repr, ORTHOGONAL_MAPS))} or None (matrix_exp for "
                f"square matrices, householder otherwise), got {self.orthogonal_map!r}."
            )
        if not isinstance(self.use_trivialization, bool):
            raise OptionError(f"use_trivialization must be True or False, got {self.use_trivialization!r}.")

    def resolved_map(self, shape: Sequence[int]) -> str:
        """The map for a weight of ``shape`` (real): the given one, or torch's default."""
        if len(shape) < 2:
            raise DimError(
                f"the orthogonal parametrization needs a matrix or a batch of matrices; the weight has shape "
                f"{tuple(shape)}. Wrap a layer whose weight has at least 2 axes."
            )
        return self.orthogonal_map or ("matrix_exp" if shape[-1] == shape[-2] else "householder")

    def resolved_dim(self, ndim: int, layer_kind: str = "generic") -> Optional[int]:
        """No axis is special: every matrix of the batch (the last two axes) is made orthogonal."""
        return None

    @property
    def label(self) -> str:
        return f"orth-{self.orthogonal_map or 'default'}" + ("" if self.use_trivialization else "-direct")


#: Power iterations spectral norm runs when it is wrapped, from its random unit vectors (torch's value).
SPECTRAL_INIT_ITERATIONS = 15

#: Every reparametrization by ``kind``: the one table the CLI, the conversion and the conformance read.
REPARAMETRIZATIONS: Dict[str, type] = {cls.kind: cls for cls in (WeightNorm, SpectralNorm, Orthogonal)}


def spectral_matrix_shape(shape: Sequence[int], dim: int) -> Tuple[int, int]:
    """``(h, w)`` of spectral norm's matrix view of a canonical weight of ``shape`` (``dim`` resolved)."""
    h = shape[dim]
    w = 1
    for axis, size in enumerate(shape):
        if axis != dim:
            w *= size
    return h, w


#: Where the fused path (``xnorm.wrap(..., fused=True)``) applies the per-slice scale ``s = g / ||v||``.
FUSED_OUTPUT = "output"  # layer(x; w) == s * layer_without_bias(x; v) + bias   (s per output channel, or a scalar)
FUSED_INPUT = "input"  # layer(x; w) == layer(x * s; v)                       (s per input channel)
FUSED_ROWS = "rows"  # Embedding with dim=0: lookup(ids; w) == s[ids] * lookup(ids; v)


def fused_scale_side(kind: str, dim: Optional[int]) -> Optional[str]:
    """Where the fused path applies ``s = g / ||v||`` for a weight of ``kind``, or None to materialise w.

    ``dim`` is already normalized (:func:`normalize_dim`). Because w = v * s with s constant along
    every axis but ``dim``, a linear map in w equals the same map in v with s moved to the side that
    ``dim`` indexes, so w never has to exist:

    ====================  ==========  =============================================================
    kind                  dim         side
    ====================  ==========  =============================================================
    any kind but generic  None        :data:`FUSED_OUTPUT` (s is a scalar)
    linear, conv*d        0 (out)     :data:`FUSED_OUTPUT`
    linear                1 (in)      :data:`FUSED_INPUT`
    conv*d                1           :data:`FUSED_INPUT`; with groups > 1 the in/groups scale is
                                      tiled ``groups`` times over the input channels
    conv_transpose*d      0 (in)      :data:`FUSED_INPUT`
    conv_transpose*d      1           :data:`FUSED_OUTPUT`, tiled ``groups`` times
    embedding             0           :data:`FUSED_ROWS`
    embedding             1           :data:`FUSED_OUTPUT` (per feature)
    kernel axes, generic  any other   None: w is materialised, exactly as without ``fused``
    ====================  ==========  =============================================================

    Same math, different rounding: the fused result differs from the materialised one by float
    rounding only (it must, and does, pass the conformance tolerances); the default (``fused=False``)
    stays bit-equal to torch's own weight norm.
    """
    if kind not in LayerKind.ALL or kind == LayerKind.GENERIC:
        return None  # nothing says an arbitrary module is linear in its weight
    if dim is None:
        return FUSED_OUTPUT
    if kind == LayerKind.LINEAR or kind in LayerKind.CONV:
        return {0: FUSED_OUTPUT, 1: FUSED_INPUT}.get(dim)
    if kind in LayerKind.CONV_TRANSPOSE:
        return {0: FUSED_INPUT, 1: FUSED_OUTPUT}.get(dim)
    if kind == LayerKind.EMBEDDING:
        return {0: FUSED_ROWS, 1: FUSED_OUTPUT}.get(dim)
    return None


#: ``xnorm.wrap(..., fused=FUSED_AUTO)``: decide per call, with :func:`fused_pays`.
FUSED_AUTO = "auto"
#: Below this many weight elements the fused path's fixed cost (a dozen more small operations and a custom
#: backward: about 0.1 ms per eager torch training step at Linear 64 on the 2-core benchmark machine)
#: outweighs the weight-sized passes it saves (about three, each roughly 0.3 ms per million float32
#: elements there): the break-even is near 2**17 elements, and 2**18 leaves a margin.
AUTO_FUSED_MIN_WEIGHT = 1 << 18
#: The scaled activation may hold at most this share of the weight's element count: the fused path
#: adds about as many passes over the scaled activation as it saves over the weight.
AUTO_FUSED_MAX_ACTIVATION_SHARE = 0.5


def fused_pays(weight_elements: int, scaled_elements: int) -> bool:
    """Whether ``fused="auto"`` runs a call fused: the weight has at least :data:`AUTO_FUSED_MIN_WEIGHT`
    elements and the activation ``s`` scales (the output, the input or the looked-up rows, as
    :func:`fused_scale_side` says) at most :data:`AUTO_FUSED_MAX_ACTIVATION_SHARE` of that many.

    The fused path saves weight-sized passes (w = v * s and its backward) and pays activation-sized
    ones (the scale, its backward) plus a fixed cost, so it is faster only for a large weight and a
    small activation. At the benchmark sizes: ``Linear(1024, 1024)`` at batch 64 (1,048,576 weight
    elements, 65,536 output elements) runs fused; ``Linear(64, 64)`` (too small), ``Conv2d(64, 64, 3)``
    on 16x64x64x64 and the vocoder ``Conv1d(512, 512, 7)`` (outputs 114 and 9 times their weights) run
    the default path. docs/performance.md has the timings the thresholds come from.
    """
    large = weight_elements >= AUTO_FUSED_MIN_WEIGHT
    return large and scaled_elements <= weight_elements * AUTO_FUSED_MAX_ACTIVATION_SHARE


def check_fused_option(fused: object, backend: str, *, auto: bool = False) -> None:
    """Raise :class:`OptionError` unless ``fused`` is True, False or, for a backend that decides per call
    (``auto=True``: torch), :data:`FUSED_AUTO`. A fused path is a per-backend implementation; the
    per-call choice exists where its measurements do (docs/performance.md)."""
    if fused is True or fused is False:
        return
    if fused != FUSED_AUTO:
        raise OptionError(
            f"fused must be True, False or {FUSED_AUTO!r}, got {fused!r} of type {type(fused).__name__}."
        )
    if not auto:
        raise OptionError(
            f"fused={FUSED_AUTO!r} is implemented by the torch backend only; the {backend} backend takes "
            "fused=True (scale the activations instead of building w) or fused=False (the default): pass one of them."
        )


def check_fused_spec(fused: object, spec: Reparametrization) -> None:
    """Raise :class:`OptionError` when a fused path is asked for (``fused`` True or ``"auto"``) with a
    reparametrization other than weight norm, the only one that has one."""
    if fused and not isinstance(spec, WeightNorm):
        raise OptionError(
            f"fused={fused!r} exists for weight norm only; {type(spec).__name__} has no fused path. "
            f"Drop fused={fused!r}."
        )
