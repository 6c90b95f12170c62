"""The toy world: the class is an object's *texture*, a property every patch inside it shows.

The shipped toy CLIP and diffusion models (``diclip/resources/toy``) were trained on it, and the
``synthesize`` stage writes it as a VOC-layout dataset when ``data.dataset`` is ``toy``.

Every sample is a pure function of ``(seed, index)``: an RGB image (uint8 HxWx3), a class-id mask
(uint8 HxW, 0 = background), an instance mask, a multi-hot image-level label over the foreground
classes and a caption ("a photo of stripes and checks.").

* classes (foreground): ``stripes`` = horizontal stripes, ``bars`` = vertical stripes, ``checks`` =
  a checkerboard; orientation jitter +-``angle_jitter`` degrees, random period and phase. Each object
  is painted with TWO different colours drawn from one palette shared by all classes and by the
  background, so no colour (and no colour pair) names the class, and a colour kernel does not see
  an object as one region (its two colours also occur in the background);
* the object's *shape* (disc, square, triangle, ellipse) and size carry no class information;
* background: smooth, low-frequency blobs blending two or three palette colours - a different
  texture family (no high frequencies), so "high-frequency pattern" means "object" and its
  orientation/type means the class. Local evidence: an 8x8 patch inside an object shows 1-2
  periods of its pattern.

Rasterised with numpy (no anti-aliasing), so masks are exactly the painted pixels; later objects
occlude earlier ones. Default 48 px (CLIP patch 8 -> 6x6 tokens; VAE x2 -> 24x24 latent, so the
UNet levels are 24/12/6/3: the VCE layer reads 6x6 = the CLIP grid, the RAR layer 24x24).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diclip.data.classes import TOY  # noqa: F401  (re-exported: the class set of this world)

CLASSES: tuple[str, ...] = TOY.classes
FG: tuple[str, ...] = TOY.foreground
BACKGROUND_WORDS: tuple[str, ...] = TOY.background_words
PROMPT_TEMPLATE = "a photo of {}."
OBJECT_SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ellipse")
TRAIN_OFFSET = 20_000_000
"""Index offsets of the ``synthesize`` stage's train/val splits: disjoint from what the toy models saw
(their training draws indices from 0, their own evaluation from 10,000,000)."""
VAL_OFFSET = 30_000_000

PALETTE = np.array([
    (220, 40, 40),    # red
    (40, 170, 60),    # green
    (45, 80, 220),    # blue
    (235, 210, 40),   # yellow
    (200, 60, 200),   # magenta
    (40, 200, 210),   # cyan
    (240, 140, 30),   # orange
    (235, 235, 235),  # white
    (40, 40, 40),     # black
], dtype=np.float32)


@dataclass(frozen=True)
class WorldConfig:
    size: int = 48
    min_objects: int = 1
    max_objects: int = 3
    radius: tuple[float, float] = (0.2, 0.35)
    """Object radius as a fraction of the side (other shapes scaled to a similar area)."""
    period: tuple[float, float] = (4.0, 7.0)
    """Stripe period in pixels (half light, half dark)."""
    check_cell: tuple[float, float] = (2.5, 4.0)
    """Checkerboard cell side in pixels."""
    angle_jitter: float = 15.0
    """Degrees of random rotation of an object's pattern around its class orientation."""
    colour_jitter: float = 12.0
    noise: float = 4.0
    """Per-pixel Gaussian noise (std, 0-255 scale)."""
    max_overlap: float = 0.2
    bg_scale: int = 3
    """The background field is bilinear noise on a (bg_scale+1)^2 lattice: low frequency only."""
    extra: dict = field(default_factory=dict, compare=False)


@dataclass
class Sample:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # uint8 [H, W], 0 = background, c = CLASSES[c]
    instances: np.ndarray  # uint8 [H, W], 0 = background, k = k-th painted object (visible part)
    label: np.ndarray  # float32 [num_fg] multi-hot
    caption: str
    classes: list[int]
    background: str


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinear interpolation of uniform noise on a (cells+1)^2 lattice -> [size, size] in [0, 1]."""
    lat = rng.uniform(0, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    f = f * f * (3 - 2 * f)  # smoothstep: no visible lattice creases
    rows = lat[i] * (1 - f)[:, None] + lat[i + 1] * f[:, None]  # [size, cells+1]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _background(rng: np.random.Generator, cfg: WorldConfig) -> tuple[np.ndarray, list[int]]:
    s = cfg.size
    k = int(rng.integers(2, 4))
    cols = rng.choice(len(PALETTE), size=k, replace=False)
    w = np.stack([_smooth_field(rng, s, cfg.bg_scale) for _ in range(k)], -1) * 4.0
    w = np.exp(w - w.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)  # soft partition into k colour regions
    img = w @ PALETTE[cols]
    return img, [int(c) for c in cols]


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, yy, xx) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    if shape == "disc":
        return dx * dx + dy * dy <= r * r
    if shape == "ellipse":
        a, b = r * 1.3, r / 1.3
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    if shape == "square":
        a = r * math.sqrt(math.pi) / 2
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if shape == "triangle":
        R = r * 1.55
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            phi = 2 * math.pi * k / 3 + math.pi / 2
            m &= (u * math.cos(phi) + v * math.sin(phi)) <= R / 2
        return m
    raise ValueError(shape)


def _texture(rng: np.random.Generator, cls: int, cfg: WorldConfig, yy, xx) -> np.ndarray:
    """Boolean [H, W] pattern of class ``cls`` over the whole canvas (True = first colour)."""
    jit = math.radians(rng.uniform(-cfg.angle_jitter, cfg.angle_jitter))
    name = CLASSES[cls]
    if name in ("stripes", "bars"):
        # stripes: bands along x (vary with y); bars: bands along y (vary with x)
        theta = (math.pi / 2 if name == "stripes" else 0.0) + jit
        period = rng.uniform(*cfg.period)
        t = (xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0, period)) % period
        return t < period / 2
    if name == "checks":
        cell = rng.uniform(*cfg.check_cell)
        c, s = math.cos(jit), math.sin(jit)
        u, v = xx * c + yy * s, -xx * s + yy * c
        ox, oy = rng.uniform(0, cell, size=2)
        return ((np.floor((u + ox) / cell) + np.floor((v + oy) / cell)) % 2) == 0
    raise ValueError(name)


def render(seed: int, index: int, cfg: WorldConfig | None = None) -> Sample:
    """The sample ``index`` of world ``seed`` (deterministic)."""
    cfg = cfg or WorldConfig()
    rng = np.random.default_rng([int(seed), int(index), 2])
    s = cfg.size
    yy, xx = _grid(s)
    img, _ = _background(rng, cfg)
    mask = np.zeros((s, s), dtype=np.uint8)
    inst = np.zeros((s, s), dtype=np.uint8)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    classes: list[int] = []
    for _ in range(n):
        for _attempt in range(20):
            cls = int(rng.integers(1, len(CLASSES)))
            shape = OBJECT_SHAPES[int(rng.integers(len(OBJECT_SHAPES)))]
            r = rng.uniform(*cfg.radius) * s
            cx, cy = rng.uniform(0.7 * r, s - 0.7 * r, size=2)
            m = _shape_mask(shape, cx, cy, r, rng.uniform(0, 2 * math.pi), yy, xx)
            area = m.sum()
            if area >= 16 and (mask[m] > 0).sum() <= cfg.max_overlap * area:
                break
        else:
            continue
        c1, c2 = rng.choice(len(PALETTE), size=2, replace=False)
        col1 = PALETTE[c1] + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3)
        col2 = PALETTE[c2] + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3)
        pat = _texture(rng, cls, cfg, yy, xx)
        img[m] = np.where(pat[m][:, None], col1, col2)
        mask[m] = cls
        classes.append(cls)
        inst[m] = len(classes)
    img = img + rng.normal(0.0, cfg.noise, size=img.shape)
    present = sorted(set(int(c) for c in np.unique(mask) if c > 0))
    label = np.zeros(len(CLASSES) - 1, dtype=np.float32)
    label[[c - 1 for c in present]] = 1
    return Sample(
        image=np.clip(np.rint(img), 0, 255).astype(np.uint8),
        mask=mask,
        instances=inst,
        label=label,
        caption=caption([CLASSES[c] for c in present], rng),
        classes=classes,
        background="blobs",
    )


def caption(names: list[str], rng: np.random.Generator | None = None) -> str:
    """"a photo of stripes and checks." (distinct class names, random order when ``rng`` is given)."""
    names = list(dict.fromkeys(names))
    if rng is not None and len(names) > 1:
        names = [names[i] for i in rng.permutation(len(names))]
    if not names:
        return "a photo of background."
    return "a photo of " + " and ".join(names) + "."


def batch(seed: int, start: int, count: int, cfg: WorldConfig | None = None) -> dict:
    """``count`` consecutive samples from ``start`` as stacked arrays: images uint8 [B,H,W,3],
    masks/instances uint8 [B,H,W], labels float32 [B,K-1], captions list[str]."""
    out = [render(seed, start + i, cfg) for i in range(count)]
    return {
        "images": np.stack([o.image for o in out]),
        "masks": np.stack([o.mask for o in out]),
        "instances": np.stack([o.instances for o in out]),
        "labels": np.stack([o.label for o in out]),
        "captions": [o.caption for o in out],
        "backgrounds": [o.background for o in out],
    }


def to_tensor(images: np.ndarray, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), normalise: bool = True):
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [0,1] (``normalise=False``) or mean/std-normalised."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if normalise:
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x


MASK_COLOURS = np.array([(0, 0, 0), (255, 80, 80), (80, 255, 80), (80, 80, 255)], dtype=np.uint8)


def save_grid(path: str, seed: int = 0, count: int = 32, cfg: WorldConfig | None = None, scale: int = 2) -> None:
    """A PNG of ``count`` samples (image above mask: red stripes, green bars, blue checks)."""
    from PIL import Image

    b = batch(seed, 0, count, cfg)
    cols = 8
    s = b["images"].shape[1]
    rows = (count + cols - 1) // cols
    canvas = np.zeros((rows * 2 * s, cols * s, 3), dtype=np.uint8)
    for i in range(count):
        r, c = divmod(i, cols)
        canvas[2 * r * s:(2 * r + 1) * s, c * s:(c + 1) * s] = b["images"][i]
        canvas[(2 * r + 1) * s:(2 * r + 2) * s, c * s:(c + 1) * s] = MASK_COLOURS[b["masks"][i]]
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


if __name__ == "__main__":  # python -m diclip.toy.world2 out.png
    import sys
    import time

    t = time.time()
    b = batch(0, 0, 1000)
    print(f"1000 samples in {time.time() - t:.2f}s; fg fraction {np.mean(b['masks'] > 0):.3f}; "
          f"label freq {b['labels'].mean(0).round(3).tolist()}; classes/image {b['labels'].sum(1).mean():.2f}")
    print(b["captions"][:5])
    save_grid(sys.argv[1] if len(sys.argv) > 1 else "/tmp/toy_world2.png")
