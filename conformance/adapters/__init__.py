"""Where each backend's conformance adapters live, imported only when asked for.

A backend may run the suite in several ways (MindSpore's GRAPH_MODE and PYNATIVE_MODE, Flax's linen
and NNX); each way is one adapter with its own name, results and expected-failure list. A
third-party adapter is named as ``"package.module:ClassName"``.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Tuple

from xnorm import registry
from xnorm.errors import UnknownBackendError

#: adapter name -> "module:Class"
ADAPTERS: Dict[str, str] = {
    "torch": "xnorm.conformance.adapters.torch:TorchAdapter",
    "mindspore-graph": "xnorm.conformance.adapters.mindspore:MindSporeGraphAdapter",
    "mindspore-pynative": "xnorm.conformance.adapters.mindspore:MindSporePyNativeAdapter",
    "flax-linen": "xnorm.conformance.adapters.flax:LinenAdapter",
    "flax-nnx": "xnorm.conformance.adapters.flax:NNXAdapter",
    # xnorm.wrap(..., fused=True): the same catalogue, the same tolerances
    "torch-fused": "xnorm.conformance.adapters.torch:TorchFusedAdapter",
    # each framework's own implementations (not xnorm), to show where each departs from the spec
    "torch-parametrizations": "xnorm.conformance.adapters.torch:TorchParametrizationsAdapter",
    "torch-legacy": "xnorm.conformance.adapters.torch:TorchLegacyAdapter",
    "flax-linen-native": "xnorm.conformance.adapters.flax_native:LinenNativeAdapter",
    "flax-nnx-native": "xnorm.conformance.adapters.flax_native:NNXNativeAdapter",
    "mindspore-assign": "xnorm.conformance.adapters.mindspore_community:MindSporeAssignAdapter",
    "mindspore-graph-fused": "xnorm.conformance.adapters.mindspore:MindSporeGraphFusedAdapter",
    "flax-linen-fused": "xnorm.conformance.adapters.flax:LinenFusedAdapter",
    "flax-nnx-fused": "xnorm.conformance.adapters.flax:NNXFusedAdapter",
}

#: backend name (as in xnorm.backends()) -> its adapters
BACKEND_ADAPTERS: Dict[str, Tuple[str, ...]] = {
    "torch": ("torch", "torch-fused", "torch-parametrizations", "torch-legacy"),
    "mindspore": ("mindspore-graph", "mindspore-pynative", "mindspore-graph-fused", "mindspore-assign"),
    "flax": ("flax-linen", "flax-nnx", "flax-linen-fused", "flax-nnx-fused", "flax-linen-native", "flax-nnx-native"),
}

#: adapters dealt out after the others of their backend when several run in one process (``xnorm
#: conformance --jobs``, :func:`run_order`): MindSpore runs every adapter's cases slower in a process where
#: GRAPH_MODE graphs were compiled before, even once those graphs and their cells are freed (the cause is
#: inside MindSpore). Measured on this project's 2-core machine (2026-12-03), ``xnorm conformance --backend
#: mindspore``, every saved array bit-equal: ``mindspore-pynative``'s case time 53 s after ``mindspore-graph``,
#: 31 s before it; the whole run 162 s with ``mindspore-graph`` first, 152 s with it last.
RUN_LAST: Tuple[str, ...] = ("mindspore-graph",)


def run_order(names: List[str]) -> List[str]:
    """``names`` in the order their parts are dealt to processes: as given, but :data:`RUN_LAST` last."""
    return sorted(names, key=lambda name: name in RUN_LAST)


#: adapters of other implementations than xnorm's (the frameworks' own, a community pattern), run through
#: the same cases to show where each departs from the spec: in the report (nox -t report), and out of CI's
#: tests (``xnorm conformance --xnorm-only``), which check xnorm's own
OTHER_IMPLEMENTATIONS: Tuple[str, ...] = (
    "torch-parametrizations", "torch-legacy", "mindspore-assign", "flax-linen-native", "flax-nnx-native",
)


def adapter_names(selector: str) -> List[str]:
    """Expand a ``--backend`` value: a backend name, an adapter name or ``module:Class``."""
    if selector in BACKEND_ADAPTERS:
        return list(BACKEND_ADAPTERS[selector])
    if selector in ADAPTERS or ":" in selector:
        return [selector]
    raise UnknownBackendError(
        f"unknown conformance backend {selector!r}; choose one of "
        f"{', '.join(sorted(set(BACKEND_ADAPTERS) | set(ADAPTERS)))}, or name a third-party adapter "
        "as 'package.module:ClassName'."
    )


def load_adapter(name: str):
    """Instantiate the adapter called ``name`` (or given as ``module:Class``)."""
    target = ADAPTERS.get(name, name)
    module_name, _, class_name = target.partition(":")
    backend = next((b for b, names in BACKEND_ADAPTERS.items() if name in names), None)
    if backend is not None:
        registry.get_backend(backend)  # raises BackendNotInstalledError with the pip extra to install
    return getattr(importlib.import_module(module_name), class_name)()


def installed_adapters() -> List[str]:
    """Adapters of every backend whose framework is installed in this environment."""
    return [name for info in registry.backends() if info.installed for name in BACKEND_ADAPTERS.get(info.name, ())]
