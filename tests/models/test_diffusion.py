import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from diclip.config import DiffusionConfig
from diclip.errors import ModelError
from diclip.models.attention_capture import CaptureProcessor, DiffusionAttention, layer_grid, rar_attention
from diclip.models.diffusion import SD21_BASE_SCHEDULER, build_diffusion, build_diffusion_from_config, capture_timestep

CFG = DiffusionConfig(source="tiny")


@pytest.fixture(scope="module")
def pipe():
    return build_diffusion_from_config(CFG)


def test_tiny_pipeline_has_reference_layer_names(pipe):
    names = set(pipe.unet.attn_processors)
    assert f"{CFG.vce_layer}.processor" in names and f"{CFG.rar_layer}.processor" in names
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"  # SD 2.1-base's own
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_capture_processor_does_not_change_the_unet(pipe):
    ref = build_diffusion_from_config(CFG)
    ref.unet.set_attn_processor(AttnProcessor2_0())
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 77, 32, generator=g)
    DiffusionAttention(pipe, CFG)  # installs capture processors on two layers
    assert isinstance(pipe.unet.attn_processors[f"{CFG.vce_layer}.processor"], CaptureProcessor)
    with torch.no_grad():
        a = pipe.unet(lat, 10, encoder_hidden_states=enc).sample
        b = ref.unet(lat, 10, encoder_hidden_states=enc).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capture_shapes_seeds_and_sizes(pipe):
    da = DiffusionAttention(pipe, CFG)
    img = torch.rand(2, 3, 320, 320)
    cap = da(img, [1, 2])
    assert cap.vce.shape == (2, 8, 400, 400) and cap.clip_grid == (20, 20)
    assert cap.rar_q.shape == (2, 2, 1600, 8) and cap.rar_grid == (40, 40)
    again = da(img, [1, 2])
    assert torch.equal(cap.vce, again.vce)  # same image + seed -> same map
    other = da(img, [3, 4])
    assert not torch.equal(cap.vce, other.vce)
    dense = cap.rar_dense()
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 2, 1600))
    odd = da(torch.rand(1, 3, 208, 144), [0])  # multiples of 16, not of 64
    assert odd.clip_grid == (13, 9) and odd.vce.shape[-1] == 117
    assert odd.rar_grid == (26, 18)
    with pytest.raises(ValueError):
        da(torch.rand(1, 3, 100, 100), [0])


def test_layer_grid():
    assert layer_grid(100, (40, 40)) == (10, 10)
    assert layer_grid(7 * 5, (26, 18)) == (7, 5)
    with pytest.raises(ValueError):
        layer_grid(17, (40, 40))


def test_load_from_saved_directory(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "sd")
    loaded = build_diffusion(str(tmp_path / "sd"))
    for a, b in zip(loaded.unet.parameters(), pipe.unet.parameters()):
        assert torch.equal(a, b)
    img = torch.rand(1, 3, 64, 64)
    c1 = DiffusionAttention(loaded, CFG)(img, [7])
    c2 = DiffusionAttention(pipe, CFG)(img, [7])
    torch.testing.assert_close(c1.vce, c2.vce)
    torch.testing.assert_close(rar_attention(c1.rar_q, c1.rar_k, c1.rar_scale), c2.rar_dense())


def test_bad_sources(tmp_path):
    with pytest.raises(ModelError) as e:
        build_diffusion(str(tmp_path / "nope"))
    assert "not found" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError):
        build_diffusion(str(tmp_path / "empty"))
    with pytest.raises(ModelError):
        build_diffusion("tiny", dtype="float16")  # no fp16 on CPU


def test_capture_timestep_comes_from_the_checkpoints_own_scheduler(tmp_path, pipe):
    """A saved pipeline folder with SD 2.1-base's scheduler config (PNDM, skip_prk_steps) noises at
    t=101 for index 45 of 50; the same folder with a DDIM config would give 81."""
    import json

    from diffusers import DDIMScheduler

    pipe.save_pretrained(tmp_path / "sd21")
    cfg_file = tmp_path / "sd21" / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps(dict(SD21_BASE_SCHEDULER, _diffusers_version="0.8.0")))
    loaded = build_diffusion(str(tmp_path / "sd21"))
    assert type(loaded.scheduler).__name__ == "PNDMScheduler"
    assert capture_timestep(loaded, DiffusionConfig()) == 101
    assert DiffusionAttention(loaded, CFG).timestep.item() == 101
    before = list(loaded.scheduler.timesteps) if loaded.scheduler.timesteps is not None else None
    capture_timestep(loaded, DiffusionConfig(timestep_index=3))  # asks a copy; the pipeline's is untouched
    after = list(loaded.scheduler.timesteps) if loaded.scheduler.timesteps is not None else None
    assert before == after
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    assert capture_timestep(loaded, DiffusionConfig()) == 81
    with pytest.raises(ModelError, match="timestep_index=60"):
        capture_timestep(loaded, _bad_cfg())


def _bad_cfg():
    cfg = DiffusionConfig()
    object.__setattr__(cfg, "timestep_index", 60)  # past the 51 PNDM timesteps (validated configs can't say this)
    return cfg


def test_tiny_pipeline_generates_with_its_pndm_scheduler(pipe):
    out = pipe("a red ball", num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_a_saved_pipeline_loads_quietly_with_accelerate(capfd):
    """Every Ray actor loads a pipeline: no progress bars, no 'accelerate not found / low cpu memory' warning.

    ``diclip:toy/diffusion`` is a folder written by ``save_pretrained`` (the demo's model)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from diffusers.utils.import_utils import is_accelerate_available

    from diclip import bundled

    assert is_accelerate_available()  # so diffusers loads with low_cpu_mem_usage=True (no double copy)
    bars_before = diffusers_logging.is_progress_bar_enabled()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = build_diffusion(bundled.resolve("diclip:toy/diffusion"))
    out, err = capfd.readouterr()
    lines = (out + err).splitlines() + [str(w.message) for w in caught]
    noisy = [line for line in lines if any(word in line.lower() for word in ("accelerate", "low cpu memory", "loading"))]
    assert not noisy, noisy
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert diffusers_logging.is_progress_bar_enabled() == bars_before  # only the load was quiet


def test_processes_that_import_deepspeed_pick_an_accelerator_quietly():
    """Without DS_ACCELERATOR (``diclip`` run outside make), importing DeepSpeed must not warn
    'Setting accelerator to CPU'; diclip sets the default before its first deepspeed import."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA device in this process, whatever the machine has
    r = subprocess.run([sys.executable, "-c", "import os, diclip.train.safe_checkpoint; print(os.environ['DS_ACCELERATOR'])"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "cpu" and "Setting accelerator" not in r.stderr, r.stderr


def test_the_tiny_tokenizer_has_open_clips_vocabulary_without_importing_open_clip():
    """The tiny/toy diffusion tokenizer reads CLIP's BPE file itself (importing open_clip costs a diffusion
    actor ~2.5 s); its vocabulary and merges must be exactly open_clip's ``SimpleTokenizer``'s, or the shipped
    toy diffusion model would read other token ids than it was trained on."""
    import subprocess
    import sys

    code = ("import sys, diclip; from diclip.models.diffusion import tiny_tokenizer; t = tiny_tokenizer(); "
            "print(t('a red ball').input_ids); print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ids, imported = out.stdout.split("\n")[:2]
    assert imported == "False"
    from open_clip.tokenizer import SimpleTokenizer

    from diclip.models.diffusion import _clip_bpe

    st = SimpleTokenizer()
    vocab, merges = _clip_bpe()
    expected = dict(st.encoder)
    expected["<|startoftext|>"] = expected.pop("<start_of_text>")
    expected["<|endoftext|>"] = expected.pop("<end_of_text>")
    assert vocab == expected
    assert merges == [p for p, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    assert ids == str([49406, *st.encode("a red ball"), 49407])
