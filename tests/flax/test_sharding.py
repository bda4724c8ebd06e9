"""Sharded training of xnorm's Flax wrappers equals training on one device (issue 16).

``sharding_worker.py`` runs in a subprocess started with 4 host CPU devices (the device count is fixed
when JAX starts, so it cannot change inside this pytest process): the same NNX and linen models (weight
norm default and fused, spectral norm, orthogonal) train for a few ``jit``-ed SGD steps on one device
and with every parameter sharded along its output features over the "model" axis of a 2x2
("data", "model") mesh, the batch over "data". This test compares the two runs variable by variable
with the training tolerance, and checks the placements against specs written out here by hand. Both
kinds of mesh axes are run: Auto (XLA's partitioner places intermediates) and Explicit (``jax.make_mesh``'s
default, shardings in the types).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xnorm.conformance.tolerances import assert_close

WORKER = Path(__file__).with_name("sharding_worker.py")
DTYPES = ("float32", "float64")

# What each variable must be sharded as: the kernel (in, out) / conv kernel (k, in, out) along "model"
# on its output features; g keeps that axis; spectral norm's u has one entry per output feature and v
# one per input (not sharded); the orthogonal layer is wide (torch's (8, 16)), so its base's rows are
# its inputs, which are not sharded. Trailing Nones left out (the same sharding).
NNX_SPECS = {
    "conv/kernel_g": [None, None, "model"],
    "conv/kernel_v": [None, None, "model"],
    "conv/bias": ["model"],
    "weight_norm/kernel_g": [None, "model"],
    "weight_norm/kernel_v": [None, "model"],
    "weight_norm/bias": ["model"],
    "fused/kernel_g": [None, "model"],
    "fused/kernel_v": [None, "model"],
    "fused/bias": ["model"],
    "spectral/kernel_orig": [None, "model"],
    "spectral/kernel_u": ["model"],
    "spectral/kernel_v": [],
    "spectral/bias": ["model"],
    "orthogonal/kernel_orig": [None, "model"],
    "orthogonal/kernel_base": [],
    "orthogonal/bias": ["model"],
}
LINEN_SPECS = {
    "params/Dense_0/kernel_g": [None, "model"],
    "params/Dense_0/kernel_v": [None, "model"],
    "params/Dense_0/bias": ["model"],
    "params/Dense_1/kernel_g": [None, "model"],
    "params/Dense_1/kernel_v": [None, "model"],
    "params/Dense_1/bias": ["model"],
    "params/Dense_2/kernel_orig": [None, "model"],
    "params/Dense_2/bias": ["model"],
    "batch_stats/Dense_2/kernel_u": ["model"],
    "batch_stats/Dense_2/kernel_v": [],
    "params/Dense_3/kernel_orig": [None, "model"],
    "params/Dense_3/bias": ["model"],
    "batch_stats/Dense_3/kernel_base": [],
}
SPECS = {
    "nnx": NNX_SPECS,
    "nnx-dense": {key: spec for key, spec in NNX_SPECS.items() if not key.startswith("conv/")},
    "linen": LINEN_SPECS,
}
# (model, mesh): "sharded" has Auto axes; "explicit" Explicit ones (jax.make_mesh's default), on the NNX
# model without its Conv, which Flax's nnx.Conv cannot run under Explicit axes
RUNS = [("nnx", "sharded"), ("linen", "sharded"), ("nnx-dense", "explicit"), ("linen", "explicit")]
RUN_IDS = [f"{api}-{where}" for api, where in RUNS]


def _trimmed(spec):
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with np.load(out / "results.npz") as results:
        values = dict(results)
    return values, json.loads((out / "shardings.json").read_text())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("api", "where"), RUNS, ids=RUN_IDS)
def test_sharded_training_equals_one_device(runs, api, where, dtype):
    values, _ = runs
    single = _run_values(values, f"{api}/{dtype}/single/")
    sharded = _run_values(values, f"{api}/{dtype}/{where}/")
    assert set(single) == set(sharded) == set(SPECS[api]) | {"loss"}
    initial = _run_values(values, f"{api}/{dtype}/single/initial/")
    # not a vacuous comparison: every variable but the orthogonal base (constant) moved in training
    moved = {key for key in initial if not np.array_equal(initial[key], single[key])}
    assert moved == {key for key in SPECS[api] if not key.endswith("kernel_base")}
    for key, expected in single.items():
        assert sharded[key].dtype == expected.dtype == np.dtype(dtype), key
        assert_close(sharded[key], expected, dtype, "training", what=f"{api} {key} after sharded training")
    assert not np.array_equal(values[f"{api}/{dtype}/single/loss"][0], values[f"{api}/{dtype}/single/loss"][-1])


def _run_values(values, prefix):
    """The arrays of one run, by variable path (a run's initial values are ``initial/...`` within it)."""
    found = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
    return {k: v for k, v in found.items() if prefix.endswith("/initial/") or not k.startswith("initial/")}


@pytest.mark.parametrize("moment", ["before", "after"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("api", "where"), RUNS, ids=RUN_IDS)
def test_variables_are_sharded_as_their_metadata_says(runs, api, where, dtype, moment):
    _, shardings = runs
    run = shardings[f"{api}/{dtype}/{where}"]
    assert {key: _trimmed(spec) for key, spec in run["metadata"].items()} == SPECS[api]
    for key, spec in SPECS[api].items():
        placed = run[moment][key]
        assert _trimmed(placed["spec"]) == spec, (key, placed)
        assert placed["devices"] == 4, (key, placed)
    # a "model"-sharded axis really is split in two on every device
    g = run[moment]["params/Dense_0/kernel_g" if api == "linen" else "weight_norm/kernel_g"]
    assert g["shard_shape"] == [1, 8]
    # the one-device run is on one device
    single = shardings[f"{api}/{dtype}/single"]["before"]
    assert {placed["devices"] for placed in single.values()} == {1}


def test_model_built_under_the_mesh_is_placed_by_wrap(runs):
    # eager sharding: the layers are built sharded, and xnorm.wrap places g, v, u and base itself
    _, shardings = runs
    placed = shardings["nnx/eager"]
    assert {key: _trimmed(p["spec"]) for key, p in placed.items()} == NNX_SPECS
    assert {p["devices"] for p in placed.values()} == {4}
