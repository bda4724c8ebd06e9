"""The HiFi-GAN example ported torch -> MindSpore end to end (SMALL config), as examples/hifigan/port.py does.

Random torch weights saved as .safetensors; converted into ``wrapped_generator`` with load=True; outputs
compared within the float32 forward tolerance; converted back to torch bit-exactly (from the Cell and
from a .ckpt); weight norm removed on both sides and compared again; exported to MINDIR, reloaded and
run. GRAPH_MODE throughout.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Tensor, nn

import xnorm
from xnorm.conformance.tolerances import assert_close
from xnorm.porting import save, write_safetensors


def _examples():
    """The examples package lives at the repository root, which pytest's importlib mode leaves off sys.path."""
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    config = importlib.import_module("examples.hifigan.config")
    return config, importlib.import_module("examples.hifigan.torch_model"), importlib.import_module(
        "examples.hifigan.mindspore_model")


@pytest.fixture(scope="module")
def modules():
    return _examples()


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


def _mel(config, frames: int = 12) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, config.SMALL.mel_channels, frames)).astype(np.float32)


def test_names_mirror_torch(modules):
    """Same layer names as the torch generator, g and v where torch has them, in MindSpore's layout."""
    config, torch_model, mindspore_model = modules
    torch_keys = {xnorm.porting.canonical_torch_key(k) for k in torch_model.Generator(config.SMALL).state_dict()}
    ported = mindspore_model.wrapped_generator(config.SMALL)
    assert set(ported.parameters_dict()) == torch_keys  # convs only: every torch name is MindSpore's too
    torch_convs = [name for name, module in torch_model.Generator(config.SMALL).named_modules()
                   if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d))]
    assert [name for name, cell in ported.cells_and_names() if xnorm.is_wrapped(cell)] == torch_convs
    plain = mindspore_model.Generator(config.SMALL)
    assert not any(xnorm.is_wrapped(cell) for _, cell in plain.cells_and_names())
    assert mindspore_model.CHANNELS_LAST is False


def test_port_end_to_end(modules, tmp_path):
    config, torch_model, mindspore_model = modules
    small = config.SMALL
    reference = torch_model.random_generator(small)
    original = {k: v.clone() for k, v in reference.state_dict().items()}
    weights = tmp_path / "generator.safetensors"
    write_safetensors({k: v.numpy() for k, v in original.items()}, weights)

    ported = mindspore_model.wrapped_generator(small)
    result = xnorm.convert(weights, to="mindspore", like=ported, load=True)
    mel = _mel(config)
    before = xnorm.compare(reference, ported, mel, channels_last=mindspore_model.CHANNELS_LAST)
    assert before.outputs[0].shape == (2, 1, 12 * small.hop_length)
    before.assert_close()

    # Back to torch, bit-exact, with the torch model's own keys (both of its weight-norm styles).
    for source in (ported, tmp_path / "generator.ckpt"):
        if isinstance(source, Path):
            save(result, source, to="mindspore")
        back = xnorm.convert(source, to="torch", like=torch_model.Generator(small))
        assert list(back) == list(original)
        assert all(torch.equal(back[k], v) for k, v in original.items())

    # Weight norm removed on both sides: plain layers, same outputs.
    reference.remove_weight_norm()
    xnorm.remove(ported)
    assert not any(xnorm.is_wrapped(cell) for _, cell in ported.cells_and_names())
    assert all(name.endswith((".weight", ".bias")) for name in ported.parameters_dict())
    after = xnorm.compare(reference, ported, mel, channels_last=mindspore_model.CHANNELS_LAST)
    after.assert_close()

    # MINDIR export of the plain model; the reloaded graph computes what the Cell computes.
    path = mindspore_model.export(ported, mel, tmp_path / "generator")
    assert path == tmp_path / "generator.mindir" and path.is_file()
    reloaded = nn.GraphCell(ms.load(str(path)))
    ported.set_train(False)
    expected = ported(Tensor(mel)).asnumpy()
    assert_close(reloaded(Tensor(mel)).asnumpy(), expected, "float32", "exact", what="reloaded MINDIR output")


def test_export_of_the_wrapped_model(modules, tmp_path):
    """Exporting before remove works too, and keeps the model's training flag."""
    config, torch_model, mindspore_model = modules
    ported = mindspore_model.wrapped_generator(config.SMALL)
    xnorm.convert(torch_model.random_generator(config.SMALL, seed=1).state_dict(), to="mindspore", like=ported,
                  load=True)
    ported.set_train(True)
    mel = _mel(config, frames=6)
    path = mindspore_model.export(ported, mel, tmp_path / "wrapped.mindir")
    assert path == tmp_path / "wrapped.mindir" and path.is_file()
    assert ported.training
    ported.set_train(False)
    assert_close(nn.GraphCell(ms.load(str(path)))(Tensor(mel)).asnumpy(), ported(Tensor(mel)).asnumpy(),
                 "float32", "exact", what="reloaded MINDIR output")
