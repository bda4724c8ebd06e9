"""torch's side of conversion: reading state dicts and files safely, describing models, building them, the CLI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import xnorm
from xnorm import porting
from xnorm._backends.torch import convert as torch_convert
from xnorm.cli import main as cli
from xnorm.errors import CheckpointFileError, ConversionError


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.ConvTranspose1d(8, 4, 4, 2), nn.Linear(5, 3))
    xnorm.wrap(model[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[2])
    return model


class _Marker:
    """Unpickling this would write a file: proof that torch.load(weights_only=True) ran no foreign code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_read_indexes_a_state_dict_without_copying(tmp_path):
    model = _model()
    refs = torch_convert.read(model.state_dict())
    assert list(refs) == list(model.state_dict())
    ref = refs["0.parametrizations.weight.original1"]
    assert ref.shape == (8, 4, 3) and ref.dtype == "float32"
    np.testing.assert_array_equal(ref.load(), model[0].parametrizations.weight.original1.detach().numpy())
    assert refs["1.num_batches_tracked"].dtype == "int64"


def test_read_pt_and_safetensors_files_agree(tmp_path):
    state = _model().state_dict()
    torch.save(state, tmp_path / "m.pt")
    porting.write_safetensors({k: v.numpy() for k, v in state.items()}, tmp_path / "m.safetensors")
    for path in (tmp_path / "m.pt", tmp_path / "m.safetensors"):
        refs = torch_convert.read(path)
        assert set(refs) == set(state)
        for key, tensor in state.items():
            np.testing.assert_array_equal(np.asarray(refs[key].load()), tensor.numpy())


def test_a_pickle_with_objects_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": _Marker(marker)}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointFileError, match="holds objects other than tensors.*never unpickles"):
        torch_convert.read(path)
    assert not marker.exists()
    assert path.read_bytes() == before


def test_a_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(CheckpointFileError, match="torch.save\\(model.state_dict\\(\\), path\\)"):
        torch_convert.read(path)


def test_a_nested_checkpoint_names_the_entry_to_pass(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"generator": _model().state_dict(), "steps": 3}, path)
    with pytest.raises(ConversionError, match=r"entry='generator'\), or --entry generator"):
        torch_convert.read(path)
    # and that entry is then read, keys as the state dict has them
    assert list(torch_convert.read(path, entry="generator")) == list(_model().state_dict())


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_pt_is_a_checkpoint_error(tmp_path, cut):
    path = tmp_path / "t.pt"
    torch.save(_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointFileError, match="cannot be read as a torch checkpoint"):
        torch_convert.read(path)


def test_corrupt_and_missing_pt(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointFileError, match="truncated or corrupt"):
        torch_convert.read(path)
    with pytest.raises(CheckpointFileError, match="does not exist"):
        torch_convert.read(tmp_path / "missing.pt")


def test_non_mapping_sources_are_refused():
    with pytest.raises(ConversionError, match="pass its state dict"):
        torch_convert.read(nn.Linear(2, 2))
    with pytest.raises(ConversionError, match="entries 'a': int are not tensors"):
        torch_convert.read({"a": 1})


def test_describe_sees_through_parametrizations_and_legacy_weight_norm():
    layers = {info.segments: info for info in torch_convert.describe(_model())}
    assert layers[("0",)].kind == "conv1d"
    assert set(layers[("0",)].params) == {
        "bias",
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    }
    assert layers[("1",)].kind == "batchnorm" and "num_batches_tracked" in layers[("1",)].params
    assert layers[("2",)].kind == "conv_transpose1d" and set(layers[("2",)].params) == {"bias", "weight_g", "weight_v"}
    assert layers[("3",)].kind == "linear"
    assert layers[("0",)].params["parametrizations.weight.original0"].shape == (8, 1, 1)


def test_build_loads_strictly_and_keeps_the_models_key_order():
    source, target = _model(), _model()
    with torch.no_grad():
        for tensor in target.state_dict(keep_vars=True).values():
            tensor.zero_()
    arrays = {k: v.numpy().copy() for k, v in source.state_dict().items()}
    state = torch_convert.build(target, arrays, load=True)
    assert list(state) == list(target.state_dict())
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor)


def test_save_writes_safetensors_or_pt_atomically(tmp_path):
    state = _model().state_dict()
    torch_convert.save(state, tmp_path / "a.safetensors")
    torch_convert.save(state, tmp_path / "a.pt")
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    refs = porting.read_safetensors(tmp_path / "a.safetensors")
    assert all(np.array_equal(np.asarray(refs[k].load()), v.numpy()) for k, v in state.items())
    with pytest.raises(xnorm.OptionError, match="use .safetensors or .pt"):
        torch_convert.save(state, tmp_path / "a.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.safetensors"]


def test_run_eval_restores_training_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    ((path, out),) = torch_convert.run_eval(model, [x])
    assert path == ""
    assert model.training
    with torch.no_grad():
        expected = model[0](torch.from_numpy(x)).numpy()  # dropout is off in eval mode
    np.testing.assert_array_equal(out, expected)


def test_compare_two_torch_models_reports_the_worst_element():
    torch.manual_seed(0)
    reference = nn.Linear(4, 3)
    ported = nn.Linear(4, 3)
    ported.load_state_dict(reference.state_dict())
    with torch.no_grad():
        ported.bias[1] += 1e-3
    x = np.ones((2, 4), np.float32)
    result = xnorm.compare(reference, ported, x)
    assert not result.ok and result.outputs[0].worst_index[1] == 1
    assert result.outputs[0].max_abs == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(AssertionError, match="beyond the float32 forward tolerance"):
        result.assert_close()
    assert xnorm.compare(reference, reference, x).ok


class _Discriminator(nn.Module):
    """Returns (logits, [feature maps]) as every GAN discriminator does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(1, 4, 3), nn.Conv1d(4, 1, 3)

    def forward(self, x):
        first = self.a(x)
        second = self.b(first)
        return second.flatten(1), [first, {"last": second}]


def test_compare_walks_nested_outputs_and_names_each_array():
    torch.manual_seed(0)
    reference, ported = _Discriminator(), _Discriminator()
    ported.load_state_dict(reference.state_dict())
    with torch.no_grad():
        ported.b.bias += 1e-3
    result = xnorm.compare(reference, ported, np.ones((2, 1, 9), np.float32))
    assert [o.path for o in result.outputs] == ["[0]", "[1][0]", "[1][1]['last']"]
    assert [o.error_over_allowed > 1 for o in result.outputs] == [True, False, True]
    assert "[1][1]['last']" in str(result)


def test_compare_refuses_outputs_of_another_structure():
    class Flat(_Discriminator):
        def forward(self, x):
            return super().forward(x)[0]

    with pytest.raises(xnorm.ConversionError, match="structured differently"):
        xnorm.compare(_Discriminator(), Flat(), np.ones((2, 1, 9), np.float32))


# -- CLI errors that need no second framework ----------------------------------------------------------------


def test_cli_rejects_a_bad_like_and_output(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    porting.write_safetensors({"a": np.ones(2, np.float32)}, src)
    assert cli(["convert", str(src), "--to", "torch", "--like", "nomodule", "-o", str(tmp_path / "o.pt")]) == 2
    assert "must be module:factory" in capsys.readouterr().err
    assert cli(["convert", str(src), "--to", "torch", "--like", "os:path", "-o", str(tmp_path / "o.ckpt")]) == 2
    assert "written as .safetensors or .pt or .pth" in capsys.readouterr().err
    assert (
        cli(["convert", str(src), "--to", "torch", "--like", "no_such_module_xyz:f", "-o", str(tmp_path / "o.pt")]) == 2
    )
    assert "cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    assert cli(["convert", str(src), "--to", "torch", "--like", "os:nothing_here", "-o", str(tmp_path / "o.pt")]) == 2
    assert "has no attribute 'nothing_here'" in capsys.readouterr().err
    assert cli(["convert", str(src), "--to", "torch", "--like", "os:path", "-o", str(src)]) == 2
    assert "is the source file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_cli_checks_its_files_before_importing_the_like_module(tmp_path, capsys, monkeypatch):
    # importing this --like module would leave a marker: a slow framework import must not come first
    (tmp_path / "marks_import.py").write_text("open(__file__ + '.imported', 'w').close()\ndef f():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "m.safetensors"
    porting.write_safetensors({"a": np.ones(2, np.float32)}, src)
    like = ["--like", "marks_import:f"]
    assert cli(["convert", str(tmp_path / "absent.pt"), "--to", "torch", *like, "-o", str(tmp_path / "o.pt")]) == 2
    assert "absent.pt' does not exist" in capsys.readouterr().err
    assert cli(["convert", str(src), "--to", "torch", *like, "-o", str(tmp_path / "no" / "o.pt")]) == 2
    assert "does not exist; create it first" in capsys.readouterr().err
    assert not (tmp_path / "marks_import.py.imported").exists()


def test_cli_names_the_missing_dependency_of_the_like_module(tmp_path, capsys, monkeypatch):
    (tmp_path / "needs_a_package.py").write_text("import no_such_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "m.safetensors"
    porting.write_safetensors({"a": np.ones(2, np.float32)}, src)
    args = ["convert", str(src), "--to", "torch", "--like", "needs_a_package:f", "-o", str(tmp_path / "o.pt")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "'needs_a_package' was found but importing it failed: it needs 'no_such_package_xyz'" in err
    assert "Run from the folder" not in err


def test_progress_outside_a_terminal_is_one_line_per_tenth():
    import io

    from xnorm.cli import _ProgressBar

    log = io.StringIO()  # not a terminal, as a CI log or a redirected stderr
    bar = _ProgressBar(True, stream=log)
    for done in range(0, 1001, 5):
        bar(done, 1000)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 11
    assert lines[0].split("]")[1].split()[0] == "0.0%" and lines[-1].split("]")[1].split()[0] == "100.0%"


def test_like_factories_take_arguments(tmp_path, monkeypatch, capsys):
    from xnorm.cli import _like_arguments, _resolve_like
    from xnorm.errors import OptionError

    (tmp_path / "zoo_factories.py").write_text(
        "def build(config='v1', width=2, sizes=()):\n    return {'config': config, 'width': width, 'sizes': sizes}\n"
        "MODEL = object()\n"
    )
    monkeypatch.chdir(tmp_path)
    kwargs = _like_arguments(["config=v2", "width=512", "sizes=[3, 7, 11]"])
    assert kwargs == {"config": "v2", "width": 512, "sizes": [3, 7, 11]}  # JSON where it parses, else a string
    assert _resolve_like("zoo_factories:build", kwargs) == {"config": "v2", "width": 512, "sizes": [3, 7, 11]}
    assert _resolve_like("zoo_factories:build") == {"config": "v1", "width": 2, "sizes": ()}
    with pytest.raises(OptionError, match="cannot be called with .*unexpected keyword argument 'depth'"):
        _resolve_like("zoo_factories:build", {"depth": 3})
    with pytest.raises(OptionError, match="a model object, not a factory"):
        _resolve_like("zoo_factories:MODEL", {"width": 3})
    src = tmp_path / "m.safetensors"
    porting.write_safetensors({"a": np.ones(2, np.float32)}, src)
    args = ["convert", str(src), "--to", "torch", "--like", "zoo_factories:build", "-o", str(tmp_path / "o.pt")]
    assert cli([*args, "--like-arg", "no equals sign"]) == 2
    assert "must be NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_torch_file_converted_to_torch_is_refused_with_the_way_to_load_it(tmp_path, suffix):
    legacy = _model()
    path = tmp_path / f"legacy{suffix}"
    state = {key: value.contiguous() for key, value in legacy.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from xnorm.checkpoint_files import write_safetensors

        write_safetensors({key: value.numpy() for key, value in state.items()}, path)
    target = _model()
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ConversionError, match=r"is a torch checkpoint \(\w+\) and to='torch'.* between frameworks"):
        xnorm.convert(path, to="torch", like=target, load=True)
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())
    # the way the message gives: torch loads its own key styles into the wrapped model
    assert not target.load_state_dict(state, strict=True).missing_keys
