"""Read, write, list and delete bytes and JSON at a URI, locally or on S3 (Parquet and tensors:
:mod:`diclip.storage.formats`; options: :mod:`~diclip.storage.options`; URIs: :mod:`~diclip.storage.uris`;
waiting out a store that is away: :mod:`~diclip.storage.outages`).

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
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from diclip.errors import StorageError
from diclip.logging import get_logger
from diclip.storage.options import endpoint_label, lock, s3_clients, s3_settings
from diclip.storage.outages import is_transient, retry_transient, short_reason
from diclip.storage.uris import join, split_uri as _split

log = get_logger(__name__)

# Hidden temp files left behind by a crashed local write: ".{name}.tmp-{uuid4 hex}".
_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


_local_fs = pafs.LocalFileSystem()


# --------------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------------


def _s3_filesystem() -> pafs.S3FileSystem:
    """Build (or reuse) the S3 filesystem for the current options and environment.

    pyarrow ignores ``endpoint_url`` from ``~/.aws/config``, so endpoint and static credentials are
    read from the environment here; without static credentials the AWS SDK's default chain runs.
    """
    endpoint, region, opts = s3_settings()
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
    with lock:
        fs = s3_clients.get(key)
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
        s3_clients[key] = fs
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


def _bucket_missing(path: str) -> bool:
    """Best-effort check used only on the error path to name a missing bucket precisely."""
    try:
        bucket = path.split("/", 1)[0]
        return _s3_filesystem().get_file_info(bucket).type == pafs.FileType.NotFound
    except Exception:  # noqa: BLE001 - this is a diagnostic probe; the original error wins
        return False


def storage_error(uri: str, action: str, e: BaseException) -> StorageError:
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
                f"cannot reach object store at {endpoint_label()} for {uri}: {short_reason(e)}"
            )
        if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID",
                                   "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId")):
            return StorageError(
                f"access denied to {uri} at {endpoint_label()}: {short_reason(e)} "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(e, FileNotFoundError):
            if _bucket_missing(path):
                return StorageError(f"bucket does not exist: s3://{bucket} (for {uri})")
            return StorageError(f"no such object: {uri}")
    elif isinstance(e, FileNotFoundError):
        return StorageError(f"no such file: {uri}")
    return StorageError(f"cannot {action} {uri}: {short_reason(e)}")


@contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Turn pyarrow/OS errors inside the block into one-line StorageErrors naming ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise storage_error(uri, action, e) from e


def store_call(uri: str, action: str, fn: Callable[[], Any], budget_s: float | None = None) -> Any:
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


# --------------------------------------------------------------------------------------------------
# Bytes, text, JSON
# --------------------------------------------------------------------------------------------------


def atomic_write(uri: str, write_fn: Callable[[IO[bytes]], None]) -> None:
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

        store_call(uri, "write", put)
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

    return store_call(uri, "read", read)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically write ``data``, creating parent directories."""
    atomic_write(uri, lambda f: f.write(data))


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
    info = store_call(uri, "check", lambda: fs.get_file_info(bucket), budget_s=0)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket does not exist: s3://{bucket} (for {uri}) at {endpoint_label()}; create it "
                           "or fix output_uri / storage.endpoint_url")


def exists(uri: str) -> bool:
    """True for an existing file, or a directory / S3 prefix that holds objects."""
    fs, path = resolve(uri)
    return store_call(uri, "check", lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound


def size(uri: str) -> int | None:
    """Bytes of the file at ``uri`` (a metadata request, nothing read); None when there is no such file."""
    fs, path = resolve(uri)
    info = store_call(uri, "check", lambda: fs.get_file_info(path))
    return info.size if info.type == pafs.FileType.File else None


def list_files(uri: str, suffix: str | None = None, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under ``uri`` (same scheme style as ``uri``); ``[]`` if absent.

    Hidden temp files of interrupted local writes are skipped. A missing S3 bucket is an error
    rather than ``[]`` so a typo in the bucket name is not mistaken for "no shards yet".
    """
    kind, _ = _split(uri)
    fs, base = resolve(uri)
    base = base.rstrip("/")
    infos = store_call(uri, "list", lambda: fs.get_file_info(
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

    store_call(uri, "delete", remove)


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

    store_call(uri, "delete", remove)
