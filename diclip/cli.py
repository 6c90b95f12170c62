"""``diclip`` command line.

    diclip run SPEC [key=value ...]        run the spec's pipeline (skips complete stages)
    diclip <stage> SPEC [key=value ...]    run one stage (synthesize, generate, mask, cache, ...)
    diclip validate SPEC [key=value ...]   check a spec without running anything
    diclip show SPEC [key=value ...]       print the merged spec
    diclip submit SPEC --address URL       submit the spec as a Ray job (then status/logs/stop JOB)
    diclip cluster render SPEC --out DIR   fill the cluster manifests from the spec
    diclip pretrain-toy [--out DIR]        train + package the toy models the demo ships
    diclip import-release SPEC --checkpoint F --cache F --out DIR   the reference's released files

User mistakes (bad keys, missing files, unreachable stores, mismatched artifacts) print one line,
``error: ...``, and exit with status 2. Faults of the cluster or the store beyond their retries print one
line too (what failed, what is kept, "run again to resume") and exit with 75 (EX_TEMPFAIL).
"""
from __future__ import annotations

import argparse
import sys

import diclip  # noqa: F401  (torchvision shim)
from diclip.errors import DiclipError, StageFault
from diclip.logging import get_logger, init_logging

log = get_logger("diclip.cli")


def _stage_help() -> str:
    from ray_jobs.registry import STAGES

    return "\n".join(f"  {s.name:<10} {s.description}" for s in STAGES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diclip",
        description="DiCLIP weakly supervised segmentation as a Ray pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages (each also a subcommand: diclip <stage> SPEC):\n" + _stage_help(),
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def spec_cmd(name: str, help_: str):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("spec", help="job spec YAML (e.g. configs/demo.yaml)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_iters=10")
        return sp

    spec_cmd("run", "run the spec's pipeline on local Ray (or ray.address)")
    spec_cmd("validate", "check a spec: stages, URIs, resources, inputs")
    spec_cmd("show", "print the merged spec as YAML")
    from ray_jobs.registry import STAGES

    for stage in STAGES:
        spec_cmd(stage.name, stage.description)
    sp = spec_cmd("submit", "submit the spec as a Ray job to a running cluster")
    address_help = "Ray dashboard, e.g. http://HOST:8265 (default: $RAY_ADDRESS)"
    sp.add_argument("--address", required=False, default=None, help=address_help)
    sp.add_argument("--no-wait", action="store_true", help="print the job id and return")
    sp.add_argument("--timeout", type=float, default=0.0,
                    help="stop waiting (exit 2, the job keeps running) after this many seconds; 0: no limit")
    job_help = {"status": "state of a submitted job; exit 0 succeeded, 1 failed, 3 stopped, 4 pending/running",
                "logs": "logs of a submitted job",
                "stop": "stop a submitted job"}
    for name, text in job_help.items():
        jp = sub.add_parser(name, help=text)
        jp.add_argument("job_id")
        jp.add_argument("--address", default=None, help=address_help)
        if name == "logs":
            jp.add_argument("--follow", action="store_true", help="stream new log lines until the job ends")
    tp = sub.add_parser("pretrain-toy", help="train the toy CLIP + diffusion models (resumable) and package them")
    tp.add_argument("--out", default="runs/toy-models", help="run folder; the release lands in OUT/release")
    tp.add_argument("--only", choices=["all", "clip", "diffusion"], default="all")
    tp.add_argument("--sequential", action="store_true", help="one model after the other (default: in parallel)")
    tp.add_argument("--clip-steps", type=int, default=None, help="override the recipe's CLIP steps (600)")
    tp.add_argument("--diffusion-steps", type=int, nargs=2, default=None, metavar=("VAE", "UNET"),
                    help="override the recipe's VAE and UNet steps (300 1500)")
    ip = spec_cmd("import-release", "import the reference's released checkpoint and/or KV cache (.pth, weights only)")
    ip.add_argument("--checkpoint", default=None, help="DiCLIP_model.state_dict() file (local or s3://)")
    ip.add_argument("--cache", default=None, help="KV cache file: the (keys, values) pair (local or s3://)")
    ip.add_argument("--out", required=True, help="where the export (and OUT/cache) land (local or s3://)")
    ip.add_argument("--no-clip-check", action="store_true", help="skip comparing encoder.visual with model.clip")
    cp = sub.add_parser("cluster", help="cluster manifests")
    csub = cp.add_subparsers(dest="cluster_command", metavar="ACTION")
    rp = csub.add_parser("render", help="fill Dockerfile/KubeRay/cluster-launcher templates from a spec")
    rp.add_argument("spec")
    rp.add_argument("overrides", nargs="*")
    rp.add_argument("--out", default="cluster/rendered")
    rp.add_argument("--image", default=None, help="container image (default: diclip:latest)")
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also come after options
    (``diclip submit SPEC --address URL output_uri=s3://...``), as the README writes them."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    # A driver joins or starts Ray explicitly (ray_jobs.runtime.ray_session.init_ray); Ray's implicit ray.init on first use
    # would only ever run after a stop, from a background thread of the stopping run, and start or join a Ray
    # again ("SIGTERM handler is not set because current thread is not the main thread"). Read by Ray at import.
    import os

    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    parser = build_parser()
    args = parse(parser, argv)
    init_logging(args.log_level)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except StageFault as e:  # the cluster or the store, not the user: worth running again (EX_TEMPFAIL)
        print(f"error: {e}", file=sys.stderr)
        return 75
    except DiclipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _load(args, absolute_paths: bool = True):
    from diclip.config import load_spec

    return load_spec(args.spec, args.overrides, absolute_paths=absolute_paths)


def _show(args) -> int:
    from diclip.config import to_yaml

    print(to_yaml(_load(args)), end="")
    return 0


def _validate(args) -> int:
    from ray_jobs.planning import plan_details, stale_settings
    from ray_jobs.validate import validate_spec

    spec = _load(args)
    validate_spec(spec)
    print(f"ok: {args.spec} ({', '.join(spec.pipeline.stages)})")
    for name, done, uri, upstream in plan_details(spec):
        changed = [] if done else stale_settings(spec, name, upstream)
        status = "complete, run skips it" if done else f"stale: {', '.join(changed[:6])}" if changed else "to run"
        print(f"  {name:<10} {status:<22} {uri}")
    return 0


def _run(args) -> int:
    """``diclip run`` or one stage by name."""
    from ray_jobs import pipeline
    from ray_jobs.runtime import interrupt

    spec = _load(args)
    # signal handlers belong to the command line, not the library; after ray.init, which installs its own
    summary = pipeline.run(spec, None if args.command == "run" else [args.command], before_stages=interrupt.install)
    print("\n".join(summary.lines()))
    return 0


def _jobs(args) -> int:
    from ray_jobs.deploy import submit

    return submit.main(args)


def _pretrain_toy(args) -> int:
    from diclip.toy.pretrain import pretrain

    clip_args = [] if args.clip_steps is None else ["--steps", str(args.clip_steps)]
    diff_args = [] if args.diffusion_steps is None else ["--vae-steps", str(args.diffusion_steps[0]),
                                                         "--steps", str(args.diffusion_steps[1])]
    release = pretrain(args.out, args.only, parallel=not args.sequential, clip_args=clip_args,
                       diffusion_args=diff_args)
    print(f"toy models in {release}")
    return 0


def _import_release(args) -> int:
    from diclip.release import import_release

    import_release(_load(args), args.out, checkpoint=args.checkpoint, cache=args.cache,
                   check_clip=not args.no_clip_check)
    return 0


def _cluster(args) -> int:
    from ray_jobs.deploy import cluster_render

    if args.cluster_command != "render":
        print("usage: diclip cluster render SPEC [--out DIR]", file=sys.stderr)
        return 2
    spec = _load(args, absolute_paths=False)  # paths are resolved on the cluster, not here
    for path in cluster_render.render_all(spec, args.out, image=args.image):
        print(path)
    return 0


COMMANDS = {"show": _show, "validate": _validate, "run": _run, "submit": _jobs, "status": _jobs, "logs": _jobs,
            "stop": _jobs, "pretrain-toy": _pretrain_toy, "import-release": _import_release, "cluster": _cluster}
"""What each command does (every stage name also runs, as ``run`` with that stage alone)."""


def _dispatch(args) -> int:
    from ray_jobs import registry

    cmd = args.command
    handler = _run if registry.is_stage(cmd) else COMMANDS.get(cmd)
    if handler is None:
        raise DiclipError(f"unknown command {cmd!r}")
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
