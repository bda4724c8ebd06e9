"""The census of bad inputs (issue 14): every documented error, the input that triggers it, its class and
message, per backend; docs/errors.md is rendered from this table.

The table is plain data and imports no framework, so tests/core (which runs in every environment) can check
that docs/errors.md is :func:`render_markdown`'s output. The inputs are built per backend by
:mod:`.error_subjects`, whose functions import their framework only when called:
``tests/<backend>/test_error_census.py`` walks every row that applies to its environment with :func:`check`,
which asserts the exact error class (not a subclass, not a superclass), the documented message fragment, and
that the layer, model, variables, checkpoint file or output folder is the same before and after, bit for bit.

Regenerate docs/errors.md after editing a row::

    python -m xnorm.conformance.error_census --write docs/errors.md

A fragment is what the documentation promises of the message; the message says more (the layer, the fix).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from xnorm.spec import Reparametrization  # imports no framework

__all__ = ["BACKENDS", "ROWS", "Row", "Subject", "rows_for", "check", "render_markdown"]

#: The environments a row is checked in; linen and NNX are two columns of the Flax environment.
BACKENDS = ("torch", "mindspore", "flax-linen", "flax-nnx")
TITLES = {"torch": "torch", "mindspore": "MindSpore", "flax-linen": "Flax linen", "flax-nnx": "Flax NNX"}


@dataclasses.dataclass
class Subject:
    """What a row's call receives in one backend, and how to see that nothing changed.

    ``obj`` is the layer, model, tensor or folder; ``wrap_kwargs`` are passed to wrap-like calls (linen's
    ``variables=``); ``remove_args`` to ``xnorm.remove`` (linen's variables); ``extra`` holds what the row
    needs besides (a checkpoint's path, the CLI's arguments). ``snapshot()`` returns a value that compares
    equal exactly when nothing the call could have touched has changed.
    """

    obj: Any
    snapshot: Callable[[], Any]
    wrap_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    remove_args: Tuple[Any, ...] = ()
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Row:
    """One documented mistake.

    ``subjects`` names, per backend, the subject the call is made on (see ``_SUBJECTS``); a backend
    missing from it must be in ``not_applicable`` with the reason. ``fragments`` overrides ``fragment``
    where a backend words the message differently; ``differences`` records a backend that raises
    another class today, as ``(error, fragment, reason)``, until it is settled.
    """

    id: str
    mistake: str
    call: str
    error: str
    fragment: str
    action: Callable[[Subject], Any] = dataclasses.field(repr=False, compare=False)
    subjects: Mapping[str, str]
    not_applicable: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fragments: Mapping[str, str] = dataclasses.field(default_factory=dict)
    differences: Mapping[str, Tuple[str, str, str]] = dataclasses.field(default_factory=dict)
    #: backend -> the call there, where it must differ (linen reports some mistakes at init, not at freeze)
    actions: Mapping[str, Callable[[Subject], Any]] = dataclasses.field(default_factory=dict, repr=False,
                                                                        compare=False)

    def expected(self, backend: str) -> Tuple[str, str]:
        """``(error class name, message fragment)`` this backend must raise."""
        if backend in self.differences:
            error, fragment, _ = self.differences[backend]
            return error, fragment
        return self.error, self.fragments.get(backend, self.fragment)


def _all(subject: str) -> Dict[str, str]:
    return {backend: subject for backend in BACKENDS}


def _but(subject: str, *left_out: str) -> Dict[str, str]:
    return {backend: subject for backend in BACKENDS if backend not in left_out}


def _xnorm():
    import xnorm

    return xnorm


def _wrap(**kwargs) -> Callable[[Subject], Any]:
    return lambda s: _xnorm().wrap(s.obj, **kwargs, **s.wrap_kwargs)


def _cli(s: Subject):
    """``xnorm convert`` as the command runs it, without main()'s translation of the error into exit
    status 2, so that the class can be checked; :func:`check` runs main() too."""
    from xnorm import cli

    return cli._convert(_cli_namespace(s.extra["argv"]))


def _cli_namespace(argv: Sequence[str]) -> argparse.Namespace:
    source, *rest = argv[1:]
    options = dict(zip(rest[::2], rest[1::2], strict=True))
    return argparse.Namespace(
        source=source, to=options["--to"], like=options["--like"], output=options["-o"], rename=None,
        like_arg=None, entry=None, cast=False, progress=False, quiet=True,
    )


@dataclasses.dataclass(frozen=True)
class _Unimplemented(Reparametrization):
    """A third party's reparametrization that no backend implements."""

    kind: ClassVar[str] = "unimplemented"


def _spec(spec: Any) -> Callable[[Subject], Any]:
    return lambda s: _xnorm().wrap(s.obj, spec, **s.wrap_kwargs)


NO_OTHER_FRAMEWORK = (
    "to='torch' converts a MindSpore or Flax checkpoint, and the torch environment has neither; the MindSpore "
    "and Flax environments check the torch direction (tests/mindspore, tests/flax test_convert.py)"
)
NO_OWN_WRAPPER = "MindSpore has no weight norm or spectral norm of its own to wrap over"
NOT_A_MATTER_OF_CLASS = "{} reparametrizes any layer with a floating parameter of its own (a custom layer, a subclass)"

ROWS: List[Row] = [
    # -- which layers ---------------------------------------------------------------------------------
    Row("batchnorm", "wrap a BatchNorm (its weight is a per-channel scale)", "xnorm.wrap(layer)",
        "UnsupportedLayerError", "cannot reparametrize", _wrap(), _all("batchnorm")),
    Row("normalization-by-name", "wrap a LayerNorm, naming its scale", "xnorm.wrap(layer, name=<its scale>)",
        "UnsupportedLayerError", "cannot reparametrize",
        lambda s: _xnorm().wrap(s.obj, name=s.extra["name"], **s.wrap_kwargs), _all("layernorm")),
    Row("no-parameters", "wrap a layer that holds no parameter (an activation, a dropout)", "xnorm.wrap(layer)",
        "UnsupportedLayerError", "cannot reparametrize", _wrap(), _all("parameterless")),
    Row("container", "wrap a container instead of the layer inside it", "xnorm.wrap(model)",
        "UnsupportedLayerError", "cannot reparametrize", _wrap(), _all("sequential")),
    Row("custom-layer", "wrap a layer class outside the backend's list", "xnorm.wrap(layer)",
        "UnsupportedLayerError", "supported layers (exact classes)", _wrap(), {"mindspore": "custom"},
        not_applicable={
            "torch": NOT_A_MATTER_OF_CLASS.format("torch"),
            "flax-linen": NOT_A_MATTER_OF_CLASS.format("Flax"),
            "flax-nnx": NOT_A_MATTER_OF_CLASS.format("Flax"),
        }),
    # -- which parameter ------------------------------------------------------------------------------
    Row("missing-name", "name a parameter the layer does not have", "xnorm.wrap(layer, name='nonexistent')",
        "MissingParameterError", "no parameter 'nonexistent'", _wrap(name="nonexistent"), _all("linear"),
        fragments={"flax-nnx": "no nnx.Param 'nonexistent'"}),
    Row("name-not-a-string", "name= that is not a string", "xnorm.wrap(layer, name=0)",
        "MissingParameterError", "has no parameter 0", _wrap(name=0), _all("linear"),
        fragments={"flax-linen": "name must be a parameter name (a str)",
                   "flax-nnx": "name must be a parameter name (a str)"}),
    Row("name-is-a-buffer", "name a buffer or statistic, not a parameter", "xnorm.wrap(layer, name=<a buffer>)",
        "MissingParameterError", "(it is a buffer, not a parameter)",
        lambda s: _xnorm().wrap(s.obj, name=s.extra["name"], **s.wrap_kwargs),
        {"torch": "buffer", "flax-nnx": "buffer"}, fragments={"flax-nnx": "no nnx.Param 'count'"},
        not_applicable={
            "mindspore": "the layers MindSpore supports hold no buffers (a BatchNorm's moving statistics are "
                         "refused as a normalization layer: row batchnorm)",
            "flax-linen": "linen variables outside 'params' are refused before name= is read "
                          "(UnsupportedLayerError: the linen wrapper carries 'params' only)",
        }),
    Row("non-floating", "wrap an integer parameter", "xnorm.wrap(layer)",
        "NonFloatingParameterError", "needs a floating weight", _wrap(), _all("integer")),
    # -- options --------------------------------------------------------------------------------------
    Row("dim-out-of-range", "dim outside the weight's axes", "xnorm.wrap(layer, dim=2)",
        "DimError", "out of range", _wrap(dim=2), _all("linear")),
    Row("dim-not-an-int", "dim of the wrong type", "xnorm.wrap(layer, dim=1.5)",
        "DimError", "dim must be an int or None", _wrap(dim=1.5), _all("linear")),
    Row("dim-bool", "dim=True (a bool is not an axis)", "xnorm.wrap(layer, dim=True)",
        "DimError", "got the bool True", _wrap(dim=True), _all("linear")),
    Row("negative-eps", "a negative eps", "xnorm.wrap(layer, eps=-1.0)",
        "OptionError", "eps must be None or a non-negative float", _wrap(eps=-1.0), _all("linear")),
    Row("power-iterations", "spectral norm with no power iteration", "xnorm.spectral_norm(layer, n_power_iterations=0)",
        "OptionError", "n_power_iterations must be an int >= 1",
        lambda s: _xnorm().spectral_norm(s.obj, n_power_iterations=0, **s.wrap_kwargs), _all("linear")),
    Row("orthogonal-map", "an orthogonal map that does not exist", "xnorm.orthogonal(layer, orthogonal_map='qr')",
        "OptionError", "orthogonal_map must be one of",
        lambda s: _xnorm().orthogonal(s.obj, orthogonal_map="qr", **s.wrap_kwargs), _all("linear")),
    Row("orthogonal-vector", "make a 1-D parameter orthogonal", "xnorm.orthogonal(layer, name='bias')",
        "DimError", "needs a matrix or a batch of matrices",
        lambda s: _xnorm().orthogonal(s.obj, name="bias", **s.wrap_kwargs), _all("linear")),
    Row("unknown-option", "a keyword option the backend does not take", "xnorm.wrap(layer, colour='red')",
        "OptionError", "colour", _wrap(colour="red"), _all("linear"),
        fragments={"torch": "takes no option(s) ['colour']", "mindspore": "takes no options besides fused=, got colour",
                   "flax-linen": "unknown option(s) for the flax backend: colour",
                   "flax-nnx": "unknown option(s) for the flax backend: colour"}),
    Row("fused-not-bool", "fused= that is neither a bool nor 'auto'", "xnorm.wrap(layer, fused='yes')",
        "OptionError", "fused must be True, False or 'auto'", _wrap(fused="yes"), _all("linear")),
    Row("fused-auto-not-torch", "fused='auto' outside torch", "xnorm.wrap(layer, fused='auto')",
        "OptionError", "fused='auto' is implemented by the torch backend only", _wrap(fused="auto"),
        _but("linear", "torch"), not_applicable={"torch": "torch implements fused='auto'"}),
    Row("fused-spectral", "fused=True with spectral norm", "xnorm.wrap(layer, xnorm.SpectralNorm(), fused=True)",
        "OptionError", "fused=True exists for weight norm only",
        lambda s: _xnorm().wrap(s.obj, _xnorm().SpectralNorm(), fused=True, **s.wrap_kwargs), _all("linear")),
    Row("dim-beside-spec", "dim= next to a spec instead of inside it", "xnorm.wrap(layer, xnorm.SpectralNorm(), dim=0)",
        "OptionError", "belong inside the spec",
        lambda s: _xnorm().wrap(s.obj, _xnorm().SpectralNorm(), dim=0, **s.wrap_kwargs), _all("linear")),
    Row("spec-not-a-spec", "a spec that is not a reparametrization", "xnorm.wrap(layer, 42)",
        "OptionError", "spec must be a reparametrization", _spec(42), _all("linear")),
    Row("spec-not-implemented", "a reparametrization the backend does not implement",
        "xnorm.wrap(layer, MyReparametrization())", "UnsupportedLayerError", "does not implement _Unimplemented",
        _spec(_Unimplemented()), _all("linear")),
    Row("bound-module", "wrap a linen module bound to its variables", "xnorm.wrap(module.bind(variables))",
        "UnsupportedLayerError", "is bound to variables", _wrap(), {"flax-linen": "bound"},
        not_applicable={b: "only linen modules are bound to variables" for b in ("torch", "mindspore", "flax-nnx")}),
    # -- backends -------------------------------------------------------------------------------------
    Row("unknown-backend", "a backend name that does not exist", "xnorm.wrap(layer, backend='keras')",
        "UnknownBackendError", "known backends", _wrap(backend="keras"), _all("linear")),
    Row("not-a-layer", "wrap a tensor instead of a layer", "xnorm.wrap(tensor, backend=<the framework>)",
        "BackendDetectionError", "cannot handle an object of type",
        lambda s: _xnorm().wrap(s.obj, backend=s.extra["backend"]), _all("tensor")),
    # -- wrap and remove twice ------------------------------------------------------------------------
    Row("wrapped-twice", "wrap a layer xnorm wrapped already", "xnorm.wrap(xnorm.wrap(layer))",
        "AlreadyWrappedError", "already", _wrap(), _all("wrapped"),
        fragments={"torch": "is already parametrized (by xnorm)", "mindspore": "is already weight-normalized by xnorm",
                   "flax-linen": "is already a reparametrization wrapper",
                   "flax-nnx": "is already a reparametrization wrapper"}),
    Row("framework-wrapped", "wrap a layer the framework's own weight norm wraps", "xnorm.wrap(layer)",
        "AlreadyWrappedError", "is already a reparametrization wrapper", _wrap(), _but("native-wrapped", "mindspore"),
        not_applicable={"mindspore": NO_OWN_WRAPPER},
        fragments={"torch": "is already parametrized (by another parametrization)"}),
    Row("remove-extra-arguments", "remove with an option no backend takes",
        "xnorm.remove(xnorm.wrap(layer), colour='red')",
        "OptionError", "takes no extra arguments",
        lambda s: _xnorm().remove(s.obj, *s.remove_args, colour="red"), _all("wrapped"),
        fragments={"mindspore": "does not take these arguments", "flax-linen": "takes no keyword options"}),
    Row("remove-unwrapped", "remove from a layer nothing wrapped", "xnorm.remove(layer)",
        "NotWrappedError", "nothing to remove", lambda s: _xnorm().remove(s.obj, *s.remove_args), _all("linear")),
    # -- freeze ---------------------------------------------------------------------------------------
    Row("freeze-twice", "freeze a model whose BatchNorms are frozen", "xnorm.freeze(xnorm.freeze(model))",
        "AlreadyFrozenError", "frozen already", lambda s: _xnorm().freeze(s.obj), _all("frozen")),
    Row("unfreeze-unfrozen", "unfreeze a model nothing froze", "xnorm.unfreeze(model)",
        "NotFrozenError", "so there is nothing to unfreeze", lambda s: _xnorm().unfreeze(s.obj), _all("bn-model")),
    Row("freeze-nothing", "freeze a model without a BatchNorm", "xnorm.freeze(layer)",
        "UnsupportedLayerError", "so there is nothing to freeze", lambda s: _xnorm().freeze(s.obj),
        _all("linear-module")),
    Row("freeze-affine", "affine= that is not a bool", "xnorm.freeze(model, affine='yes')",
        "OptionError", "affine must be True or False", lambda s: _xnorm().freeze(s.obj, affine="yes"),
        _all("bn-model")),
    Row("freeze-layers", "layers= of none of the accepted forms", "xnorm.freeze(model, layers=42)",
        "OptionError", "layers= takes None", lambda s: _xnorm().freeze(s.obj, layers=42), _all("bn-model")),
    Row("freeze-pattern", "layers= an invalid regular expression", "xnorm.freeze(model, layers='(')",
        "OptionError", "is not a valid regular expression", lambda s: _xnorm().freeze(s.obj, layers="("),
        _all("bn-model")),
    Row("freeze-layers-not-normalization", "layers= a type that is not a normalization layer",
        "xnorm.freeze(model, layers=<the Linear class>)", "OptionError", "which is not a normalization layer",
        lambda s: _xnorm().freeze(s.obj, layers=s.extra["linear_type"]), _all("bn-ln-model")),
    Row("freeze-stateless-selected", "layers= selecting a LayerNorm (no running statistics)",
        "xnorm.freeze(model, layers=<the LayerNorm class>)", "UnsupportedLayerError", "has no running statistics",
        lambda s: _xnorm().freeze(s.obj, layers=s.extra["layernorm_type"]), _all("bn-ln-model"),
        actions={"flax-linen": lambda s: s.extra["init"](_xnorm().freeze(s.obj, layers=s.extra["layernorm_type"]))}),
    Row("freeze-selects-nothing", "layers= a pattern that selects no layer", "xnorm.freeze(model, layers='^nothing$')",
        "OptionError", "selects no layer", lambda s: _xnorm().freeze(s.obj, layers="^nothing$"),
        _but("bn-ln-model", "flax-linen"),
        not_applicable={"flax-linen": "a linen model's layers exist only when it runs, so freeze cannot know the "
                                      "selection is empty; xnorm._backends.flax.freeze.frozen_labels raises "
                                      "OptionError for it (docs/freeze.md)"}),
    # -- convert --------------------------------------------------------------------------------------
    Row("convert-unknown-target", "convert to a framework that does not exist",
        "xnorm.convert(state_dict, to='keras', like=model)", "OptionError", "choose one of",
        lambda s: _xnorm().convert({}, to="keras", like=s.obj), _all("like")),
    Row("convert-missing-key", "a checkpoint without a tensor the model needs",
        "xnorm.convert(state_dict, to=<framework>, like=model)", "ConversionError",
        "(1 missing, 0 unexpected, 0 mismatched)",
        lambda s: _xnorm().convert(s.extra["source"], to=s.extra["to"], like=s.obj), _but("missing-key", "torch"),
        not_applicable={"torch": NO_OTHER_FRAMEWORK}),
    Row("convert-shape", "a checkpoint tensor of the wrong shape",
        "xnorm.convert(state_dict, to=<framework>, like=model)", "ConversionError",
        "(0 missing, 0 unexpected, 1 mismatched)",
        lambda s: _xnorm().convert(s.extra["source"], to=s.extra["to"], like=s.obj), _but("wrong-shape", "torch"),
        not_applicable={"torch": NO_OTHER_FRAMEWORK}),
    Row("convert-within-framework", "convert a checkpoint to the framework it is from",
        "xnorm.convert('model.<its format>', to=<its framework>, like=model)", "ConversionError",
        "between frameworks, not within one",
        lambda s: _xnorm().convert(str(s.extra["source"]), to=s.extra["to"], like=s.extra["like"]),
        _all("own-format")),
    Row("convert-pickled-code", "a .pt file whose unpickling would run code (it does not: no file appears)",
        "xnorm.convert('model.pt', to=<framework>, like=model)", "CheckpointFileError",
        "holds objects other than tensors",
        lambda s: _xnorm().convert(str(s.extra["source"]), to=s.extra["to"], like=s.extra["like"]),
        _but("pickled-code", "torch"), not_applicable={"torch": NO_OTHER_FRAMEWORK}),
    Row("convert-truncated-file", "a truncated checkpoint file",
        "xnorm.convert('model.pt', to=<framework>, like=model)",
        "CheckpointFileError", "cannot be read as a torch checkpoint (truncated or corrupt?)",
        lambda s: _xnorm().convert(str(s.extra["source"]), to=s.extra["to"], like=s.extra["like"]),
        _but("truncated", "torch"), not_applicable={"torch": NO_OTHER_FRAMEWORK}),
    # -- the command ----------------------------------------------------------------------------------
    Row("cli-truncated-file", "xnorm convert of a truncated checkpoint: no output file appears",
        "xnorm convert model.pt --to <framework> --like ... -o out", "CheckpointFileError",
        "cannot be read as a torch checkpoint (truncated or corrupt?)",
        _cli, _but("cli-truncated", "torch"), not_applicable={"torch": NO_OTHER_FRAMEWORK}),
    Row("cli-hostile-safetensors", "xnorm convert of a .safetensors whose header claims 2**62 bytes",
        "xnorm convert model.safetensors --to <framework> --like ... -o out", "CheckpointFileError",
        "not a valid .safetensors file", _cli, _but("cli-hostile-safetensors", "torch"),
        not_applicable={"torch": NO_OTHER_FRAMEWORK}),
    Row("cli-missing-source", "xnorm convert of a file that does not exist",
        "xnorm convert absent.pt --to <framework> --like ... -o out", "CheckpointFileError", "does not exist",
        _cli, _all("cli-missing-source")),
    Row("cli-output-suffix", "xnorm convert -o with the wrong suffix for the target",
        "xnorm convert model.pt --to <framework> --like ... -o out.txt", "OptionError", "checkpoint is written as",
        _cli, _all("cli-output-suffix")),
    Row("cli-output-is-source", "xnorm convert -o naming the source file",
        "xnorm convert model.<ext> --to <framework> --like ... -o model.<ext>", "OptionError", "is the source file",
        _cli, _all("cli-output-is-source")),
    Row("cli-output-folder", "xnorm convert -o in a folder that does not exist (it is not created)",
        "xnorm convert model.pt --to <framework> --like ... -o absent/out", "OptionError", "create it first",
        _cli, _all("cli-output-folder")),
]


def rows_for(backend: str) -> List[Row]:
    """The rows checked in ``backend``'s environment."""
    return [row for row in ROWS if backend in row.subjects]


# ------------------------------------------------------------------------------------------------
# What each subject is, in words (docs/errors.md) and as objects (the tests)
# ------------------------------------------------------------------------------------------------
#: subject -> backend -> the input, as docs/errors.md shows it
DESCRIPTIONS: Dict[str, Dict[str, str]] = {
    "linear": {"torch": "`nn.Linear(3, 2)`", "mindspore": "`nn.Dense(3, 2)`",
               "flax-linen": "`nn.Dense(2)`, `variables=` its variables", "flax-nnx": "`nnx.Linear(3, 2)`"},
    "batchnorm": {"torch": "`nn.BatchNorm1d(3)`", "mindspore": "`nn.BatchNorm1d(3)`",
                  "flax-linen": "`nn.BatchNorm()`", "flax-nnx": "`nnx.BatchNorm(3)`"},
    "layernorm": {"torch": "`nn.LayerNorm(3)`, `name='weight'`", "mindspore": "`nn.LayerNorm((3,))`, `name='gamma'`",
                  "flax-linen": "`nn.LayerNorm()`, `variables=` its variables, `name='scale'`",
                  "flax-nnx": "`nnx.LayerNorm(3)`, `name='scale'`"},
    "parameterless": {"torch": "`nn.ReLU()`", "mindspore": "`nn.ReLU()`",
                      "flax-linen": "`nn.Dropout(0.5, deterministic=True)`, `variables=` its variables (`{}`)",
                      "flax-nnx": "`nnx.Dropout(0.5)`"},
    "sequential": {"torch": "`nn.Sequential(nn.Linear(3, 2))`", "mindspore": "`nn.SequentialCell([nn.Dense(3, 2)])`",
                   "flax-linen": "`nn.Sequential([nn.Dense(2)])`, `variables=` its variables",
                   "flax-nnx": "`nnx.Sequential(nnx.Linear(3, 2))`"},
    "custom": {"mindspore": "a `Cell` subclass holding a `weight` Parameter"},
    "buffer": {"torch": "`nn.Linear(3, 2)` with a buffer `running`, `name='running'`",
               "flax-nnx": "an `nnx.Module` with an `nnx.Param` and an `nnx.BatchStat` `count`, `name='count'`"},
    "integer": {"torch": "`nn.Linear(3, 2)` whose weight is int32",
                "mindspore": "`nn.Dense(3, 2)` whose weight is int32",
                "flax-linen": "`nn.Dense(2)`, `variables=` with an int32 kernel",
                "flax-nnx": "`nnx.Linear(3, 2)` whose kernel is int32"},
    "tensor": {"torch": "`torch.ones(2, 3)`, `backend='torch'`", "mindspore": "`Tensor(np.ones((2, 3)))`, "
               "`backend='mindspore'`", "flax-linen": "`jnp.ones((2, 3))`, `backend='flax'`",
               "flax-nnx": "`jnp.ones((2, 3))`, `backend='flax'`"},
    "wrapped": {"torch": "`xnorm.wrap(nn.Linear(3, 2))`", "mindspore": "`xnorm.wrap(nn.Dense(3, 2))`",
                "flax-linen": "the wrapper of `xnorm.wrap(nn.Dense(2), variables=...)`, `variables=` its variables",
                "flax-nnx": "`xnorm.wrap(nnx.Linear(3, 2))`"},
    "native-wrapped": {"torch": "`torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))`",
                       "flax-linen": "`nn.WeightNorm(nn.Dense(2))`", "flax-nnx": "`nnx.WeightNorm(nnx.Linear(3, 2))`"},
    "bn-model": {"torch": "`nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))`",
                 "mindspore": "`nn.SequentialCell([nn.Dense(3, 3), nn.BatchNorm1d(3)])`",
                 "flax-linen": "`nn.BatchNorm(use_running_average=False)`", "flax-nnx": "`nnx.BatchNorm(3)`"},
    "frozen": {"torch": "the `bn-model` frozen", "mindspore": "the `bn-model` frozen",
               "flax-linen": "`xnorm.freeze(nn.BatchNorm(use_running_average=False))`",
               "flax-nnx": "`nnx.BatchNorm(3)` frozen"},
    "bound": {"flax-linen": "`nn.Dense(2).bind(variables)`"},
    "bn-ln-model": {"torch": "`nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.LayerNorm(3))`",
                    "mindspore": "`nn.SequentialCell([nn.Dense(3, 3), nn.BatchNorm1d(3), nn.LayerNorm((3,))])`",
                    "flax-linen": "a compact module calling `nn.BatchNorm` then `nn.LayerNorm` (for "
                                  "`freeze-stateless-selected`: raised by `init`)",
                    "flax-nnx": "an `nnx.Module` holding an `nnx.BatchNorm(3)` and an `nnx.LayerNorm(3)`"},
    "linear-module": {"torch": "`nn.Linear(3, 2)`", "mindspore": "`nn.Dense(3, 2)`", "flax-linen": "`nn.Dense(2)`",
                      "flax-nnx": "`nnx.Linear(3, 2)`"},
    "like": {"torch": "`like=nn.Linear(3, 2)`", "mindspore": "`like=nn.Dense(3, 2)`",
             "flax-linen": "`like=` the variables of `nn.Dense(2)`", "flax-nnx": "`like=nnx.Linear(3, 2)`"},
    "missing-key": {"mindspore": "torch's `{'weight'}` of a `Linear(3, 2)`, no `bias`; `like=nn.Dense(3, 2)`",
                    "flax-linen": "torch's `{'weight'}`, no `bias`; `like=` the variables of `nn.Dense(2)`",
                    "flax-nnx": "torch's `{'weight'}`, no `bias`; `like=nnx.Linear(3, 2)`"},
    "wrong-shape": {"mindspore": "torch's `Linear(4, 2)` state dict; `like=nn.Dense(3, 2)`",
                    "flax-linen": "torch's `Linear(4, 2)` state dict; `like=` the variables of `nn.Dense(2)` on 3 "
                                  "features",
                    "flax-nnx": "torch's `Linear(4, 2)` state dict; `like=nnx.Linear(3, 2)`"},
    "own-format": {"torch": "`model.safetensors`, `to='torch'`", "mindspore": "`model.ckpt`, `to='mindspore'`",
                   "flax-linen": "`model.msgpack`, `to='flax'`", "flax-nnx": "`model.msgpack`, `to='flax'`"},
    "pickled-code": {b: f"a pickle whose `__reduce__` calls `open(MARKER, 'w')`, `to='{b.split('-')[0]}'`"
                     for b in BACKENDS[1:]},
    "cli-hostile-safetensors": {b: f"header length 2**62 in an 11-byte file, `--to {b.split('-')[0]}`"
                                for b in BACKENDS[1:]},
    "truncated": {b: f"the first half of a `torch.save` file, `to='{b.split('-')[0]}'`" for b in BACKENDS[1:]},
    "cli-truncated": {b: f"the first half of a `torch.save` file, `--to {b.split('-')[0]}`" for b in BACKENDS[1:]},
    "cli-missing-source": {b: f"`--to {b.split('-')[0]}`" for b in BACKENDS},
    "cli-output-suffix": {b: f"`--to {b.split('-')[0]} -o out.txt`" for b in BACKENDS},
    "cli-output-is-source": {"torch": "`model.ckpt --to torch -o model.ckpt`",
                             "mindspore": "`model.pt --to mindspore -o model.pt`",
                             "flax-linen": "`model.pt --to flax -o model.pt`",
                             "flax-nnx": "`model.pt --to flax -o model.pt`"},
    "cli-output-folder": {b: f"`--to {b.split('-')[0]} -o absent/out`" for b in BACKENDS},
}


# ------------------------------------------------------------------------------------------------
# The check every backend's test runs
# ------------------------------------------------------------------------------------------------
def check(row: Row, backend: str, tmp: Path) -> None:
    """Run ``row`` in ``backend``: the documented class exactly, its fragment in the message, nothing
    changed; for a CLI row, ``xnorm convert`` also exits with status 2 and prints the message, changing
    nothing. Raises AssertionError saying what differs."""
    # xnorm convert's --like puts the working directory on sys.path (as python -m does); a test run from
    # the repository must not keep it there, where the top-level conformance/ and backends/ would import.
    saved_path = list(sys.path)
    try:
        _check(row, backend, tmp)
    finally:
        sys.path[:] = saved_path


def _check(row: Row, backend: str, tmp: Path) -> None:
    from xnorm import errors

    from .error_subjects import subject  # imports the backend's framework when a subject is built

    expected_name, fragment = row.expected(backend)
    expected = getattr(errors, expected_name)
    s = subject(row.subjects[backend], backend, tmp)
    before = s.snapshot()
    try:
        row.actions.get(backend, row.action)(s)
    except Exception as error:  # noqa: BLE001 - the class is what is checked
        raised = error
    else:
        raise AssertionError(f"{row.id} [{backend}]: no error raised; documented: {expected_name}")
    if type(raised) is not expected:
        raise AssertionError(
            f"{row.id} [{backend}]: raised {type(raised).__qualname__}: {raised}; documented: {expected_name}"
        ) from raised
    if fragment not in str(raised):
        raise AssertionError(f"{row.id} [{backend}]: the message lacks {fragment!r}: {raised}")
    if s.snapshot() != before:
        raise AssertionError(f"{row.id} [{backend}]: the {expected_name} left its input changed")
    if "argv" in s.extra:
        from xnorm import cli

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            status = cli.main(list(s.extra["argv"]))
        if status != 2 or f"xnorm: error: {raised}" not in stderr.getvalue():
            raise AssertionError(f"{row.id} [{backend}]: xnorm convert exited {status}, printing {stderr.getvalue()!r}")
        if s.snapshot() != before:
            raise AssertionError(f"{row.id} [{backend}]: xnorm convert left the folder changed")


# ------------------------------------------------------------------------------------------------
# docs/errors.md
# ------------------------------------------------------------------------------------------------
HEADER = """\
# Errors: a census of bad inputs

<!-- Generated from conformance/error_census.py; do not edit by hand. Regenerate with
     python -m xnorm.conformance.error_census --write docs/errors.md
     (tests/core/test_error_census_doc.py fails when this file differs). -->

Every documented error of xnorm, the input that triggers it, its class and what its message says, per
backend. Each row is checked in each backend's environment by `tests/<backend>/test_error_census.py`: the
call raises exactly that class (not a subclass) with the fragment shown in its message, and the layer,
model, variables, checkpoint file and output folder are unchanged, bit for bit (an output file is not
created). Every class derives from `xnorm.XnormError` and from the builtin named beside it, so
`except ValueError` keeps working. Which layers each backend wraps: docs/spec.md, "Supported layers and
errors".

A cell gives the input, then the fragment of the message; *n/a* says why the row does not apply there.
"""


def _builtin(error_name: str) -> str:
    from xnorm import errors

    cls = getattr(errors, error_name)
    bases = [b.__name__ for b in cls.__mro__[1:] if b.__module__ == "builtins" and b not in (Exception, BaseException,
                                                                                              object)]
    return bases[0] if bases else "Exception"


def _cell(row: Row, backend: str) -> str:
    if backend in row.not_applicable:
        return f"*n/a*: {row.not_applicable[backend]}"
    error, fragment = row.expected(backend)
    text = DESCRIPTIONS[row.subjects[backend]][backend]
    if backend in row.differences:
        text += f"; **differs**: `{error}` ({row.differences[backend][2]})"
    if fragment:
        text += f"<br>“{fragment}”"
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """docs/errors.md, from :data:`ROWS`."""
    lines = [HEADER]
    lines.append("| row | mistake | call | error | " + " | ".join(TITLES[b] for b in BACKENDS) + " |")
    lines.append("|" + "---|" * (4 + len(BACKENDS)))
    for row in ROWS:
        cells = [f"`{row.id}`", row.mistake, f"`{row.call}`", f"`{row.error}` ({_builtin(row.error)})"]
        cells += [_cell(row, backend) for backend in BACKENDS]
        lines.append("| " + " | ".join(cell.replace("\n", " ") for cell in cells) + " |")
    applicable = sum(len(row.subjects) for row in ROWS)
    lines.append("")
    lines.append(f"{len(ROWS)} rows, {applicable} of {len(ROWS) * len(BACKENDS)} row × backend cells checked; "
                 "the others do not apply, for the reason given.")
    return "\n".join(lines) + "\n"


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="render docs/errors.md from the census of bad inputs")
    parser.add_argument("--write", metavar="PATH", help="write the table there (default: print it)")
    args = parser.parse_args(argv)
    text = render_markdown()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _check_table() -> None:
    """Every row names a subject with a description, or a reason, for every backend."""
    for row in ROWS:
        for backend in BACKENDS:
            if (backend in row.subjects) == (backend in row.not_applicable):
                raise ValueError(f"census row {row.id}: {backend} needs a subject or a reason, not both or neither")
            if backend in row.subjects and backend not in DESCRIPTIONS.get(row.subjects[backend], {}):
                raise ValueError(f"census row {row.id}: no description of subject {row.subjects[backend]!r} "
                                 f"for {backend}")


_check_table()

if __name__ == "__main__":
    sys.exit(_main())
