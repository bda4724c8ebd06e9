"""The example's port script and the `xnorm convert` command, run as a user runs them (MindSpore side)."""

from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms
import pytest
import torch

from xnorm.cli import main as cli
from xnorm.porting import write_safetensors

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def at_root(monkeypatch):
    """`python -m examples...` and `--like examples...` work from the repository root, as the README says."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    ms.set_context(mode=ms.GRAPH_MODE)


def test_port_script_succeeds_on_the_small_generator(at_root, tmp_path, capsys):
    from examples.hifigan import port

    assert port.main(["--to", "mindspore", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "round trip to torch: bit-exact" in out and out.rstrip().endswith("port OK")
    assert (tmp_path / "generator.mindir").is_file() and (tmp_path / "generator.safetensors").is_file()


def test_cli_converts_with_a_summary_and_back_bit_exactly(at_root, tmp_path, capsys):
    from examples.hifigan.torch_model import random_generator

    torch_model = random_generator()
    source = tmp_path / "g.safetensors"
    write_safetensors({k: v.numpy() for k, v in torch_model.state_dict().items()}, source)
    like = "examples.hifigan.mindspore_model:wrapped_generator"
    assert cli(["convert", str(source), "--to", "mindspore", "--like", like, "-o", str(tmp_path / "g.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "mapped 234 tensors" in out and "reshaped" in out and "wrote" in out
    back = tmp_path / "back.pt"
    args = ["convert", str(tmp_path / "g.ckpt"), "--to", "torch", "--like", "examples.hifigan.torch_model:Generator"]
    assert cli([*args, "-o", str(back), "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    restored = torch.load(back, weights_only=True)
    original = torch_model.state_dict()
    assert list(restored) == list(original)
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_cli_failure_writes_nothing(at_root, tmp_path, capsys):
    from examples.hifigan.torch_model import random_generator

    state = {k: v.numpy() for k, v in random_generator().state_dict().items()}
    del state["conv_post.bias"]
    source = tmp_path / "broken.safetensors"
    write_safetensors(state, source)
    before = source.read_bytes()
    output = tmp_path / "g.ckpt"
    like = "examples.hifigan.mindspore_model:wrapped_generator"
    assert cli(["convert", str(source), "--to", "mindspore", "--like", like, "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert "1 missing" in err and "conv_post.bias" in err
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"] and source.read_bytes() == before


def test_progress_bar_is_drawn_when_asked(at_root, tmp_path, capsys):
    from examples.hifigan.torch_model import random_generator

    source = tmp_path / "g.safetensors"
    write_safetensors({k: v.numpy() for k, v in random_generator().state_dict().items()}, source)
    like = "examples.hifigan.mindspore_model:wrapped_generator"
    assert (
        cli(["convert", str(source), "--to", "mindspore", "--like", like, "-o", str(tmp_path / "g.ckpt"), "--progress"])
        == 0
    )
    err = capsys.readouterr().err
    assert "100.0%" in err and "MiB/s" in err
    assert (tmp_path / "g.ckpt").is_file()


def test_cli_names_the_dataparallel_prefix_as_a_rename_option_that_then_converts(at_root, tmp_path, capsys):
    from examples.hifigan.torch_model import random_generator

    # a checkpoint saved from torch.nn.DataParallel(generator): every key starts with "module."
    state = {f"module.{k}": v.numpy() for k, v in random_generator().state_dict().items()}
    source = tmp_path / "dp.safetensors"
    write_safetensors(state, source)
    like = "examples.hifigan.mindspore_model:wrapped_generator"
    args = ["convert", str(source), "--to", "mindspore", "--like", like, "-o", str(tmp_path / "g.ckpt")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "under the prefix 'module.'" in err and "--rename '^=module.'" in err and "rename={" not in err
    assert cli([*args, "--rename", "^=module.", "--quiet"]) == 0
    assert (tmp_path / "g.ckpt").is_file()


def test_cli_reads_a_released_checkpoint_without_suffix_and_picks_its_entry(at_root, tmp_path, capsys):
    from examples.hifigan.torch_model import random_generator

    # as HiFi-GAN's releases are: g_02500000, torch.save({'generator': state_dict}) with other entries beside
    state = random_generator().state_dict()
    source = tmp_path / "g_02500000"
    torch.save({"generator": state, "optimizer": {"lr": 2e-4}, "steps": 2500000}, source)
    like = "examples.hifigan.mindspore_model:wrapped_generator"
    args = ["convert", str(source), "--to", "mindspore", "--like", like, "-o", str(tmp_path / "g.ckpt")]
    assert cli(args) == 2
    assert "--entry generator" in capsys.readouterr().err
    assert cli([*args, "--entry", "gen"]) == 2
    assert "no entry 'gen'; its entries holding state dicts are 'generator', 'optimizer'" in capsys.readouterr().err
    assert cli([*args, "--entry", "generator", "--quiet"]) == 0
    # the MindSpore checkpoint it wrote is recognised by its content too, and converts back bit-exactly
    bare = tmp_path / "g_ms"
    bare.write_bytes((tmp_path / "g.ckpt").read_bytes())
    back = ["convert", str(bare), "--to", "torch", "--like", "examples.hifigan.torch_model:Generator"]
    assert cli([*back, "-o", str(tmp_path / "back.pt"), "--quiet"]) == 0
    restored = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(restored[k], state[k]) for k in state)
