"""Image-level label files (``cls_labels.npy`` / ``.json``) read without trusting pickle.

WSSS projects ship ``cls_labels.npy`` as ``np.save({image_id: multi-hot})``: a 0-d object array
whose payload is a pickle. ``np.load(allow_pickle=True)`` would run whatever that pickle says, and
datasets come from third parties and shared buckets, so we parse it with an unpickler that only
resolves the handful of numpy globals an array of arrays needs.
"""
from __future__ import annotations

import io
import json
import pickle
from typing import Any, Mapping

import numpy as np

from diclip import storage
from diclip.errors import DataError



def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol 0-2 pickles spell array buffers as
    ``_codecs.encode(str, "latin1")``; any other codec is not something numpy writes."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


# Exactly what pickling a dict of numpy arrays/scalars references (found by experiment with
# protocols 0-5 and numpy 1.x/2.x). ``numpy.core`` is numpy 1.x's name for ``numpy._core``.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,  # type: ignore[attr-defined]
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,  # type: ignore[attr-defined]
    # protocol 5 pickles (pickle.dump(..., protocol=5)) rebuild contiguous arrays from a buffer
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,  # type: ignore[attr-defined]
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,  # type: ignore[attr-defined]
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed numpy globals; anything else is refused before it is imported."""

    def __init__(self, file: io.BytesIO, uri: str):
        # latin1 lets numpy arrays pickled by Python 2 (old VOC label files) decode their buffers.
        super().__init__(file, encoding="latin1")
        self._uri = uri

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._uri}: a labels file may only "
                "contain a dict of numpy arrays; regenerate it with diclip.data.save_cls_labels"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to unpickle a persistent id from {self._uri}: not a labels file")


def _safe_load_npy(data: bytes, uri: str) -> Any:
    """Parse a .npy file; object arrays go through the restricted unpickler."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            # 3.0 differs from 2.0 only in allowing utf8 in the (ascii in practice) header.
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # numpy raises ValueError/SyntaxError/EOFError... for broken headers
        raise DataError(f"{uri} is not a valid .npy file ({type(e).__name__}: {e}); re-create the labels file") from None
    if not dtype.hasobject:
        count = int(np.prod(shape)) if shape else 1
        arr = np.frombuffer(f.read(), dtype=dtype, count=count)
        return arr.reshape(shape, order="F" if fortran else "C")
    try:
        obj = _RestrictedUnpickler(f, uri).load()
    except DataError:
        raise
    except Exception as e:  # truncated/garbled pickle: any exception type is possible
        raise DataError(f"cannot parse the pickle in {uri} ({type(e).__name__}: {e}); re-create the labels file") from None
    return obj


def _to_label_dict(obj: Any, uri: str) -> dict[str, np.ndarray]:
    """Normalise the loaded object to ``{str id: float32 1-d array}``."""
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{uri} holds a {type(obj).__name__}, expected a dict {{image_id: multi-hot vector}}; "
            "re-create it with diclip.data.save_cls_labels"
        )
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        key = key.decode() if isinstance(key, bytes) else str(key)
        try:
            vec = np.asarray(value, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{uri}: label of {key!r} is not a numeric vector; re-create the labels file") from None
        out[key] = vec
    return out


def load_cls_labels(uri: str) -> dict[str, np.ndarray]:
    """Read ``{image_id: float32 multi-hot [K-1]}`` from a ``.npy`` (pickled dict) or ``.json`` file."""
    data = storage.read_bytes(uri)
    lower = uri.lower()
    if lower.endswith(".json"):
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{uri} is not valid JSON ({e}); fix or re-create the labels file") from None
        return _to_label_dict(obj, uri)
    if lower.endswith(".npy"):
        return _to_label_dict(_safe_load_npy(data, uri), uri)
    raise DataError(f"unsupported labels file {uri}: use a .npy (pickled dict) or .json file")


def save_cls_labels(uri: str, labels: Mapping[str, Any]) -> None:
    """Write labels in the WSSS ``cls_labels.npy`` dict format (or ``.json``), atomically."""
    clean = {str(k): np.asarray(v, dtype=np.float32).reshape(-1) for k, v in labels.items()}
    lower = uri.lower()
    if lower.endswith(".json"):
        payload = {k: [int(x) if float(x).is_integer() else float(x) for x in v.tolist()] for k, v in clean.items()}
        storage.write_bytes(uri, json.dumps(payload).encode("utf-8"))
        return
    if not lower.endswith(".npy"):
        raise DataError(f"unsupported labels file {uri}: use a .npy or .json suffix")
    holder = np.empty((), dtype=object)
    holder[()] = clean
    buf = io.BytesIO()
    np.save(buf, holder, allow_pickle=True)
    storage.write_bytes(uri, buf.getvalue())
