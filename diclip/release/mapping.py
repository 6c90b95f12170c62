"""Key names of the reference's ``DiCLIP_model.state_dict()`` -> the project's, with shape checks.

Reference (model/model_diclip.py; ExCEL's segformer_head.py and decoder/TransDecoder.py, which it
imports) -> project (``DiCLIP.trainable_state_dict()`` and open_clip's visual tower):

* ``dynamic_adapter.fc{1,2}.*`` -> ``adapter.fc{1,2}.*`` (same layout: fc2.weight is [K, hidden], the
  one-hot values transposed, in both);
* ``decoder_fts_fuse.linears_modulelist.i.proj{,_2}.*`` -> ``segmenter.fusion.mlps.i.proj{,_2}.*``,
  ``decoder_fts_fuse.linear_fuse.*`` -> ``segmenter.fusion.fuse.*``;
* ``decoder.transformer.resblocks.i.{ln_1,attn,ln_2}.*`` -> ``segmenter.decoder.blocks.i.*`` with
  ``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.0``/``mlp.2``; ``decoder.linear_pred.*`` -> ``segmenter.decoder.head.*``;
* ``encoder.visual.*`` -> open_clip ``visual.*`` (OpenAI names); the surgery blocks' ``attn.qkv``/``attn.proj``
  (copies of ``in_proj``/``out_proj`` made by ``reload_self_attn``) map back to ``attn.in_proj_*``/
  ``attn.out_proj.*``, and ``encoder.visual.attn.*`` (the same module under a second name) is an alias.

Not carried: the text tower (other ``encoder.*``: class prompts are encoded by ``model.clip``), the
resized positional embedding (the reference's own inference drops it too and resizes CLIP's table per
input) and diffusion weights (``diff_attn_extractor.*``). CLIP is not copied into an export; it is the
frozen ``model.clip`` of the spec, which :mod:`diclip.release.importer` compares with ``encoder.visual.*``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from diclip.config import JobSpec
from diclip.errors import ModelError

HEAD_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"dynamic_adapter\.(fc[12]\.(?:weight|bias))", r"adapter.\1"),
    (r"decoder_fts_fuse\.linears_modulelist\.(\d+)\.(proj|proj_2)\.(weight|bias)", r"segmenter.fusion.mlps.\1.\2.\3"),
    (r"decoder_fts_fuse\.linear_fuse\.(weight|bias)", r"segmenter.fusion.fuse.\1"),
    (r"decoder\.transformer\.resblocks\.(\d+)\.(ln_1|ln_2)\.(weight|bias)", r"segmenter.decoder.blocks.\1.\2.\3"),
    (r"decoder\.transformer\.resblocks\.(\d+)\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     r"segmenter.decoder.blocks.\1.attn.\2"),
    (r"decoder\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"segmenter.decoder.blocks.\1.mlp.0.\2"),
    (r"decoder\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"segmenter.decoder.blocks.\1.mlp.2.\2"),
    (r"decoder\.linear_pred\.(weight|bias)", r"segmenter.decoder.head.\1"),
))
VISUAL = "encoder.visual."
SURGERY = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)")
SURGERY_NAMES = {("qkv", "weight"): "in_proj_weight", ("qkv", "bias"): "in_proj_bias",
                 ("proj", "weight"): "out_proj.weight", ("proj", "bias"): "out_proj.bias"}
SKIPPED = {"text": "text-tower tensors (encoder.*; model.clip encodes the class prompts)",
           "position": "resized positional embedding (encoder.visual.positional_embedding; the reference's "
                       "inference drops it too and resizes CLIP's own table per input)",
           "alias": "alias tensors (encoder.visual.attn.*, a second name of a surgery block's attention)",
           "diffusion": "diffusion tensors (diff_attn_extractor.*; not part of a segmentation export)"}
LISTED = 20
"""Missing or unmapped keys named one per line, at most this many (then a count)."""


@dataclass
class SortedKeys:
    """A reference state dict sorted by what the import does with each tensor."""

    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    """Project names (``adapter.*``, ``segmenter.*``) -> tensor."""
    visual: dict[str, torch.Tensor] = field(default_factory=dict)
    """open_clip ``visual`` names -> tensor (compared with ``model.clip``, not exported)."""
    source: dict[str, str] = field(default_factory=dict)
    """Project or visual name -> the reference key it came from (for messages)."""
    surgery: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


def sort_keys(state: dict[str, torch.Tensor]) -> SortedKeys:
    out = SortedKeys()
    surgery: set[int] = set()
    for key, t in state.items():
        if key.startswith("diff_attn_extractor."):
            out.skipped["diffusion"] = out.skipped.get("diffusion", 0) + 1
        elif key.startswith(VISUAL):
            name = key[len(VISUAL):]
            if name == "positional_embedding":
                out.skipped["position"] = out.skipped.get("position", 0) + 1
                continue
            if name.startswith("attn."):
                out.skipped["alias"] = out.skipped.get("alias", 0) + 1
                continue
            m = SURGERY.fullmatch(name)
            if m:
                surgery.add(int(m.group(1)))
                name = f"transformer.resblocks.{m.group(1)}.attn.{SURGERY_NAMES[m.group(2), m.group(3)]}"
            out.visual[name] = t
            out.source[f"visual.{name}"] = key
        elif key.startswith("encoder."):
            out.skipped["text"] = out.skipped.get("text", 0) + 1
        else:
            for pattern, repl in HEAD_RULES:
                if pattern.fullmatch(key):
                    name = pattern.sub(repl, key)
                    out.heads[name] = t
                    out.source[name] = key
                    break
            else:
                out.unmapped.append(key)
    out.surgery = sorted(surgery)
    return out


def list_lines(kind: str, names: list[str], shapes: dict[str, torch.Size], note: Callable[[str], None]) -> None:
    for n in names[:LISTED]:
        note(f"{kind}: {n} {list(shapes[n]) if n in shapes else ''}".rstrip())
    if len(names) > LISTED:
        note(f"{kind}: ... and {len(names) - LISTED} more")


def _indices(names, pattern: str) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.fullmatch(pattern, n))}


def check_heads(keys: SortedKeys, target: dict[str, torch.Size], spec: JobSpec, num_classes: int,
                clip: "ClipShape", note: Callable[[str], None]) -> None:
    """The checkpoint's adapter + segmenter against the heads the spec builds; the first problem is one
    line naming the setting that disagrees."""
    h, m = keys.heads, spec.model
    pred = h.get("segmenter.decoder.head.weight", h.get("adapter.fc2.weight"))
    if pred is not None and pred.shape[0] != num_classes:
        raise ModelError(f"the checkpoint predicts {pred.shape[0]} classes but the spec's class list has "
                         f"{num_classes}; import it with the spec of the dataset it was trained on "
                         f"(configs/voc.yaml: 21, configs/coco.yaml: 81)")
    w1 = h.get("adapter.fc1.weight")
    if w1 is not None and w1.dim() == 2 and w1.shape[0] != m.adapter_size:
        raise ModelError(f"the checkpoint's KV adapter has {w1.shape[0]} hidden units but model.adapter_size="
                         f"{m.adapter_size}; set model.adapter_size={w1.shape[0]}")
    if w1 is not None and w1.dim() == 2 and w1.shape[1] != clip.embed_dim:
        raise ModelError(f"the checkpoint's KV adapter reads {w1.shape[1]}-dim features but model.clip "
                         f"{clip.name} embeds to {clip.embed_dim}; use the CLIP it was trained with")
    p0 = h.get("segmenter.fusion.mlps.0.proj.weight")
    if p0 is not None and p0.dim() == 2 and p0.shape[0] != m.embedding_dim:
        raise ModelError(f"the checkpoint's segmenter is {p0.shape[0]} wide but model.embedding_dim="
                         f"{m.embedding_dim}; set model.embedding_dim={p0.shape[0]}")
    fused = _indices(h, r"segmenter\.fusion\.mlps\.(\d+)\..*")
    if fused and (len(fused) != clip.layers or (p0 is not None and p0.dim() == 2 and p0.shape[1] != clip.width)):
        width = p0.shape[1] if p0 is not None and p0.dim() == 2 else "?"
        raise ModelError(f"the checkpoint's segmenter fuses {len(fused)} CLIP layers of width {width} but model.clip "
                         f"{clip.name} has {clip.layers} of width {clip.width}; use the CLIP it was trained with")
    blocks = _indices(h, r"segmenter\.decoder\.blocks\.(\d+)\..*")
    if blocks and len(blocks) != m.decoder_layers:
        raise ModelError(f"the checkpoint's decoder has {len(blocks)} transformer layers but model.decoder_layers="
                         f"{m.decoder_layers}; set model.decoder_layers={len(blocks)}")
    missing = [k for k in target if k not in h]
    extra = [keys.source[k] for k in h if k not in target]
    if extra:
        list_lines("unmapped", extra, {}, note)
        keys.unmapped += extra
    if missing:
        list_lines("missing", missing, target, note)
        raise ModelError(f"the checkpoint lacks {len(missing)} adapter/segmenter tensors the model needs "
                         f"(e.g. {missing[0]}); is it a DiCLIP_model.state_dict()?")
    for k, want in target.items():
        if tuple(h[k].shape) != tuple(want):
            raise ModelError(f"{keys.source[k]} has shape {list(h[k].shape)} but the model built from the spec needs "
                             f"{list(want)} (as {k})")
        if not h[k].is_floating_point():
            raise ModelError(f"{keys.source[k]} is {h[k].dtype}, not a floating-point weight")
        if not h[k].is_meta and not bool(torch.isfinite(h[k]).all()):  # meta: a shapes-only check
            raise ModelError(f"{keys.source[k]} holds non-finite values (NaN/inf): the checkpoint is damaged; "
                             "download it again")


@dataclass
class ClipShape:
    """Sizes of the spec's CLIP, read from a weightless (meta) build."""

    name: str
    width: int
    layers: int
    embed_dim: int
    visual: dict[str, torch.Size]
    quick_gelu: bool


def clip_shape(spec: JobSpec) -> ClipShape:
    """The spec's open_clip model built on the meta device: names and shapes, no weights, no download."""
    import open_clip

    from diclip.models.clip import _quiet, register_bundled_configs, resolve_quick_gelu

    cfg = spec.model.clip
    register_bundled_configs()
    if cfg.name not in open_clip.list_models():
        raise ModelError(f"unknown CLIP model {cfg.name!r}; the reference used ViT-B-16 (model.clip.name)")
    quick_gelu = resolve_quick_gelu(cfg)
    with torch.device("meta"), _quiet("root"):
        model = open_clip.create_model(cfg.name, pretrained=None, device="meta", force_quick_gelu=quick_gelu)
    v = model.visual
    return ClipShape(cfg.name, int(v.transformer.width), len(v.transformer.resblocks), int(v.output_dim),
                     {f"visual.{k}": t.shape for k, t in v.state_dict().items()}, quick_gelu)


def check_visual(keys: SortedKeys, clip: ClipShape, surgery_blocks: int, note: Callable[[str], None]) -> None:
    """Names and shapes of ``encoder.visual.*`` against the spec's CLIP (values: the importer)."""
    if not keys.visual:
        note("no encoder.visual tensors in the checkpoint: its CLIP cannot be compared with model.clip")
        return
    want = list(range(clip.layers - surgery_blocks, clip.layers))
    if keys.surgery and keys.surgery != want:
        raise ModelError(f"the checkpoint has surgery attention in CLIP blocks {keys.surgery} but "
                         f"model.clip.surgery_blocks={surgery_blocks} puts it in {want}; set "
                         f"model.clip.surgery_blocks={len(keys.surgery)}")
    extra = [keys.source[f"visual.{k}"] for k in keys.visual if f"visual.{k}" not in clip.visual]
    if extra:
        list_lines("unmapped", extra, {}, note)
        keys.unmapped += extra
    for k, t in keys.visual.items():
        shape = clip.visual.get(f"visual.{k}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ModelError(f"{keys.source[f'visual.{k}']} has shape {list(t.shape)} but model.clip {clip.name} has "
                             f"{list(shape)}; import with the CLIP the checkpoint was trained with (model.clip.name)")
    missing = [k for k in clip.visual if k != "visual.positional_embedding" and k[len("visual."):] not in keys.visual]
    if missing:
        list_lines("missing (not compared)", [f"encoder.{k}" for k in missing], {}, note)


def head_shapes(spec: JobSpec, num_classes: int, clip: ClipShape, entries: int) -> dict[str, torch.Size]:
    """Names and shapes of ``DiCLIP.trainable_state_dict()`` for this spec, built on the meta device."""
    from diclip.models.adapter import KVAdapter
    from diclip.models.diclip_model import TrainableHeads
    from diclip.models.segmenter import Segmenter

    m = spec.model
    with torch.device("meta"):
        heads = TrainableHeads(
            KVAdapter(torch.zeros(entries, clip.embed_dim), torch.zeros(entries, num_classes), m.adapter_size,
                      m.dropout),
            Segmenter(clip.width, clip.layers, num_classes, m.embedding_dim, m.decoder_layers, m.decoder_heads,
                      m.dropout))
    return {k: t.shape for k, t in heads.trainable_state_dict().items()}
