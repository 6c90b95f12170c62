"""Vectorised ACR (refine_correlation) vs the straightforward loop implementation.

The loop version follows the reference's structure: per image, per cluster, boolean indexing and a
[A, N, N] broadcast for the KL distance, then three dense S @ R refinement rounds.
"""
from __future__ import annotations

import argparse

from _common import ratio_line, timeit, write_result

BATCH = 8  # a training batch on 2 GPUs x 4 images
TOKENS = 400  # 320 px crop / 16 px patches = 20 x 20 tokens (DESIGN section 4)
HEADS = 3  # only heads 1 and 2 are used; a third keeps indexing honest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import torch

    from diclip.method.acr import refine_correlation
    from tests.method.loop_reference import refine_loop

    torch.manual_seed(0)
    side = int(TOKENS ** 0.5)
    q = torch.nn.functional.interpolate(torch.randn(args.batch * HEADS, 16, 6, 6), size=(side, side),
                                        mode="bilinear").reshape(args.batch, HEADS, 16, TOKENS)
    attn = (q.transpose(-1, -2) @ (q + 0.3 * torch.randn_like(q))).exp() / 10
    fast = timeit(lambda: refine_correlation(attn), repeat=args.repeat)
    slow = timeit(lambda: refine_loop(attn), repeat=args.repeat, warmup=0)
    same = torch.allclose(refine_correlation(attn), refine_loop(attn), rtol=1e-4, atol=1e-7)
    print(f"ACR on {args.batch} maps of {TOKENS}x{TOKENS} (float32, {torch.get_num_threads()} threads)")
    print(ratio_line("loop vs vectorised seconds/batch", slow, fast, " s"))
    print(f"outputs agree: {same}")
    write_result("acr_vs_loop", {"batch": args.batch, "tokens": TOKENS, "vectorised_s": fast, "loop_s": slow,
                                 "speedup": slow / fast, "outputs_agree": same})


if __name__ == "__main__":
    main()
