"""The inputs of the census of bad inputs (:mod:`.error_census`), as objects: each subject a row names,
built in one backend (importing its framework only then), with the snapshot that shows whether a call
changed it (parameters and buffers byte for byte, names, modes, hooks, linen variables, NNX graph and
state, every file of a folder). The rows, the check and docs/errors.md are in :mod:`.error_census`.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from .error_census import Subject, _xnorm  # xnorm imported when a subject is built

#: what the command rows pass as --like: this module's factories of each backend's model
_CLI_LIKE = "xnorm.conformance.error_subjects:{}_like"


def subject(name: str, backend: str, tmp: Path) -> Subject:
    """Build subject ``name`` for ``backend`` (importing its framework), with files under ``tmp``."""
    if name.startswith("cli-") or name in ("own-format", "truncated", "pickled-code"):
        return _file_subject(name, backend, tmp)
    return {"torch": _torch, "mindspore": _mindspore, "flax-linen": _linen, "flax-nnx": _nnx}[backend](name)


# -- snapshots ------------------------------------------------------------------------------------
def _folder_snapshot(folder: Path) -> Callable[[], Any]:
    """Every file under ``folder`` with its bytes: an output that appears, or a source that changes, shows."""
    return lambda: sorted((p.relative_to(folder).as_posix(), p.is_dir() or p.read_bytes()) for p in folder.rglob("*"))


def _torch_tensor(t) -> Tuple[str, Tuple[int, ...], bytes]:
    import torch

    t = t.detach()
    raw = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return str(t.dtype), tuple(t.shape), raw


def _plain_attributes(obj) -> Dict[str, Any]:
    """The instance attributes by name, simple values compared by value, the others by type (a hook, a
    partial installed by freeze shows up as a new name)."""
    simple = (bool, int, float, str, type(None), tuple)
    return {k: (v if isinstance(v, simple) else type(v).__qualname__) for k, v in sorted(vars(obj).items())}


def _torch_snapshot(module) -> Callable[[], Any]:
    from torch.nn.utils import parametrize

    def snap():
        modules = [
            (name, type(m), m.training, parametrize.is_parametrized(m), _plain_attributes(m),
             len(m._forward_pre_hooks), len(m._forward_hooks), len(m._load_state_dict_pre_hooks))
            for name, m in module.named_modules()
        ]
        params = [(name, p.requires_grad, _torch_tensor(p)) for name, p in module.named_parameters()]
        state = [(key, _torch_tensor(value)) for key, value in module.state_dict().items()]
        return modules, params, state

    return snap


def _mindspore_snapshot(cell) -> Callable[[], Any]:
    def snap():
        params = [(key, p.name, str(p.dtype), p.requires_grad, tuple(p.shape), p.asnumpy().tobytes())
                  for key, p in cell.parameters_and_names()]
        cells = [(key, type(c), c.training, c.phase, _plain_attributes(c)) for key, c in cell.cells_and_names()]
        return params, cells

    return snap


def _jax_tree(tree) -> Any:
    import jax
    import numpy as np

    leaves, structure = jax.tree_util.tree_flatten_with_path(tree)
    return str(structure), [(jax.tree_util.keystr(path), str(np.asarray(leaf).dtype), np.shape(leaf),
                             np.asarray(leaf).tobytes()) for path, leaf in leaves]


def _linen_snapshot(module, variables=None) -> Callable[[], Any]:
    return lambda: (repr(module), None if variables is None else _jax_tree(variables))


def _nnx_snapshot(module) -> Callable[[], Any]:
    from flax import nnx

    return lambda: (nnx.graphdef(module), _jax_tree(nnx.to_pure_dict(nnx.state(module))))


# -- torch ----------------------------------------------------------------------------------------
def _torch(name: str) -> Subject:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name in ("linear", "linear-module", "like"):
        layer = nn.Linear(3, 2)
    elif name == "batchnorm":
        layer = nn.BatchNorm1d(3)
    elif name == "layernorm":
        layer = nn.LayerNorm(3)
    elif name == "parameterless":
        layer = nn.ReLU()
    elif name == "sequential":
        layer = nn.Sequential(nn.Linear(3, 2))
    elif name == "buffer":
        layer = nn.Linear(3, 2)
        layer.register_buffer("running", torch.zeros(2, 3))
    elif name == "integer":
        layer = nn.Linear(3, 2)
        layer.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int32), requires_grad=False)
    elif name == "tensor":
        tensor = torch.ones(2, 3)
        return Subject(tensor, lambda: _torch_tensor(tensor), extra={"backend": "torch"})
    elif name == "wrapped":
        layer = _xnorm().wrap(nn.Linear(3, 2))
    elif name == "native-wrapped":
        layer = torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    elif name in ("bn-model", "frozen"):
        layer = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        if name == "frozen":
            _xnorm().freeze(layer)
    elif name == "bn-ln-model":
        layer = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.LayerNorm(3))
        return Subject(layer, _torch_snapshot(layer), extra={"linear_type": nn.Linear, "layernorm_type": nn.LayerNorm})
    else:
        raise KeyError(f"no torch subject {name!r}")
    names = {"layernorm": "weight", "buffer": "running"}
    return Subject(layer, _torch_snapshot(layer), extra={"name": names.get(name)})


# -- MindSpore ------------------------------------------------------------------------------------
def _mindspore(name: str) -> Subject:
    import mindspore as ms
    import numpy as np
    from mindspore import Parameter, Tensor, nn

    ms.set_seed(0)
    if name in ("linear", "linear-module", "like"):
        layer = nn.Dense(3, 2)
    elif name == "batchnorm":
        layer = nn.BatchNorm1d(3)
    elif name == "layernorm":
        layer = nn.LayerNorm((3,))
    elif name == "parameterless":
        layer = nn.ReLU()
    elif name == "sequential":
        layer = nn.SequentialCell([nn.Dense(3, 2)])
    elif name == "custom":
        class Custom(nn.Cell):
            def __init__(self):
                super().__init__()
                self.weight = Parameter(Tensor(np.ones((2, 3), np.float32)), name="weight")

            def construct(self, x):
                return x @ self.weight.T

        layer = Custom()
    elif name == "integer":
        layer = nn.Dense(3, 2)
        layer.weight = Parameter(Tensor(np.ones((2, 3), dtype=np.int32)), name="weight")
    elif name == "tensor":
        tensor = Tensor(np.ones((2, 3), np.float32))
        return Subject(tensor, lambda: tensor.asnumpy().tobytes(), extra={"backend": "mindspore"})
    elif name == "wrapped":
        layer = _xnorm().wrap(nn.Dense(3, 2))
    elif name in ("bn-model", "frozen"):
        layer = nn.SequentialCell([nn.Dense(3, 3), nn.BatchNorm1d(3)])
        if name == "frozen":
            _xnorm().freeze(layer)
    elif name == "bn-ln-model":
        layer = nn.SequentialCell([nn.Dense(3, 3), nn.BatchNorm1d(3), nn.LayerNorm((3,))])
        types = {"linear_type": nn.Dense, "layernorm_type": nn.LayerNorm}
        return Subject(layer, _mindspore_snapshot(layer), extra=types)
    elif name in ("missing-key", "wrong-shape"):
        return _convert_subject(nn.Dense(3, 2), _mindspore_snapshot, "mindspore", name)
    else:
        raise KeyError(f"no mindspore subject {name!r}")
    return Subject(layer, _mindspore_snapshot(layer), extra={"name": "gamma" if name == "layernorm" else None})


def _convert_subject(like, snapshot, to: str, name: str, like_snapshot=None) -> Subject:
    """A torch state dict with a tensor missing or mis-shaped, converted ``to`` a framework ``like`` a Linear(3, 2)."""
    import torch

    torch.manual_seed(0)
    source = torch.nn.Linear(4 if name == "wrong-shape" else 3, 2).state_dict()
    if name == "missing-key":
        del source["bias"]
    like_snap = (like_snapshot or snapshot)(like)
    return Subject(like, lambda: (like_snap(), [(k, _torch_tensor(v)) for k, v in source.items()]),
                   extra={"source": source, "to": to})


# -- Flax linen -----------------------------------------------------------------------------------
def _linen(name: str) -> Subject:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    x = jnp.ones((1, 3), jnp.float32)
    key = jax.random.key(0)
    if name in ("linear", "like", "integer", "layernorm", "parameterless", "sequential"):
        module = {"layernorm": nn.LayerNorm(), "parameterless": nn.Dropout(0.5, deterministic=True),
                  "sequential": nn.Sequential([nn.Dense(2)])}.get(name, nn.Dense(2))
        variables = module.init(key, x)
        if name == "integer":
            variables = {"params": {**variables["params"], "kernel": jnp.ones((3, 2), jnp.int32)}}
        if name == "like":
            return Subject(variables, _linen_snapshot(None, variables))
        return Subject(module, _linen_snapshot(module, variables), wrap_kwargs={"variables": variables},
                       remove_args=(variables,), extra={"name": "scale"})
    if name == "batchnorm":
        module = nn.BatchNorm()
    elif name == "linear-module":
        module = nn.Dense(2)
    elif name == "tensor":
        tensor = jnp.ones((2, 3))
        return Subject(tensor, lambda: _jax_tree(tensor), extra={"backend": "flax"})
    elif name == "wrapped":
        dense = nn.Dense(2)
        wrapper, variables = _xnorm().wrap(dense, variables=dense.init(key, x))
        return Subject(wrapper, _linen_snapshot(wrapper, variables), wrap_kwargs={"variables": variables},
                       remove_args=(variables,))
    elif name == "native-wrapped":
        module = nn.WeightNorm(nn.Dense(2))
    elif name == "bn-model":
        module = nn.BatchNorm(use_running_average=False)
    elif name == "frozen":
        module = _xnorm().freeze(nn.BatchNorm(use_running_average=False))
    elif name == "bound":
        dense = nn.Dense(2)
        variables = dense.init(key, x)
        module = dense.bind(variables)
        return Subject(module, _linen_snapshot(dense, variables))
    elif name == "bn-ln-model":
        class Normalized(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.LayerNorm()(nn.BatchNorm(use_running_average=False)(x))

        module = Normalized()
        return Subject(module, _linen_snapshot(module), extra={
            "linear_type": nn.Dense, "layernorm_type": nn.LayerNorm,
            "init": lambda frozen: frozen.init(key, jnp.ones((2, 3), jnp.float32))})
    elif name in ("missing-key", "wrong-shape"):
        variables = nn.Dense(2).init(key, x)
        return _convert_subject(variables, lambda v: _linen_snapshot(None, v), "flax", name)
    else:
        raise KeyError(f"no linen subject {name!r}")
    return Subject(module, _linen_snapshot(module))


# -- Flax NNX -------------------------------------------------------------------------------------
def _nnx(name: str) -> Subject:
    import jax.numpy as jnp
    from flax import nnx

    rngs = nnx.Rngs(0)
    if name in ("linear", "linear-module", "like", "integer"):
        module = nnx.Linear(3, 2, rngs=rngs)
        if name == "integer":
            module.kernel.set_value(jnp.ones((3, 2), jnp.int32))
    elif name == "batchnorm":
        module = nnx.BatchNorm(3, rngs=rngs)
    elif name == "layernorm":
        module = nnx.LayerNorm(3, rngs=rngs)
    elif name == "parameterless":
        module = nnx.Dropout(0.5)
    elif name == "sequential":
        module = nnx.Sequential(nnx.Linear(3, 2, rngs=rngs))
    elif name == "buffer":
        class Counted(nnx.Module):
            def __init__(self):
                self.kernel = nnx.Param(jnp.ones((3, 2)))
                self.count = nnx.BatchStat(jnp.zeros(()))

        module = Counted()
    elif name == "tensor":
        tensor = jnp.ones((2, 3))
        return Subject(tensor, lambda: _jax_tree(tensor), extra={"backend": "flax"})
    elif name == "wrapped":
        module = _xnorm().wrap(nnx.Linear(3, 2, rngs=rngs))
    elif name == "native-wrapped":
        module = nnx.WeightNorm(nnx.Linear(3, 2, rngs=rngs), rngs=rngs)
    elif name in ("bn-model", "frozen"):
        module = nnx.BatchNorm(3, rngs=rngs)
        if name == "frozen":
            _xnorm().freeze(module)
    elif name == "bn-ln-model":
        class Normalized(nnx.Module):
            def __init__(self):
                self.bn = nnx.BatchNorm(3, rngs=rngs)
                self.ln = nnx.LayerNorm(3, rngs=rngs)

        module = Normalized()
        types = {"linear_type": nnx.Linear, "layernorm_type": nnx.LayerNorm}
        return Subject(module, _nnx_snapshot(module), extra=types)
    elif name in ("missing-key", "wrong-shape"):
        return _convert_subject(nnx.Linear(3, 2, rngs=rngs), _nnx_snapshot, "flax", name)
    else:
        raise KeyError(f"no nnx subject {name!r}")
    return Subject(module, _nnx_snapshot(module), extra={"name": {"layernorm": "scale", "buffer": "count"}.get(name)})


# -- files and the command ------------------------------------------------------------------------
def torch_like():
    """``--like`` of the CLI rows in the torch column (never reached: they fail before --like is read)."""
    from torch import nn

    return nn.Linear(3, 2)


def mindspore_like():
    from mindspore import nn

    return nn.Dense(3, 2)


def linen_like():
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    return nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))


def nnx_like():
    from flax import nnx

    return nnx.Linear(3, 2, rngs=nnx.Rngs(0))


_LIKES = {"torch": torch_like, "mindspore": mindspore_like, "flax-linen": linen_like, "flax-nnx": nnx_like}


class _OpensAFile:
    """Unpickled, it would create ``marker``: the file's absence after the refusal proves nothing ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncated_torch_file(path: Path) -> Path:
    import torch

    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _file_subject(name: str, backend: str, tmp: Path) -> Subject:
    folder = tmp / "census"
    folder.mkdir()
    to = backend.split("-")[0]
    like = _LIKES[backend]
    out = {"torch": "out.safetensors", "mindspore": "out.ckpt"}.get(backend, "out.msgpack")
    argv = ["convert", str(folder / "model.pt"), "--to", to, "--like", _CLI_LIKE.format(backend.replace("flax-", "")),
            "-o", str(folder / out)]
    extra: Dict[str, Any] = {"to": to}
    if name == "own-format":
        source = folder / {"torch": "model.safetensors", "mindspore": "model.ckpt"}.get(backend, "model.msgpack")
        source.write_bytes(b"not read: the suffix says which framework")
        extra.update(source=source, like=like())
    elif name == "pickled-code":
        source = folder / "model.pt"
        source.write_bytes(pickle.dumps({"weight": _OpensAFile(folder / "MARKER")}, protocol=2))
        extra.update(source=source, like=like())
    elif name == "cli-hostile-safetensors":
        source = folder / "model.safetensors"
        source.write_bytes((2**62).to_bytes(8, "little") + b"{}\n")
        argv[1] = str(source)
    elif name in ("truncated", "cli-truncated"):
        extra.update(source=_truncated_torch_file(folder / "model.pt"), like=like())
    elif name == "cli-missing-source":
        argv[1] = str(folder / "absent.pt")
    elif name == "cli-output-suffix":
        _truncated_torch_file(folder / "model.pt")
        argv[-1] = str(folder / "out.txt")
    elif name == "cli-output-is-source":
        source = folder / ("model.ckpt" if backend == "torch" else "model.pt")
        source.write_bytes(b"a checkpoint")
        argv[1] = argv[-1] = str(source)
    elif name == "cli-output-folder":
        _truncated_torch_file(folder / "model.pt")
        argv[-1] = str(folder / "absent" / out)
    else:
        raise KeyError(f"no file subject {name!r}")
    if name.startswith("cli-"):
        extra["argv"] = argv
    snapshot = _folder_snapshot(folder)
    if "like" in extra:
        like_snapshot = {"torch": _torch_snapshot, "mindspore": _mindspore_snapshot,
                         "flax-linen": lambda v: _linen_snapshot(None, v), "flax-nnx": _nnx_snapshot}[backend]
        folder_snapshot, like_snap = snapshot, like_snapshot(extra["like"])
        snapshot = lambda: (folder_snapshot(), like_snap())  # noqa: E731
    return Subject(folder, snapshot, extra=extra)


