"""Read the reference's released ``.pth`` files without ever unpickling arbitrary objects.

The published checkpoint is ``torch.save(DiCLIP_model.state_dict())`` and the published KV cache is
``torch.save([keys, values])``: both are tensors in plain containers, so ``torch.load(weights_only=True)``
reads them, and anything it refuses (a class, a function, a module object) is refused here in one line.
A file someone re-saved from a ``DataParallel``/DDP model carries ``module.`` in front of every key; a
checkpoint wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import re
from typing import Any, Callable

import torch

from diclip import storage
from diclip.errors import DiclipError, ModelError

WRAPPERS = ("state_dict", "model")
"""Keys under which training scripts commonly nest a state dict."""
PREFIX = "module."


def _why(e: BaseException) -> str:
    """The informative part of torch's (multi-paragraph) refusal."""
    text = " ".join(str(e).split())
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it names {m.group(1)}"
    m = re.search(r"Unsupported operand \d+|invalid load key[^.]*", text)
    return m.group(0) if m else (text[:200] or type(e).__name__)


def load_hashed(uri: str) -> tuple[Any, str]:
    """``torch.load(weights_only=True)`` of a local path or ``s3://`` object, on CPU, with one-line errors; and
    the SHA-256 of the file's bytes (an ``s3://`` object is read once for both)."""
    h = hashlib.sha256()
    return _load(uri, h), h.hexdigest()


def _load(uri: str, h: Any) -> Any:
    path = storage.local_path(uri)
    try:
        if path is not None:
            if not storage.exists(uri):
                raise ModelError(f"{uri}: no such file")
            source: Any = path
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        else:
            data = storage.read_bytes(uri)
            h.update(data)
            source = io.BytesIO(data)
        return torch.load(source, map_location="cpu", weights_only=True)
    except DiclipError:
        raise
    except pickle.UnpicklingError as e:
        if not re.search(r"GLOBAL [\w.]+", str(e)):  # no object named: garbage, not a pickle of objects
            raise ModelError(f"{uri}: not a torch.save file ({_why(e)})") from e
        raise ModelError(f"{uri}: refused, it holds more than tensors in plain containers ({_why(e)}); "
                         "diclip reads released files with torch.load(weights_only=True) and never unpickles "
                         "objects") from e
    except (RuntimeError, EOFError, OSError, ValueError, TypeError) as e:
        raise ModelError(f"{uri}: not a torch.save file ({_why(e)})") from e


def as_state_dict(obj: Any, uri: str, note: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict inside a loaded checkpoint, ``module.`` prefixes removed."""
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in WRAPPERS and isinstance(
            next(iter(obj.values())), dict):
        key = next(iter(obj))
        note(f"{uri}: state dict found under {key!r}")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{uri}: not a state dict (torch.load gives {type(obj).__name__}, not a dict of "
                         "tensors); pass the checkpoint as --checkpoint and the (keys, values) cache as --cache")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        k = bad[0]
        raise ModelError(f"{uri}: not a state dict ({len(bad)} entries are not named tensors, e.g. {k!r}: "
                         f"{type(obj[k]).__name__})")
    prefixed = [k for k in obj if k.startswith(PREFIX)]
    if prefixed:
        note(f"{uri}: removed the {PREFIX!r} prefix of {len(prefixed)} keys (a DataParallel/DDP save)")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if name in out:
            raise ModelError(f"{uri}: key {name!r} appears both with and without the {PREFIX!r} prefix")
        out[name] = v
    return out


def as_kv_pair(obj: Any, uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, values)`` of a released KV cache: a 2-element list or tuple of tensors."""
    if (not isinstance(obj, (list, tuple)) or len(obj) != 2
            or not all(isinstance(t, torch.Tensor) for t in obj)):
        what = (f"{type(obj).__name__} of {len(obj)}" if isinstance(obj, (list, tuple, dict))
                else type(obj).__name__)
        raise ModelError(f"{uri}: not a KV cache (the reference saves a (keys, values) pair of tensors; "
                         f"torch.load gives a {what})")
    return obj[0], obj[1]
