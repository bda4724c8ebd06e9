"""The "fix:" line of a ConversionError: each cause of xnorm.conversion_hints.CAUSES is suggested when the keys
support it, and only then. Every case goes through porting.plan, as a conversion does."""

from __future__ import annotations

import numpy as np
import pytest

from xnorm import conversion_hints, porting
from xnorm.errors import ConversionError
from xnorm.porting import ArrayRef, TensorSpec, plan

LINEAR = porting.layout("mindspore", "linear", "weight", 2)
VECTOR = porting.layout("mindspore", "linear", "bias", 1)


def _source(**shapes):
    """A checkpoint: ``{key: ArrayRef}`` of zeros; keyword names use ``__`` for ``.``."""
    out = {}
    for name, shape in shapes.items():
        key = name.replace("__", ".")
        array = np.zeros(shape, np.float32)
        out[key] = ArrayRef(key, array.shape, "float32", lambda array=array: array)
    return out


def _targets(*keys_and_shapes):
    return [
        (TensorSpec(key, shape, "float32"), [key], LINEAR if len(shape) == 2 else VECTOR, True)
        for key, shape in keys_and_shapes
    ]


def _fix(source, targets, style="python"):
    with pytest.raises(ConversionError) as info:
        plan(source, targets, source_name="src", hint_style=style)
    message = str(info.value)
    lines = [line for line in message.splitlines() if line.startswith("fix: ")]
    return lines[0] if lines else ""


CONV = (("conv.weight", (4, 3)), ("conv.bias", (4,)), ("out.weight", (2, 4)))


def test_a_dataparallel_prefix_is_found_and_the_rename_that_removes_it_is_offered():
    source = _source(module__conv__weight=(4, 3), module__conv__bias=(4,), module__out__weight=(2, 4))
    fix = _fix(source, _targets(*CONV))
    assert "under the prefix 'module.'" in fix and "rename={'^': 'module.'}" in fix
    assert "other names" not in fix  # the prefix explains the keys; the generic rename is not offered too
    # the offered rename does convert
    assert len(plan(source, _targets(*CONV), source_name="src", rename={"^": "module."}).steps) == 3
    # on the command line the same fix is written as the option
    assert "--rename '^=module.'" in _fix(source, _targets(*CONV), style="cli")


def test_a_prefix_only_the_target_has_is_found():
    source = _source(conv__weight=(4, 3), conv__bias=(4,))
    targets = _targets(("gen.conv.weight", (4, 3)), ("gen.conv.bias", (4,)))
    fix = _fix(source, targets)
    assert "without the prefix 'gen.'" in fix
    assert len(plan(source, targets, source_name="src", rename={r"^gen\.": ""}).steps) == 2


def test_a_prefix_that_explains_only_some_keys_is_not_offered():
    # conv is under module., out is simply absent: no single prefix fills the target
    source = _source(module__conv__weight=(4, 3), module__conv__bias=(4,), other__weight=(9, 9))
    fix = _fix(source, _targets(*CONV))
    assert "prefix" not in fix


def test_renamed_layers_get_the_rename_hint_with_an_example_and_the_way_back():
    source = _source(first__weight=(4, 3), first__bias=(4,), last__weight=(2, 4))
    fix = _fix(source, _targets(*CONV))
    assert "other names" in fix and "rename={'REGEX': 'REPLACEMENT'}" in fix and "inverse mapping" in fix
    assert "--rename 'REGEX=REPLACEMENT'" in _fix(source, _targets(*CONV), style="cli")


def test_another_configuration_is_named_when_keys_pair_but_shapes_do_not():
    source = _source(conv__weight=(8, 3), conv__bias=(8,), out__weight=(2, 8))
    fix = _fix(source, _targets(*CONV))
    assert "another configuration" in fix and "rename" not in fix


@pytest.mark.parametrize(
    ("source_keys", "target_keys", "expected"),
    [
        # the checkpoint is plain, the target weight-normed
        ({"fc__weight": (5, 3)}, [("fc.weight_g", (5, 1)), ("fc.weight_v", (5, 3))],
         "fc.weight is plain in the checkpoint but weight normed in the target: remove the target's"),
        # the checkpoint is weight-normed, the target plain
        ({"fc__weight_g": (5, 1), "fc__weight_v": (5, 3)}, [("fc.weight", (5, 3))],
         "weight normed in the checkpoint but plain in the target: wrap the target's layer with xnorm.weight_norm"),
        # spectral norm in the checkpoint, weight norm in the target
        ({"fc__weight_orig": (5, 3), "fc__weight_u": (5,), "fc__weight_v": (3,)},
         [("fc.weight_g", (5, 1)), ("fc.weight_v", (5, 3))],
         "wrap the target's layer with xnorm.spectral_norm instead of xnorm.weight_norm"),
    ],
)
def test_a_reparametrization_on_one_side_only_names_the_layer_and_the_kinds(source_keys, target_keys, expected):
    fix = _fix(_source(**source_keys), _targets(*target_keys))
    assert expected in fix and "other names" not in fix and "prefix" not in fix
    # weight_v of spectral norm (u's partner, (3,)) and of weight norm ((5, 3)) pair by name only: not a
    # configuration of its own
    assert "another configuration" not in fix


def test_biases_left_over_on_one_side_get_the_bias_hint():
    targets = _targets(("conv.weight", (4, 3)), ("out.weight", (2, 4)))
    fix = _fix(_source(conv__weight=(4, 3), conv__bias=(4,), out__weight=(2, 4), out__bias=(2,)), targets)
    assert "only biases are left over" in fix and "has_bias=False" in fix
    fix = _fix(_source(conv__weight=(4, 3), out__weight=(2, 4)), _targets(*CONV))
    assert "only biases are missing" in fix


def test_no_hint_when_no_cause_fits():
    # one key missing, an unrelated one unexpected, no prefix, no rename pairing, no shapes: nothing to suggest
    source = _source(conv__weight=(4, 3), conv__bias=(4,), stats=(7,))
    assert _fix(source, _targets(*CONV)) == ""


def test_every_cause_of_the_table_has_a_test_here():
    tested = {"prefix", "rename", "configuration", "reparametrization", "bias"}
    assert [name for name, _, _ in conversion_hints.CAUSES] == ["prefix", "rename", "configuration",
                                                                 "reparametrization", "bias"]
    assert set(name for name, _, _ in conversion_hints.CAUSES) == tested
