"""Independent reference oracle for DiCLIP (GitHub zwyang6/DiCLIP).

A plain torch/numpy restatement, written from reading the reference code, of what DiCLIP
computes in one training iteration. It is the yardstick the project is compared against, so it
imports nothing from ``diclip`` / ``ray_jobs``: the caller passes the models (an open_clip
``VisionTransformer`` built with QuickGELU, the CLIP model + tokenizer for text, the KV adapter
module, and two callables for the trainable segmentation head/decoder). Clarity over speed.

What each public function restates (reference file :: function)
------------------------------------------------------------------
encode_image            clip/clip_custom.py :: VisionTransformer.forward, Transformer.forward,
                        ResidualAttentionBlock.forward, Attention.forward (surgery attention) +
                        clip/clip.py :: generate_clip_fts
encode_text             clip/clip.py :: encode_text_with_prompt_ensemble (one template)
refine_diffusion_attention  model/model_diclip.py :: DiCLIP_model.extract_diff_attn (post-processing
                        of the captured per-head q k^T maps; the Stable Diffusion pass is not here)
attn_kl_cluster         model/featurecluster.py :: attn_kl_cluster + kl_dis
clip_feature_surgery    clip/clip.py :: clip_feature_surgery (redundant_feats=None branch)
kv_inject_cam           model/model_diclip.py :: DiCLIP_model.diff_knowledge_inject_cam
adapter_forward         model/model_diclip.py :: KV_Adapter.forward (eval mode: dropout = identity)
model_forward           model/model_diclip.py :: DiCLIP_model.forward
compute_trans_mat, scoremap2bbox, refine_cams_with_aff
                        utils/affutils.py (same names)
rar_refine              model/rar.py :: recursive_refinement_with_diff_attn
cam_to_label_iseg, cams_to_affinity_label, get_mask_by_radius
                        utils/camutils.py (the LAST definition of cams_to_affinity_label wins:
                        no diagonal-ignore)
seg_loss, aff_loss      zwyang6/ExCEL model/losses.py :: get_seg_loss, get_aff_loss
                        (DiCLIP's model/losses.py is not published; same call signatures)
training_step           scripts/train_voc.py :: train() loop body (per-iteration step), with the
                        VOC/COCO differences as arguments (caa_thre, rar_iters, seg_attn_from,
                        aff_from_seg_iter)

Quirks reproduced on purpose
----------------------------
* In-place aliasing of the per-layer feature list (clip_custom.py). The list entries are views of
  tensors that the surgery blocks later modify in place, and they are stacked only at the end:
    - the entry of the block just BEFORE the first surgery block is the tensor that the new
      (surgery) path accumulates into (``x += x_res`` in every surgery block) and whose CLS row is
      overwritten with the final original-path CLS (``x[0] = x_ori[0]`` in
      VisionTransformer.forward): it ends up equal to the final surgery-path tokens (pre ln_post);
    - the entries of all surgery blocks but the last hold the PRE-MLP state of the next block's
      original path (``x_ori += x_ori_res`` happens in place, the MLP add is out of place);
    - the last entry is the clean output of the last block's original path.
  ``aliasing=False`` returns the clean block outputs instead.
* Surgery attention (clip_custom.py :: Attention.forward): per head softmax(q q^T s) +
  2 softmax(k k^T s); the diffusion map ``ex_feats`` [B,1,N,N] is added to the patch-patch block
  (broadcast over heads); then SUMMED over heads and that single map multiplies every head's v.
  Second and later surgery blocks feed ln_1(x_ori) to BOTH paths; the new path skips the MLP.
  Recorded weight of a surgery block = SUM over heads of softmax(q k^T s) (rows sum to #heads),
  of a standard block = MEAN over heads (nn.MultiheadAttention default).
* generate_clip_fts normalises the projected features over dim=1, the TOKEN axis, not channels.
* clip_feature_surgery / kv-inject min-max over the token axis with no epsilon (includes the CLS row
  in clip_feature_surgery; kv-inject drops it first). Constant maps give NaN as in the reference.
* kv-inject: keys are the similarity "text", ``values == 0`` entries are set to -inf before the
  softmax over cache entries; background text = mean of the background-prompt rows (rows
  num_classes-1 ...), not re-normalised.
* extract_diff_attn: column-max normalisation ``/ (amax(dim=-2) + 1e-5)``, zero below 0.2,
  row normalisation ``/ (sum(-1) + 1e-5)``, product of heads 1 and 2 computed as
  ``(eye @ A1) @ A2``; 3 rounds ``C @ T / (C.sum(-1) + 1e-6)``.
* attn_kl_cluster: anchors on ``arange(0, size, size // 3.0)`` in both axes (16 anchors for
  size 20, although num_cluster=9); tokens are the ROWS of attn^T (i.e. columns of attn);
  exact zeros replaced by 1e-6; the symmetric KL of kl_dis is computed in FLOAT16 (the reference
  casts with ``.type(torch.float16)`` and adds 1e-5 in fp16) on whatever device the tensor is on;
  reproduced with the same casts (on CPU here - CPU and CUDA fp16 reductions may round
  differently, so argmin ties can differ from a GPU run; the fp32 anchor means are exact);
  argmin over anchors with torch.min(dim=0); empty clusters drop out between iterations.
* RAR (rar.py): cam bilinear to the SD grid, ``x - min`` then ``/ sum`` over tokens (no eps),
  transition = mean of heads 1,2; ``/ column max`` (no eps); ``+ where(P==0, 0, 0.02*log10(e*P))``;
  clamp >= 0; row-normalise; iterations re-normalise the same way; then bilinear to a fixed
  512x512 intermediate, min-max (no eps), placed into a zero [K-1,512,512] map, bilinear to the
  mask size; cam_to_label_iseg(bkg_thre=0): per-class min-max ``/ (max + 1e-6)``,
  ``cls_label > 0.4`` gating, background = (1 - max fg) ** 1, argmax (no ignore pixels).
* refine_cams_with_aff: last ``attn_layers`` layers' patch-patch weights (3 head-means + 3 head-sums
  for ViT-B); with seg_attn, layers with sum(seg_attn - W_l) <= mean are kept, averaged with
  ``/ (count + 1e-5)``, multiplied by seg_attn; compute_trans_mat = 3 Sinkhorn rounds
  (column then row), symmetrise, one squaring. scoremap2bbox with OpenCV: uint8(cam*255)
  (truncation), threshold int(caa_thre * max), THRESH_BINARY (strictly greater), findContours
  RETR_TREE / CHAIN_APPROX_SIMPLE, ALL contours (multi_contour_eval=True, inner ones too),
  boxes' exclusive upper ends clipped to width-1 / height-1 (so the last row/column is never
  in a box); no contour -> one empty box -> all-zero refined map.
* Losses: balanced CE ``0.5*(bg_sum_ce/(n_bg+1e-6) + fg_sum_ce/(n_fg+1e-6))``; affinity loss counts
  ``+1``. Affinity labels: nearest resize of the label map to the token grid, pairs outside the
  (2r+1)^2 window -> 255, rows/cols of label 255 -> 255, diagonal NOT ignored.
* Training step: loss = 1.0*seg + 0.1*aff + 0.1*dynamic (w_seg unused in the reference).

Generalisations (the reference hard-codes these)
------------------------------------------------
* token grid: reference uses h//16, w//16, ``reshape(12, b, C, h//16, w//16)``, ``crop_size//16``,
  ``get_mask_by_radius(20, 20)``, a 20x20 k-resize; here grid = conv1 output grid / ``patch``
  argument, L = number of blocks. Positional embedding is resized to (gh, gw) (reference: square).
* ``size`` in attn_kl_cluster is the grid side as given (reference passes img_w // 16).
* RAR: square grids inferred with sqrt as in the reference; the 512 intermediate is a parameter
  ``inter_size`` (default 512).
* The Stable Diffusion pass (q k^T capture, softmax maps) is NOT restated: refine_diffusion_attention
  starts from the captured q k^T maps, rar_refine/training_step take the captured softmax maps.

Resolved ambiguities
--------------------
* KV_Adapter: the reference trains with its Dropout(0.1) active (module in train mode), so its
  dynamic logits and the return_dynamic CAM are stochastic there; the oracle is the eval-mode
  (deterministic) forward. Dropout inside ``fuse``/``decode`` is the caller's business.
* eval_seg: the reference returns only ``seg``; model_forward returns a dict with ``seg`` plus the
  encoder outputs (no CAM / attn_pred / dynamic keys).
* Positional embedding: the reference resizes its table once at construction (train mode) and again
  on the fly when the grid differs; the oracle resizes from whatever table ``visual`` holds.
* Text: the text tower is not restated; encode_text calls ``clip_model.encode_text`` on the caller's
  tokenizer output and applies the ensemble normalisation (normalise, mean over the 1 template,
  normalise).
* torch.nn.MultiheadAttention scales q by 1/sqrt(d) before q k^T (torch 2.x multiplies by
  sqrt(1/d), torch 1.13 divided); identical for the power-of-4 head widths used (16, 64).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _layer_norm(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _mlp(block, x):
    """c_fc -> QuickGELU -> c_proj (OpenAI CLIP MLP; QuickGELU is explicit on purpose)."""
    h = F.linear(x, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    h = _quick_gelu(h)
    return F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def _minmax_tokens(s):
    """(s - min) / (max - min) over dim 1 (token axis), no epsilon."""
    lo = s.min(dim=1, keepdim=True)[0]
    hi = s.max(dim=1, keepdim=True)[0]
    return (s - lo) / (hi - lo)


def _split_heads(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)  # [B,H,N,D]


def _merge_heads(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def _qkv(block, x):
    """q, k, v [B,H,N,D] from the packed in_proj of block.attn (nn.MultiheadAttention)."""
    attn = block.attn
    c = x.shape[-1]
    heads = attn.num_heads
    y = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B,N,3C] ordered q | k | v
    q, k, v = y[..., :c], y[..., c:2 * c], y[..., 2 * c:]
    return _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)


def _standard_attention(block, x):
    """nn.MultiheadAttention(x, x, x, need_weights=True): output [B,N,C], head-mean weights [B,N,N]."""
    q, k, v = _qkv(block, x)
    scale = q.shape[-1] ** -0.5
    w = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)  # q scaled before the product
    out = _merge_heads(w @ v)
    out = F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)
    return out, w.mean(dim=1)


def _surgery_attention(block, x, ex_feats):
    """clip_custom.Attention with the block's weights: (new-path out, original-path out, head-SUM weights)."""
    q, k, v = _qkv(block, x)
    scale = q.shape[-1] ** -0.5  # reference: (a @ b^T) * scale
    attn_ori = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    attn = torch.softmax((q @ q.transpose(-2, -1)) * scale, dim=-1) + 2 * torch.softmax(
        (k @ k.transpose(-2, -1)) * scale, dim=-1)
    if ex_feats is not None:
        attn[:, :, 1:, 1:] = attn[:, :, 1:, 1:] + ex_feats  # [B,1,N,N] broadcast over heads
    attn = attn.sum(dim=1, keepdim=True)  # [B,1,T,T]: one map for all heads
    w_out, b_out = block.attn.out_proj.weight, block.attn.out_proj.bias
    x_new = F.linear(_merge_heads(attn @ v), w_out, b_out)
    x_ori = F.linear(_merge_heads(attn_ori @ v), w_out, b_out)
    return x_new, x_ori, attn_ori.sum(dim=1)


def _check_block(block):
    for name in ("ls_1", "ls_2"):
        m = getattr(block, name, None)
        if m is not None and type(m).__name__ != "Identity":
            raise ValueError(f"{name} must be Identity for an OpenAI-style CLIP block")


# --------------------------------------------------------------------------------------------
# CLIP image / text encoders
# --------------------------------------------------------------------------------------------
def _embed(visual, pixels):
    x = F.conv2d(pixels, visual.conv1.weight, visual.conv1.bias, stride=visual.conv1.stride,
                 padding=visual.conv1.padding)  # [B,W,gh,gw]
    b, w, gh, gw = x.shape
    x = x.reshape(b, w, gh * gw).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(b, 1, w, dtype=x.dtype, device=x.device)
    x = torch.cat([cls, x], dim=1)
    pe = visual.positional_embedding
    side = int(math.isqrt(pe.shape[0] - 1))
    if (side, side) != (gh, gw):
        grid = pe[1:].reshape(1, side, side, w).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        grid = grid.reshape(1, w, gh * gw).transpose(1, 2)[0]
        pe = torch.cat([pe[:1], grid], dim=0)
    x = x + pe.to(x.dtype)
    return _layer_norm(visual.ln_pre, x), (gh, gw)


@torch.no_grad()
def encode_image(visual, pixels, ex_feats=None, surgery_blocks=3, aliasing=True):
    """DiCLIP's CLIP image encoder (clip_custom.VisionTransformer + generate_clip_fts).

    Returns features [B,1+N,C] normalised over dim=1 (tokens), attn_weights [L,B,1+N,1+N],
    all_feats [L,B,1+N,W] (batch-first). With aliasing=True the entries are built exactly like the
    reference (in-place updates on tensors already recorded, stacked at the end).
    """
    blocks = list(visual.transformer.resblocks)
    n_layers = len(blocks)
    if not 1 <= surgery_blocks <= n_layers:
        raise ValueError("surgery_blocks must be in [1, number of blocks]")
    first = n_layers - surgery_blocks
    x, _ = _embed(visual, pixels)

    feats, weights = [], []
    x_new = x_ori = None
    for i, blk in enumerate(blocks):
        _check_block(blk)
        if i < first:  # standard block
            a, w = _standard_attention(blk, _layer_norm(blk.ln_1, x))
            x = x + a
            x = x + _mlp(blk, _layer_norm(blk.ln_2, x))
            weights.append(w)
            feats.append(x)  # later modified in place when aliasing (first surgery block target)
            continue
        if i == first:  # start of the dual path: both paths read ln_1(x)
            r_new, r_ori, w = _surgery_attention(blk, _layer_norm(blk.ln_1, x), ex_feats)
            x_ori = x + r_ori
            x_ori = x_ori + _mlp(blk, _layer_norm(blk.ln_2, x_ori))
            if aliasing:
                x.add_(r_new)  # in place on the previous block's recorded output
                x_new = x
            else:
                x_new = x + r_new
        else:  # later surgery blocks: both paths read ln_1(x_ori)
            r_new, r_ori, w = _surgery_attention(blk, _layer_norm(blk.ln_1, x_ori), ex_feats)
            if aliasing:
                x_ori.add_(r_ori)  # in place on the previous surgery block's recorded output
            else:
                x_ori = x_ori + r_ori
            x_ori = x_ori + _mlp(blk, _layer_norm(blk.ln_2, x_ori))
            if aliasing:
                x_new.add_(r_new)
            else:
                x_new = x_new + r_new  # new path skips the MLP
        weights.append(w)
        feats.append(x_ori)

    if not aliasing:
        x_new = x_new.clone()
    x_new[:, 0, :] = x_ori[:, 0, :]  # CLS from the original path (in place, as the reference)
    out = _layer_norm(visual.ln_post, x_new) @ visual.proj
    features = out / out.norm(dim=1, keepdim=True)  # TOKEN axis (reference quirk)
    return features, torch.stack(weights, dim=0), torch.stack(feats, dim=0)


@torch.no_grad()
def encode_text(clip_model, tokenizer, names, template="a clean origami {}."):
    """encode_text_with_prompt_ensemble with a single template -> [T, C] L2-normalised rows."""
    device = next(clip_model.parameters()).device
    rows = []
    for name in names:
        tokens = tokenizer([template.format(name)]).to(device)
        emb = clip_model.encode_text(tokens)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb.mean(dim=0)
        emb = emb / emb.norm()
        rows.append(emb)
    return torch.stack(rows, dim=0)


# --------------------------------------------------------------------------------------------
# Diffusion attention post-processing and KL clustering
# --------------------------------------------------------------------------------------------
def _sym_kl_fp16(anchor, tokens):
    """kl_dis: symmetric KL in float16 (reference casts to fp16 and adds 1e-5 in fp16). [n1, n2]."""
    a = anchor.to(torch.float16) + 1e-5
    t = tokens.to(torch.float16) + 1e-5
    a = a[:, None, :]
    t = t[None, :, :]
    logq = torch.log(a) - torch.log(t)
    return torch.sum(a * logq, dim=-1) * 0.5 + (-torch.sum(t * logq, dim=-1) * 0.5)


def attn_kl_cluster(m, num_cluster=9, iters=5, size=20):
    """Same-cluster indicator [N,N] (0/1 float) of the KL clustering of the columns of ``m``."""
    step = size // num_cluster ** 0.5  # float floor division, e.g. 20 // 3.0 = 6.0
    g = torch.arange(0, size, step).long()
    anchor_ids = (g[:, None] * size + g[None, :]).flatten()
    tokens = m.T
    tokens = torch.where(tokens == 0, 1e-6, tokens)
    anchors = tokens[anchor_ids]
    assign = None
    for _ in range(iters):
        dist = _sym_kl_fp16(anchors, tokens)  # [n_anchor, N]
        assign = torch.min(dist, dim=0)[1]
        used = torch.unique(assign)
        anchors = torch.stack([tokens[assign == u].mean(dim=0) for u in used], dim=0)
    used = torch.unique(assign)
    # dense relabelling (sorted unique -> rank); the reference does it in place sequentially,
    # which is equivalent because ranks never exceed the labels being replaced
    labels = torch.searchsorted(used, assign)
    return (labels[:, None] == labels[None, :]).float()


def refine_diffusion_attention(qk, size):
    """extract_diff_attn post-processing: per-head q k^T maps [B,H,N,N] -> refined map [B,1,N,N]."""
    a = qk.float().clone()
    a = a / (torch.amax(a, dim=-2, keepdim=True) + 1e-5)
    a = torch.where(a < 0.2, 0, a)
    a = a / (a.sum(dim=-1, keepdim=True) + 1e-5)
    eye = torch.eye(a.shape[-1], device=a.device)
    d = (eye @ a[:, 1]) @ a[:, 2]  # reduce(matmul, [A1, A2], eye)
    clusters = torch.stack([attn_kl_cluster(d[b], num_cluster=9, iters=5, size=size)
                            for b in range(d.shape[0])], dim=0)
    t = d
    for _ in range(3):
        t = clusters @ t
        t = t / (clusters.sum(dim=-1, keepdim=True) + 1e-6)
    return t[:, None]


# --------------------------------------------------------------------------------------------
# CAMs
# --------------------------------------------------------------------------------------------
def _surgery_similarity(feats, text):
    """CLIP-surgery similarity [B,1+N,T] (before any normalisation)."""
    prob = torch.softmax((feats[:, :1, :] @ text.t()) * 2, dim=-1)  # [B,1,T]
    w = prob / prob.mean(dim=-1, keepdim=True)
    b, n, c = feats.shape
    t = text.shape[0]
    prod = feats.reshape(b, n, 1, c) * text.reshape(1, 1, t, c)
    prod = prod * w[..., None]  # [B,1,T,1]
    prod = prod - prod.mean(dim=2, keepdim=True)
    return prod.sum(dim=-1)


def clip_feature_surgery(feats, text):
    """[B,1+N,T] similarity min-max normalised over tokens (CLS row included)."""
    return _minmax_tokens(_surgery_similarity(feats, text)).detach()


def kv_inject_cam(keys, values, feats, integral_text, num_classes):
    """diff_knowledge_inject_cam -> [B,N,num_classes-1]."""
    keys = keys.to(feats.device)
    values = values.to(feats.device)
    sim = F.relu(_surgery_similarity(feats, keys))  # [B,1+N,Nk]
    bkg = integral_text[num_classes - 1:].mean(dim=0, keepdim=True)
    text_k = torch.cat([bkg, integral_text[:num_classes - 1]], dim=0)  # [K,C], row 0 = background
    logits = keys @ text_k.t()  # [Nk,K]
    logits[values == 0] = float("-inf")
    mix = torch.softmax(logits, dim=0)  # over cache entries, per class
    maps = _minmax_tokens(sim[:, 1:, :] @ mix[None])  # [B,N,K]
    fg = maps[:, :, 1:] * (1 - maps[:, :, :1])
    return _minmax_tokens(F.relu(fg))


def adapter_forward(adapter, x):
    """KV_Adapter in eval mode: fc2(relu(fc1(x))) (dropouts are identities)."""
    h = F.relu(F.linear(x, adapter.fc1.weight, adapter.fc1.bias))
    return F.linear(h, adapter.fc2.weight, adapter.fc2.bias)


def model_forward(visual, integral_text, keys, values, adapter, fuse, decode, pixels,
                  diff_refined=None, *, num_classes, return_dynamic, eval_seg=False, aliasing=True):
    """DiCLIP_model.forward with the diffusion map given (``diff_refined`` = extract_diff_attn's
    first output; ignored when eval_seg, as in the reference which skips SD there)."""
    ex = None if eval_seg else diff_refined
    features, attn_weights, all_feats = encode_image(visual, pixels, ex_feats=ex, aliasing=aliasing)
    n_layers, b, _, width = all_feats.shape
    gh, gw = pixels.shape[-2] // visual.conv1.stride[0], pixels.shape[-1] // visual.conv1.stride[1]

    tokens = all_feats[:, :, 1:].permute(0, 1, 3, 2).reshape(n_layers, b, width, gh, gw)
    fts = fuse(tokens)
    seg = decode(fts)
    out = dict(seg=seg, features=features, attn_weights=attn_weights, all_feats=all_feats, fts=fts)
    if eval_seg:
        return out

    attr = clip_feature_surgery(features, integral_text)[:, 1:, :num_classes - 1]
    kv = kv_inject_cam(keys, values, features, integral_text, num_classes)
    cam = _minmax_tokens(0.5 * kv + attr)
    dynamic = adapter_forward(adapter, features[:, 1:, :])  # [B,N,K]
    if return_dynamic:
        cam = _minmax_tokens(0.1 * F.relu(dynamic[:, :, 1:]) + attr)

    fb, fc, fh, fw = fts.shape
    dynamic_pred = dynamic.permute(0, 2, 1).reshape(b, num_classes, fh, fw)
    f = fts.clone().reshape(fb, fc, fh * fw)
    f = f / f.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)  # F.normalize(dim=1)
    aff = f.transpose(2, 1).bmm(f)
    aff = (aff - aff.mean() * 1.0) * 3.0  # mean over the whole batch tensor
    attn_pred = torch.sigmoid(aff)
    out.update(cam=cam.detach(), attn_pred=attn_pred, dynamic=dynamic_pred,
               cam_surgery=attr, cam_kv=kv)
    return out


# --------------------------------------------------------------------------------------------
# Pseudo labels: CAA affinity refinement, RAR, label assignment
# --------------------------------------------------------------------------------------------
def compute_trans_mat(w):
    t = w / w.sum(dim=0, keepdim=True)
    t = t / t.sum(dim=1, keepdim=True)
    for _ in range(2):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.transpose(1, 0)) / 2
    return t @ t


def scoremap2bbox(scoremap, threshold, multi_contour_eval=True):
    """OpenCV boxes [[x0,y0,x1,y1],...] (x1,y1 clipped to width-1/height-1) and their count."""
    height, width = scoremap.shape
    img = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, binary = cv2.threshold(src=img, thresh=int(threshold * np.max(img)), maxval=255,
                              type=cv2.THRESH_BINARY)
    found = cv2.findContours(image=binary, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)
    contours = found[1] if cv2.__version__.split(".")[0] == "3" else found[0]
    if len(contours) == 0:
        return np.asarray([[0, 0, 0, 0]]), 1
    if not multi_contour_eval:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.asarray(boxes), len(contours)


def refine_cams_with_aff(cam_i, attn_weight_i, cls_label, size, caa_thre, seg_attn=None,
                         attn_layers=6, patch=16, dtype=torch.float32):
    """CAA refinement of one image's CAM [N,K-1] -> (list of [h,w] maps for present classes, cls_lst).

    ``dtype``: the reference computes in float32; float64 checks the logic free of rounding."""
    gh, gw = size[0] // patch, size[1] // patch
    w = attn_weight_i[:, 1:, 1:][-attn_layers:]
    if seg_attn is not None:
        diff = (seg_attn - w).flatten(1).sum(dim=1)  # one score per layer
        keep = torch.zeros_like(diff)
        keep[diff <= diff.mean()] = 1
        keep = keep.reshape(-1, 1, 1).expand_as(w)
        w = (keep * w).sum(dim=0) / (keep.sum(dim=0) + 1e-5)
        w = w.detach() * seg_attn.squeeze(0).detach()
    else:
        w = w.mean(dim=0).detach()
    trans = compute_trans_mat(w).to(dtype)

    cls_lst = torch.where(cls_label)[0]
    refined = []
    for c in cls_lst:
        gray = cam_i[:, c].detach().cpu().numpy().reshape(gh, gw)
        boxes, count = scoremap2bbox(gray, caa_thre, multi_contour_eval=True)
        box_mask = torch.zeros(gh, gw, device=trans.device, dtype=dtype)
        for j in range(count):
            x0, y0, x1, y1 = (int(v) for v in boxes[j])
            box_mask[y0:y1, x0:x1] = 1
        t = trans * box_mask.view(1, gh * gw)  # zero the columns outside every box
        vec = torch.tensor(gray, dtype=dtype, device=trans.device).view(-1, 1)
        refined.append((t @ vec).reshape(gh, gw))
    return refined, cls_lst.detach().cpu()


def cam_to_label_iseg(cam, cls_label, bkg_thre=0.0, cls_thre=0.4):
    """utils/camutils.cam_to_label_iseg. cam [b,c,h,w] (modified copy), cls_label [b,c] or [c]."""
    b, c, h, w = cam.shape
    gate = (cls_label > cls_thre).unsqueeze(-1).unsqueeze(-1).repeat([1, 1, h, w])
    flat = cam.clone().reshape(b, c, -1)
    flat = flat - flat.amin(dim=-1, keepdim=True)
    flat = flat / (flat.amax(dim=-1, keepdim=True) + 1e-6)
    if bkg_thre > 0:
        flat[flat < bkg_thre] = 0
        valid = gate * flat.reshape(b, c, h, w)
        value, label = valid.max(dim=1)
        label = label + 1
        label[value == 0] = 0
        return valid, label
    valid = gate * flat.reshape(b, c, h, w)
    valid = torch.cat([torch.pow(1 - valid.amax(dim=1, keepdim=True), 1), valid], dim=1)
    return valid, valid.argmax(dim=1)


def rar_refine(cls_label, cam, diff_attn_raw, mask_size, iters, inter_size=512, dtype=torch.float32):
    """recursive_refinement_with_diff_attn: cam [1,N,n_present], diff_attn_raw [H,M,M] softmax maps.

    Returns (valid_lam [1,K,H,W] with background channel first, pseudo [1,H,W])."""
    num_cls = cls_label.shape[-1]
    cls_lst = torch.where(cls_label)[0]
    n = cls_lst.shape[0]
    src = int(math.sqrt(cam.shape[1]))
    tgt = int(math.sqrt(diff_attn_raw.shape[-1]))
    x = cam.permute(0, 2, 1).reshape(1, n, src, src)
    x = F.interpolate(x, size=[tgt, tgt], mode="bilinear", align_corners=False)
    x = x.reshape(1, n, -1).permute(0, 2, 1)  # [1,M,n]
    x = x - x.amin(dim=-2, keepdim=True)
    x = x / x.sum(dim=-2, keepdim=True)

    p = diff_attn_raw.to(dtype)[[1, 2]].mean(dim=0)[None]  # reference: .float() before the mean
    p = p / torch.amax(p, dim=-2, keepdim=True)  # column max, no eps
    p = p + torch.where(p == 0, 0, 0.02 * torch.log10(torch.e * p))
    p = torch.clamp(p, min=0)
    p = p / p.sum(dim=-1, keepdim=True)

    for _ in range(iters):
        x = torch.bmm(p, x)
        x = x - x.amin(dim=-2, keepdim=True)
        x = x / x.sum(dim=-2, keepdim=True)

    maps = x.unflatten(-2, (tgt, tgt)).permute(0, 3, 1, 2)  # [1,n,tgt,tgt]
    maps = F.interpolate(maps, size=[inter_size, inter_size], mode="bilinear", align_corners=False)[0]
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True)
    full = torch.zeros(num_cls, inter_size, inter_size, device=maps.device, dtype=maps.dtype)
    full[cls_lst] = full[cls_lst] + maps
    full = F.interpolate(full[None], size=tuple(mask_size), mode="bilinear", align_corners=False)[0]
    return cam_to_label_iseg(full[None], cls_label, bkg_thre=0.0)


# --------------------------------------------------------------------------------------------
# Losses and affinity labels
# --------------------------------------------------------------------------------------------
def _ce_none(pred, label, ignore_index):
    """nn.CrossEntropyLoss(reduction='none', ignore_index): 0 at ignored pixels."""
    keep = label != ignore_index
    safe = torch.where(keep, label, torch.zeros_like(label))
    nll = -torch.log_softmax(pred, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(keep, nll, torch.zeros_like(nll))


def seg_loss(pred, label, ignore_index=IGNORE_INDEX):
    """Balanced background/foreground CE (ExCEL get_seg_loss)."""
    label = label.long()
    bg = label.clone()
    bg[label != 0] = ignore_index
    fg = label.clone()
    fg[label == 0] = ignore_index
    bg_loss = _ce_none(pred, bg, ignore_index).sum() / ((bg != ignore_index).long().sum() + 1e-6)
    fg_loss = _ce_none(pred, fg, ignore_index).sum() / ((fg != ignore_index).long().sum() + 1e-6)
    return (bg_loss + fg_loss) * 0.5


def aff_loss(attn_pred, aff_label):
    """ExCEL get_aff_loss (first return value)."""
    pos = (aff_label == 1).to(torch.int16)
    neg = (aff_label == 0).to(torch.int16)
    pos_loss = torch.sum(pos * (1 - attn_pred)) / (pos.sum() + 1)
    neg_loss = torch.sum(neg * attn_pred) / (neg.sum() + 1)
    return 0.5 * pos_loss + 0.5 * neg_loss


def get_mask_by_radius(h, w, radius=8):
    """[hw,hw] 0/1 numpy mask: 1 where the Chebyshev distance between tokens is <= radius."""
    ys, xs = np.divmod(np.arange(h * w), w)
    near = (np.abs(ys[:, None] - ys[None, :]) <= radius) & (np.abs(xs[:, None] - xs[None, :]) <= radius)
    return near.astype(np.float64)


def cams_to_affinity_label(label_map, grid, radius=8, ignore_index=IGNORE_INDEX):
    """Affinity labels [B,hw,hw] in {0,1,255} (last camutils definition: diagonal kept)."""
    b = label_map.shape[0]
    gh, gw = grid
    small = F.interpolate(label_map.unsqueeze(1).float(), size=[gh, gw], mode="nearest").reshape(b, -1)
    aff = (small[:, None, :] == small[:, :, None]).long()  # aff[b,i,j] = L_i == L_j
    outside = torch.from_numpy(get_mask_by_radius(gh, gw, radius) == 0).to(aff.device)
    for i in range(b):
        aff[i][outside] = ignore_index
        bad = small[i] == ignore_index
        aff[i][:, bad] = ignore_index
        aff[i][bad, :] = ignore_index
    return aff


# --------------------------------------------------------------------------------------------
# One training iteration (scripts/train_voc.py)
# --------------------------------------------------------------------------------------------
def training_step(outputs, diff_attn_raw, cls_labels, crop, n_iter, *, caa_thre, rar_iters,
                  seg_attn_from, aff_from_seg_iter, radius=8, patch=16, w_aff=0.1, w_dynamic=0.1,
                  pseudo=None, dtype=torch.float32):
    """Pseudo labels + losses for one step given model_forward outputs.

    ``pseudo``: use these labels instead of building them (checks the loss wiring alone);
    ``dtype``: precision of the label building (reference: float32).

    VOC: caa_thre 0.79, rar_iters 5, seg_attn_from 4000, aff_from_seg_iter 34000;
    COCO: 0.88, 10, 40000, 80000."""
    cam = outputs["cam"]
    attn_weights = outputs["attn_weights"]
    attn_pred = outputs["attn_pred"]
    crop = tuple(int(v) for v in crop)

    scores = None
    if pseudo is None:
        pseudo, scores = [], []
        for i in range(cam.shape[0]):
            seg_attn = attn_pred[i].unsqueeze(0).detach().to(dtype) if n_iter >= seg_attn_from else None
            maps, _ = refine_cams_with_aff(cam[i].to(dtype), attn_weights[:, i].to(dtype), cls_labels[i], size=crop,
                                           caa_thre=caa_thre, seg_attn=seg_attn, patch=patch, dtype=dtype)
            stacked = torch.stack(maps, dim=0).flatten(-2, -1).permute(1, 0).unsqueeze(0)  # [1,N,n]
            valid, lab = rar_refine(cls_labels[i], stacked, diff_attn_raw[i], mask_size=crop, iters=rar_iters,
                                    dtype=dtype)
            pseudo.append(lab)
            scores.append(valid)
        pseudo = torch.cat(pseudo, dim=0)  # [B,H,W]
        scores = torch.cat(scores, dim=0)  # [B,K,H,W]: what the labels are the argmax of

    segs = F.interpolate(outputs["seg"], size=pseudo.shape[1:], mode="bilinear", align_corners=False)
    l_seg = seg_loss(segs, pseudo.long(), ignore_index=IGNORE_INDEX)
    seg_pred = torch.argmax(segs.detach(), dim=1)
    dyn = F.interpolate(outputs["dynamic"], size=pseudo.shape[1:], mode="bilinear", align_corners=False)
    l_dyn = seg_loss(dyn, pseudo.long(), ignore_index=IGNORE_INDEX)

    grid = (crop[0] // patch, crop[1] // patch)
    source = seg_pred if n_iter >= aff_from_seg_iter else pseudo
    aff_label = cams_to_affinity_label(source, grid, radius=radius)
    l_aff = aff_loss(attn_pred, aff_label)

    loss = 1.0 * l_seg + w_aff * l_aff + w_dynamic * l_dyn
    return dict(seg_loss=l_seg, aff_loss=l_aff, dynamic_loss=l_dyn, loss=loss, pseudo=pseudo, scores=scores,
                aff_label=aff_label, seg_pred=seg_pred)
