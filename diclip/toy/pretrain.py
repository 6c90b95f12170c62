"""``diclip pretrain-toy``: train the toy CLIP and the toy diffusion model, then package them.

    diclip pretrain-toy --out runs/toy-models            # both, in parallel (one CPU thread each)
    diclip pretrain-toy --out runs/toy-models --only clip

Each model trains in its own child process (``diclip.toy.pretrain_clip`` / ``diclip.toy.pretrain_diffusion``, one
thread each, seeded, checkpointed every 100 steps): an interrupted run continues from its last
checkpoint when started again with the same ``--out``. The parent shows one progress bar per model,
keeps each child's output in ``<out>/<model>.log``, and at the end writes ``<out>/release``:
``clip.safetensors`` + ``clip_card.json`` and the diffusers folder ``diffusion/`` (with ``card.json``),
the layout of the shipped models in ``diclip/resources/toy``. Use a release with
``model.clip.pretrained=<out>/release/clip.safetensors model.diffusion.source=<out>/release/diffusion
generate.source=<out>/release/diffusion``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from diclip.errors import DiclipError

_MODULES = {"clip": "diclip.toy.pretrain_clip", "diffusion": "diclip.toy.pretrain_diffusion"}
_STEP = re.compile(r"^(step|vae|unet|group) (\d+) ")


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log_path: str
    vae_steps: int  # the diffusion run trains its VAE first, then counts UNet steps from 0,
    unet_steps: int  # then phase-3 (grouping) steps from 0
    total: int

    def progress(self, line: str) -> int | None:
        """Steps done according to one line of the child's output (None: not a progress line)."""
        m = _STEP.match(line)
        if not m:
            return None
        n = int(m.group(2))
        offset = {"unet": self.vae_steps, "group": self.vae_steps + self.unet_steps}.get(m.group(1), 0)
        return offset + n


def _recipe(name: str, extra: list[str]):
    """The child's settings as it will parse them (its recipe defaults plus ``extra``)."""
    from importlib import import_module

    return import_module(_MODULES[name]).build_parser().parse_args(["--out", "-", *extra])


def _start(name: str, out: str, extra: list[str]) -> _Child:
    args = _recipe(name, extra)  # before starting anything: its step counts drive the progress bar
    vae, group = getattr(args, "vae_steps", 0), getattr(args, "group_steps", 0)
    run_dir = os.path.join(out, name)
    log_path = os.path.join(out, f"{name}.log")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(log_path, "a")
    proc = subprocess.Popen([sys.executable, "-m", _MODULES[name], "--out", run_dir, *extra],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    return _Child(name, proc, log_path, vae, args.steps, vae + args.steps + group)


def _pump(c: _Child, done: dict[str, int]) -> None:
    """Copy one child's stdout into its log, recording the steps its progress lines report."""
    with open(c.log_path, "a") as log:
        for line in c.proc.stdout:
            log.write(line)
            log.flush()
            n = c.progress(line)
            if n is not None:
                done[c.name] = min(c.total, n)


def _follow(children: list[_Child], progress: bool) -> None:
    """One progress bar per child until every child exits."""
    import threading

    from tqdm import tqdm

    done = {c.name: 0 for c in children}
    pumps = [threading.Thread(target=_pump, args=(c, done), daemon=True) for c in children]
    for t in pumps:
        t.start()
    bars = {c.name: tqdm(total=c.total, desc=f"toy {c.name}", position=i, disable=not progress, unit="step")
            for i, c in enumerate(children)}
    while any(c.proc.poll() is None for c in children) or any(t.is_alive() for t in pumps):
        for name, bar in bars.items():
            if bar.n != done[name]:
                bar.n = done[name]
                bar.refresh()
        time.sleep(0.5)
    for b in bars.values():
        b.close()


def pretrain(out: str, only: str = "all", parallel: bool = True, progress: bool = True,
             clip_args: list[str] | None = None, diffusion_args: list[str] | None = None) -> str:
    """Train (or resume) the requested toy models under ``out`` and package ``out/release``."""
    if only not in ("all", "clip", "diffusion"):
        raise DiclipError(f"--only must be all|clip|diffusion, got {only!r}")
    os.makedirs(out, exist_ok=True)
    names = ["clip", "diffusion"] if only == "all" else [only]
    extra = {"clip": list(clip_args or []), "diffusion": list(diffusion_args or [])}
    children: list[_Child] = []
    try:
        if parallel:
            children = [_start(n, out, extra[n]) for n in names]
            _follow(children, progress)
        else:
            for n in names:
                children.append(_start(n, out, extra[n]))
                _follow([children[-1]], progress)
    finally:  # Ctrl-C: stop exactly the children started here (their checkpoints stay)
        for c in children:
            if c.proc.poll() is None:
                c.proc.terminate()
                try:
                    c.proc.wait(10)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
    failed = [c for c in children if c.proc.returncode != 0]
    if failed:
        c = failed[0]
        raise DiclipError(f"toy {c.name} training exited with status {c.proc.returncode}; see {c.log_path} "
                          "(run again to resume from its last checkpoint)")
    from diclip.toy.package import package

    release = os.path.join(out, "release")
    package(os.path.join(out, "clip"), os.path.join(out, "diffusion"), release, only=only)
    return release
