"""Conformance adapters for the MindSpore backend: GRAPH_MODE and PYNATIVE_MODE.

Both adapters build the catalogue's layers as ``mindspore.nn`` layers computing what the torch layer of
the same :class:`~xnorm.conformance.cases.LayerCase` computes, wrap them with :func:`xnorm.wrap` and
translate between MindSpore's storage layout and the canonical one (:func:`storage_layout`).

Building layers with torch's semantics
    Symmetric padding becomes ``pad_mode="pad"`` with the per-axis pairs. ``output_padding`` of a
    transposed convolution is *not* MindSpore's ``output_padding`` (Conv2dTranspose appends zeros after
    the bias; Conv1dTranspose has none): torch computes those positions, which is a crop of ``p``
    before and ``p - output_padding`` after the full transposed convolution. The adapter builds such a
    layer with that asymmetric padding on the layer's own primitive (``_asymmetric_transpose``), which
    is the only way MindSpore 2.10 expresses it; Conv3dTranspose's primitive takes torch's
    ``output_padding`` directly.

dtypes on the CPU (MindSpore 2.10)
    float32 runs every layer. float64 runs Dense and Embedding up to training: MindSpore's CPU
    convolution kernels (Conv2D, Conv3D, Conv2DBackpropInput, Conv2DTranspose, Conv3DTranspose) and the
    SGD kernel reject float64, see ``expected_failures/mindspore-*.toml``. bfloat16 is not offered:
    MatMul and every convolution kernel reject it on the CPU. float16 runs but is not offered either:
    MindSpore's CPU float16 convolutions miss the float16 row of the tolerance table already for the
    plain, unwrapped layer (about 5x the allowed error on conv2d), so that row needs measuring first;
    tests/mindspore/test_float16.py and test_spectral.py check the wrappers' float16 arithmetic against
    the spec.

Reparametrizations
    Weight norm in every adapter; spectral norm and the orthogonal parametrization in GRAPH_MODE and
    PYNATIVE_MODE (the fused adapter reports their cases not run: fused is a weight-norm path). Their
    state (u, v; base) is read as copies and written in place (:func:`_assign`), where the compiled
    graphs read it. The fine-tuning case of ``xnorm.freeze`` (:meth:`_MindSporeAdapter.fine_tune`) runs in
    GRAPH_MODE and PYNATIVE_MODE at float32; its float64 case stops at the CPU Conv2D kernel (an expected
    failure).

Devices
    "cpu" always; "gpu"/"ascend" when MindSpore's package supports them here. MindSpore fixes its
    device for the whole process once a kernel ran, so after the first device is set up the others
    report unavailable (run them in another process: ``pytest conformance --backend mindspore
    --device gpu``).
"""

from __future__ import annotations

import gc
import os
import tempfile
import weakref
from typing import Any, Dict, List, Optional, Tuple

import mindspore
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

import xnorm
from xnorm._backends.mindspore import ReparametrizedCell, WeightNormCell, _dtype_name, _storage_layout
from xnorm._backends.mindspore.orthogonal import OrthogonalCell
from xnorm._backends.mindspore.spectral import SpectralNormCell
from xnorm.spec import LayerKind, Reparametrization, StorageLayout

from .. import fine_tuning
from ..adapter import Adapter
from ..cases import LayerCase

__all__ = ["MindSporeGraphAdapter", "MindSporePyNativeAdapter", "MindSporeGraphFusedAdapter", "build_mindspore_layer",
           "storage_layout"]

_DTYPES = {"float16": mindspore.float16, "float32": mindspore.float32, "float64": mindspore.float64,
           "bfloat16": mindspore.bfloat16}
_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
# The device this process committed to (MindSpore cannot switch devices once kernels ran).
_COMMITTED: Dict[str, str] = {}


def storage_layout(layer: LayerCase) -> StorageLayout:
    """MindSpore's storage layout of a catalogue layer's weight."""
    ndim = len(layer.weight_shape)
    if layer.kind in ("conv1d", "conv_transpose1d"):
        return _storage_layout(layer.kind, ndim + 1)
    return StorageLayout.identity(ndim)


def _device_available(device: str) -> bool:
    if device == "cpu":
        return True
    try:
        module = getattr(mindspore.device_context, device)
        return bool(module.device.is_available())
    except Exception:  # a package without the plugin: the device is not available here
        return False


def _asymmetric_transpose1d(cell: nn.Cell, before: int, after: int) -> None:
    """Make a Conv1dTranspose crop ``before`` and ``after`` (torch's ``padding`` plus ``output_padding``):
    its constructor takes one symmetric padding, so the public ``padding`` (which xnorm's wrapper reads)
    and the plain layer's own primitive are both set here."""
    cell.padding = (0, 0, before, after)
    old = cell.conv2d_transpose
    cell.conv2d_transpose = ops.Conv2DBackpropInput(
        out_channel=old.out_channel, kernel_size=old.kernel_size, mode=1, pad_mode="pad", pad=cell.padding,
        stride=old.stride[2:] if len(old.stride) == 4 else old.stride,
        dilation=old.dilation[2:] if len(old.dilation) == 4 else old.dilation, group=old.group,
    )


def build_mindspore_layer(layer: LayerCase, dtype) -> nn.Cell:
    """The ``mindspore.nn`` layer computing what the torch layer of ``layer`` computes (values are
    random; the adapter overwrites them)."""
    kind = layer.kind
    if kind == LayerKind.LINEAR:
        return nn.Dense(layer.weight_shape[1], layer.weight_shape[0], has_bias=layer.bias, dtype=dtype)
    if kind == LayerKind.EMBEDDING:
        table = Tensor(np.zeros(layer.weight_shape, dtype=np.float32)).astype(dtype)
        return nn.Embedding(*layer.weight_shape, embedding_table=table)
    n = layer.spatial
    pairs = [(p, p) for p in layer.padding]
    common = dict(pad_mode="pad", group=layer.groups, has_bias=layer.bias, dtype=dtype)
    if kind in LayerKind.CONV:
        if n == 1:
            return nn.Conv1d(layer.in_channels, layer.out_channels, layer.kernel_size[0], stride=layer.stride[0],
                             padding=layer.padding[0], dilation=layer.dilation[0], **common)
        cls = nn.Conv2d if n == 2 else nn.Conv3d
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                   padding=tuple(p for pair in pairs for p in pair), dilation=layer.dilation, **common)
    if n == 3:
        return nn.Conv3dTranspose(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                  padding=tuple(p for pair in pairs for p in pair), dilation=layer.dilation,
                                  output_padding=layer.output_padding, **common)
    crops = [(p, p - op) for p, op in zip(layer.padding, layer.output_padding, strict=True)]
    if any(after < 0 for _, after in crops):
        raise NotImplementedError(f"{layer.label}: output_padding larger than padding has no MindSpore equivalent")
    if n == 1:
        cell = nn.Conv1dTranspose(layer.in_channels, layer.out_channels, layer.kernel_size[0],
                                  stride=layer.stride[0], padding=layer.padding[0], dilation=layer.dilation[0],
                                  **common)
        if any(layer.output_padding):
            _asymmetric_transpose1d(cell, *crops[0])
        return cell
    # Conv2dTranspose takes (top, bottom, left, right): the crops torch's output_padding leaves
    return nn.Conv2dTranspose(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=tuple(p for pair in crops for p in pair), dilation=layer.dilation, **common)


def _tensor(array: np.ndarray, dtype: str) -> Tensor:
    """A MindSpore tensor of ``dtype`` holding ``array`` (already representable in ``dtype``)."""
    host = np.ascontiguousarray(array, dtype=np.float64 if dtype == "float64" else np.float32)
    return Tensor(host).astype(_DTYPES[dtype])


def _to_numpy(tensor) -> np.ndarray:
    """A float64 copy: ``asnumpy()`` of a float64 Parameter is a view of its memory, which a later
    training-mode call (spectral norm's state) or optimizer step overwrites in place."""
    if tensor.dtype in (mindspore.float16, mindspore.bfloat16):
        tensor = tensor.astype(mindspore.float32)
    return np.array(tensor.asnumpy(), dtype=np.float64, copy=True)


def _canonical(array: np.ndarray, layout: StorageLayout) -> np.ndarray:
    if array.ndim == 0:  # g of dim=None
        return array
    return layout.to_canonical(array)


# Cell attributes about an instance (identity, mode, compile bookkeeping) rather than what it
# computes; _structure leaves them out, and the wrapped layer, which wrap() compares by identity.
_CELL_BOOKKEEPING = frozenset({"_create_time", "_id", "arguments_key", "_compile_cache", "_phase_cache", "_compiled",
                               "_compile_phase", "training", "_phase", "_xnorm_layer"})


def _describe(value) -> tuple:
    if isinstance(value, Parameter):
        return ("Parameter", value.name, tuple(value.shape), str(value.dtype), value.requires_grad)
    if isinstance(value, nn.Cell):
        return _structure(value)
    if isinstance(value, dict):
        return ("dict",) + tuple((key, _describe(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_describe(item) for item in value)
    # Primitives show their attributes; an object whose repr is its address never matches another.
    return (type(value).__qualname__, repr(value))


def _structure(cell: nn.Cell) -> tuple:
    """Everything ``cell`` computes with, as a hashable value: its class, every attribute (xnorm's dim,
    axes, eps, fused side; the layer's primitives with their attributes and its constants) and its
    parameters' names, shapes, dtypes and requires_grad; not the parameters' values, not its identity.
    Two wrappers of the same layer with equal structures compile to the same graphs."""
    return (type(cell).__qualname__,) + tuple(
        (name, _describe(value)) for name, value in sorted(vars(cell).items()) if name not in _CELL_BOOKKEEPING)


def _copy_values(source: nn.Cell, target: nn.Cell) -> None:
    """Give every parameter of ``target`` an exact copy of the value of ``source``'s parameter of that name."""
    targets = dict(target.parameters_and_names())
    sources = dict(source.parameters_and_names())
    if sorted(targets) != sorted(sources):
        raise RuntimeError(f"parameters {sorted(sources)} cannot be copied onto {sorted(targets)}")
    for name, param in sources.items():
        if targets[name] is not param:  # a bias the layer shares with both wrappers is already in place
            _assign(targets[name], Tensor(param.asnumpy().copy()))


def _assign(param: Parameter, value: Tensor) -> None:
    """Write ``value`` into the memory of ``param``, in place.

    Not ``set_data``: that gives the Parameter new storage, which a Cell's compiled graph picks up but a
    compiled ``mindspore.jit`` function that captured the Parameter does not (MindSpore 2.10): a reused
    wrapper's gradient and train-step graphs would go on computing with the earlier case's values.
    """
    if value.shape != param.shape or value.dtype != param.dtype:
        raise ValueError(f"{param.name}: cannot write a {value.dtype} {value.shape} into a {param.dtype} {param.shape}")
    ops.assign(param, value)


#: MindSpore's switch (read once per process, at the first operation it dispatches) that runs the work of its
#: front-end queue on the calling thread instead of handing it to a ``frontend_queue`` thread
HOST_BLOCKING_RUN = "MS_DEV_HOST_BLOCKING_RUN"


def dispatch_on_calling_thread() -> None:
    """Have MindSpore run its front-end tasks on the calling thread, unless the environment already says
    otherwise; effective only before the process's first MindSpore operation.

    Why: with the default hand-over, reading a result (``asnumpy``) busy-waits in ``AsyncRQueue::Wait``
    (a loop polling the queue, no sleep) while the ``frontend_queue`` thread runs the task; on a 2-core
    machine with two adapter processes side by side the spinning thread takes the core the worker needs.
    After each newly compiled train step that cost 20 to 40 ms per step for ten or more steps. Measured
    on this project's 2-core machine (2026-12-03), ``xnorm conformance --backend mindspore``: 256 s ->
    184 s wall, 505 -> 348 CPU seconds, every saved array of the four adapters bit-equal both ways (the
    same kernels run in the same order); tests/mindspore/test_host_blocking_run.py checks that too.
    """
    os.environ.setdefault(HOST_BLOCKING_RUN, "1")


def launch_synchronously() -> None:
    """Launch every MindSpore operation synchronously from now on in this process (it cannot be undone)."""
    blocking = getattr(getattr(mindspore, "runtime", None), "launch_blocking", None)
    if blocking is not None:
        blocking()
    else:  # pragma: no cover - MindSpore releases before mindspore.runtime
        mindspore.set_context(pynative_synchronize=True)


#: the parameter dtypes of MindSpore 2.10's SGD kernel (nn.SGD raises TypeError for float64 ones)
_SGD_DTYPES = (mindspore.float16, mindspore.float32)


def _initial_state(handle: nn.Cell, optimizer: nn.Optimizer) -> List[Tuple[Parameter, np.ndarray]]:
    """The optimizer's own state as created (global_step, learning_rate, momentum, accum.*, stat.*), restored
    when a later case reuses the wrapper (``_reset_optimizer``)."""
    network = {id(param) for param in handle.trainable_params()}
    return [(param, param.asnumpy().copy()) for _, param in optimizer.parameters_and_names()
            if id(param) not in network]


class _TrainingProgram:
    """One ``mindspore.jit`` program for a wrapper's gradient check and its SGD steps, as the Flax
    adapters have: compiling is most of a GRAPH_MODE case, and the two share the forward and the
    backward. It takes the gradient of ``probe * sum(y * dL/dy) + fit * mean((y - target)**2) / 2``
    over the trainable parameters and applies ``nn.SGD`` (momentum 0) with the learning rate held in
    the optimizer's ``learning_rate`` Parameter, which the graph reads when it runs:

    * the gradient check: probe 1, fit 0, target 0, learning rate 0, so the parameters stay as they
      are (``p - 0 * g``; a gradient that is not finite fails the check before any training step);
    * a training step: probe 0, fit 1, dL/dy 0, the step's learning rate.

    A term multiplied by 0 contributes exact zeros, so each call computes what a program of its own
    computed: over MindSpore's whole catalogue (2026-12-03) every saved gradient and trained tensor was
    bit-equal to the two programs' it replaces, and the catalogue ran in 154 s instead of 174 s.
    """

    def __init__(self, handle: nn.Cell) -> None:
        self.optimizer = nn.SGD(handle.trainable_params(), learning_rate=0.0)  # momentum 0, no weight decay
        self.parameters = list(self.optimizer.parameters)
        self.dtype = self.parameters[0].dtype

        def objective(data, weight_of_output, target, probe, fit):
            y = handle(data)
            diff = y - target
            return probe * (y * weight_of_output).sum() + fit * (0.5 * (diff * diff).mean())

        grad_fn = mindspore.value_and_grad(objective, None, self.optimizer.parameters)

        def step(data, weight_of_output, target, probe, fit):
            _, grads = grad_fn(data, weight_of_output, target, probe, fit)
            self.optimizer(grads)
            return grads

        self.step = mindspore.jit(step)
        self.initial = _initial_state(handle, self.optimizer)

    def _scalar(self, value: float) -> Tensor:
        return Tensor(np.asarray(value, dtype=np.float32)).astype(self.dtype)

    @staticmethod
    def _zeros(like: Tensor) -> Tensor:
        return Tensor(np.zeros(like.shape, dtype=np.float32)).astype(like.dtype)

    def _rate(self, value: float) -> None:
        _assign(self.optimizer.learning_rate, Tensor(np.asarray(value, dtype=np.float32)))

    def gradients(self, data: Tensor, weight_of_output: Tensor):
        self._rate(0.0)
        return self.step(data, weight_of_output, self._zeros(weight_of_output), self._scalar(1.0),
                         self._scalar(0.0))

    def train(self, data: Tensor, target: Tensor, lr: float) -> None:
        self._rate(lr)
        self.step(data, self._zeros(target), target, self._scalar(0.0), self._scalar(1.0))


class _MindSporeAdapter(Adapter):
    """The life cycle of both modes. In GRAPH_MODE most of a case's time is graph compilation, and
    MindSpore compiles per Cell object (its graph key holds the Cell's ``id`` and ``create_time``) and
    per ``mindspore.jit`` function object, so graphs are reused only by reusing the objects:

    * Plain layers. ``build`` hands out an idle layer of the same configuration and dtype when there is
      one. Layers become idle in ``remove``, the last step of a case: the runner builds and wraps nothing
      after it. Idle layers are handed out oldest first, so each case's plain layer is the previous case's
      plain layer, which ``xnorm.remove`` made recompile for the removed-layer check: that graph serves
      this case's plain forward. The removed-layer graph itself is compiled anew in every case, since
      ``xnorm.remove`` gives the layer a new compile key.
    * Wrappers. ``wrap`` always calls ``xnorm.wrap``. When xnorm.wrap made a wrapper of the same layer
      object in an earlier case and both have the same :func:`_structure` (``dim=-2`` and ``dim=0`` of a
      Linear, ``dim=-1`` and ``dim=None``: 19 of the 69 cases), the earlier wrapper is returned with the
      new one's values, so its forward, eval, gradient and train-step graphs are reused.

    Why no value leaks between cases: a layer or wrapper is handed out only while no case holds it
    (layers from ``remove`` to the next ``build``; a wrapper once per hand-out of its layer); ``build``
    overwrites every parameter of the layer (a layer has no other state); a reused wrapper gets exact
    copies of all parameters of the wrapper xnorm.wrap has just made; and its optimizer's state
    (global_step, accum, stat...) is restored to the values it had when created. Values reach reused
    objects in place (:func:`_assign`), where their compiled graphs read them. The two layers of one
    case (the plain one and the fresh one of the state check) are two hand-outs, hence two objects, and
    so are their wrappers and parameters: the state check still loads into a different wrapper.
    PYNATIVE_MODE compiles nothing of this and builds and wraps afresh every time.
    """

    backend = "mindspore"
    reparametrizations = ("weight_norm", "spectral_norm", "orthogonal", "freeze")
    dtypes = ("float32", "float64")
    dtype_reasons = {
        "bfloat16": "MindSpore 2.10's CPU MatMul and convolution kernels reject bfloat16",
        "float16": "MindSpore 2.10's CPU float16 convolutions miss the tolerance table's float16 row for the plain "
        "layer (about 5x on conv2d); that row needs measuring first",
    }
    devices = ("cpu", "gpu", "ascend")
    mode: int = mindspore.GRAPH_MODE

    def __init__(self) -> None:
        self._layouts: weakref.WeakKeyDictionary[nn.Cell, StorageLayout] = weakref.WeakKeyDictionary()
        self._steps: weakref.WeakKeyDictionary[nn.Cell, Any] = weakref.WeakKeyDictionary()
        self._grad_steps: weakref.WeakKeyDictionary[nn.Cell, Any] = weakref.WeakKeyDictionary()
        self._device = "cpu"
        # GRAPH_MODE reuse of compiled layers and wrappers across cases (see the class docstring).
        # (layer, dtype) of every layer build() made:
        self._layer_keys: weakref.WeakKeyDictionary[nn.Cell, Tuple[LayerCase, str]] = weakref.WeakKeyDictionary()
        # layers no case holds, by (layer, dtype), oldest first:
        self._idle_layers: Dict[Tuple[LayerCase, str], List[nn.Cell]] = {}
        # layers build() handed out since the last remove(), in order:
        self._handed_out: List[nn.Cell] = []
        # the wrappers xnorm.wrap made of each layer, by structure (_structure):
        self._wrappers_of: weakref.WeakKeyDictionary[nn.Cell, Dict[tuple, nn.Cell]] = weakref.WeakKeyDictionary()
        # wrappers wrap() returned since their layer was last handed out:
        self._wrappers_in_use: weakref.WeakSet[nn.Cell] = weakref.WeakSet()

    def versions(self) -> Dict[str, str]:
        return {"mindspore": mindspore.__version__, "numpy": np.__version__}

    def supports_device(self, device: str) -> bool:
        committed = _COMMITTED.get("device")
        return _device_available(device) and (committed is None or committed == device)

    def setup(self, device: str) -> None:
        dispatch_on_calling_thread()
        if _COMMITTED.get("device") is None:
            try:
                mindspore.set_device(_TARGETS[device])
            except RuntimeError:
                # Kernels already ran in this process (on the default device): fine if it is this one.
                if mindspore.get_context("device_target") != _TARGETS[device]:
                    raise
            _COMMITTED["device"] = device
        mindspore.set_context(mode=self.mode)
        self._device = device
        # MindSpore runs a full gc.collect() before every graph compile (graph/api.py, compile), 0.1 to 0.15 s
        # here with MindSpore's 160,000 import-time objects: 30% of a GRAPH_MODE case. Freezing what exists
        # now (modules, functions, and what adapters set up earlier in this process left alive) leaves only
        # each case's own objects to scan.
        gc.collect()
        gc.freeze()

    # -- life cycle -------------------------------------------------------------------------------
    def build(self, layer: LayerCase, weight: np.ndarray, bias: Optional[np.ndarray], dtype: str) -> nn.Cell:
        """A plain layer holding ``weight`` and ``bias``: in GRAPH_MODE an idle one of the same layer
        configuration and dtype when there is one (see the class docstring), else a new one."""
        key = (layer, dtype)
        idle = self._idle_layers.get(key) if self._reuse else None
        reused = bool(idle)
        if reused:
            cell = idle.pop(0)  # oldest first: each case's first build gets the last case's first layer
            for wrapper in self._wrappers_of.get(cell, {}).values():
                self._wrappers_in_use.discard(wrapper)
        else:
            cell = build_mindspore_layer(layer, _DTYPES[dtype])
            self._layer_keys[cell] = key
        if self._reuse:
            self._handed_out.append(cell)
        layout = storage_layout(layer)
        name = "embedding_table" if layer.kind == LayerKind.EMBEDDING else "weight"
        params = dict(cell.parameters_and_names())
        if sorted(params) != sorted([name] + (["bias"] if bias is not None else [])):
            raise RuntimeError(f"{layer.label}: the plain layer has parameters {sorted(params)}")
        # Every parameter is overwritten: a reused layer keeps nothing of an earlier case. A reused one is
        # written in place, since the graphs of its wrappers' jit functions may hold its bias (_assign).
        put = _assign if reused else Parameter.set_data
        put(params[name], _tensor(layout.to_storage(np.asarray(weight)), dtype))
        if bias is not None:
            put(params["bias"], _tensor(bias, dtype))
        self._layouts[cell] = layout
        return cell

    #: passed to xnorm.wrap as fused=; True only in the fused adapters.
    fused: bool = False

    @property
    def _reuse(self) -> bool:
        return self.mode == mindspore.GRAPH_MODE

    def wrap(self, handle: nn.Cell, spec: Reparametrization) -> nn.Cell:
        """``xnorm.wrap(handle, spec)`` (a spectral-norm wrapper starts in training mode, as the protocol's
        wraps are). In GRAPH_MODE, when xnorm.wrap made a wrapper of this very layer with the same
        structure in an earlier case (``dim=-2`` and ``dim=0`` of a Linear, ``dim=-1`` and ``dim=None``;
        spectral norm's ``dim=None`` and its resolved value), that wrapper is returned instead, holding the
        values the new one was created with (every parameter, spectral norm's state included, copied
        exactly) and with its optimizer back in its initial state. A weight-norm and a spectral-norm
        wrapper never share a structure: the class is part of it."""
        wrapped = xnorm.wrap(handle, spec, fused=self.fused)
        self._layouts[wrapped] = self._layouts[handle]
        if not self._reuse or handle not in self._layer_keys:
            return wrapped
        structure = _structure(wrapped)
        mine = self._wrappers_of.setdefault(handle, {})
        earlier = mine.get(structure)
        if earlier is not None and earlier not in self._wrappers_in_use:
            _copy_values(wrapped, earlier)
            self._reset_optimizer(earlier)
            wrapped = earlier
        elif earlier is None:
            mine[structure] = wrapped
        self._wrappers_in_use.add(wrapped)
        return wrapped

    def remove(self, handle: nn.Cell) -> nn.Cell:
        layout = self._layouts[handle]
        plain = xnorm.remove(handle)
        self._layouts[plain] = layout
        if self._reuse:
            # The runner builds and wraps nothing after remove in a case: every layer handed out since
            # the last remove (this case's, and those of a case that failed before its remove) is idle.
            for cell in self._handed_out:
                self._idle_layers.setdefault(self._layer_keys[cell], []).append(cell)
            self._handed_out.clear()
        return plain

    # -- observation ------------------------------------------------------------------------------
    def _tensors(self, handle: nn.Cell) -> Dict[str, Parameter]:
        """The trainable parameters by the protocol's neutral names (``spec.tensors``, ``"bias"``; ``"weight"``
        for a plain layer), in MindSpore's storage layout."""
        if isinstance(handle, WeightNormCell):
            out = {"g": getattr(handle, handle.wrapped_name + "_g"), "v": getattr(handle, handle.wrapped_name + "_v")}
        elif isinstance(handle, (SpectralNormCell, OrthogonalCell)):
            out = {"original": getattr(handle, handle.wrapped_name + "_orig")}
        elif isinstance(handle, nn.Embedding):
            out = {"weight": handle.embedding_table}
        else:
            out = {"weight": handle.weight}
        if isinstance(getattr(handle, "bias", None), Parameter):
            out["bias"] = handle.bias
        return out

    def parameters(self, handle: nn.Cell) -> Dict[str, np.ndarray]:
        layout = self._layouts[handle]
        out = {}
        for key, param in self._tensors(handle).items():
            value = _to_numpy(param)
            out[key] = value if key == "bias" else _canonical(value, layout)
        return out

    def _weight_dtype(self, handle: nn.Cell):
        """The dtype of the layer's weight: inputs, dL/dy and targets are given in it."""
        tensors = self._tensors(handle)
        return tensors["weight"].dtype if "weight" in tensors else next(iter(tensors.values())).dtype

    def state(self, handle: nn.Cell) -> Dict[str, np.ndarray]:
        """Spectral norm's ``{"u", "v"}`` (1-D: the same in every layout) or the orthogonal ``{"base"}``
        (canonical layout), copied; ``{}`` otherwise."""
        if isinstance(handle, OrthogonalCell):
            keys = ("base",) if handle.use_trivialization else ()
        elif isinstance(handle, SpectralNormCell) and handle.matrix_shape is not None:
            keys = ("u", "v")
        else:
            return {}
        return {key: _to_numpy(getattr(handle, f"{handle.wrapped_name}_{key}")) for key in keys}

    def set_state(self, handle: nn.Cell, state: Dict[str, np.ndarray]) -> nn.Cell:
        """Write ``state`` into its parameters in place (:func:`_assign`), where compiled graphs read them."""
        for key, value in state.items():
            param = getattr(handle, f"{handle.wrapped_name}_{key}")
            _assign(param, _tensor(value, _dtype_name(param.dtype)))
        return handle

    def parameter_names(self, handle: nn.Cell) -> List[str]:
        return [param.name for param in handle.get_parameters()]

    def weight(self, handle: nn.Cell) -> np.ndarray:
        layout = self._layouts[handle]
        if isinstance(handle, ReparametrizedCell):  # spectral norm: eval mode, the state does not move
            return layout.to_canonical(_to_numpy(handle.compute_weight()))
        return layout.to_canonical(_to_numpy(self._tensors(handle)["weight"]))

    def _input(self, handle: nn.Cell, x: np.ndarray) -> Tensor:
        if np.issubdtype(np.asarray(x).dtype, np.integer):
            return Tensor(np.asarray(x, dtype=np.int32))
        dtype = self._weight_dtype(handle)
        return Tensor(np.asarray(x, dtype=np.float32)).astype(dtype) if dtype != mindspore.float64 else Tensor(
            np.asarray(x, dtype=np.float64))

    def forward(self, handle: nn.Cell, x: np.ndarray, *, training: bool = True) -> np.ndarray:
        handle.set_train(training)
        try:
            return _to_numpy(handle(self._input(handle, x)))
        finally:
            handle.set_train(True)

    def gradients(self, handle: nn.Cell, x: np.ndarray, grad_output: np.ndarray) -> Dict[str, np.ndarray]:
        tensors = self._tensors(handle)
        keys = list(tensors)
        dtype = self._weight_dtype(handle)
        seed = _tensor(grad_output, _dtype_name(dtype))
        program = self._training_program(handle)
        if program is not None and all(any(tensors[k] is p for p in program.parameters) for k in keys):
            grads = program.gradients(self._input(handle, x), seed)
            found = [next(g for p, g in zip(program.parameters, grads, strict=True) if p is tensors[k]) for k in keys]
        else:
            found = self._gradient_step(handle, keys, tensors)(self._input(handle, x), seed)
        layout = self._layouts[handle]
        return {key: (_to_numpy(grad) if key == "bias" else _canonical(_to_numpy(grad), layout))
                for key, grad in zip(keys, found, strict=True)}

    def _gradient_step(self, handle: nn.Cell, keys: List[str], tensors: Dict[str, Parameter]):
        """The gradient check's own program, where the training program cannot serve (PYNATIVE_MODE,
        float64): ``grad`` of ``sum(y * dL/dy)`` over ``tensors``."""
        step = self._grad_steps.get(handle)
        if step is None:
            def objective(data, weight_of_output):
                return (handle(data) * weight_of_output).sum()

            grad_fn = mindspore.grad(objective, grad_position=None, weights=[tensors[k] for k in keys])

            def gradient_step(data, weight_of_output):
                return grad_fn(data, weight_of_output)

            step = mindspore.jit(gradient_step) if self.mode == mindspore.GRAPH_MODE else gradient_step
            self._grad_steps[handle] = step
        return step

    def _training_program(self, handle: nn.Cell) -> Optional[_TrainingProgram]:
        """``handle``'s one compiled program for the gradient check and the SGD steps, in GRAPH_MODE at
        the dtypes MindSpore's SGD kernel takes; None elsewhere (PYNATIVE_MODE compiles nothing; a
        float64 SGD raises, and the gradient check must still run there)."""
        if self.mode != mindspore.GRAPH_MODE or self._weight_dtype(handle) not in _SGD_DTYPES:
            return None
        program = self._steps.get(handle)
        if program is None:
            program = _TrainingProgram(handle)
            self._steps[handle] = program
        return program

    def _train_step(self, handle: nn.Cell, lr: float):
        program = self._training_program(handle)
        if program is not None:
            return lambda data, target: program.train(data, target, lr)
        cached = self._steps.get(handle)
        if cached is not None and cached[0] == lr:
            return cached[1]
        optimizer = nn.SGD(handle.trainable_params(), learning_rate=lr)  # momentum 0, no weight decay

        def loss_fn(data, target):
            diff = handle(data) - target
            return 0.5 * (diff * diff).mean()

        grad_fn = mindspore.value_and_grad(loss_fn, None, optimizer.parameters)

        def train_step(data, target):
            loss, grads = grad_fn(data, target)
            optimizer(grads)
            return loss

        step = mindspore.jit(train_step) if self.mode == mindspore.GRAPH_MODE else train_step
        self._steps[handle] = (lr, step, _initial_state(handle, optimizer))
        return step

    def _reset_optimizer(self, handle: nn.Cell) -> None:
        """Put the optimizer of ``handle``'s train step (if it has one) back in its initial state."""
        cached = self._steps.get(handle)
        initial = cached.initial if isinstance(cached, _TrainingProgram) else cached[2] if cached else ()
        for param, value in initial:
            _assign(param, Tensor(value.copy()))

    def sgd_step(self, handle: nn.Cell, x: np.ndarray, target: np.ndarray, lr: float) -> nn.Cell:
        step = self._train_step(handle, lr)
        dtype = _dtype_name(self._weight_dtype(handle))
        step(self._input(handle, x), _tensor(target, dtype))
        return handle

    def state_roundtrip(self, handle: nn.Cell, fresh: nn.Cell) -> nn.Cell:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "state.ckpt")
            mindspore.save_checkpoint(handle, path)
            not_loaded, _ = mindspore.load_param_into_net(fresh, mindspore.load_checkpoint(path), strict_load=True)
        if not_loaded:
            raise RuntimeError(f"parameters not found in the checkpoint: {not_loaded}")
        return fresh

    def fine_tune(self, run: fine_tuning.FineTuningRun) -> List[Dict[str, np.ndarray]]:
        from .mindspore_fine_tuning import fine_tune  # it builds on this module

        return fine_tune(run, self.mode)

class MindSporeGraphAdapter(_MindSporeAdapter):
    """GRAPH_MODE: every forward, gradient and training step runs as a compiled graph; the training
    step is a ``mindspore.jit`` function of ``value_and_grad`` and ``nn.SGD``."""

    name = "mindspore-graph"
    mode = mindspore.GRAPH_MODE


class MindSporePyNativeAdapter(_MindSporeAdapter):
    """PYNATIVE_MODE: the same life cycle, run eagerly, each operation launched synchronously.

    MindSpore's default pipeline hands every PYNATIVE operation to runtime threads and returns before it
    ran; for this catalogue's small tensors on the CPU that hand-over costs far more than the kernels
    (a spectral-norm training step of a Dense(8, 6): 86 ms asynchronous, 5.5 ms synchronous, on this
    project's 2-core machine). Synchronous launching (``mindspore.runtime.launch_blocking``, for the
    rest of the process) runs the same kernels in the same order: tests/mindspore/test_pynative_launch.py
    checks that outputs, trained tensors and spectral norm's state are bit-equal both ways, and this
    adapter's whole catalogue gave every saved array bit-equal both ways (2026-12-02).
    """

    name = "mindspore-pynative"
    mode = mindspore.PYNATIVE_MODE

    def setup(self, device: str) -> None:
        super().setup(device)
        launch_synchronously()


class MindSporeGraphFusedAdapter(MindSporeGraphAdapter):
    """GRAPH_MODE with ``xnorm.wrap(..., fused=True)``: the same catalogue and tolerances, run through
    the path that scales the layer's output or input by ``g / ||v||`` instead of building ``w`` (and
    materialises ``w`` where :func:`xnorm.spec.fused_scale_side` says the algebra does not apply)."""

    name = "mindspore-graph-fused"
    fused = True
    reparametrizations = ("weight_norm",)
    reparametrization_reasons = {
        "spectral_norm": "fused=True is a weight-norm path; spectral norm has none",
        "orthogonal": "fused=True is a weight-norm path; the orthogonal parametrization has none",
        "freeze": fine_tuning.RUN_BY_THE_BACKEND_ADAPTER,
    }
