"""The framework-neutral conversion machinery: layout tables, the strict plan, safetensors files, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xnorm import porting
from xnorm.errors import CheckpointFileError, ConversionError, OptionError
from xnorm.porting import ArrayRef, TensorSpec, plan


def _ref(key, array):
    return ArrayRef(key, array.shape, array.dtype.name, lambda: array)


def _run(steps):
    return {step.target.key: step.run() for step in steps}


# -- tables ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, expected",
    [
        ("a.b.parametrizations.weight.original0", "a.b.weight_g"),
        ("parametrizations.weight.original1", "weight_v"),
        ("ups.0.parametrizations.embedding.original1", "ups.0.embedding_v"),
        ("ups.0.weight_g", "ups.0.weight_g"),
        ("bn.running_mean", "bn.running_mean"),
        ("x.parametrizations.weight.original", "x.weight_orig"),  # spectral norm
        ("x.parametrizations.weight.0._u", "x.weight_u"),
        ("parametrizations.weight.0._v", "weight_v"),
        ("x.parametrizations.weight.0.base", "x.weight_base"),  # orthogonal
        ("x.parametrizations.weight.1._u", "x.parametrizations.weight.1._u"),  # a stacked one: not ours, untouched
        ("x.parametrizations.weight.original2", "x.parametrizations.weight.original2"),
    ],
)
def test_torch_parametrization_keys_map_to_legacy_names(key, expected):
    assert porting.canonical_torch_key(key) == expected


def test_mindspore_conv1d_weight_gains_a_unit_axis_and_g_follows():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3))
    g = np.linalg.norm(w.reshape(8, -1), axis=1).reshape(8, 1, 1)
    for name, array in (("weight", w), ("weight_v", w), ("weight_g", g)):
        storage = porting.layout("mindspore", "conv1d", name, 3)
        np.testing.assert_array_equal(storage.to_storage(array), array[:, :, None, :])
    assert porting.layout("mindspore", "conv_transpose1d", "weight", 3).storage_shape((8, 4, 3)) == (8, 4, 1, 3)
    assert porting.layout("mindspore", "conv2d", "weight", 4).storage_shape((8, 4, 3, 3)) == (8, 4, 3, 3)


@pytest.mark.parametrize("framework, kind, ndim", [("flax", "linear", 2), ("flax", "conv2d", 4),
                                                  ("mindspore", "conv1d", 3)])
def test_the_orthogonal_base_is_canonical_everywhere_and_original_follows_the_weight(framework, kind, ndim):
    base = np.random.default_rng(2).standard_normal((6, 6) if ndim == 2 else (2, 3, 4, 4)[: ndim - 2] + (4, 4))
    np.testing.assert_array_equal(porting.layout(framework, kind, "weight_base", ndim).to_storage(base), base)
    assert porting.layout(framework, kind, "weight_orig", ndim) == porting.layout(framework, kind, "weight", ndim)


def test_flax_kernels_are_torch_weights_with_axes_reversed():
    rng = np.random.default_rng(1)
    linear = rng.standard_normal((5, 3))  # torch (out, in)
    np.testing.assert_array_equal(porting.layout("flax", "linear", "weight", 2).to_storage(linear), linear.T)
    conv2d = rng.standard_normal((6, 2, 3, 4))  # torch (out, in, kh, kw) -> flax (kh, kw, in, out)
    expected = np.einsum("oihw->hwio", conv2d)
    np.testing.assert_array_equal(porting.layout("flax", "conv2d", "weight_v", 4).to_storage(conv2d), expected)
    transpose1d = rng.standard_normal((6, 2, 5))  # torch (in, out, k) -> flax transpose_kernel=True (k, out, in)
    expected = np.einsum("iok->koi", transpose1d)
    np.testing.assert_array_equal(
        porting.layout("flax", "conv_transpose1d", "weight", 3).to_storage(transpose1d), expected
    )


def test_names_for_norm_layers_and_embeddings():
    assert porting.framework_name_of("mindspore", "batchnorm", "running_var") == "moving_variance"
    assert porting.framework_name_of("flax", "batchnorm", "running_mean") == "mean"
    assert porting.framework_name_of("mindspore", "embedding", "weight_g") == "embedding_table_g"
    assert porting.torch_name_of("mindspore", "layernorm", "gamma") == "weight"
    assert porting.torch_name_of("flax", "linear", "kernel_v") == "weight_v"
    assert porting.torch_name_of("flax", "generic", "anything") == "anything"
    assert porting.torch_name_of("mindspore", "linear", "not_a_param") is None
    assert porting.framework_name_of("mindspore", "batchnorm", "num_batches_tracked") is None


def test_zero_dim_g_keeps_no_axes():
    storage = porting.layout("flax", "conv1d", "weight_g", 0)
    assert storage.canonical_ndim == 0


# -- the plan ----------------------------------------------------------------------------------------------


def _flax_dense_targets():
    layout = porting.layout("flax", "linear", "weight", 2)
    return [
        (TensorSpec("params/fc/kernel", (3, 5), "float32"), ["fc.weight"], layout, True),
        (TensorSpec("params/fc/bias", (5,), "float32"), ["fc.bias"], porting.layout("flax", "linear", "bias", 1), True),
    ]


def test_summary_calls_a_tensor_renamed_only_when_its_name_changed():
    source = {"fc.weight": _ref("fc.weight", np.ones((5, 3), np.float32)),
              "fc.bias": _ref("fc.bias", np.ones(5, np.float32))}
    steps = {step.target.key: step.describe() for step in plan(source, _flax_dense_targets(), source_name="s").steps}
    # params/fc/bias is torch's fc.bias in Flax's spelling; kernel is another name for weight
    assert steps == {"params/fc/kernel": "renamed, transposed", "params/fc/bias": "copied"}


def test_plan_maps_every_target_once_and_converts_values():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((5, 3)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    source = {"fc.weight": _ref("fc.weight", weight), "fc.bias": _ref("fc.bias", bias)}
    result = _run(plan(source, _flax_dense_targets(), source_name="src").steps)
    np.testing.assert_array_equal(result["params/fc/kernel"], weight.T)
    np.testing.assert_array_equal(result["params/fc/bias"], bias)
    assert result["params/fc/kernel"].flags.c_contiguous and result["params/fc/kernel"].flags.owndata
    weight[:] = 0  # the result never aliases the source
    assert np.abs(result["params/fc/kernel"]).sum() > 0


def test_plan_reports_every_problem_at_once():
    source = {
        "fc.weight": _ref("fc.weight", np.zeros((5, 4), np.float32)),  # wrong shape
        "fc.extra": _ref("fc.extra", np.zeros(2, np.float32)),  # unexpected
        "bn.num_batches_tracked": _ref("bn.num_batches_tracked", np.zeros((), np.int64)),  # ignorable
    }
    with pytest.raises(ConversionError) as info:
        plan(source, _flax_dense_targets(), source_name="'model.pt'", ignorable=lambda k: k.endswith("tracked"))
    error = info.value
    assert len(error.missing) == 1 and "params/fc/bias" in error.missing[0] and "'fc.bias'" in error.missing[0]
    assert error.unexpected == ["fc.extra (2,)"]
    assert len(error.mismatched) == 1 and "shape (3, 5)" in error.mismatched[0] and "(5, 4)" in error.mismatched[0]
    message = str(error)
    assert "1 missing, 1 unexpected, 1 mismatched" in message and "nothing was converted" in message
    # fc.bias missing and fc.extra unexpected are not the same parameter under another name: no rename hint;
    # fc.weight pairs by name but not by shape: another configuration
    assert "rename=" not in message and "another configuration" in message


def test_plan_dtype_is_strict_unless_cast():
    source = {"fc.weight": _ref("fc.weight", np.ones((5, 3), np.float64)), "fc.bias": _ref("fc.bias", np.ones(5))}
    with pytest.raises(ConversionError, match="dtype float32 but 'fc.weight' is float64 .pass cast=True"):
        plan(source, _flax_dense_targets(), source_name="src")
    result = _run(plan(source, _flax_dense_targets(), source_name="src", cast=True).steps)
    assert result["params/fc/kernel"].dtype == np.float32
    ints = {"fc.weight": _ref("fc.weight", np.ones((5, 3), np.int32)), "fc.bias": _ref("fc.bias", np.ones(5))}
    with pytest.raises(ConversionError, match="cannot cast int32 to float32"):
        plan(ints, _flax_dense_targets(), source_name="src", cast=True)


def test_weight_norm_on_one_side_only_gets_the_wrap_hint():
    targets = [
        (
            TensorSpec("fc.weight_g", (5, 1), "float32"),
            ["fc.weight_g"],
            porting.layout("mindspore", "linear", "weight_g", 2),
            True,
        )
    ]
    source = {"fc.weight": _ref("fc.weight", np.ones((5, 3), np.float32))}
    with pytest.raises(ConversionError, match="xnorm.weight_norm"):
        plan(source, targets, source_name="src")


def test_rename_rules_and_linen_list_spellings():
    source = {"generator.ups.0.weight": _ref("generator.ups.0.weight", np.ones((2, 2), np.float32))}
    storage = porting.layout("flax", "linear", "weight", 2)
    candidates = [".".join(p + ("weight",)) for p in porting._linen_alternatives(("ups_0",))]
    assert candidates == ["ups_0.weight", "ups.0.weight"]
    targets = [(TensorSpec("params/ups_0/kernel", (2, 2), "float32"), candidates, storage, True)]
    result = plan(source, targets, source_name="src", rename={r"^": "generator."})
    assert [s.source.key for s in result.steps] == ["generator.ups.0.weight"]
    result = plan(source, targets, source_name="src", rename=lambda k: "generator." + k)
    assert [s.source.key for s in result.steps] == ["generator.ups.0.weight"]
    with pytest.raises(OptionError, match="invalid regular expression"):
        plan(source, targets, source_name="src", rename={"(": "x"})
    with pytest.raises(OptionError, match="rename= must be"):
        plan(source, targets, source_name="src", rename=["not", "a", "rule"])


def test_two_spellings_present_is_ambiguous():
    source = {k: _ref(k, np.ones((2, 2), np.float32)) for k in ("ups_0.weight", "ups.0.weight")}
    targets = [
        (
            TensorSpec("params/ups_0/kernel", (2, 2), "float32"),
            ["ups_0.weight", "ups.0.weight"],
            porting.layout("flax", "linear", "weight", 2),
            True,
        )
    ]
    with pytest.raises(ConversionError, match="ambiguous"):
        plan(source, targets, source_name="src")


def test_a_source_entry_fills_one_target_only():
    source = {"a": _ref("a", np.ones(2, np.float32))}
    identity = porting.layout("mindspore", "generic", "a", 1)
    targets = [
        (TensorSpec("x", (2,), "float32"), ["a"], identity, True),
        (TensorSpec("y", (2,), "float32"), ["a"], identity, True),
    ]
    with pytest.raises(ConversionError, match="already fills 'x'"):
        plan(source, targets, source_name="src")


def test_plan_from_framework_to_torch_squeezes_the_unit_axis():
    storage = porting.layout("mindspore", "conv1d", "weight_v", 3)
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 1, 4)
    targets = [
        (TensorSpec("c.parametrizations.weight.original1", (2, 3, 4), "float32"), ["c.weight_v"], storage, False)
    ]
    result = _run(plan({"c.weight_v": _ref("c.weight_v", v)}, targets, source_name="src").steps)
    np.testing.assert_array_equal(result["c.parametrizations.weight.original1"], v[:, :, 0, :])
    bad = np.zeros((2, 3, 2, 4), np.float32)  # the "unit" axis is not 1: not a MindSpore conv1d weight
    with pytest.raises(ConversionError, match="shape"):
        plan({"c.weight_v": _ref("c.weight_v", bad)}, targets, source_name="src")


def test_summary_counts_what_happened():
    source = {
        "fc.weight": _ref("fc.weight", np.ones((5, 3), np.float32)),
        "fc.bias": _ref("fc.bias", np.ones(5, np.float32)),
        "bn.num_batches_tracked": _ref("bn.num_batches_tracked", np.zeros((), np.int64)),
    }
    result = plan(source, _flax_dense_targets(), source_name="src", ignorable=lambda k: k.endswith("tracked"))
    summary = result.summary()
    assert "mapped 2 tensors" in summary and "transposed" in summary and "skipped 1 torch-only entries" in summary


# -- files -------------------------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(3.5) * np.ones(()), "c": np.arange(3)}
    path = tmp_path / "x.safetensors"
    porting.write_safetensors(arrays, path)
    refs = porting.read_safetensors(path)
    assert {k: (r.shape, r.dtype) for k, r in refs.items()} == {
        "a": ((2, 3), "float32"),
        "b": ((), "float64"),
        "c": ((3,), "int64"),
    }
    for key, array in arrays.items():
        np.testing.assert_array_equal(np.asarray(refs[key].load()), array)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0  # data stays 8-byte aligned
    assert json.loads(path.read_bytes()[8 : 8 + header_len])["a"]["dtype"] == "F32"


def _corrupt(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _corrupt(p, b"\x01\x02"), "shorter than the 8-byte header length"),
        (lambda p: _corrupt(p, (10**6).to_bytes(8, "little") + b"{}"), "header claims 1000000 bytes"),
        (lambda p: _corrupt(p, (4).to_bytes(8, "little") + b"{{{{"), "header is not JSON"),
        (lambda p: _corrupt(p, (2).to_bytes(8, "little") + b"[]"), "not a JSON object"),
    ],
)
def test_corrupt_safetensors_files_are_refused(tmp_path, make, message):
    path = make(tmp_path / "bad.safetensors")
    before = path.read_bytes()
    with pytest.raises(CheckpointFileError, match=message):
        porting.read_safetensors(path)
    assert path.read_bytes() == before


def test_truncated_safetensors_is_refused_before_any_data_is_read(tmp_path):
    path = tmp_path / "t.safetensors"
    porting.write_safetensors({"a": np.ones((64, 64), np.float32), "b": np.ones(3, np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointFileError, match="truncated or corrupt.*needs bytes"):
        porting.read_safetensors(path)


def test_safetensors_entry_with_a_bad_dtype(tmp_path):
    header = json.dumps({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = _corrupt(tmp_path / "d.safetensors", len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointFileError, match="entry 'a' has no valid dtype"):
        porting.read_safetensors(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointFileError, match="does not exist"):
        porting.read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointFileError, match="weights.h5' does not exist"):
        porting._source_framework(str(tmp_path / "weights.h5"), "mindspore")
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 32)  # an HDF5 (Keras) file
    with pytest.raises(CheckpointFileError, match="cannot tell the format"):
        porting._source_framework(str(tmp_path / "weights.h5"), "mindspore")


def test_atomic_write_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "out.ckpt"
    target.write_bytes(b"previous")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        porting.atomic_write(target, failing)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.ckpt"]
    porting.atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.ckpt"]
    with pytest.raises(CheckpointFileError, match="does not exist"):
        porting.atomic_write(tmp_path / "no" / "dir.ckpt", lambda tmp: None)


def test_convert_rejects_an_unknown_target_and_bad_options():
    with pytest.raises(OptionError, match="choose one of torch, mindspore, flax"):
        porting.convert({}, to="keras", like=None)
    with pytest.raises(OptionError, match="cast must be True or False"):
        porting.convert({}, to="torch", like=None, cast="yes")


# -- formats read by content ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"PK\x03\x04" + b"\0" * 40, "pt"),  # torch.save's zip archive
        (b"\x80\x02" + b"\0" * 40, "pt"),  # torch.save before 1.6: a pickle, protocol 2
        (b"\x82\xa6params\x80\xa5stats\x80", "msgpack"),  # flax.serialization: a map of 2 entries
        (b"\x0a\x10" + b"\0" * 40, "ckpt"),  # MindSpore's Checkpoint protobuf: field 1 first
    ],
)
def test_a_checkpoint_without_a_known_suffix_is_read_by_its_content(tmp_path, head, expected):
    path = tmp_path / "g_02500000"
    path.write_bytes(head)
    assert porting.file_format(path) == expected


def test_safetensors_without_a_suffix_and_the_suffix_first(tmp_path):
    porting.write_safetensors({"a": np.ones(2, np.float32)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m").write_bytes(data)
    assert porting.file_format(tmp_path / "m") == "safetensors"
    (tmp_path / "m.pt").write_bytes(data)  # a known suffix wins: the reader then says what is wrong with the file
    assert porting.file_format(tmp_path / "m.pt") == "pt"


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\x80\x09garbage"])
def test_unknown_content_and_absent_files_are_checkpoint_errors(tmp_path, content):
    path = tmp_path / "weights"
    path.write_bytes(content)
    with pytest.raises(CheckpointFileError, match="cannot tell the format"):
        porting.file_format(path)
    with pytest.raises(CheckpointFileError, match="does not exist"):
        porting.file_format(tmp_path / "absent")


def test_pick_entry_names_the_entries_there_are():
    nested = {"generator": {"w": 1}, "optimizer": {"state": {}}, "step": 3}
    assert porting.pick_entry(nested, "generator", "'g'") == ({"w": 1}, "'g'['generator']")
    assert porting.pick_entry(nested, None, "'g'") == (nested, "'g'")
    with pytest.raises(ConversionError, match="no entry 'gen'; its entries holding state dicts are 'generator'"):
        porting.pick_entry(nested, "gen", "'g'")
    with pytest.raises(ConversionError, match="a single state dict. Leave entry out"):
        porting.pick_entry({"w": 1}, "gen", "'g'")


def test_a_shared_tensor_fills_every_name_and_no_alias_is_unexpected():
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    layout2 = porting.layout("mindspore", "linear", "weight", 2)
    # the source saved one tensor under two names (a module registered as conv1 and net.0)
    source = {
        "conv1.weight": _ref("conv1.weight", weight),
        "net.0.weight": ArrayRef("net.0.weight", (2, 3), "float32", lambda: weight, alias_of="conv1.weight"),
    }
    one_name = [(TensorSpec("net.0.weight", (2, 3), "float32"), ["net.0.weight"], layout2, True)]
    result = plan(source, one_name, source_name="src")  # strict: conv1.weight is not "unexpected"
    assert result.shared == ["conv1.weight"] and "already mapped under another key" in result.summary()
    # the target holds it under two names too, and the source has only the second: both are filled
    two_names = [
        (TensorSpec("conv1.weight", (2, 3), "float32"), ["conv1.weight"], layout2, True),
        (TensorSpec("net.0.weight", (2, 3), "float32", alias_of="conv1.weight"), ["net.0.weight"], layout2, True),
    ]
    result = plan({"net.0.weight": _ref("net.0.weight", weight)}, two_names, source_name="src")
    arrays = porting._ConvertedArrays(result, None)
    assert sorted(arrays) == ["conv1.weight", "net.0.weight"]
    np.testing.assert_array_equal(arrays["conv1.weight"], weight)
    np.testing.assert_array_equal(arrays["net.0.weight"], weight)
    # an unrelated leftover is still reported
    with pytest.raises(ConversionError, match="1 unexpected"):
        plan({**source, "other": _ref("other", weight)}, one_name, source_name="src")
