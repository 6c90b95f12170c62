"""Read and write bytes, JSON, Parquet and tensors at a URI, locally or on S3.

Every pipeline stage hands artifacts to the next one through a URI, so the same code must work on a
laptop (plain paths, ``file://``) and on a cluster (``s3://bucket/key``, real AWS or an
S3-compatible store such as MinIO). All I/O goes through ``pyarrow.fs``, which is already a Ray
Data dependency and handles S3 multipart uploads and ranged Parquet reads without boto3.

Guarantees the rest of the package relies on:

* Writers are atomic: a reader sees either the old object or the complete new one, never a partial
  file, so "the manifest exists" can mean "the stage finished".
* Failures raise :class:`~diclip.errors.StorageError` with one line naming the URI and the cause
  (missing object, missing bucket, unreachable endpoint, unsupported scheme, corrupt file).
* An object store that blips (refused connections, timeouts, 5xx, throttling) is waited out: every
  S3 operation retries with capped exponential backoff for up to ``retry_budget_s`` seconds, saying
  once per outage that it waits and once that the store is back (:func:`outage_report` counts them).
  Only then does it raise, naming the store, the operation and how long it waited.
* ``list_files`` returns URIs in the caller's style (relative stays relative, ``file://`` stays
  ``file://``) so results can be fed straight back into the readers.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from diclip.errors import StorageError
from diclip.logging import get_logger

if TYPE_CHECKING:  # torch is only needed by the tensor helpers; keep plain storage use torch-free.
    import torch

log = get_logger(__name__)

SUPPORTED_SCHEMES = ("file://", "s3://")
_REASON_MAX_CHARS = 240
# Hidden temp files left behind by a crashed local write: ".{name}.tmp-{uuid4 hex}".
_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


@dataclass
class StorageOptions:
    """How to reach the object store; set once per process with :func:`configure`."""

    endpoint_url: str | None = None  # None -> AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # None -> AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3  # attempts of one request inside the AWS SDK (a fraction of a second in all)
    retry_budget_s: float = 600.0  # seconds an operation waits out an unreachable store (retry_transient)


_lock = threading.Lock()
_options = StorageOptions()
# Backoff between attempts of one operation while the store is away: 0.5 s doubling to 30 s, +-25% jitter
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_s3_cache: dict[tuple, pafs.S3FileSystem] = {}
_local_fs = pafs.LocalFileSystem()


def options_from(cfg: Any) -> StorageOptions:
    """The options a job's ``storage`` section (:class:`diclip.config.StorageConfig`) asks for."""
    return StorageOptions(endpoint_url=cfg.endpoint_url, region=cfg.region, max_attempts=int(cfg.max_attempts),
                          retry_budget_s=float(cfg.retry_budget_s))


def configure(options: StorageOptions | None) -> None:
    """Set the process-wide storage options (``None`` resets to env defaults).

    Cached filesystems are dropped so the next call picks up the new endpoint/timeouts.
    """
    global _options
    with _lock:
        new = replace(options) if options is not None else StorageOptions()
        if new == _options:  # the same settings again (a Ray task's per-batch setup): keep the warm clients
            return
        _options = new
        _s3_cache.clear()


def get_options() -> StorageOptions:
    """A copy of the current process-wide options (mutating it has no effect)."""
    with _lock:
        return replace(_options)


# --------------------------------------------------------------------------------------------------
# URI parsing
# --------------------------------------------------------------------------------------------------


def _split(uri: str) -> tuple[str, str]:
    """Return ``(kind, path)`` with kind ``"local"`` or ``"s3"``; path has no scheme.

    Local paths are returned as given (relative stays relative); S3 paths are ``bucket/key``.
    """
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"empty or non-string URI: {uri!r}")
    if "://" not in uri:
        return "local", uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        # file:///abs/path (empty host) or file://localhost/abs/path; anything else is ambiguous.
        host, sep, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"file URIs must be absolute (file:///abs/path), got {uri}")
        return "local", "/" + path if sep else "/"
    if scheme == "s3":
        path = rest.strip("/")
        if not path:
            raise StorageError(f"S3 URI has no bucket: {uri} (expected s3://bucket/key)")
        return "s3", path
    raise StorageError(
        f"unsupported URI scheme in {uri}: supported are plain paths, "
        + ", ".join(SUPPORTED_SCHEMES)
    )


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``); these have no local path."""
    return _split(uri)[0] == "s3"


def to_uri(path_or_uri: str) -> str:
    """Normalise to the canonical spelling used in configs and manifests.

    ``file:///abs/p`` becomes ``/abs/p``; relative paths stay relative on purpose (so run dirs
    remain relocatable and match what the user typed); ``s3://`` URIs lose trailing slashes.
    """
    kind, path = _split(path_or_uri)
    if kind == "s3":
        return "s3://" + path
    return path


def local_path(uri: str) -> str | None:
    """Absolute local path for a local URI (for libraries that need a real file), else ``None``."""
    kind, path = _split(uri)
    return os.path.abspath(path) if kind == "local" else None


def join(uri: str, *parts: str) -> str:
    """Join path segments with ``/``, keeping the scheme of ``uri``.

    Leading/trailing slashes on ``parts`` are ignored (a part never restarts at the root, which
    would silently escape the bucket), and empty parts are skipped.
    """
    _split(uri)  # validate the scheme early
    prefix, sep, rest = uri.partition("://") if "://" in uri else ("", "", uri)
    out = rest.rstrip("/") or ("/" if rest.startswith("/") else "")
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") or not out else f"{out}/{part}"
    return prefix + sep + out


# --------------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------------


def _resolved_s3_settings() -> tuple[str | None, str, StorageOptions]:
    opts = get_options()
    endpoint = (
        opts.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )
    region = (
        opts.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    return endpoint, region, opts


def _endpoint_label() -> str:
    endpoint, region, _ = _resolved_s3_settings()
    return endpoint or f"AWS S3 ({region})"


def _s3_filesystem() -> pafs.S3FileSystem:
    """Build (or reuse) the S3 filesystem for the current options and environment.

    pyarrow ignores ``endpoint_url`` from ``~/.aws/config``, so endpoint and static credentials are
    read from the environment here; without static credentials the AWS SDK's default chain runs.
    """
    endpoint, region, opts = _resolved_s3_settings()
    access_key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
    session_token = os.environ.get("AWS_SESSION_TOKEN")
    key = (
        endpoint,
        region,
        opts.connect_timeout_s,
        opts.request_timeout_s,
        opts.max_attempts,
        access_key,
        secret_key,
        session_token,
    )
    with _lock:
        fs = _s3_cache.get(key)
        if fs is not None:
            return fs
        if endpoint:
            # An S3-compatible store (MinIO, Ceph, moto) has no EC2 metadata service; without this the
            # AWS SDK probes it for seconds on every new client. On AWS itself the probe is how
            # instance-profile credentials and the region are found, so it stays on there.
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        kwargs: dict[str, Any] = dict(
            region=region,
            connect_timeout=float(opts.connect_timeout_s),
            request_timeout=float(opts.request_timeout_s),
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(opts.max_attempts)),
        )
        if endpoint:
            if "://" in endpoint:
                parts = urlsplit(endpoint)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise StorageError(
                        f"invalid S3 endpoint URL {endpoint!r}: expected http(s)://host[:port]"
                    )
                kwargs["scheme"] = parts.scheme
                kwargs["endpoint_override"] = parts.netloc
            else:  # bare host:port, as pyarrow itself accepts
                kwargs["scheme"] = "https"
                kwargs["endpoint_override"] = endpoint
        if access_key and secret_key:
            kwargs.update(access_key=access_key, secret_key=secret_key)
            if session_token:
                kwargs["session_token"] = session_token
        try:
            fs = pafs.S3FileSystem(**kwargs)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot configure S3 client for {endpoint or 'AWS'}: {e}") from e
        log.debug("created S3 filesystem endpoint=%s region=%s", endpoint or "aws", region)
        _s3_cache[key] = fs
        return fs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Filesystem plus the path inside it (absolute for local files, ``bucket/key`` for S3)."""
    kind, path = _split(uri)
    if kind == "s3":
        return _s3_filesystem(), path
    return _local_fs, os.path.abspath(path)


# --------------------------------------------------------------------------------------------------
# Error mapping
# --------------------------------------------------------------------------------------------------


def _short(e: BaseException) -> str:
    """The informative tail of a pyarrow/AWS error message, trimmed to one short line."""
    msg = " ".join(str(e).split())
    m = re.search(r"AWS Error [A-Z_]+ during \w+ operation: (.*)", msg)
    if m:
        msg = m.group(1)
    msg = re.sub(r"\s*\(Request ID: [^)]*\)", "", msg)
    if len(msg) > _REASON_MAX_CHARS:
        msg = msg[: _REASON_MAX_CHARS - 3] + "..."
    return msg or type(e).__name__


def _bucket_missing(path: str) -> bool:
    """Best-effort check used only on the error path to name a missing bucket precisely."""
    try:
        bucket = path.split("/", 1)[0]
        return _s3_filesystem().get_file_info(bucket).type == pafs.FileType.NotFound
    except Exception:  # noqa: BLE001 - this is a diagnostic probe; the original error wins
        return False


# What an object store says while it restarts, fails over or sheds load; anything else (no such key,
# access denied, a bad bucket) is an answer, not an outage.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|REQUEST_TIMEOUT|Timeout|timed out|Could not connect|Connection refused|"
    r"Connection reset|Broken pipe|INTERNAL_FAILURE|internal error|SERVICE_UNAVAILABLE|ServiceUnavailable|"
    r"Service Unavailable|SLOW_DOWN|SlowDown|Throttl|HTTP status 5\d\d|HTTP response code 5\d\d|"
    r"store unreachable for")  # the last: an operation that gave up after the budget (its text, rebuilt by Ray)


def is_transient(e: BaseException) -> bool:
    """True for errors that a store that is restarting or overloaded gives (worth waiting out)."""
    flag = getattr(e, "transient", None)  # set where diclip mapped the error; a rebuilt one has its text only
    if flag is not None:
        return bool(flag)
    return bool(_TRANSIENT.search(str(e)))


def _storage_error(uri: str, action: str, e: BaseException) -> StorageError:
    err = _classify(uri, action, e)
    err.transient = _split(uri)[0] == "s3" and is_transient(e)  # type: ignore[attr-defined]
    return err


def _classify(uri: str, action: str, e: BaseException) -> StorageError:
    kind, path = _split(uri)
    text = str(e)
    if kind == "s3":
        bucket = path.split("/", 1)[0]
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            return StorageError(f"bucket does not exist: s3://{bucket} (for {uri})")
        if any(s in text for s in ("NETWORK_CONNECTION", "curlCode", "REQUEST_TIMEOUT", "Timeout")):
            return StorageError(
                f"cannot reach object store at {_endpoint_label()} for {uri}: {_short(e)}"
            )
        if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID",
                                   "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId")):
            return StorageError(
                f"access denied to {uri} at {_endpoint_label()}: {_short(e)} "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(e, FileNotFoundError):
            if _bucket_missing(path):
                return StorageError(f"bucket does not exist: s3://{bucket} (for {uri})")
            return StorageError(f"no such object: {uri}")
    elif isinstance(e, FileNotFoundError):
        return StorageError(f"no such file: {uri}")
    return StorageError(f"cannot {action} {uri}: {_short(e)}")


@contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Turn pyarrow/OS errors inside the block into one-line StorageErrors naming ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise _storage_error(uri, action, e) from e


# --------------------------------------------------------------------------------------------------
# Waiting out an unreachable store
# --------------------------------------------------------------------------------------------------

_outage_lock = threading.Lock()
# ``waiters``: operations that have failed and not yet got an answer. An outage ends when the last of them
# gets one, not when the first does: a gateway coming back answers one connection and drops the next, and
# threads in backoff retry at different moments, so "first success" would tell one restart as several.
_outage: dict[str, Any] = {"since": None, "count": 0, "waited_s": 0.0, "retries": 0, "waiters": 0,
                           "answered": False}


def outage_report() -> dict[str, float]:
    """This process's outages waited out so far: ``count``, ``waited_s`` (seconds), ``retries``."""
    with _outage_lock:
        return {k: _outage[k] for k in ("count", "waited_s", "retries")}


_taken = {"count": 0, "waited_s": 0.0}


def take_outages() -> tuple[int, float]:
    """Outages this process waited out since the last call (count, seconds): what a report row or a log
    record passes on, so each is counted once however many reports a process sends."""
    with _outage_lock:
        count, waited = _outage["count"] - _taken["count"], _outage["waited_s"] - _taken["waited_s"]
        _taken.update(count=_outage["count"], waited_s=_outage["waited_s"])
    return int(count), float(waited)


def _outage_begins(what: str, reason: str, budget: float, first: bool) -> None:
    """A transient failure; ``first``: this operation's first one (it now waits on the store)."""
    with _outage_lock:
        _outage["retries"] += 1
        _outage["waiters"] += int(first)
        if _outage["since"] is not None:
            return
        _outage["since"] = time.monotonic()
    log.warning("object store %s not answering (%s: %s); waiting up to %.0f s for it "
                "(storage.retry_budget_s)", _endpoint_label(), what, reason, budget)


def _outage_waiter_done(answered: bool) -> None:
    """An operation that waited stops waiting: ``answered`` (the store replied, with data or an error)
    or not (it gave up). The outage ends with the last waiter: told as over when one was answered, and
    forgotten (the next failure is told anew) when every waiter gave up."""
    with _outage_lock:
        _outage["waiters"] = max(0, _outage["waiters"] - 1)
        _outage["answered"] = _outage["answered"] or answered
        if _outage["waiters"]:
            return
        since, answered_any = _outage["since"], _outage["answered"]
        _outage.update(since=None, answered=False)
        if since is None or not answered_any:
            return
        waited = time.monotonic() - since
        _outage["count"] += 1
        _outage["waited_s"] += waited
    log.warning("object store %s answers again after %.0f s; continuing", _endpoint_label(), waited)


_budget_override = threading.local()


@contextmanager
def retry_budget(seconds: float) -> Iterator[None]:
    """Inside the block, this thread's operations wait out an outage for ``seconds`` instead of
    ``retry_budget_s``: 0 for writes that are worth less than the wait (a metrics log that the next
    write rewrites whole), so a training step never blocks on them."""
    previous = getattr(_budget_override, "seconds", None)
    _budget_override.seconds = float(seconds)
    try:
        yield
    finally:
        _budget_override.seconds = previous


def _call(uri: str, action: str, fn: Callable[[], Any], budget_s: float | None = None) -> Any:
    """``fn()`` with errors mapped to one-line StorageErrors; on S3, transient errors are retried with
    backoff until ``budget_s`` (default: this thread's :func:`retry_budget`, else the options'
    ``retry_budget_s``) has passed since the first failure. The final error is the last one's line plus
    how long it waited."""
    def once() -> Any:
        with _errors(uri, action):
            return fn()

    if _split(uri)[0] != "s3":
        return once()

    def give_up(e: BaseException, waited: float, budget: float) -> BaseException:
        return StorageError(f"{e} (store unreachable for {waited:.0f} s, the limit set by "
                            f"storage.retry_budget_s={budget:g})")

    return retry_transient(once, f"{action} {uri}", budget_s, give_up)


def retry_transient(fn: Callable[[], Any], what: str, budget_s: float | None = None,
                    give_up: Callable[[BaseException, float, float], BaseException] | None = None) -> Any:
    """``fn()``, retried with capped exponential backoff while it fails with :func:`is_transient` errors,
    for up to ``budget_s`` seconds from the first failure (None: this thread's :func:`retry_budget`, else
    the options' ``retry_budget_s``). Other errors go through at once. When the budget is spent, raises
    ``give_up(error, waited_s, budget_s)`` (without ``give_up``, or with a budget of 0: the error
    itself). Each outage is said once when it
    begins and once when it ends, however many operations and threads wait on it."""
    if budget_s is None:
        budget_s = getattr(_budget_override, "seconds", None)
    budget = get_options().retry_budget_s if budget_s is None else budget_s
    first_failure: float | None = None
    answered = False
    delay = _BACKOFF_FIRST_S
    try:
        while True:
            try:
                out = fn()
                answered = True
                return out
            except Exception as e:
                if not is_transient(e):
                    answered = True  # the store replied: it is reachable, whatever the reply says
                    raise
                now = time.monotonic()
                waited = 0.0 if first_failure is None else now - first_failure
                left = budget - waited
                if left <= 0 or budget <= 0:
                    if give_up is None or budget <= 0:
                        raise
                    raise give_up(e, waited, budget) from e
                _outage_begins(what, _short(e.__cause__ or e), budget, first=first_failure is None)
                first_failure = now if first_failure is None else first_failure
                time.sleep(min(delay * random.uniform(0.75, 1.25), left))  # the last try lands on the budget
                delay = min(delay * 2, _BACKOFF_MAX_S)
    finally:
        if first_failure is not None:
            _outage_waiter_done(answered)


# --------------------------------------------------------------------------------------------------
# Bytes, text, JSON
# --------------------------------------------------------------------------------------------------


def _atomic_write(uri: str, write_fn: Callable[[IO[bytes]], None]) -> None:
    """Run ``write_fn(file)`` so that ``uri`` ends up either unchanged or fully written.

    Local: write to ``.{name}.tmp-{uuid}`` in the target directory, fsync, then ``os.replace``
    (atomic within one filesystem); a crash leaves at most that hidden temp file, which
    ``list_files`` skips. Local writes use Python's ``open`` rather than pyarrow because pyarrow's
    streams expose no fsync.

    S3: one PUT or a completed multipart upload is atomic - the object appears only once complete
    - so we write straight to the final key. ``write_fn`` first fills an in-memory buffer, because a
    pyarrow S3 stream that is closed after an exception *completes* the upload with partial data
    (there is no abort in the Python API); buffering means a failing ``write_fn`` uploads nothing.
    Artifacts are sharded, so the buffer stays small.
    """
    kind, path = _split(uri)
    if kind == "s3":
        buf = io.BytesIO()
        write_fn(buf)
        fs, key = resolve(uri)

        def put() -> None:
            with fs.open_output_stream(key) as out:
                out.write(buf.getbuffer())

        _call(uri, "write", put)
        return

    target = os.path.abspath(path)
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    with _errors(uri, "write"):
        os.makedirs(directory, exist_ok=True)
        try:
            with open(tmp, "xb") as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself; best effort because not every filesystem supports it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_bytes(uri: str) -> bytes:
    """The whole object or file."""
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _call(uri, "read", read)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically write ``data``, creating parent directories."""
    _atomic_write(uri, lambda f: f.write(data))


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StorageError(f"not valid UTF-8 text: {uri}: {e}") from e


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StorageError(f"not valid JSON: {uri}: {e}") from e


def write_json(uri: str, obj: Any) -> None:
    """Atomic, with sorted keys and indentation so artifacts diff cleanly."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Listing and deleting
# --------------------------------------------------------------------------------------------------


def check_writable_root(uri: str) -> None:
    """Fail in one line unless ``uri``'s store is reachable and, on S3, its bucket exists (a run would
    otherwise fail only at its first write, after models have loaded).

    This first contact is not retried: a wrong endpoint is one line at once, not minutes of waiting
    for a store that never answers; once stages run, outages are waited out."""
    kind, path = _split(uri)
    if kind != "s3":
        return
    bucket = path.split("/", 1)[0]
    fs = _s3_filesystem()
    info = _call(uri, "check", lambda: fs.get_file_info(bucket), budget_s=0)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket does not exist: s3://{bucket} (for {uri}) at {_endpoint_label()}; create it "
                           "or fix output_uri / storage.endpoint_url")


def exists(uri: str) -> bool:
    """True for an existing file, or a directory / S3 prefix that holds objects."""
    fs, path = resolve(uri)
    return _call(uri, "check", lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound


def size(uri: str) -> int | None:
    """Bytes of the file at ``uri`` (a metadata request, nothing read); None when there is no such file."""
    fs, path = resolve(uri)
    info = _call(uri, "check", lambda: fs.get_file_info(path))
    return info.size if info.type == pafs.FileType.File else None


def list_files(uri: str, suffix: str | None = None, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under ``uri`` (same scheme style as ``uri``); ``[]`` if absent.

    Hidden temp files of interrupted local writes are skipped. A missing S3 bucket is an error
    rather than ``[]`` so a typo in the bucket name is not mistaken for "no shards yet".
    """
    kind, _ = _split(uri)
    fs, base = resolve(uri)
    base = base.rstrip("/")
    infos = _call(uri, "list", lambda: fs.get_file_info(
        pafs.FileSelector(base or "/", recursive=recursive, allow_not_found=True)))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if _TEMP_RE.match(info.base_name):
            continue
        if suffix is not None and not info.path.endswith(suffix):
            continue
        rel = info.path[len(base):].lstrip("/") if info.path.startswith(base) else info.path
        out.append(join(uri, rel))
    if not out and kind == "s3" and _bucket_missing(base):
        raise StorageError(f"bucket does not exist: s3://{base.split('/', 1)[0]} (for {uri})")
    return sorted(out)


def delete(uri: str) -> None:
    """Delete one file/object; a missing one is fine (deletes are idempotent for retries)."""
    fs, path = resolve(uri)

    def remove() -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    _call(uri, "delete", remove)


def delete_dir(uri: str) -> None:
    """Delete a directory / prefix recursively; a missing one is fine."""
    kind, _ = _split(uri)
    fs, path = resolve(uri)
    path = path.rstrip("/")

    def remove() -> None:
        try:
            if kind == "s3" and "/" not in path:
                # A bare bucket: empty it but never delete the bucket itself.
                fs.delete_dir_contents(path, missing_dir_ok=True)
            else:
                fs.delete_dir(path)
        except FileNotFoundError:
            pass

    _call(uri, "delete", remove)


# --------------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------------


def write_parquet(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """Atomic zstd-compressed Parquet (good ratio, fast decode for embeddings and ids).

    ``row_group_size`` small (e.g. 1) makes single rows cheap to fetch with :func:`read_parquet_rows`
    (one ranged read on S3 instead of the whole file).
    """
    _atomic_write(uri, lambda f: pq.write_table(table, f, compression="zstd", row_group_size=row_group_size))


def _invalid_parquet(uri: str, e: BaseException) -> StorageError:
    """A Parquet read that failed: an outage (retried by :func:`_call`) or a corrupt file (not)."""
    if _split(uri)[0] == "s3" and is_transient(e):
        return _storage_error(uri, "read", e)
    return StorageError(f"not a valid Parquet file: {uri}: {_short(e)}")


def _with_parquet(uri: str, fn: Callable[[pq.ParquetFile], Any]) -> Any:
    """``fn(ParquetFile)`` on an open file; the whole read is one retried operation (ranged reads on S3
    happen inside ``fn``, so an outage in the middle of them is waited out as well)."""
    fs, path = resolve(uri)

    def once() -> Any:
        f = fs.open_input_file(path)
        try:
            try:
                pf = pq.ParquetFile(f)
            except (OSError, pa.ArrowException) as e:
                raise _invalid_parquet(uri, e) from e
            try:
                return fn(pf)
            except (OSError, pa.ArrowException) as e:
                raise _invalid_parquet(uri, e) from e
        finally:
            f.close()

    return _call(uri, "read", once)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, optionally only ``columns`` (unknown names are an error, not empty)."""

    def read(pf: pq.ParquetFile) -> pa.Table:
        if columns is not None:
            names = pf.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise StorageError(f"columns {missing} not in Parquet file {uri} (has {names})")
        return pf.read(columns=columns)

    return _with_parquet(uri, read)


def read_parquet_rows(uri: str, rows: list[int], columns: list[str] | None = None) -> pa.Table:
    """Only the given rows (in the given order), reading just the row groups that hold them."""

    def read(pf: pq.ParquetFile) -> pa.Table:
        md = pf.metadata
        starts, acc = [], 0
        for g in range(md.num_row_groups):
            starts.append(acc)
            acc += md.row_group(g).num_rows
        if any(r < 0 or r >= acc for r in rows):
            raise StorageError(f"row index out of range for {uri} ({acc} rows)")
        groups = sorted({max(g for g in range(len(starts)) if starts[g] <= r) for r in rows})
        table = pf.read_row_groups(groups, columns=columns)
        offset = {g: sum(md.row_group(x).num_rows for x in groups[:i]) for i, g in enumerate(groups)}
        take = []
        for r in rows:
            g = max(x for x in groups if starts[x] <= r)
            take.append(offset[g] + r - starts[g])
        return table.take(pa.array(take, pa.int64()))

    return _with_parquet(uri, read)


def parquet_num_rows(uri: str) -> int:
    """Row count from the footer, without reading any column data."""
    return _with_parquet(uri, lambda pf: int(pf.metadata.num_rows))


# --------------------------------------------------------------------------------------------------
# Tensors (safetensors only: loading pickles from a shared bucket would execute arbitrary code)
# --------------------------------------------------------------------------------------------------


def save_tensors(
    uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) as a safetensors file."""
    from safetensors.torch import save

    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise StorageError(
                f"safetensors metadata must map str to str; bad keys {bad} for {uri}"
            )
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    data = save(cpu, metadata=metadata)
    write_bytes(uri, data)


def _safetensors_metadata(uri: str, data: bytes) -> dict[str, str]:
    """Validate the safetensors header and return its ``__metadata__`` (the format is
    8-byte little-endian header length, then a JSON header)."""
    if len(data) < 8:
        raise StorageError(f"not a valid safetensors file: {uri}: only {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > len(data) - 8:
        raise StorageError(f"not a valid safetensors file: {uri}: bad header length {n}")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"not a valid safetensors file: {uri}: header is not JSON") from e
    if not isinstance(header, dict):
        raise StorageError(f"not a valid safetensors file: {uri}: header is not an object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise StorageError(f"not a valid safetensors file: {uri}: __metadata__ is not an object")
    return {str(k): str(v) for k, v in meta.items()}


def load_tensors(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file: ``(tensors on CPU, metadata)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_bytes(uri)
    metadata = _safetensors_metadata(uri, data)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise StorageError(f"not a valid safetensors file: {uri}: {_short(e)}") from e
    return tensors, metadata
