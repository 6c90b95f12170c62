"""``diclip submit / status / logs / stop``: run a job spec on a running Ray cluster via the Ray Jobs API.

The job is ``<cluster.python> -m ray_jobs.deploy.launch run <spec> <overrides> ray.address=auto`` executed on
the cluster's head in an uploaded copy of this repository (runtime_env ``working_dir``), so the cluster runs
exactly the code and spec the user has locally without an image rebuild. Why the pieces look the way they do:

* the upload is zipped into the cluster's GCS, which has a size limit (pitfall 14): ``EXCLUDES`` keeps
  ``.git``, the virtualenv, runs, data and weights out (Ray also honours ``.gitignore``), except the
  shipped toy weights under ``diclip/resources/toy`` (``diclip:toy/...`` in a spec must load on the cluster);
* a spec outside the repo (or in an excluded folder) would not be uploaded, so its merged YAML is written
  to ``.diclip_submit/`` in the repo for the duration of the upload; specs never hold credentials
  (``diclip.config`` keeps them out), so the upload holds none either;
* object-store credentials travel only as runtime_env ``env_vars`` read from the submitter's environment
  (:func:`ray_jobs.runtime.ray_session.worker_env`), never through a file;
* the interpreter is the spec's ``cluster.python`` (default ``python``, the first on the cluster's PATH),
  and :mod:`ray_jobs.deploy.launch` turns a module missing from it into one line naming the fix;
* outputs must be shared (``s3://``): a relative path would land in Ray's temporary copy of the working dir
  and vanish with the job (:func:`ray_jobs.validate.check_cluster_uris`);
* ``ray.address=auto`` makes the driver join the cluster it runs on: without it, a spec with
  ``ray.num_cpus`` would try to start a local instance and Ray refuses inside a job;
* token auth (Ray >= 2.52, pitfall 15): JobSubmissionClient reads ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``
  (or ``RAY_AUTH_TOKEN_PATH``) from the environment; a 401/403 becomes one line saying what to set.

Output on stdout is part of the interface: the first line of ``submit`` is ``submitted <job_id>``.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

from diclip.config import JobSpec, load_spec, to_yaml
from diclip.errors import DiclipError
from diclip.logging import get_logger
from ray_jobs.runtime.ray_session import worker_env

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = get_logger("ray_jobs.deploy.submit")

# gitignore-style patterns relative to the repo root. Leading "/" anchors a pattern at the root:
# a bare "data" would also drop the diclip/data package and tests/data.
EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "/runs",
    "/data",
    "/.torch_extensions",
    "*.safetensors",
    "!/diclip/resources/toy/**",  # the shipped toy weights (21 MB) are code: configs/demo.yaml loads them
    "__pycache__",
    "/bench/results",
)
SUBMIT_DIR = ".diclip_submit"
"""Repo-relative folder holding merged specs while they are uploaded (removed right after)."""
POLL_S = 2.0
"""Status poll period while waiting; the Jobs API is cheap, and a stage takes minutes."""
HEARTBEAT_S = 30.0
"""Print a progress line at least this often while the status does not change."""
CONNECT_TIMEOUT_S = 5.0
"""TCP reachability check before talking HTTP: requests has no default timeout and would hang."""
FAILURE_LOG_LINES = 40
ADDRESS_ENV = "RAY_ADDRESS"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_HINT = "the cluster requires a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"


def repo_root() -> Path:
    """The directory holding ``diclip/`` and ``ray_jobs/``: what a job uploads as its working dir."""
    root = Path(__file__).resolve().parents[2]  # ray_jobs/deploy/submit.py -> the checkout
    if not ((root / "diclip").is_dir() and (root / "ray_jobs").is_dir()):
        raise DiclipError(f"cannot find the diclip source tree next to {Path(__file__).parent}; "
                          "submit from a checkout of the repository")
    return root


# ----------------------------------------------------------------------------------------------
# what gets submitted
# ----------------------------------------------------------------------------------------------
def job_overrides(spec: JobSpec) -> list[str]:
    """Overrides every cluster job needs on top of the user's: join the cluster the job runs on."""
    return [] if spec.ray.address else ["ray.address=auto"]


ENTRY_MODULE = "ray_jobs.deploy.launch"
"""Stdlib-only wrapper of the CLI: a module missing on the cluster becomes one line, not a traceback."""


def entrypoint(spec_path: str, overrides: Sequence[str] = (), python: str = "python") -> str:
    """Shell command the cluster runs; every argument shell-quoted (overrides may hold spaces, [], $).

    ``python`` is explicit (``cluster.python``) because a bare ``python`` is whatever comes first on the
    cluster's PATH, which need not be the environment diclip is installed in."""
    return shlex.join([python, "-m", ENTRY_MODULE, "run", spec_path, *overrides])


def runtime_env(spec: JobSpec, root: Path | None = None) -> dict[str, Any]:
    """Runtime env of a submitted job: the repo as working dir (minus bulk) and the workers' env vars."""
    env = worker_env(spec)
    # The driver's init_ray passes worker_env again as ray.init(runtime_env=...); Ray refuses to merge a
    # job's and a driver's runtime env that set the same keys unless told to (values are identical).
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    return {"working_dir": str(root or repo_root()), "excludes": list(EXCLUDES), "env_vars": env}


def submission_id(spec: JobSpec) -> str:
    """``diclip-<name>-<UTC time>-<4 hex>``: readable, sortable, and a retried submit never collides."""
    return f"diclip-{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _uploaded(path: Path, root: Path) -> bool:
    """True when ``path`` is inside ``root`` and not dropped by EXCLUDES / .gitignore."""
    try:
        rel = path.resolve().relative_to(root)
    except ValueError:
        return False
    patterns = list(EXCLUDES)
    gitignore = root / ".gitignore"
    if gitignore.is_file():
        patterns += gitignore.read_text().splitlines()
    from ray_jobs.runtime.ray_compat import gitwildmatch

    spec = gitwildmatch(patterns)  # the matcher Ray's upload itself uses
    if spec is None:  # pragma: no cover - private module moved: be safe, upload a merged copy
        return False
    parts = rel.parts
    return not any(spec.match_file("/".join(parts[: i + 1])) for i in range(len(parts)))


@dataclass
class StagedSpec:
    """The spec path and overrides the job's entrypoint uses, and a temp file to remove after upload."""

    path: str
    overrides: list[str]
    temp_file: Optional[Path] = None

    def cleanup(self) -> None:
        if self.temp_file is None:
            return
        self.temp_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.temp_file.parent.rmdir()  # only when empty: a concurrent submit may still use it


def stage_spec(spec_file: str, overrides: Sequence[str], spec: JobSpec, sub_id: str,
               root: Path | None = None) -> StagedSpec:
    """Make the spec reachable inside the uploaded working dir.

    A spec already in the upload is referenced by its repo-relative path with the user's overrides, so
    the cluster resolves exactly what ``diclip run`` would locally. Otherwise its merged YAML (overrides
    applied, interpolations resolved) is written under ``.diclip_submit/``.
    """
    root = root or repo_root()
    extra = job_overrides(spec)
    src = Path(spec_file)
    if _uploaded(src, root):
        return StagedSpec(src.resolve().relative_to(root).as_posix(), [*overrides, *extra])
    target = root / SUBMIT_DIR / f"{sub_id}.yaml"
    target.parent.mkdir(exist_ok=True)
    target.write_text(to_yaml(spec))
    return StagedSpec(target.relative_to(root).as_posix(), extra, temp_file=target)


# ----------------------------------------------------------------------------------------------
# talking to the cluster
# ----------------------------------------------------------------------------------------------
def resolve_address(address: Optional[str]) -> str:
    """``--address``, else ``RAY_ADDRESS``; a bare ``HOST:PORT`` means the dashboard over http."""
    address = (address or os.environ.get(ADDRESS_ENV) or "").strip()
    if not address:
        raise DiclipError("no Ray address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def _check_reachable(address: str) -> None:
    """Fail in seconds (not a TCP timeout of minutes) when nothing listens at the dashboard address."""
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise DiclipError(f"Ray address {address!r} must look like http://HOST:8265 (the dashboard, not GCS)")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError as e:
        raise DiclipError(f"Ray address {address!r}: {e}") from e
    try:
        with socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise DiclipError(f"cannot reach Ray dashboard at {address}: {e}") from e


@contextlib.contextmanager
def _api_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn Jobs API failures into one-line DiclipErrors that say what to fix."""
    try:
        yield
    except DiclipError:
        raise
    except Exception as e:  # the SDK raises builtins and requests errors; classify by type and text
        msg = " ".join(str(e).split())
        name = type(e).__name__
        if name == "AuthenticationError" or "status code 401" in msg or "Unauthorized" in msg:
            if "Forbidden" in msg or msg.startswith("Authentication failed"):  # 403: wrong token
                raise DiclipError(f"the cluster at {address} rejected the token: set RAY_AUTH_TOKEN "
                                  "(or RAY_AUTH_TOKEN_PATH) to the cluster's token") from e
            raise DiclipError(TOKEN_HINT) from e
        if isinstance(e, ConnectionError) or "ConnectionError" in name or "Failed to connect" in msg:
            raise DiclipError(f"cannot reach Ray dashboard at {address}: {msg[:300]}") from e
        if job_id and ("404" in msg or "does not exist" in msg):
            raise DiclipError(f"no job {job_id!r} at {address}") from e
        if isinstance(e, (RuntimeError, ValueError, OSError)):
            raise DiclipError(f"Ray Jobs API at {address}: {msg[:400]}") from e
        raise


def connect(address: Optional[str]) -> "JobSubmissionClient":
    """A JobSubmissionClient for ``address`` (it checks the dashboard's version on creation)."""
    addr = resolve_address(address)
    _check_reachable(addr)
    from ray.job_submission import JobSubmissionClient

    with _api_errors(addr):
        return JobSubmissionClient(addr)


def _out(line: str = "") -> None:
    """CLI-facing output of submit/status/logs (stdout by design), flushed for pipes and CI logs."""
    print(line, flush=True)


def _tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def wait(client: "JobSubmissionClient", job_id: str, address: str, timeout_s: float = 0.0) -> str:
    """Poll until the job ends, printing a line per status change (and a heartbeat); returns the status."""
    start = time.monotonic()
    last, last_print = "", 0.0
    while True:
        with _api_errors(address, job_id):
            status = str(client.get_job_status(job_id).value)
        now = time.monotonic()
        if status != last or now - last_print >= HEARTBEAT_S:
            _out(f"{job_id}: {status} ({now - start:.0f}s)")
            last, last_print = status, now
        if status in TERMINAL:
            return status
        if timeout_s and now - start > timeout_s:
            raise DiclipError(f"job {job_id} still {status} after {timeout_s:.0f}s; it keeps running: "
                              f"diclip status {job_id} / diclip stop {job_id}")
        time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def submit(spec_file: str, overrides: Sequence[str], address: Optional[str], no_wait: bool = False,
           timeout_s: float = 0.0) -> int:
    """Validate locally, upload the repo + spec, start the job; wait for it unless ``no_wait``."""
    from ray_jobs.validate import check_cluster_uris, validate_spec

    spec = load_spec(spec_file, list(overrides), absolute_paths=False)
    validate_spec(spec, check_exists=False, local=False)  # it runs (and finds its inputs) on the cluster
    check_cluster_uris(spec)
    addr = resolve_address(address)
    client = connect(addr)
    sub_id = submission_id(spec)
    staged = stage_spec(spec_file, overrides, spec, sub_id)
    try:
        cmd = entrypoint(staged.path, staged.overrides, spec.cluster.python)
        log.info("submitting %s to %s: %s", sub_id, addr, cmd)
        with _api_errors(addr):
            job_id = client.submit_job(entrypoint=cmd, runtime_env=runtime_env(spec), submission_id=sub_id)
    finally:
        staged.cleanup()  # the package is uploaded by now (or the submit failed)
    _out(f"submitted {job_id}")
    if no_wait:
        _out(f"follow it with: diclip logs {job_id} --follow --address {addr}")
        return 0
    try:
        status = wait(client, job_id, addr, timeout_s)
    except KeyboardInterrupt:
        _out(f"stopped waiting; {job_id} keeps running (diclip stop {job_id} --address {addr})")
        raise
    if status == "SUCCEEDED":
        return 0
    with _api_errors(addr, job_id):
        logs = client.get_job_logs(job_id)
        info = client.get_job_info(job_id)
    _out(f"--- last {FAILURE_LOG_LINES} log lines of {job_id} ---")
    _out(_tail(logs, FAILURE_LOG_LINES))
    if getattr(info, "message", None):  # Ray appends a copy of the log tail: keep the first part
        _out(f"--- {status}: {' '.join(str(info.message).split(', last available logs')[0].split())[:300]}")
    return 1


# ``diclip status``'s exit code tells a script the job's state without parsing (2 stays "user error")
STATUS_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3, "PENDING": 4, "RUNNING": 4}


def status(job_id: str, address: Optional[str]) -> int:
    """Print the job's state (and, when it failed, Ray's one-line reason); exit 0 succeeded, 1 failed,
    3 stopped, 4 pending or running."""
    addr = resolve_address(address)
    client = connect(addr)
    with _api_errors(addr, job_id):
        state = str(client.get_job_status(job_id).value)
        reason = ""
        if state == "FAILED":
            message = getattr(client.get_job_info(job_id), "message", None) or ""
            reason = " ".join(str(message).split(", last available logs")[0].split())[:300]
    _out(f"{state}: {reason}" if reason else state)
    return STATUS_EXIT.get(state, 1)


def logs(job_id: str, address: Optional[str], follow: bool = False) -> int:
    addr = resolve_address(address)
    client = connect(addr)
    with _api_errors(addr, job_id):
        if not follow:
            text = client.get_job_logs(job_id)
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
            sys.stdout.flush()
            return 0
        client.get_job_status(job_id)  # unknown id -> one-line error before opening the websocket

        async def _follow() -> None:
            async for chunk in client.tail_job_logs(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()

        asyncio.run(_follow())
    return 0


def stop(job_id: str, address: Optional[str]) -> int:
    addr = resolve_address(address)
    client = connect(addr)
    with _api_errors(addr, job_id):
        stopped = client.stop_job(job_id)
        state = str(client.get_job_status(job_id).value)
    _out(f"stopped {job_id}" if stopped else f"{job_id} was not running ({state})")
    return 0


def main(args) -> int:
    """Entry point of the CLI's submit/status/logs/stop commands (``args`` from diclip.cli)."""
    cmd = args.command
    if cmd == "submit":
        return submit(args.spec, args.overrides, args.address, no_wait=args.no_wait,
                      timeout_s=float(getattr(args, "timeout", 0) or 0))
    if cmd == "status":
        return status(args.job_id, args.address)
    if cmd == "logs":
        return logs(args.job_id, args.address, follow=getattr(args, "follow", False))
    if cmd == "stop":
        return stop(args.job_id, args.address)
    raise DiclipError(f"unknown job command {cmd!r}")
