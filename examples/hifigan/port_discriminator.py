"""Port HiFi-GAN's multi-scale discriminator (spectral norm on the first scale, weight norm on the others)
from torch to MindSpore or Flax and prove the port, training mode included.

    python -m examples.hifigan.port_discriminator --to mindspore   # an environment with torch and MindSpore
    python -m examples.hifigan.port_discriminator --to flax        # an environment with torch and Flax

Steps (each printed as it runs):

1. a torch discriminator with torch's legacy hooks, as HiFi-GAN's (``weight_orig``/``weight_u``/
   ``weight_v`` and ``weight_g``/``weight_v``), random weights, a few training-mode calls (so u and v
   have moved), saved as ``discriminator.safetensors``;
2. ``xnorm.convert`` into the target model built with ``xnorm.spectral_norm`` and ``xnorm.weight_norm``;
3. ``xnorm.compare`` in eval mode (logits and every feature map): within the float32 forward tolerance;
4. converted back to torch with the legacy keys: bit-exact against the checkpoint;
5. three training-mode calls on the port and on xnorm's torch discriminator loaded from the same
   checkpoint (the legacy hooks iterate in another order, docs/torch.md): every output of every call
   within tolerance, then u and v (converted back to torch) within tolerance;
6. both sides removed in eval mode and compared again.

Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import torch

import xnorm
from xnorm.conformance.tolerances import compare as within
from xnorm.conformance.tolerances import tolerance

from .config import DISCRIMINATOR_CONFIGS
from .torch_discriminator import MultiScaleDiscriminator, train_call, xnorm_discriminator

TARGETS = {"mindspore": "mindspore_discriminator", "flax": "flax_discriminator"}


def _leaves(out) -> list:
    return [np.asarray(leaf, dtype=np.float64) for _, leaf in xnorm.porting.output_leaves(out)]


def _worst(actual: list, expected: list, quantity: str = "forward") -> float:
    """Worst error/allowed over paired arrays, float32 tolerance of ``quantity``."""
    rtol, atol = tolerance("float32", quantity)
    return max(within(a, e, rtol, atol)["ratio"] for a, e in zip(actual, expected, strict=True))


def port(to: str, config_name: str = "small", out: Path = Path("hifigan-port"), samples: int = 256) -> bool:
    config = DISCRIMINATOR_CONFIGS[config_name]
    target = importlib.import_module(f"examples.hifigan.{TARGETS[to]}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((2, 1, samples)).astype(np.float32)
    ok = True

    torch.manual_seed(0)
    legacy = MultiScaleDiscriminator(config)
    for _ in range(3):
        train_call(legacy, rng.standard_normal((2, 1, samples)).astype(np.float32))
    checkpoint = out / "discriminator.safetensors"
    state = {k: v.numpy() for k, v in legacy.state_dict().items()}
    xnorm.porting.write_safetensors(state, checkpoint)
    print(f"1. torch discriminator ({sum(p.numel() for p in legacy.parameters())} parameters) -> {checkpoint}")

    ported = target.MultiScaleDiscriminator(config)
    xnorm.convert(checkpoint, to=to, like=ported, load=True)
    print(f"2. converted to {to} and loaded")

    comparison = xnorm.compare(legacy, ported, audio, channels_last=target.CHANNELS_LAST)
    print(f"3. eval-mode outputs ({len(comparison.outputs)} arrays), worst err/allowed "
          f"{max(o.error_over_allowed for o in comparison.outputs):.3g}: {'ok' if comparison.ok else 'DIFFER'}")
    ok &= comparison.ok

    back = xnorm.convert(ported, to="torch", like=MultiScaleDiscriminator(config))
    differing = [k for k, v in legacy.state_dict().items() if not torch.equal(back[k], v)]
    print(f"4. round trip to torch's legacy keys: {'bit-exact' if not differing else f'DIFFERS in {differing[:5]}'}")
    ok &= not differing

    reference = xnorm_discriminator(config)
    reference.load_state_dict(legacy.state_dict(), strict=True)
    worst = 0.0
    for _ in range(3):
        batch = rng.standard_normal((2, 1, samples)).astype(np.float32)
        worst = max(worst, _worst(_leaves(target.train_call(ported, batch)), _leaves(train_call(reference, batch))))
    state_back = xnorm.convert(ported, to="torch", like=xnorm_discriminator(config))
    expected_state = reference.state_dict()
    state_keys = [k for k in expected_state if k.endswith(("._u", "._v"))]
    worst_state = _worst([state_back[k].numpy() for k in state_keys], [expected_state[k].numpy() for k in state_keys],
                         "weight")
    print(f"5. three training-mode calls: outputs worst err/allowed {worst:.3g}; u, v of {len(state_keys) // 2} "
          f"layers after them {worst_state:.3g}")
    ok &= worst <= 1.0 and worst_state <= 1.0

    reference.eval()
    xnorm.remove(reference)
    if to == "mindspore":
        ported.set_train(False)
    else:
        ported.eval()
    xnorm.remove(ported)
    comparison = xnorm.compare(reference, ported, audio, channels_last=target.CHANNELS_LAST)
    print(f"6. after removing both reparametrizations (eval mode): worst err/allowed "
          f"{max(o.error_over_allowed for o in comparison.outputs):.3g}: {'ok' if comparison.ok else 'DIFFER'}")
    ok &= comparison.ok
    print("port OK" if ok else "port FAILED")
    return bool(ok)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, choices=sorted(TARGETS))
    parser.add_argument("--config", default="small", choices=sorted(DISCRIMINATOR_CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("hifigan-port"), help="folder for the files written")
    args = parser.parse_args(argv)
    return 0 if port(args.to, args.config, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
