"""One script for a lent GPU (under 10 minutes): the method's GPU work at full size, on random-init models.

    python bench/gpu_check.py                 # CUDA: ViT-B/16 (QuickGELU) + SD 2.1-base topology, 320 px
    python bench/gpu_check.py --tiny          # smoke run of this script with the tiny models (CPU is fine)

Measures, side by side in one run (random weights: speed and memory only, nothing about quality):

* ``capture``: the correlate stage's model work per image - VAE encode + one UNet pass with the two capture
  processors (``DiffusionAttention``) + ACR (``vce_compact``) - in fp16, with and without xformers for the
  layers that are not captured (when xformers imports);
* ``train step``: the stored-map step (frozen CLIP forward with the VCE bias, heads in bf16, losses,
  backward, AdamW) vs the online step (the same plus the diffusion capture), batch 4 at 320 px. The heads
  are cast to bf16 as ``train.precision=bf16`` does (DeepSpeed itself is not started here);
* ``evaluate``: segmenter-only multi-scale inference (0.7/1.0/1.25/1.5 x 320 + flip) per image.

Prints one table (images/s, ms per image, peak GPU memory) and writes ``bench/results/gpu_check.json``.
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import timeit, write_result

SIZE = 320


def build(tiny: bool, device: str):
    """(CLIP bundle, diffusers pipeline fp16, model config) at full size, or the tiny demo models."""
    import open_clip

    from diclip.config import ClipConfig, DiffusionConfig, ModelConfig
    from diclip.models.clip import ClipBundle, build_clip
    from diclip.models.diffusion import build_diffusion

    if tiny:
        mcfg = ModelConfig(clip=ClipConfig(name="diclip-tiny", pretrained=""), diffusion=DiffusionConfig(source="tiny"),
                           adapter_size=64, embedding_dim=32, decoder_layers=1, decoder_heads=4)
        return build_clip(mcfg.clip, device), build_diffusion("tiny", device=device), mcfg
    from fullsize_check import sd21_base_pipeline

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True).to(device).eval()
    clip = ClipBundle(model=model.requires_grad_(False), tokenizer=open_clip.get_tokenizer("ViT-B-16"),
                      model_id="ViT-B-16/random")
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = sd21_base_pipeline(seed=0).to(device, dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return clip, pipe, ModelConfig(clip=ClipConfig(name="ViT-B-16", pretrained=""))


def random_cache(embed_dim: int, classes: list[str]):
    import torch.nn.functional as F

    from diclip.models.kv_cache import KVCache

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0] * 3 + [c for c in range(1, len(classes)) for _ in range(2)])
    keys = torch.randn(len(ids), embed_dim, generator=g)
    return KVCache(keys / keys.norm(dim=-1, keepdim=True), F.one_hot(ids, len(classes)).float(), {"classes": classes})


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8, help="images per capture / evaluate call")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.tiny:
        raise SystemExit("no CUDA device: run with --tiny to check the script itself")
    from diclip.config import DiffusionConfig, MethodConfig
    from diclip.data.classes import VOC
    from diclip.inference import multiscale_logits, segmenter_forward
    from diclip.models.attention_capture import DiffusionAttention
    from diclip.models.diffusion_maps import rar_mean, vce_compact
    from diclip.models.diclip_model import DiCLIP
    from diclip.models.diffusion import maybe_enable_xformers
    from diclip.method.pseudo import rar_transition_from_mean

    t_start = time.perf_counter()
    clip, pipe, mcfg = build(a.tiny, device)
    dcfg, method = DiffusionConfig(), MethodConfig()
    patch = 16
    rows: list[tuple[str, float, float]] = []  # (what, seconds per image, peak GiB)
    images = torch.rand(a.batch, 3, SIZE, SIZE, device=device)
    seeds = list(range(a.batch))

    def capture_all() -> None:
        cap = capture(images, seeds)
        vce_compact(cap, method, dcfg)

    for xformers in (False, True):
        if xformers and not (device == "cuda" and maybe_enable_xformers(pipe, True)):
            continue
        capture = DiffusionAttention(pipe, dcfg, patch)  # installed after xformers: the captured layers stay exact
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timeit(capture_all, repeat=a.repeat)
        dt = str(pipe.unet.dtype).replace("torch.", "")
        rows.append((f"capture {dt}{' + xformers' if xformers else ''} (batch {a.batch})", sec / a.batch,
                     peak_gib(device)))

    model = DiCLIP(clip, VOC, random_cache(clip.embed_dim, list(VOC.classes)), mcfg, method).to(device)
    model.heads.to(torch.bfloat16 if device == "cuda" else torch.float32)
    opt = torch.optim.AdamW(model.heads.parameters(), lr=1e-4)
    batch = torch.rand(4, 3, SIZE, SIZE, device=device)
    labels = (torch.rand(4, VOC.num_classes - 1, device=device) > 0.8).float()
    capture = DiffusionAttention(pipe, dcfg, patch)
    stored = capture(batch, [0, 1, 2, 3])
    corr0 = vce_compact(stored, method, dcfg).expand().float().to(device)
    rar0 = rar_transition_from_mean(rar_mean(stored).float()).to(device)

    def step(online: bool) -> None:
        corr, rar, grid = corr0, rar0, stored.rar_grid
        if online:
            cap = capture(batch, [0, 1, 2, 3])
            corr = vce_compact(cap, method, dcfg).expand().float().to(device)
            rar, grid = rar_transition_from_mean(rar_mean(cap).float()).to(device), cap.rar_grid
        out = model(batch, corr)
        _, pseudo_label = model.pseudo_labels(out, rar, labels, (SIZE, SIZE), rar_grid=grid)
        loss = model.losses(out, pseudo_label, 0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for online in (False, True):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = timeit(lambda: step(online), repeat=a.repeat)
        rows.append((f"train step bf16 heads, {'online' if online else 'stored'} maps (batch 4)", sec / 4,
                     peak_gib(device)))

    forward = segmenter_forward(model.eval())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pics = [images[i] for i in range(a.batch)]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        sec = timeit(lambda: multiscale_logits(forward, pics, SIZE, (0.7, 1.0, 1.25, 1.5), True, 0.4, patch, False),
                     repeat=a.repeat)
    rows.append((f"evaluate 4 scales + flip (batch {a.batch})", sec / a.batch, peak_gib(device)))

    print(f"\n{'what':<52} {'images/s':>9} {'ms/image':>9} {'peak GiB':>9}")
    for what, s, gib in rows:
        print(f"{what:<52} {1 / s:9.2f} {1000 * s:9.1f} {gib:9.2f}")
    base = {r[0].split(" (")[0]: r[1] for r in rows}
    stored_s = next(s for w, s, _ in rows if "stored" in w)
    online_s = next(s for w, s, _ in rows if "online" in w)
    print(f"train step online vs stored maps: {online_s / stored_s:.2f}x; total {time.perf_counter() - t_start:.0f} s")
    write_result("gpu_check" + ("_tiny" if a.tiny else ""), {
        "rows": [{"what": w, "seconds_per_image": s, "peak_gib": g} for w, s, g in rows],
        "online_vs_stored": online_s / stored_s, "by_name": base})


if __name__ == "__main__":
    main()
