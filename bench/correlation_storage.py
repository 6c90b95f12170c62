"""Correlation maps at scale: storage size, extraction throughput, and training-step time.

(a) bytes per image of the compact forms vs dense fp16 (VCE map: ACR ids + cluster rows; RAR map:
    each codec), with exactness / pseudo-label pixel agreement against the dense map;
(b) ``correlate`` images/s with 2 actors vs 1 on local Ray;
(c) training-step time with stored maps (read + resample) vs online extraction (UNet pass per step).

All with the same tiny random models (this machine has no weights and no GPU); byte counts are also
given for the real SD 2.1 geometry (RAR layer: 1600 tokens, head dim 64 at 320 px), which fixes them.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from _common import ratio_line, timeit, write_result

SIZE = 320  # the reference crop: 20x20 CLIP tokens, 40x40 RAR tokens
IMAGES = 8  # images for the size/agreement measurements
SD21_RAR_HEAD_DIM = 64  # SD 2.1 up_blocks[3] attention: 320 channels / 5 heads
RAR_CODECS = ("qk_fp16", "qk_int8", "topk64", "topk32", "dense_fp16")


def _setup(size: int, images: int):
    import torch

    from diclip.config import load_spec
    from diclip.data import get_class_set, open_dataset
    from diclip.data.synthetic import generate_synthetic
    from diclip.models.kv_cache import save_cache
    from tests.helpers import random_cache

    tmp = tempfile.mkdtemp(prefix="diclip-bench-")
    spec = load_spec("configs/tiny.yaml", [f"output_uri={tmp}", f"data.crop_size={size}", "ray.progress_bars=false",
                                           f"synthesize.image_size=[{size},{size}]", f"correlate.max_side={size}",
                                           "train.mode=stored"])
    generate_synthetic(spec.data.root, num_train=max(images, 4), num_val=2, image_size=(size, size), show_progress=False)
    save_cache(spec.cache.output, random_cache(64, list(get_class_set("synthetic").classes)))
    ds = open_dataset(spec.data.root, "train", get_class_set("synthetic"))
    samples = [ds.load(i) for i in ds.ids[:images]]
    torch.manual_seed(0)
    return spec, samples


def storage_sizes(spec, samples) -> dict:
    import torch

    from diclip.method.acr import expand_compact
    from diclip.method.codecs import get_codec, nbytes
    from diclip.method.pseudo import rar_transition_from_mean
    from diclip.models.attention_capture import DiffusionAttention
    from diclip.models.diffusion_maps import noise_seed, vce_compact
    from diclip.models.diffusion import build_diffusion_from_config
    from diclip.train.trainer import DiCLIPTrainer

    diff = DiffusionAttention(build_diffusion_from_config(spec.model.diffusion), spec.model.diffusion)
    trainer = DiCLIPTrainer(spec, with_diffusion=False)
    trainer.model.eval()
    vce_bytes, vce_dense_bytes, lossless = [], [], True
    codec_bytes = {c: [] for c in RAR_CODECS}
    agree = {c: [] for c in RAR_CODECS}
    dense_rar_bytes = []
    for s in samples:
        img = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 255
        cap = diff(img, [noise_seed("bench", 0)])
        comp = vce_compact(cap, spec.method, spec.model.diffusion)
        k = int(comp.ids.max()) + 1
        ids8 = comp.ids[0].numpy().astype(np.uint8)
        rows16 = comp.rows[0, :k].numpy().astype(np.float16)
        vce_bytes.append(ids8.nbytes + rows16.nbytes)
        dense16 = comp.expand()[0].half()
        vce_dense_bytes.append(dense16.numel() * 2)
        back = expand_compact(torch.from_numpy(ids8.astype(np.int64))[None], torch.from_numpy(rows16).float()[None])
        lossless &= bool(torch.equal(back[0].half(), dense16))
        corr = comp.expand()
        out = trainer.model(img, corr)
        dense_mean = cap.rar_dense().mean(1)
        dense_rar_bytes.append(dense_mean.numel() * 2)
        labels = torch.from_numpy(s.label[None])
        _, ref_label = trainer.model.pseudo_labels(out, rar_transition_from_mean(dense_mean), labels, s.image.shape[:2],
                                                   rar_grid=cap.rar_grid)
        for name in RAR_CODECS:
            codec = get_codec(name)
            item = codec.encode(cap.rar_q[0], cap.rar_k[0], cap.rar_scale)
            codec_bytes[name].append(nbytes(item))
            decoded = codec.decode([item])
            _, lab = trainer.model.pseudo_labels(out, rar_transition_from_mean(decoded), labels, s.image.shape[:2],
                                                 rar_grid=cap.rar_grid)
            agree[name].append(float((lab == ref_label).float().mean()))
    m = cap.rar_q.shape[2]
    d_tiny = cap.rar_q.shape[3]
    sd_dense = m * m * 2
    sd_qk16 = 2 * 2 * m * SD21_RAR_HEAD_DIM * 2
    sd_qk8 = 2 * 2 * m * (SD21_RAR_HEAD_DIM + 2)
    res = {
        "vce": {"compact_bytes": float(np.mean(vce_bytes)), "dense_fp16_bytes": float(np.mean(vce_dense_bytes)),
                "ratio": float(np.mean(vce_dense_bytes) / np.mean(vce_bytes)), "lossless_after_expansion": lossless},
        "rar_tiny": {name: {"bytes": float(np.mean(codec_bytes[name])),
                            "ratio_vs_dense_fp16": float(np.mean(dense_rar_bytes) / np.mean(codec_bytes[name])),
                            "pseudo_label_agreement": float(np.mean(agree[name]))} for name in RAR_CODECS},
        "rar_tiny_head_dim": d_tiny,
        "rar_sd21_geometry": {"tokens": m, "dense_fp16_bytes": sd_dense, "qk_fp16_bytes": sd_qk16,
                              "qk_fp16_ratio": sd_dense / sd_qk16, "qk_int8_bytes": sd_qk8, "qk_int8_ratio": sd_dense / sd_qk8,
                              "topk64_bytes": m * 64 * 4, "topk64_ratio": sd_dense / (m * 64 * 4)},
    }
    return res


def extraction_rate(spec, images: int) -> dict:
    import ray

    from diclip.config import load_spec
    from ray_jobs.stages import correlate
    from ray_jobs.runtime.ray_session import init_ray

    init_ray(spec)
    rates = {}
    for actors in (1, 2):
        tmp = tempfile.mkdtemp(prefix="diclip-bench-corr-")
        s = load_spec("configs/tiny.yaml", [f"output_uri={tmp}", f"data.root={spec.data.root}", "ray.progress_bars=false",
                                            f"correlate.max_side={SIZE}", f"correlate.resources.concurrency={actors}",
                                            "correlate.resources.batch_size=2", "correlate.resources.num_cpus=0.5"])
        t0 = time.perf_counter()
        out = correlate.run(s)
        rates[actors] = out["images"] / (time.perf_counter() - t0)
    ray.shutdown()
    return {"images": images, "images_per_s_1_actor": rates[1], "images_per_s_2_actors": rates[2],
            "speedup_2_vs_1": rates[2] / rates[1]}


def step_times(spec, samples, repeat: int) -> dict:
    import torch

    from diclip.data.map_shards import CorrelationRecord, pack_npz
    from diclip.data.transforms import apply_geometry, sample_geometry
    from diclip.method.codecs import get_codec
    from diclip.models.diffusion_maps import noise_seed, vce_compact
    from diclip.train.trainer import Batch, DiCLIPTrainer

    online = DiCLIPTrainer(spec, with_diffusion=True)
    stored = DiCLIPTrainer(spec, with_diffusion=False)
    stored.model.load_state_dict(online.model.state_dict())
    codec = get_codec("qk_fp16")
    rng = np.random.default_rng(0)
    crop = spec.data.crop_size
    batch_samples = samples[:4]
    geoms = [sample_geometry(rng, s.image.shape[:2], crop, (0.75, 1.5)) for s in batch_samples]
    images = torch.stack([torch.from_numpy(apply_geometry(s.image, g)).permute(2, 0, 1) for s, g in
                          zip(batch_samples, geoms)]).float() / 255
    labels = torch.from_numpy(np.stack([s.label for s in batch_samples]))
    records = []
    for s in batch_samples:  # what the correlate stage stored for these images (whole image, identity grid)
        img = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 255
        cap = online.diffusion(img, [noise_seed(s.id, 0)])
        comp = vce_compact(cap, spec.method, spec.model.diffusion)
        k = int(comp.ids.max()) + 1
        records.append(CorrelationRecord(s.id, s.image.shape[:2], cap.clip_grid, comp.ids[0].numpy().astype(np.uint8),
                                         comp.rows[0, :k].numpy().astype(np.float16), cap.rar_grid, codec.name,
                                         {k_: np.asarray(v) for k_, v in codec.encode(cap.rar_q[0], cap.rar_k[0],
                                                                                      cap.rar_scale).items()}))
        pack_npz(records[-1].rar)
    batch = Batch([s.id for s in batch_samples], images, labels, geoms, records, [0, 1, 2, 3])

    def step(tr):
        def run():
            out = tr.losses(batch, step=0)
            out["loss"].backward()
        return run

    t_online = timeit(step(online), repeat=repeat, warmup=2)
    t_stored = timeit(step(stored), repeat=repeat, warmup=2)
    t_maps_stored = timeit(lambda: stored.maps(batch), repeat=repeat)
    t_maps_online = timeit(lambda: online.maps(batch), repeat=repeat)
    return {"batch": 4, "crop": crop, "step_s_stored": t_stored, "step_s_online": t_online,
            "step_speedup_stored_vs_online": t_online / t_stored, "maps_s_stored": t_maps_stored,
            "maps_s_online": t_maps_online, "maps_speedup": t_maps_online / t_maps_stored}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=IMAGES)
    p.add_argument("--extract-images", type=int, default=24)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-ray", action="store_true", help="skip (b), the Ray actor-scaling measurement")
    args = p.parse_args()
    spec, samples = _setup(SIZE, max(args.images, args.extract_images))
    sizes = storage_sizes(spec, samples[: args.images])
    v = sizes["vce"]
    print(f"(a) VCE map per image: compact {v['compact_bytes']:.0f} B vs dense fp16 {v['dense_fp16_bytes']:.0f} B "
          f"-> {v['ratio']:.1f}x smaller, lossless after expansion: {v['lossless_after_expansion']}")
    for name, r in sizes["rar_tiny"].items():
        print(f"(a) RAR {name:<10} tiny model (head dim {sizes['rar_tiny_head_dim']}): {r['bytes']:.0f} B, "
              f"{r['ratio_vs_dense_fp16']:.1f}x smaller than dense fp16, pseudo-label agreement "
              f"{100 * r['pseudo_label_agreement']:.2f}%")
    g = sizes["rar_sd21_geometry"]
    print(f"(a) RAR at SD 2.1 geometry ({g['tokens']} tokens, head dim 64): dense fp16 {g['dense_fp16_bytes']} B; "
          f"qk_fp16 {g['qk_fp16_bytes']} B ({g['qk_fp16_ratio']:.2f}x), qk_int8 {g['qk_int8_bytes']} B "
          f"({g['qk_int8_ratio']:.2f}x), topk64 {g['topk64_bytes']} B ({g['topk64_ratio']:.2f}x)")
    result = {"storage": sizes}
    if not args.skip_ray:
        rate = extraction_rate(spec, args.extract_images)
        print("(b) " + ratio_line("correlate images/s, 2 actors vs 1", rate["images_per_s_2_actors"],
                                  rate["images_per_s_1_actor"]))
        result["extraction"] = rate
    steps = step_times(spec, samples, args.repeat)
    print("(c) " + ratio_line("train step seconds, online vs stored maps", steps["step_s_online"],
                              steps["step_s_stored"], " s"))
    print("(c) " + ratio_line("map preparation seconds, online vs stored", steps["maps_s_online"],
                              steps["maps_s_stored"], " s"))
    result["train_step"] = steps
    write_result("correlation_storage", result)


if __name__ == "__main__":
    main()
