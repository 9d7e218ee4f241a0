"""A real uvicorn over real mutual TLS: the client certificate reaches the app, bad peers do not get in.

The server runs in a thread with its own event loop, on a socket bound to a free port; the tests wait
for uvicorn's own "started" point (an Event set after ``Server.startup``), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from skyport.pki import (
    CertificateAuthority,
    cert_to_pem,
    generate_key,
    identity_from_certificate,
    key_to_pem,
    server_names,
    write_private,
)
from skyport.server import tls
from skyport.server.tls import TLSH11Protocol, make_uvicorn_config, peer_certificate

STARTUP_DEADLINE = 20.0
HAVE_WEBSOCKETS = importlib.util.find_spec("websockets") is not None


# ---------------------------------------------------------------------------------------------------
# The app under test: echoes what the TLS glue put in the scope


def _describe(scope: Any) -> dict[str, Any]:
    der = peer_certificate(scope)
    identity = identity_from_certificate(der) if der else None
    return {
        "tls_extension": "tls" in (scope.get("extensions") or {}),
        "extensions": sorted(scope.get("extensions") or {}),
        "cert_sha256": hashlib.sha256(der).hexdigest() if der else None,
        "user_id": identity.user_id if identity else None,
        "name": identity.name if identity else None,
        "serial": identity.serial if identity else None,
    }


def make_app(calls: list[dict[str, Any]]) -> Starlette:
    """The app records every call it gets, so a test can prove a refused peer never reached it."""

    async def whoami(request: Request) -> JSONResponse:
        calls.append(_describe(request.scope))
        return JSONResponse(calls[-1])

    async def ws_whoami(websocket: WebSocket) -> None:
        calls.append(_describe(websocket.scope))
        await websocket.accept()
        await websocket.send_json(calls[-1])
        await websocket.close()

    return Starlette(routes=[Route("/whoami", whoami), WebSocketRoute("/ws", ws_whoami)])


# ---------------------------------------------------------------------------------------------------
# Certificates


@dataclass
class Creds:
    cert: Path
    key: Path
    serial: int
    der: bytes


@dataclass
class Pki:
    ca_file: Path
    server: Creds
    alice: Creds
    bob: Creds
    stranger: Creds  # a user certificate from another CA


def _user(ca: CertificateAuthority, directory: Path, user_id: str, name: str) -> Creds:
    key = generate_key()
    cert = ca.issue_user(user_id, name, key.public_key())
    (directory / f"{name}.pem").write_bytes(cert_to_pem(cert))
    write_private(directory / f"{name}-key.pem", key_to_pem(key))
    return Creds(
        directory / f"{name}.pem",
        directory / f"{name}-key.pem",
        cert.serial_number,
        cert.public_bytes(serialization.Encoding.DER),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root / "ca")
    names, ips = server_names()
    issued = ca.issue_server(names, ips)
    (root / "server.pem").write_bytes(issued.cert_pem)
    write_private(root / "server-key.pem", issued.key_pem)
    server = Creds(root / "server.pem", root / "server-key.pem", issued.serial, b"")
    other_ca = CertificateAuthority.create(root / "other-ca")
    return Pki(
        ca_file=root / "ca" / "ca.pem",
        server=server,
        alice=_user(ca, root, "u-alice", "alice"),
        bob=_user(ca, root, "u-bob", "bob"),
        stranger=_user(other_ca, root, "u-alice", "mallory"),  # claims alice's id, wrong CA
    )


def client_context(pki: Pki, creds: Creds | None, **context: Any) -> ssl.SSLContext:
    """What a Sky Port client does: verify the server against our CA, hostname checking on."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    for attribute, value in context.items():
        setattr(ctx, attribute, value)
    if creds is not None:
        ctx.load_cert_chain(creds.cert, creds.key)
    return ctx


# ---------------------------------------------------------------------------------------------------
# The server


class _ThreadServer(uvicorn.Server):
    """uvicorn.Server that signals when its listeners are up (the end of ``startup``)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    def run_in_thread(self, sock: socket.socket) -> None:
        try:
            self.run(sockets=[sock])
        except BaseException as exc:  # surfaced by the fixture
            self.error = exc
        finally:
            self.ready.set()  # wake the waiter on failure too


@dataclass
class Running:
    port: int
    pki: Pki
    config: uvicorn.Config
    calls: list[dict[str, Any]]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"


# Both HTTP protocol classes, each on one of the two event loops uvicorn may pick.
SERVER_VARIANTS = [
    pytest.param((tls.HTTP_PROTOCOL, "auto"), id="default-http-auto-loop"),
    pytest.param((TLSH11Protocol, "asyncio"), id="h11-asyncio"),
]


@pytest.fixture(params=SERVER_VARIANTS)
def server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Running]:
    http_class, loop = request.param
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn listens on this very socket
    port = sock.getsockname()[1]
    calls: list[dict[str, Any]] = []
    config = make_uvicorn_config(
        make_app(calls),
        host="127.0.0.1",
        port=port,
        cert_file=pki.server.cert,
        key_file=pki.server.key,
        ca_file=pki.ca_file,
        http=http_class,
        loop=loop,
        lifespan="off",
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    srv = _ThreadServer(config)
    thread = threading.Thread(target=srv.run_in_thread, args=(sock,), name="uvicorn-test", daemon=True)
    thread.start()
    try:
        assert srv.ready.wait(STARTUP_DEADLINE), "uvicorn did not start in time"
        if srv.error is not None:
            raise srv.error
        assert srv.started
        yield Running(port, pki, config, calls)
    finally:
        srv.should_exit = True
        thread.join(STARTUP_DEADLINE)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"
    assert srv.error is None


def raw_get(running: Running, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> bytes:
    """One HTTP/1.1 request over a bare TLS socket; returns all the server sent."""
    with (
        socket.create_connection(("127.0.0.1", running.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as conn,
    ):
        conn.sendall(b"GET /whoami HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------
# Tests


def test_client_certificate_from_our_ca_is_identified_on_every_request(server: Running) -> None:
    alice = server.pki.alice
    with httpx.Client(verify=client_context(server.pki, alice), timeout=10) as client:
        replies = [client.get(server.url("/whoami")) for _ in range(3)]  # one keep-alive connection
    for reply in replies:
        assert reply.status_code == 200
        body = reply.json()
        assert body["tls_extension"] is True
        assert body["cert_sha256"] == hashlib.sha256(alice.der).hexdigest()
        assert (body["user_id"], body["name"], body["serial"]) == ("u-alice", "alice", alice.serial)


def test_each_connection_sees_its_own_certificate(server: Running) -> None:
    """Per-connection state must not leak: interleave two users on two live connections."""
    pki = server.pki
    with (
        httpx.Client(verify=client_context(pki, pki.alice), timeout=10) as as_alice,
        httpx.Client(verify=client_context(pki, pki.bob), timeout=10) as as_bob,
    ):
        seen = [
            as_alice.get(server.url("/whoami")).json()["user_id"],
            as_bob.get(server.url("/whoami")).json()["user_id"],
            as_alice.get(server.url("/whoami")).json()["user_id"],
            as_bob.get(server.url("/whoami")).json()["user_id"],
        ]
    assert seen == ["u-alice", "u-bob", "u-alice", "u-bob"]


def assert_refused(server: Running, creds: Creds | None) -> None:
    """The server refuses the peer during the TLS handshake; the app never hears of it.

    The server's alert is not seen by the client: asyncio's (and uvloop's) SSL protocol closes the
    socket on a failed handshake without flushing the alert OpenSSL queued, so a client gets a bare
    EOF ("unexpected eof") instead of "certificate required" / "unknown ca".
    """
    with (
        httpx.Client(verify=client_context(server.pki, creds), timeout=10) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get(server.url("/whoami"))
    # TLS 1.3: the client's side of the handshake completes before the server has judged the client's
    # certificate, so the refusal shows as a closed connection with no HTTP response at all.
    try:
        reply = raw_get(server, client_context(server.pki, creds))
    except (ssl.SSLError, ConnectionError):
        reply = b""
    assert reply == b""
    # TLS 1.2: the handshake itself fails.
    ctx12 = client_context(server.pki, creds, maximum_version=ssl.TLSVersion.TLSv1_2)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
    ):
        ctx12.wrap_socket(raw, server_hostname="127.0.0.1").close()
    assert server.calls == []


def test_request_without_client_certificate_is_refused(server: Running) -> None:
    assert_refused(server, None)


def test_client_certificate_from_another_ca_is_refused(server: Running) -> None:
    """A certificate claiming alice's id but signed by a different CA gets nowhere."""
    assert_refused(server, server.pki.stranger)


def test_server_certificate_passes_hostname_checks_for_the_names_clients_dial(server: Running) -> None:
    ctx = client_context(server.pki, server.pki.alice)
    names, ips = server_names()
    for name in ["localhost", "127.0.0.1", *names, *ips]:
        reply = raw_get(server, ctx, server_hostname=name)
        assert reply.startswith(b"HTTP/1.1 200"), name
        assert b'"user_id":"u-alice"' in reply
    with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
        raw_get(server, ctx, server_hostname="not-this-host.invalid")
    # and the same through httpx, by address
    with httpx.Client(verify=ctx, timeout=10) as client:
        assert client.get(server.url("/whoami", host="127.0.0.1")).status_code == 200


@pytest.mark.skipif(not HAVE_WEBSOCKETS, reason="the websockets package is not installed")
def test_websocket_connection_sees_the_client_certificate(server: Running) -> None:
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    alice = server.pki.alice
    uri = f"wss://127.0.0.1:{server.port}/ws"
    with connect(uri, ssl=client_context(server.pki, alice), open_timeout=10) as ws:
        body = json.loads(ws.recv(timeout=10))
    assert body["tls_extension"] is True
    assert body["cert_sha256"] == hashlib.sha256(alice.der).hexdigest()
    assert (body["user_id"], body["name"], body["serial"]) == ("u-alice", "alice", alice.serial)
    assert "websocket.http.response" in body["extensions"]  # uvicorn's own extension is kept

    assert len(server.calls) == 1
    # Refused during TLS. Depending on timing the client fails writing its upgrade request or
    # reading the (absent) response: either way no WebSocket opens and the app is never called.
    with (
        pytest.raises((WebSocketException, OSError)),
        connect(uri, ssl=client_context(server.pki, None), open_timeout=10) as ws,
    ):
        ws.recv(timeout=10)
    assert len(server.calls) == 1


def test_config_load_uses_our_protocols_and_tls_policy(pki: Pki) -> None:
    config = make_uvicorn_config(
        make_app([]),
        host="127.0.0.1",
        port=0,
        cert_file=pki.server.cert,
        key_file=pki.server.key,
        ca_file=pki.ca_file,
        log_config=None,
    )
    config.load()
    assert config.http_protocol_class is tls.HTTP_PROTOCOL
    assert config.http_protocol_class.__name__ == "TLSHttpToolsProtocol"  # httptools is installed
    assert config.ws_protocol_class is tls.WS_PROTOCOL is not None
    assert config.ssl is not None
    assert config.ssl.verify_mode == ssl.CERT_REQUIRED
    assert config.ssl.minimum_version == ssl.TLSVersion.TLSv1_2
    assert config.ssl.num_tickets == 0  # no client resumes: tickets would only cost each handshake
    assert config.proxy_headers is False
    assert config.get_loop_factory() is not None


def test_make_uvicorn_config_refuses_settings_that_would_lose_the_certificate(pki: Pki) -> None:
    common: dict[str, Any] = dict(
        host="127.0.0.1", port=0, cert_file=pki.server.cert, key_file=pki.server.key, ca_file=pki.ca_file
    )
    with pytest.raises(TypeError, match="http="):
        make_uvicorn_config(make_app([]), http="h11", **common)
    with pytest.raises(TypeError, match="ws="):
        make_uvicorn_config(make_app([]), ws="websockets-sansio", **common)
    with pytest.raises(TypeError, match="ssl_cert_reqs"):
        make_uvicorn_config(make_app([]), ssl_cert_reqs=ssl.CERT_OPTIONAL, **common)


def test_peer_certificate_reads_only_the_tls_extension() -> None:
    assert peer_certificate({"type": "http"}) is None
    assert peer_certificate({"extensions": {"tls": {"client_cert_der": None}}}) is None
    assert peer_certificate({"extensions": {"tls": {"client_cert_der": b"\x30\x00"}}}) == b"\x30\x00"


def test_plain_connections_get_no_tls_extension() -> None:
    """The wrapper keys off the transport: without an ssl_object nothing is added (ASGI semantics)."""

    class Transport(asyncio.BaseTransport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    class Holder:
        app: Any = object()

    holder = Holder()
    original = holder.app
    tls._attach_peer_certificate(holder, Transport())
    assert holder.app is original


def test_wrapper_keeps_existing_extensions_and_fresh_dicts_per_request() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    async def nothing() -> Any:
        return {}

    async def ignore(message: Any) -> None:
        return None

    wrapped = tls._WithPeerCertificate(app, b"DER")
    shared = {"websocket.http.response": {}, "tls": {"tls_version": 0x0304}}
    for _ in range(2):
        asyncio.run(wrapped({"type": "http", "extensions": shared}, nothing, ignore))
    first, second = seen
    assert first["extensions"] == {
        "websocket.http.response": {},
        "tls": {"tls_version": 0x0304, "client_cert_der": b"DER"},
    }
    assert shared == {"websocket.http.response": {}, "tls": {"tls_version": 0x0304}}  # not mutated
    assert first["extensions"] is not second["extensions"]
    assert first["extensions"]["tls"] is not second["extensions"]["tls"]
