"""A pyarrow filesystem that waits out object-store outages, for code that takes a filesystem.

diclip's own reads and writes go through :mod:`diclip.storage.fs`, which retries. Ray Train (checkpoint
uploads, its run snapshot) takes a ``pyarrow.fs.FileSystem`` and calls it directly (as would Ray Data's
readers, which no stage uses: the cache reduce reads its shards through :mod:`diclip.storage`);
with the bare S3 filesystem a store restart fails the checkpoint upload, and Ray Train's retry of the
worker group starts at once and fails again while the store is still down. Wrapped in this handler,
every call they make (opening a stream, listing, creating, deleting) is retried the same way, and errors
that are answers (no such key) reach them unchanged, as the exception types they expect.

Bytes written to an already open stream are not retried here: an outage that begins in the middle of an
upload still fails that upload (Ray Train then restarts the worker group, whose first calls wait).
"""
from __future__ import annotations

from typing import Any, Callable

import pyarrow.fs as pafs

from diclip.storage import outages
from diclip.storage.options import get_options


class RetryingHandler(pafs.FileSystemHandler):
    """Delegates to ``inner``; each call is one :func:`diclip.storage.outages.retry_transient` operation with
    ``budget_s`` (it travels with the filesystem to Ray Train's controller and workers, which are not
    configured by a job spec)."""

    def __init__(self, inner: pafs.FileSystem, budget_s: float):
        self.inner = inner
        self.budget_s = float(budget_s)

    def __reduce__(self):
        return RetryingHandler, (self.inner, self.budget_s)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, RetryingHandler) and self.inner.equals(other.inner) and self.budget_s == other.budget_s

    def __ne__(self, other: Any) -> bool:
        return not self == other

    def _do(self, what: str, path: str, fn: Callable[[], Any]) -> Any:
        return outages.retry_transient(fn, f"{what} {path}", self.budget_s)

    def get_type_name(self) -> str:
        return f"retrying+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._do("check", ", ".join(paths[:3]), lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._do("list", selector.base_dir, lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._do("create", path, lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._do("delete", path, lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._do("delete", path, lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        self._do("delete", "/", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self._do("delete", path, lambda: self.inner.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._do("move", src, lambda: self.inner.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._do("copy", src, lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path: str):
        return self._do("read", path, lambda: self.inner.open_input_stream(path))

    def open_input_file(self, path: str):
        return self._do("read", path, lambda: self.inner.open_input_file(path))

    def open_output_stream(self, path: str, metadata: Any):
        return self._do("write", path, lambda: self.inner.open_output_stream(path, metadata=metadata))

    def open_append_stream(self, path: str, metadata: Any):
        return self._do("write", path, lambda: self.inner.open_append_stream(path, metadata=metadata))


def retrying(inner: pafs.FileSystem, budget_s: float | None = None) -> pafs.FileSystem:
    """``inner`` wrapped so its calls wait out outages for ``budget_s`` (None: the process's
    ``retry_budget_s``); a local filesystem is returned as it is (nothing to wait for)."""
    if isinstance(inner, pafs.LocalFileSystem):
        return inner
    budget = get_options().retry_budget_s if budget_s is None else budget_s
    return pafs.PyFileSystem(RetryingHandler(inner, budget))
