"""Cold start on a fresh node: DeepSpeed's comm start with an empty torch extensions folder, as a new pod
or node has it, with and without diclip's skip of the op training never uses (``deepspeed_shm_comm``).

One run, side by side: each variant in its own process with its own empty folder. Prints seconds and the
ratio; the skip is what ``build_engine`` does, so this is the start-up a worker on a fresh node saves.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

from _common import ROOT
from tests.test_fast_start import SCRIPT


def comm_start(variant: str) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as ext:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext, DS_ACCELERATOR="cpu")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", SCRIPT, variant, str(port)], env=env, capture_output=True,
                             text=True, cwd=ROOT, timeout=900)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        return time.perf_counter() - t0


def main() -> None:
    built = comm_start("build")
    skipped = comm_start("skip")
    print(f"fresh node, DeepSpeed comm start incl. import: build op {built:.1f} s, skip it {skipped:.1f} s "
          f"({built / skipped:.1f}x; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
