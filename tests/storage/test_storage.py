"""diclip.storage against real local disk and a real S3 endpoint (SeaweedFS)."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diclip import storage
from diclip.errors import StorageError
from diclip.storage import fs as sfs


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def reset_storage():
    """For tests that call configure() themselves without the s3_bucket fixture."""
    yield
    storage.configure(None)


# ---------------------------------------------------------------------------------------------
# Round trips on both backends
# ---------------------------------------------------------------------------------------------


def test_bytes_text_json_roundtrip(storage_root):
    b = storage.join(storage_root, "a", "blob.bin")
    payload = bytes(range(256)) * 10
    assert storage.size(b) is None  # no file yet
    storage.write_bytes(b, payload)
    assert storage.read_bytes(b) == payload and storage.size(b) == len(payload)
    storage.write_bytes(b, b"second")  # overwrite replaces
    assert storage.read_bytes(b) == b"second" and storage.size(b) == 6
    assert storage.size(storage.join(storage_root, "a")) is None  # a directory / prefix is not a file

    t = storage.join(storage_root, "notes.txt")
    storage.write_text(t, "héllo\nwörld")
    assert storage.read_text(t) == "héllo\nwörld"

    j = storage.join(storage_root, "deep", "er", "x.json")
    obj = {"b": [1, 2.5, None, True], "a": {"z": "s"}}
    storage.write_json(j, obj)
    assert storage.read_json(j) == obj
    # indent=2, sort_keys=True: stable bytes for diffs
    assert storage.read_text(j).startswith('{\n  "a": {')


def test_parquet_roundtrip(storage_root):
    uri = storage.join(storage_root, "shards", "part-00000.parquet")
    table = pa.table(
        {
            "item_id": pa.array([f"id{i}" for i in range(50)], pa.string()),
            "score": pa.array([i / 7 for i in range(50)], pa.float32()),
            "label": pa.array(list(range(50)), pa.int64()),
        }
    )
    storage.write_parquet(uri, table)
    assert storage.read_parquet(uri).equals(table)
    assert storage.parquet_num_rows(uri) == 50
    sub = storage.read_parquet(uri, columns=["label", "item_id"])
    assert sub.column_names == ["label", "item_id"]
    assert sub.column("label").to_pylist() == list(range(50))
    # zstd, as promised
    meta = pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri))).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    with pytest.raises(StorageError) as err:
        storage.read_parquet(uri, columns=["nope"])
    assert "nope" in _one_line(err)


def test_tensors_roundtrip(storage_root):
    uri = storage.join(storage_root, "cache", "feat.safetensors")
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(2, 5).to(torch.float16),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8),
        "i64": torch.arange(10, dtype=torch.int64) * 2**40,
        "bool": torch.tensor([True, False, True]),
        "noncontig": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    }
    meta = {"model": "ViT-B-16/openai", "grid": "14x14"}
    storage.save_tensors(uri, tensors, metadata=meta)
    loaded, loaded_meta = storage.load_tensors(uri)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    assert loaded_meta == meta

    storage.save_tensors(uri, {"x": torch.zeros(1)})
    _, empty_meta = storage.load_tensors(uri)
    assert empty_meta == {}


def test_list_files_exact_sorted_uris(storage_root):
    root = storage.join(storage_root, "stage")
    names = ["b.parquet", "a.parquet", "sub/c.parquet", "sub/deeper/d.parquet", "sub/x.json"]
    for n in names:
        storage.write_bytes(storage.join(root, n), n.encode())

    all_files = storage.list_files(root)
    assert all_files == sorted(storage.join(root, n) for n in names)
    for uri in all_files:  # the URIs are usable as-is
        assert storage.read_bytes(uri).decode() == uri[len(root) + 1 :]

    assert storage.list_files(root, suffix=".parquet") == [
        storage.join(root, n)
        for n in ["a.parquet", "b.parquet", "sub/c.parquet", "sub/deeper/d.parquet"]
    ]
    assert storage.list_files(root, suffix=".parquet", recursive=False) == [
        storage.join(root, "a.parquet"),
        storage.join(root, "b.parquet"),
    ]
    assert storage.list_files(root + "/", suffix=".json") == [storage.join(root, "sub/x.json")]
    assert storage.list_files(storage.join(storage_root, "missing")) == []


def test_list_files_keeps_relative_and_file_scheme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("runs/demo/x.bin", b"1")
    assert storage.list_files("runs/demo") == ["runs/demo/x.bin"]
    assert storage.list_files("runs") == ["runs/demo/x.bin"]
    file_uri = f"file://{tmp_path}/runs"
    assert storage.list_files(file_uri) == [f"file://{tmp_path}/runs/demo/x.bin"]
    assert storage.read_bytes(f"file://{tmp_path}/runs/demo/x.bin") == b"1"
    assert storage.local_path("runs/demo/x.bin") == str(tmp_path / "runs/demo/x.bin")
    assert storage.local_path(file_uri) == str(tmp_path / "runs")


def test_exists_file_prefix_missing(storage_root):
    f = storage.join(storage_root, "dir", "sub", "f.bin")
    storage.write_bytes(f, b"x")
    assert storage.exists(f)
    assert storage.exists(storage.join(storage_root, "dir"))
    assert storage.exists(storage.join(storage_root, "dir", "sub"))
    assert not storage.exists(storage.join(storage_root, "dir", "nope.bin"))
    assert not storage.exists(storage.join(storage_root, "other"))
    # a sibling whose name merely starts with the prefix is not inside it
    assert not storage.exists(storage.join(storage_root, "di"))


def test_delete_and_delete_dir(storage_root):
    a = storage.join(storage_root, "d", "a.bin")
    b = storage.join(storage_root, "d", "nested", "b.bin")
    keep = storage.join(storage_root, "keep.bin")
    for u in (a, b, keep):
        storage.write_bytes(u, b"1")

    storage.delete(a)
    assert not storage.exists(a)
    storage.delete(a)  # idempotent
    assert storage.exists(b)

    storage.delete_dir(storage.join(storage_root, "d"))
    assert not storage.exists(b)
    assert storage.list_files(storage.join(storage_root, "d")) == []
    storage.delete_dir(storage.join(storage_root, "d"))  # idempotent
    storage.delete_dir(storage.join(storage_root, "never-existed"))
    assert storage.read_bytes(keep) == b"1"


def test_delete_dir_bucket_root_empties_bucket(s3_bucket):
    storage.write_bytes(storage.join(s3_bucket, "x", "y.bin"), b"1")
    storage.delete_dir(s3_bucket)
    assert storage.list_files(s3_bucket) == []
    storage.write_bytes(storage.join(s3_bucket, "z.bin"), b"2")  # bucket itself survives
    assert storage.list_files(s3_bucket) == [f"{s3_bucket}/z.bin"]


# ---------------------------------------------------------------------------------------------
# URI helpers
# ---------------------------------------------------------------------------------------------


def test_join_all_schemes():
    assert storage.join("s3://b/x", "y", "z.parquet") == "s3://b/x/y/z.parquet"
    assert storage.join("s3://b/x/", "/y/", "z") == "s3://b/x/y/z"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("runs/demo", "a") == "runs/demo/a"
    assert storage.join("/abs/p", "a", "b.json") == "/abs/p/a/b.json"
    assert storage.join("/", "a") == "/a"
    assert storage.join("file:///abs/p", "a") == "file:///abs/p/a"
    assert storage.join("file:///", "a") == "file:///a"
    assert storage.join("runs", "", "a") == "runs/a"
    assert storage.join("runs/demo") == "runs/demo"


def test_uri_helpers():
    assert storage.to_uri("file:///abs/p") == "/abs/p"
    assert storage.to_uri("rel/p") == "rel/p"
    assert storage.to_uri("s3://b/k/") == "s3://b/k"
    assert storage.is_remote("s3://b/k")
    assert not storage.is_remote("/abs")
    assert not storage.is_remote("file:///abs")
    assert not storage.is_remote("rel")
    assert storage.local_path("s3://b/k") is None
    assert storage.local_path("/abs/p") == "/abs/p"


def test_resolve_caches_s3_filesystem_and_new_settings_drop_it(reset_storage):
    storage.configure(storage.StorageOptions(endpoint_url="http://127.0.0.1:9", region="eu-west-1"))
    fs1, p1 = storage.resolve("s3://bkt/a/b")
    fs2, _ = storage.resolve("s3://bkt/other")
    assert p1 == "bkt/a/b" and fs1 is fs2
    assert fs1.region == "eu-west-1"
    assert storage.get_options().endpoint_url == "http://127.0.0.1:9"
    storage.configure(storage.StorageOptions(endpoint_url="http://127.0.0.1:9", region="eu-west-1"))
    assert storage.resolve("s3://bkt/a")[0] is fs1  # the same settings again (a task's per-batch setup): kept warm
    storage.configure(storage.StorageOptions(endpoint_url="http://127.0.0.1:9", region="eu-west-2"))
    fs3, _ = storage.resolve("s3://bkt/a")
    assert fs3 is not fs1 and fs3.region == "eu-west-2"
    storage.configure(None)
    assert storage.get_options() == storage.StorageOptions()
    local_fs, lp = storage.resolve("rel/x")
    assert lp == os.path.abspath("rel/x")
    assert local_fs.type_name == "local"


# ---------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_atomic_write_failure_leaves_target_unchanged(storage_root):
    target = storage.join(storage_root, "data", "obj.bin")
    storage.write_bytes(target, b"old content")

    def half_then_fail(f):
        f.write(b"new partial")
        raise Boom

    with pytest.raises(Boom):
        sfs.atomic_write(target, half_then_fail)
    assert storage.read_bytes(target) == b"old content"

    fresh = storage.join(storage_root, "data", "fresh.bin")
    with pytest.raises(Boom):
        sfs.atomic_write(fresh, half_then_fail)
    assert not storage.exists(fresh)
    assert storage.list_files(storage.join(storage_root, "data")) == [target]
    local_dir = storage.local_path(storage.join(storage_root, "data"))
    if local_dir is not None:  # the failed writes cleaned up their hidden temp files too
        assert os.listdir(local_dir) == ["obj.bin"]


def test_atomic_parquet_failure_mid_write(storage_root, monkeypatch):
    target = storage.join(storage_root, "p", "t.parquet")
    old = pa.table({"a": [1, 2, 3]})
    storage.write_parquet(target, old)
    real_write_table = pq.write_table

    def write_then_fail(table, where, **kw):
        real_write_table(table, where, **kw)  # bytes really reach the file...
        raise Boom  # ...then the writer dies before the commit

    monkeypatch.setattr(pq, "write_table", write_then_fail)
    with pytest.raises(Boom):
        storage.write_parquet(target, pa.table({"a": [9]}))
    monkeypatch.undo()
    assert storage.read_parquet(target).equals(old)
    assert storage.list_files(storage.join(storage_root, "p")) == [target]


def test_local_crash_leftover_temp_file_is_hidden(tmp_path):
    target = tmp_path / "out" / "m.json"
    storage.write_json(str(target), {"v": 1})
    # A writer that died between open and os.replace leaves exactly this kind of file behind.
    leftover = target.parent / ".m.json.tmp-0123456789abcdef0123456789abcdef"
    leftover.write_bytes(b"{partial")
    assert storage.list_files(str(tmp_path)) == [str(target)]
    assert storage.read_json(str(target)) == {"v": 1}
    # successful writes leave no temp files behind
    assert sorted(os.listdir(target.parent)) == sorted([leftover.name, "m.json"])


def test_local_write_creates_parents_with_normal_permissions(tmp_path):
    target = tmp_path / "a" / "b" / "c.bin"
    storage.write_bytes(str(target), b"z")
    assert target.read_bytes() == b"z"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Manifest convention
# ---------------------------------------------------------------------------------------------


def _manifest(stage_uri: str) -> storage.Manifest:
    cfg = {"batch_size": 8, "model": {"name": "ViT-B-16"}}
    return storage.Manifest(
        stage="embed",
        shards=[storage.ShardInfo("shards/part-00000-ab12cd.parquet", 5)],
        num_items=5,
        num_failed=1,
        config=cfg,
        config_hash=storage.config_hash(cfg),
        package_version="0.1.0",
        models={"clip": "ViT-B-16/openai"},
        created_at="2026-01-01T00:00:00+00:00",
        extra={"grid": [14, 14]},
    )


def test_manifest_roundtrip_and_completion(storage_root):
    stage = storage.join(storage_root, "stages", "embed")
    assert not storage.is_complete(stage)
    assert storage.read_manifest(stage) is None
    m = _manifest(stage)
    storage.write_manifest(stage, m)
    assert storage.is_complete(stage)
    assert storage.read_manifest(stage) == m
    assert storage.list_files(stage) == [storage.join(stage, storage.MANIFEST_NAME)]
    assert storage.read_json(storage.join(stage, "manifest.json"))["shards"] == [
        {"path": "shards/part-00000-ab12cd.parquet", "rows": 5}
    ]


def test_manifest_defaults():
    import diclip

    m = storage.Manifest(
        stage="s", shards=[], num_items=0, num_failed=0, config={}, config_hash="h"
    )
    assert m.package_version == diclip.__version__
    assert m.created_at.endswith("+00:00")
    assert storage.Manifest.from_dict(m.to_dict()) == m


def test_failures_roundtrip(storage_root):
    stage = storage.join(storage_root, "stage")
    assert storage.read_failures(stage) == []
    storage.write_failures(stage, [])
    uri = storage.join(stage, storage.FAILURES_NAME)
    assert storage.exists(uri)
    assert storage.parquet_num_rows(uri) == 0
    assert storage.read_parquet(uri).schema == pa.schema(
        [("item_id", pa.string()), ("error", pa.string())]
    )
    assert storage.read_failures(stage) == []
    rows = [("img_001", "decode error: truncated"), ("img_017", "missing file")]
    storage.write_failures(stage, rows)
    assert storage.read_failures(stage) == rows


def test_config_hash_is_canonical():
    a = storage.config_hash({"x": 1, "y": {"b": 2, "a": [1, 2]}})
    b = storage.config_hash({"y": {"a": [1, 2], "b": 2}, "x": 1})
    assert a == b and len(a) == 16 and int(a, 16) >= 0
    assert storage.config_hash({"x": 2, "y": {"b": 2, "a": [1, 2]}}) != a


def test_manifest_unknown_key_and_corrupt(tmp_path):
    stage = str(tmp_path / "stage")
    d = _manifest(stage).to_dict()
    d["surprise"] = 1
    with pytest.raises(StorageError) as err:
        storage.Manifest.from_dict(d)
    assert "surprise" in _one_line(err)

    storage.write_json(storage.join(stage, "manifest.json"), d)
    with pytest.raises(StorageError) as err:
        storage.read_manifest(stage)
    assert "surprise" in _one_line(err) and "manifest.json" in str(err.value)

    d2 = _manifest(stage).to_dict()
    d2["shards"][0]["bogus"] = 3
    with pytest.raises(StorageError) as err:
        storage.Manifest.from_dict(d2)
    assert "bogus" in _one_line(err)

    d3 = _manifest(stage).to_dict()
    del d3["config_hash"]
    with pytest.raises(StorageError) as err:
        storage.Manifest.from_dict(d3)
    assert "config_hash" in _one_line(err)

    storage.write_text(storage.join(stage, "manifest.json"), '{"stage": "embed",\n')
    with pytest.raises(StorageError) as err:
        storage.read_manifest(stage)
    assert "manifest.json" in _one_line(err) and "JSON" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_local_file(tmp_path):
    uri = str(tmp_path / "nope.bin")
    with pytest.raises(StorageError) as err:
        storage.read_bytes(uri)
    assert _one_line(err) == f"no such file: {uri}"
    with pytest.raises(StorageError) as err:
        storage.read_parquet(uri)
    assert _one_line(err) == f"no such file: {uri}"
    with pytest.raises(StorageError) as err:
        storage.load_tensors(uri)
    assert _one_line(err) == f"no such file: {uri}"


def test_missing_s3_object(s3_bucket):
    uri = f"{s3_bucket}/a/nope.bin"
    with pytest.raises(StorageError) as err:
        storage.read_bytes(uri)
    assert _one_line(err) == f"no such object: {uri}"
    with pytest.raises(StorageError) as err:
        storage.parquet_num_rows(uri)
    assert _one_line(err) == f"no such object: {uri}"


@pytest.fixture
def aws_like_s3(monkeypatch, reset_storage):
    """moto, where an emulator is really needed: like AWS it refuses a write to a missing bucket, which the
    SeaweedFS gateway (Admin identity) answers by creating the bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    storage.configure(storage.StorageOptions(endpoint_url=f"http://{host}:{port}"))
    try:
        yield
    finally:
        server.stop()


def test_missing_bucket(aws_like_s3):
    uri = "s3://diclip-no-such-bucket-xyz/k.json"
    with pytest.raises(StorageError) as err:
        storage.read_bytes(uri)
    msg = _one_line(err)
    assert "bucket does not exist" in msg and "diclip-no-such-bucket-xyz" in msg
    with pytest.raises(StorageError) as err:
        storage.write_json(uri, {"a": 1})
    msg = _one_line(err)
    assert "bucket does not exist" in msg and "diclip-no-such-bucket-xyz" in msg
    with pytest.raises(StorageError) as err:
        storage.list_files("s3://diclip-no-such-bucket-xyz/prefix")
    assert "bucket does not exist" in _one_line(err)
    assert not storage.exists(uri)


@pytest.mark.timeout(120)  # a hang guard: the claim is "an error, not a hang", not a speed
def test_unreachable_endpoint_fails_fast(reset_storage):
    storage.configure(
        storage.StorageOptions(
            endpoint_url="http://127.0.0.1:1", max_attempts=1, connect_timeout_s=1, retry_budget_s=0
        )
    )
    for op in (
        lambda: storage.read_bytes("s3://bkt/k"),
        lambda: storage.write_bytes("s3://bkt/k", b"x"),
        lambda: storage.list_files("s3://bkt/prefix"),
        lambda: storage.exists("s3://bkt/k"),
    ):
        with pytest.raises(StorageError) as err:
            op()
        msg = _one_line(err)
        assert "cannot reach object store at http://127.0.0.1:1" in msg
        assert "s3://bkt/" in msg


@pytest.mark.parametrize("uri", ["gs://bucket/key", "http://host/x", "hdfs://nn/p"])
def test_unsupported_scheme(uri):
    with pytest.raises(StorageError) as err:
        storage.read_bytes(uri)
    msg = _one_line(err)
    assert uri in msg and "s3://" in msg and "file://" in msg
    with pytest.raises(StorageError):
        storage.join(uri, "a")
    with pytest.raises(StorageError):
        storage.is_remote(uri)


def test_bad_file_uri():
    with pytest.raises(StorageError) as err:
        storage.read_bytes("file://relative/path")
    assert "file:///" in _one_line(err)


def test_corrupt_parquet(storage_root):
    uri = storage.join(storage_root, "bad.parquet")
    storage.write_bytes(uri, b"this is not parquet at all, just some bytes" * 3)
    for fn in (storage.read_parquet, storage.parquet_num_rows):
        with pytest.raises(StorageError) as err:
            fn(uri)
        assert _one_line(err).startswith(f"not a valid Parquet file: {uri}: ")


def test_load_tensors_rejects_non_safetensors(storage_root):
    import io

    bad = storage.join(storage_root, "bad.safetensors")
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buf)  # a pickle archive must never be loaded
    not_json = b"\x10\x00\x00\x00\x00\x00\x00\x00not json here!!!"
    for payload in (buf.getvalue(), b"", b"short", not_json):
        storage.write_bytes(bad, payload)
        with pytest.raises(StorageError) as err:
            storage.load_tensors(bad)
        assert _one_line(err).startswith(f"not a valid safetensors file: {bad}")

    # valid header but truncated data
    good = storage.join(storage_root, "good.safetensors")
    storage.save_tensors(good, {"x": torch.ones(100)})
    storage.write_bytes(bad, storage.read_bytes(good)[:-50])
    with pytest.raises(StorageError) as err:
        storage.load_tensors(bad)
    assert _one_line(err).startswith(f"not a valid safetensors file: {bad}")


def test_env_endpoint_used_when_options_unset(s3_bucket, s3_server):
    # s3_bucket set AWS_ENDPOINT_URL; with default options the env var alone must reach the store.
    storage.configure(None)
    storage.write_bytes(f"{s3_bucket}/env.bin", b"via env")
    assert storage.read_bytes(f"{s3_bucket}/env.bin") == b"via env"
    assert storage.get_options().endpoint_url is None


def test_read_parquet_rows_reads_selected_rows_in_order(storage_root):
    import pyarrow as pa

    from diclip import storage

    table = pa.table({"item_id": [f"i{k}" for k in range(10)], "v": list(range(10))})
    uri = storage.join(storage_root, "rows.parquet")
    storage.write_parquet(uri, table, row_group_size=3)
    got = storage.read_parquet_rows(uri, [7, 0, 4, 7])
    assert got.column("item_id").to_pylist() == ["i7", "i0", "i4", "i7"]
    assert storage.read_parquet_rows(uri, [9], columns=["v"]).column("v").to_pylist() == [9]
    import pytest

    from diclip.errors import StorageError

    with pytest.raises(StorageError):
        storage.read_parquet_rows(uri, [10])


def test_ec2_metadata_is_disabled_only_for_an_endpoint_override(tmp_path):
    """On AWS the SDK's EC2 metadata probe finds instance-profile credentials (cluster/README.md), so the
    default leaves it on; an S3-compatible endpoint has no metadata service, so there it is switched off."""
    import json
    import subprocess
    import sys

    from diclip.config import load_spec
    from ray_jobs.runtime.ray_session import worker_env

    script = (
        "import json, os, diclip\n"
        "from diclip import storage\n"
        "from diclip.storage import StorageOptions\n"
        "storage.resolve('s3://bucket/x')\n"
        "before = os.environ.get('AWS_EC2_METADATA_DISABLED')\n"
        "storage.configure(StorageOptions(endpoint_url='http://127.0.0.1:9'))\n"
        "storage.resolve('s3://bucket/x')\n"
        "print(json.dumps([before, os.environ.get('AWS_EC2_METADATA_DISABLED')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL",
                                                            "AWS_ENDPOINT_URL_S3")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [None, "true"]
    saved = {k: os.environ.pop(k) for k in ("AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL") if k in os.environ}
    try:
        assert "AWS_EC2_METADATA_DISABLED" not in worker_env(load_spec("configs/demo.yaml"))
        with_endpoint = worker_env(load_spec("configs/demo.yaml", ["storage.endpoint_url=http://minio:9000"]))
        assert with_endpoint["AWS_EC2_METADATA_DISABLED"] == "true"
    finally:
        os.environ.update(saved)
