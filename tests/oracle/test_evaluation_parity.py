"""Evaluation parity: the project's multi-scale + flip + CRF segmentation evaluation against an independent
restatement of the reference's ``tools/infer_seg_voc.py`` / ``infer_seg_coco.py`` (tests/oracle/evaluation.py).

One tiny random model in the reference's checkpoint format (tests/release/reference_files.py) is imported
with ``diclip.release.importer.import_release`` and loaded as an export; the oracle runs the reference's
``eval_seg`` forward (tests/release/oracle.py) on the same state dict. Both evaluate the same images (odd
sizes, landscape and portrait, large and small, VOC's 255 border, a COCO greyscale image) with the settings
``configs/voc.yaml`` / ``configs/coco.yaml`` give the ``evaluate`` stage, at the reference's 320 px base.

Compared, per setting (measured on 2 shared CPU cores under ATen CPU capability default, avx2 and avx512;
``segment`` upsamples, arg-maxes and runs the CRF through ``finish_segment``, the function the evaluate
stage's CRF tasks run):

* logits at the working size: within fp32 noise (measured max |diff| 1.2e-6, logits up to 3.4); the bound is
  1e-5 x max(1, max |logit|), the forward's own parity tolerance (tests/release/test_import.py): every step
  after the forward is a convex combination (bilinear resizes, flip and scale means), which cannot amplify it;
* predictions before CRF: asserted equal at every pixel whose top-two logit margin exceeds twice that bound
  (0 to 9 pixels per image are inside it); measured equal at every pixel;
* predictions after CRF: measured equal at every pixel (the CRF relabels up to 21% of an image, so its
  parameters, unary and image are exercised); the softmax inputs differ by a few ulp, which could flip a
  near-tie after 10 mean-field iterations, so 1e-4 of the pixels may differ; the count is printed;
* mIoU before and after CRF, from the project's confusion matrices and ``metrics.summarize``, against the
  reference's ``evaluate.scores`` on the same predictions: equal to 1e-12 (the reference averages over the
  classes with ground truth; the project's earlier mean over every class with a union gave 8.41 against
  10.51 on the COCO images here, hence the fix in ``diclip.method.metrics.summarize``).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diclip.config import load_spec
from diclip.data.synthetic import render_sample
from diclip.inference import load_exported_model, multiscale_logits, segment, segmenter_forward, upsample
from diclip.method import metrics as metriclib
from tests.helpers import REPO
from tests.oracle import evaluation as ref
from tests.release import oracle as release_oracle
from tests.release.reference_files import reference_cache, reference_checkpoint, reference_shapes

TINY = str(REPO / "configs" / "tiny.yaml")
CLASSES = 5  # the tiny spec's synthetic class list
SIZES = dict(width=64, layers=4, patch=16, embed=64, text_width=64, text_layers=2, vocab=49408, context=77,
             num_classes=CLASSES, adapter=64, embedding=32, decoder_layers=1)
VISION_HEADS = 4  # diclip-tiny: width 64 / 16
FORWARD_TOL = 1e-5  # tests/release/test_import.py: project vs reference eval_seg logits
CRF_DIFF_ALLOWED = 1e-4  # fraction of pixels; measured 0 (see the module docstring)

IMAGES = {  # setting -> (H, W) of its images; None marks a greyscale image (COCO's robust_read_image path)
    "voc": [(150, 201), (201, 133), (97, 131)],
    "coco": [(171, 256), (256, 193), (59, 73), None],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(project forward, oracle forward, spec) of one tiny random model in the reference's checkpoint format."""
    from diclip.models.clip import build_clip
    from diclip.release.importer import import_release

    where = tmp_path_factory.mktemp("release")
    spec = load_spec(TINY, [f"output_uri={where / 'run'}", "model.clip.quick_gelu=true"])
    clip = build_clip(spec.model.clip)
    state = reference_checkpoint(clip.model, reference_shapes(**SIZES, grid=4), grid=4, seed=3)
    torch.save(state, where / "model.pth")
    torch.save(reference_cache(SIZES["embed"], CLASSES), where / "cache.pth")
    import_release(spec, str(where / "export"), checkpoint=str(where / "model.pth"), cache=str(where / "cache.pth"),
                   echo=lambda line: None)
    model, model_spec, _ = load_exported_model(str(where / "export"))
    positional = clip.model.visual.positional_embedding.detach()

    def oracle_forward(pixels: torch.Tensor) -> torch.Tensor:
        return release_oracle.eval_seg(state, positional, pixels, vision_heads=VISION_HEADS,
                                       decoder_heads=model_spec.model.decoder_heads)

    return segmenter_forward(model), oracle_forward


def _images(setting: str) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(images as the reference reads them, as the project decodes them, ground truth)."""
    rng = np.random.default_rng(7 if setting == "voc" else 11)
    ref_images, ours, gts = [], [], []
    for size in IMAGES[setting]:
        h, w = size or (121, 159)
        img, mask = render_sample(rng, h, w, CLASSES - 1, 3)
        if setting == "voc":  # VOC's 255 "void" outline around objects
            edge = np.zeros_like(mask, bool)
            edge[1:] |= mask[1:] != mask[:-1]
            edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
            mask = np.where(edge, 255, mask).astype(np.uint8)
        if size is None:  # greyscale JPEG: the reference stacks the one channel, the project's decoder too
            gray = np.asarray(Image.fromarray(img).convert("L"))
            buf = io.BytesIO()
            Image.fromarray(gray).save(buf, format="PNG")
            from diclip.data.datasets import decode_image

            decoded = decode_image(buf.getvalue(), "gray.png")
            assert np.array_equal(decoded, ref.read_like_reference(gray))
            ref_images.append(gray)
            ours.append(decoded)
        else:
            ref_images.append(img)
            ours.append(img)
        gts.append(mask)
    return ref_images, ours, gts


def _project_miou(gts, preds) -> float:
    cm = sum(metriclib.confusion_matrix(g, p, CLASSES) for g, p in zip(gts, preds))
    return metriclib.summarize(cm, [str(i) for i in range(CLASSES)])["miou"]


@pytest.mark.parametrize("setting", ["voc", "coco"])
def test_evaluation_matches_the_reference_scripts(models, setting) -> None:
    ours_forward, oracle_forward = models
    cfg = load_spec(str(REPO / "configs" / f"{setting}.yaml")).evaluate
    base = load_spec(str(REPO / "configs" / f"{setting}.yaml")).data.crop_size
    oracle_setting = ref.VOC if setting == "voc" else ref.COCO
    # the stage's settings are the script's
    assert base == ref.RESIZE and tuple(cfg.scales) == ref.SCALES and cfg.flip and cfg.crf and cfg.size == 0
    assert cfg.work_ratio == oracle_setting.ratio and cfg.voc_flip_quirk == (not oracle_setting.flip_at_base)

    ref_images, images, gts = _images(setting)
    want = ref.evaluate(oracle_forward, ref_images, gts, oracle_setting, CLASSES)

    kw = dict(flip=cfg.flip, work_ratio=cfg.work_ratio, multiple=16, voc_flip_quirk=cfg.voc_flip_quirk)
    tensors = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in images]
    logits = multiscale_logits(ours_forward, tensors, base, cfg.scales, **kw)  # one batch, as the actor runs it
    raws: list[np.ndarray] = []
    preds = segment(ours_forward, images, base, cfg.scales, crf=True, raw_out=raws, **kw)

    for i, (lg, ref_lg, gt) in enumerate(zip(logits, want["logits"], gts)):
        ref_lg = ref_lg[0]
        assert lg.shape == ref_lg.shape == (CLASSES, int(cfg.work_ratio * gt.shape[0]), int(cfg.work_ratio * gt.shape[1]))
        tol = FORWARD_TOL * max(1.0, float(ref_lg.abs().max()))
        diff = float((lg - ref_lg).abs().max())
        # before CRF: equal wherever the reference's top-two margin is clear of the logits' tolerance
        full = upsample(ref_lg, gt.shape)
        top2 = full.topk(2, dim=0).values
        clear = ((top2[0] - top2[1]) > 2 * tol).numpy()
        raw_equal = raws[i] == want["raw"][i]
        crf_diff = int((preds[i] != want["crf"][i]).sum())
        print(f"{setting} {gt.shape}: max |logit diff| {diff:.2e} (logits up to {float(ref_lg.abs().max()):.2f}); "
              f"raw equal {raw_equal.mean():.6f} ({int((~raw_equal).sum())} px differ, {int((~clear).sum())} "
              f"within the margin); CRF differs at {crf_diff} of {gt.size} px (CRF relabels "
              f"{int((want['crf'][i] != want['raw'][i]).sum())} px)")
        assert diff <= tol
        assert raw_equal[clear].all()
        assert crf_diff <= CRF_DIFF_ALLOWED * gt.size
    # not blind: the CRF moves labels and more than one class is predicted
    assert sum(int((c != r).sum()) for c, r in zip(want["crf"], want["raw"])) > 0
    assert len(np.unique(np.concatenate([c.ravel() for c in want["crf"]]))) > 1

    # the same mIoU from the same predictions (the project's confusion matrices + summarize)
    hist = want["raw_score"]["hist"]
    smallest = float(hist.sum(axis=1)[hist.sum(axis=1) > 0].min())  # pixels of the rarest ground-truth class
    for ours, key in ((raws, "raw_score"), (preds, "crf_score")):
        theirs = want[key.split("_")[0]]
        assert _project_miou(gts, theirs) == pytest.approx(want[key]["miou"], abs=1e-12)  # same predictions
        moved = sum(int((a != b).sum()) for a, b in zip(ours, theirs))
        # each moved pixel changes a class's TP and union by at most 1, its IoU by at most 2 / its gt pixels
        assert _project_miou(gts, ours) == pytest.approx(want[key]["miou"], abs=1e-12 + 2 * moved / smallest)
    union_mean = float(np.nanmean(metriclib.iou_per_class(sum(metriclib.confusion_matrix(g, p, CLASSES)
                                                              for g, p in zip(gts, preds)))))
    print(f"{setting}: mIoU raw {want['raw_score']['miou']:.4f} / ours {_project_miou(gts, raws):.4f}; "
          f"CRF {want['crf_score']['miou']:.4f} / ours {_project_miou(gts, preds):.4f} (a mean over every class "
          f"with a union, predicted-only classes as 0, gives {union_mean:.4f})")


def test_the_comparison_sees_the_voc_quirk(models) -> None:
    """Not blind: evaluating the VOC images with COCO's flip at 320 moves the logits far beyond the tolerance."""
    ours_forward, oracle_forward = models
    ref_images, images, _ = _images("voc")
    want = ref.msc_logits(oracle_forward, ref_images[2], ref.VOC)[0]
    tensor = torch.from_numpy(images[2].copy()).permute(2, 0, 1).float() / 255
    wrong = multiscale_logits(ours_forward, [tensor], 320, ref.SCALES, flip=True, work_ratio=0.4,
                              voc_flip_quirk=False)[0]
    assert float((wrong - want).abs().max()) > 100 * FORWARD_TOL * max(1.0, float(want.abs().max()))
