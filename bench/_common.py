"""Helpers shared by the benchmarks: timing, result files, environment description."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
import platform
import statistics
import sys
import time
from pathlib import Path

import diclip  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {path}")
    return path


def ratio_line(label: str, a: float, b: float, unit: str = "") -> str:
    return f"{label}: {a:.4g}{unit} vs {b:.4g}{unit} -> ratio {a / b:.2f}x" if b else f"{label}: {a:.4g} vs 0"


@contextmanager
def moto_bucket(name: str):
    """A bucket on a moto S3 server in its own process (its request handling must not count as the bench's
    CPU), with diclip.storage and AWS_ENDPOINT_URL pointed at it; yields (endpoint URL, server pid). The
    server is stopped at the end by its handle - the one process this started."""
    import socket
    import subprocess

    import boto3

    from diclip import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        os.environ["AWS_ENDPOINT_URL"] = url
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        for _ in range(150):
            try:
                client.create_bucket(Bucket=name)
                break
            except Exception:
                time.sleep(0.2)
        else:
            raise SystemExit("moto server did not start")
        storage.configure(storage.StorageOptions(endpoint_url=url))
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)
