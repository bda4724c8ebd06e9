"""One rank of the distributed tests (tests/torch/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torch/distributed_worker.py OUT [SCENARIO]...

Every scenario (all when none is named) trains a model whose layers carry every xnorm reparametrization for
a few SGD steps on this rank's half of a batch and saves what the test compares into OUT
(``<scenario>-rank<r>.pt``): the model's state_dict after the steps, or the error a step raised. The test
runs the same steps in one process on the whole batch. The FSDP2 scenarios also save the two checkpoints a
user would port (:data:`CHECKPOINTS`). Kept apart from the test module so that torchrun imports nothing of
pytest; the MindSpore and Flax tests run it too (their environments have torch), to port those checkpoints.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import xnorm

STEPS = 3
LR = 0.1
BATCH = 8  # the whole batch; each of the two ranks takes half
DTYPE = torch.float64  # the all-reduce's summation order is the only difference left to measure


def build_model() -> nn.Module:
    """Every reparametrization xnorm has, in one small model (the same on every rank: seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        xnorm.weight_norm(nn.Conv1d(3, 6, 3)),
        nn.Tanh(),
        xnorm.weight_norm(nn.Conv1d(6, 6, 3), fused=True),
        nn.Flatten(),
        xnorm.spectral_norm(nn.Linear(6 * 4, 8)),
        nn.Tanh(),
        xnorm.orthogonal(nn.Linear(8, 8)),
        nn.Linear(8, 2),
    )
    return model.to(DTYPE)


def data(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, 8, generator=gen, dtype=DTYPE)
    fake = torch.randn(BATCH, 3, 8, generator=gen, dtype=DTYPE)
    target = torch.randn(BATCH, 2, generator=gen, dtype=DTYPE)
    return x, fake, target


def supervised_step(model, x, fake, target):
    """One forward: 0.5 * mean((y - target)^2)."""
    return 0.5 * ((model(x) - target) ** 2).mean()


def gan_step(model, x, fake, target):
    """A discriminator's step: two forwards (real, fake) before one backward, the pattern that breaks
    when DDP overwrites spectral norm's state in place between them."""
    return nn.functional.softplus(-model(x)).mean() + nn.functional.softplus(model(fake)).mean()


LOSSES = {"supervised": supervised_step, "gan": gan_step}


def train(model, loss_fn, rank: int, world: int):
    """STEPS steps of SGD; rank r takes rows r * BATCH / world ... of each batch (world 1: all)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    share = BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    for step in range(STEPS):
        x, fake, target = data(step)
        optimizer.zero_grad()
        loss_fn(model, x[rows], fake[rows], target[rows]).backward()
        optimizer.step()


SCENARIOS = {
    # name: (loss, how the model is distributed)
    "ddp-supervised": ("supervised", "ddp"),
    "ddp-supervised-no-broadcast": ("supervised", "ddp-no-broadcast"),
    "ddp-gan": ("gan", "ddp"),
    "ddp-gan-no-broadcast": ("gan", "ddp-no-broadcast"),
    "fsdp2-supervised": ("supervised", "fsdp2"),
    "fsdp2-gan": ("gan", "fsdp2"),
    "ddp-compiled": ("supervised", "ddp-compiled"),
    "ddp-inductor": ("supervised", "ddp-inductor"),
}
#: run only when named (nox -s distributed): inductor compiles C++ on every rank, 80 s on the 2-core machine
EXTENDED = {"ddp-inductor"}


def distribute(model: nn.Module, how: str, world: int) -> nn.Module:
    if how == "ddp-compiled":
        # torch.compile of the DDP model, as torch's docs show it; aot_eager traces forward and backward
        # (what inductor compiles) without a C++ compiler run per rank
        return torch.compile(DistributedDataParallel(model), backend="aot_eager")
    if how == "ddp-inductor":
        return torch.compile(DistributedDataParallel(model))  # torch's default backend
    if how.startswith("ddp"):
        return DistributedDataParallel(model, broadcast_buffers=how == "ddp")
    # FSDP2: each layer with parameters is its own unit (its parameters sharded across the ranks and
    # gathered for its forward and backward), then the root
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


#: what each FSDP2 scenario saves for porting, beside its results: the sharded checkpoint of
#: torch.distributed.checkpoint (a directory, one file per rank plus ``.metadata``) and rank 0's
#: ``torch.save`` of the gathered state dict (the file ``xnorm.convert`` reads directly)
CHECKPOINTS = {"dcp": "{scenario}-dcp", "full": "{scenario}-full.pt"}


def save_checkpoints(model: nn.Module, scenario: str, out_dir: str, rank: int) -> None:
    """Both ways torch documents for saving a sharded model, as a training script would call them on
    every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = get_model_state_dict(model)  # DTensors: each rank writes its own shards
    dcp.save(sharded, checkpoint_id=os.path.join(out_dir, CHECKPOINTS["dcp"].format(scenario=scenario)))
    # every rank takes part in the gathering; cpu_offload keeps the full tensors on rank 0 only
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, os.path.join(out_dir, CHECKPOINTS["full"].format(scenario=scenario)))


def checkpoint_file(out_dir, scenario: str, how: str, scratch) -> str:
    """One file holding the plain model's state dict, from what ``scenario`` saved: ``"full"``, rank 0's
    file; ``"dcp"``, the sharded directory gathered into ``scratch`` by torch's own ``dcp_to_torch_save``
    (run in one process, after the ranks)."""
    saved = os.path.join(out_dir, CHECKPOINTS[how].format(scenario=scenario))
    if how == "full":
        return saved
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    gathered = os.path.join(scratch, f"{scenario}-gathered.pt")
    dcp_to_torch_save(saved, gathered)
    return gathered


def full_state(model: nn.Module) -> dict:
    """Every rank's full (unsharded) state_dict, the way torch documents for each wrapper: DDP's inner
    module's, and for FSDP2 ``get_model_state_dict(full_state_dict=True)``, which gathers the shards. Both
    have the plain model's keys (what ``xnorm.convert`` reads)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(inner, DistributedDataParallel):
        state = inner.module.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True))
    return {key: value.detach().clone() for key, value in state.items()}


def launch(out_dir, scenarios=(), world: int = 2, timeout: float = 600) -> None:
    """Run the named scenarios (all when none) on ``world`` ranks with torchrun, from any process whose
    interpreter has torch; raises with the ranks' output when torchrun fails."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               os.path.abspath(__file__), os.fspath(out_dir), *scenarios]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def main(out_dir: str, scenarios: list) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    for name in scenarios or [name for name in SCENARIOS if name not in EXTENDED]:
        loss, how = SCENARIOS[name]
        result = {}
        try:
            model = distribute(build_model(), how, world)
            train(model, LOSSES[loss], rank, world)
            result["state"] = full_state(model)
            if how == "fsdp2":
                save_checkpoints(model, name, out_dir, rank)
            # what FSDP2 sharded: each parameter's local shape on this rank
            if how in ("ddp-compiled", "ddp-inductor"):
                from torch._dynamo.utils import counters

                result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
            result["local_shapes"] = {
                name: list(getattr(param, "_local_tensor", param).shape) for name, param in model.named_parameters()
            }
        except Exception as error:  # the test reports it with the scenario's name
            result["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}"
        torch.save(result, os.path.join(out_dir, f"{name}-rank{rank}.pt"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
