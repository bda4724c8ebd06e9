"""A torch model trained sharded (FSDP2, two gloo ranks) ported to MindSpore: both checkpoints a torch user
saves from a sharded model (rank 0's file of the gathered state dict, and the sharded
torch.distributed.checkpoint directory once gathered with torch's ``dcp_to_torch_save``) convert with
``xnorm.convert`` and load into the same model built with xnorm's MindSpore wrappers, which then computes
what the torch model computes. A DCP directory given as it is is refused with the way to gather it.

The torch ranks run tests/torch/distributed_worker.py (this environment has torch). Issue 16;
docs/distributed.md has the recipe.
"""

import importlib.util
from pathlib import Path

import mindspore
import numpy as np
import pytest
import torch
from mindspore import Tensor

import xnorm
from xnorm.conformance.tolerances import assert_close
from xnorm.errors import CheckpointFileError

SCENARIO = "fsdp2-supervised"
# A torch FSDP2 run in this environment: in `nox -s distributed` (pytest -m extended), not in CI's time
# budget; CI keeps tests/torch's check of both checkpoints and tests/core's refusal of a DCP directory.
pytestmark = pytest.mark.extended


@pytest.fixture(autouse=True)
def graph_mode():
    mindspore.set_context(mode=mindspore.GRAPH_MODE)


def _module(path: Path, name: str):
    """A sibling folder's worker, by path: tests/ never goes on sys.path (tests/mindspore would shadow
    the mindspore package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HERE = Path(__file__).resolve().parent
torch_worker = _module(HERE.parent / "torch" / "distributed_worker.py", "torch_distributed_worker")
mindspore_worker = _module(HERE / "distributed_worker.py", "mindspore_distributed_worker")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The FSDP2 run's folder: its checkpoints, and the state every rank ended with."""
    out = tmp_path_factory.mktemp("fsdp2")
    torch_worker.launch(out, [SCENARIO])
    return out


def _parameters(net) -> dict:
    return {param.name: param.asnumpy().copy() for param in net.get_parameters()}


@pytest.mark.parametrize("how", ["full", "dcp"])
def test_a_sharded_torch_models_checkpoint_loads_into_the_mindspore_port_and_computes_the_same(saved, how, tmp_path):
    trained = torch.load(saved / f"{SCENARIO}-rank0.pt", weights_only=True)["state"]
    torch_model = torch_worker.build_model()
    torch_model.load_state_dict(trained)
    net = mindspore_worker.build_model(seed=1)  # other values than the checkpoint's: loading must change them
    before = _parameters(net)
    # float64 in torch; MindSpore's CPU convolutions have no float64, so the port is float32 (cast=True)
    checkpoint = torch_worker.checkpoint_file(saved, SCENARIO, how, tmp_path)
    xnorm.convert(checkpoint, to="mindspore", like=net, cast=True, load=True)
    after = _parameters(net)
    assert all(not np.array_equal(after[name], before[name]) for name in after if not name.endswith("_base"))
    x = np.random.default_rng(3).standard_normal((5, 3, 8))
    torch_model.eval()
    net.set_train(False)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    got = net(Tensor(x.astype(np.float32))).asnumpy()
    assert_close(got, expected, "float32", "forward", what=f"MindSpore port of the FSDP2 model ({how})")


def test_the_dcp_directory_itself_is_refused_with_the_way_to_gather_it(saved):
    net = mindspore_worker.build_model(seed=1)
    before = _parameters(net)
    directory = saved / torch_worker.CHECKPOINTS["dcp"].format(scenario=SCENARIO)
    files = {path.name: path.read_bytes() for path in directory.iterdir()}
    with pytest.raises(CheckpointFileError, match="dcp_to_torch"):
        xnorm.convert(str(directory), to="mindspore", like=net, load=True)
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == files
    after = _parameters(net)
    assert all(np.array_equal(after[name], before[name]) for name in before)

