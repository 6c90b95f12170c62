"""Feature surgery as one matmul (the project's) vs the reference's elementwise form, side by side.

The reference (``clip_feature_surgery``, ``diff_knowledge_inject_cam``) builds the [B, 1+N, T, C] product
of every token with every text row (or cache key), subtracts its mean over T and sums over C. The project
computes the same quantity as ``(feats @ T^T) * w - mean_T``: one matmul, no [B, 1+N, T, C] tensor. Per
case (the surgery CAM against VOC/COCO text rows, retrieval against VOC/COCO-sized caches) this prints the
seconds of both forms and their ratio, the elementwise form's intermediate bytes, and each form's fp32
error against float64 (same fp32 inputs) on the similarity and on the min-max CAM the reference takes of it.
"""
from __future__ import annotations

import argparse

from _common import ratio_line, timeit, write_result

TOKENS = 1 + 400  # CLS + 20 x 20 patches at 320 px
DIM = 512  # ViT-B/16 embedding
CASES = {  # rows the tokens are compared with
    "surgery VOC (20 classes + 25 background words)": 45,
    "surgery COCO (80 + 23)": 103,
    "retrieval VOC cache (20 x 10 + 10 background)": 210,
    "retrieval COCO cache (80 x 5 + 10 background)": 410,
}


def elementwise(feats, text):
    """The reference's order of operations (clip.py :: clip_feature_surgery)."""
    prob = (feats[:, :1] @ text.t() * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n, c = feats.shape
    f = feats.reshape(b, n, 1, c) * text.reshape(1, 1, -1, c)
    f = f * w.unsqueeze(-1)
    return (f - f.mean(2, keepdim=True)).sum(-1)


def minmax(x):
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return (x - lo) / (hi - lo)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    import torch

    from diclip.method.cam import surgery_similarity

    g = torch.Generator().manual_seed(0)
    feats64 = torch.randn(args.batch, TOKENS, DIM, generator=g, dtype=torch.float64)
    feats64 = feats64 / feats64.norm(dim=1, keepdim=True)  # the model normalises over tokens (reference quirk)
    feats = feats64.float()
    feats64 = feats.double()  # the truth of the fp32 inputs: only arithmetic error is measured
    print(f"feature surgery, batch {args.batch} x {TOKENS} tokens x {DIM} dims, float32, "
          f"{torch.get_num_threads()} threads")
    rows = {}
    for name, t in CASES.items():
        text = torch.randn(t, DIM, generator=g, dtype=torch.float64)
        text = (text / text.norm(dim=-1, keepdim=True)).float()
        truth = surgery_similarity(feats64, text.double())
        mm = timeit(lambda: surgery_similarity(feats, text), repeat=args.repeat)
        ew = timeit(lambda: elementwise(feats, text), repeat=args.repeat)
        got_mm, got_ew = surgery_similarity(feats, text), elementwise(feats, text)
        err = {k: (v.double() - truth).abs().max().item() for k, v in (("matmul", got_mm), ("elementwise", got_ew))}
        cam_err = {k: (minmax(v.double()) - minmax(truth)).abs().max().item()
                   for k, v in (("matmul", got_mm), ("elementwise", got_ew))}
        inter = args.batch * TOKENS * t * DIM * 4
        print(f"{name}: T={t}")
        print("  " + ratio_line("elementwise vs matmul seconds", ew, mm, " s"))
        print(f"  elementwise intermediate [B, 1+N, T, C]: {inter / 1e6:.0f} MB (x2 live at the mean subtraction)")
        print(f"  fp32 max error vs float64, similarity: matmul {err['matmul']:.2e}, "
              f"elementwise {err['elementwise']:.2e}; min-max CAM: matmul {cam_err['matmul']:.2e}, "
              f"elementwise {cam_err['elementwise']:.2e}")
        rows[name] = {"rows": t, "matmul_s": mm, "elementwise_s": ew, "ratio": ew / mm,
                      "elementwise_intermediate_bytes": inter, "similarity_error": err, "cam_error": cam_err}
    write_result("surgery_forms", {"batch": args.batch, "tokens": TOKENS, "dim": DIM, "cases": rows})


if __name__ == "__main__":
    main()
