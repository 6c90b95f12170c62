"""Files shaped like the reference's releases, written from reading its model classes (random values).

Key names and shapes (zwyang6/DiCLIP model/model_diclip.py ``DiCLIP_model``; clip/clip_custom.py ``DiCLIP``,
``VisionTransformer``, ``Transformer``, ``ResidualAttentionBlock``, ``Attention``; ExCEL model/segformer_head.py
``SegFormerHead``/``MLP`` and model/decoder/TransDecoder.py ``DecoderTransformer``):

* ``encoder.visual``: conv1 (no bias), class/positional embedding, ln_pre, resblocks, ln_post, proj.
  ``reload_self_attn(layers=4)`` swaps the attention of the last 3 blocks for ``Attention`` (``qkv``,
  ``proj`` Linears) and leaves the last one it made (block -3) as ``visual.attn`` as well, so its four
  tensors appear twice. In ``train`` mode the positional table is resized for good to the crop's grid.
* ``encoder.*`` text tower: token/positional embedding, resblocks (``nn.MultiheadAttention``), ln_final,
  text_projection, logit_scale.
* ``decoder_fts_fuse``: ``linears_modulelist.i.proj``/``proj_2`` per CLIP layer, ``linear_fuse`` 1x1 conv.
* ``decoder``: ``transformer.resblocks.i`` (``attn`` packed in_proj + out_proj, ln_1, ``mlp.c_fc``/``c_proj``,
  ln_2), ``linear_pred`` 1x1 conv to the classes.
* ``dynamic_adapter``: fc1 [hidden, C], fc2 [K, hidden] (``v_prompt.t()``).

The reference hard-codes ViT-B/16 sizes; the builders take them as arguments so tests can use a tiny CLIP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VIT_B16 = dict(width=768, layers=12, patch=16, embed=512, text_width=512, text_layers=12, vocab=49408, context=77)


def _block(prefix: str, w: int, surgery: bool) -> dict[str, tuple[int, ...]]:
    if surgery:
        attn = {"attn.qkv.weight": (3 * w, w), "attn.qkv.bias": (3 * w,), "attn.proj.weight": (w, w),
                "attn.proj.bias": (w,)}
    else:
        attn = {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
                "attn.out_proj.bias": (w,)}
    rest = {"ln_1.weight": (w,), "ln_1.bias": (w,), "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,),
            "mlp.c_proj.weight": (w, 4 * w), "mlp.c_proj.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,)}
    return {prefix + k: v for k, v in {**attn, **rest}.items()}


def reference_shapes(*, width: int, layers: int, patch: int, embed: int, text_width: int, text_layers: int,
                     vocab: int, context: int, grid: int = 20, num_classes: int = 21, adapter: int = 312,
                     embedding: int = 256, decoder_layers: int = 3, surgery: int = 3) -> dict[str, tuple[int, ...]]:
    """Every key of ``DiCLIP_model.state_dict()`` with its shape."""
    v = "encoder.visual."
    s: dict[str, tuple[int, ...]] = {
        v + "class_embedding": (width,), v + "positional_embedding": (grid * grid + 1, width),
        v + "proj": (width, embed),
        v + "conv1.weight": (width, 3, patch, patch), v + "ln_pre.weight": (width,), v + "ln_pre.bias": (width,),
    }
    for i in range(layers):
        s.update(_block(f"{v}transformer.resblocks.{i}.", width, i >= layers - surgery))
    s.update({v + "ln_post.weight": (width,), v + "ln_post.bias": (width,)})
    s.update({v + k: shape for k, shape in _block("", width, True).items() if k.startswith("attn.")})  # visual.attn
    s.update({"encoder.positional_embedding": (context, text_width), "encoder.text_projection": (text_width, embed),
              "encoder.logit_scale": (), "encoder.token_embedding.weight": (vocab, text_width)})
    for i in range(text_layers):
        s.update(_block(f"encoder.transformer.resblocks.{i}.", text_width, False))
    s.update({"encoder.ln_final.weight": (text_width,), "encoder.ln_final.bias": (text_width,)})
    for i in range(layers):
        p = f"decoder_fts_fuse.linears_modulelist.{i}."
        s.update({p + "proj.weight": (embedding, width), p + "proj.bias": (embedding,),
                  p + "proj_2.weight": (embedding, embedding), p + "proj_2.bias": (embedding,)})
    s.update({"decoder_fts_fuse.linear_fuse.weight": (embedding, embedding * layers, 1, 1),
              "decoder_fts_fuse.linear_fuse.bias": (embedding,)})
    for i in range(decoder_layers):
        s.update(_block(f"decoder.transformer.resblocks.{i}.", embedding, False))
    s.update({"decoder.linear_pred.weight": (num_classes, embedding, 1, 1), "decoder.linear_pred.bias": (num_classes,)})
    s.update({"dynamic_adapter.fc1.weight": (adapter, embed), "dynamic_adapter.fc1.bias": (adapter,),
              "dynamic_adapter.fc2.weight": (num_classes, adapter), "dynamic_adapter.fc2.bias": (num_classes,)})
    return s


def meta_checkpoint(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Shape-only tensors: a full-size checkpoint without its 600 MB."""
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


OPENCLIP_NAMES = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                  "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias"}


def train_mode_positional(table: torch.Tensor, grid: int) -> torch.Tensor:
    """``reload_self_attn(mode='train')``: the patch rows bilinearly resized to grid x grid for good."""
    side = int(round((table.shape[0] - 1) ** 0.5))
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, (grid, grid), mode="bilinear").reshape(1, -1, grid * grid).transpose(1, 2)
    return torch.cat([table[:1], patches[0]], 0)


def reference_checkpoint(clip_model, shapes: dict[str, tuple[int, ...]], grid: int, surgery: int = 3,
                         seed: int = 0, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A checkpoint whose ``encoder`` is ``clip_model`` (an open_clip CLIP: OpenAI names) as the reference
    saves it after training, with random adapter/segmenter weights."""
    g = torch.Generator().manual_seed(seed)
    visual, full = clip_model.visual.state_dict(), clip_model.state_dict()
    layers = len(clip_model.visual.transformer.resblocks)
    out = {}
    for name, shape in shapes.items():
        if name.startswith("encoder.visual."):
            k = name[len("encoder.visual."):]
            if k.startswith("attn."):  # visual.attn: the surgery Attention of block -surgery
                k = f"transformer.resblocks.{layers - surgery}.{k}"
            for ref, ours in OPENCLIP_NAMES.items():  # the surgery copies of in_proj / out_proj
                if k.endswith("." + ref):
                    k = k[:-len(ref)] + ours
            if k == "positional_embedding":
                t = train_mode_positional(visual[k], grid)
            else:
                t = visual[k].clone()
        elif name.startswith("encoder."):
            t = full[name[len("encoder."):]].clone()
        elif name.endswith(("ln_1.weight", "ln_2.weight")):
            t = 1 + scale * torch.randn(shape, generator=g)
        else:
            t = scale * torch.randn(shape, generator=g)
        assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
        out[name] = t
    return out


def reference_cache(embed: int, num_classes: int, per_class: int = 2, background: int = 3, seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """``[keys, values]`` as generate_kv_cache.py saves it (background centroids first, float64 centers)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0] * background + [c for c in range(1, num_classes) for _ in range(per_class)])
    keys = torch.randn(len(ids), embed, generator=g, dtype=torch.float64) * 0.05
    return [keys.to(dtype), F.one_hot(ids, num_classes).float()]
