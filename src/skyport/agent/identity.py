"""The agent's identity: its own key and short-lived node certificate, enrolled and renewed.

The key is generated here and never leaves the node: the core only ever sees a CSR. Files live in the
agent's state directory (the key readable by the agent's account only).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509

from skyport.agent import protocol
from skyport.pki import generate_key, key_to_pem, make_csr, write_private

KEY_FILE = "node-key.pem"
CERT_FILE = "node-cert.pem"
CA_FILE = "ca.pem"
NODE_FILE = "node.json"
#: How long an enrolment request may take (the core may be busy with hundreds of nodes at once).
ENROL_TIMEOUT_S = 30.0


class EnrolmentRefused(Exception):
    """The core refused to enrol or renew; the message says why and what to do."""


class CoreUnreachable(EnrolmentRefused):
    """The core did not answer (down, restarting, network): worth trying again."""


@functools.lru_cache(maxsize=8)
def _verifying_context(ca_pem: bytes) -> ssl.SSLContext:
    """A context that verifies the core against the CA ``ca_pem`` and presents no certificate, shared
    by the agents of one process that trust the same CA (it holds no node's key or certificate).

    Building an SSL context costs OpenSSL 3 a new context and the CA's parsing; an agent pool's fifty
    nodes enrolling at once built one each, side by side in the pool's threads, and those were the
    largest item of a pool's profile while 500 simulated VMs enrolled."""
    return ssl.create_default_context(cadata=ca_pem.decode())


def enrolment_client(ca_pem: bytes, *, max_connections: int = 8) -> httpx.AsyncClient:
    """An HTTP client for the enrolments of several nodes that trust the CA ``ca_pem`` (close it).

    An enrolment is authenticated by its one-time token and its CSR, not by the connection, which
    presents no certificate; so the nodes of one process (an agent pool's fifty) can send theirs over
    a few kept-alive connections instead of each making a client and a TLS connection of its own.
    Made for each node, those clients and handshakes were the largest item of a pool's CPU while 500
    simulated VMs enrolled, and each handshake cost the core one more."""
    return httpx.AsyncClient(
        verify=_verifying_context(ca_pem),
        timeout=ENROL_TIMEOUT_S,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


@dataclass
class NodeIdentity:
    state_dir: Path
    url: str

    @property
    def key_path(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.state_dir / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.state_dir / CA_FILE

    def enrolled(self) -> bool:
        return self.cert_path.exists() and self.key_path.exists() and (self.state_dir / NODE_FILE).exists()

    def node(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.state_dir / NODE_FILE).read_text())
        return data

    def expires_at(self) -> dt.datetime:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        return cert.not_valid_after_utc

    def lifetime(self) -> dt.timedelta:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        return cert.not_valid_after_utc - cert.not_valid_before_utc

    def renewal_due(self, now: dt.datetime) -> bool:
        """When less than a third of the certificate's life is left."""
        return self.expires_at() - now < self.lifetime() / 3

    def client_context(self) -> ssl.SSLContext:
        """TLS to the core with the node certificate (everything after enrolment)."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.load_cert_chain(str(self.cert_path), str(self.key_path))
        return context

    def enrol(self, token: str, ca_file: Path) -> dict[str, str]:
        """Trade a bootstrap token and a CSR for a node certificate."""
        key_pem, body, ca_pem = self._enrolment_request(token, ca_file)
        self._save(key_pem, self._answer(self._post(protocol.ENROL_PATH, body, _verifying_context(ca_pem))))
        return self.node()

    async def enrol_async(
        self, token: str, ca_file: Path, client: httpx.AsyncClient | None = None
    ) -> dict[str, str]:
        """:meth:`enrol` without holding a thread while the core answers.

        An agent pool enrols dozens of nodes at once; with the blocking call each held one of the
        pool's few worker threads for the whole round trip to a busy core, so the pool's other work
        (noticing new nodes, launching jobs) queued behind enrolments for seconds. The request is
        awaited; the key, the CSR and the few small files are made on the event loop (~0.2 ms in all:
        two hops to a thread for them cost a pool more than the work itself).

        ``client``: one the caller shares between the enrolments of its nodes (see
        :func:`enrolment_client`); else one is made for this request."""
        key_pem, body, ca_pem = self._enrolment_request(token, ca_file)
        url = self.url.rstrip("/") + protocol.ENROL_PATH
        try:
            if client is not None:
                response = await client.post(url, json=body)
            else:
                async with enrolment_client(ca_pem, max_connections=1) as own:
                    response = await own.post(url, json=body)
        except httpx.HTTPError as exc:
            raise CoreUnreachable(f"cannot reach the core at {self.url}: {exc}") from exc
        self._save(key_pem, self._answer(response))
        return self.node()

    def _enrolment_request(self, token: str, ca_file: Path) -> tuple[bytes, dict[str, str], bytes]:
        """The node's side of an enrolment before it is sent: the key (made here, never sent), the
        request carrying the token and the CSR, and the CA to verify the core against (``ca_file``'s,
        kept as the node's)."""
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca_pem = ca_file.read_bytes()
        self.ca_path.write_bytes(ca_pem)
        key = generate_key()
        body = {
            "token": token,
            "csr": make_csr(key, socket.gethostname()).decode(),
            "hostname": socket.gethostname(),
        }
        return key_to_pem(key), body, ca_pem

    def renew(self) -> None:
        """A fresh key and certificate, authenticated by the current one."""
        key = generate_key()
        body = {"csr": make_csr(key, socket.gethostname()).decode()}
        answer = self._answer(self._post(protocol.RENEW_PATH, body, self.client_context()))
        self._save(key_to_pem(key), answer)

    def _post(self, path: str, body: dict[str, str], context: ssl.SSLContext) -> httpx.Response:
        try:
            return httpx.post(self.url.rstrip("/") + path, json=body, verify=context, timeout=30.0)
        except httpx.HTTPError as exc:
            raise CoreUnreachable(f"cannot reach the core at {self.url}: {exc}") from exc

    @staticmethod
    def _answer(response: httpx.Response) -> dict[str, str]:
        """The core's answer to an enrolment or renewal; a refusal raises with the core's reason."""
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise EnrolmentRefused(f"the core refused ({response.status_code}): {detail}")
        data: dict[str, str] = response.json()
        return data

    def _save(self, key_pem: bytes, answer: dict[str, str]) -> None:
        # Key first, then certificate, each replaced atomically: a crash leaves a usable pair or the old.
        tmp_key = self.key_path.with_suffix(".new")
        write_private(tmp_key, key_pem)
        tmp_cert = self.cert_path.with_suffix(".new")
        tmp_cert.write_text(answer["certificate"])
        os.replace(tmp_key, self.key_path)
        os.replace(tmp_cert, self.cert_path)
        self.ca_path.write_text(answer["ca"])
        node = {
            "node_id": answer["node_id"],
            "node_name": answer["node_name"],
            "remote": answer["remote"],
            "url": self.url,
        }
        (self.state_dir / NODE_FILE).write_text(json.dumps(node))
