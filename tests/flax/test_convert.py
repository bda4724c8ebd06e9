"""xnorm.convert between torch and Flax (linen variables and NNX modules), and xnorm.compare.

One torch model holds every supported kind (Embedding, Linear, LayerNorm, Conv1d with groups, BatchNorm1d,
ConvTranspose1d with stride, a grouped ConvTranspose1d, Conv2d, ConvTranspose2d, BatchNorm2d), weight-normed
in both torch styles (``torch.nn.utils.weight_norm`` and ``parametrizations.weight_norm``) and plain, with
``dim=0``, ``dim=1`` and ``dim=None``. The Flax models mirror it in NNX and in linen, wrapped with
``xnorm.wrap(..., dim=same)``. The expected Flax layout of every tensor is written out below by hand
(``EXPECTED``), independently of xnorm's tables.

Flax has no grouped ConvTranspose, so the grouped transposed convolution is a small custom module here
(``kernel`` ``(k, out/groups, in)``, the layout xnorm reads for a rank-3 ``kernel`` of a module it does not
know); its outputs are checked against torch's like every other layer's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn
from flax import nnx, serialization
from flax.core import FrozenDict
from torch import nn as tnn
from torch.nn.utils import parametrizations

import xnorm
from xnorm import porting
from xnorm.errors import CheckpointFileError, ConversionError, OptionError

# -- the torch model -------------------------------------------------------------------------------


def legacy(module, dim=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module, dim=dim)


def modern(module, dim=0):
    return parametrizations.weight_norm(module, dim=dim)


class TorchZoo(tnn.Module):
    """``forward(ids, x1, x2) -> (a, b, c)``, channels first; ``swap`` exchanges the two weight-norm styles."""

    def __init__(self, swap: bool = False):
        super().__init__()
        first, second = (modern, legacy) if swap else (legacy, modern)
        self.emb = second(tnn.Embedding(11, 6), dim=1)
        self.fc = first(tnn.Linear(6, 5), dim=0)
        self.ln = tnn.LayerNorm(5)
        self.c1 = second(tnn.Conv1d(4, 8, 3, padding=1, groups=2), dim=None)
        self.bn1 = tnn.BatchNorm1d(8)
        self.ct1 = first(tnn.ConvTranspose1d(8, 6, 4, stride=2, padding=1), dim=1)
        self.gct = tnn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, groups=2)
        self.head = tnn.Conv1d(4, 2, 1)
        self.blocks = tnn.ModuleList(
            [first(tnn.Conv2d(3, 4, 3, padding=1), dim=0), second(tnn.ConvTranspose2d(4, 2, 2, stride=2), dim=0)]
        )
        self.bn2 = tnn.BatchNorm2d(4)

    def forward(self, ids, x1, x2):
        a = self.ln(self.fc(self.emb(ids))).transpose(1, 2)  # channels first, as the other outputs
        b = self.head(self.gct(self.ct1(F.leaky_relu(self.bn1(self.c1(x1)), 0.1))))
        c = self.blocks[1](self.bn2(self.blocks[0](x2)))
        return a, b, c


def torch_zoo(swap: bool = False, seed: int = 0) -> TorchZoo:
    torch.manual_seed(seed)
    model = TorchZoo(swap)
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_()
            # num_batches_tracked stays 0: Flax has no counterpart, so the way back fills it with zeros.
    return model.eval()


def inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 11, size=(2, 7))
    x1 = rng.standard_normal((2, 4, 9)).astype(np.float32)
    x2 = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    return ids, x1, x2


# -- the expected Flax layout, written out ---------------------------------------------------------


def same(w):
    return w


def linear(w):  # torch (out, in) -> Flax (in, out)
    return w.transpose(1, 0)


def conv1d(w):  # torch (a, b, k) -> Flax (k, b, a), a conv's and a transposed conv's alike
    return w.transpose(2, 1, 0)


def conv2d(w):  # torch (a, b, kh, kw) -> Flax (kh, kw, b, a)
    return w.transpose(2, 3, 1, 0)


#: torch key -> (NNX key, linen key, torch array -> Flax array)
EXPECTED = {
    "emb.parametrizations.weight.original0": ("emb/embedding_g", "params/emb/embedding_g", same),
    "emb.parametrizations.weight.original1": ("emb/embedding_v", "params/emb/embedding_v", same),
    "fc.weight_g": ("fc/kernel_g", "params/fc/kernel_g", linear),
    "fc.weight_v": ("fc/kernel_v", "params/fc/kernel_v", linear),
    "fc.bias": ("fc/bias", "params/fc/bias", same),
    "ln.weight": ("ln/scale", "params/ln/scale", same),
    "ln.bias": ("ln/bias", "params/ln/bias", same),
    "c1.bias": ("c1/bias", "params/c1/bias", same),
    "c1.parametrizations.weight.original0": ("c1/kernel_g", "params/c1/kernel_g", same),  # 0-d (dim=None)
    "c1.parametrizations.weight.original1": ("c1/kernel_v", "params/c1/kernel_v", conv1d),
    "bn1.weight": ("bn1/scale", "params/bn1/scale", same),
    "bn1.bias": ("bn1/bias", "params/bn1/bias", same),
    "bn1.running_mean": ("bn1/mean", "batch_stats/bn1/mean", same),
    "bn1.running_var": ("bn1/var", "batch_stats/bn1/var", same),
    "ct1.bias": ("ct1/bias", "params/ct1/bias", same),
    "ct1.weight_g": ("ct1/kernel_g", "params/ct1/kernel_g", conv1d),
    "ct1.weight_v": ("ct1/kernel_v", "params/ct1/kernel_v", conv1d),
    "gct.weight": ("gct/kernel", "params/gct/kernel", conv1d),
    "gct.bias": ("gct/bias", "params/gct/bias", same),
    "head.weight": ("head/kernel", "params/head/kernel", conv1d),
    "head.bias": ("head/bias", "params/head/bias", same),
    "blocks.0.bias": ("blocks/0/bias", "params/blocks_0/bias", same),
    "blocks.0.weight_g": ("blocks/0/kernel_g", "params/blocks_0/kernel_g", conv2d),
    "blocks.0.weight_v": ("blocks/0/kernel_v", "params/blocks_0/kernel_v", conv2d),
    "blocks.1.bias": ("blocks/1/bias", "params/blocks_1/bias", same),
    "blocks.1.parametrizations.weight.original0": ("blocks/1/kernel_g", "params/blocks_1/kernel_g", conv2d),
    "blocks.1.parametrizations.weight.original1": ("blocks/1/kernel_v", "params/blocks_1/kernel_v", conv2d),
    "bn2.weight": ("bn2/scale", "params/bn2/scale", same),
    "bn2.bias": ("bn2/bias", "params/bn2/bias", same),
    "bn2.running_mean": ("bn2/mean", "batch_stats/bn2/mean", same),
    "bn2.running_var": ("bn2/var", "batch_stats/bn2/var", same),
}
TORCH_ONLY = {"bn1.num_batches_tracked", "bn2.num_batches_tracked"}


def test_expected_table_covers_the_torch_model():
    assert set(torch_zoo().state_dict()) == set(EXPECTED) | TORCH_ONLY


# -- the Flax models -------------------------------------------------------------------------------


def grouped_conv_transpose(x, kernel, bias, stride: int, padding: int, groups: int):
    """torch's grouped ConvTranspose1d, channels last. ``kernel`` is ``(k, out/groups, in)``."""
    k, out_per_group, in_channels = kernel.shape
    in_per_group = in_channels // groups
    # Per group, a transposed conv is a conv with the kernel flipped and its channel axes swapped:
    # (k, out/g, g, in/g) -> (k, in/g, g, out/g) -> (k, in/g, out), then flipped along k.
    forward_kernel = kernel.reshape(k, out_per_group, groups, in_per_group).transpose(0, 3, 2, 1)
    forward_kernel = forward_kernel.reshape(k, in_per_group, groups * out_per_group)[::-1]
    pad = k - 1 - padding
    y = jax.lax.conv_general_dilated(
        x,
        forward_kernel,
        window_strides=(1,),
        padding=[(pad, pad)],
        lhs_dilation=(stride,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + bias


class NNXGroupedConvTranspose1d(nnx.Module):
    def __init__(self, cin, cout, k, *, stride, padding, groups, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (k, cout // groups, cin), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.stride, self.padding, self.groups = stride, padding, groups

    def __call__(self, x):
        return grouped_conv_transpose(
            x, self.kernel.get_value(), self.bias.get_value(), self.stride, self.padding, self.groups
        )


class LinenGroupedConvTranspose1d(nn.Module):
    cin: int
    cout: int
    k: int
    stride: int
    padding: int
    groups: int

    @nn.compact
    def __call__(self, x):
        shape = (self.k, self.cout // self.groups, self.cin)
        kernel = self.param("kernel", nn.initializers.normal(), shape, jnp.float32)  # x64 is on in these tests
        bias = self.param("bias", nn.initializers.zeros, (self.cout,), jnp.float32)
        return grouped_conv_transpose(x, kernel, bias, self.stride, self.padding, self.groups)


def ct_padding(k, p):
    return [(k - 1 - p, k - 1 - p)]


class NNXZoo(nnx.Module):
    """``(ids, x1, x2) -> (a, b, c)`` channels last; ``names`` renames the top-level attributes."""

    def __init__(self, *, transpose_kernel: bool = True, names=None, rngs=None):
        rngs = rngs or nnx.Rngs(0)
        self._names = names or {}
        norm = dict(epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        layers = dict(
            emb=xnorm.wrap(nnx.Embed(11, 6, rngs=rngs), dim=1),
            fc=xnorm.wrap(nnx.Linear(6, 5, rngs=rngs), dim=0),
            ln=nnx.LayerNorm(5, **norm),
            c1=xnorm.wrap(nnx.Conv(4, 8, (3,), padding=[(1, 1)], feature_group_count=2, rngs=rngs), dim=None),
            bn1=nnx.BatchNorm(8, **norm),
            ct1=xnorm.wrap(
                nnx.ConvTranspose(
                    8, 6, (4,), strides=(2,), padding=ct_padding(4, 1), transpose_kernel=transpose_kernel, rngs=rngs
                ),
                dim=1,
            ),
            gct=NNXGroupedConvTranspose1d(6, 4, 3, stride=2, padding=1, groups=2, rngs=rngs),
            head=nnx.Conv(4, 2, (1,), padding=[(0, 0)], rngs=rngs),
            blocks=nnx.List(
                [
                    xnorm.wrap(nnx.Conv(3, 4, (3, 3), padding=[(1, 1), (1, 1)], rngs=rngs), dim=0),
                    xnorm.wrap(
                        nnx.ConvTranspose(
                            4,
                            2,
                            (2, 2),
                            strides=(2, 2),
                            padding=ct_padding(2, 0) * 2,
                            transpose_kernel=True,
                            rngs=rngs,
                        ),
                        dim=0,
                    ),
                ]
            ),
            bn2=nnx.BatchNorm(4, **norm),
        )
        for name, layer in layers.items():
            setattr(self, self._names.get(name, name), layer)

    def _layer(self, name):
        return getattr(self, self._names.get(name, name))

    def __call__(self, ids, x1, x2):
        layer = self._layer
        a = layer("ln")(layer("fc")(layer("emb")(ids)))
        b = layer("head")(layer("gct")(layer("ct1")(jax.nn.leaky_relu(layer("bn1")(layer("c1")(x1)), 0.1))))
        blocks = layer("blocks")
        c = blocks[1](layer("bn2")(blocks[0](x2)))
        return a, b, c


class LinenZoo(nn.Module):
    """The linen mirror of TorchZoo (inference: batch norms use their running averages)."""

    def setup(self):
        norm = dict(epsilon=1e-5, use_fast_variance=False)
        self.emb = xnorm.wrap(nn.Embed(11, 6), dim=1)
        self.fc = xnorm.wrap(nn.Dense(5), dim=0)
        self.ln = nn.LayerNorm(**norm)
        self.c1 = xnorm.wrap(nn.Conv(8, (3,), padding=[(1, 1)], feature_group_count=2), dim=None)
        self.bn1 = nn.BatchNorm(use_running_average=True, **norm)
        self.ct1 = xnorm.wrap(
            nn.ConvTranspose(6, (4,), strides=(2,), padding=ct_padding(4, 1), transpose_kernel=True), dim=1
        )
        self.gct = LinenGroupedConvTranspose1d(6, 4, 3, stride=2, padding=1, groups=2)
        self.head = nn.Conv(2, (1,), padding=[(0, 0)])
        self.blocks = [
            xnorm.wrap(nn.Conv(4, (3, 3), padding=[(1, 1), (1, 1)]), dim=0),
            xnorm.wrap(
                nn.ConvTranspose(2, (2, 2), strides=(2, 2), padding=ct_padding(2, 0) * 2, transpose_kernel=True), dim=0
            ),
        ]
        self.bn2 = nn.BatchNorm(use_running_average=True, **norm)

    def __call__(self, ids, x1, x2):
        a = self.ln(self.fc(self.emb(ids)))
        b = self.head(self.gct(self.ct1(jax.nn.leaky_relu(self.bn1(self.c1(x1)), 0.1))))
        c = self.blocks[1](self.bn2(self.blocks[0](x2)))
        return a, b, c


def channels_last(arrays):
    return tuple(np.moveaxis(x, 1, -1) if x.ndim > 2 else x for x in arrays)


def linen_variables(module=None, frozen: bool = False):
    module = module or LinenZoo()
    variables = module.init(jax.random.key(0), *channels_last(inputs()))
    variables = jax.tree_util.tree_map(lambda x: x, variables)  # a plain dict copy
    return FrozenDict(variables) if frozen else dict(variables)


# -- snapshots: what "untouched" means -------------------------------------------------------------


def flat(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, (dict, FrozenDict)):
            out.update(flat(value, path))
        else:
            out["/".join(path)] = value
    return out


def nnx_snapshot(model):
    return {
        "/".join(map(str, path)): np.array(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))
    }


def linen_snapshot(variables):
    return {key: (type(value), np.array(value)) for key, value in flat(variables).items()}


def torch_snapshot(model):
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def assert_same_nnx(model, snapshot):
    after = nnx_snapshot(model)
    assert after.keys() == snapshot.keys()
    for key, value in snapshot.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
        assert after[key].dtype == value.dtype


def assert_same_torch(model, snapshot):
    after = model.state_dict()
    assert list(after) == list(snapshot)
    for key, tensor in snapshot.items():
        assert torch.equal(after[key], tensor), key


def torch_numpy(model):
    return {key: tensor.detach().numpy() for key, tensor in model.state_dict().items()}


# -- torch -> Flax ---------------------------------------------------------------------------------


def test_torch_to_nnx_matches_the_written_layout():
    source = torch_zoo()
    like = NNXZoo()
    before = nnx_snapshot(like)
    state = xnorm.convert(source.state_dict(), to="flax", like=like)
    assert isinstance(state, nnx.State)
    got = {"/".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(state)}
    assert set(got) == {nnx_key for nnx_key, _, _ in EXPECTED.values()}
    for torch_key, array in torch_numpy(source).items():
        if torch_key in TORCH_ONLY:
            continue
        nnx_key, _, to_flax = EXPECTED[torch_key]
        expected = to_flax(array)
        assert got[nnx_key].shape == expected.shape, nnx_key
        assert got[nnx_key].dtype == expected.dtype, nnx_key
        np.testing.assert_array_equal(np.asarray(got[nnx_key]), expected, err_msg=nnx_key)
    assert_same_nnx(like, before)  # load=False: the model is not written to


@pytest.mark.parametrize("frozen", [False, True], ids=["dict", "FrozenDict"])
def test_torch_to_linen_matches_the_written_layout(frozen):
    source = torch_zoo()
    like = linen_variables(frozen=frozen)
    before = linen_snapshot(like)
    variables = xnorm.convert(source.state_dict(), to="flax", like=like)
    assert type(variables) is type(like)
    assert type(variables["params"]) is type(like["params"])
    got = flat(variables)
    assert set(got) == {linen_key for _, linen_key, _ in EXPECTED.values()}
    for torch_key, array in torch_numpy(source).items():
        if torch_key in TORCH_ONLY:
            continue
        _, linen_key, to_flax = EXPECTED[torch_key]
        assert isinstance(got[linen_key], jax.Array)
        assert got[linen_key].dtype == to_flax(array).dtype
        np.testing.assert_array_equal(np.asarray(got[linen_key]), to_flax(array), err_msg=linen_key)
    after = linen_snapshot(like)
    assert after.keys() == before.keys()
    for key, (kind, value) in before.items():
        assert after[key][0] is kind
        np.testing.assert_array_equal(after[key][1], value)


def test_linen_like_may_be_abstract():
    """jax.eval_shape(module.init, ...) describes the target without initialising random weights."""
    source = torch_zoo()
    abstract = jax.eval_shape(LinenZoo().init, jax.random.key(0), *channels_last(inputs()))
    variables = xnorm.convert(source.state_dict(), to="flax", like=abstract)
    concrete = xnorm.convert(source.state_dict(), to="flax", like=linen_variables())
    for key, value in flat(concrete).items():
        np.testing.assert_array_equal(np.asarray(flat(variables)[key]), np.asarray(value))


def test_nnx_outputs_agree_with_torch_after_load():
    source = torch_zoo()
    like = NNXZoo()
    state = xnorm.convert(source.state_dict(), to="flax", like=like, load=True)
    loaded = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
    snapshot = nnx_snapshot(like)
    for key, value in loaded.items():
        np.testing.assert_array_equal(snapshot[key], value)
    comparison = xnorm.compare(source, like, inputs(), channels_last=True)
    assert comparison.ok, str(comparison)
    assert len(comparison.outputs) == 3


def test_nnx_training_after_load_compiles_its_step_once(caplog):
    """Loaded arrays are created as Flax creates parameters (uncommitted): committed ones change the jit
    signature after the first step (the optimizer's outputs follow them), and the second step compiled again."""
    import optax

    source = torch_zoo()
    model = NNXZoo()
    xnorm.convert(source.state_dict(), to="flax", like=model, load=True)
    optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
    x = tuple(jnp.asarray(a) for a in channels_last(inputs()))

    @nnx.jit
    def train_step(model, optimizer, x):
        def loss(m):
            return sum(jnp.mean(y**2) for y in m(*x))

        optimizer.update(model, nnx.grad(loss)(model))

    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING"):
            for _ in range(3):
                train_step(model, optimizer, x)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:200] for r in compiles]


def test_linen_outputs_agree_with_torch():
    source = torch_zoo()
    variables = xnorm.convert(source.state_dict(), to="flax", like=linen_variables())
    comparison = xnorm.compare(source, (LinenZoo(), variables), inputs(), channels_last=True)
    assert comparison.ok, str(comparison)


@pytest.mark.parametrize("transpose_kernel", [True, False])
def test_linen_conv_transpose_kernel_flip_is_caught_by_compare(transpose_kernel):
    """The documented linen limitation: with as many inputs as outputs, variables cannot reveal
    transpose_kernel=False (the kernel shapes agree); the conversion goes through and compare() shows it."""
    torch.manual_seed(0)
    source = tnn.ConvTranspose1d(4, 4, 3, stride=2, padding=1).eval()
    module = nn.ConvTranspose(4, (3,), strides=(2,), padding=ct_padding(3, 1), transpose_kernel=transpose_kernel)
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    like = module.init(jax.random.key(0), np.moveaxis(x, 1, -1))
    variables = xnorm.convert(source.state_dict(), to="flax", like=like)
    comparison = xnorm.compare(source, (module, variables), x, channels_last=True)
    assert comparison.ok is transpose_kernel, str(comparison)


def test_nnx_conv_transpose_without_transpose_kernel_is_refused():
    source = torch_zoo()
    like = NNXZoo(transpose_kernel=False)
    before = nnx_snapshot(like)
    with pytest.raises(ConversionError) as error:
        xnorm.convert(source.state_dict(), to="flax", like=like, load=True)
    message = str(error.value)
    assert "ct1" in message and "transpose_kernel=False" in message and "transpose_kernel=True" in message
    assert "blocks/1" not in message  # the layer built with transpose_kernel=True is fine
    assert_same_nnx(like, before)


def test_fused_wrappers_are_targets_too():
    """xnorm.wrap(..., fused=True) has the same variables: the conversion reads its layer kind through it."""
    torch.manual_seed(0)
    source = legacy(tnn.ConvTranspose1d(4, 3, 4, stride=2, padding=1), dim=0).eval()
    layer = nnx.ConvTranspose(
        4, 3, (4,), strides=(2,), padding=ct_padding(4, 1), transpose_kernel=True, rngs=nnx.Rngs(0)
    )
    like = xnorm.wrap(layer, dim=0, fused=True)
    xnorm.convert(source.state_dict(), to="flax", like=like, load=True)
    np.testing.assert_array_equal(np.asarray(like.kernel_v.get_value()), source.weight_v.detach().numpy().T)
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    assert xnorm.compare(source, like, x, channels_last=True).ok


def test_plain_nnx_conv_transpose_without_transpose_kernel_is_refused():
    source = {"weight": torch.zeros(4, 3, 5), "bias": torch.zeros(3)}
    like = nnx.ConvTranspose(4, 3, (5,), rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match="transpose_kernel=True"):
        xnorm.convert(source, to="flax", like=like)


def test_from_a_safetensors_and_a_pt_file(tmp_path):
    source = torch_zoo()
    reference = xnorm.convert(source.state_dict(), to="flax", like=NNXZoo())
    for name in ("zoo.safetensors", "zoo.pt"):
        path = tmp_path / name
        porting.save(source.state_dict(), path, to="torch")
        data = path.read_bytes()
        state = xnorm.convert(path, to="flax", like=NNXZoo())
        for (p, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(reference), strict=True):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
        assert path.read_bytes() == data


# -- Flax -> torch ---------------------------------------------------------------------------------


def _nnx_ported(swap: bool = False):
    source = torch_zoo(swap)
    model = NNXZoo()
    xnorm.convert(source.state_dict(), to="flax", like=model, load=True)
    return source, model


def _sources(kind: str, tmp_path: Path):
    """A Flax source of the ported zoo, in each form the way back reads."""
    source = torch_zoo()
    if kind.startswith("linen"):
        variables = xnorm.convert(source.state_dict(), to="flax", like=linen_variables())
        if kind == "linen-variables":
            return source, variables
        path = tmp_path / "zoo.msgpack"
        porting.save(variables, path, to="flax")
        return source, path
    model = NNXZoo()
    state = xnorm.convert(source.state_dict(), to="flax", like=model, load=True)
    if kind == "nnx-module":
        return source, model
    if kind == "nnx-state":
        return source, nnx.state(model)
    if kind == "nnx-pure-dict":
        return source, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))
    path = tmp_path / "zoo.msgpack"
    porting.save(state, path, to="flax")
    return source, path


def test_back_from_a_msgpack_without_suffix_and_from_one_entry_of_a_training_checkpoint(tmp_path):
    original, path = _sources("linen-file", tmp_path)
    expected = torch_snapshot(original)
    bare = tmp_path / "zoo_step_1000"  # read by its content: a msgpack map with string keys
    bare.write_bytes(path.read_bytes())
    assert porting.file_format(bare) == "msgpack"
    state_dict = xnorm.convert(bare, to="torch", like=torch_zoo(seed=99))
    assert all(torch.equal(state_dict[k], t) for k, t in expected.items())
    # a training checkpoint: the variables beside a step count; entry= picks them
    variables = serialization.msgpack_restore(path.read_bytes())
    checkpoint = tmp_path / "train_state.msgpack"
    checkpoint.write_bytes(serialization.msgpack_serialize({"model": variables, "step": 1000}))
    with pytest.raises(ConversionError, match="not arrays"):
        xnorm.convert(checkpoint, to="torch", like=torch_zoo(seed=99))
    state_dict = xnorm.convert(checkpoint, to="torch", like=torch_zoo(seed=99), entry="model")
    assert all(torch.equal(state_dict[k], t) for k, t in expected.items())


@pytest.mark.parametrize(
    "kind", ["nnx-module", "nnx-state", "nnx-pure-dict", "nnx-file", "linen-variables", "linen-file"]
)
def test_back_to_torch_is_bit_exact(kind, tmp_path):
    original, flax_source = _sources(kind, tmp_path)
    expected = torch_snapshot(original)
    file_bytes = flax_source.read_bytes() if isinstance(flax_source, Path) else None
    target = torch_zoo(seed=99)  # other values everywhere
    state_dict = xnorm.convert(flax_source, to="torch", like=target)
    assert list(state_dict) == list(expected)  # the torch model's own keys, in its order, both styles
    for key, tensor in expected.items():
        assert state_dict[key].dtype == tensor.dtype, key
        assert torch.equal(state_dict[key], tensor), key
    if file_bytes is not None:
        assert flax_source.read_bytes() == file_bytes


def test_back_to_torch_into_the_other_weight_norm_style():
    """A model weight-normed with torch's other style gets the same values under its own keys."""
    original, model = _nnx_ported(swap=False)
    target = torch_zoo(swap=True, seed=5)
    state_dict = xnorm.convert(model, to="torch", like=target, load=True)
    assert "fc.parametrizations.weight.original0" in state_dict and "emb.weight_g" in state_dict
    values = original.state_dict()
    assert torch.equal(state_dict["fc.parametrizations.weight.original1"], values["fc.weight_v"])
    assert torch.equal(state_dict["emb.weight_g"], values["emb.parametrizations.weight.original0"])
    assert torch.equal(state_dict["c1.weight_g"], values["c1.parametrizations.weight.original0"])
    for a, b in zip(original(*map(torch.as_tensor, inputs())), target(*map(torch.as_tensor, inputs())), strict=True):
        assert torch.equal(a, b)


def test_back_to_torch_with_load(tmp_path):
    original, model = _nnx_ported()
    target = torch_zoo(seed=3)
    state_dict = xnorm.convert(model, to="torch", like=target, load=True)
    assert_same_torch(target, state_dict)
    assert_same_torch(target, torch_snapshot(original))


def test_reading_a_flax_source_never_modifies_it():
    _, model = _nnx_ported()
    model.train()
    before = nnx_snapshot(model)
    xnorm.convert(model, to="torch", like=torch_zoo(seed=3))
    assert_same_nnx(model, before)
    assert model.bn1.use_running_average is False


# -- rename and cast -------------------------------------------------------------------------------

RENAMED = {"emb": "embed", "fc": "proj", "blocks": "stack"}


def test_rename_into_a_model_with_other_names():
    source = torch_zoo()
    like = NNXZoo(names=RENAMED)
    with pytest.raises(ConversionError) as error:
        xnorm.convert(source.state_dict(), to="flax", like=like)
    assert "rename=" in str(error.value)  # the hint for models named differently
    rules = {r"^embed\.": "emb.", r"^proj\.": "fc.", r"^stack\.": "blocks."}
    state = xnorm.convert(source.state_dict(), to="flax", like=like, rename=rules, load=True)
    got = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}
    values = torch_numpy(source)
    np.testing.assert_array_equal(got["proj/kernel_v"], values["fc.weight_v"].T)
    np.testing.assert_array_equal(
        got["stack/1/kernel_v"], values["blocks.1.parametrizations.weight.original1"].transpose(2, 3, 1, 0)
    )
    assert xnorm.compare(source, like, inputs(), channels_last=True).ok

    # A function does the same; the way back renames the Flax keys.
    def function(key):
        head, dot, tail = key.partition(".")
        return {v: k for k, v in RENAMED.items()}.get(head, head) + dot + tail

    again = xnorm.convert(source.state_dict(), to="flax", like=NNXZoo(names=RENAMED), rename=function)
    for (_, a), (_, b) in zip(nnx.to_flat_state(again), nnx.to_flat_state(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    back = xnorm.convert(
        like, to="torch", like=torch_zoo(seed=4), rename={r"^emb/": "embed/", r"^fc/": "proj/", r"^blocks/": "stack/"}
    )
    for key, tensor in source.state_dict().items():
        assert torch.equal(back[key], tensor), key


def test_cast():
    source = torch_zoo().double()
    like = NNXZoo()
    before = nnx_snapshot(like)
    with pytest.raises(ConversionError) as error:
        xnorm.convert(source.state_dict(), to="flax", like=like)
    message = str(error.value)
    assert "float32" in message and "float64" in message and "cast=True" in message
    assert f"{len(EXPECTED)} mismatched" in message  # every tensor listed, in one error
    assert_same_nnx(like, before)
    state = xnorm.convert(source.state_dict(), to="flax", like=like, cast=True)
    got = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    for torch_key, array in torch_numpy(source).items():
        if torch_key in TORCH_ONLY:
            continue
        nnx_key, _, to_flax = EXPECTED[torch_key]
        assert got[nnx_key].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got[nnx_key]), to_flax(array).astype(np.float32))


# -- failures: one clear error, nothing modified ---------------------------------------------------


@pytest.fixture
def target():
    like = NNXZoo()
    before = nnx_snapshot(like)
    yield like
    assert_same_nnx(like, before)


def test_missing_key(target):
    state_dict = torch_zoo().state_dict()
    del state_dict["fc.bias"]
    with pytest.raises(ConversionError) as error:
        xnorm.convert(state_dict, to="flax", like=target, load=True)
    message = str(error.value)
    assert "1 missing, 0 unexpected, 0 mismatched" in message
    assert "fc/bias" in message and "'fc.bias'" in message
    assert error.value.missing and not error.value.unexpected


def test_extra_key(target):
    state_dict = torch_zoo().state_dict()
    state_dict["extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as error:
        xnorm.convert(state_dict, to="flax", like=target, load=True)
    assert "0 missing, 1 unexpected" in str(error.value) and "extra.weight (3,)" in str(error.value)


def test_wrong_shape(target):
    state_dict = torch_zoo().state_dict()
    state_dict["fc.weight_v"] = torch.zeros(5, 7)
    with pytest.raises(ConversionError) as error:
        xnorm.convert(state_dict, to="flax", like=target, load=True)
    message = str(error.value)
    assert "fc/kernel_v: shape (6, 5) but 'fc.weight_v' has shape (5, 7) (would become (7, 5))" in message


def test_wrong_dtype(target):
    state_dict = torch_zoo().state_dict()
    state_dict["head.weight"] = state_dict["head.weight"].half()
    with pytest.raises(ConversionError) as error:
        xnorm.convert(state_dict, to="flax", like=target, load=True)
    assert "head/kernel: dtype float32 but 'head.weight' is float16 (pass cast=True to cast)" in str(error.value)


def test_every_problem_in_one_error(target):
    state_dict = torch_zoo().state_dict()
    del state_dict["ln.weight"]
    state_dict["spare"] = torch.zeros(1)
    state_dict["bn2.running_var"] = torch.zeros(5)
    state_dict["gct.bias"] = state_dict["gct.bias"].double()
    with pytest.raises(ConversionError) as error:
        xnorm.convert(state_dict, to="flax", like=target, load=True)
    message = str(error.value)
    assert "1 missing, 1 unexpected, 2 mismatched" in message
    for part in ("ln/scale", "spare", "bn2/var", "gct/bias"):
        assert part in message


def test_a_weight_norm_target_for_a_plain_source(target):
    plain = torch_zoo()
    torch.nn.utils.parametrize.remove_parametrizations(plain.c1, "weight")
    with pytest.raises(ConversionError) as error:
        xnorm.convert(plain.state_dict(), to="flax", like=target, load=True)
    message = str(error.value)
    assert "c1/kernel_g" in message and "c1.weight (8, 2, 3)" in message and "xnorm.weight_norm" in message


def _write_then(tmp_path, name, mutate):
    path = tmp_path / name
    porting.save(torch_zoo().state_dict(), path, to="torch")
    mutate(path)
    return path, path.read_bytes()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_torch_file(target, tmp_path, suffix):
    path, data = _write_then(tmp_path, "zoo" + suffix, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    with pytest.raises(CheckpointFileError) as error:
        xnorm.convert(path, to="flax", like=target, load=True)
    assert str(path) in str(error.value) and ("truncated" in str(error.value) or "corrupt" in str(error.value))
    assert path.read_bytes() == data


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_torch_file(target, tmp_path, suffix):
    def corrupt(p):
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    path, data = _write_then(tmp_path, "zoo" + suffix, corrupt)
    with pytest.raises(CheckpointFileError) as error:
        xnorm.convert(path, to="flax", like=target, load=True)
    assert str(path) in str(error.value)
    assert path.read_bytes() == data


def test_missing_file(target, tmp_path):
    with pytest.raises(CheckpointFileError, match="does not exist"):
        xnorm.convert(tmp_path / "nowhere.safetensors", to="flax", like=target)
    with pytest.raises(CheckpointFileError, match="does not exist"):
        xnorm.convert(tmp_path / "nowhere.msgpack", to="torch", like=torch_zoo())


class Payload:
    """Unpickling this runs ``Path.touch(marker)``: the proof that a loader executed code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_and_never_run(target, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(5, 6), "payload": Payload(marker)}, path)
    data = path.read_bytes()
    with pytest.raises(CheckpointFileError) as error:
        xnorm.convert(path, to="flax", like=target, load=True)
    assert "never unpickles" in str(error.value) and "state_dict" in str(error.value)
    assert not marker.exists()
    assert path.read_bytes() == data
    # The file really carries live code: an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickled_module_is_refused(target, tmp_path):
    path = tmp_path / "module.pt"
    torch.save(tnn.Linear(6, 5), path)
    data = path.read_bytes()
    with pytest.raises(CheckpointFileError, match="objects other than tensors"):
        xnorm.convert(path, to="flax", like=target, load=True)
    assert path.read_bytes() == data


def test_nested_checkpoint(target, tmp_path):
    nested = {"generator": torch_zoo().state_dict(), "step": torch.tensor(3)}
    with pytest.raises(ConversionError) as error:
        xnorm.convert(nested, to="flax", like=target, load=True)
    assert "entries 'generator'" in str(error.value) and "entry='generator'" in str(error.value)
    path = tmp_path / "nested.pt"
    torch.save(nested, path)
    with pytest.raises(ConversionError, match="not a plain state dict"):
        xnorm.convert(path, to="flax", like=target, load=True)


def test_like_of_the_wrong_framework():
    state_dict = torch_zoo().state_dict()
    with pytest.raises(ConversionError, match="like= is a torch model but to='flax'"):
        xnorm.convert(state_dict, to="flax", like=torch_zoo())
    _, model = _nnx_ported()
    with pytest.raises(ConversionError, match="like= is a flax model but to='torch'"):
        xnorm.convert(model, to="torch", like=NNXZoo())


def test_linen_variables_without_params():
    like = linen_variables()
    with pytest.raises(ConversionError, match="no 'params' collection"):
        xnorm.convert(torch_zoo().state_dict(), to="flax", like=dict(like["params"]))


def test_load_into_linen_variables_is_refused():
    like = linen_variables()
    before = linen_snapshot(like)
    with pytest.raises(OptionError, match="immutable"):
        xnorm.convert(torch_zoo().state_dict(), to="flax", like=like, load=True)
    after = linen_snapshot(like)
    for key, (_, value) in before.items():
        np.testing.assert_array_equal(after[key][1], value)


# -- failures on the way back ----------------------------------------------------------------------


@pytest.fixture
def torch_target():
    model = torch_zoo(seed=7)
    before = torch_snapshot(model)
    yield model
    assert_same_torch(model, before)


def test_back_missing_and_extra(torch_target):
    _, model = _nnx_ported()
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState)))
    del pure["fc"]["bias"]
    pure["spare"] = {"kernel": np.zeros(2, np.float32)}
    with pytest.raises(ConversionError) as error:
        xnorm.convert(pure, to="torch", like=torch_target, load=True)
    message = str(error.value)
    assert "1 missing, 1 unexpected" in message and "fc.bias" in message and "'fc/bias'" in message
    assert "spare/kernel (2,)" in message


def test_back_training_checkpoint(torch_target):
    variables = xnorm.convert(torch_zoo().state_dict(), to="flax", like=linen_variables())
    checkpoint = {"step": 3, "params": variables["params"], "batch_stats": variables["batch_stats"]}
    with pytest.raises(ConversionError) as error:
        xnorm.convert(checkpoint, to="torch", like=torch_target, load=True)
    assert "'step': int" in str(error.value) and "{'params': checkpoint['params']}" in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_back_from_a_damaged_msgpack(torch_target, tmp_path, damage):
    _, model = _nnx_ported()
    path = tmp_path / "zoo.msgpack"
    porting.save(nnx.state(model), path, to="flax")
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = b"\xc1" + data[1:]  # 0xc1 is never used by msgpack
    path.write_bytes(data)
    with pytest.raises(CheckpointFileError) as error:
        xnorm.convert(path, to="torch", like=torch_target, load=True)
    assert str(path) in str(error.value) and "truncated or corrupt" in str(error.value)
    assert path.read_bytes() == data


def test_back_from_a_msgpack_of_something_else(torch_target, tmp_path):
    path = tmp_path / "list.msgpack"
    path.write_bytes(serialization.msgpack_serialize([np.zeros(3)]))
    with pytest.raises(ConversionError, match="not a mapping of arrays"):
        xnorm.convert(path, to="torch", like=torch_target, load=True)


# -- save ------------------------------------------------------------------------------------------


def test_save_is_atomic(tmp_path):
    _, model = _nnx_ported()
    path = tmp_path / "zoo.msgpack"
    porting.save(nnx.state(model), path, to="flax")
    data = path.read_bytes()
    restored = serialization.msgpack_restore(data)
    np.testing.assert_array_equal(restored["fc"]["kernel_v"], np.asarray(model.fc.kernel_v.get_value()))
    with pytest.raises(OptionError, match="not arrays"):
        porting.save({"params": {"a": np.zeros(2), "b": "text"}}, path, to="flax")
    with pytest.raises(OptionError, match=".msgpack"):
        porting.save(nnx.state(model), tmp_path / "zoo.npz", to="flax")
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.msgpack"]


def test_save_failure_mid_write_leaves_the_file(tmp_path, monkeypatch):
    _, model = _nnx_ported()
    path = tmp_path / "zoo.msgpack"
    path.write_bytes(b"previous")

    from flax import serialization

    def failing_leaf(*args, **kwargs):  # the map headers are already in the temporary file when a leaf fails
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "msgpack_serialize", failing_leaf)
    with pytest.raises(OSError, match="disk full"):
        porting.save(nnx.state(model), path, to="flax")
    monkeypatch.undo()
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.msgpack"]


# -- run_eval --------------------------------------------------------------------------------------


def test_compare_restores_the_nnx_mode():
    source, model = _nnx_ported()
    model.train()
    assert xnorm.compare(source, model, inputs(), channels_last=True).ok  # eval mode: running averages
    assert model.bn1.use_running_average is False and model.bn2.use_running_average is False
    model.eval()
    xnorm.compare(source, model, inputs(), channels_last=True)
    assert model.bn1.use_running_average is True


def test_compare_sees_a_wrong_weight():
    source, model = _nnx_ported()
    model.head.kernel.set_value(model.head.kernel.get_value() * 1.001)
    comparison = xnorm.compare(source, model, inputs(), channels_last=True)
    assert not comparison.ok
    assert [o.error_over_allowed > 1.0 for o in comparison.outputs] == [False, True, False]


def test_msgpack_files_are_written_leaf_by_leaf_with_flax_s_exact_bytes(tmp_path):
    from flax import serialization

    from xnorm._backends.flax.convert import _write_msgpack

    rng = np.random.default_rng(0)
    tree = {
        "params": {"z": {"kernel_v": rng.standard_normal((3, 4)).astype(np.float32)}, "a_0": {"bias": np.ones(3)}},
        "batch_stats": {"bn": {"mean": np.zeros(2, np.float32), "var": np.ones((), np.float32)}},
    }
    path = tmp_path / "x.msgpack"
    _write_msgpack(tree, path)
    assert path.read_bytes() == serialization.msgpack_serialize(tree)


# -- spectral norm ---------------------------------------------------------------------------------


def test_spectral_state_of_the_wrong_size_is_refused_and_nothing_changes():
    torch.manual_seed(0)
    legacy = torch.nn.utils.spectral_norm(torch.nn.Conv1d(4, 6, 3))
    state = {k: v.detach().clone() for k, v in legacy.state_dict().items()}
    state["weight_u"] = torch.ones(5)  # h is 6
    model = xnorm.spectral_norm(nnx.Conv(4, 6, (3,), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ConversionError, match=r"kernel_u: shape \(6,\) but 'weight_u' has shape \(5,\)"):
        xnorm.convert(state, to="flax", like=model, load=True)
    after = jax.tree.map(np.asarray, nnx.state(model))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("style", ["legacy", "parametrizations"])
def test_spectral_norm_converts_from_both_torch_key_styles_and_back(style):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 6, 3)
    source = torch.nn.utils.spectral_norm(conv) if style == "legacy" else xnorm.spectral_norm(conv)
    x = np.random.default_rng(0).standard_normal((2, 4, 9)).astype(np.float32)
    source(torch.from_numpy(x))  # a training-mode call: the state moves
    model = xnorm.spectral_norm(nnx.Conv(4, 6, (3,), padding="VALID", rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    xnorm.convert(source.state_dict(), to="flax", like=model, load=True)
    np.testing.assert_array_equal(np.asarray(model.kernel_u.get_value()), source.state_dict()["weight_u" if style ==
                                  "legacy" else "parametrizations.weight.0._u"].numpy())
    assert xnorm.compare(source, model, x, channels_last=True).ok
    back = xnorm.convert(model, to="torch", like=source)
    for key, value in source.state_dict().items():
        assert torch.equal(back[key], value), key


class _TorchTied(tnn.Module):
    """Two Linear layers sharing one weight (tied weights): torch's state_dict holds it under both names."""

    def __init__(self):
        super().__init__()
        self.a = tnn.Linear(4, 4)
        self.b = tnn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _NNXTied(nnx.Module):
    """The same in NNX: one kernel Variable at two paths, which nnx.state lists once."""

    def __init__(self):
        self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
        self.b = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
        self.b.kernel = self.a.kernel

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def test_tied_weights_convert_both_ways():
    torch.manual_seed(0)
    source = _TorchTied()
    model = _NNXTied()
    xnorm.convert(source.state_dict(), to="flax", like=model, load=True)  # strict: b.weight is a.weight
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert xnorm.compare(source, model, [x]).ok
    back = _TorchTied()
    state = xnorm.convert(model, to="torch", like=back, load=True)  # both names filled from the one kernel
    for key, tensor in source.state_dict().items():
        assert torch.equal(state[key], tensor), key
    assert back.b.weight is back.a.weight


# -- the orthogonal parametrization ----------------------------------------------------------------


def _moved_orthogonal(module: tnn.Module) -> tnn.Module:
    """torch's orthogonal (xnorm's torch backend) with ``original`` moved off -I, so the map is not the identity."""
    torch.manual_seed(0)
    wrapped = xnorm.orthogonal(module)
    with torch.no_grad():
        original = wrapped.parametrizations.weight.original
        original.add_(0.3 * torch.randn_like(original))
    return wrapped


@pytest.mark.parametrize("layers", ["linear", "conv2d"])
def test_orthogonal_original_and_base_convert_to_nnx_and_back(layers):
    """``original`` takes the kernel's layout; ``base`` stays in torch's layout (an NNX BatchStat)."""
    if layers == "linear":
        source = _moved_orthogonal(tnn.Linear(3, 6))
        model = xnorm.orthogonal(nnx.Linear(3, 6, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
        x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    else:
        source = _moved_orthogonal(tnn.Conv2d(2, 3, 3))
        model = xnorm.orthogonal(nnx.Conv(2, 3, (3, 3), padding="VALID", rngs=nnx.Rngs(0)))
        x = np.random.default_rng(0).standard_normal((2, 2, 7, 7)).astype(np.float32)
    xnorm.convert(source.state_dict(), to="flax", like=model, load=True)
    np.testing.assert_array_equal(np.asarray(model.kernel_base.get_value()),
                                  source.parametrizations.weight[0].base.numpy())
    assert xnorm.compare(source, model, x, channels_last=layers == "conv2d").ok
    back = xnorm.convert(model, to="torch", like=source)
    for key, value in source.state_dict().items():
        assert torch.equal(back[key], value), key


class _TorchOrthogonalConv1d(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _moved_orthogonal(tnn.Conv1d(3, 2, 4))

    def forward(self, x):
        return self.conv(x)


class _LinenOrthogonalConv1d(nn.Module):
    def setup(self):
        self.conv = xnorm.orthogonal(nn.Conv(2, (4,), padding="VALID"))

    def __call__(self, x):
        return self.conv(x)


def test_orthogonal_converts_to_linen_variables_with_base_in_batch_stats_and_back():
    source = _TorchOrthogonalConv1d()
    net = _LinenOrthogonalConv1d()
    x = np.random.default_rng(1).standard_normal((2, 9, 3)).astype(np.float32)
    variables = net.init(jax.random.key(0), x)
    converted = xnorm.convert(source.state_dict(), to="flax", like=variables)
    np.testing.assert_array_equal(np.asarray(converted["batch_stats"]["conv"]["kernel_base"]),
                                  source.conv.parametrizations.weight[0].base.numpy())
    expected = source(torch.from_numpy(x.transpose(0, 2, 1))).detach().numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(np.asarray(net.apply(converted, x)), expected, rtol=1.3e-6, atol=1e-5)
    back = xnorm.convert(converted, to="torch", like=_TorchOrthogonalConv1d())
    for key, value in source.state_dict().items():
        assert torch.equal(back[key], value), key
