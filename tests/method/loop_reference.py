"""Straightforward loop implementations of the reference algorithms, written for clarity, not speed.

They follow the reference code's structure (per image, per class, per cluster, boolean indexing,
broadcasts) so the vectorised versions in ``diclip.method`` can be checked against them.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F


def kl_loop(anchor, x, eps=1e-5):
    a = anchor + eps
    xx = x + eps
    a, xx = a[:, None, :], xx[None, :, :]
    q = torch.log(a) - torch.log(xx)
    return (a * q).sum(-1) * 0.5 - (xx * q).sum(-1) * 0.5


def cluster_loop(m, num_clusters=9, iters=5, size=20):
    h, w = (size, size) if isinstance(size, int) else size
    step_r = max(1, int(h // num_clusters ** 0.5))
    step_c = max(1, int(w // num_clusters ** 0.5))
    rows = list(range(0, h, step_r))
    cols = list(range(0, w, step_c))
    grid = [r * w + c for r in rows for c in cols]
    x = m.T.clone()
    x = torch.where(x == 0, torch.full_like(x, 1e-6), x)
    anchor = x[grid]
    cluster = None
    for _ in range(iters):
        dis = kl_loop(anchor, x)
        cluster = dis.argmin(0)
        idx = cluster.unique()
        anchor = torch.stack([x[cluster == i].mean(0) for i in idx])
    idx = cluster.unique()
    out = cluster.clone()
    for new, old in enumerate(idx.tolist()):
        out[cluster == old] = new
    return out


def comembership_loop(ids):
    n = ids.numel()
    s = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            s[i, j] = float(ids[i] == ids[j])
    return s


def refine_loop(attn, heads=(1, 2), threshold=0.2, num_clusters=9, iters=5, size=20):
    out = []
    for a in attn:
        a = a[list(heads)].clone()
        a = a / (a.amax(dim=-2, keepdim=True) + 1e-5)
        a[a < threshold] = 0
        a = a / (a.sum(-1, keepdim=True) + 1e-5)
        m = torch.eye(a.shape[-1], dtype=a.dtype)
        for h in range(a.shape[0]):
            m = m @ a[h]
        s = torch.nn.functional.one_hot(cluster_loop(m, num_clusters, iters, size)).to(m.dtype)
        s = s @ s.T
        r = m
        for _ in range(3):
            r = (s @ r) / (s.sum(-1, keepdim=True) + 1e-6)
        out.append(r)
    return torch.stack(out)


def surgery_broadcast(feats, text):
    prob = (feats[:, :1] @ text.t() * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n, c = feats.shape
    t = text.shape[0]
    f = feats.reshape(b, n, 1, c) * text.reshape(1, 1, t, c)
    f = f * w.unsqueeze(-1)
    f = f - f.mean(2, keepdim=True)
    return f.sum(-1)


def minmax_tokens(x):
    return (x - x.min(1, keepdim=True)[0]) / (x.max(1, keepdim=True)[0] - x.min(1, keepdim=True)[0])


def retrieval_loop(keys, values, feats, class_text, num_classes):
    sim = F.relu(surgery_broadcast(feats, keys))
    text21 = torch.cat([class_text[num_classes - 1:].mean(0, keepdim=True), class_text[: num_classes - 1]])
    v = keys @ text21.t()
    v[values == 0] = float("-inf")
    v = v.softmax(0)
    maps = minmax_tokens(sim[:, 1:] @ v[None])
    fuse = F.relu(maps[..., 1:] * (1 - maps[..., :1]))
    return minmax_tokens(fuse)


def boxes_loop(cam2d: np.ndarray, threshold: float) -> np.ndarray:
    """OpenCV-recipe boxes with a Python BFS for 8-connected regions."""
    h, w = cam2d.shape
    q = (cam2d * 255).astype(np.uint8)
    thr = int(threshold * q.max())
    on = q > thr
    seen = np.zeros_like(on)
    mask = np.zeros((h, w), dtype=np.float32)
    for y in range(h):
        for x in range(w):
            if on[y, x] and not seen[y, x]:
                comp = []
                dq = deque([(y, x)])
                seen[y, x] = True
                while dq:
                    cy, cx = dq.popleft()
                    comp.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and on[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                dq.append((ny, nx))
                ys = [p[0] for p in comp]
                xs = [p[1] for p in comp]
                x0, y0 = min(xs), min(ys)
                x1, y1 = min(max(xs) + 1, w - 1), min(max(ys) + 1, h - 1)
                mask[y0:y1, x0:x1] = 1
    return mask


def trans_mat_loop(aff):
    t = aff / aff.sum(0, keepdim=True)
    t = t / t.sum(1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
    t = (t + t.T) / 2
    return t @ t


def caa_loop(cam, attn_weights, cls_label, size, thr, layers=6):
    """One image: cam [N, K], attn_weights [L, 1+N, 1+N] -> list of refined [h, w] for present classes."""
    h, w = size
    aw = attn_weights[:, 1:, 1:][-layers:].mean(0)
    t = trans_mat_loop(aw)
    out = []
    for c in torch.where(cls_label > 0)[0].tolist():
        g = cam[:, c].numpy().reshape(h, w)
        box = torch.from_numpy(boxes_loop(g, thr)).reshape(1, -1)
        out.append((t * box) @ torch.from_numpy(g).reshape(-1, 1).to(t.dtype))
    return out


def rar_loop(cam_present, diff_attn, steps):
    """One image: cam [1, N, n_present], diff_attn [H, M, M] -> walked [1, M, n_present]."""
    n = cam_present.shape[-1]
    s = int(math.sqrt(cam_present.shape[1]))
    t = int(math.sqrt(diff_attn.shape[-1]))
    x = F.interpolate(cam_present.permute(0, 2, 1).reshape(1, n, s, s), size=[t, t], mode="bilinear",
                      align_corners=False).reshape(1, n, -1).permute(0, 2, 1)
    x = x - x.amin(dim=-2, keepdim=True)
    x = x / x.sum(dim=-2, keepdim=True)
    p = diff_attn[[1, 2]].mean(0).unsqueeze(0)
    p = p / torch.amax(p, dim=-2, keepdim=True)
    p = p + torch.where(p == 0, torch.zeros_like(p), 0.02 * torch.log10(math.e * p))
    p = torch.clamp(p, min=0)
    p = p / p.sum(dim=-1, keepdim=True)
    for _ in range(steps):
        x = torch.bmm(p, x)
        x = x - x.amin(dim=-2, keepdim=True)
        x = x / x.sum(dim=-2, keepdim=True)
    return x


def cam_to_label_loop(cam, cls_label, cls_thre=0.4):
    b, c, h, w = cam.shape
    rep = (cls_label > cls_thre)[:, :, None, None].repeat(1, 1, h, w)
    x = cam.reshape(b, c, -1).clone()
    x -= x.amin(dim=-1, keepdim=True)
    x /= x.amax(dim=-1, keepdim=True) + 1e-6
    x = x.reshape(b, c, h, w) * rep
    x = torch.cat([1 - x.amax(dim=1, keepdim=True), x], dim=1)
    return x, x.argmax(1)
