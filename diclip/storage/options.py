"""How this process reaches the object store: :class:`StorageOptions`, set once per process with
:func:`configure` (a job's ``storage`` section, through :func:`options_from`), and the endpoint and region
they resolve to together with the AWS environment variables."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.fs as pafs


@dataclass
class StorageOptions:
    """How to reach the object store; set once per process with :func:`configure`."""

    endpoint_url: str | None = None  # None -> AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # None -> AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    max_attempts: int = 3  # attempts of one request inside the AWS SDK (a fraction of a second in all)
    retry_budget_s: float = 600.0  # seconds an operation waits out an unreachable store (retry_transient)


lock = threading.Lock()
_options = StorageOptions()
s3_clients: dict[tuple, pafs.S3FileSystem] = {}  # built by diclip.storage.fs, per settings


def options_from(cfg: Any) -> StorageOptions:
    """The options a job's ``storage`` section (:class:`diclip.config.StorageConfig`) asks for."""
    return StorageOptions(endpoint_url=cfg.endpoint_url, region=cfg.region, max_attempts=int(cfg.max_attempts),
                          retry_budget_s=float(cfg.retry_budget_s))


def configure(options: StorageOptions | None) -> None:
    """Set the process-wide storage options (``None`` resets to env defaults).

    Cached filesystems are dropped so the next call picks up the new endpoint/timeouts.
    """
    global _options
    with lock:
        new = replace(options) if options is not None else StorageOptions()
        if new == _options:  # the same settings again (a Ray task's per-batch setup): keep the warm clients
            return
        _options = new
        s3_clients.clear()


def get_options() -> StorageOptions:
    """A copy of the current process-wide options (mutating it has no effect)."""
    with lock:
        return replace(_options)


def s3_settings() -> tuple[str | None, str, StorageOptions]:
    """(endpoint or None for AWS, region, options): the options first, then the AWS environment variables."""
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


def endpoint_label() -> str:
    """The store as messages name it: its endpoint, or AWS S3 and the region."""
    endpoint, region, _ = s3_settings()
    return endpoint or f"AWS S3 ({region})"
