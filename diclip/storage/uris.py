"""URIs as diclip spells them: plain paths (relative stays relative), ``file://`` and ``s3://bucket/key``."""
from __future__ import annotations

import os

from diclip.errors import StorageError

SUPPORTED_SCHEMES = ("file://", "s3://")


def split_uri(uri: str) -> tuple[str, str]:
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
    return split_uri(uri)[0] == "s3"


def to_uri(path_or_uri: str) -> str:
    """Normalise to the canonical spelling used in configs and manifests.

    ``file:///abs/p`` becomes ``/abs/p``; relative paths stay relative on purpose (so run dirs
    remain relocatable and match what the user typed); ``s3://`` URIs lose trailing slashes.
    """
    kind, path = split_uri(path_or_uri)
    if kind == "s3":
        return "s3://" + path
    return path


def local_path(uri: str) -> str | None:
    """Absolute local path for a local URI (for libraries that need a real file), else ``None``."""
    kind, path = split_uri(uri)
    return os.path.abspath(path) if kind == "local" else None


def join(uri: str, *parts: str) -> str:
    """Join path segments with ``/``, keeping the scheme of ``uri``.

    Leading/trailing slashes on ``parts`` are ignored (a part never restarts at the root, which
    would silently escape the bucket), and empty parts are skipped.
    """
    split_uri(uri)  # validate the scheme early
    prefix, sep, rest = uri.partition("://") if "://" in uri else ("", "", uri)
    out = rest.rstrip("/") or ("/" if rest.startswith("/") else "")
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") or not out else f"{out}/{part}"
    return prefix + sep + out
