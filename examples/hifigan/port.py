"""Port the HiFi-GAN-style generator from torch to MindSpore or Flax and prove the port, end to end.

    python -m examples.hifigan.port --to mindspore   # in an environment with torch and MindSpore
    python -m examples.hifigan.port --to flax        # in an environment with torch and Flax

Steps (each printed as it runs):

1. a torch generator with random weights (legacy and parametrization weight norm mixed, as in HiFi-GAN
   checkpoints) saved as ``generator.safetensors``;
2. ``xnorm.convert`` into the target model built with every convolution wrapped by ``xnorm.wrap``;
3. ``xnorm.compare`` on the same mel spectrogram: within the suite's float32 forward tolerance;
4. the ported weights converted back to torch: bit-exact against the original state dict;
5. weight norm removed on both sides (torch's own removal, ``xnorm.remove``), compared again;
6. the inference model exported (MindSpore MINDIR; Flax msgpack variables).

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

from .config import CONFIGS
from .torch_model import Generator, random_generator

TARGETS = {"mindspore": "mindspore_model", "flax": "flax_model"}


def _state_equal(a, b) -> list:
    """Keys whose tensors differ (dtype, shape or any bit) between two torch state dicts."""
    if list(a) != list(b):
        return sorted(set(a) ^ set(b)) or ["key order"]
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


def port(to: str, config_name: str = "small", out: Path = Path("hifigan-port"), frames: int = 32) -> bool:
    config = CONFIGS[config_name]
    target = importlib.import_module(f"examples.hifigan.{TARGETS[to]}")
    out.mkdir(parents=True, exist_ok=True)
    ok = True

    torch_model = random_generator(config, seed=0)
    checkpoint = out / "generator.safetensors"
    xnorm.porting.write_safetensors({k: v.numpy() for k, v in torch_model.state_dict().items()}, checkpoint)
    print(f"1. torch generator ({sum(p.numel() for p in torch_model.parameters())} parameters) -> {checkpoint}")

    ported = target.wrapped_generator(config)
    xnorm.convert(checkpoint, to=to, like=ported, load=True)
    print(f"2. converted to {to} and loaded")

    mel = np.random.default_rng(0).standard_normal((2, config.mel_channels, frames)).astype(np.float32)
    comparison = xnorm.compare(torch_model, ported, mel, channels_last=target.CHANNELS_LAST)
    print(f"3. outputs, weight-normed:\n{comparison}")
    ok &= comparison.ok

    back = xnorm.convert(ported, to="torch", like=Generator(config))
    differing = _state_equal(back, torch_model.state_dict())
    print(f"4. round trip to torch: {'bit-exact' if not differing else f'DIFFERS in {differing[:5]}'}")
    ok &= not differing

    torch_model.remove_weight_norm()
    xnorm.remove(ported)
    comparison = xnorm.compare(torch_model, ported, mel, channels_last=target.CHANNELS_LAST)
    print(f"5. outputs after removing weight norm:\n{comparison}")
    ok &= comparison.ok

    exported = target.export(ported, mel if not target.CHANNELS_LAST else np.moveaxis(mel, 1, -1), out / "generator")
    print(f"6. exported: {exported}")
    print("port OK" if ok else "port FAILED")
    return bool(ok)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--to", required=True, choices=sorted(TARGETS))
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("hifigan-port"), help="folder for the files written")
    args = parser.parse_args(argv)
    return 0 if port(args.to, args.config, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
