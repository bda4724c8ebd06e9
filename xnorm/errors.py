"""The one error hierarchy of xnorm.

Every error names what is wrong and how to fix it. Each class also subclasses the builtin exception a
user would catch for the same mistake (ValueError for a bad value, TypeError for a bad type,
ImportError for a missing framework), so ``except ValueError`` keeps working around xnorm calls.

A call that raises one of these has not modified the layer, model or checkpoint it was given.
"""

from __future__ import annotations

__all__ = [
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
]


class XnormError(Exception):
    """Base class of every error xnorm raises on purpose."""


class UnknownBackendError(XnormError, ValueError):
    """``backend=`` names no registered backend."""


class BackendNotInstalledError(XnormError, ImportError):
    """The backend's framework cannot be imported in this environment."""


class BackendDetectionError(XnormError, TypeError):
    """``backend=None`` and no backend recognises the object's type."""


class UnsupportedLayerError(XnormError, TypeError):
    """The backend cannot reparametrize this kind of layer."""


class MissingParameterError(XnormError, ValueError):
    """The layer has no parameter under the requested name."""


class NonFloatingParameterError(XnormError, TypeError):
    """The parameter exists but is not floating point (float16, bfloat16, float32 or float64)."""


class DimError(XnormError, ValueError):
    """``dim`` is not None or an int inside the weight's range."""


class AlreadyWrappedError(XnormError, ValueError):
    """The parameter is already reparametrized (by xnorm or by the framework's own weight norm)."""


class NotWrappedError(XnormError, ValueError):
    """``remove`` was given an object with no xnorm-wrapped layer in it."""


class AlreadyFrozenError(XnormError, ValueError):
    """``freeze`` was given layers that are all frozen already (by xnorm, or by their class, such as
    torchvision's ``FrozenBatchNorm2d``)."""


class NotFrozenError(XnormError, ValueError):
    """``unfreeze`` was given an object with no layer frozen by ``xnorm.freeze`` in it."""


class OptionError(XnormError, ValueError):
    """A keyword option (``eps``, ``fused``, ...) has a value outside its documented range."""


class ConversionError(XnormError, ValueError):
    """A checkpoint does not fill the target model exactly: keys missing, unexpected, mis-shaped or of the wrong dtype.

    ``missing``, ``unexpected`` and ``mismatched`` hold every problem found (not just the first), as lists of
    strings, so one run tells the whole story.
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class CheckpointFileError(XnormError, ValueError):
    """A checkpoint file cannot be read safely: missing, truncated, corrupt, or holding more than plain tensors."""
