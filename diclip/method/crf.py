"""Dense CRF post-processing of segmentation probabilities (reference ``--crf_post``).

The reference (``utils/dcrf.py``, pydensecrf 1.0rc3) runs a fully connected CRF on the softmax of the
upsampled logits with ``iter_max=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4`` and
takes the argmax; the unary is pydensecrf's ``unary_from_softmax`` (``-log`` of the probabilities
clipped at 1e-5). The original ``pydensecrf`` is unmaintained and no longer builds on current
Python/Cython; **pydensecrf2** (a maintained fork that installs the same ``pydensecrf`` module) is a
dependency of diclip and builds with the default set-up. SimpleCRF (module ``denseCRF``) is accepted
as a fallback backend. Without either, asking for a CRF is a one-line :class:`~diclip.errors.ConfigError`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from diclip.errors import ConfigError

INSTALL_HINT = "pip install pydensecrf2"


@dataclass(frozen=True)
class DenseCRFParams:
    """Reference values (tools/infer_seg_*.py, infer_lam.py)."""

    iter_max: int = 10
    pos_xy_std: float = 1.0
    pos_w: float = 3.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    bi_w: float = 4.0


def crf_backend() -> str:
    """Name of the importable dense-CRF backend ("pydensecrf" or "simplecrf"); one-line error if none."""
    for module, name in (("pydensecrf.densecrf", "pydensecrf"), ("denseCRF", "simplecrf")):
        try:
            importlib.import_module(module)
            return name
        except Exception:  # ImportError, or a broken binary build
            continue
    raise ConfigError(f"evaluate.crf=true needs a dense CRF package and none is importable: {INSTALL_HINT} "
                      "(provides the pydensecrf module; SimpleCRF also works), or set evaluate.crf=false")


def dense_crf(image: np.ndarray, prob: np.ndarray, params: DenseCRFParams = DenseCRFParams()) -> np.ndarray:
    """Refined label map [H, W] (uint8 class ids) from an RGB image [H, W, 3] uint8 and probabilities [K, H, W]."""
    backend = crf_backend()
    k, h, w = prob.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and probabilities {(h, w)} differ in size")
    # pydensecrf's Cython wants writable C-contiguous buffers (decoded images may be read-only views)
    image = np.array(image, dtype=np.uint8, order="C", copy=True)
    prob = np.array(prob, dtype=np.float32, order="C", copy=True)
    if backend == "pydensecrf":
        dcrf = importlib.import_module("pydensecrf.densecrf")
        unary_from_softmax = importlib.import_module("pydensecrf.utils").unary_from_softmax
        d = dcrf.DenseCRF2D(w, h, k)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob)))  # -log(clip(p, 1e-5, 1))
        d.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
        d.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=image, compat=params.bi_w)
        q = np.array(d.inference(params.iter_max)).reshape(k, h, w)
        return q.argmax(0).astype(np.uint8)
    prob = np.clip(prob, 1e-5, 1.0)
    dense = importlib.import_module("denseCRF")
    # SimpleCRF: densecrf(I, P[H, W, K], (w1 bilateral, alpha xy, beta rgb, w2 gaussian, gamma xy, iterations))
    param = (params.bi_w, params.bi_xy_std, params.bi_rgb_std, params.pos_w, params.pos_xy_std, params.iter_max)
    lab = dense.densecrf(image, np.ascontiguousarray(prob.transpose(1, 2, 0)), param)
    return np.asarray(lab).astype(np.uint8)
