"""Where the time of one stored-map training step goes at full size (ViT-B/16 CLIP, SD 2.1-base maps,
batch 4, 320 px crops, CPU).

Builds the full-size spec of ``bench/fullsize_check.py`` (its models under ``--work``, built there if
missing), the stored-mode trainer only, and the same batch as ``correlation_storage.step_times`` (whole-image
maps through the ``qk_fp16`` codec, cached in ``--records`` so later runs skip the UNet passes). Then times
``tr.losses(batch, step)`` + backward with every component wrapped in a wall-clock timer (nested timers:
a component's time includes its children), and optionally prints torch.profiler's top operators.

    python bench/profile_step.py [--repeat 3] [--step 0] [--cpu-time] [--ops] [--online]

Run from the repository root (the spec reads configs/tiny.yaml); with an editable install that points at
another checkout, put this one first: ``PYTHONPATH=$PWD``. On a shared machine prefer ``--cpu-time``.
"""
from __future__ import annotations

import argparse
import functools
import os
import pickle
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _common import RESULTS

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)
CLOCK = time.perf_counter  # --cpu-time: time.thread_time with one thread (robust on a shared machine)


def _wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)
    if getattr(fn, "_timed", False):
        return

    @functools.wraps(fn)
    def timed(*a, **kw):
        t0 = CLOCK()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[label] += CLOCK() - t0
            COUNTS[label] += 1

    timed._timed = True
    setattr(owner, name, timed)


def instrument() -> None:
    from diclip.data import map_shards as corrmod
    from diclip.method import losses, pseudo
    from diclip.method.codecs import QKCodec
    from diclip.models import diclip_model as dm
    from diclip.models.diclip_model import DiCLIP, TrainableHeads
    from diclip.models.segmenter import LayerFusion, TransformerDecoder
    from diclip.models.vce import VCEVisionEncoder
    from diclip.train import trainer

    _wrap(trainer.DiCLIPTrainer, "maps", "1 maps")
    _wrap(corrmod, "batch_maps", "1.1 batch_maps")
    _wrap(corrmod, "batch_taps", "1.1.1 taps")
    _wrap(corrmod, "resample_compact", "1.1.2 vce resample_compact")
    _wrap(QKCodec, "decode", "1.1.3 rar decode (qk_fp16)")
    _wrap(trainer, "rar_transition_from_mean", "1.2 rar_transition_from_mean")
    _wrap(DiCLIP, "forward", "2 model forward")
    _wrap(VCEVisionEncoder, "forward", "2.1 CLIP encoder (VCE/surgery)")
    _wrap(TrainableHeads, "forward", "2.2 heads forward")
    _wrap(LayerFusion, "forward", "2.2.1 segmenter fusion")
    _wrap(TransformerDecoder, "forward", "2.2.2 segmenter decoder")
    _wrap(dm.camlib, "surgery_cam", "2.3 surgery cam")
    _wrap(dm.camlib, "knowledge_retrieval_cam", "2.4 retrieval cam")
    _wrap(dm.losslib, "segmenter_affinity", "2.5 segmenter affinity")
    _wrap(DiCLIP, "pseudo_labels", "3 pseudo labels")
    _wrap(pseudo, "clip_affinity", "3.1 clip_affinity")
    _wrap(pseudo, "sinkhorn_transition", "3.2 sinkhorn")
    _wrap(pseudo, "box_masks", "3.3 box_masks")
    _wrap(pseudo, "connected_components", "3.3.1 connected_components")
    _wrap(pseudo, "caa_refine", "3.3+ caa_refine (incl. boxes)")
    _wrap(pseudo, "rar_walk_with_transition", "3.4 rar walk")
    _wrap(pseudo, "rar_cams", "3.5 rar_cams (upsample)")
    _wrap(pseudo, "cams_to_label", "3.6 cams_to_label")
    _wrap(DiCLIP, "losses", "4 losses")
    _wrap(losses, "affinity_labels", "4.1 affinity labels")
    _wrap(losses, "balanced_seg_loss", "4.2 balanced seg loss")
    _wrap(losses, "affinity_loss", "4.3 affinity loss")


def make_batch(spec, samples, records_file: Path):
    import torch

    from diclip.data.map_shards import CorrelationRecord, pack_npz
    from diclip.data.transforms import apply_geometry, sample_geometry
    from diclip.method.codecs import get_codec
    from diclip.train.trainer import Batch

    codec = get_codec("qk_fp16")
    rng = np.random.default_rng(0)
    crop = spec.data.crop_size
    geoms = [sample_geometry(rng, s.image.shape[:2], crop, (0.75, 1.5)) for s in samples]
    images = torch.stack([torch.from_numpy(apply_geometry(s.image, g)).permute(2, 0, 1) for s, g in
                          zip(samples, geoms)]).float() / 255
    labels = torch.from_numpy(np.stack([s.label for s in samples]))
    if records_file.exists():
        records = pickle.loads(records_file.read_bytes())
    else:  # as correlation_storage.step_times: whole image, identity grid, seeded noise
        from diclip.models.attention_capture import DiffusionAttention
        from diclip.models.diffusion_maps import noise_seed, vce_compact
        from diclip.models.diffusion import build_diffusion_from_config

        t0 = time.perf_counter()
        diff = DiffusionAttention(build_diffusion_from_config(spec.model.diffusion), spec.model.diffusion)
        records = []
        for s in samples:
            img = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 255
            cap = diff(img, [noise_seed(s.id, 0)])
            comp = vce_compact(cap, spec.method, spec.model.diffusion)
            k = int(comp.ids.max()) + 1
            rar = {k_: np.asarray(v) for k_, v in codec.encode(cap.rar_q[0], cap.rar_k[0], cap.rar_scale).items()}
            pack_npz(rar)
            records.append(CorrelationRecord(s.id, s.image.shape[:2], cap.clip_grid,
                                             comp.ids[0].numpy().astype(np.uint8),
                                             comp.rows[0, :k].numpy().astype(np.float16), cap.rar_grid, codec.name, rar))
        records_file.parent.mkdir(parents=True, exist_ok=True)
        records_file.write_bytes(pickle.dumps(records))
        print(f"built records in {time.perf_counter() - t0:.0f}s -> {records_file}")
        del diff
    return Batch([s.id for s in samples], images, labels, geoms, records, [0, 1, 2, 3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default=str(RESULTS / "fullsize"), help="folder with (or for) the full-size models")
    p.add_argument("--records", default=str(RESULTS / "profile_step_records.pkl"),
                   help="cache of the batch's stored maps (built with a UNet pass per image when missing)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--step", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-time", action="store_true",
                   help="one thread, timed by this thread's CPU time (insensitive to other load on the machine)")
    p.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators")
    p.add_argument("--online", action="store_true", help="also time the online step (slow)")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    global CLOCK
    if args.cpu_time:
        args.threads = 1
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    from fullsize_check import build_models, fullsize_spec

    from diclip.data import get_class_set, open_dataset
    from diclip.train.trainer import DiCLIPTrainer

    work = Path(args.work)
    clip_file, sd_dir = build_models(work)
    spec = fullsize_spec(work, clip_file, sd_dir, 4, False)
    ds = open_dataset(spec.data.root, "train", get_class_set("synthetic"))
    samples = [ds.load(i) for i in ds.ids[:4]]
    batch = make_batch(spec, samples, Path(args.records))
    torch.manual_seed(0)
    tr = DiCLIPTrainer(spec, with_diffusion=False)

    def step():
        out = tr.losses(batch, step=args.step)
        out["loss"].backward()
        return out

    step()  # warm-up (untimed, uninstrumented)
    base = []
    for _ in range(args.repeat):
        t0 = CLOCK()
        step()
        base.append(CLOCK() - t0)
    unit = "s CPU (1 thread)" if args.cpu_time else "s"
    print(f"clock: {unit}")
    print(f"stored step (uninstrumented): median {np.median(base):.3f} s  runs {[round(t, 3) for t in base]}")

    instrument()
    orig_losses = DiCLIPTrainer.losses
    total = []
    for _ in range(args.repeat):
        t0 = CLOCK()
        out = orig_losses(tr, batch, args.step)
        t1 = CLOCK()
        out["loss"].backward()
        t2 = CLOCK()
        TIMES["5 backward"] += t2 - t1
        COUNTS["5 backward"] += 1
        total.append(t2 - t0)
    print(f"instrumented: median {np.median(total):.3f} s")
    for k in sorted(TIMES):
        print(f"  {k:<36} {TIMES[k] / args.repeat:8.3f} s   ({COUNTS[k] // args.repeat} calls/step)")
    print("loss", {k: round(float(v), 6) for k, v in out.items()})

    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))

    if args.online:
        online = DiCLIPTrainer(spec, with_diffusion=True)
        online.model.load_state_dict(tr.model.state_dict())

        def ostep():
            out = online.losses(batch, step=args.step)
            out["loss"].backward()

        ostep()
        t0 = CLOCK()
        ostep()
        t_on = CLOCK() - t0
        print(f"online step {t_on:.2f} s vs stored {np.median(base):.3f} s -> {t_on / np.median(base):.1f}x")


if __name__ == "__main__":
    main()
