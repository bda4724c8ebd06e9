"""A HiFi-GAN-style vocoder generator written three times (torch, MindSpore, Flax) and ported between them.

``python -m examples.hifigan.port --to mindspore`` (or ``--to flax``) from the repository root runs the
whole port; see README.md, "Porting a PyTorch model".
"""
