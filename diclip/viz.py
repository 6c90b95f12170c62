"""Pictures of masks: palette PNGs, colour overlays, CAM heatmaps and picture grids (PIL only).

People check segmentation by looking at it, so every output a user opens is a plain image:
masks are VOC-palette PNGs (mode "P", pixel value = class id, so tools read ids and viewers show
colours), overlays are JPEGs, and ``pictures.png`` is a grid of image | ground truth | CAM |
prediction. Headless by construction (no display backend is ever touched).
"""
from __future__ import annotations

import io
import math
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from diclip.data.synthetic import voc_palette

PALETTE = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
IGNORE_COLOUR = (224, 224, 192)  # VOC's colour for 255 (border / ignore)


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
def encode_mask_png(mask: np.ndarray) -> bytes:
    """uint8 class-id map [H, W] -> palette PNG bytes (VOC colours)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got {mask.shape}")
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette(PALETTE.reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """Palette/grayscale PNG bytes -> uint8 class ids (indices, never colours)."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("P", "L"):
        raise ValueError(f"mask PNG has mode {img.mode}, expected P or L")
    return np.asarray(img, dtype=np.uint8).copy()


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-id map -> RGB [H, W, 3] with VOC colours."""
    return PALETTE[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend VOC colours over the image where the mask is foreground (background stays as is)."""
    image = np.asarray(image, dtype=np.float32)
    colour = colorize(mask).astype(np.float32)
    fg = (np.asarray(mask) > 0)[..., None]
    out = np.where(fg, (1 - alpha) * image + alpha * colour, image)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# heatmaps
# ----------------------------------------------------------------------------------------------
def jet(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 with the classic jet colour map (what CAM papers show)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.rint(np.stack([r, g, b], -1) * 255).astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Jet heatmap of ``heat`` ([H, W] in [0, 1]) blended over the image."""
    out = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * jet(heat).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def encode_gray_png(x: np.ndarray) -> bytes:
    """[H, W] in [0, 1] -> 8-bit grayscale PNG (compact storage of a CAM)."""
    q = np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG")
    return buf.getvalue()


def decode_gray_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0


def encode_rgb(image: np.ndarray, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt.upper() == "JPEG" else {}
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# grids
# ----------------------------------------------------------------------------------------------
GRID_PAD = 4
GRID_HEADER = 18
LEGEND_LINE = 16
"""Height of one legend line: a 12 px swatch and PIL's default font (~11 px)."""
LEGEND_ENTRY = 120
"""Width of one legend entry (swatch + class name up to ~16 characters)."""
LegendEntry = tuple[str, Optional[tuple[int, int, int]]]
"""(label, colour); a None colour is a text-only entry (e.g. "no foreground class")."""


def legend_height(entries: int, width: int, pad: int = GRID_PAD) -> int:
    """Pixels the legend band under a grid of ``width`` takes for ``entries`` entries (0: no band)."""
    if entries <= 0:
        return 0
    per_line = max(1, (width - pad) // LEGEND_ENTRY)
    return math.ceil(entries / per_line) * LEGEND_LINE + pad


def grid_size(rows: int, cols: int, cell: int, pad: int = GRID_PAD, header: int = GRID_HEADER,
              legend: int = 0) -> tuple[int, int]:
    """(width, height) of :func:`picture_grid` output; ``legend``: number of legend entries."""
    width = cols * cell + (cols + 1) * pad
    return width, header + rows * cell + (rows + 1) * pad + legend_height(legend, width, pad)


def class_legend(names: Sequence[str], ids: Iterable[int]) -> list[LegendEntry]:
    """Legend entries (name, VOC colour) for the class ids drawn, background and ignore left out: pictures
    overlay classes on the image, so background is the image itself."""
    present = sorted({int(i) for i in ids if 0 < int(i) < len(names)})
    if not present:
        return [("no foreground class (image shows through)", None)]
    return [(names[i], tuple(int(v) for v in PALETTE[i])) for i in present]


def _fit(image: np.ndarray, cell: int) -> Image.Image:
    """Letterbox an image into a ``cell`` x ``cell`` square (aspect kept, grey border)."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    h, w = image.shape[:2]
    s = cell / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    img = img.resize((nw, nh), Image.NEAREST if s >= 1 else Image.BILINEAR)
    canvas = Image.new("RGB", (cell, cell), (40, 40, 40))
    canvas.paste(img, ((cell - nw) // 2, (cell - nh) // 2))
    return canvas


def picture_grid(rows: Sequence[Sequence[np.ndarray | None]], titles: Sequence[str], cell: int = 160,
                 row_labels: Sequence[str] | None = None, pad: int = GRID_PAD,
                 legend: Sequence[LegendEntry] = (),
                 captions: Sequence[Sequence[str | None]] | None = None) -> Image.Image:
    """Rows of RGB pictures (None: an empty cell) under a header of column titles, with an optional legend
    band at the bottom saying which colour is which class. ``captions[r][c]`` (optional, None: none) is
    drawn on a dark band at the top of cell (r, c); the grid's size does not change."""
    cols = len(titles)
    width, height = grid_size(len(rows), cols, cell, pad, legend=len(legend))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad) + 2, 3), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = GRID_HEADER + pad + r * (cell + pad)
        for c in range(cols):
            x = pad + c * (cell + pad)
            pic = row[c] if c < len(row) else None
            if pic is None:
                canvas.paste(Image.new("RGB", (cell, cell), (128, 128, 128)), (x, y))
                draw.text((x + 4, y + 4), "n/a", fill=(255, 255, 255))
            else:
                canvas.paste(_fit(pic, cell), (x, y))
            text = captions[r][c] if captions is not None and r < len(captions) and c < len(captions[r]) else None
            if text:
                box = draw.textbbox((x + 2, y + 1), str(text))
                draw.rectangle([x, y, min(x + cell - 1, box[2] + 2), box[3] + 2], fill=(0, 0, 0))
                draw.text((x + 2, y + 1), str(text), fill=(255, 255, 255))
        if row_labels is not None and r < len(row_labels):
            draw.text((pad + 3, y + cell - 14), str(row_labels[r])[:24], fill=(255, 255, 255))
    if legend:
        top = GRID_HEADER + len(rows) * (cell + pad) + pad
        per_line = max(1, (width - pad) // LEGEND_ENTRY)
        for k, (label, colour) in enumerate(legend):
            x = pad + (k % per_line) * LEGEND_ENTRY
            y = top + (k // per_line) * LEGEND_LINE + 2
            if colour is not None:
                draw.rectangle([x, y, x + 11, y + 11], fill=tuple(colour), outline=(0, 0, 0))
                x += 16
            draw.text((x, y), str(label)[: (LEGEND_ENTRY - 20) // 6], fill=(0, 0, 0))
    return canvas


def grouping_caption(attn, grid: tuple[int, int], mask: np.ndarray | None) -> str | None:
    """Caption of an attention-map panel: the in-object share of the objects' tokens' attention against the
    objects' area share (chance), from a ground-truth class mask [H, W] of the whole image (objects = its
    connected class regions; :mod:`diclip.method.attention_grouping`). ``attn`` [M, M] on ``grid``.
    None without a mask or an object big enough to own a token."""
    if mask is None:
        return None
    import torch

    from diclip.method.attention_grouping import image_grouping, objects_from_class_mask

    objects = objects_from_class_mask(torch.from_numpy(np.array(mask, dtype=np.int64)))
    s = image_grouping(torch.as_tensor(attn), grid, objects)
    if not s["objects"]:
        return None
    return f"in-obj {s['share']:.2f} vs area {s['chance']:.2f}"


def correlation_captions(rec, mask: np.ndarray | None) -> list[str | None]:
    """Captions of a ``correlate`` preview row (image | ACR clusters | VCE map | RAR map): each map panel
    says how much of the objects' tokens' attention stays in their own object vs chance (needs the
    image's ground-truth mask; none: no captions). ``rec`` is a stored correlation record."""
    if mask is None:
        return [None] * 4
    from diclip.data.map_shards import batch_maps

    vce, rar = batch_maps([rec], None, None, None)
    return [None, None, grouping_caption(vce[0], rec.grid, mask), grouping_caption(rar[0], rec.rar_grid, mask)]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
