"""The project against the independent reference oracle (tests/oracle), on tiny models, within 1e-5.

Covers the CLIP surgery + VCE encoder including the segmenter's (aliased) features, the diffusion map
post-processing with ACR, the CAMs (surgery, cache retrieval, adapter), the segmenter wiring and its
predicted affinity, the CAA + RAR pseudo-labels, and one training step's losses - with maps given
(what ``stored`` mode feeds) and with the diffusion pass run in the step (``train.mode=online``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diclip.config import ClipConfig, MethodConfig
from diclip.data import get_class_set
from diclip.data.synthetic import render_sample
from diclip.method import acr, pseudo
from diclip.models.clip import build_clip
from diclip.models.diclip_model import DiCLIP
from diclip.models.vce import VCEVisionEncoder
from tests.helpers import random_cache, tiny_model_config
from tests.oracle import reference as oracle

CLASSES = get_class_set("synthetic")
K = CLASSES.num_classes
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = tiny_model_config()
    cfg.clip = ClipConfig(name="diclip-tiny", pretrained="", quick_gelu=True)  # OpenAI weights' activation
    clip = build_clip(cfg.clip)
    cache = random_cache(clip.embed_dim, list(CLASSES.classes), per_class=3, background=4)
    return cfg, clip, cache


@pytest.fixture(scope="module")
def model(parts):
    cfg, clip, cache = parts
    torch.manual_seed(1)
    return DiCLIP(clip, CLASSES, cache, cfg, MethodConfig()).eval()


def pixels(b: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [B, H, W, 3] crops, as decoded."""
    rng = np.random.default_rng(seed)
    return np.stack([render_sample(rng, size, size, K - 1, 3)[0] for _ in range(b)])


def images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """The project's input: [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(pixels(b, size, seed)).permute(0, 3, 1, 2).float() / 255


def reference_crop(b: int, size: int, seed: int = 0) -> torch.Tensor:
    """The reference's input: the same crops normalised by its data loader ([B, 3, H, W] float32)."""
    from tests.oracle import diffusion as oracle_diffusion

    return torch.from_numpy(oracle_diffusion.normalize_img(pixels(b, size, seed))).permute(0, 3, 1, 2)


def labels_for(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lab = (torch.rand(b, K - 1, generator=g) > 0.5).float()
    lab[lab.sum(1) == 0, 0] = 1.0  # the reference cannot handle an image without classes
    return lab


def qk_maps(b: int, heads: int, side: int, seed: int = 0) -> torch.Tensor:
    """Blob-structured per-head q k^T maps like real diffusion attention (positive, clustered)."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    q = torch.randn(b, heads, 6, side // 3 + 1, side // 3 + 1, generator=g)
    q = F.interpolate(q.flatten(0, 1), size=(side, side), mode="bilinear").reshape(b, heads, 6, n)
    k = q + 0.3 * torch.randn(b, heads, 6, n, generator=g)
    return (q.transpose(-1, -2) @ k).exp() / 10


def softmax_maps(b: int, heads: int, side: int, seed: int = 0) -> torch.Tensor:
    """Local, content-dependent softmax attention like a diffusion UNet's high-resolution layer (peaked
    around each token and along image structure), so the random walk stays well conditioned."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], -1).float()
    dist2 = torch.cdist(pos, pos) ** 2  # [n, n]
    f = torch.randn(b, heads, 4, side // 4 + 1, side // 4 + 1, generator=g)
    f = F.interpolate(f.flatten(0, 1), size=(side, side), mode="bilinear").reshape(b, heads, 4, n).transpose(-1, -2)
    logits = -dist2 / (2 * 2.0 ** 2) - 2 * torch.cdist(f, f) ** 2
    return logits.softmax(-1)


def oracle_text(clip) -> torch.Tensor:
    names = list(CLASSES.prompt_names) + list(CLASSES.background_words)
    with torch.no_grad():
        return oracle.encode_text(clip.model, clip.tokenizer, names, "a clean origami {}.")


def oracle_heads(model: DiCLIP):
    """The trainable modules as the oracle's callables (their internals are the WeCLIP head's)."""
    seg = model.segmenter

    def fuse(tokens):  # [L, B, W, h, w] -> [B, E, h, w]
        return seg.fusion(tokens.flatten(3).transpose(2, 3), tuple(tokens.shape[-2:]))

    return fuse, seg.decoder


# ----------------------------------------------------------------------------------------------
def truncation_probe() -> torch.Tensor:
    """[1, 3, 16, 24] images in [0, 1] (the VAE preprocess wants multiples of 8): every whole pixel value
    0..255 in each channel, values where truncation, rounding and exact floats part - just below a whole
    value (254.97), between two (0.5, 1.5, 127.5), negative after de-normalisation, above 255 (an
    interpolation overshoot) - and seeded fractional values (a bilinear resize's)."""
    whole = torch.arange(256, dtype=torch.float32) / 255
    edge = torch.tensor([0.9999 * 255, 0.5, 1.5, 127.5, 200.9999, -0.4, -0.9, 255.4, 255.9, 3.0, 7.0, 9.0, 11.0,
                         13.0, 17.0, 19.0], dtype=torch.float32) / 255
    frac = torch.rand(384 - 256 - 16, generator=torch.Generator().manual_seed(0)) * 256.5 - 0.5
    x = torch.cat([whole, edge, frac / 255]).view(16, 24)
    return torch.stack([x, x.flip(-1), x.roll(5, -1)])[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diffusion_input_is_the_references(dtype):
    """The VAE input, compared bit for bit with the reference's path restated from the normalised crop (uint8
    de-normalisation, /255, fp16, diffusers' own ``preprocess``, model dtype) - and the probe separates it from
    exact ``2x - 1`` floats, from rounding instead of truncating, and from skipping the fp16 step."""
    from diffusers.image_processor import VaeImageProcessor

    from diclip.method.diffusion_input import diffusion_input
    from tests.oracle import diffusion as oracle_diffusion

    x = truncation_probe()
    normalised = torch.from_numpy(oracle_diffusion.normalize_img((x * 255).permute(0, 2, 3, 1).numpy()))
    want = oracle_diffusion.vae_input(VaeImageProcessor(vae_scale_factor=8), normalised.permute(0, 3, 1, 2), dtype)
    got = diffusion_input(x, dtype)
    assert got.dtype == dtype and torch.equal(got, want)

    restored = oracle_diffusion.denormalize_img(normalised.permute(0, 3, 1, 2)).float()
    pix = x * 255
    whole = pix == pix.round()
    assert (restored[whole] != pix[whole]).any(), "no whole pixel value is truncated by the round trip"
    variants = {"exact floats": x * 2 - 1,
                "rounding": (pix.round().clamp(0, 255) / 255).half() * 2 - 1}
    if dtype == torch.float32:
        variants["no fp16 step"] = restored / 255 * 2 - 1
    for name, other in variants.items():
        assert not torch.equal(other.to(dtype), want), f"the probe cannot tell {name} from the reference's input"


def test_diffusion_input_scalar_division_is_device_independent():
    """The reference divides the uint8 image by 255.0 on the GPU, where torch multiplies by the reciprocal;
    after ``.half()`` that equals true division (the project's) for every pixel value."""
    u = torch.arange(256, dtype=torch.float32)
    reciprocal = u * torch.tensor(1 / 255, dtype=torch.float32)
    assert torch.equal((u / 255.0).half(), reciprocal.half())


@pytest.mark.parametrize("features,aliasing", [("reference", True), ("clean", False)])
def test_encoder_matches_oracle(parts, features, aliasing):
    _, clip, _ = parts
    x = torch.randn(2, 3, 160, 160)
    corr = acr.refine_correlation(qk_maps(2, 3, 10), size=10)
    enc = VCEVisionEncoder(clip.model.visual, 3, features)
    for c in (corr, None):
        got = enc(x, c)
        feats, weights, all_feats = oracle.encode_image(clip.model.visual, x, None if c is None else c[:, None],
                                                        aliasing=aliasing)
        torch.testing.assert_close(got.features / got.features.norm(dim=1, keepdim=True), feats, **TOL)
        torch.testing.assert_close(got.attn, weights.transpose(0, 1), **TOL)
        torch.testing.assert_close(got.layer_tokens, all_feats, **TOL)


def test_diffusion_map_refinement_matches_oracle():
    qk = qk_maps(3, 3, 20, seed=4)
    got = acr.refine_correlation(qk, size=20)
    want = oracle.refine_diffusion_attention(qk, 20)[:, 0]
    torch.testing.assert_close(got, want, **TOL)


def test_text_features_match_oracle(parts, model):
    _, clip, _ = parts
    torch.testing.assert_close(model.class_text, oracle_text(clip), **TOL)


@pytest.mark.parametrize("use_adapter_cam", [False, True])
def test_model_forward_matches_oracle(parts, model, use_adapter_cam):
    _, clip, cache = parts
    x = images(2, 160, seed=1)
    corr = acr.refine_correlation(qk_maps(2, 3, 10, seed=2), size=10)
    out = model(x, corr, use_adapter_cam=use_adapter_cam)
    fuse, decode = oracle_heads(model)
    with torch.no_grad():
        want = oracle.model_forward(clip.model.visual, oracle_text(clip), cache.keys, cache.values, model.adapter,
                                    fuse, decode, model.normalize(x), corr[:, None], num_classes=K,
                                    return_dynamic=use_adapter_cam)
    torch.testing.assert_close(out.cam, want["cam"], **TOL)
    torch.testing.assert_close(out.seg_logits, want["seg"], **TOL)
    torch.testing.assert_close(out.aff_pred, want["attn_pred"], **TOL)
    torch.testing.assert_close(out.adapter_logits, want["dynamic"], **TOL)
    torch.testing.assert_close(out.clip_attn, want["attn_weights"].transpose(0, 1), **TOL)
    seg = model(x, seg_only=True).seg_logits  # segmentation-only inference: the reference's eval_seg
    with torch.no_grad():
        want_seg = oracle.model_forward(clip.model.visual, oracle_text(clip), cache.keys, cache.values, model.adapter,
                                        fuse, decode, model.normalize(x), None, num_classes=K,
                                        return_dynamic=False, eval_seg=True)["seg"]
    torch.testing.assert_close(seg, want_seg, **TOL)


def as64(out):
    return dataclasses.replace(out, cam=out.cam.double(), clip_attn=out.clip_attn.double(),
                               aff_pred=out.aff_pred.double())


def assert_labels_agree_beyond_ties(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor,
                                    want_scores: torch.Tensor) -> None:
    """fp32 label maps (argmax over the class axis of ``scores`` / ``want_scores``): identical wherever a
    difference in scores cannot flip them.

    The RAR walk's min-subtract/sum-normalise steps amplify fp32 rounding (a summation-order difference
    of 1e-7 becomes ~1e-3 in the scores, and which order depends on the kernels torch picks on this
    CPU), so pixels at near-ties may flip. With d the largest score difference, a pixel whose top-two
    margin in ``want_scores`` exceeds 2 d has the same argmax in both - a bound, not a tuned tolerance.
    The logic itself is compared exactly in float64."""
    d = (scores.double() - want_scores.double()).abs().max()
    top = want_scores.double().topk(2, dim=0).values
    sure = (top[0] - top[1]) > 2 * d
    assert sure.float().mean() > 0.25, f"vacuous: scores differ by {d:.2e}"
    assert torch.equal(got[sure], want[sure]), f"{(got[sure] != want[sure]).sum()} confident pixels differ"


def assert_fp32_error_like_the_oracles(got: torch.Tensor, oracle32: torch.Tensor, oracle64: torch.Tensor,
                                       factor: float = 4.0) -> None:
    """``got`` (fp32) is as close to the float64 truth as the reference's own fp32 computation is.

    The tolerance comes from the computation's conditioning on these inputs (the oracle's fp32-vs-fp64
    error), not from one CPU: with AVX-512, AVX2 or default kernels both errors move together
    (measured 2e-4..4e-3 each; the project's was at most 1.4x the oracle's)."""
    noise = (oracle32.double() - oracle64).abs().max().item()
    err = (got.double() - oracle64).abs().max().item()
    assert noise < 0.05, f"the oracle's own fp32 error {noise:.2e} is too large to compare against"
    assert err <= factor * noise + 1e-6, f"fp32 error {err:.2e} > {factor} x the oracle's own {noise:.2e}"


@pytest.mark.parametrize("gate", [False, True])
def test_pseudo_labels_match_oracle(model, gate):
    x = images(3, 160, seed=3)
    lab = labels_for(3, seed=3)
    corr = acr.refine_correlation(qk_maps(3, 3, 10, seed=5), size=10)
    raw = softmax_maps(3, 3, 20, seed=6)  # the RAR layer's softmax maps, all heads
    out = model(x, corr)
    kw = dict(gate=gate, rar_grid=(20, 20), caa_threshold=0.6)
    scores, got = model.pseudo_labels(out, pseudo.rar_transition(raw, (1, 2)), lab, (160, 160), **kw)
    scores64, got64 = model.pseudo_labels(as64(out), pseudo.rar_transition(raw.double(), (1, 2)), lab.double(),
                                          (160, 160), **kw)
    want32, want64 = [], []
    for i in range(3):
        for dtype in (torch.float64, torch.float32):
            o = as64(out) if dtype == torch.float64 else out
            seg_attn = o.aff_pred[i][None] if gate else None
            maps, _ = oracle.refine_cams_with_aff(o.cam[i], o.clip_attn[i], lab[i], (160, 160), 0.6,
                                                  seg_attn=seg_attn, dtype=dtype)
            stacked = torch.stack(maps).flatten(-2).T[None]
            valid, want = oracle.rar_refine(lab[i], stacked, raw[i], (160, 160), iters=5, dtype=dtype)
            if dtype == torch.float64:  # the logic, exactly
                assert torch.equal(got64[i], want[0])
                torch.testing.assert_close(scores64[i], valid[0], rtol=1e-9, atol=1e-9)
                want64.append(valid[0])
            else:  # what runs in production: fp32
                assert_labels_agree_beyond_ties(got[i], want[0], scores[i], valid[0])
                want32.append(valid[0])
    assert_fp32_error_like_the_oracles(scores, torch.stack(want32), torch.stack(want64))


LOSSES = (("seg_loss", "seg_loss"), ("aff_loss", "aff_loss"), ("adapter_loss", "dynamic_loss"), ("loss", "loss"))


@pytest.mark.parametrize("step", [0, 5000])
def test_training_step_losses_match_oracle(parts, model, step):
    """Stored-mode shape of a step: maps given, one forward, pseudo-labels, the three losses."""
    _, clip, cache = parts
    x = images(2, 160, seed=7)
    lab = labels_for(2, seed=7)
    corr = acr.refine_correlation(qk_maps(2, 3, 10, seed=8), size=10)
    raw = softmax_maps(2, 3, 20, seed=9)
    m = model.method
    gate = step >= m.seg_attn_from_iter
    out = model(x, corr, use_adapter_cam=True)
    _, pl = model.pseudo_labels(out, pseudo.rar_transition(raw, (1, 2)), lab, (160, 160), gate=gate,
                                rar_grid=(20, 20))
    _, pl64 = model.pseudo_labels(as64(out), pseudo.rar_transition(raw.double(), (1, 2)), lab.double(), (160, 160),
                                  gate=gate, rar_grid=(20, 20))
    got = model.losses(out, pl, step)
    fuse, decode = oracle_heads(model)
    kw = dict(caa_thre=m.caa_threshold, rar_iters=m.rar_steps, seg_attn_from=m.seg_attn_from_iter,
              aff_from_seg_iter=m.aff_label_from_seg_iter)
    with torch.no_grad():
        outs = oracle.model_forward(clip.model.visual, oracle_text(clip), cache.keys, cache.values, model.adapter,
                                    fuse, decode, model.normalize(x), corr[:, None], num_classes=K,
                                    return_dynamic=True)
        labels64 = oracle.training_step(outs, raw, lab, (160, 160), step, dtype=torch.float64, **kw)["pseudo"]
        want = oracle.training_step(outs, raw, lab, (160, 160), step, pseudo=pl, **kw)
    assert torch.equal(pl64, labels64)  # pseudo-label logic, exactly
    for mine, theirs in LOSSES:  # loss wiring on the labels the project trains with
        torch.testing.assert_close(got[mine].detach(), want[theirs], **TOL)


def test_online_training_step_matches_oracle(tmp_path, parts):
    """``train.mode=online``: the trainer runs the diffusion pass on the crop in the step; the oracle
    restates the reference's pass from the normalised crop (uint8 de-normalisation, fp16 preprocess, VAE, the
    checkpoint's scheduler at index 45 of 50, empty prompt, attention processor) with the same noise: same
    maps, same losses."""
    from diclip.models.diffusion_maps import noise_seed
    from diclip.models.kv_cache import save_cache
    from diclip.train.trainer import Batch, DiCLIPTrainer
    from tests.helpers import tiny_spec
    from tests.oracle import diffusion as oracle_diffusion

    _, clip, cache = parts
    save_cache(str(tmp_path / "cache"), cache)
    spec = tiny_spec(str(tmp_path / "run"), "train.mode=online", f"train.cache={tmp_path / 'cache'}",
                     "model.clip.quick_gelu=true", "data.crop_size=160")
    trainer = DiCLIPTrainer(spec, "cpu")
    trainer.model.eval()  # the oracle's adapter has no dropout
    x = images(2, 160, seed=11)
    lab = labels_for(2, seed=11)
    batch = Batch(["a", "b"], x, lab, [None, None], None, [3, 4])
    step = 20
    m = spec.method
    assert step >= m.seg_attn_from_iter  # the gated branch is the one exercised (demo: from iteration 10)
    got = trainer.losses(batch, step)
    corr, rar, rar_grid = trainer.maps(batch, step)  # what that step used (same seeded noise)
    out = trainer.model(x, corr, use_adapter_cam=trainer.use_adapter_cam(step))
    scores, pl = trainer.model.pseudo_labels(out, rar, lab, (160, 160), gate=True, rar_grid=rar_grid)

    d = spec.model.diffusion
    pipe = trainer.diffusion.pipe
    seeds = [noise_seed(f"{i}:{p}", d.seed) for i, p in zip(batch.item_ids, batch.positions)]
    noise = trainer.diffusion.noise((2, 4, 20, 20), seeds)  # the project's seeded noise is an input here
    store = oracle_diffusion.capture(pipe, reference_crop(2, 160, seed=11), noise, [d.vce_layer, d.rar_layer])
    raw = store[d.rar_layer]["raw"]
    want_corr = oracle.refine_diffusion_attention(store[d.vce_layer]["qk"], 10)
    torch.testing.assert_close(corr, want_corr[:, 0], **TOL)
    torch.testing.assert_close(rar, pseudo.rar_transition(raw, tuple(d.heads)), **TOL)
    model = trainer.model
    fuse, decode = oracle_heads(model)
    kw = dict(caa_thre=m.caa_threshold, rar_iters=m.rar_steps, seg_attn_from=m.seg_attn_from_iter,
              aff_from_seg_iter=m.aff_label_from_seg_iter)
    with torch.no_grad():
        outs = oracle.model_forward(trainer.clip.model.visual, oracle_text(trainer.clip), model.cache_keys,
                                    model.cache_values, model.adapter, fuse, decode, model.normalize(x), want_corr,
                                    num_classes=K, return_dynamic=step >= m.adapter_cam_from_iter)
        theirs = oracle.training_step(outs, raw, lab, (160, 160), step, **kw)
        want = oracle.training_step(outs, raw, lab, (160, 160), step, pseudo=pl, **kw)
        labels64 = oracle.training_step(outs, raw, lab, (160, 160), step, dtype=torch.float64, **kw)["pseudo"]
    for i in range(2):
        assert_labels_agree_beyond_ties(pl[i], theirs["pseudo"][i], scores[i], theirs["scores"][i])
    # the pseudo-label logic on the online maps, exactly (in float64, where rounding cannot flip near-ties)
    _, pl64 = trainer.model.pseudo_labels(as64(out), pseudo.rar_transition(raw.double(), tuple(d.heads)), lab.double(),
                                          (160, 160), gate=True, rar_grid=rar_grid)
    assert torch.equal(pl64, labels64)
    for mine, ref_name in LOSSES:
        torch.testing.assert_close(got[mine].detach(), want[ref_name], **TOL)


# ----------------------------------------------------------------------------------------------
# Deliberate deviations (README "Fidelity to the reference"): where the reference makes NaN
# ----------------------------------------------------------------------------------------------
def test_empty_caa_box_keeps_the_other_classes():
    """A present class whose above-threshold CAM lies only in the last token column: the reference's CAA box is
    empty (box ends are clipped to width - 1), RAR divides 0/0, and the NaN turns the whole crop background.
    The project guards that division: the class gets an all-zero map and the other classes keep their labels -
    exactly the reference's labels for the image without that class (float64, so only the logic is compared)."""
    side, size = 10, (160, 160)
    g = torch.Generator().manual_seed(21)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    blob = (-((yy - 4.0) ** 2 + (xx - 3.0) ** 2) / 6).exp()
    edge = torch.zeros(side, side)
    edge[2:7, side - 1] = 1.0  # class 1: only the last column is above the threshold
    third = torch.rand(side, side, generator=g) * 0.3
    cams = torch.stack([blob, edge, third], -1).reshape(1, side * side, 3).double()
    clip_attn = torch.rand(1, 6, 1 + side * side, 1 + side * side, generator=g, dtype=torch.float64).softmax(-1)
    raw = softmax_maps(1, 3, 20, seed=22).double()
    present = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    scores, got = pseudo.pseudo_labels(cams, clip_attn, pseudo.rar_transition(raw, (1, 2)), present, size,
                                       caa_threshold=0.6, grid=(side, side), attn_grid=(20, 20))

    def reference(labels):
        maps, _ = oracle.refine_cams_with_aff(cams[0], clip_attn[0], labels[0], size, 0.6, dtype=torch.float64)
        valid, label = oracle.rar_refine(labels[0], torch.stack(maps).flatten(-2).T[None], raw[0], size, iters=5,
                                         dtype=torch.float64)
        return maps, valid, label

    maps, valid, label = reference(present)
    assert maps[1].abs().sum() == 0, "the probe must give class 1 an empty CAA box in the reference"
    assert torch.isnan(valid).any() and (label == 0).all(), "the reference turns the crop background"
    _, _, without = reference(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.isfinite(scores).all()
    assert (got == 1).any() and not (got == 2).any()
    assert torch.equal(got, without)


def test_constant_cam_columns_are_zero_not_nan():
    """A CAM column constant over tokens (a uniform crop, e.g. all padding, or a class ReLU'd to zero): the
    reference's min-max has no epsilon and gives NaN; the project gives 0. Other columns: the reference's."""
    g = torch.Generator().manual_seed(23)
    feats = torch.randn(2, 1 + 16, 8, generator=g)
    feats[0] = feats[0, :1]  # every token the same: every column constant
    feats = feats / feats.norm(dim=1, keepdim=True)
    text = torch.randn(5, 8, generator=g)
    text = text / text.norm(dim=-1, keepdim=True)
    num_classes = 4  # 3 foreground rows + 2 background words
    keys = torch.randn(9, 8, generator=g)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    values = F.one_hot(torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3]), num_classes).float()

    from diclip.method import cam

    pairs = [(cam.surgery_cam(feats, text, num_classes - 1), oracle.clip_feature_surgery(feats, text)[:, 1:, :3]),
             (cam.knowledge_retrieval_cam(keys, values, feats, text, num_classes),
              oracle.kv_inject_cam(keys, values, feats, text, num_classes))]
    for got, want in pairs:
        assert torch.isnan(want[0]).all() and torch.equal(got[0], torch.zeros_like(got[0]))
        torch.testing.assert_close(got[1], want[1], **TOL)
