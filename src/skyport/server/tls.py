"""mTLS glue for uvicorn: hand the verified client certificate to the ASGI app.

uvicorn can require a client certificate but does not pass it on (it implements no ASGI TLS
extension).  We subclass its protocol classes: every connection gets its own protocol object, so in
``connection_made`` — called once the TLS handshake, client-certificate verification included, has
completed — we read the peer certificate and wrap that object's ``self.app`` (the app uvicorn will call
for every request on the connection) so that each scope carries::

    scope["extensions"]["tls"] == {"client_cert_der": <DER bytes, or None without a client cert>}

Other extensions (and other keys of ``tls``) are kept.  Plain-TCP connections get no ``tls`` extension.

The WebSocket classes are needed as well: on an upgrade uvicorn builds a *new* protocol object for the
same transport (and its ``self.app`` is the bare app again), calling its ``connection_made`` first.

Python 3.11's ``ssl`` only exposes the leaf certificate, not the chain; the TLS layer has verified the
chain against our CA before any of this runs.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "CLIENT_CERT_DER",
    "HTTP_PROTOCOL",
    "TLS_EXTENSION",
    "WS_PROTOCOL",
    "TLSH11Protocol",
    "build_server_ssl_context",
    "make_uvicorn_config",
    "peer_certificate",
]

TLS_EXTENSION = "tls"
CLIENT_CERT_DER = "client_cert_der"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def peer_certificate(scope: Mapping[str, Any]) -> bytes | None:
    """The DER client certificate of the connection a request came on, or None."""
    tls = (scope.get("extensions") or {}).get(TLS_EXTENSION) or {}
    der = tls.get(CLIENT_CERT_DER)
    return der if isinstance(der, bytes) and der else None


class _WithPeerCertificate:
    """The app of one TLS connection: adds the connection's client certificate to each scope."""

    __slots__ = ("app", "der")

    def __init__(self, app: ASGIApp, der: bytes | None) -> None:
        self.app = app
        self.der = der

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Fresh dicts per request: never mutate uvicorn's dicts nor share ours between scopes.  Keys
        # already present (other extensions; a server's own ASGI "tls" fields, should it add them)
        # are kept.
        extensions = dict(scope.get("extensions") or {})
        extensions[TLS_EXTENSION] = {**(extensions.get(TLS_EXTENSION) or {}), CLIENT_CERT_DER: self.der}
        scope["extensions"] = extensions
        await self.app(scope, receive, send)


class _HasApp(Protocol):
    app: Any


def _attach_peer_certificate(protocol: _HasApp, transport: asyncio.BaseTransport) -> None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:  # plain TCP: no TLS extension at all (ASGI: absent means not TLS)
        return
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError:  # handshake not complete; cannot happen once connection_made is called
        der = None
    protocol.app = _WithPeerCertificate(protocol.app, der or None)


# Each override keeps its uvicorn base class's signature.  Where uvicorn narrowed asyncio's
# BaseTransport to Transport, mypy checks our override against asyncio.BaseProtocol as well, hence
# the same narrow `type: ignore[override]` uvicorn itself carries.


class TLSH11Protocol(H11Protocol):
    """h11 HTTP/1.1 (pure Python; always available)."""

    captures_peer_certificate: ClassVar[bool] = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _attach_peer_certificate(self, transport)
        super().connection_made(transport)


HTTP_PROTOCOL: type[asyncio.Protocol] = TLSH11Protocol
WS_PROTOCOL: type[asyncio.Protocol] | None = None

try:  # httptools comes with uvicorn[standard]; it is uvicorn's choice when installed, and ours
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover
    pass
else:

    class TLSHttpToolsProtocol(HttpToolsProtocol):
        """httptools HTTP/1.1 (C parser)."""

        captures_peer_certificate: ClassVar[bool] = True

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            _attach_peer_certificate(self, transport)
            super().connection_made(transport)

    HTTP_PROTOCOL = TLSHttpToolsProtocol
    __all__ += ["TLSHttpToolsProtocol"]

try:  # wsproto is optional (not part of uvicorn[standard])
    from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
except ImportError:
    pass
else:

    class TLSWSProtocol(WSProtocol):
        captures_peer_certificate: ClassVar[bool] = True

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            _attach_peer_certificate(self, transport)
            super().connection_made(transport)

    WS_PROTOCOL = TLSWSProtocol
    __all__ += ["TLSWSProtocol"]

# The `websockets` package comes with uvicorn[standard].  Its sans-I/O protocol is uvicorn's "auto"
# choice; the legacy `websockets_impl.WebSocketProtocol` is deprecated (importing it warns), so we
# do not wrap it.
try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover
    pass
else:

    class TLSWebSocketsSansIOProtocol(WebSocketsSansIOProtocol):
        captures_peer_certificate: ClassVar[bool] = True

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            _attach_peer_certificate(self, transport)
            super().connection_made(transport)

    WS_PROTOCOL = TLSWebSocketsSansIOProtocol
    __all__ += ["TLSWebSocketsSansIOProtocol"]


StrPath = str | os.PathLike[str]


def build_server_ssl_context(
    cert_file: StrPath, key_file: StrPath, ca_file: StrPath, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A server context asking for a client certificate issued by ``ca_file``; TLS 1.2 or newer.

    With ``require_client_cert=False`` a peer may come without a certificate (the app then answers
    with a clear 401, or accepts a bearer token); a certificate that is sent must still verify.

    No TLS 1.3 session tickets are issued. OpenSSL sends two after every handshake by default, each an
    encrypted copy of the session with the client's certificate in it, and our clients never use them
    (httpx, websockets and the agents make every connection with a full handshake). Measured here, the
    tickets were 0.6 ms of the 1.6 ms the core spent on each mutually authenticated handshake (0.4 ms
    without a client certificate), on the core's event loop; hundreds of agents connecting at once
    pay that hundreds of times.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


@dataclass(frozen=True)
class _ServerContextFactory:
    """uvicorn's ``ssl_context_factory``: our context instead of uvicorn's (which has no TLS floor).

    A picklable object rather than a closure, so the config survives uvicorn's worker processes.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    require_client_cert: bool = True

    def __call__(self, config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return build_server_ssl_context(
            self.cert_file, self.key_file, self.ca_file, require_client_cert=self.require_client_cert
        )


# TLS settings decided here; passing them would be silently overridden by the context factory.
_OWNED = frozenset(
    {
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_ca_certs",
        "ssl_cert_reqs",
        "ssl_context_factory",
        "ssl_version",
        "ssl_ciphers",
        "ssl_keyfile_password",
    }
)


def make_uvicorn_config(
    app: Any,
    *,
    host: str,
    port: int,
    cert_file: Path,
    key_file: Path,
    ca_file: Path,
    require_client_cert: bool = True,
    **kwargs: Any,
) -> uvicorn.Config:
    """A uvicorn config serving ``app`` over mTLS with the client certificate in each scope.

    httptools is used when installed (else h11); the loop is uvicorn's "auto" (uvloop when installed).
    ``proxy_headers`` defaults to False: behind no proxy, X-Forwarded-* must not rewrite the client.
    Other keyword arguments go to :class:`uvicorn.Config`; ``http=``/``ws=`` may only name classes of
    this module (a plain uvicorn class would drop the certificate), and the TLS settings are ours.
    """
    if clash := _OWNED & kwargs.keys():
        raise TypeError(f"make_uvicorn_config sets {sorted(clash)} itself")
    for key in ("http", "ws"):
        value = kwargs.get(key)
        if value is not None and not getattr(value, "captures_peer_certificate", False):
            raise TypeError(f"{key}= must be a protocol class from skyport.server.tls, not {value!r}")
    kwargs.setdefault("http", HTTP_PROTOCOL)
    kwargs.setdefault("ws", WS_PROTOCOL or "none")
    kwargs.setdefault("loop", "auto")
    kwargs.setdefault("proxy_headers", False)
    # WebSockets carry tunnel bytes (often compressed or encrypted already) and agent messages: deflate
    # would cost both ends CPU for little gain, and caps a tunnel at zlib's speed.
    kwargs.setdefault("ws_per_message_deflate", False)
    cert_file, key_file, ca_file = Path(cert_file), Path(key_file), Path(ca_file)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=cert_file,
        ssl_keyfile=key_file,
        ssl_ca_certs=ca_file,
        ssl_cert_reqs=ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL,
        ssl_context_factory=_ServerContextFactory(cert_file, key_file, ca_file, require_client_cert),
        **kwargs,
    )
