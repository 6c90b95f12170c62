"""``make demo TORCH=cpu|cuda``: which torch build the venv gets, checked with ``make -n`` (nothing runs)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def dry_run(tmp_path: Path, *args: str, local_wheels: bool = True) -> subprocess.CompletedProcess:
    """``make -n ARGS`` with a venv path that does not exist yet, so the install recipe is printed."""
    # Under ``make test`` the parent make's MAKEFLAGS/MAKELEVEL leak in and turn on "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    if not local_wheels:  # a fresh laptop: no find-links anywhere
        env.update(PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull)
    return subprocess.run(["make", "-n", "--no-print-directory", *args, f"VENV={tmp_path / 'venv'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def torch_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if "torch==2.13.0" in ln]
    return line


def test_default_is_cpu_and_uses_a_configured_local_wheel_folder(tmp_path: Path) -> None:
    r = dry_run(tmp_path, "demo", local_wheels=False)
    assert r.returncode == 0, r.stderr
    assert CPU_INDEX in torch_line(r.stdout)  # fresh machine: the CPU wheel, not PyPI's CUDA build
    if not (os.environ.get("PIP_FIND_LINKS") or subprocess.run(
            ["python3", "-m", "pip", "config", "get", "global.find-links"], capture_output=True).returncode == 0):
        pytest.skip("this machine has no local wheel folder configured")
    r = dry_run(tmp_path, "test")
    assert r.returncode == 0, r.stderr
    assert "--index-url" not in torch_line(r.stdout)  # offline CI: torch comes from the local folder, as before
    # CI prints the 25 slowest tests; two pytest workers (pytest-xdist)
    assert r.stdout.splitlines()[-1].endswith("-m pytest -q -n 2 --durations=25")


def test_cuda_uses_the_default_index_and_a_gpu_deepspeed(tmp_path: Path) -> None:
    r = dry_run(tmp_path, "demo", "TORCH=cuda", local_wheels=False)
    assert r.returncode == 0, r.stderr
    assert "--index-url" not in torch_line(r.stdout)
    r = subprocess.run(["make", "-s", "--eval", "print-ds: ; @echo $$DS_ACCELERATOR", "print-ds", "TORCH=cuda"],
                       cwd=REPO, env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"},
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "cuda", r.stderr


def test_an_unknown_torch_choice_is_one_line(tmp_path: Path) -> None:
    r = dry_run(tmp_path, "demo", "TORCH=rocm")
    assert r.returncode != 0 and "TORCH must be cpu or cuda, got 'rocm'" in r.stderr
