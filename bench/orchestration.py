"""Orchestration: does the correlate stage keep 1-16 GPU actors busy, and what does it cost besides the model?

The real ``correlate`` stage (local Ray, Ray Data input tasks feeding the actor pool, real shard writes to
the moto S3 server in its own process, commit index, finalize) over real 500x375 JPEGs (read, decode,
resize to 320 px), with one thing replaced - this benchmark measures orchestration, so **the model call is a
stand-in**: a calibrated wait of ``--wait`` seconds per image (a GPU doing diffusion + ACR) returning
real-size rows (the full-size bank's ~832 KB RAR payload per 320x320 map, scaled by area, through the real
codec and shard writer). The wait is long enough that this machine's 2 cores are not what limits.

* efficiency - over the window where every actor has started and none has run out of work, the fraction
  of time each actor spends inside the wait (its "GPU" busy), averaged over actors; items/s alongside.
* overhead - CPU seconds of every process the run used (driver, Ray's raylet/GCS, input tasks, actors;
  not the S3 server's) over the same window (start-up excluded), split into what scales with images (input
  tasks + actors, per image) and a fixed background (driver + Ray's processes, per second). The reported
  overhead is per image at a GPU's pace (one image per ~10 ms): with a GPU doing an image in ~10 ms, ``overhead / 10`` is how many
  CPU cores each GPU needs to stay fed.

Last line: ``efficiency at 16 actors: X.XX; overhead Y CPU-ms per image``.

``--evaluate-crf``: the real ``evaluate`` stage (local Ray, input tasks, actor pool, real pydensecrf2 dense CRF
on every image, shards on local disk, commit index, finalize) with the segmenter replaced by a stand-in
GPU - a wait of ``--crf-wait`` seconds per image returning random logits of the real shape (this measures
orchestration, not the model) - in two layouts side by side in one run: the CRF inside the model actors
(``evaluate.crf_placement=actor``, the old layout, the baseline) and in Ray Data CPU tasks after them
(``tasks``). Busy fraction of an actor = seconds inside its model calls / the wall time of its life, from
the end of its constructor to the end of its last call (a warm-up run first starts Ray's task processes,
so neither layout pays for that). Also: the bytes an actor hands a CRF task per image (measured in the run,
and for a COCO-size image - 640x480, 81 classes, work ratio 0.2 - through the same code). Last line:
``model actors busy: X.XX with the CRF in CPU tasks vs Y.YY with the CRF in the actors``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

from _common import moto_bucket, write_result

BATCHES_PER_ACTOR = 10
BATCH = 4
ACTORS = (1, 2, 4, 8, 16)
SPANS_DIR = tempfile.mkdtemp(prefix="diclip-orch-spans-")


def stand_in_class(wait_s: float):
    """A Correlator whose model call is a wait (defined here: Ray ships it to the actors by value)."""
    import numpy as np
    import torch

    from ray_jobs.stages import correlate
    from ray_jobs.runtime.ray_session import start_actor

    class StandInCorrelator(correlate.Correlator):
        def __init__(self, spec, patch):  # no diffusion pipeline: the wait stands in for it
            from diclip.method.codecs import get_codec

            self.spec, self.cfg = spec, spec.correlate
            self.device = start_actor(spec, self.cfg.resources)
            self.patch = patch
            self.codec = get_codec(self.cfg.rar_codec)
            self.qk: dict[tuple, torch.Tensor] = {}
            self.log = open(os.path.join(SPANS_DIR, f"{os.getpid()}.jsonl"), "a")

        def extract(self, members: list[tuple]) -> list[dict]:
            t0 = time.time()
            time.sleep(wait_s * len(members))  # the GPU: diffusion + ACR for the batch
            self.log.write(json.dumps([t0, time.time(), len(members)]) + "\n")
            self.log.flush()
            rows = []
            for item_id, split, src, x, crop, geom in members:
                h, w = x.shape[0] // self.patch, x.shape[1] // self.patch
                tokens = (x.shape[0] // 8) * (x.shape[1] // 8)  # the RAR layer's grid
                if tokens not in self.qk:  # the full-size bank's ~832 KB per 320x320 map, scaled by area
                    self.qk[tokens] = torch.randn(5, tokens, 26)
                rar = self.codec.encode(self.qk[tokens], self.qk[tokens], 0.125)
                rows.append({"item_id": item_id, "split": split, "src_h": src[0], "src_w": src[1], "grid_h": h,
                             "grid_w": w, "vce_k": 16, "vce_ids": np.zeros(h * w, np.uint8).tobytes(),
                             "vce_rows": np.zeros((16, h * w), np.float16).tobytes(), "rar_grid_h": x.shape[0] // 8,
                             "rar_grid_w": x.shape[1] // 8, "rar_codec": self.codec.name,
                             "rar": correlate.pack_npz(rar), "crop": crop, "geom": geom})
            return rows

    return StandInCorrelator


def timed_class():
    """The real Correlator (tiny diffusion model on CPU), its model calls logged: ``--model`` mode."""
    from ray_jobs.stages import correlate

    class TimedCorrelator(correlate.Correlator):
        def __init__(self, spec, patch):
            super().__init__(spec, patch)
            self.log = open(os.path.join(SPANS_DIR, f"{os.getpid()}.jsonl"), "a")

        def extract(self, members: list[tuple]) -> list[dict]:
            t0 = time.time()
            rows = super().extract(members)
            self.log.write(json.dumps([t0, time.time(), len(members)]) + "\n")
            self.log.flush()
            return rows

    return TimedCorrelator


def process_cpu_seconds(exclude: set[int]) -> dict[int, tuple[str, float]]:
    """pid -> (group, CPU seconds) for this process and its descendants; groups: driver, workers (Ray
    worker processes: input tasks and actors), system (raylet, GCS, dashboard agents ...)."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        if p.pid in exclude:
            continue
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline())
            group = ("driver" if p.pid == me.pid else
                     "actors" if "MapWorker" in cmd else
                     "tasks" if "default_worker.py" in cmd or "ray::" in cmd else "system")
            out[p.pid] = (group, t.user + t.system)
        except psutil.Error:
            pass
    return out


def read_spans() -> list[list]:
    out = []
    for f in glob.glob(os.path.join(SPANS_DIR, "*.jsonl")):
        rows = [json.loads(x) for x in open(f)]
        if rows:
            out.append(rows)
    return out


def efficiency(actors: int, spans: list[list]) -> tuple[float, float, float, float]:
    """(mean fraction of the steady-state window each actor spends in its wait, window start, end, mean gap
    between an actor's waits in s). The window: every actor has started, none has run out of work."""
    lo = max(r[0][0] for r in spans)
    hi = min(r[-1][1] for r in spans)
    gaps = [b[0] - a[1] for r in spans for a, b in zip(r, r[1:])]
    gap = sum(gaps) / len(gaps) if gaps else float("nan")
    if hi <= lo:
        return float("nan"), lo, hi, gap
    busy = [sum(max(0.0, min(e, hi) - max(s, lo)) for s, e, _ in r) / (hi - lo) for r in spans]
    return sum(busy) / actors, lo, hi, gap


class CpuSampler:
    """CPU seconds of this process and its descendants (Ray's), sampled twice a second on a thread, so
    the steady-state window's CPU can be read off without start-up and shutdown."""

    def __init__(self, exclude: set[int]):
        import threading

        self.exclude, self.samples, self.stop = exclude, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), process_cpu_seconds(self.exclude)))
            self.stop.wait(0.5)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def between(self, lo: float, hi: float) -> dict[str, float]:
        """CPU seconds used in [lo, hi] per group (a process that ends inside counts up to its last sample)."""
        i = min(range(len(self.samples)), key=lambda k: abs(self.samples[k][0] - lo))
        j = min(range(len(self.samples)), key=lambda k: abs(self.samples[k][0] - hi))
        start, last = self.samples[i][1], {}
        for _, snap in self.samples[i:j + 1]:
            last.update(snap)
        out = {"driver": 0.0, "actors": 0.0, "tasks": 0.0, "system": 0.0}
        for pid, (group, v) in last.items():
            out[group] += v - start.get(pid, (group, 0.0))[1]
        return out


def run_once(base, actors: int, wait_s: float, moto_pid: int) -> dict:
    import dataclasses

    from diclip.storage import commit_index  # noqa: F401  (the stage writes one)
    from ray_jobs.stages import correlate

    for f in glob.glob(os.path.join(SPANS_DIR, "*.jsonl")):
        os.remove(f)
    # 2 cores: input tasks enough for the stand-in's rate (each task process imports torch once)
    res = dataclasses.replace(base.correlate.resources, concurrency=actors, prepare_concurrency=max(1, actors // 4))
    spec = dataclasses.replace(base, correlate=dataclasses.replace(
        base.correlate, output=f"{base.output_uri}/correlate-{actors}", resources=res))
    n = actors * BATCHES_PER_ACTOR * BATCH
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, train_split=f"train{n}"))
    spec = dataclasses.replace(spec, correlate=dataclasses.replace(spec.correlate, splits=[f"train{n}"]))
    real = correlate.POOL  # the stage runs the actor its PoolStage names
    correlate.POOL = dataclasses.replace(real, actor=stand_in_class(wait_s) if wait_s else timed_class())
    try:
        with CpuSampler({moto_pid}) as cpu:
            t0 = time.perf_counter()
            out = correlate.run(spec)
            wall = time.perf_counter() - t0
    finally:
        correlate.POOL = real
    spans = read_spans()
    eff, lo, hi, gap = efficiency(actors, spans)
    done = sum(k for r in spans for s, e, k in r if lo <= e <= hi)  # images whose wait ended in the window
    return {"actors": actors, "images": n, "committed": out["images"], "failed": out["failed"], "wall_s": wall,
            "items_per_s": out["images_per_s"], "ideal_items_per_s": actors / wait_s if wait_s else float("nan"),
            "efficiency": eff, "cores_busy": sum(cpu.between(lo, hi).values()) / max(hi - lo, 1e-9),
            "actors_seen": len(spans), "steady_window_s": hi - lo, "steady_items_per_s": done / max(hi - lo, 1e-9),
            "mean_gap_between_calls_s": gap, **cpu_report(cpu.between(lo, hi), done, hi - lo)}


GPU_IMAGE_S = 0.010  # one H100 on the method's diffusion work at 320 px (VAE encode + one UNet pass)


def cpu_report(cpu: dict[str, float], done: int, window: float) -> dict:
    """Per-image CPU (input tasks + actors' non-model work) and the fixed background (driver + Ray's own
    processes, per second), and what one image costs when a GPU finishes one every ``GPU_IMAGE_S``."""
    per_image = 1000 * (cpu["actors"] + cpu["tasks"]) / max(done, 1)
    background = (cpu["driver"] + cpu["system"]) / max(window, 1e-9)  # CPU-s per s
    return {"cpu_ms_per_image": 1000 * sum(cpu.values()) / max(done, 1), "worker_cpu_ms_per_image": per_image,
            "background_cpu_per_s": background, "cpu_groups_s": cpu,
            "actor_cpu_ms_per_image": 1000 * cpu["actors"] / max(done, 1),
            "task_cpu_ms_per_image": 1000 * cpu["tasks"] / max(done, 1),
            "cpu_ms_per_image_at_gpu_rate": per_image + 1000 * background * GPU_IMAGE_S}


# ----------------------------------------------------------------------------------------------
# --evaluate-crf: the model actors' busy fraction with the dense CRF in the actors vs in CPU tasks
# ----------------------------------------------------------------------------------------------
CRF_IMAGES = 64
CRF_IMAGE_SIZE = (288, 384)  # ~0.35 CPU-s of CRF per image with the 5 synthetic classes on this machine
CRF_BATCH = 4
CRF_WARMUP_IMAGES = 8


def stand_in_evaluator(wait_s: float, classes: int):
    """An Evaluator whose model call is a wait returning random working-size logits (no model loaded)."""
    import torch

    from diclip.inference import work_size
    from ray_jobs.stages import evaluate
    from ray_jobs.runtime.ray_session import start_actor

    class StandInEvaluator(evaluate.Evaluator):
        def __init__(self, spec, base_size):  # no model: the wait stands in for the segmenter on a GPU
            self.spec, self.cfg = spec, spec.evaluate
            self.device = start_actor(spec, self.cfg.resources)
            self.base, self.patch, self.k, self._maps = base_size, 16, classes, None
            self.gen = torch.Generator().manual_seed(os.getpid())
            self.log = open(os.path.join(SPANS_DIR, f"{os.getpid()}.jsonl"), "a")
            self.log.write(json.dumps(["ready", time.time()]) + "\n")
            self.log.flush()

        def seg_logits(self, images):
            t0 = time.time()
            time.sleep(wait_s * len(images))  # the GPU: 4 scales + flip of the segmenter for the batch
            out = [torch.randn(self.k, *work_size(im.shape[:2], self.cfg.work_ratio), generator=self.gen)
                   for im in images]
            self.log.write(json.dumps([t0, time.time(), len(images)]) + "\n")
            self.log.flush()
            return out

    return StandInEvaluator


def actor_busy() -> list[dict]:
    """Per actor: seconds in model calls, life (constructor end to last call end), busy fraction."""
    out = []
    for f in glob.glob(os.path.join(SPANS_DIR, "*.jsonl")):
        rows = [json.loads(x) for x in open(f)]
        ready = next((r[1] for r in rows if r[0] == "ready"), None)
        calls = [r for r in rows if r[0] != "ready"]
        if ready is None or not calls:
            continue
        busy = sum(e - s for s, e, _ in calls)
        life = calls[-1][1] - ready
        out.append({"model_s": busy, "life_s": life, "busy": busy / life, "calls": len(calls),
                    "images": sum(k for _, _, k in calls), "first_call_after_ready_s": calls[0][0] - ready})
    return out


def coco_payload_bytes() -> dict:
    """Bytes an actor hands a CRF task for one COCO-size image (640x480 RGB + mask, 81 classes, work ratio
    0.2), through the stage's own payload code, and the Arrow size of that row."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from diclip.config import load_spec
    from ray_jobs.stages import evaluate

    spec = load_spec("configs/coco.yaml", ["output_uri=/tmp/unused"])
    cls = stand_in_evaluator(0.0, 81)
    ev = cls.__new__(cls)  # no actor: only the payload code runs
    ev.spec, ev.cfg, ev.k, ev.log = spec, spec.evaluate, 81, open(os.devnull, "w")
    import torch

    ev.gen = torch.Generator().manual_seed(0)
    h, w = 480, 640
    image = np.zeros((h, w, 3), np.uint8)
    item = {"item_id": "seg/x", "task": "seg", "image_id": "x", "img": image.tobytes(), "img_h": h, "img_w": w,
            "mask": np.zeros((h, w), np.uint8).tobytes()}

    class S:
        pass

    sample = S()
    sample.image = image
    (row,) = ev.crf_payloads([(item, sample)])
    logits = len(row["crf_logits"])
    return {"image": [h, w], "classes": 81, "work_ratio": spec.evaluate.work_ratio, "logits_bytes": logits,
            "pixels_bytes": len(row["img"]), "mask_bytes": len(row["mask"]),
            "total_bytes": logits + len(row["img"]) + len(row["mask"]),
            "arrow_row_bytes": pa.Table.from_pandas(pd.DataFrame([row])).nbytes}


def run_crf_layout(base: str, placement: str, wait_s: float, limit: int = 0) -> dict:
    from diclip.config import load_spec
    from ray_jobs.stages import evaluate

    for f in glob.glob(os.path.join(SPANS_DIR, "*.jsonl")):
        os.remove(f)
    spec = load_spec("configs/tiny.yaml", [
        f"output_uri={base}", f"synthesize.num_val={CRF_IMAGES}",
        f"synthesize.image_size=[{CRF_IMAGE_SIZE[0]},{CRF_IMAGE_SIZE[1]}]", "ray.progress_bars=false",
        f"evaluate.output={base}/evaluate_{placement}_{limit}", "evaluate.cam=false", "evaluate.num_pictures=0",
        f"evaluate.limit={limit}", "evaluate.crf=true", f"evaluate.crf_placement={placement}",
        "evaluate.crf_cpus=0.5", "evaluate.scales=[1.0]", "evaluate.resources.concurrency=1",
        f"evaluate.resources.batch_size={CRF_BATCH}", "evaluate.resources.num_cpus=0.5",
        "evaluate.resources.prepare_cpus=0.25", "evaluate.resources.prepare_concurrency=1"])
    classes = 5
    real = evaluate.Evaluator
    evaluate.Evaluator = stand_in_evaluator(wait_s, classes)
    try:
        t0 = time.perf_counter()
        out = evaluate.run(spec)
        wall = time.perf_counter() - t0
    finally:
        evaluate.Evaluator = real
    assert out["failed"] == 0 and out["seg_images"] == (limit or CRF_IMAGES), out
    actors = actor_busy()
    return {"placement": placement, "wall_s": wall, "images": out["seg_images"], "actors": actors,
            "busy": sum(a["busy"] for a in actors) / max(1, len(actors)),
            "moved_bytes_per_image": out["crf_moved_bytes_per_image"], "seg_images_per_s": out["seg_images_per_s"]}


def measure_evaluate_crf(args) -> None:
    import shutil

    import ray
    import torch

    from diclip.config import load_spec
    from diclip.data import get_class_set
    from diclip.inference import build_model, save_export
    from diclip.models.kv_cache import KVCache
    from ray_jobs.stages import synthesize
    from ray_jobs.runtime.ray_session import init_ray

    busy_at_start = os.getloadavg()[0]
    base = tempfile.mkdtemp(prefix="diclip-bench-crf-")
    spec = load_spec("configs/tiny.yaml", [f"output_uri={base}", f"synthesize.num_val={CRF_IMAGES}",
                                           f"synthesize.image_size=[{CRF_IMAGE_SIZE[0]},{CRF_IMAGE_SIZE[1]}]",
                                           "ray.progress_bars=false"])
    synthesize.run(spec)
    classes = list(get_class_set("synthetic").classes)  # an export to read (the stand-in loads no model)
    ids = torch.tensor([0, 0, 0] + [c for c in range(1, len(classes)) for _ in range(2)])
    keys = torch.nn.functional.normalize(torch.randn(len(ids), 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    cache = KVCache(keys, torch.nn.functional.one_hot(ids, len(classes)).float(), {"classes": classes})
    save_export(spec.evaluate.checkpoint, build_model(spec, cache), spec, cache)
    init_ray(spec)
    try:
        for placement in ("actor", "tasks"):  # start Ray's task and actor processes once
            run_crf_layout(base, placement, args.crf_wait, limit=CRF_WARMUP_IMAGES)
        rows = [run_crf_layout(base, p, args.crf_wait) for p in ("actor", "tasks")]
    finally:
        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    coco = coco_payload_bytes()
    for r in rows:
        spans = ", ".join("%.1f of %.1f s" % (x["model_s"], x["life_s"]) for x in r["actors"])
        first = ", ".join("%.1f" % x["first_call_after_ready_s"] for x in r["actors"])
        print(f"CRF in {r['placement']:>6}: {r['images']} images in {r['wall_s']:.1f} s; model actors busy "
              f"{r['busy']:.2f} ({spans} in model calls; first call {first} s after ready); "
              f"{r['moved_bytes_per_image']} bytes per image to CRF tasks", flush=True)
    print(f"COCO image (640x480, 81 classes, work ratio {coco['work_ratio']}): {coco['total_bytes']} bytes to a CRF "
          f"task = {coco['logits_bytes']} fp32 logits + {coco['pixels_bytes']} pixels + {coco['mask_bytes']} mask "
          f"({coco['arrow_row_bytes']} as an Arrow row)")
    if busy_at_start > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {busy_at_start:.1f} on {os.cpu_count()} CPUs at start: other work shared the cores")
    write_result("orchestration_crf", {"wait_s": args.crf_wait, "batch": CRF_BATCH, "image_size": list(CRF_IMAGE_SIZE),
                                       "classes": 5, "loadavg_1min_at_start": round(busy_at_start, 2),
                                       "rows": rows, "coco_payload": coco})
    by = {r["placement"]: r for r in rows}
    print(f"model actors busy: {by['tasks']['busy']:.2f} with the CRF in CPU tasks vs {by['actor']['busy']:.2f} "
          "with the CRF in the actors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--wait", type=float, default=0.5, help="stand-in model seconds per image")
    p.add_argument("--actors", type=int, nargs="+", default=list(ACTORS))
    p.add_argument("--model", action="store_true", help="the real tiny diffusion model on CPU instead of the wait "
                   "(why 2 actors vs 1 stays low here: the cores are busy)")
    p.add_argument("--evaluate-crf", action="store_true", help="the evaluate stage's model actors' busy fraction "
                   "with the dense CRF in the actors vs in CPU tasks (stand-in model, real CRF)")
    p.add_argument("--crf-wait", type=float, default=0.5, help="stand-in segmenter seconds per image")
    args = p.parse_args()
    if args.evaluate_crf:
        measure_evaluate_crf(args)
        return
    with moto_bucket("orchestration") as (url, moto_pid):
        rows = measure(url, moto_pid, args)
    if args.model:
        one, two = (next(r for r in rows if r["actors"] == a) for a in (1, 2))
        write_result("orchestration_model", {"batch": BATCH, "rows": rows})
        print(f"real tiny model: 2 actors vs 1 in steady state {two['steady_items_per_s'] / one['steady_items_per_s']:.2f}x; "
              f"cores busy {one['cores_busy']:.2f} -> {two['cores_busy']:.2f} of 2")
        return
    write_result("orchestration", {"wait_s": args.wait, "batch": BATCH, "rows": rows})
    last = rows[-1]
    print(f"per image at a GPU's {1000 * GPU_IMAGE_S:.0f} ms: {last['worker_cpu_ms_per_image']:.1f} CPU-ms in tasks/actors + "
          f"{1000 * last['background_cpu_per_s'] * GPU_IMAGE_S:.1f} of background = "
          f"{last['cpu_ms_per_image_at_gpu_rate']:.1f} CPU-ms")
    print(f"efficiency at {last['actors']} actors: {last['efficiency']:.2f}; overhead "
          f"{last['cpu_ms_per_image_at_gpu_rate']:.0f} CPU-ms per image")


def measure(url: str, moto_pid: int, args) -> list[dict]:
    import ray

    from diclip import storage
    from diclip.config import load_spec
    from ray_jobs.stages import synthesize
    from ray_jobs.runtime.ray_session import init_ray

    most = max(args.actors) * BATCHES_PER_ACTOR * BATCH
    spec = load_spec("configs/tiny.yaml", [
        "output_uri=s3://orchestration/run", f"storage.endpoint_url={url}", "ray.progress_bars=false",
        f"synthesize.num_train={most}", "synthesize.num_val=2", "synthesize.image_size=[375,500]",
        "correlate.max_side=320", f"correlate.resources.batch_size={BATCH}", "correlate.resources.num_cpus=0.05",
        "correlate.resources.prepare_cpus=0.1", "correlate.num_pictures=0", "correlate.rar_codec=qk_fp16"])
    storage.configure(storage.StorageOptions(endpoint_url=url))
    print(f"writing {most} 500x375 images to the moto S3 server ...", flush=True)
    synthesize.run(spec)
    ids = storage.read_text(f"{spec.data.root}/ImageSets/Segmentation/train.txt").split()
    for a in args.actors:  # one split list per size, so every run extracts exactly its images
        n = a * BATCHES_PER_ACTOR * BATCH
        storage.write_text(f"{spec.data.root}/ImageSets/Segmentation/train{n}.txt", "\n".join(ids[:n]) + "\n")
    init_ray(spec)
    rows = []
    try:
        for a in args.actors:
            r = run_once(spec, a, 0.0 if args.model else args.wait, moto_pid)
            rows.append(r)
            print(f"{a:>2} actors: {r['images']} images in {r['wall_s']:.1f} s (start-up included); steady state "
                  f"{r['steady_window_s']:.1f} s: {r['steady_items_per_s']:.1f} img/s of ideal "
                  f"{r['ideal_items_per_s']:.1f}, efficiency {r['efficiency']:.2f}, gap between calls "
                  f"{r['mean_gap_between_calls_s']:.2f} s; CPU {r['cpu_ms_per_image']:.0f} ms per image = "
                  f"{r['worker_cpu_ms_per_image']:.1f} ms in input tasks ({r['task_cpu_ms_per_image']:.1f}) and actors "
                  f"({r['actor_cpu_ms_per_image']:.1f}) + background {r['background_cpu_per_s']:.2f} "
                  f"CPU-s/s (driver, Ray); {r['cores_busy']:.2f} cores busy", flush=True)
    finally:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
