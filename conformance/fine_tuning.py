"""The fine-tuning case of ``xnorm.freeze``: a small conv net whose backbone is frozen, trained for a few steps.

Where the catalogue's other cases check one layer's reparametrization, this one checks a model-level
promise (issue 17): a frozen BatchNorm keeps its statistics and its output whatever ``train()`` says,
the rest of the model trains exactly as the float64 reference says, ``unfreeze`` brings the normal
behaviour back; and, as the counter-example, without ``freeze`` the same script shows the drift.

The model, in torch's terms and layouts (every array crossing the protocol is canonical: NCHW,
``(out, in, kh, kw)``)::

    x (N, 2, 5, 5) -> conv1 3x3 pad 1, no bias -> bn1 -> relu          "the backbone": conv1 never trains,
                   -> conv2 1x1 -> bn2 -> relu -> mean over H, W         bn1 is frozen (statistics and affine)
                   -> fc (4 -> 2)

    loss = 0.5 * mean((y - target) ** 2), plain SGD (no momentum, no weight decay)

The script an adapter runs (:meth:`xnorm.conformance.adapter.Adapter.fine_tune`), once with
``freeze=True`` and once with ``freeze=False`` (the counter-example):

1. build the model from :attr:`FineTuningRun.weights`, BatchNorm momentum and eps translated from
   torch's (0.1, 1e-5) to the framework's own with :func:`xnorm.batchnorm.equivalent_batchnorm_settings`;
   training mode; conv1 excluded from training the framework's usual way (``requires_grad_(False)``, an
   optimizer over the rest...);
2. with ``freeze``: ``xnorm.freeze`` on bn1 only (``affine=True``);
3. an SGD optimizer over what trains; record 0;
4. for each of the first :data:`FROZEN_STEPS` batches: the training mode the framework's usual way
   (``model.train()``, ``set_train()``: the call that undoes a hand-made freeze), one SGD step, then a
   record (taken in eval mode);
5. with ``freeze``: ``xnorm.unfreeze``, a new optimizer over what trains now (bn1's scale and shift
   again); then one more step on the last batch and a last record.

A record (:data:`RECORD_KEYS`) holds every model array in canonical layout (each layer's weights and
the BatchNorms' running statistics) and two eval-mode outputs on a fixed test batch: the backbone's
(after bn1's relu) and the model's.

Each step's reference starts from the backend's own values after the previous step (as the catalogue's
checks do, an error is counted once, where it arises) and is computed in float64 with the backend's own
BatchNorm convention (the running variance is updated with the unbiased batch variance in torch and
MindSpore, the biased one in Flax: :data:`xnorm.batchnorm.CONVENTIONS`); values are then rounded to the
case's dtype, as a framework storing them does.

=================  ==========================================================================  =========
check              what is compared                                                            quantity
=================  ==========================================================================  =========
``frozen_state``   bn1's running statistics, scale and shift, and conv1's weight, after each    exact
                   frozen step vs the values the model was built from: not one bit moves
``frozen_output``  the backbone's eval output on the test batch after each frozen step vs      exact
                   the one before the first step
``fine_tuning``    everything else after each frozen step (conv2, bn2 with its statistics,     training
                   fc) and both eval outputs vs the reference
``unfreeze``       every array after the step that follows ``unfreeze`` vs the reference       training
                   with bn1 back to normal (its statistics and affine move again)
``drift``          the counter-example: without ``freeze`` every array after each step vs      training
                   the reference, whose bn1 statistics move (the suite checks they move by
                   far more than the tolerance, or the case would prove nothing)
=================  ==========================================================================  =========
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

from xnorm.batchnorm import CONVENTIONS, equivalent_batchnorm_settings
from xnorm.reference import round_to_dtype

from . import layers
from .cases import LayerCase

__all__ = [
    "FINE_TUNING_KIND",
    "FINE_TUNING_DTYPES",
    "FINE_TUNING_CHECKS",
    "FROZEN_STEPS",
    "RECORD_KEYS",
    "FineTuningCase",
    "FineTuningRun",
    "fine_tuning_cases",
    "reference_step",
    "reference_eval",
    "saved_name",
    "SAVED_QUANTITY",
]

#: The case's kind in reports and expected-failure files (where the reparametrizations' kinds go).
FINE_TUNING_KIND = "freeze"
FINE_TUNING_DTYPES = ("float32", "float64")
#: check -> quantity in the tolerance table
FINE_TUNING_CHECKS = {
    "frozen_state": "exact",
    "frozen_output": "exact",
    "fine_tuning": "training",
    "unfreeze": "training",
    "drift": "training",
}
FROZEN_STEPS = 5
LEARNING_RATE = 0.1
#: The reason an adapter of another weight-reparametrization implementation (fused, a framework's own)
#: gives for not running the fine-tuning case.
RUN_BY_THE_BACKEND_ADAPTER = (
    "xnorm.freeze does not depend on how a weight is reparametrized; the backend's main adapter runs the "
    "fine-tuning case"
)
#: torch's BatchNorm defaults; each adapter translates them into its framework's convention.
TORCH_MOMENTUM, EPS = 0.1, 1e-5

BATCH, TEST_BATCH, IN_CHANNELS, CHANNELS, CLASSES, SIZE = 6, 3, 2, 4, 2, 5
CONV1 = LayerCase("conv1", "conv2d", (CHANNELS, IN_CHANNELS, 3, 3), (BATCH, IN_CHANNELS, SIZE, SIZE), bias=False,
                  stride=(1, 1), padding=(1, 1), dilation=(1, 1), output_padding=(0, 0))
BATCHNORMS = ("bn1", "bn2")
FROZEN_LAYER = "bn1"
FIXED_LAYER = "conv1"
#: the arrays of the model, in canonical layout; every one is in a record
PARAMETERS = (
    "conv1.weight",
    "bn1.weight", "bn1.bias",
    "conv2.weight", "conv2.bias",
    "bn2.weight", "bn2.bias",
    "fc.weight", "fc.bias",
)  # fmt: skip
STATISTICS = ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var")
OUTPUTS = ("backbone_eval", "output_eval")
RECORD_KEYS = PARAMETERS + STATISTICS + OUTPUTS
SHAPES = {
    "conv1.weight": CONV1.weight_shape,
    "conv2.weight": (CHANNELS, CHANNELS, 1, 1),
    "conv2.bias": (CHANNELS,),
    "fc.weight": (CLASSES, CHANNELS),
    "fc.bias": (CLASSES,),
    **{f"{bn}.{name}": (CHANNELS,) for bn in BATCHNORMS for name in ("weight", "bias", "running_mean", "running_var")},
}

Record = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class FineTuningRun:
    """What :meth:`~xnorm.conformance.adapter.Adapter.fine_tune` gets: the script's data and settings.

    ``weights``: every key of :data:`PARAMETERS` and :data:`STATISTICS`, canonical layout, rounded to
    ``dtype``. ``batches``: ``FROZEN_STEPS + 1`` pairs ``(x (N, 2, 5, 5), target (N, 2))``; the last one
    is for the step after ``unfreeze`` (or the sixth plain step). ``test_x``: the eval batch of every
    record. ``momentum`` and ``eps``: torch's values (an adapter translates them with
    :func:`framework_settings`). ``freeze``: run the script with ``xnorm.freeze`` on :data:`FROZEN_LAYER`,
    or without (the counter-example).
    """

    dtype: str
    weights: Dict[str, np.ndarray]
    batches: Tuple[Tuple[np.ndarray, np.ndarray], ...]
    test_x: np.ndarray
    freeze: bool
    lr: float = LEARNING_RATE
    momentum: float = TORCH_MOMENTUM
    eps: float = EPS

    def framework_settings(self, framework: str) -> Tuple[float, float]:
        """``(momentum, eps)`` for ``framework``'s BatchNorm ("torch", "mindspore", "flax")."""
        return tuple(equivalent_batchnorm_settings("torch", framework, self.momentum, self.eps))

    def schedule(self, *, record, new_trainer, step, unfreeze) -> List[Record]:
        """The script's order of events, the same in every framework; the callables are the framework's.

        ``record()`` reads the model (a :data:`RECORD_KEYS` record); ``new_trainer()`` builds what trains
        the parameters that train now (an optimizer, or a compiled train step); ``step(trainer, batch)``
        runs one training step on ``(x, target)``; ``unfreeze()`` calls ``xnorm.unfreeze`` on the model.
        A record before training and after each of the :data:`FROZEN_STEPS` steps; then, with
        ``freeze``, unfreeze and a new trainer (the frozen layer's scale and shift train again, and the
        old trainer does not hold them); then one more step and its record.
        """
        trainer = new_trainer()
        records = [record()]
        for batch in self.batches[:FROZEN_STEPS]:
            step(trainer, batch)
            records.append(record())
        if self.freeze:
            unfreeze()
            trainer = new_trainer()
        step(trainer, self.batches[FROZEN_STEPS])
        records.append(record())
        return records


@dataclasses.dataclass(frozen=True)
class FineTuningCase:
    """The fine-tuning case for one dtype and device. Quacks like :class:`~xnorm.conformance.cases.Case`
    where the runner and the reports look (``id``, ``reparametrization``, ``dtype``, ``device``) and
    brings its own checks and life cycle."""

    dtype: str
    device: str

    reparametrization = FINE_TUNING_KIND
    checks = tuple(FINE_TUNING_CHECKS)

    @property
    def id(self) -> str:
        return f"finetune-convnet-bn-{self.dtype}-{self.device}"

    @property
    def seed(self) -> int:
        return zlib.crc32(f"finetune-convnet-bn-{self.dtype}".encode())

    def run(self, *, freeze: bool) -> FineTuningRun:
        """The script's data (the same for every device and both runs)."""
        rng = np.random.default_rng(self.seed)

        def draw(shape, scale=1.0, offset=0.0):
            return round_to_dtype(offset + scale * rng.standard_normal(shape), self.dtype)

        weights = {
            "conv1.weight": draw(SHAPES["conv1.weight"], 1 / np.sqrt(18)),
            "conv2.weight": draw(SHAPES["conv2.weight"], 0.5),
            "conv2.bias": draw(SHAPES["conv2.bias"], 0.1),
            "fc.weight": draw(SHAPES["fc.weight"], 0.5),
            "fc.bias": draw(SHAPES["fc.bias"], 0.1),
        }
        for bn in BATCHNORMS:
            # "pretrained" statistics, away from what the batches give, so that a moving one is seen
            weights[f"{bn}.weight"] = draw((CHANNELS,), 0.1, 1.0)
            weights[f"{bn}.bias"] = draw((CHANNELS,), 0.1)
            weights[f"{bn}.running_mean"] = draw((CHANNELS,), 0.5)
            weights[f"{bn}.running_var"] = round_to_dtype(0.5 + rng.uniform(size=CHANNELS), self.dtype)
        batches = tuple(
            (draw((BATCH, IN_CHANNELS, SIZE, SIZE)), draw((BATCH, CLASSES))) for _ in range(FROZEN_STEPS + 1)
        )
        return FineTuningRun(self.dtype, weights, batches, draw((TEST_BATCH, IN_CHANNELS, SIZE, SIZE)), freeze)

    def life_cycle(self, adapter, checks, saved: Dict[str, np.ndarray], stage: List[str]) -> None:
        """Run both scripts through ``adapter`` and fold every comparison into ``checks`` (the runner's
        :class:`~xnorm.conformance.runner.CheckResult` objects); ``stage[0]`` names the check in progress."""
        convention = _framework_of(adapter)
        stage[0] = "frozen_state"
        run = self.run(freeze=True)
        records = _checked_records(adapter.fine_tune(run), run)
        first = records[0]
        for key in PARAMETERS + STATISTICS:
            checks["frozen_state" if _is_frozen(key) else "fine_tuning"].add(
                first[key], run.weights[key], f"{key} as built (record 0)"
            )
        reference_first = reference_eval(first, run)
        for key in OUTPUTS:
            checks["fine_tuning"].add(first[key], reference_first[key], f"{key} before training")
        for step in range(1, FROZEN_STEPS + 1):
            now = records[step]
            for key in PARAMETERS + STATISTICS:
                if _is_frozen(key):
                    checks["frozen_state"].add(now[key], run.weights[key], f"{key} after step {step}")
            stage[0] = "frozen_output"
            checks["frozen_output"].add(now["backbone_eval"], first["backbone_eval"], f"backbone output after step "
                                        f"{step} vs before training")
            stage[0] = "fine_tuning"
            expected = reference_step(records[step - 1], run.batches[step - 1], run, convention, frozen=True)
            for key in RECORD_KEYS:
                if not _is_frozen(key):
                    checks["fine_tuning"].add(now[key], expected[key], f"{key} after step {step}")
            stage[0] = "frozen_state"
        stage[0] = "unfreeze"
        last = FROZEN_STEPS + 1
        expected = reference_step(records[last - 1], run.batches[last - 1], run, convention, frozen=False)
        for key in RECORD_KEYS:
            checks["unfreeze"].add(records[last][key], expected[key], f"{key} after unfreeze and one step")
        saved.update(_saved("frozen", records, convention))

        stage[0] = "drift"
        plain_run = self.run(freeze=False)
        plain = _checked_records(adapter.fine_tune(plain_run), plain_run)
        for key in PARAMETERS + STATISTICS:
            checks["drift"].add(plain[0][key], plain_run.weights[key], f"{key} as built (record 0)")
        for step in range(1, FROZEN_STEPS + 2):
            expected = reference_step(plain[step - 1], plain_run.batches[step - 1], plain_run, convention,
                                      frozen=False)
            _require_drift(plain[step - 1], expected, self.dtype, step)
            for key in RECORD_KEYS:
                checks["drift"].add(plain[step][key], expected[key], f"{key} after step {step} without freeze")
        saved.update(_saved("plain", plain, convention))


def fine_tuning_cases(dtypes: Sequence[str], devices: Sequence[str]) -> List[FineTuningCase]:
    return [FineTuningCase(dtype, device) for device in devices for dtype in dtypes if dtype in FINE_TUNING_DTYPES]


# -- the float64 reference -------------------------------------------------------------------------------
def _is_frozen(key: str) -> bool:
    """conv1 (never trained) and bn1 (frozen) hold still in the frozen steps."""
    return key.split(".")[0] in (FROZEN_LAYER, FIXED_LAYER)


def _framework_of(adapter) -> str:
    # A third-party adapter of another framework states its convention with ``batchnorm_convention``.
    framework = getattr(adapter, "batchnorm_convention", None) or adapter.backend
    return framework if framework in CONVENTIONS else "torch"


def _as64(record: Record) -> Record:
    return {key: np.asarray(value, dtype=np.float64) for key, value in record.items()}


def _checked_records(records, run: FineTuningRun) -> List[Record]:
    expected = FROZEN_STEPS + 2
    if len(records) != expected:
        raise ValueError(f"fine_tune returned {len(records)} records, the script has {expected}")
    out = []
    for index, record in enumerate(records):
        missing = sorted(set(RECORD_KEYS) - set(record))
        if missing:
            raise ValueError(f"fine_tune's record {index} lacks {', '.join(missing)}")
        out.append(_as64(record))
    return out


def _batchnorm_train(h, weight, bias, mean, var, momentum_new: float, unbiased: bool, eps: float):
    """Training-mode BatchNorm over axes (0, 2, 3): output, new statistics and what backward needs."""
    axes = (0, 2, 3)
    count = h.size // h.shape[1]
    batch_mean = h.mean(axis=axes)
    batch_var = h.var(axis=axes)
    inv_std = 1.0 / np.sqrt(batch_var + eps)
    x_hat = (h - batch_mean[None, :, None, None]) * inv_std[None, :, None, None]
    y = x_hat * weight[None, :, None, None] + bias[None, :, None, None]
    update_var = batch_var * count / (count - 1) if unbiased else batch_var
    new_mean = (1 - momentum_new) * mean + momentum_new * batch_mean
    new_var = (1 - momentum_new) * var + momentum_new * update_var
    return y, new_mean, new_var, (x_hat, inv_std)


def _batchnorm_eval(h, weight, bias, mean, var, eps: float):
    scale = weight / np.sqrt(var + eps)
    return (h - mean[None, :, None, None]) * scale[None, :, None, None] + bias[None, :, None, None]


def _batchnorm_backward(grad_y, weight, saved):
    """dL/dx, dL/dweight, dL/dbias of a training-mode BatchNorm (the batch statistics depend on x)."""
    x_hat, inv_std = saved
    axes = (0, 2, 3)
    grad_weight = (grad_y * x_hat).sum(axis=axes)
    grad_bias = grad_y.sum(axis=axes)
    grad_x_hat = grad_y * weight[None, :, None, None]
    grad_x = inv_std[None, :, None, None] * (
        grad_x_hat
        - grad_x_hat.mean(axis=axes, keepdims=True)
        - x_hat * (grad_x_hat * x_hat).mean(axis=axes, keepdims=True)
    )
    return grad_x, grad_weight, grad_bias


def _pointwise(weight, bias, x):
    """The 1x1 convolution conv2."""
    return np.einsum("oi,nihw->nohw", weight[:, :, 0, 0], x) + bias[None, :, None, None]


def reference_eval(record: Record, run: FineTuningRun) -> Record:
    """The two eval-mode outputs on ``run``'s test batch for the arrays of ``record``: ``{"backbone_eval",
    "output_eval"}``."""
    return _eval_outputs(_as64(record), np.asarray(run.test_x, np.float64))


def _conv1(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    return layers.forward(dataclasses.replace(CONV1, input_shape=x.shape), weight, None, x)


def _eval_outputs(p: Record, x: np.ndarray) -> Record:
    h1 = _conv1(p["conv1.weight"], x)
    r1 = np.maximum(_batchnorm_eval(h1, p["bn1.weight"], p["bn1.bias"], p["bn1.running_mean"],
                                    p["bn1.running_var"], EPS), 0)
    h2 = _pointwise(p["conv2.weight"], p["conv2.bias"], r1)
    r2 = np.maximum(_batchnorm_eval(h2, p["bn2.weight"], p["bn2.bias"], p["bn2.running_mean"],
                                    p["bn2.running_var"], EPS), 0)
    y = r2.mean(axis=(2, 3)) @ p["fc.weight"].T + p["fc.bias"]
    return {"backbone_eval": r1, "output_eval": y}


def reference_step(before: Record, batch, run: FineTuningRun, framework: str, *, frozen: bool) -> Record:
    """One training step of the script from the arrays of ``before``, in float64, under ``framework``'s
    BatchNorm convention; ``frozen``: bn1 uses and keeps its statistics and its affine does not train.
    Returns the next record (arrays rounded to the run's dtype, eval outputs on the test batch)."""
    p = _as64(before)
    x, target = (np.asarray(a, np.float64) for a in batch)
    convention = CONVENTIONS[framework]
    momentum_new = run.momentum  # torch's momentum weighs the new batch value: every framework's, translated
    unbiased = convention.running_var == "unbiased"
    new = dict(p)

    h1 = _conv1(p["conv1.weight"], x)
    if frozen:
        a1 = _batchnorm_eval(h1, p["bn1.weight"], p["bn1.bias"], p["bn1.running_mean"], p["bn1.running_var"], run.eps)
        saved1 = None
    else:
        a1, new["bn1.running_mean"], new["bn1.running_var"], saved1 = _batchnorm_train(
            h1, p["bn1.weight"], p["bn1.bias"], p["bn1.running_mean"], p["bn1.running_var"], momentum_new, unbiased,
            run.eps,
        )
    r1 = np.maximum(a1, 0)
    h2 = _pointwise(p["conv2.weight"], p["conv2.bias"], r1)
    a2, new["bn2.running_mean"], new["bn2.running_var"], saved2 = _batchnorm_train(
        h2, p["bn2.weight"], p["bn2.bias"], p["bn2.running_mean"], p["bn2.running_var"], momentum_new, unbiased,
        run.eps,
    )
    r2 = np.maximum(a2, 0)
    pooled = r2.mean(axis=(2, 3))
    y = pooled @ p["fc.weight"].T + p["fc.bias"]

    grad_y = (y - target) / y.size
    grads = {"fc.weight": grad_y.T @ pooled, "fc.bias": grad_y.sum(axis=0)}
    grad_r2 = np.broadcast_to((grad_y @ p["fc.weight"])[:, :, None, None], r2.shape) / (r2.shape[2] * r2.shape[3])
    grad_h2, grads["bn2.weight"], grads["bn2.bias"] = _batchnorm_backward(grad_r2 * (a2 > 0), p["bn2.weight"], saved2)
    grads["conv2.weight"] = np.einsum("nohw,nihw->oi", grad_h2, r1)[:, :, None, None]
    grads["conv2.bias"] = grad_h2.sum(axis=(0, 2, 3))
    if not frozen:
        grad_r1 = np.einsum("oi,nohw->nihw", p["conv2.weight"][:, :, 0, 0], grad_h2)
        _, grads["bn1.weight"], grads["bn1.bias"] = _batchnorm_backward(grad_r1 * (a1 > 0), p["bn1.weight"], saved1)

    for key, grad in grads.items():
        new[key] = p[key] - run.lr * grad
    new = {key: round_to_dtype(value, run.dtype).astype(np.float64) for key, value in new.items()
           if key not in OUTPUTS}
    new.update(reference_eval(new, run))
    return new


def _require_drift(before: Record, after: Record, dtype: str, step: int) -> None:
    """The counter-example proves something only if bn1's statistics move far beyond the tolerance."""
    from .tolerances import tolerance

    rtol, atol = tolerance(dtype, "training")
    for key in ("bn1.running_mean", "bn1.running_var"):
        moved = np.max(np.abs(after[key] - before[key]))
        if moved < 100 * (atol + rtol * np.max(np.abs(before[key]))):
            raise AssertionError(
                f"suite bug: the reference's {key} moved only {moved:.3g} at step {step} without freeze; the "
                "counter-example needs data whose batch statistics differ from the stored ones"
            )


def _depends_on_the_variance_convention(prefix: str, key: str) -> bool:
    """Whether a record's array, from step 1 on, depends on how a training BatchNorm updates its running
    variance (torch and MindSpore: unbiased, Flax: biased). Parameters and running means never do: a
    training-mode forward normalizes with the batch's own statistics. Running variances and the eval
    outputs that read them do, except the frozen bn1's and the backbone's before ``unfreeze``."""
    if key.endswith("running_var") or key in OUTPUTS:
        frozen_part = prefix == "frozen" and (key.startswith(FROZEN_LAYER) or key == "backbone_eval")
        return not frozen_part
    return False


def _saved(prefix: str, records: List[Record], convention: str) -> Dict[str, np.ndarray]:
    """Arrays for the cross-backend comparison: each key's trajectory, one stacked array per key. What
    depends on the running-variance convention is saved under a name that carries it, so only
    backends of the same convention compare it (the report compares the names both runs have); the
    frozen bn1 and backbone, identical in every convention until ``unfreeze``, are saved both ways."""
    variance = CONVENTIONS[convention].running_var
    out = {}
    for key in RECORD_KEYS:
        trajectory = np.stack([record[key] for record in records])
        if _depends_on_the_variance_convention(prefix, key):
            out[saved_name(prefix, key, variance)] = trajectory
            continue
        if key.endswith("running_var") or key in OUTPUTS:  # the frozen part: the same until unfreeze
            out[saved_name(prefix, key, variance)] = trajectory
            trajectory = trajectory[: FROZEN_STEPS + 1]
        out[saved_name(prefix, key)] = trajectory
    return out


def saved_name(prefix: str, key: str, variance: str = "") -> str:
    """``finetune_<run>_<key>``, with ``@<unbiased|biased>`` for what depends on the variance convention."""
    return f"finetune_{prefix}_{key}" + (f"@{variance}" if variance else "")


#: saved array -> quantity, for the cross-backend comparison
SAVED_QUANTITY = {
    saved_name(prefix, key, variance): "training"
    for prefix in ("frozen", "plain")
    for key in RECORD_KEYS
    for variance in ("", "unbiased", "biased")
}
