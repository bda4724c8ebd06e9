"""xnorm.wrap(..., fused=True) in MindSpore: the same layer as the default wrapper, computed without w.

Every case sets g to random values, so that s = g / ||v|| is far from 1 and a scale applied on the
wrong side, along the wrong axis or tiled the wrong way over groups changes the result. The float64
NumPy reference (xnorm.reference, xnorm.conformance.layers) is the oracle; the default wrapper is the
second one (its distance from the fused path is bounded by the cross-backend tolerance: each of the
two may be one tolerance off the reference). That w is never built is checked on the exported graph
(GRAPH_MODE) and by counting calls of the weight computation (PYNATIVE_MODE).
"""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn
from mindspore.train import mind_ir_pb2

import xnorm
from xnorm import reference
from xnorm._backends.mindspore import WeightNormCell
from xnorm._backends.mindspore.fused import FusedWeightNormCell
from xnorm.conformance import layers
from xnorm.conformance.adapters.mindspore import build_mindspore_layer, storage_layout
from xnorm.conformance.cases import LAYERS, Case
from xnorm.conformance.tolerances import assert_close, compare, cross_tolerance
from xnorm.errors import AlreadyWrappedError, OptionError
from xnorm.reference import round_to_dtype
from xnorm.spec import FUSED_INPUT, FUSED_OUTPUT, FUSED_ROWS, LayerKind

BY_LABEL = {layer.label: layer for layer in LAYERS}
LR = 0.5

# (catalogue layer, dim, where s goes): every side for every kind, grouped tiling on both sides, the
# scalar of dim=None, and the kernel-axis dims that fall back to materialising w.
CASES = [
    ("linear", 0, FUSED_OUTPUT),
    ("linear", 1, FUSED_INPUT),
    ("linear-nobias", None, FUSED_OUTPUT),
    ("conv1d-g2-s2-d2", 0, FUSED_OUTPUT),
    ("conv1d-g2-s2-d2", 1, FUSED_INPUT),  # in/groups scale tiled over 2 groups
    ("conv1d", 2, None),
    ("conv2d-g2-s2-nobias", 1, FUSED_INPUT),
    ("conv2d", -1, FUSED_OUTPUT),
    ("conv3d", 0, FUSED_OUTPUT),
    ("conv_transpose1d-g2-s2-op1", 0, FUSED_INPUT),
    ("conv_transpose1d-g2-s2-op1", 1, FUSED_OUTPUT),  # out/groups scale tiled over 2 groups
    ("conv_transpose2d-s2", 1, FUSED_OUTPUT),
    ("conv_transpose2d-s2", 3, None),
    ("conv_transpose3d-s2", 0, FUSED_INPUT),
    ("embedding", 0, FUSED_ROWS),
    ("embedding", 1, FUSED_OUTPUT),
]


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)


# -- helpers ---------------------------------------------------------------------------------------
def _param_name(case):
    return "embedding_table" if case.kind == LayerKind.EMBEDDING else "weight"


def _build(case, weight, bias, dtype=ms.float32):
    """A plain MindSpore layer computing what the torch layer of ``case`` computes, holding weight/bias."""
    cell = build_mindspore_layer(case, dtype)
    np_dtype = np.float16 if dtype == ms.float16 else np.float32
    getattr(cell, _param_name(case)).set_data(Tensor(storage_layout(case).to_storage(weight).astype(np_dtype)))
    if bias is not None:
        cell.bias.set_data(Tensor(bias.astype(np_dtype)))
    return cell


def _random_g(case, dim, seed):
    """A canonical g of the reference's shape with values in [0.5, 2): s = g/||v|| is far from 1."""
    shape = np.shape(reference.init(np.ones(case.weight_shape), dim)[0])
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape).round(3)


def _set_g(wrapper, case, g):
    storage = g if g.ndim == 0 else storage_layout(case).to_storage(g)
    param = getattr(wrapper, wrapper.wrapped_name + "_g")
    param.set_data(Tensor(np.asarray(storage, dtype=np.float32)).astype(param.dtype))


def _canonical(case, array):
    return array if array.ndim == 0 else storage_layout(case).to_canonical(array)


def _wrapped_pair(case, dim, data, g):
    """The same layer wrapped by the default and by the fused path, both with g set to ``g``."""
    pair = []
    for fused in (False, True):
        wrapper = xnorm.wrap(_build(case, data["weight"], data.get("bias")), dim=dim, fused=fused)
        _set_g(wrapper, case, g)
        pair.append(wrapper)
    return pair


def _trainables(wrapper):
    out = [getattr(wrapper, wrapper.wrapped_name + "_g"), getattr(wrapper, wrapper.wrapped_name + "_v")]
    return out + ([wrapper.bias] if isinstance(wrapper.bias, ms.Parameter) else [])


def _input(case, x):
    return Tensor(np.asarray(x, dtype=np.int32 if case.kind == LayerKind.EMBEDDING else np.float32))


def _forward_and_grads(wrapper, case, x, grad_output):
    """Output and dL/d(g, v[, bias]) of L = sum(y * grad_output), one compiled graph."""
    weights = _trainables(wrapper)

    def objective(data, seed):
        y = wrapper(data)
        return (y * seed).sum(), y

    grad_fn = ms.value_and_grad(objective, None, weights, has_aux=True)

    @ms.jit
    def step(data, seed):
        return grad_fn(data, seed)

    (_, y), grads = step(_input(case, x), Tensor(grad_output, ms.float32))
    grads = [g.asnumpy().astype(np.float64) for g in grads]
    grads[0], grads[1] = _canonical(case, grads[0]), _canonical(case, grads[1])
    return y.asnumpy().astype(np.float64), grads


def _sgd_step(wrapper, case, x, target):
    optimizer = nn.SGD(wrapper.trainable_params(), learning_rate=LR)

    def loss_fn(data, goal):
        diff = wrapper(data) - goal
        return 0.5 * (diff * diff).mean()

    grad_fn = ms.value_and_grad(loss_fn, None, optimizer.parameters)

    @ms.jit
    def step(data, goal):
        loss, grads = grad_fn(data, goal)
        optimizer(grads)
        return loss

    step(_input(case, x), Tensor(target, ms.float32))
    return [_canonical(case, p.asnumpy().astype(np.float64)) if i < 2 else p.asnumpy().astype(np.float64)
            for i, p in enumerate(_trainables(wrapper))]


# -- fused vs the reference and vs the default wrapper ----------------------------------------------
@pytest.mark.parametrize(("label", "dim", "side"), CASES, ids=[f"{c[0]}-dim{c[1]}" for c in CASES])
def test_fused_matches_reference_and_default(label, dim, side):
    case = BY_LABEL[label]
    data = Case(case, dim, "float32", "cpu").arrays()
    x, bias, v = data["x"], data.get("bias"), data["weight"]
    g = round_to_dtype(_random_g(case, dim, seed=CASES.index((label, dim, side))), "float32")
    default, fused = _wrapped_pair(case, dim, data, g)
    assert isinstance(fused, FusedWeightNormCell) and xnorm.is_wrapped(fused)
    assert fused.fused_side == side
    assert [p.name for p in fused.get_parameters()] == [p.name for p in default.get_parameters()]

    w_ref = reference.weight_norm(g, v, dim)
    y_ref = layers.forward(case, w_ref, bias, x)
    grad_w, grad_b = layers.backward(case, w_ref, x, data["grad_output"])
    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, dim)
    expected_grads = [grad_g, grad_v] + ([grad_b] if bias is not None else [])

    y_fused, grads_fused = _forward_and_grads(fused, case, x, data["grad_output"])
    y_default, grads_default = _forward_and_grads(default, case, x, data["grad_output"])
    assert_close(y_fused, y_ref, "float32", "forward", what="fused output")
    assert compare(y_fused, y_default, *cross_tolerance("float32", "forward"))["passed"]
    names = ("dL/dg", "dL/dv", "dL/dbias")
    for name, actual, expected, other in zip(names, grads_fused, expected_grads, grads_default, strict=False):
        assert_close(actual, expected, "float32", "gradient", what=f"fused {name}")
        assert compare(actual, other, *cross_tolerance("float32", "gradient"))["passed"], name

    # One training step (forward, backward, SGD update in one compiled graph) against the float64 step.
    params = _sgd_step(fused, case, x, data["target"])
    grad_w, grad_b = layers.backward(case, w_ref, x, (y_ref - data["target"]) / y_ref.size)
    grad_g, grad_v = reference.weight_norm_grads(g, v, grad_w, dim)
    stepped = [g - LR * grad_g, v - LR * grad_v] + ([bias - LR * grad_b] if bias is not None else [])
    for name, actual, expected in zip(("g", "v", "bias"), params, stepped, strict=False):
        assert_close(actual, round_to_dtype(expected, "float32"), "float32", "training", what=f"{name} after a step")


def test_fallback_is_the_default_computation():
    """Where the algebra does not apply (a kernel axis, or name='bias'), the output is bit-equal to the
    default wrapper's: the same w, built the same way."""
    case = BY_LABEL["conv1d"]
    data = Case(case, 2, "float32", "cpu").arrays()
    default, fused = _wrapped_pair(case, 2, data, _random_g(case, 2, seed=3))
    assert fused.fused_side is None
    np.testing.assert_array_equal(fused(_input(case, data["x"])).asnumpy(), default(_input(case, data["x"])).asnumpy())

    dense = [nn.Dense(3, 2), nn.Dense(3, 2)]
    dense[1].weight.set_data(dense[0].weight.value().copy())
    dense[1].bias.set_data(dense[0].bias.value().copy())
    by_bias = [xnorm.wrap(dense[0], name="bias", dim=None), xnorm.wrap(dense[1], name="bias", dim=None, fused=True)]
    assert by_bias[1].fused_side is None
    for wrapper in by_bias:
        wrapper.bias_g.set_data(Tensor(np.float32(1.75)))
    x = Tensor(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32))
    np.testing.assert_array_equal(by_bias[1](x).asnumpy(), by_bias[0](x).asnumpy())


# -- w is never built --------------------------------------------------------------------------------
def _exported_nodes(cell, x, path):
    ms.export(cell, x, file_name=str(path), file_format="MINDIR")
    model = mind_ir_pb2.ModelProto()
    model.ParseFromString((path.parent / (path.name + ".mindir")).read_bytes())
    return model.graph.node


def _materialises(nodes, v_name):
    """True when some Mul of the exported forward graph multiplies v by anything but v itself.

    Parameters enter MindSpore graphs through Load nodes (and Cast ones in low precision): every value
    derived from v that way is followed; ``v * v`` (the norm) is the only product of v allowed.
    """
    from_v = set()
    for node in nodes:
        op = node.op_type.split("::")[-1].split(":")[0]
        if op == "Load" and node.input[0].endswith(":" + v_name):
            from_v.update(node.output)
        elif op == "Cast" and node.input and node.input[0] in from_v:
            from_v.update(node.output)
        elif op == "Mul":
            operands = list(node.input)
            if any(i in from_v for i in operands) and not all(i == operands[0] for i in operands):
                return True
    return False


@pytest.mark.parametrize(("label", "dim"), [("linear", 0), ("linear", 1), ("conv1d-g2-s2-d2", 1),
                                            ("conv_transpose1d-g2-s2-op1", 1), ("embedding", 0)])
def test_exported_graph_has_no_w(label, dim, tmp_path):
    case = BY_LABEL[label]
    data = Case(case, dim, "float32", "cpu").arrays()
    default, fused = _wrapped_pair(case, dim, data, _random_g(case, dim, seed=11))
    x = _input(case, data["x"])
    v_name = fused.wrapped_name + "_v"
    assert not _materialises(_exported_nodes(fused, x, tmp_path / "fused"), v_name)
    # The same inspection finds w in the default wrapper's graph, so it can fail.
    assert _materialises(_exported_nodes(default, x, tmp_path / "default"), v_name)
    # The exported fused graph is the deployable one: it reloads and computes what the cell does.
    reloaded = nn.GraphCell(ms.load(str(tmp_path / "fused.mindir")))
    np.testing.assert_array_equal(reloaded(x).asnumpy(), fused(x).asnumpy())


def test_fallback_graph_builds_w(tmp_path):
    case = BY_LABEL["conv1d"]
    data = Case(case, 2, "float32", "cpu").arrays()
    fused = xnorm.wrap(_build(case, data["weight"], data["bias"]), dim=2, fused=True)
    assert _materialises(_exported_nodes(fused, _input(case, data["x"]), tmp_path / "fallback"), "weight_v")


def test_training_step_never_computes_w():
    """PYNATIVE_MODE runs construct as Python: the weight computation is counted over a whole
    value_and_grad + SGD step."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((3, 4, 9)).astype(np.float32))
    counts = {}
    for label, dim in (("side", 0), ("fallback", 2)):
        wrapper = xnorm.wrap(nn.Conv1d(4, 6, 3, pad_mode="pad", padding=1, has_bias=True), dim=dim, fused=True)
        calls = []
        original = wrapper._weight

        def counted(original=original, calls=calls):
            calls.append(1)
            return original()

        object.__setattr__(wrapper, "_weight", counted)
        optimizer = nn.SGD(wrapper.trainable_params(), learning_rate=0.1)
        grad_fn = ms.value_and_grad(lambda data, net=wrapper: (net(data) ** 2).mean(), None, optimizer.parameters)
        before = wrapper.weight_v.asnumpy().copy()
        _, grads = grad_fn(x)
        optimizer(grads)
        assert not np.array_equal(wrapper.weight_v.asnumpy(), before)  # the step did train v
        counts[label] = len(calls)
    assert counts == {"side": 0, "fallback": counts["fallback"]} and counts["fallback"] > 0


# -- checkpoints, remove, export -------------------------------------------------------------------
class Net(nn.Cell):
    def __init__(self, fused, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        conv = nn.Conv1d(2, 4, 3, pad_mode="pad", padding=1, has_bias=True)
        head = nn.Dense(4 * 5, 3)
        for layer in (conv, head):
            layer.weight.set_data(Tensor(rng.standard_normal(layer.weight.shape).astype(np.float32) * 0.4))
            layer.bias.set_data(Tensor(rng.standard_normal(layer.bias.shape).astype(np.float32) * 0.1))
        self.conv = xnorm.wrap(conv, dim=0, fused=fused)
        self.head = xnorm.wrap(head, dim=1, fused=fused)
        self.conv.weight_g.set_data(self.conv.weight_g * Tensor(np.float32(1.5)))

    def construct(self, x):
        return self.head(self.conv(x).reshape(x.shape[0], -1))


@pytest.mark.parametrize(("source", "target"), [(True, False), (False, True)], ids=["fused-to-default",
                                                                                     "default-to-fused"])
def test_checkpoint_round_trip_between_paths(source, target, tmp_path):
    x = Tensor(np.random.default_rng(2).standard_normal((2, 2, 5)).astype(np.float32))
    saved, fresh = Net(source, seed=0), Net(target, seed=1)
    assert [p.name for p in saved.get_parameters()] == [p.name for p in fresh.get_parameters()]
    path = str(tmp_path / "net.ckpt")
    ms.save_checkpoint(saved, path)
    not_loaded, unused = ms.load_param_into_net(fresh, ms.load_checkpoint(path), strict_load=True)
    assert not not_loaded and not unused
    for a, b in zip(saved.get_parameters(), fresh.get_parameters(), strict=True):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    assert compare(fresh(x).asnumpy(), saved(x).asnumpy(), *cross_tolerance("float32", "forward"))["passed"]


def test_remove_gives_the_same_plain_layers(tmp_path):
    x = Tensor(np.random.default_rng(3).standard_normal((2, 2, 5)).astype(np.float32))
    fused, default = Net(True, seed=0), Net(False, seed=0)
    y_fused = fused(x).asnumpy()  # compiled with the fused wrappers: remove must make it recompile
    expected_w = default.conv.compute_weight().asnumpy()
    g, v = fused.conv.weight_g.asnumpy().astype(np.float64), fused.conv.weight_v.asnumpy().astype(np.float64)
    assert xnorm.remove(fused) is fused
    assert type(fused.conv) is nn.Conv1d and type(fused.head) is nn.Dense
    assert [p.name for p in fused.trainable_params()] == ["conv.weight", "conv.bias", "head.weight", "head.bias"]
    # remove materialises w exactly as the default path does, and as the reference says.
    np.testing.assert_array_equal(fused.conv.weight.asnumpy(), expected_w)
    assert_close(fused.conv.weight.asnumpy(), reference.weight_norm(g, v, 0), "float32", "weight", what="w")
    y_removed = fused(x).asnumpy()
    assert compare(y_removed, y_fused, *cross_tolerance("float32", "forward"))["passed"]
    ms.export(fused, x, file_name=str(tmp_path / "removed"), file_format="MINDIR")
    np.testing.assert_array_equal(nn.GraphCell(ms.load(str(tmp_path / "removed.mindir")))(x).asnumpy(), y_removed)


# -- float16 ------------------------------------------------------------------------------------------
def _float16_reference(case, side, g16, v16, b16, x16, dim):
    """The fused float16 path at its documented rounding points, in NumPy.

    s = g / ||v|| in float32 (the spec's norm); the layer on v16 is summed exactly and rounded once to
    float16 (as MindSpore's CPU kernels do); then the output side takes s * y + bias in float32 and
    rounds once, the input side rounds x * s once before the layer (whose float16 bias add rounds
    again), and Embedding rows are multiplied by s[id] and rounded once. (The default path's reference
    rounds w instead; the fused path has no w to round.)
    """
    s = np.float32(g16) / reference.norm_except_dim(v16, dim, dtype="float16")
    half = lambda a: np.asarray(a, dtype=np.float32).astype(np.float16)  # noqa: E731 - float32 -> float16, once
    channels = (-1,) if case.kind == LayerKind.LINEAR else (1, -1) + (1,) * (x16.ndim - 2)
    if side == FUSED_ROWS:
        return half(v16.astype(np.float32)[x16] * s[x16])
    if side == FUSED_INPUT:
        y = half(layers.forward(case, v16, None, half(x16.astype(np.float32) * s.reshape(channels))))
        return y if b16 is None else half(y.astype(np.float32) + b16.astype(np.float32).reshape(channels))
    y = half(layers.forward(case, v16, None, x16)).astype(np.float32) * s.reshape(channels)
    return half(y if b16 is None else y + b16.astype(np.float32).reshape(channels))


@pytest.mark.parametrize(("label", "dim"), [("linear", 0), ("linear", 1), ("conv2d", 0), ("embedding", 0)])
def test_float16_scale_in_float32(label, dim):
    case = BY_LABEL[label]
    data = Case(case, dim, "float16", "cpu").arrays()
    wrapper = xnorm.wrap(_build(case, data["weight"], data.get("bias"), ms.float16), dim=dim, fused=True)
    g16 = round_to_dtype(_random_g(case, dim, seed=5), "float16")
    _set_g(wrapper, case, g16)
    assert getattr(wrapper, wrapper.wrapped_name + "_g").dtype == ms.float16
    x = data["x"] if case.kind == LayerKind.EMBEDDING else data["x"].astype(np.float16)
    y = wrapper(Tensor(x))
    assert y.dtype == ms.float16
    expected = _float16_reference(case, wrapper.fused_side, g16, data["weight"], data.get("bias"), x, dim)
    assert_close(y.asnumpy(), expected, "float16", "forward", what="float16 fused output")


# -- errors ---------------------------------------------------------------------------------------------
def test_errors_are_those_of_the_default_path():
    backend = xnorm.registry.get_backend("mindspore")
    dense = nn.Dense(3, 2)
    weight = dense.weight.asnumpy().copy()
    with pytest.raises(OptionError, match="fused"):
        backend.wrap(dense, xnorm.WeightNorm(), name=None, fused="yes")
    with pytest.raises(OptionError, match="fused"):
        xnorm.wrap(dense, fused=1)
    with pytest.raises(OptionError, match="colour"):
        xnorm.wrap(dense, fused=True, colour="red")
    wrapped = xnorm.wrap(dense, fused=True)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(wrapped, fused=True)
    with pytest.raises(AlreadyWrappedError):
        xnorm.wrap(wrapped)
    assert isinstance(wrapped, WeightNormCell)
    assert [name for name, _ in dense.parameters_and_names()] == ["weight", "bias"]
    np.testing.assert_array_equal(dense.weight.asnumpy(), weight)
