"""A real S3-compatible server for the tests: moto's ThreadedMotoServer on 127.0.0.1, behind a
TCP proxy that counts the bytes the server sends and can cut a connection mid-response.

    from s3_server import s3, s3_server   # the fixtures; import both into a test module

    def test_x(s3):                       # s3: an S3Env with a fresh, empty bucket
        s3.put("dir/a.bin", b"...")       # through boto3, straight to moto (not counted)
        url = s3.url("dir/a.bin")         # "s3://<bucket>/dir/a.bin"
        s3.proxy.reset()                  # the byte counter back to 0
        ...graft.storage reads url...     # through the proxy (the AWS_* env points at it)
        assert s3.proxy.bytes_down <= ...
        s3.proxy.drop_after(100_000)      # the next response is cut after 100,000 bytes (once)

`s3_server` (session scope) starts moto and the proxy once; `s3` (per test) points the standard
AWS_* environment variables at the proxy (monkeypatch: restored after the test), drops graft's
cached S3 stores and listings, and creates a bucket no other test uses. Nothing leaves
127.0.0.1. moto and boto3 are test dependencies (the `dev` extra); a test module that imports
this file is skipped when they are missing.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field

import pytest

# A fake account: moto accepts any key unless its auth is switched on (S3Env.enforce_auth).
ACCESS_KEY, SECRET_KEY, REGION = "testing-key", "testing-secret", "us-east-1"


def _free_port() -> int:
    try:
        from graft.launch.commands import free_port
    except ImportError:  # pragma: no cover - graft itself failing to import fails elsewhere
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    return free_port()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (host, port), one thread per direction.

    `bytes_down` counts every byte the server sent to clients (HTTP headers included), and
    `bytes_up` every byte clients sent; `connections` counts accepted connections, and
    `requests` lists the request lines seen ("GET /bucket/key?..."), from the client bytes.
    `drop_after(n, times)` arms a fault: counting server-to-client bytes from that moment, the
    connection that carries byte number n is cut right there (the first n bytes are delivered,
    then both sockets are closed with an RST); the counter restarts for the next of `times`
    faults (times=None: every n bytes, forever). `drops` counts the cuts made.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._closing = False
        self._sockets: set[socket.socket] = set()
        self.bytes_down = self.bytes_up = self.connections = self.drops = 0
        self.requests: list[str] = []
        self._drop_at: int | None = None
        self._drop_times: int | None = 0
        self._since_armed = 0
        self._thread = threading.Thread(target=self._accept, name="s3-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Counters to 0 and no fault armed."""
        with self._lock:
            self.bytes_down = self.bytes_up = self.connections = self.drops = 0
            self.requests = []
            self._drop_at, self._drop_times, self._since_armed = None, 0, 0

    def drop_after(self, nbytes: int, times: int | None = 1) -> None:
        """Cut the connection carrying the `nbytes`-th server byte from now, `times` times (None: always)."""
        assert nbytes > 0
        with self._lock:
            self._drop_at, self._drop_times, self._since_armed = nbytes, times, 0

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for sock in socks:
            _close(sock, reset=False)

    # -- internals -------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client, reset=True)
                continue
            with self._lock:
                self.connections += 1
                self._sockets.update((client, server))
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, False, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool, pair) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                cut = False
                with self._lock:
                    if down:
                        if self._drop_at is not None and self._drop_times != 0:
                            left = self._drop_at - self._since_armed
                            if len(data) >= left:
                                data, cut = data[:left], True
                                self.drops += 1
                                self._since_armed = 0
                                if self._drop_times is not None:
                                    self._drop_times -= 1
                            else:
                                self._since_armed += len(data)
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
                        self.requests.extend(m.decode("latin-1") for m in _REQUEST_LINE.findall(data))
                if data:
                    dst.sendall(data)
                if cut:
                    for sock in pair:
                        _close(sock, reset=True)
                    return
            # Orderly end of one direction: pass the half-close on.
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except OSError:
            for sock in pair:
                _close(sock, reset=False)
        finally:
            with self._lock:
                if down:
                    self._sockets.difference_update(pair)


# A request line at the start of the data or after a CRLF. A recv boundary could split one in
# theory; clients write a request's head in one piece, so in practice each line arrives whole.
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)((?:GET|HEAD|PUT|POST|DELETE) \S+) HTTP/1\.1\r\n")


def _close(sock: socket.socket, reset: bool) -> None:
    """Close `sock` for real: shutdown() first, since close() alone neither wakes the other pump
    thread blocked in recv() on it nor ends the TCP connection while that recv() holds it."""
    try:
        if reset:  # SO_LINGER 0: the close sends an RST, like a dropped link or a killed server
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 plus a FaultProxy in front of it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self.port = _free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.moto.start()
        self.direct_endpoint = f"http://127.0.0.1:{self.port}"
        self.proxy = FaultProxy(("127.0.0.1", self.port))

    @property
    def endpoint(self) -> str:
        """What clients under test use: the proxy."""
        return self.proxy.endpoint

    def env(self, **overrides: str | None) -> dict[str, str | None]:
        """The standard AWS variables that point a client at this server (through the proxy)."""
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }
        env.update(overrides)
        return env

    def client(self, endpoint: str | None = None, key: str = ACCESS_KEY, secret: str = SECRET_KEY):
        """A boto3 S3 client straight to moto (the proxy does not count its bytes)."""
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.direct_endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def set_auth(self, enforced: bool) -> None:
        """Switch moto's signature and IAM policy checks on (every request from now) or off."""
        import urllib.request

        count = b"0" if enforced else b"inf"
        request = urllib.request.Request(f"{self.direct_endpoint}/moto-api/reset-auth", data=count, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def close(self) -> None:
        self.proxy.close()
        self.moto.stop()


@dataclass
class S3Env:
    """One test's view: the server, its own bucket, and helpers."""

    server: S3Server
    bucket: str
    _client: object = field(default=None, repr=False)

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy

    @property
    def client(self):
        if self._client is None:
            self._client = self.server.client()
        return self._client

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def new_bucket(self) -> str:
        name = f"graft-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return name


def _forget_graft_stores() -> None:
    try:
        import graft.storage as graft_s3
    except ImportError:
        return
    graft_s3.clear_caches(stores=True)


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests (pip install moto[server])")
    pytest.importorskip("boto3", reason="boto3 is needed for the S3 tests")
    server = S3Server()
    yield server
    server.close()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A fresh bucket, the AWS_* environment pointing at the proxy, a reset proxy, no cached stores."""
    # No profile files of the user running the tests may leak in.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                 "AWS_ALLOW_HTTP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    env = S3Env(s3_server, "")
    env.bucket = env.new_bucket()
    _forget_graft_stores()
    s3_server.proxy.reset()
    yield env
    s3_server.proxy.reset()
    _forget_graft_stores()
