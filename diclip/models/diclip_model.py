"""``DiCLIP``: frozen CLIP with VCE + cache retrieval CAMs + trainable KV adapter and segmenter.

The diffusion correlation map is an *input* (``corr`` [B, N, N], the ACR-refined VCE map), so a stage
can pass maps read from the ``correlate`` shards or computed online by
:class:`~diclip.models.attention_capture.DiffusionAttention`; likewise the RAR transition for the
pseudo-labels. One forward gives everything a training step, validation or inference needs.

The trainable parts live in their own module, :class:`TrainableHeads` (``model.heads``), and only that
module goes through DeepSpeed: its precision (bf16/fp16) applies to the adapter and segmenter alone,
while the frozen CLIP keeps its own dtype (fp32, as the reference). The heads cast their inputs to
their parameter dtype and return fp32, so losses and pseudo-labels are computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diclip.config import MethodConfig, ModelConfig
from diclip.method import cam as camlib
from diclip.method import losses as losslib
from diclip.method import pseudo
from diclip.models.adapter import KVAdapter
from diclip.models.clip import ClipBundle, class_text_features
from diclip.models.kv_cache import KVCache
from diclip.models.segmenter import Segmenter
from diclip.models.vce import VCEVisionEncoder


@dataclass
class DiCLIPOutput:
    cam: torch.Tensor | None
    """[B, N, K-1] CAM used for pseudo-labels (retrieval or adapter fusion), detached."""
    surgery_cam: torch.Tensor | None
    clip_attn: torch.Tensor | None
    """[B, L, 1+N, 1+N] CLIP attention per layer (for CLIP affinity)."""
    seg_logits: torch.Tensor
    """[B, K, h, w] segmenter logits on the token grid."""
    adapter_logits: torch.Tensor | None
    """[B, K, h, w] KV-adapter logits (trainable branch)."""
    aff_pred: torch.Tensor | None
    """[B, N, N] segmenter-predicted affinity."""
    features: torch.Tensor
    """[B, 1+N, C] CAM-space features (detached)."""
    grid: tuple[int, int]


@dataclass
class HeadsOutput:
    seg_logits: torch.Tensor
    """[B, K, h, w] fp32."""
    fused: torch.Tensor
    """[B, E, h, w] fp32 fused features (for the predicted affinity)."""
    adapter_tokens: torch.Tensor | None
    """[B, N, K] fp32 KV-adapter logits per token (None when not asked for)."""


class TrainableHeads(nn.Module):
    """KV adapter + segmenter: the only parameters that train (and the only module DeepSpeed wraps)."""

    def __init__(self, adapter: KVAdapter, segmenter: Segmenter):
        super().__init__()
        self.adapter = adapter
        self.segmenter = segmenter

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, layer_tokens: torch.Tensor, grid: tuple[int, int],
                cam_features: torch.Tensor | None = None) -> HeadsOutput:
        """layer_tokens [L, B, N, W] (patch tokens), cam_features [B, N, C] (patch tokens) or None."""
        dt = self.dtype
        seg, fused = self.segmenter(layer_tokens.to(dt), grid)
        adapter = None if cam_features is None else self.adapter(cam_features.to(dt)).float()
        return HeadsOutput(seg.float(), fused.float(), adapter)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()


class DiCLIP(nn.Module):
    def __init__(self, clip: ClipBundle, class_set, cache: KVCache, model_cfg: ModelConfig, method_cfg: MethodConfig):
        super().__init__()
        self.method = method_cfg
        self.num_classes = class_set.num_classes
        cache.check(clip.embed_dim, list(class_set.classes))
        self.encoder = VCEVisionEncoder(clip.model.visual, model_cfg.clip.surgery_blocks, model_cfg.segmenter_features)
        self.register_buffer("class_text", class_text_features(clip, class_set, model_cfg.clip.prompt_template),
                             persistent=False)
        self.register_buffer("cache_keys", cache.keys.float(), persistent=False)
        self.register_buffer("cache_values", cache.values.float(), persistent=False)
        self.register_buffer("mean", torch.tensor(model_cfg.clip.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(model_cfg.clip.std).view(1, 3, 1, 1), persistent=False)
        self.heads = TrainableHeads(
            KVAdapter(cache.keys, cache.values, model_cfg.adapter_size, model_cfg.dropout),
            Segmenter(
                in_channels=clip.width,
                num_layers=clip.num_layers,
                num_classes=self.num_classes,
                embedding_dim=model_cfg.embedding_dim,
                layers=model_cfg.decoder_layers,
                heads=model_cfg.decoder_heads,
                dropout=model_cfg.dropout,
            ),
        )

    @property
    def adapter(self) -> KVAdapter:
        return self.heads.adapter

    @property
    def segmenter(self) -> Segmenter:
        return self.heads.segmenter

    # ------------------------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        """The only parameters that train; CLIP (and diffusion, held elsewhere) stay frozen."""
        return {"adapter": self.heads.adapter, "segmenter": self.heads.segmenter}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.heads.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, m in self.trainable_modules().items():
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            m.load_state_dict(sub)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    # ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, corr: torch.Tensor | None = None, *, use_adapter_cam: bool = False,
                seg_only: bool = False, heads: nn.Module | None = None) -> DiCLIPOutput:
        """images [B, 3, H, W] in [0, 1] (H, W multiples of 16); corr [B, N, N] or None (CLIP Surgery).

        ``heads``: what runs the trainable part (default ``self.heads``; training passes the DeepSpeed
        engine that wraps it)."""
        heads = self.heads if heads is None else heads
        if not self.method.vce:
            corr = None
        vis = self.encoder(self.normalize(images), corr, surgery=not seg_only)
        grid = vis.grid
        b = images.shape[0]
        # The reference normalises the features over the token axis (dim=1), not channels; kept.
        feats = vis.features.float()
        feats = feats / feats.norm(dim=1, keepdim=True)
        tokens = vis.layer_tokens[:, :, 1:]
        if seg_only:
            ho = heads(tokens, grid)
            return DiCLIPOutput(None, None, None, ho.seg_logits, None, None, feats.detach(), grid)
        ho = heads(tokens, grid, feats[:, 1:].detach())
        seg_logits, fused, adapter_tokens = ho.seg_logits, ho.fused, ho.adapter_tokens  # adapter: [B, N, K]
        k = self.num_classes
        surgery = camlib.surgery_cam(feats, self.class_text, k - 1)
        if use_adapter_cam:
            cam = camlib.adapter_cam(surgery, adapter_tokens.detach(), self.method.adapter_cam_weight)
        else:
            retrieval = camlib.knowledge_retrieval_cam(self.cache_keys, self.cache_values, feats, self.class_text, k)
            cam = camlib.fuse_cams(surgery, retrieval, self.method.retrieval_weight)
        adapter_logits = adapter_tokens.transpose(1, 2).reshape(b, k, grid[0], grid[1])
        return DiCLIPOutput(
            cam=cam.detach(),
            surgery_cam=surgery.detach(),
            clip_attn=vis.attn,
            seg_logits=seg_logits,
            adapter_logits=adapter_logits,
            aff_pred=losslib.segmenter_affinity(fused),
            features=feats.detach(),
            grid=grid,
        )

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_labels(self, out: DiCLIPOutput, rar_trans: torch.Tensor, labels: torch.Tensor,
                      out_size: tuple[int, int], *, gate: bool = False, rar_grid: tuple[int, int] | None = None,
                      rar_steps: int | None = None, caa_threshold: float | None = None):
        """(scores [B, K, H, W], label [B, H, W]) for CAMs of ``out``.

        ``gate``: the segmenter's predicted affinity gates CLIP's (training from ``seg_attn_from_iter``,
        and always in the reference's validation); off for the training-free CAM evaluation."""
        m = self.method
        return pseudo.pseudo_labels(
            out.cam, out.clip_attn, rar_trans, labels.float(), out_size,
            grid=out.grid, attn_grid=rar_grid,
            seg_attn=out.aff_pred.detach() if gate else None,
            caa_threshold=m.caa_threshold if caa_threshold is None else caa_threshold,
            caa_layers=m.caa_layers,
            rar_steps=m.rar_steps if rar_steps is None else rar_steps,
            label_threshold=m.label_threshold,
        )

    def losses(self, out: DiCLIPOutput, pseudo_label: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Segmenter, affinity and adapter losses and their weighted total (reference weights)."""
        m = self.method
        size = pseudo_label.shape[-2:]
        seg = F.interpolate(out.seg_logits, size=size, mode="bilinear", align_corners=False)
        seg_loss = losslib.balanced_seg_loss(seg, pseudo_label)
        adapter = F.interpolate(out.adapter_logits, size=size, mode="bilinear", align_corners=False)
        adapter_loss = losslib.balanced_seg_loss(adapter, pseudo_label)
        aff_source = seg.detach().argmax(1) if step >= m.aff_label_from_seg_iter else pseudo_label
        aff_label = losslib.affinity_labels(aff_source, out.grid, m.aff_radius)
        aff_loss = losslib.affinity_loss(out.aff_pred, aff_label)
        total = seg_loss + m.aff_loss_weight * aff_loss + m.adapter_loss_weight * adapter_loss
        return {"loss": total, "seg_loss": seg_loss.detach(), "aff_loss": aff_loss.detach(),
                "adapter_loss": adapter_loss.detach()}
