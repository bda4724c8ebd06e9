"""The HiFi-GAN generator ported from torch to Flax NNX end to end (SMALL config), as examples/hifigan/port.py does.

torch checkpoint (.safetensors, both weight-norm key styles) -> xnorm.convert(load=True) into the
weight-normed NNX generator -> xnorm.compare within the float32 forward tolerance -> back to torch
bit-exactly -> weight norm removed on both sides -> compare again -> export and reload.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import xnorm
from xnorm import porting

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # examples/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from examples.hifigan import flax_model  # noqa: E402
from examples.hifigan.config import SMALL  # noqa: E402
from examples.hifigan.torch_model import random_generator  # noqa: E402


def mel(frames: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, SMALL.mel_channels, frames)).astype(np.float32)


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1) if flax_model.CHANNELS_LAST else x


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    """(torch generator, its .safetensors path, the NNX generator loaded from it)."""
    torch_model = random_generator(SMALL)
    path = tmp_path_factory.mktemp("hifigan") / "generator.safetensors"
    porting.save(torch_model.state_dict(), path, to="torch")
    model = flax_model.wrapped_generator(SMALL)
    xnorm.convert(path, to="flax", like=model, load=True)
    return torch_model, path, model


def test_the_checkpoint_has_both_torch_styles(ported):
    torch_model, _, _ = ported
    keys = list(torch_model.state_dict())
    assert "conv_pre.weight_g" in keys and "ups.1.weight_v" in keys
    assert "resblocks.3.convs2.1.parametrizations.weight.original0" in keys
    assert "conv_post.parametrizations.weight.original1" in keys


def test_every_tensor_is_loaded(ported):
    torch_model, _, model = ported
    values = {k: t.numpy() for k, t in torch_model.state_dict().items()}
    # Written out, independently of xnorm's tables: Flax kernels are torch's weights with the axes reversed.
    np.testing.assert_array_equal(np.asarray(model.conv_pre.kernel_v.get_value()), values["conv_pre.weight_v"].T)
    np.testing.assert_array_equal(np.asarray(model.ups[1].kernel_g.get_value()), values["ups.1.weight_g"].T)
    np.testing.assert_array_equal(
        np.asarray(model.resblocks[3].convs1[1].kernel_v.get_value()),
        values["resblocks.3.convs1.1.parametrizations.weight.original1"].transpose(2, 1, 0),
    )
    np.testing.assert_array_equal(np.asarray(model.conv_post.bias.get_value()), values["conv_post.bias"])
    flax_count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert flax_count == sum(t.numel() for t in torch_model.state_dict().values())


def test_an_abstract_target_gets_the_same_values(ported):
    """wrapped_generator(abstract=True) has no values until the conversion loads them, then equals the other."""
    _, path, model = ported
    abstract = flax_model.wrapped_generator(SMALL, abstract=True)
    assert isinstance(abstract.conv_pre.kernel_v.get_value(), jax.ShapeDtypeStruct)
    xnorm.convert(path, to="flax", like=abstract, load=True)
    loaded = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    expected = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert [p for p, _ in loaded] == [p for p, _ in expected]
    for (key, a), (_, b) in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(key))
    x = jnp.asarray(channels_last(mel()))
    np.testing.assert_array_equal(np.asarray(abstract(x)), np.asarray(model(x)))


def test_outputs_agree_then_round_trip_then_remove_then_export(ported, tmp_path):
    torch_model, path, model = ported
    x = mel()
    comparison = xnorm.compare(torch_model, model, x, channels_last=flax_model.CHANNELS_LAST)
    assert comparison.ok, str(comparison)
    assert comparison.outputs[0].shape == (2, 1, 12 * SMALL.hop_length)

    # Back to torch: bit-exact, with the torch model's own keys (both styles), from the model and from a file.
    expected = {k: t.clone() for k, t in torch_model.state_dict().items()}
    back = xnorm.convert(model, to="torch", like=random_generator(SMALL, seed=1))
    assert list(back) == list(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    saved = tmp_path / "generator.msgpack"
    porting.save(xnorm.convert(path, to="flax", like=flax_model.wrapped_generator(SMALL)), saved, to="flax")
    again = xnorm.convert(saved, to="torch", like=random_generator(SMALL, seed=2))
    assert all(torch.equal(again[k], expected[k]) for k in expected)

    # Weight norm folded into plain weights on both sides: the outputs still agree.
    torch_model = random_generator(SMALL).remove_weight_norm()
    plain = flax_model.wrapped_generator(SMALL)
    xnorm.convert(path, to="flax", like=plain, load=True)
    xnorm.remove(plain)
    assert not any(xnorm.is_wrapped(node) for _, node in nnx.iter_graph(plain))
    comparison = xnorm.compare(torch_model, plain, x, channels_last=flax_model.CHANNELS_LAST)
    assert comparison.ok, str(comparison)

    # Export writes the inference variables; a fresh plain generator reloads them and computes the same.
    exported = flax_model.export(plain, channels_last(x), tmp_path / "generator")
    assert exported == tmp_path / "generator.msgpack" and exported.is_file()
    reloaded = flax_model.load_exported(exported, SMALL)
    y = jnp.asarray(channels_last(x))
    np.testing.assert_array_equal(np.asarray(reloaded(y)), np.asarray(plain(y)))
    other = dataclasses.replace(SMALL, initial_channels=2 * SMALL.initial_channels)
    with pytest.raises(ValueError, match="another shape"):
        flax_model.load_exported(exported, other)
    # The exported file is itself a Flax checkpoint of the plain generator: it converts back to torch.
    plain_back = xnorm.convert(exported, to="torch", like=torch_model)
    assert list(plain_back) == list(torch_model.state_dict())


def test_compare_notices_a_slightly_wrong_port(ported):
    torch_model, path, _ = ported
    model = flax_model.wrapped_generator(SMALL)
    xnorm.convert(path, to="flax", like=model, load=True)
    model.ups[0].kernel_g.set_value(model.ups[0].kernel_g.get_value() * 1.01)
    comparison = xnorm.compare(torch_model, model, mel(), channels_last=flax_model.CHANNELS_LAST)
    assert not comparison.ok


def test_export_checks_the_model_before_writing(ported, tmp_path):
    _, _, model = ported
    target = tmp_path / "g.msgpack"
    target.write_bytes(b"previous")
    channels_first = np.zeros((2, SMALL.mel_channels, 12), np.float32)
    with pytest.raises(ValueError, match="channels-last"):
        flax_model.export(model, channels_first, target)
    assert target.read_bytes() == b"previous"
