"""A torch model trained sharded (FSDP2, two gloo ranks) ported to Flax NNX: both checkpoints a torch user
saves from a sharded model (rank 0's file of the gathered state dict, and the sharded
torch.distributed.checkpoint directory once gathered with torch's ``dcp_to_torch_save``) convert with
``xnorm.convert`` and load into the same model built with xnorm's NNX wrappers, which then computes what
the torch model computes. A DCP directory given as it is is refused with the way to gather it.

The torch ranks run tests/torch/distributed_worker.py (this environment has torch). Issue 16;
docs/distributed.md has the recipe.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import xnorm
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import CheckpointFileError

SCENARIO = "fsdp2-supervised"
# A torch FSDP2 run in this environment: in `nox -s distributed` (pytest -m extended), not in CI's time
# budget; CI keeps tests/torch's check of both checkpoints and tests/core's refusal of a DCP directory.
pytestmark = pytest.mark.extended


def _torch_worker():
    """tests/torch's worker, by path (tests/ never goes on sys.path)."""
    path = Path(__file__).resolve().parent.parent / "torch" / "distributed_worker.py"
    spec = importlib.util.spec_from_file_location("torch_distributed_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch_worker = _torch_worker()


def flax_port(seed: int) -> nnx.Sequential:
    """torch_worker.build_model written with NNX layers, float64 as the torch model; layer i of the torch
    Sequential is layer i here (NNX path ``layers/i``)."""
    rngs = nnx.Rngs(seed)
    f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)

    def flatten(x):  # torch flattens (N, C, L); Flax's activations are (N, L, C)
        return jnp.transpose(x, (0, 2, 1)).reshape(x.shape[0], -1)

    return nnx.Sequential(
        xnorm.weight_norm(nnx.Conv(3, 6, (3,), padding="VALID", **f64)),
        jnp.tanh,
        xnorm.weight_norm(nnx.Conv(6, 6, (3,), padding="VALID", **f64), fused=True),
        flatten,
        xnorm.spectral_norm(nnx.Linear(24, 8, **f64), rngs=rngs),
        jnp.tanh,
        xnorm.orthogonal(nnx.Linear(8, 8, **f64)),
        nnx.Linear(8, 2, **f64),
    )


#: NNX's ``layers/i`` against torch's ``i``
RENAME = {r"^layers\.": ""}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The FSDP2 run's folder: its checkpoints, and the state every rank ended with."""
    out = tmp_path_factory.mktemp("fsdp2")
    torch_worker.launch(out, [SCENARIO])
    return out


def _values(model) -> dict:
    return {"/".join(map(str, path)): np.array(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
        nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))}


@pytest.mark.parametrize("how", ["full", "dcp"])
def test_a_sharded_torch_models_checkpoint_loads_into_the_flax_port_and_computes_the_same(saved, how, tmp_path):
    trained = torch.load(saved / f"{SCENARIO}-rank0.pt", weights_only=True)["state"]
    torch_model = torch_worker.build_model()
    torch_model.load_state_dict(trained)
    model = flax_port(seed=1)  # other values than the checkpoint's: loading must change them
    before = _values(model)
    checkpoint = torch_worker.checkpoint_file(saved, SCENARIO, how, tmp_path)
    xnorm.convert(checkpoint, to="flax", like=model, rename=RENAME, load=True)
    after = _values(model)
    assert after.keys() == before.keys()
    assert all(not np.array_equal(after[name], before[name]) for name in after if "base" not in name), [
        name for name in after if np.array_equal(after[name], before[name])]
    x = np.random.default_rng(3).standard_normal((5, 3, 8))
    torch_model.eval()
    model.eval()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    got = np.asarray(model(jnp.asarray(x.transpose(0, 2, 1))))
    assert_close(got, expected, "float64", "forward", what=f"Flax NNX port of the FSDP2 model ({how})")


def test_the_dcp_directory_itself_is_refused_with_the_way_to_gather_it(saved):
    model = flax_port(seed=1)
    before = _values(model)
    directory = saved / torch_worker.CHECKPOINTS["dcp"].format(scenario=SCENARIO)
    files = {path.name: path.read_bytes() for path in directory.iterdir()}
    with pytest.raises(CheckpointFileError, match="dcp_to_torch"):
        xnorm.convert(str(directory), to="flax", like=model, rename=RENAME, load=True)
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == files
    after = _values(model)
    assert all(np.array_equal(after[name], before[name]) for name in before)
