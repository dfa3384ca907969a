"""TLS on the gRPC port, with a test CA made at test time by openssl: TLS and mutual TLS through a real
client, a plaintext client refused, certificates reloaded without a restart, bad files refused."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from parley.v1 import voice_pb2 as pb
from parley.v1 import voice_pb2_grpc
from service.core.settings import SessionDefaults
from service.server import start_server
from service.servicer import StreamLimits
from service.tls import ServerCertificates, TLSError
from tests.fakes import FakeLLM, FakeTTS

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (make system-deps)")


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    return cert, key


def make_cert(folder: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        ext,
    )
    return cert, key


async def ask(port: int, credentials: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = voice_pb2_grpc.VoiceServiceStub(channel)
        voices = await stub.ListVoices(pb.ListVoicesRequest(), timeout=5)
        return voices.default_voice


async def serve(tls: ServerCertificates):  # type: ignore[no-untyped-def]
    return await start_server(
        FakeLLM(), FakeTTS(), host="127.0.0.1", port=0, defaults=SessionDefaults(), limits=StreamLimits(), tls=tls
    )


async def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "server", ca, server=True)
    running = await serve(ServerCertificates(cert, key))
    try:
        assert await ask(running.port, grpc.ssl_channel_credentials(ca[0].read_bytes())) == "fake-voice"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await voice_pb2_grpc.VoiceServiceStub(plain).ListVoices(pb.ListVoicesRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        other = make_ca(tmp_path, "other")  # a client that trusts another CA does not connect
        with pytest.raises(grpc.aio.AioRpcError):
            await ask(running.port, grpc.ssl_channel_credentials(other[0].read_bytes()))
    finally:
        await running.stop(0)


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "server", ca, server=True)
    client_cert, client_key = make_cert(tmp_path, "client", ca, server=False)
    running = await serve(ServerCertificates(cert, key, client_ca_file=ca[0]))
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await ask(running.port, grpc.ssl_channel_credentials(ca[0].read_bytes()))
        mutual = grpc.ssl_channel_credentials(ca[0].read_bytes(), client_key.read_bytes(), client_cert.read_bytes())
        assert await ask(running.port, mutual) == "fake-voice"
    finally:
        await running.stop(0)


async def test_a_renewed_certificate_is_used_without_a_restart(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    first, second = make_ca(tmp_path, "first"), make_ca(tmp_path, "second")
    cert, key = make_cert(tmp_path, "a", first, server=True)
    shutil.copy(cert, live / "cert.pem")
    shutil.copy(key, live / "key.pem")
    certificates = ServerCertificates(live / "cert.pem", live / "key.pem")
    running = await serve(certificates)
    try:
        assert await ask(running.port, grpc.ssl_channel_credentials(first[0].read_bytes()))
        cert, key = make_cert(tmp_path, "b", second, server=True)  # renewed, by another CA
        shutil.copy(key, live / "key.pem")
        shutil.copy(cert, live / "cert.pem")
        await asyncio.sleep(0.05)
        assert await ask(running.port, grpc.ssl_channel_credentials(second[0].read_bytes()))
        with pytest.raises(grpc.aio.AioRpcError):
            await ask(running.port, grpc.ssl_channel_credentials(first[0].read_bytes()))
        (live / "cert.pem").write_text("half written")  # a broken renewal keeps what works
        assert await ask(running.port, grpc.ssl_channel_credentials(second[0].read_bytes()))
    finally:
        await running.stop(0)


def test_bad_certificate_files_are_refused_at_start_up(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, "server", ca, server=True)
    _, other_key = make_cert(tmp_path, "other", ca, server=True)
    with pytest.raises(TLSError, match="is not the certificate's"):
        ServerCertificates(cert, other_key)
    with pytest.raises(TLSError, match="cannot read"):
        ServerCertificates(tmp_path / "missing.pem", key)
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(TLSError, match="must hold a PEM certificate"):
        ServerCertificates(tmp_path / "junk.pem", key)
