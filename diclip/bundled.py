"""Weights and model configs that ship inside the package, addressed as ``diclip:<path>``.

A spec names the shipped toy models as ``model.clip.pretrained: diclip:toy/clip.safetensors`` and
``model.diffusion.source: diclip:toy/diffusion``: the string is the same on every machine (a laptop, a
Ray worker, a pod with the package installed), and each loader resolves it to this installation's file
just before handing it to the real loader (open_clip, diffusers).
"""
from __future__ import annotations

import os
from importlib import resources

PREFIX = "diclip:"


def is_bundled(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def resolve(name: str) -> str:
    """``diclip:toy/clip.safetensors`` -> the absolute path in this installation; anything else unchanged."""
    if not is_bundled(name):
        return name
    rel = name[len(PREFIX):].lstrip("/")
    return os.path.join(str(resources.files("diclip") / "resources"), *rel.split("/"))
