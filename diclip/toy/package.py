"""Package finished toy runs as a release: the layout of the shipped models in ``diclip/resources/toy``.

    python -m diclip.toy.package --clip-run RUN/clip --unet-run RUN/diffusion --out RUN/release

Writes ``<out>/clip.safetensors`` (fp16) + ``<out>/clip_card.json`` and ``<out>/diffusion/`` (the diffusers
folder, fp16, + ``card.json``), with each run's loss curves. A card holds the data recipe, the run's
arguments and the command that reproduces it, the last losses, the evaluation history (zero-shot mAP
and CAM localisation for CLIP, attention grouping for the UNet) and the wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

from diclip.data import toy_world as world


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _last(recs: list[dict], kind: str, n: int = 10) -> dict:
    rows = [r for r in recs if r["kind"] == kind]
    if not rows:
        return {}
    rows = rows[-n:]
    keys = [k for k in rows[-1] if k not in ("kind", "step", "time") and isinstance(rows[-1][k], (int, float))]
    out = {k: round(sum(r.get(k, 0.0) for r in rows) / len(rows), 5) for k in keys}
    out["step"] = rows[-1]["step"]
    out["averaged_over_last_logs"] = len(rows)
    return out


def _wall(recs: list[dict]) -> float:
    t = [r["time"] for r in recs if "time" in r]
    return round(max(t) - min(t), 1) if t else float("nan")


def _command(model: str) -> str:
    return f"diclip pretrain-toy --out OUT --only {model}   (or: make toy-models)"


def _recipe() -> dict:
    return {"generator": "diclip.data.toy_world.render(seed, index, WorldConfig())",
            "config": dataclasses.asdict(world.WorldConfig()), "classes": list(world.CLASSES),
            "background_words": list(world.BACKGROUND_WORDS), "prompt_template": world.PROMPT_TEMPLATE,
            "palette": world.PALETTE.astype(int).tolist(),
            "train_indices": "step s uses indices [s*batch, (s+1)*batch) of world seed `seed`",
            "val_indices": "10_000_000 onwards (never trained on); the synthesize stage uses 20M (train), 30M (val)"}


def _history(recs: list[dict]) -> list[dict]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("kind", "time")}
            for r in recs if r["kind"] == "eval"]


def package_clip(run: str, out: str) -> str:
    cargs = json.load(open(os.path.join(run, "args.json")))
    crecs = _read_jsonl(os.path.join(run, "metrics.jsonl"))
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(run, "toy_clip.safetensors"), os.path.join(out, "clip.safetensors"))
    if os.path.exists(os.path.join(run, "curves.png")):
        shutil.copy(os.path.join(run, "curves.png"), os.path.join(out, "clip_curves.png"))
    card = {
        "model": "open_clip 'diclip-toy' (bundled config diclip/resources/diclip-toy.json), fp16 safetensors",
        "load": "model.clip.name=diclip-toy model.clip.pretrained=<this>/clip.safetensors",
        "pipeline_settings": {"model.clip.name": "diclip-toy", "model.clip.prompt_template": world.PROMPT_TEMPLATE,
                              "model.clip.surgery_blocks": cargs.get("surgery_blocks", 2),
                              "image_size": world.WorldConfig().size,
                              "patch": cargs["model_cfg"]["vision_cfg"]["patch_size"]},
        "data": _recipe(), "seed": cargs["seed"], "steps": cargs["steps"], "batch": cargs["batch"],
        "command": _command("clip"),
        "args": {k: v for k, v in cargs.items() if k not in ("model_cfg", "out", "config")},
        "final_train_losses": _last(crecs, "train"), "eval_history": _history(crecs),
        "wall_seconds_1_thread": _wall(crecs),
        "size_bytes": os.path.getsize(os.path.join(out, "clip.safetensors")),
    }
    path = os.path.join(out, "clip_card.json")
    with open(path, "w") as f:
        json.dump(card, f, indent=1)
    return path


def _previous_release(folder: str | None) -> dict | None:
    """Where phases 1-2 came from when the run started at a released folder (``--init-from``): that
    release's own record (its recipe ran them from scratch), so the card tells the whole history."""
    if not folder:
        return None
    path = os.path.join(folder, "card.json")
    prev = json.load(open(path)) if os.path.exists(path) else {}
    return {"folder": folder, "note": "phases 1-2 (VAE, UNet epsilon loss) "
            "were not re-run: this run started from that release's fp16 weights; `make toy-models` runs all phases "
            "from scratch", **{k: prev[k] for k in ("vae_steps", "unet_steps", "final_vae_losses",
                                                    "final_train_losses", "wall_seconds_1_thread") if k in prev}}


def lean_tokenizer(folder: str) -> None:
    """Replace a saved tokenizer's ``tokenizer.json`` (3.6 MB for CLIP's BPE) by ``vocab.json`` +
    ``merges.txt`` (1.4 MB), which ``CLIPTokenizer.from_pretrained`` builds the same tokenizer from; checked
    on the toy world's captions and prompts before the old file goes. Keeps the release under 20 MB."""
    from transformers import CLIPTokenizer

    src = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(src):
        return
    model = json.load(open(src, encoding="utf-8"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    before = CLIPTokenizer.from_pretrained(folder)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    os.rename(src, src + ".bak")
    try:
        after = CLIPTokenizer.from_pretrained(folder)
        texts = ["", world.PROMPT_TEMPLATE.format("stripes and checks"), "a clean origami bars.",
                 *(world.PROMPT_TEMPLATE.format(c) for c in (*world.CLASSES, *world.BACKGROUND_WORDS))]
        for t in texts:
            if before(t).input_ids != after(t).input_ids:
                raise RuntimeError(f"vocab.json + merges.txt tokenize {t!r} differently from tokenizer.json")
    except Exception:
        os.rename(src + ".bak", src)
        for f in ("vocab.json", "merges.txt"):
            os.remove(os.path.join(folder, f))
        raise
    os.remove(src + ".bak")


def package_diffusion(run: str, out: str) -> str:
    uargs = json.load(open(os.path.join(run, "args.json")))
    urecs = _read_jsonl(os.path.join(run, "metrics.jsonl"))
    ddir = os.path.join(out, "diffusion")
    if os.path.exists(ddir):
        shutil.rmtree(ddir)
    shutil.copytree(os.path.join(run, "pipeline"), ddir)
    lean_tokenizer(os.path.join(ddir, "tokenizer"))
    if os.path.exists(os.path.join(run, "curves.png")):
        shutil.copy(os.path.join(run, "curves.png"), os.path.join(ddir, "curves.png"))
    weights = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ddir) for f in fs
                  if f.endswith(".safetensors"))
    card = {
        "model": "diffusers StableDiffusionPipeline folder (fp16 safetensors; PNDM scheduler = SD 2.1-base's)",
        "load": "model.diffusion.source=<this folder> generate.source=<this folder>",
        "pipeline_settings": {"vce_layer": "up_blocks.1.attentions.2.transformer_blocks.0.attn1 (6x6 at 48 px)",
                              "rar_layer": "up_blocks.3.attentions.1.transformer_blocks.0.attn1 (24x24)",
                              "heads": [1, 2], "timestep": "PNDM timesteps[45] of 50 = 101"},
        "data": _recipe(), "seed": uargs["seed"],
        "vae_steps": uargs["vae_steps"], "unet_steps": uargs["steps"], "batch": uargs["batch"],
        "command": _command("diffusion"),
        "args": {k: v for k, v in uargs.items() if k != "out"},
        "group_steps": uargs.get("group_steps", 0),
        "grouping_objective": ("phase 3: epsilon loss + diclip.toy.grouping_objective on heads [1, 2] of the VCE and "
                               f"RAR layers for samples noised at t < {uargs.get('group_tmax')} (weight "
                               f"{uargs.get('group_weight')}): a toy-only stand-in for the object grouping SD learns "
                               "from its pretraining data; instance masks of the pretraining images only")
        if uargs.get("group_steps") else "none",
        "final_vae_losses": _last(urecs, "vae"), "final_train_losses": _last(urecs, "train"),
        "final_group_losses": _last(urecs, "group"),
        "phases_1_2_from": _previous_release(uargs.get("init_from")),
        "eval_history": _history(urecs), "wall_seconds_1_thread": _wall(urecs), "size_bytes_weights": weights,
        "grouping_note": "lift = attention mass on the token's own object / the object's share of tokens "
                         "(1 = no grouping); colour* rows: a parameter-free colour kernel on the same images",
    }
    path = os.path.join(ddir, "card.json")
    with open(path, "w") as f:
        json.dump(card, f, indent=1)
    return path


def package(clip_run: str, unet_run: str, out: str, only: str = "all") -> str:
    if only in ("all", "clip"):
        package_clip(clip_run, out)
    if only in ("all", "diffusion"):
        package_diffusion(unet_run, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-run", required=True)
    ap.add_argument("--unet-run", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    print(package(a.clip_run, a.unet_run, a.out))


if __name__ == "__main__":
    main()
