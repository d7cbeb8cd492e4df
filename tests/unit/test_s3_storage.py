"""graft.storage against a real S3-compatible server (moto on 127.0.0.1, tests/s3_server.py).

Bytes and requests are counted by the TCP proxy between graft and the server, so "fetched
at most 1.05x" and "the listing is cached" are measured on the wire, not taken from graft's
own bookkeeping; dropped connections are real (the proxy cuts the TCP connection mid-body).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import zipfile

import pytest
import torch

pytest.importorskip("obstore", reason="the [s3] extra (obstore) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

from s3_server import s3, s3_server  # noqa: E402,F401 - the fixtures

import graft  # noqa: E402
from graft.errors import CheckpointError, GraftError, StorageError  # noqa: E402
from graft.storage import stores as gs3  # noqa: E402 - settings, clear_caches, the stores themselves
from graft.storage import (  # noqa: E402
    MissingExtraError,
    S3Path,
    as_path,
    delete,
    is_remote,
    list_prefix,
    put_bytes,
    read_ranges,
    read_ranges_many,
    upload_file,
    upload_tree,
)

MiB = 1 << 20


def writable_buffer(out: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (what graft's readers pass to read_ranges)."""
    import ctypes

    return memoryview((ctypes.c_char * (out.numel() * out.element_size())).from_address(out.data_ptr())).cast("B")


@pytest.fixture
def fast_retries(monkeypatch):
    """Short backoffs so the failure cases take well under a second each."""
    monkeypatch.setattr(gs3.settings, "backoff_s", 0.02)
    monkeypatch.setattr(gs3.settings, "max_backoff_s", 0.1)


def _random(n: int, seed: int = 0) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()


def _gets(proxy) -> list[str]:
    return [r for r in proxy.requests if r.startswith("GET ")]


# -- pure paths (no server) ---------------------------------------------------------------------

def test_s3path_is_a_pathlike_value_but_not_a_local_path():
    p = S3Path("s3://bkt/runs/x/model.safetensors")
    assert (p.bucket, p.key, str(p)) == ("bkt", "runs/x/model.safetensors", "s3://bkt/runs/x/model.safetensors")
    assert (p.name, p.suffix, p.stem) == ("model.safetensors", ".safetensors", "model")
    assert p.parent == S3Path("s3://bkt/runs/x/") and p.parent.parent.parent == S3Path("s3://bkt")
    assert S3Path("s3://bkt").parent == S3Path("s3://bkt") and S3Path("s3://bkt").name == ""
    assert S3Path("s3://bkt/runs") / "x" / "a/b.json" == S3Path("s3://bkt/runs/x/a/b.json")
    assert S3Path("s3://bkt/a.tar.gz").suffixes == [".tar", ".gz"] and p.with_suffix(".json").name == "model.json"
    assert p.relative_to(S3Path("s3://bkt/runs")) == "x/model.safetensors"
    assert not hasattr(p, "__fspath__")
    with pytest.raises(TypeError):
        open(p, "rb")  # never a local file named "s3:/bkt/..."
    assert is_remote("s3://bkt/k") and is_remote(p) and not is_remote("/tmp/s3") and not is_remote("s3.bin")
    from pathlib import Path
    assert is_remote(Path("s3://bkt/k")) and S3Path(Path("s3://bkt/k")) == S3Path("s3://bkt/k")
    assert isinstance(as_path("s3://bkt/k"), S3Path) and as_path("/tmp/x") == Path("/tmp/x")
    assert len({S3Path("s3://bkt/a/"), S3Path("s3://bkt/a")}) == 1
    with pytest.raises(ValueError, match="not an s3:// URL"):
        S3Path("/local/file")


def test_missing_client_library_names_the_extra(monkeypatch):
    gs3.clear_caches(stores=True)
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(MissingExtraError, match=r"torch-graft\[s3\]") as e:
        S3Path("s3://bkt/x").is_file()
    assert isinstance(e.value, GraftError) and isinstance(e.value, ImportError)


# -- listing, stat, open -------------------------------------------------------------------------

def test_listing_glob_stat_and_the_listing_is_cached(s3):
    for key, data in {"ck/config.json": b'{"a": 1}', "ck/model-1.safetensors": b"x" * 10,
                      "ck/model-2.safetensors": b"y" * 20, "ck/sub/inner.bin": b"z",
                      "ck/sub/deeper/more.bin": b"w", "other.txt": b"o"}.items():
        s3.put(key, data)
    root, ck = S3Path(s3.url()), S3Path(s3.url("ck"))
    s3.proxy.reset()
    assert ck.is_dir() and not ck.is_file() and ck.exists()
    assert [p.name for p in ck.iterdir()] == ["config.json", "model-1.safetensors", "model-2.safetensors", "sub"]
    assert [p.name for p in ck.glob("*.safetensors")] == ["model-1.safetensors", "model-2.safetensors"]
    assert (ck / "config.json").is_file() and not (ck / "config.json").is_dir()
    assert (ck / "sub").is_dir() and not (ck / "sub").is_file()
    assert not (ck / "nothing.json").exists()
    assert (ck / "model-2.safetensors").stat().st_size == 20
    # One LIST of the folder answered all of that (it is fetched once and kept), plus one HEAD
    # for "is ck itself an object?" (its own folder, the bucket root, was not listed).
    assert [r.split()[0] for r in s3.proxy.requests] == ["GET", "HEAD"], s3.proxy.requests
    assert "delimiter" in s3.proxy.requests[0] and "prefix=ck%2F" in s3.proxy.requests[0]
    assert [p.name for p in ck.glob("sub/*/*.bin")] == ["more.bin"]
    assert json.loads((ck / "config.json").read_text()) == {"a": 1}
    assert root.is_dir() and "other.txt" in [p.name for p in root.iterdir()]
    # Objects written by someone else appear after refresh().
    s3.put("ck/late.json", b"{}")
    assert not (ck / "late.json").exists()
    assert ck.refresh() is ck and (ck / "late.json").is_file()
    # A file asked for directly (no listing of its folder yet) costs one HEAD.
    gs3.clear_caches()
    s3.proxy.reset()
    assert (ck / "sub" / "inner.bin").stat().st_size == 1
    assert [r.split()[0] for r in s3.proxy.requests] == ["HEAD"]


def test_open_seeks_and_reads_by_small_cached_range_requests(s3):
    data = _random(5 * MiB + 123)
    s3.put("blob.bin", data)
    s3.proxy.reset()
    with S3Path(s3.url("blob.bin")).open("rb") as f:
        assert f.seekable() and f.readable() and not f.writable()
        assert f.read(8) == data[:8]  # fetches [0, 64 KiB)
        f.seek(-100, io.SEEK_END)
        assert f.read() == data[-100:] and f.read(10) == b""  # the tail: the last 64 KiB
        f.seek(MiB - 3)
        assert f.read(10) == data[MiB - 3:MiB + 7] and f.tell() == MiB + 7  # 64 KiB from there
        buf = bytearray(16)
        f.seek(20)
        assert f.readinto(buf) == 16 and bytes(buf) == data[20:36]  # kept: no request
    assert [r.split()[0] for r in s3.proxy.requests] == ["HEAD", "GET", "GET", "GET"], s3.proxy.requests
    assert s3.proxy.bytes_down < 3 * (64 << 10) + 4 * 1024  # the three small ranges, headers included
    # Reading on from where the last read ended grows the read-ahead 4x per request (64 KiB,
    # 256 KiB, 1 MiB, 4 MiB): a sequential scan in 8 KiB reads costs a handful of requests.
    gs3.clear_caches()
    s3.proxy.reset()
    with S3Path(s3.url("blob.bin")).open("rb") as f:
        chunks = iter(lambda: f.read(8192), b"")
        assert b"".join(chunks) == data
    assert len(_gets(s3.proxy)) <= 5, s3.proxy.requests
    assert s3.proxy.bytes_down < len(data) + 64 * 1024
    # A large read skips the cache and goes through the parallel range reader.
    with S3Path(s3.url("blob.bin")).open("rb") as f:
        f.seek(7)
        assert f.read() == data[7:]


def test_prefetch_turns_scattered_small_reads_into_a_few_parallel_requests(s3):
    data = _random(8 * MiB, seed=8)
    s3.put("records.bin", data)
    headers = [(i * 300_000 + 17, 60) for i in range(25)]  # like a zip's local headers, far apart
    with S3Path(s3.url("records.bin")).open("rb") as f:
        s3.proxy.reset()
        f.prefetch(headers)
        fetched = len(_gets(s3.proxy))
        for offset, n in headers:
            f.seek(offset)
            assert f.read(n) == data[offset:offset + n]
    assert fetched == 25 and len(_gets(s3.proxy)) == 25  # the reads cost no further request
    assert s3.proxy.bytes_down < 25 * (60 + 1024)


def test_a_zip_parser_works_on_an_open_object(s3):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("a/data.pkl", b"pickle-bytes")
        z.writestr("a/data/0", _random(3 * MiB, seed=1))
    s3.put("ckpt.zip", buffer.getvalue())
    with S3Path(s3.url("ckpt.zip")).open("rb") as f, zipfile.ZipFile(f) as z:
        assert z.read("a/data.pkl") == b"pickle-bytes"
        assert z.read("a/data/0") == _random(3 * MiB, seed=1)
    # torch.load itself reads through the file object (its zip reader seeks and reads).
    state = {"w": torch.randn(300, 200), "b": torch.arange(10)}
    saved = io.BytesIO()
    torch.save(state, saved)
    s3.put("model.pt", saved.getvalue())
    with S3Path(s3.url("model.pt")).open("rb") as f:
        loaded = torch.load(f, weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    text = S3Path(s3.url("ckpt.zip")).parent / "t.txt"
    s3.put("t.txt", b"line 1\nline 2\n")
    with text.open("r") as f:
        assert f.readlines() == ["line 1\n", "line 2\n"]


# -- the bulk range reader --------------------------------------------------------------------------

def test_read_ranges_fills_tensors_bitwise(s3, monkeypatch):
    monkeypatch.setattr(gs3.settings, "part_size", 1 * MiB)  # so the 3.5 MiB tensor is split
    data = _random(12 * MiB, seed=2)
    s3.put("shard.bin", data)
    layout = {"a": (0, 1000), "b": (1000, 4096), "c": (MiB, int(3.5 * MiB)), "d": (9 * MiB, 8),
              "e": (12 * MiB - 64, 64)}
    outs = {k: torch.empty(n, dtype=torch.uint8) for k, (_, n) in layout.items()}
    seen = []
    fetched = read_ranges(s3.url("shard.bin"), [(off, n, writable_buffer(outs[k])) for k, (off, n) in layout.items()],
                          on_bytes=seen.append)
    for k, (off, n) in layout.items():
        assert torch.equal(outs[k], torch.frombuffer(bytearray(data[off:off + n]), dtype=torch.uint8)), k
    wanted = sum(n for _, n in layout.values())
    assert sum(seen) == wanted and wanted <= fetched <= 1.04 * wanted
    # float tensors too: the bytes land in place, in the tensor's own dtype.
    values = torch.randn(1000, dtype=torch.float32)
    s3.put("f32.bin", values.numpy().tobytes())
    out = torch.empty(1000, dtype=torch.float32)
    read_ranges(S3Path(s3.url("f32.bin")), [(0, out.numel() * 4, writable_buffer(out))])
    assert torch.equal(out, values)


def test_a_sparse_selection_fetches_at_most_5_percent_more_on_the_wire(s3):
    data = _random(32 * MiB, seed=3)
    s3.put("sparse.bin", data)
    # 36 tensors of 200 KiB; between them gaps of 1 KiB (cheap to read through), 100 KiB
    # (merging all 12 would exceed the 4% budget: 2 are) and 1.5 MiB (never merged).
    items, offset = [], 0
    for i in range(36):
        items.append((offset, 200 * 1024))
        offset += 200 * 1024 + [1024, 100 * 1024, 3 * MiB // 2][i % 3]
    assert offset < len(data)
    outs = [bytearray(n) for _, n in items]
    s3.proxy.reset()
    fetched = read_ranges(s3.url("sparse.bin"), [(o, n, memoryview(b)) for (o, n), b in zip(items, outs)])
    wanted = sum(n for _, n in items)
    for (o, n), b in zip(items, outs):
        assert b == data[o:o + n]
    assert fetched <= 1.04 * wanted
    assert s3.proxy.bytes_down <= 1.05 * wanted, (s3.proxy.bytes_down, wanted)  # headers included
    gets = _gets(s3.proxy)
    assert len(gets) == len(items) - 12 - 2, gets  # the 1 KiB gaps and two 100 KiB gaps merged


def test_reads_of_several_objects_share_one_pool(s3):
    blobs = {f"shard-{i}.bin": _random(MiB + i, seed=10 + i) for i in range(3)}
    for key, data in blobs.items():
        s3.put(key, data)
    outs = {key: bytearray(100) for key in blobs}
    read_ranges_many([(s3.url(key), [(MiB - 100, 100, memoryview(outs[key]))]) for key in blobs])
    assert all(outs[key] == blobs[key][MiB - 100:MiB] for key in blobs)


@pytest.mark.parametrize("client_retries", [3, 0], ids=["obstore-retries", "graft-retries"])
def test_a_connection_dropped_mid_read_is_retried(s3, monkeypatch, fast_retries, client_retries):
    """Cut once, 300 KB into the body: obstore's own retry or (with it off) graft's resumes the read."""
    monkeypatch.setattr(gs3.settings, "client_retries", client_retries)
    data = _random(6 * MiB, seed=4)
    s3.put("drop.bin", data)
    path = S3Path(s3.url("drop.bin"))
    path.stat()  # the HEAD before the fault is armed
    out = bytearray(len(data))
    s3.proxy.drop_after(300_000, times=1)
    read_ranges(path, [(0, len(data), memoryview(out))])
    assert s3.proxy.drops == 1 and out == data


def test_a_connection_dropped_every_time_ends_in_an_error_naming_object_and_range(s3, monkeypatch, fast_retries):
    monkeypatch.setattr(gs3.settings, "attempts", 3)
    monkeypatch.setattr(gs3.settings, "client_retries", 1)
    monkeypatch.setattr(gs3.settings, "part_size", 4 * MiB)
    data = _random(6 * MiB, seed=5)
    s3.put("flaky.bin", data)
    path = S3Path(s3.url("flaky.bin"))
    path.stat()
    s3.proxy.drop_after(100_000, times=None)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        read_ranges(path, [(MiB, 5 * MiB, memoryview(bytearray(5 * MiB)))])
    assert time.monotonic() - started < 30
    message = str(e.value)
    assert e.value.path == s3.url("flaky.bin")
    assert "cannot be read: bytes [" in message and "failed 3 time(s)" in message
    assert any(f"bytes [{a}, {b})" in message for a, b in ((MiB, 5 * MiB), (5 * MiB, 6 * MiB))), message
    assert "check the network" in message
    # Bounded: 3 tries of (1 + 1 obstore retry) requests for each of the 2 parts at most.
    assert len(_gets(s3.proxy)) <= 12


# -- errors -----------------------------------------------------------------------------------------

def test_missing_bucket_and_missing_key(s3):
    s3.put("ck/present.bin", b"1234")
    nobucket = S3Path("s3://graft-no-such-bucket-here/ck/model.safetensors")
    assert not nobucket.exists() and not nobucket.parent.is_dir()
    for call in (nobucket.stat, nobucket.read_bytes, lambda: nobucket.open("rb"),
                 lambda: read_ranges(nobucket, [(0, 1, memoryview(bytearray(1)))]),
                 lambda: list(nobucket.parent.iterdir())):
        with pytest.raises(CheckpointError, match="the bucket 'graft-no-such-bucket-here' does not exist") as e:
            call()
        assert "AWS_ENDPOINT_URL" in str(e.value) and e.value.path.startswith("s3://graft-no-such-bucket-here")
    missing = S3Path(s3.url("ck/absent.bin"))
    assert not missing.exists()
    for call in (missing.stat, missing.read_bytes, lambda: read_ranges(missing, [(0, 1, memoryview(bytearray(1)))])):
        with pytest.raises(CheckpointError, match="no such object") as e:
            call()
        assert e.value.path == str(missing) and "present.bin" in str(e.value)  # the names nearby
    with pytest.raises(CheckpointError, match="no object has this prefix"):
        list(S3Path(s3.url("nothing-here")).iterdir())


def test_bad_credentials_and_denied_access(s3, s3_server, monkeypatch):
    """moto checks signatures and IAM policies once its auth is switched on (then back off)."""
    s3.put("secret.bin", b"s" * 100)
    iam = _iam(s3_server)
    suffix = s3.bucket[-8:]
    iam.create_user(UserName=f"nobody-{suffix}")
    nobody = iam.create_access_key(UserName=f"nobody-{suffix}")["AccessKey"]
    path = S3Path(s3.url("secret.bin"))
    s3_server.set_auth(True)
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        with pytest.raises(CheckpointError, match="access denied") as e:
            path.read_bytes()
        assert "InvalidAccessKeyId" in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", nobody["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(CheckpointError, match="SignatureDoesNotMatch"):
            read_ranges(path, [(0, 10, memoryview(bytearray(10)))])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", nobody["SecretAccessKey"])  # valid, but no policy
        with pytest.raises(CheckpointError, match="access denied.*AccessDenied"):
            path.stat()
        with pytest.raises(CheckpointError, match="access denied"):
            path.parent.is_dir()
        with pytest.raises(StorageError, match="access denied"):
            put_bytes(S3Path(s3.url("new.bin")), b"x")
    finally:
        s3_server.set_auth(False)


def _iam(server):
    import boto3

    return boto3.client("iam", endpoint_url=server.direct_endpoint, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="y")


@pytest.mark.parametrize("with_botocore", [True, False], ids=["botocore-chain", "files-only"])
def test_credentials_and_endpoint_from_the_aws_profile_files(s3, s3_server, monkeypatch, tmp_path, with_botocore):
    """No AWS_* keys or endpoint in the environment: the profile's files supply them (auth enforced,
    so the right key is really used)."""
    s3.put("p.bin", b"profile")
    iam = _iam(s3_server)
    user = f"reader-{s3.bucket[-8:]}-{int(with_botocore)}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    (tmp_path / "config").write_text(f"[profile ck]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n")
    (tmp_path / "credentials").write_text(
        f"[ck]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = {key['SecretAccessKey']}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "ck")
    if not with_botocore:
        monkeypatch.setitem(sys.modules, "botocore.session", None)
    gs3.clear_caches(stores=True)
    s3.proxy.reset()
    s3_server.set_auth(True)
    try:
        assert S3Path(s3.url("p.bin")).read_bytes() == b"profile"
        assert s3.proxy.requests  # through the endpoint named in the config file
        setup = gs3._bucket(s3.bucket).setup
        assert ("botocore" in setup.credentials_from) == with_botocore
    finally:
        s3_server.set_auth(False)


def test_a_truncated_object_is_an_error_not_a_retry(s3, monkeypatch, fast_retries):
    s3.put("short.bin", _random(1000))
    path = S3Path(s3.url("short.bin"))
    out = bytearray(b"\xee" * 200)
    s3.proxy.reset()
    with pytest.raises(CheckpointError, match=r"truncated: needs bytes \[900, 1100\).*ends at byte 1000"):
        read_ranges(path, [(0, 10, memoryview(bytearray(10))), (900, 200, memoryview(out))])
    assert out == b"\xee" * 200 and not _gets(s3.proxy)  # checked before any byte was fetched
    # The object shrank after graft saw its size (an upload cut short, replaced in place):
    big = _random(2 * MiB, seed=6)
    s3.put("shrinks.bin", big)
    path = S3Path(s3.url("shrinks.bin"))
    path.stat()
    s3.put("shrinks.bin", big[:MiB])
    monkeypatch.setattr(gs3.settings, "check_etag", False)
    with pytest.raises(CheckpointError, match=r"truncated: needs bytes \[0, 2097152\) but the object ends at byte 1048576"):
        read_ranges(path, [(0, 2 * MiB, memoryview(bytearray(2 * MiB)))])
    with pytest.raises(CheckpointError, match="truncated"):  # the range starts past the new end: HTTP 416
        read_ranges(path, [(MiB + 10, 10, memoryview(bytearray(10)))])
    # With the ETag check (the default) the same change is caught as a replaced object.
    monkeypatch.setattr(gs3.settings, "check_etag", True)
    with pytest.raises(CheckpointError, match="was replaced while graft was reading it"):
        read_ranges(path, [(0, 10, memoryview(bytearray(10)))])


# -- writes ---------------------------------------------------------------------------------------------

def test_upload_file_multipart_reads_back_bitwise(s3, monkeypatch, tmp_path):
    monkeypatch.setattr(gs3.settings, "upload_part_size", 5 * MiB)  # S3's minimum part
    data = _random(12 * MiB + 17, seed=7)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    dest = S3Path(s3.url("up/big.bin"))
    s3.proxy.reset()
    assert upload_file(local, dest) == len(data)
    puts = [r for r in s3.proxy.requests if r.startswith("PUT ")]
    assert any("uploads" in r for r in s3.proxy.requests if r.startswith("POST ")), s3.proxy.requests
    assert sum("partNumber=" in r for r in puts) == 3  # 5 + 5 + 2 MiB, uploaded in parallel
    assert s3.get("up/big.bin") == data
    assert dest.stat().st_size == len(data) and dest.read_bytes() == data  # multipart ETag (HEAD) + If-Match
    gs3.clear_caches()
    assert dest.parent.is_dir() and dest.read_bytes() == data  # the ETag from the LIST works the same
    out = torch.empty(MiB, dtype=torch.uint8)
    read_ranges(dest, [(11 * MiB, MiB, writable_buffer(out))])
    assert out.numpy().tobytes() == data[11 * MiB:12 * MiB]


def test_put_list_delete_and_upload_tree_commits_last(s3, tmp_path):
    put_bytes(S3Path(s3.url("run/a.bin")), b"aa")
    S3Path(s3.url("run/sub/b.bin")).write_bytes(b"bbb")
    assert list_prefix(S3Path(s3.url("run"))) == [(S3Path(s3.url("run/a.bin")), 2), (S3Path(s3.url("run/sub/b.bin")), 3)]
    assert S3Path(s3.url("run/a.bin")).is_file()  # cached now...
    delete([s3.url("run/a.bin"), S3Path(s3.url("run/never-existed"))])
    assert not S3Path(s3.url("run/a.bin")).exists()  # ...and graft's own delete forgot it
    assert s3.keys("run/") == ["run/sub/b.bin"]
    # A run checkpoint: the shards first (in parallel), the manifest only after all of them.
    ck = tmp_path / "step-10"
    (ck / "shards").mkdir(parents=True)
    for i in range(4):
        (ck / "shards" / f"{i}.bin").write_bytes(_random(1000 + i, seed=i))
    (ck / "manifest.json").write_text('{"step": 10}')
    s3.proxy.reset()
    uploaded = upload_tree(ck, S3Path(s3.url("run/step-10")))
    puts = [r.split()[1].split("?")[0] for r in s3.proxy.requests if r.startswith("PUT ")]
    assert puts[-1].endswith("/run/step-10/manifest.json") and len(puts) == 5
    assert uploaded[-1] == S3Path(s3.url("run/step-10/manifest.json"))
    assert s3.keys("run/step-10/") == ["run/step-10/manifest.json"] + [f"run/step-10/shards/{i}.bin" for i in range(4)]
    assert S3Path(s3.url("run/step-10/shards/2.bin")).read_bytes() == _random(1002, seed=2)
    delete([p for p, _ in list_prefix(S3Path(s3.url("run")))])
    assert s3.keys("run/") == []


def test_writing_to_a_missing_bucket_is_a_storage_error(s3):
    with pytest.raises(StorageError, match="does not exist"):
        put_bytes(S3Path("s3://graft-no-such-bucket-here/x.bin"), b"x")
    assert issubclass(StorageError, graft.GraftError)


def test_env_is_read_at_first_use_and_a_changed_env_makes_a_new_store(s3, monkeypatch):
    s3.put("x.bin", b"x")
    first = gs3._bucket(s3.bucket)
    assert gs3._bucket(s3.bucket) is first
    assert first.setup.endpoint == os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setattr(gs3.settings, "client_retries", 0)
    monkeypatch.setattr(gs3.settings, "attempts", 1)
    with pytest.raises(CheckpointError, match=r"(?s)cannot be read.*endpoint http://127.0.0.1:9"):
        S3Path(s3.url("x.bin")).stat()


def test_put_if_lets_only_one_writer_win(s3):
    from graft.storage import PreconditionFailed, put_if

    url = s3.url("run/.lock")
    first = put_if(url, b"a", if_absent=True)
    with pytest.raises(PreconditionFailed):
        put_if(url, b"b", if_absent=True)
    with pytest.raises(PreconditionFailed):
        put_if(url, b"c", if_match='"not-the-etag"')
    second = put_if(url, b"d", if_match=first)
    assert second != first and s3.get("run/.lock") == b"d"
    with pytest.raises(ValueError, match="exactly one"):
        put_if(url, b"e")
