"""The per-step training logic, independent of Ray and DeepSpeed (torchtitan-style ``Trainer``).

``DiCLIPTrainer`` owns the frozen CLIP, the KV cache, the trainable adapter + segmenter (inside
``DiCLIP``) and, in ``online`` mode, a diffusion pipeline. ``maps(batch)`` produces the VCE
correlation and the RAR transition for a batch - resampled from stored shards (``stored``) or
computed by a UNet pass on the crops (``online``, the reference behaviour). ``losses(batch, step)``
is one forward with pseudo-labels and the three losses. The Ray Train worker
(``ray_jobs/stages/train.py``) only adds DeepSpeed, data streaming, checkpoints and metrics around it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from diclip.config import JobSpec
from diclip.data import class_set_for
from diclip.method import metrics as metriclib
from diclip.method.pseudo import rar_transition_from_mean
from diclip.method.resample import Geometry
from diclip.models.clip import build_clip
from diclip.models.diclip_model import DiCLIP
from diclip.models.kv_cache import load_cache


@dataclass
class Batch:
    item_ids: list[str]
    images: torch.Tensor  # [B, 3, H, W] float in [0, 1]
    labels: torch.Tensor  # [B, K-1]
    geoms: list[Geometry]
    records: list | None = None  # CorrelationRecords (stored mode)
    positions: list[int] | None = None


def batch_from_rows(rows: dict, device: torch.device | str) -> Batch:
    """Collate a loaded Ray Data batch (see ``diclip.train.data.load_rows``)."""
    from diclip.train.data import geometry_from_array, records_from_batch

    images = torch.from_numpy(np.stack(list(rows["image"]))).permute(0, 3, 1, 2).float().div_(255).to(device)
    labels = torch.from_numpy(np.stack(list(rows["label"])).astype(np.float32)).to(device)
    geoms = [geometry_from_array(g) for g in rows["geom"]]
    records = records_from_batch(rows) if "corr_vce_ids" in rows else None
    return Batch([str(i) for i in rows["item_id"]], images, labels, geoms, records,
                 [int(p) for p in rows["pos"]])


class DiCLIPTrainer:
    def __init__(self, spec: JobSpec, device: torch.device | str = "cpu", with_diffusion: bool | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.class_set = class_set_for(spec.data)
        self.clip = build_clip(spec.model.clip, self.device)
        self.cache = load_cache(spec.train.cache, self.clip.embed_dim, list(self.class_set.classes))
        self.model = DiCLIP(self.clip, self.class_set, self.cache, spec.model, spec.method).to(self.device)
        self.patch = self.clip.patch_size
        crop = spec.data.crop_size
        self.clip_grid = (crop // self.patch, crop // self.patch)
        self.online = spec.train.mode == "online" if with_diffusion is None else with_diffusion
        self.diffusion = None
        if self.online:
            from diclip.models.attention_capture import DiffusionAttention
            from diclip.models.diffusion import build_diffusion_from_config

            pipe = build_diffusion_from_config(spec.model.diffusion, self.device)
            self.diffusion = DiffusionAttention(pipe, spec.model.diffusion, self.patch, mean=spec.model.clip.mean,
                                                std=spec.model.clip.std)

    # ------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Adapter and segmenter at ``lr * lr_mult`` (the reference trains both groups at 10x).

        Parameters of ``model.heads``, the module DeepSpeed wraps."""
        lr = self.spec.train.lr * self.spec.train.lr_mult
        return [
            {"params": [p for p in m.parameters() if p.requires_grad], "lr": lr, "name": name,
             "weight_decay": self.spec.train.weight_decay}
            for name, m in self.model.trainable_modules().items()
        ]

    @torch.no_grad()
    def maps(self, batch: Batch, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(VCE correlation [B, N, N], RAR transition [B, M, M], RAR grid) for the batch's crops."""
        if self.diffusion is not None:
            from diclip.models.diffusion_maps import noise_seed, rar_mean, vce_compact

            # Online noise differs per step (as in the reference) but is reproducible: seeded by position.
            seeds = [noise_seed(f"{i}:{p}", self.spec.model.diffusion.seed)
                     for i, p in zip(batch.item_ids, batch.positions or [0] * len(batch.item_ids))]
            cap = self.diffusion(batch.images, seeds)
            corr = vce_compact(cap, self.spec.method, self.spec.model.diffusion).expand().to(self.device)
            return corr, rar_transition_from_mean(rar_mean(cap)).to(self.device), cap.rar_grid
        from diclip.data.map_shards import batch_maps

        if batch.records is None:
            raise ValueError("stored mode needs correlation records in the batch")
        ratio = batch.records[0].rar_grid[0] // batch.records[0].grid[0]
        h, w = batch.images.shape[-2:]
        clip_grid = (h // self.patch, w // self.patch)
        rar_grid = (clip_grid[0] * ratio, clip_grid[1] * ratio)
        vce, rar = batch_maps(batch.records, batch.geoms, clip_grid, rar_grid)
        return vce.to(self.device), rar_transition_from_mean(rar.to(self.device)), rar_grid

    def use_adapter_cam(self, step: int) -> bool:
        return step >= self.spec.method.adapter_cam_from_iter

    def losses(self, batch: Batch, step: int, heads=None) -> dict[str, torch.Tensor]:
        """One training forward: maps -> CAMs -> pseudo-labels -> losses. ``heads`` may be the DeepSpeed
        engine wrapping ``model.heads`` (the trainable adapter + segmenter)."""
        corr, rar, rar_grid = self.maps(batch, step)
        out = self.model(batch.images, corr, use_adapter_cam=self.use_adapter_cam(step), heads=heads)
        _, pseudo = self.model.pseudo_labels(out, rar, batch.labels, tuple(batch.images.shape[-2:]),
                                             gate=step >= self.spec.method.seg_attn_from_iter, rar_grid=rar_grid)
        losses = self.model.losses(out, pseudo, step)
        losses["pseudo_fg"] = (pseudo > 0).float().mean().detach()
        return losses

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate_sample(self, image: np.ndarray, mask: np.ndarray, label: np.ndarray, record=None,
                        step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Confusion matrices (segmentation, CAM pseudo-labels) for one val image (see ``predict_sample``)."""
        k = self.class_set.num_classes
        seg, cam = self.predict_sample(image, mask.shape, label, record)
        return metriclib.confusion_matrix(mask, seg, k), metriclib.confusion_matrix(mask, cam, k)

    @torch.no_grad()
    def predict_sample(self, image: np.ndarray, size: tuple[int, int], label: np.ndarray,
                       record=None) -> tuple[np.ndarray, np.ndarray]:
        """(segmentation, CAM pseudo-label) class-id maps of one val image at ``size`` (h, w).

        As the reference's validation (``build_validation``): the image is resized bilinearly to
        crop x crop (aspect not kept), the model runs in eval mode with the adapter CAM and the
        segmenter's affinity gating CLIP's (at every step), CAA at ``train.val_caa_threshold`` (0.79)
        and ``train.val_rar_steps`` (5) RAR steps - constants there, for COCO too - and logits and
        CAMs are upsampled to the ground-truth size.
        """
        from diclip.data.transforms import resize_geometry
        from diclip.inference import resize_square

        crop = self.spec.data.crop_size
        x = resize_square(image, crop)[None].to(self.device)
        geom = resize_geometry(image.shape[:2], (crop, crop))
        batch = Batch(["val"], x, torch.from_numpy(label[None].astype(np.float32)).to(self.device), [geom],
                      [record] if record is not None else None, [0])
        corr, rar, rar_grid = self.maps(batch)
        was_training = self.model.training
        self.model.eval()
        out = self.model(batch.images, corr, use_adapter_cam=True)
        if was_training:
            self.model.train()
        h, w = size
        seg = F.interpolate(out.seg_logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1)[0]
        t = self.spec.train
        _, cam_label = self.model.pseudo_labels(out, rar, batch.labels, (h, w), gate=True, rar_grid=rar_grid,
                                                caa_threshold=t.val_caa_threshold, rar_steps=t.val_rar_steps)
        return seg.cpu().numpy(), cam_label[0].cpu().numpy()
