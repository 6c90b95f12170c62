"""A real multi-node Ray cluster on one host, for chaos tests: a head and worker raylets, each its own
``ray start --block`` in its own session, its own temp dir and its own loopback address (and each worker,
where the host allows a private mount namespace, its own ``/tmp``: nothing but the bucket is shared), so a test can
kill one node (every process of its session, SIGKILL: what a preempted VM looks like to Ray) while the
others go on.

Only this cluster's processes are ever signalled (by session), never by name: other Ray instances on the
host (other tests, other people) are left alone. Ray rewrites ``--node-ip-address=127.0.0.1`` to the host's
address, so nodes take 127.0.0.2, .3, ... (all loopback on Linux).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Live processes of one session (everything a ``ray start`` that we started with setsid spawned)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(sid: int, grace_s: float = 0.0) -> None:
    """SIGTERM (after ``grace_s`` SIGKILL), or SIGKILL at once, every process of one session."""
    sig = signal.SIGTERM if grace_s > 0 else signal.SIGKILL
    deadline = time.monotonic() + max(grace_s, 10.0)
    while (left := session_pids(sid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
        if grace_s > 0 and time.monotonic() > deadline - 10.0 + grace_s:
            sig = signal.SIGKILL


_PRIVATE_TMP = """exec 3</tmp && mount -t tmpfs -o size=2g tmpfs /tmp || exit 1
IFS=:
for p in $DICLIP_NODE_KEEP; do
  mkdir -p "$p" && mount --no-canonicalize --bind "/proc/self/fd/3${p#/tmp}" "$p" || exit 1
done
unset IFS
mkdir -p "$0" && exec "$@" 3<&-"""


def node_keeps() -> list[str]:
    """What every node needs under the host's /tmp, if anything lives there: this Python's environment, the
    repository (the code the workers import) and the caches the Makefile points into it."""
    paths = {os.path.realpath(sys.prefix), str(Path(__file__).resolve().parents[1])}
    paths |= {os.path.realpath(os.environ[k]) for k in ("TORCH_EXTENSIONS_DIR", "HF_HOME") if os.environ.get(k)}
    under = sorted(p for p in paths if p.startswith("/tmp/"))
    return [p for p in under if not any(p.startswith(q + "/") for q in under)]  # a folder once, not its parts


def private_tmp_possible() -> bool:
    """Whether this host lets a node have a /tmp of its own (a private mount namespace: root, or user
    namespaces allowed)."""
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                               "mount -t tmpfs tmpfs /tmp"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class Node:
    name: str
    ip: str
    proc: subprocess.Popen
    temp_dir: str
    log: Path

    @property
    def alive(self) -> bool:
        return bool(session_pids(self.proc.pid))


@dataclass
class LocalCluster:
    """Head (0 CPUs: the driver's node, no stage work) plus ``workers`` nodes of ``cpus`` CPUs each."""

    workers: int = 2
    cpus: float = 1.0
    env: dict[str, str] = field(default_factory=dict)
    private_tmp: bool = field(default_factory=private_tmp_possible)  # each worker node its own /tmp
    nodes: list[Node] = field(default_factory=list)
    gcs: str = ""

    def _ray(self) -> str:
        ray_bin = Path(sys.executable).parent / "ray"
        if not ray_bin.exists():
            raise RuntimeError(f"no ray CLI next to {sys.executable}")
        return str(ray_bin)

    def _env(self) -> dict[str, str]:
        venv_bin = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_JOB"))}
        env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                   RAY_AUTH_MODE="disabled", DICLIP_NODE_KEEP=":".join(node_keeps()), **self.env)
        return env

    def _start(self, name: str, ip: str, args: list[str], private_tmp: bool = False) -> Node:
        temp_dir = tempfile.mkdtemp(prefix=f"dcl{name[0]}", dir="/tmp")  # short: unix socket path limits
        log = Path(temp_dir) / "ray-start.log"
        cmd = [self._ray(), "start", "--block", f"--node-ip-address={ip}", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *args]
        if private_tmp:
            # a disk of its own, as a node of a real cluster: a fresh /tmp (tmpfs) in a private mount
            # namespace, where Ray's session and every worker's scratch live. What a node of a real cluster
            # has too - the code and its Python - stays visible when it lives under /tmp (a clone there):
            # bound back from the host's /tmp, reached through a descriptor opened before the mount. The
            # log stays on the host's /tmp (opened before the mount as well).
            cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _PRIVATE_TMP, temp_dir, *cmd]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env=self._env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, ip, proc, temp_dir, log)
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 180.0) -> "LocalCluster":
        port = free_port()
        self.gcs = f"127.0.0.2:{port}"
        self._start("head", "127.0.0.2", ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                                          f"--ray-client-server-port={free_port()}"])
        self._wait_nodes(1, timeout)
        for i in range(self.workers):
            self.add_worker(timeout)
        return self

    def add_worker(self, timeout: float = 180.0) -> Node:
        i = len(self.nodes) + 1
        node = self._start(f"worker{i}", f"127.0.0.{i + 1}", [f"--address={self.gcs}", f"--num-cpus={self.cpus:g}"],
                           private_tmp=self.private_tmp)
        self._wait_nodes(sum(n.alive for n in self.nodes), timeout)
        return node

    def _wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_nodes() >= n:
                return
            dead = [nd for nd in self.nodes if nd.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited: {dead[0].log.read_text()[-2000:]}")
            time.sleep(1.0)
        raise RuntimeError(f"cluster has {self.alive_nodes()} of {n} nodes after {timeout:.0f} s")

    def alive_nodes(self) -> int:
        """Active nodes as the GCS counts them (``ray status``: no dashboard or State API needed)."""
        out = subprocess.run([self._ray(), "status", "--address", self.gcs], env=self._env(), capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0 or "Active:" not in out.stdout:
            return 0
        active = out.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if line.strip().split(" ", 1)[-1].startswith("node_"))

    def node_running(self, marker: str) -> Node | None:
        """The worker node one of whose processes has ``marker`` in its command line (an actor's class name,
        e.g. ``Correlator`` or ``RayTrainWorker``): where to strike to hit that actor."""
        for node in self.nodes[1:]:
            for pid in session_pids(node.proc.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if marker.encode() in f.read():
                            return node
                except OSError:
                    continue
        return None

    def kill(self, node: Node) -> None:
        """The node is gone at once (SIGKILL to every process of it), as a preempted VM."""
        kill_session(node.proc.pid)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # --block tears its processes down on SIGTERM
        deadline = time.monotonic() + 5  # a test cluster's state is thrown away: a short grace, then SIGKILL
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_session(node.proc.pid)
