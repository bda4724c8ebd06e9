"""xnorm.convert between torch and MindSpore, both directions, and xnorm.compare on the result.

Expected MindSpore parameters are written out here per layer from torch's own tensors (names and the
Conv1d/Conv1dTranspose unit axis spelled out by hand), independently of xnorm.porting's tables. Models
run in GRAPH_MODE, as users run them.
"""

from __future__ import annotations

import re
import runpy
import warnings
from collections import OrderedDict
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Parameter, Tensor, ops
from mindspore import nn as msnn
from torch import nn
from torch.nn.utils import parametrizations

import xnorm
from xnorm import porting
from xnorm.errors import CheckpointFileError, ConversionError, OptionError
from xnorm.porting import save, write_safetensors

# -- the models --------------------------------------------------------------------------------------------

#: Weight-normed layers and their dim (torch's layout): None, 0 and non-zero dims, a grouped strided transpose.
DIMS = {"emb": 0, "lin": 1, "conv1": 2, "tconv1": 1, "conv2": None, "tconv2": 0}
STYLES = {
    "legacy": dict.fromkeys(DIMS, "legacy"),
    "parametrizations": dict.fromkeys(DIMS, "parametrizations"),
    "mixed": {"emb": "legacy", "lin": "parametrizations", "conv1": "legacy", "tconv1": "parametrizations",
              "conv2": "plain", "tconv2": "legacy"},
    "plain": dict.fromkeys(DIMS, "plain"),
}


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def _torch_weight_norm(module: nn.Module, style: str, dim) -> nn.Module:
    if style == "legacy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.nn.utils.weight_norm(module, dim=dim)
    if style == "parametrizations":
        return parametrizations.weight_norm(module, dim=dim)
    return module


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random values everywhere (g away from ||v||, positive variances); num_batches_tracked stays 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen, dtype=torch.float64)
            if key.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values)
    return model.eval()


class TorchZoo(nn.Module):
    """(ids (N, T) int64, image (N, 3, H, W)) -> ((N, 6, 2T), (N, 2, 2H, 2W)); every supported kind once."""

    def __init__(self, styles: dict, seed: int = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.conv1 = nn.Conv1d(8, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(12)
        self.tconv1 = nn.ConvTranspose1d(12, 6, 4, stride=2, padding=1, groups=3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.tconv2 = nn.ConvTranspose2d(4, 2, 2, stride=2)
        for name, dim in DIMS.items():
            setattr(self, name, _torch_weight_norm(getattr(self, name), styles[name], dim))
        _randomize(self, seed)

    def forward(self, ids, image):
        h = self.ln(self.lin(self.emb(ids)))
        h = self.tconv1(self.bn1(self.conv1(h.transpose(1, 2))))
        return h, self.tconv2(self.bn2(self.conv2(image)))


class MsZoo(msnn.Cell):
    """The MindSpore twin of :class:`TorchZoo` (torch's padding, eps and biases), wrapped per ``styles``."""

    def __init__(self, styles: dict, fused: bool = False) -> None:
        super().__init__()
        self.emb = msnn.Embedding(10, 6)
        self.lin = msnn.Dense(6, 8)
        self.ln = msnn.LayerNorm((8,), epsilon=1e-5)
        self.conv1 = msnn.Conv1d(8, 12, 3, pad_mode="pad", padding=1, has_bias=True)
        self.bn1 = msnn.BatchNorm1d(12)
        self.tconv1 = msnn.Conv1dTranspose(12, 6, 4, stride=2, pad_mode="pad", padding=1, group=3, has_bias=True)
        self.conv2 = msnn.Conv2d(3, 4, 3, pad_mode="pad", padding=1, has_bias=True)
        self.bn2 = msnn.BatchNorm2d(4)
        self.tconv2 = msnn.Conv2dTranspose(4, 2, 2, stride=2, pad_mode="valid", has_bias=True)
        for name, dim in DIMS.items():
            if styles[name] != "plain":
                setattr(self, name, xnorm.wrap(getattr(self, name), dim=dim, fused=fused))

    def construct(self, ids, image):
        h = self.ln(self.lin(self.emb(ids)))
        h = self.tconv1(self.bn1(self.conv1(ops.transpose(h, (0, 2, 1)))))
        return h, self.tconv2(self.bn2(self.conv2(image)))


def _inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10, size=(2, 5)).astype(np.int64), rng.standard_normal((2, 3, 4, 4)).astype(np.float32)


def _numpy_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.detach().numpy().copy()) for k, v in model.state_dict().items())


def expected_mindspore(torch_model: TorchZoo, styles: dict) -> dict:
    """MindSpore name -> array, from torch's tensors, layer by layer.

    Layouts: MindSpore stores Conv1d (out, in, k) and Conv1dTranspose (in, out/groups, k) weights, and
    their g, with a unit axis inserted at position 2; a 0-d g (dim=None) stays 0-d; all else as torch.
    """
    sd = _numpy_state(torch_model)
    out = {}
    for layer in DIMS:
        ms_name = "embedding_table" if layer == "emb" else "weight"

        def fix(a, layer=layer):
            return a.reshape(a.shape[:2] + (1,) + a.shape[2:]) if layer in ("conv1", "tconv1") and a.ndim == 3 else a

        style = styles[layer]
        if style == "plain":
            out[f"{layer}.{ms_name}"] = fix(sd[f"{layer}.weight"])
        elif style == "legacy":
            out[f"{layer}.{ms_name}_g"] = fix(sd[f"{layer}.weight_g"])
            out[f"{layer}.{ms_name}_v"] = fix(sd[f"{layer}.weight_v"])
        else:
            out[f"{layer}.{ms_name}_g"] = fix(sd[f"{layer}.parametrizations.weight.original0"])
            out[f"{layer}.{ms_name}_v"] = fix(sd[f"{layer}.parametrizations.weight.original1"])
        if layer != "emb":
            out[f"{layer}.bias"] = sd[f"{layer}.bias"]
    out["ln.gamma"], out["ln.beta"] = sd["ln.weight"], sd["ln.bias"]
    for bn in ("bn1", "bn2"):
        out[f"{bn}.gamma"], out[f"{bn}.beta"] = sd[f"{bn}.weight"], sd[f"{bn}.bias"]
        out[f"{bn}.moving_mean"], out[f"{bn}.moving_variance"] = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
    return out


def _snapshot(cell: msnn.Cell) -> dict:
    return {k: p.asnumpy().copy() for k, p in cell.parameters_dict().items()}


def _assert_same_arrays(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, (key, got.dtype, got.shape, value.shape)
        assert np.array_equal(got, value), key


def _assert_torch_state_equal(actual, expected: nn.Module) -> None:
    reference = expected.state_dict()
    assert list(actual) == list(reference)  # the torch model's own keys, in its order
    for key, value in reference.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


def _convert_zoo(style: str, source=None, **kwargs):
    torch_model = TorchZoo(STYLES[style])
    like = MsZoo(STYLES[style])
    result = xnorm.convert(torch_model.state_dict() if source is None else source, to="mindspore", like=like,
                           **kwargs)
    return torch_model, like, result


# -- torch -> MindSpore ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
def test_torch_to_mindspore_exact_params_and_outputs(style):
    torch_model, like, result = _convert_zoo(style)
    assert list(result) == list(like.parameters_dict())
    assert all(isinstance(p, Parameter) and p.name == k for k, p in result.items())
    _assert_same_arrays({k: p.asnumpy() for k, p in result.items()}, expected_mindspore(torch_model, STYLES[style]))

    # Running first compiles the graph; loading afterwards must still reach it.
    inputs = _inputs()
    like.set_train(False)
    like(*(Tensor(x) for x in inputs))
    ms.load_param_into_net(like, result, strict_load=True)
    # Mixed training flags are restored exactly by compare.
    like.set_train(True)
    like.bn1.set_train(False)
    flags = [(name, cell.training) for name, cell in like.cells_and_names()]
    comparison = xnorm.compare(torch_model, like, inputs)
    assert [(name, cell.training) for name, cell in like.cells_and_names()] == flags
    assert len(comparison.outputs) == 2
    comparison.assert_close()


def test_fused_target():
    """A target wrapped with fused=True has the same parameters, so the same conversion fills it."""
    torch_model = TorchZoo(STYLES["mixed"])
    like = MsZoo(STYLES["mixed"], fused=True)
    result = xnorm.convert(torch_model.state_dict(), to="mindspore", like=like, load=True)
    expected = expected_mindspore(torch_model, STYLES["mixed"])
    _assert_same_arrays({k: p.asnumpy() for k, p in result.items()}, expected)
    _assert_same_arrays(_snapshot(like), expected)
    xnorm.compare(torch_model, like, _inputs()).assert_close()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torch_files_to_mindspore_with_load(tmp_path, suffix):
    torch_model = TorchZoo(STYLES["mixed"])
    path = tmp_path / f"zoo{suffix}"
    if suffix == ".pt":
        torch.save(torch_model.state_dict(), path)
    else:
        write_safetensors(_numpy_state(torch_model), path)
    before = path.read_bytes()
    like = MsZoo(STYLES["mixed"])
    result = xnorm.convert(path, to="mindspore", like=like, load=True)
    assert path.read_bytes() == before
    expected = expected_mindspore(torch_model, STYLES["mixed"])
    _assert_same_arrays(_snapshot(like), expected)
    # The loaded model and the returned dict do not share memory.
    result["lin.bias"].set_data(Tensor(np.zeros(8, np.float32)))
    np.testing.assert_array_equal(like.lin.bias.asnumpy(), expected["lin.bias"])
    xnorm.compare(torch_model, like, _inputs()).assert_close()


def test_cast():
    torch_model = TorchZoo(STYLES["legacy"]).double()
    like = MsZoo(STYLES["legacy"])
    before = _snapshot(like)
    with pytest.raises(ConversionError) as info:
        xnorm.convert(torch_model.state_dict(), to="mindspore", like=like, load=True)
    message = str(info.value)
    assert "dtype float32 but 'lin.weight_g' is float64" in message and "cast=True" in message
    assert len(info.value.mismatched) == len(expected_mindspore(torch_model, STYLES["legacy"]))
    _assert_same_arrays(_snapshot(like), before)

    result = xnorm.convert(torch_model.state_dict(), to="mindspore", like=like, cast=True, load=True)
    expected = {k: v.astype(np.float32) for k, v in expected_mindspore(torch_model, STYLES["legacy"]).items()}
    _assert_same_arrays({k: p.asnumpy() for k, p in result.items()}, expected)
    _assert_same_arrays(_snapshot(like), expected)


class TorchRenamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = _torch_weight_norm(nn.Linear(4, 3), "legacy", 0)
        self.norm = nn.LayerNorm(3)
        _randomize(self, 3)

    def forward(self, x):
        return self.norm(self.encoder(x))


class MsRenamed(msnn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.enc = xnorm.wrap(msnn.Dense(4, 3), dim=0)
        self.ln = msnn.LayerNorm((3,), epsilon=1e-5)

    def construct(self, x):
        return self.ln(self.enc(x))


@pytest.mark.parametrize("as_function", [False, True])
def test_rename_both_directions(as_function):
    torch_model = TorchRenamed()
    like = MsRenamed()
    to_torch_names = {r"^enc\.": "encoder.", r"^ln\.": "norm."}
    to_ms_names = {r"^encoder\.": "enc.", r"^norm\.": "ln."}
    if as_function:
        def to_torch(key):
            return key.replace("enc.", "encoder.", 1) if key.startswith("enc.") else key.replace("ln.", "norm.", 1)

        def to_ms(key):
            return key.replace("encoder.", "enc.", 1) if key.startswith("encoder.") else key.replace("norm.", "ln.", 1)
    else:
        to_torch, to_ms = to_torch_names, to_ms_names

    with pytest.raises(ConversionError, match="rename="):
        xnorm.convert(torch_model.state_dict(), to="mindspore", like=like)
    xnorm.convert(torch_model.state_dict(), to="mindspore", like=like, rename=to_torch, load=True)
    sd = _numpy_state(torch_model)
    _assert_same_arrays(_snapshot(like), {
        "enc.weight_g": sd["encoder.weight_g"], "enc.weight_v": sd["encoder.weight_v"], "enc.bias": sd["encoder.bias"],
        "ln.gamma": sd["norm.weight"], "ln.beta": sd["norm.bias"],
    })
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    xnorm.compare(torch_model, like, x).assert_close()

    back = xnorm.convert(like, to="torch", like=TorchRenamed(), rename=to_ms)
    _assert_torch_state_equal(back, torch_model)


def test_more_kinds_and_generic_cells():
    """Conv3d, Conv3dTranspose, BatchNorm3d (MindSpore keeps it in an inner bn2d), GroupNorm, a Dense without
    bias and a custom Cell's own Parameter (a generic layer: name and layout kept)."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.alpha.reshape(1, 2, 1, 1, 1)

    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _torch_weight_norm(nn.Conv3d(2, 4, (2, 3, 3), padding=1), "parametrizations", 1)
            self.bn = nn.BatchNorm3d(4)
            self.tconv = nn.ConvTranspose3d(4, 2, 2, stride=2)
            self.gn = nn.GroupNorm(2, 2)
            self.scale = Scale()
            self.head = _torch_weight_norm(nn.Linear(2, 3, bias=False), "legacy", None)
            _randomize(self, 5)

        def forward(self, x):
            y = self.scale(self.gn(self.tconv(self.bn(self.conv(x)))))
            return self.head(y.mean(dim=(2, 3, 4)))

    class MsScale(msnn.Cell):
        def __init__(self):
            super().__init__()
            self.alpha = Parameter(Tensor(np.ones(2, np.float32)), name="alpha")

        def construct(self, x):
            return x * self.alpha.reshape(1, 2, 1, 1, 1)

    class M(msnn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = xnorm.wrap(msnn.Conv3d(2, 4, (2, 3, 3), pad_mode="pad", padding=1, has_bias=True), dim=1)
            self.bn = msnn.BatchNorm3d(4)
            self.tconv = msnn.Conv3dTranspose(4, 2, 2, stride=2, has_bias=True)
            self.gn = msnn.GroupNorm(2, 2)
            self.scale = MsScale()
            self.head = xnorm.wrap(msnn.Dense(2, 3, has_bias=False), dim=None)

        def construct(self, x):
            y = self.scale(self.gn(self.tconv(self.bn(self.conv(x)))))
            return self.head(y.mean(axis=(2, 3, 4)))

    torch_model, like = T(), M()
    xnorm.convert(torch_model.state_dict(), to="mindspore", like=like, load=True)
    sd = _numpy_state(torch_model)
    _assert_same_arrays(_snapshot(like), {
        "conv.weight_g": sd["conv.parametrizations.weight.original0"],
        "conv.weight_v": sd["conv.parametrizations.weight.original1"],
        "conv.bias": sd["conv.bias"],
        "bn.bn2d.gamma": sd["bn.weight"], "bn.bn2d.beta": sd["bn.bias"],
        "bn.bn2d.moving_mean": sd["bn.running_mean"], "bn.bn2d.moving_variance": sd["bn.running_var"],
        "tconv.weight": sd["tconv.weight"], "tconv.bias": sd["tconv.bias"],
        "gn.gamma": sd["gn.weight"], "gn.beta": sd["gn.bias"],
        "scale.alpha": sd["scale.alpha"],
        "head.weight_g": sd["head.weight_g"], "head.weight_v": sd["head.weight_v"],
    })
    x = np.random.default_rng(2).standard_normal((1, 2, 3, 4, 4)).astype(np.float32)
    xnorm.compare(torch_model, like, x).assert_close()
    _assert_torch_state_equal(xnorm.convert(like, to="torch", like=T()), torch_model)


def test_subclass_of_a_supported_cell():
    """A user's subclass of Conv1d keeps Conv1d's storage (unit axis), so it converts as a Conv1d."""

    class MyConv1d(msnn.Conv1d):
        pass

    torch_model = _randomize(nn.Sequential(_torch_weight_norm(nn.Conv1d(3, 4, 5, padding=2), "legacy", 0),
                                           nn.Conv1d(4, 2, 1)), 4)
    like = msnn.SequentialCell([xnorm.wrap(msnn.Conv1d(3, 4, 5, pad_mode="pad", padding=2, has_bias=True)),
                                MyConv1d(4, 2, 1, has_bias=True)])
    xnorm.convert(torch_model.state_dict(), to="mindspore", like=like, load=True)
    sd = _numpy_state(torch_model)
    _assert_same_arrays(_snapshot(like), {
        "0.weight_g": sd["0.weight_g"][:, :, None], "0.weight_v": sd["0.weight_v"][:, :, None], "0.bias": sd["0.bias"],
        "1.weight": sd["1.weight"][:, :, None], "1.bias": sd["1.bias"],
    })
    x = np.random.default_rng(3).standard_normal((1, 3, 6)).astype(np.float32)
    xnorm.compare(torch_model, like, x).assert_close()


# -- MindSpore -> torch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["legacy", "parametrizations", "mixed"])
@pytest.mark.parametrize("source", ["cell", "parameters_dict", "saved_ckpt", "converted_ckpt"])
def test_mindspore_to_torch_bit_exact(tmp_path, style, source):
    original, ms_model, result = _convert_zoo(style, load=True)
    if source == "cell":
        src = ms_model
    elif source == "parameters_dict":
        src = ms_model.parameters_dict()
    elif source == "saved_ckpt":  # what a MindSpore user has: save_checkpoint of the Cell
        src = tmp_path / "zoo.ckpt"
        ms.save_checkpoint(ms_model, str(src))
    else:  # the conversion's own result, saved by xnorm
        src = tmp_path / "converted.ckpt"
        save(result, src, to="mindspore")
    file_bytes = src.read_bytes() if isinstance(src, Path) else None
    source_before = _snapshot(ms_model)

    like = TorchZoo(STYLES[style], seed=9)
    like_before = {k: v.clone() for k, v in like.state_dict().items()}
    back = xnorm.convert(src, to="torch", like=like)
    _assert_torch_state_equal(back, original)
    assert all(torch.equal(v, like_before[k]) for k, v in like.state_dict().items())  # load=False: untouched
    # The result does not share memory with the MindSpore source.
    back["lin.bias"].add_(1.0)
    _assert_same_arrays(_snapshot(ms_model), source_before)
    if file_bytes is not None:
        assert src.read_bytes() == file_bytes

    xnorm.convert(src, to="torch", like=like, load=True)
    _assert_torch_state_equal(like.state_dict(), original)


# -- failures: one clear error, nothing modified -----------------------------------------------------------------


def _expect_failure(like: msnn.Cell, source, error_type, *fragments, **kwargs):
    """Convert with load=True; assert the error and its message; assert ``like`` and any source file unchanged."""
    before = _snapshot(like)
    file_bytes = Path(source).read_bytes() if isinstance(source, (str, Path)) and Path(source).is_file() else None
    with pytest.raises(error_type) as info:
        xnorm.convert(source, to="mindspore", like=like, load=True, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    _assert_same_arrays(_snapshot(like), before)
    if file_bytes is not None:
        assert Path(source).read_bytes() == file_bytes
    return info.value


def test_missing_extra_and_misshaped_keys_in_one_error():
    torch_model = TorchZoo(STYLES["legacy"])
    sd = torch_model.state_dict()
    del sd["lin.bias"]
    sd["head.weight"] = torch.zeros(3, 3)
    sd["conv2.weight_v"] = torch.zeros(4, 3, 5, 5)
    error = _expect_failure(
        MsZoo(STYLES["legacy"]), sd, ConversionError,
        "1 missing, 1 unexpected, 1 mismatched", "nothing was converted or modified",
        "lin.bias (looked for 'lin.bias'", "head.weight (3, 3)",
        "conv2.weight_v: shape (4, 3, 3, 3) but 'conv2.weight_v' has shape (4, 3, 5, 5)",
    )
    assert len(error.missing) == 1 and len(error.unexpected) == 1 and len(error.mismatched) == 1


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "dtype"])
def test_each_key_problem(problem):
    sd = TorchZoo(STYLES["parametrizations"]).state_dict()
    key = "tconv1.parametrizations.weight.original1"
    if problem == "missing":
        del sd[key]
        fragments = ("1 missing", "tconv1.weight_v (looked for 'tconv1.weight_v'")
    elif problem == "extra":
        sd["tconv1.extra"] = sd[key].clone()
        fragments = ("1 unexpected", "tconv1.extra (12, 2, 4)")
    elif problem == "shape":
        sd[key] = torch.zeros(12, 2, 5)
        fragments = ("tconv1.weight_v: shape (12, 2, 1, 4)", "(12, 2, 5) (would become (12, 2, 1, 5))")
    else:
        sd[key] = sd[key].half()
        fragments = ("tconv1.weight_v: dtype float32", "is float16 (pass cast=True to cast)")
    _expect_failure(MsZoo(STYLES["parametrizations"]), sd, ConversionError, *fragments)


def test_both_torch_key_styles_for_one_weight():
    """A checkpoint holding a g under both torch styles is ambiguous: one error, not a silent pick."""
    sd = TorchZoo(STYLES["legacy"]).state_dict()
    sd["lin.parametrizations.weight.original0"] = sd["lin.weight_g"] * 2
    _expect_failure(MsZoo(STYLES["legacy"]), sd, ConversionError, "'lin.weight_g'",
                    "'lin.parametrizations.weight.original0'")


def test_weight_norm_on_one_side_only_names_the_fix():
    sd = TorchZoo(STYLES["legacy"]).state_dict()
    _expect_failure(MsZoo(STYLES["plain"]), sd, ConversionError, "lin.weight_g",
                    "is weight normed in the checkpoint but plain in the target (and 5 more): wrap the target's "
                    "layer with xnorm.weight_norm")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.chmod(0o600)  # mindspore.save_checkpoint leaves its files read-only
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "absent"])
def test_unreadable_torch_files(tmp_path, suffix, damage):
    path = tmp_path / f"zoo{suffix}"
    sd = TorchZoo(STYLES["legacy"]).state_dict()
    if damage != "absent":
        if suffix == ".pt":
            torch.save(sd, path)
        else:
            write_safetensors(_numpy_state_dict(sd), path)
        if damage == "truncated":
            _truncate(path)
        else:  # random bytes where a checkpoint should be
            path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 700, dtype=np.uint8)))
    fragments = ("does not exist",) if damage == "absent" else ("truncated or corrupt",)
    _expect_failure(MsZoo(STYLES["legacy"]), path, CheckpointFileError, repr(str(path)), *fragments)


def _numpy_state_dict(sd) -> dict:
    return {k: v.detach().numpy() for k, v in sd.items()}


def _write_then_open_marker(marker: Path):
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this creates the marker file

    return Payload()


def test_pickles_holding_objects_are_refused_without_running_them(tmp_path):
    like = MsZoo(STYLES["plain"])
    module_file = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), module_file)
    error = _expect_failure(like, module_file, CheckpointFileError, "holds objects other than tensors",
                            "refused the pickled object torch.nn.modules.linear.Linear",
                            "torch.save(model.state_dict(), path)")
    # torch's own advice (paragraphs, terminal colour codes) is not repeated
    assert "\x1b[" not in str(error) and "trust" not in str(error)

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    sd = TorchZoo(STYLES["plain"]).state_dict()
    sd["payload"] = _write_then_open_marker(marker)
    torch.save(sd, evil)
    assert not marker.exists()
    _expect_failure(like, evil, CheckpointFileError, "holds objects other than tensors", "never unpickles")
    assert not marker.exists()
    # The marker is a real witness: unpickling without weights_only does run the payload.
    loaded = torch.load(evil, weights_only=False)
    loaded["payload"].close()
    assert marker.exists()


def test_nested_checkpoint(tmp_path):
    sd = TorchZoo(STYLES["legacy"]).state_dict()
    nested = {"generator": sd, "step": 3}
    path = tmp_path / "nested.pt"
    torch.save(nested, path)
    like = MsZoo(STYLES["legacy"])
    for source in (nested, path):
        _expect_failure(like, source, ConversionError, "is not a plain state dict", "'generator': OrderedDict",
                        "entry='generator'")
    # named, the entry converts: the same tensors as the plain state dict gives
    loaded = xnorm.convert(path, to="mindspore", like=like, entry="generator")
    plain = xnorm.convert(sd, to="mindspore", like=like)
    assert all(np.array_equal(loaded[k].asnumpy(), plain[k].asnumpy()) for k in plain)


def test_like_of_the_wrong_framework():
    torch_model = TorchZoo(STYLES["legacy"])
    ms_model = MsZoo(STYLES["legacy"])
    with pytest.raises(ConversionError, match=r"like= is a torch model but to='mindspore'; pass a mindspore model"):
        xnorm.convert(torch_model.state_dict(), to="mindspore", like=TorchZoo(STYLES["legacy"]), load=True)
    before = _snapshot(ms_model)
    with pytest.raises(ConversionError, match=r"like= is a mindspore model but to='torch'; pass a torch model"):
        xnorm.convert(ms_model, to="torch", like=MsZoo(STYLES["legacy"]), load=True)
    _assert_same_arrays(_snapshot(ms_model), before)
    with pytest.raises(ConversionError, match="like= must be the target mindspore model"):
        xnorm.convert(torch_model.state_dict(), to="mindspore", like=object())


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "damaged_data", "empty", "absent", "append_dict"])
def test_unreadable_mindspore_files(tmp_path, damage):
    _, ms_model, result = _convert_zoo("legacy", load=True)
    path = tmp_path / "zoo.ckpt"
    if damage == "damaged_data":  # a file written by xnorm's save carries a CRC: damaged tensor bytes are found
        save(result, path, to="mindspore")
        data = bytearray(path.read_bytes())
        at = data.index(result["lin.weight_v"].asnumpy().tobytes())
        data[at:at + 8] = b"XXXXXXXX"
        path.chmod(0o600)
        path.write_bytes(bytes(data))
    elif damage == "append_dict":
        ms.save_checkpoint(ms_model, str(path), append_dict={"tag": "v1"})
    elif damage != "absent":
        ms.save_checkpoint(ms_model, str(path))
        if damage == "truncated":
            _truncate(path)
        elif damage == "corrupt":
            path.chmod(0o600)
            noise = np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8)
            path.write_bytes(bytes(noise) + b"not a protobuf" * 40)
        else:
            path.chmod(0o600)
            path.write_bytes(b"")
    file_bytes = path.read_bytes() if path.exists() else None
    like = TorchZoo(STYLES["legacy"])
    like_before = {k: v.clone() for k, v in like.state_dict().items()}
    error_type = ConversionError if damage == "append_dict" else CheckpointFileError
    with pytest.raises(error_type) as info:
        xnorm.convert(path, to="torch", like=like, load=True)
    message = str(info.value)
    assert repr(str(path)) in message
    assert {
        "truncated": "truncated or corrupt", "corrupt": "truncated or corrupt",
        "damaged_data": "truncated or corrupt", "empty": "is empty (0 bytes)",
        "absent": "does not exist", "append_dict": "'tag': str are not tensors",
    }[damage] in message
    assert all(torch.equal(v, like_before[k]) for k, v in like.state_dict().items())
    if file_bytes is not None:
        assert path.read_bytes() == file_bytes


def test_mindspore_sources_that_are_not_checkpoints():
    like = TorchZoo(STYLES["legacy"])
    with pytest.raises(ConversionError, match="needs a MindSpore or Flax source"):
        xnorm.convert([1, 2], to="torch", like=like)
    from xnorm._backends.mindspore import convert as ms_convert

    with pytest.raises(ConversionError, match="'a': int are not tensors"):
        ms_convert.read({"a": 1, "b": Tensor(np.ones(2, np.float32))})
    with pytest.raises(ConversionError, match="has no parameters"):
        ms_convert.read(msnn.ReLU())


def test_duplicate_parameter_names_in_like():
    class Clash(msnn.Cell):
        def __init__(self):
            super().__init__()
            self.a = Parameter(Tensor(np.ones(2, np.float32)), name="x")
            self.b = Parameter(Tensor(np.zeros(2, np.float32)), name="x")

    with pytest.raises(ConversionError, match=r"'x' names both a and b"):
        xnorm.convert({"a": torch.ones(2), "b": torch.ones(2)}, to="mindspore", like=Clash())


# -- save -------------------------------------------------------------------------------------------------------


def test_save_is_atomic(tmp_path, monkeypatch):
    _, like, result = _convert_zoo("legacy")
    path = tmp_path / "out.ckpt"
    save(result, path, to="mindspore")
    reloaded = ms.load_checkpoint(str(path))
    _assert_same_arrays({k: p.asnumpy() for k, p in reloaded.items()}, {k: p.asnumpy() for k, p in result.items()})
    good = path.read_bytes()

    def failing_save(save_obj, ckpt_file_name, *args, **kwargs):
        Path(ckpt_file_name).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ms, "save_checkpoint", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save(result, path, to="mindspore")
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt"]  # no partial file left behind
    monkeypatch.undo()

    with pytest.raises(OptionError, match="use a .ckpt path"):
        save(result, tmp_path / "out.safetensors", to="mindspore")
    with pytest.raises(ConversionError, match="non-tensor values"):
        save({"a": np.ones(2)}, tmp_path / "other.ckpt", to="mindspore")
    with pytest.raises(CheckpointFileError, match="does not exist"):
        save(result, tmp_path / "no-such-folder" / "out.ckpt", to="mindspore")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt"]


# -- docs -------------------------------------------------------------------------------------------------------


def test_docs_example_runs(tmp_path, monkeypatch):
    """docs/mindspore.md, "Checkpoint conversion": the first example runs as written and says what it prints."""
    monkeypatch.chdir(tmp_path)  # it writes model.pt and model.ckpt into the working directory
    docs = Path(__file__).resolve().parents[2] / "docs" / "mindspore.md"
    section = docs.read_text().split("\n## Checkpoint conversion\n", 1)[1]
    script = tmp_path / "docs_example.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    namespace = runpy.run_path(str(script), run_name="docs_example")
    reference, net, params, state = (namespace[k] for k in ("reference", "net", "params", "state"))
    assert sorted(params) == ["conv.bias", "conv.weight_g", "conv.weight_v", "norm.beta", "norm.gamma",
                              "norm.moving_mean", "norm.moving_variance"]
    assert params["conv.weight_v"].shape == (64, 80, 1, 7)
    xnorm.compare(reference, net, namespace["mel"]).assert_close()
    _assert_torch_state_equal(state, reference)


# -- shared modules (a TCN block registers its conv as conv1 and as net.0) -----------------------------------


class _TorchSharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = xnorm.weight_norm(nn.Conv1d(3, 4, 3, padding=1))
        self.net = nn.Sequential(self.conv1, nn.ReLU())
        self.out = nn.Conv1d(4, 2, 1)

    def forward(self, x):
        return self.out(self.net(x))


class _MsSharedBlock(msnn.Cell):
    def __init__(self):
        super().__init__()
        self.conv1 = xnorm.weight_norm(msnn.Conv1d(3, 4, 3, pad_mode="pad", padding=1, has_bias=True))
        self.net = msnn.SequentialCell([self.conv1, msnn.ReLU()])
        self.out = msnn.Conv1d(4, 2, 1, has_bias=True)

    def construct(self, x):
        return self.out(self.net(x))


def test_a_module_shared_under_two_names_converts_both_ways():
    torch.manual_seed(0)
    source = _TorchSharedBlock()
    assert "conv1.bias" in source.state_dict() and "net.0.bias" in source.state_dict()  # both names, one tensor
    target = _MsSharedBlock()
    xnorm.convert(source.state_dict(), to="mindspore", like=target, load=True)  # strict: nothing left over
    x = np.random.default_rng(0).standard_normal((2, 3, 9)).astype(np.float32)
    assert xnorm.compare(source, target, [x]).ok
    # back: the torch model's two names of the shared tensors are both filled, from MindSpore's one
    back = _TorchSharedBlock()
    state = xnorm.convert(target, to="torch", like=back, load=True)
    assert list(state) == list(source.state_dict())
    for key, tensor in source.state_dict().items():
        assert torch.equal(state[key], tensor), key
    plan, _ = porting._plan(source.state_dict(), to="mindspore", like=_MsSharedBlock())
    assert "source keys name a tensor already mapped under another key" in plan.summary()
