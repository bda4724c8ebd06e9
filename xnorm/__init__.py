"""xnorm: weight reparametrizations defined once and implemented identically for PyTorch, MindSpore and Flax.

``import xnorm`` imports no framework; a backend is imported when it is first used.
"""

from . import batchnorm, reference, reference_spectral, spec
from .api import freeze, is_frozen, is_wrapped, orthogonal, remove, spectral_norm, unfreeze, weight_norm, wrap
from .errors import (
    AlreadyFrozenError,
    AlreadyWrappedError,
    BackendDetectionError,
    BackendNotInstalledError,
    CheckpointFileError,
    ConversionError,
    DimError,
    MissingParameterError,
    NonFloatingParameterError,
    NotFrozenError,
    NotWrappedError,
    OptionError,
    UnknownBackendError,
    UnsupportedLayerError,
    XnormError,
)
from .porting import compare, convert
from .registry import BackendInfo, backends, register_backend
from .spec import Orthogonal, Reparametrization, SpectralNorm, WeightNorm

__version__ = "0.1.0"

__all__ = [
    "wrap",
    "weight_norm",
    "spectral_norm",
    "orthogonal",
    "remove",
    "is_wrapped",
    "freeze",
    "unfreeze",
    "is_frozen",
    "backends",
    "register_backend",
    "BackendInfo",
    "Reparametrization",
    "WeightNorm",
    "SpectralNorm",
    "Orthogonal",
    "batchnorm",
    "reference",
    "reference_spectral",
    "spec",
    "XnormError",
    "UnknownBackendError",
    "BackendNotInstalledError",
    "BackendDetectionError",
    "UnsupportedLayerError",
    "MissingParameterError",
    "NonFloatingParameterError",
    "DimError",
    "AlreadyWrappedError",
    "NotWrappedError",
    "AlreadyFrozenError",
    "NotFrozenError",
    "OptionError",
    "ConversionError",
    "CheckpointFileError",
    "convert",
    "compare",
]
