"""Small builders shared by tests (tiny configs, random caches, the commands the READMEs show)."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from diclip.config import ClipConfig, DiffusionConfig, MethodConfig, ModelConfig
from diclip.models.kv_cache import KVCache


def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        clip=ClipConfig(name="diclip-tiny", pretrained=""),
        diffusion=DiffusionConfig(source="tiny"),
        adapter_size=32,
        embedding_dim=32,
        decoder_layers=1,
        decoder_heads=4,
    )


def random_cache(embed_dim: int, classes: list[str], per_class: int = 2, background: int = 3, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    ids = torch.tensor([0] * background + [c for c in range(1, k) for _ in range(per_class)])
    keys = torch.randn(len(ids), embed_dim, generator=g)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return KVCache(keys, F.one_hot(ids, k).float(), {"classes": list(classes)})


def fast_method_config() -> MethodConfig:
    return MethodConfig()


SHAPES_CLASS_FILE = """\
name: shapes
classes: [background, ball, box]
prompt_names: [ball, box]
background_words: [ground, wall, sky]
generation_words: [red ball, blue box]
"""
"""A user's own 3-class list (``data.classes_file``) drawn on the synthetic shapes."""


POOL_STAGES = ("generate", "mask", "cache", "correlate", "evaluate", "infer")


def tiny_spec(output_uri: str, *overrides: str, endpoint_url: str | None = None):
    """``configs/tiny.yaml`` (random tiny models) shrunk further for tests, writing under ``output_uri``."""
    from diclip.config import load_spec

    return load_spec("configs/tiny.yaml", tiny_overrides(output_uri, *overrides, endpoint_url=endpoint_url))


def tiny_overrides(output_uri: str, *overrides: str, endpoint_url: str | None = None) -> list[str]:
    """The overrides of :func:`tiny_spec`, for a ``diclip ... configs/tiny.yaml`` command line that must
    describe the same run."""
    base = [
        f"output_uri={output_uri}",
        "ray.progress_bars=false",
        "synthesize.num_train=6",
        "synthesize.num_val=4",
        "synthesize.image_size=[64,80]",
        "correlate.max_side=80",
        "correlate.resources.batch_size=3",
        # one actor per pool stage: each actor process spends ~6 s of CPU importing torch, diffusers and
        # open_clip before its first item, and the suite's stage runs are CPU-bound; a test of several
        # actors says so (concurrency=2)
        *(f"{s}.resources.concurrency=1" for s in POOL_STAGES),
    ]
    if endpoint_url:
        base.append(f"storage.endpoint_url={endpoint_url}")
    return base + list(overrides)


REPO = Path(__file__).resolve().parents[1]
READMES = (REPO / "README.md", REPO / "cluster" / "README.md")


def readme_commands(path: Path) -> list[tuple[str, str]]:
    """(section heading, command) for every command line in the code blocks of a README: backslash
    continuations joined, a leading ``$ `` prompt and ``#`` comments dropped, ``;``/``&&`` chains split. Tests run or parse
    these, so the docs and the tests cannot drift apart."""
    out: list[tuple[str, str]] = []
    section, in_block, pending = "", False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = re.sub(r"(^|\s)#.*$", "", line.removeprefix("$ ")).strip()  # comments go first: they hold ';'
        for part in re.split(r"\s*(?:;|&&)\s+", line):
            if part:
                out.append((section, part))
    return out


def committed_ids(stage_uri: str) -> list[str]:
    """Every item id in a complete stage's shards, as committed (duplicates kept, so a test can count them)."""
    from diclip import storage

    manifest = storage.read_manifest(stage_uri)
    ids: list[str] = []
    for s in manifest.shards:
        ids += storage.read_parquet(storage.join(stage_uri, s.path), columns=["item_id"]).column("item_id").to_pylist()
    return ids


def process_tree(pid: int) -> list:
    """A process and everything it started (psutil handles), for a test that must find nothing left behind."""
    import psutil

    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
