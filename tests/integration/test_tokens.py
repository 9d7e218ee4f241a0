"""API tokens on a real core: made with a certificate, used as bearer or basic auth, refused at once when
revoked or expired, limited by scope, never shown again nor logged; and the ``skyport token`` command.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from skyport.client.api import ApiError
from tests.support.core import CoreProcess, wait_for

SKYPORT = Path(sys.executable).parent / "skyport"


@pytest.fixture(scope="module")
def core(shared_core: CoreProcess) -> CoreProcess:
    if "tokuser" not in shared_core.users:
        shared_core.add_user("tokuser")
        shared_core.add_user("other")
    return shared_core


def plain(core: CoreProcess, **kwargs: object) -> httpx.Client:
    """HTTPS without a client certificate, verifying the core with its CA (as a TES client does)."""
    context = ssl.create_default_context(cafile=str(core.users["admin"].config.ca))
    return httpx.Client(base_url=core.url, verify=context, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def token(core: CoreProcess) -> Iterator[dict[str, str]]:
    with core.client("tokuser") as c:
        yield c.create_token("for a test")


def test_a_bearer_token_identifies_its_user(core: CoreProcess, token: dict[str, str]) -> None:
    with plain(core, headers={"Authorization": f"Bearer {token['secret']}"}) as http:
        reply = http.get("/api/v1/whoami")
    assert reply.status_code == 200, reply.text
    assert reply.json()["name"] == "tokuser"


def test_basic_auth_takes_the_user_name_and_the_token_as_password(
    core: CoreProcess, token: dict[str, str]
) -> None:
    with plain(core, auth=("tokuser", token["secret"])) as http:
        assert http.get("/api/v1/whoami").json()["name"] == "tokuser"
    with plain(core, auth=("other", token["secret"])) as http:
        reply = http.get("/api/v1/whoami")
    assert reply.status_code == 401
    assert "does not belong" in reply.json()["detail"]


def test_no_credentials_and_unknown_tokens_are_refused_with_a_next_step(core: CoreProcess) -> None:
    with plain(core) as http:
        reply = http.get("/api/v1/jobs")
        assert reply.status_code == 401
        assert "skyport token create" in reply.json()["detail"]
        reply = http.get("/api/v1/jobs", headers={"Authorization": "Bearer skp_not-a-real-token"})
        assert reply.status_code == 401
        assert "not known" in reply.json()["detail"]


def test_a_revoked_token_is_refused_at_once(core: CoreProcess, token: dict[str, str]) -> None:
    with plain(core, headers={"Authorization": f"Bearer {token['secret']}"}) as http:
        assert http.get("/api/v1/whoami").status_code == 200  # now cached by the core
        with core.client("tokuser") as c:
            revoked = c.revoke_token(token["id"])
        assert revoked["revoked_at"] is not None
        reply = http.get("/api/v1/whoami")
    assert reply.status_code == 401
    assert "revoked" in reply.json()["detail"]


def test_an_expired_token_is_refused(core: CoreProcess) -> None:
    with core.client("tokuser") as c:
        short = c.create_token("short", expires_days=2 / 86400)  # two seconds
    with plain(core, headers={"Authorization": f"Bearer {short['secret']}"}) as http:
        assert http.get("/api/v1/whoami").status_code == 200

        def refused() -> bool:
            return http.get("/api/v1/whoami").status_code == 401

        wait_for(refused, 10, "the token to expire")
        assert "expired" in http.get("/api/v1/whoami").json()["detail"]


def test_a_tes_only_token_cannot_use_the_native_api(core: CoreProcess) -> None:
    with core.client("tokuser") as c:
        tes = c.create_token("tes", scopes=["tes"])
    with plain(core, headers={"Authorization": f"Bearer {tes['secret']}"}) as http:
        assert http.get("/api/v1/jobs").status_code == 403
        assert http.get("/ga4gh/tes/v1/service-info").status_code == 200


def test_a_token_cannot_make_tokens_and_users_see_only_their_own(
    core: CoreProcess, token: dict[str, str]
) -> None:
    with plain(core, headers={"Authorization": f"Bearer {token['secret']}"}) as http:
        reply = http.post("/api/v1/tokens", json={"name": "child"})
    assert reply.status_code == 403
    with core.client("other") as c:
        assert all(t["user"] == "other" for t in c.tokens())
        with pytest.raises(ApiError) as caught:
            c.revoke_token(token["id"])
        assert caught.value.status == 404
        with pytest.raises(ApiError):
            c.tokens(all_users=True)
    with core.client("tokuser") as c:
        listed = {t["id"]: t for t in c.tokens()}
    assert token["id"] in listed
    assert "secret" not in listed[token["id"]]
    with core.client("admin") as c:
        assert token["id"] in {t["id"] for t in c.tokens(all_users=True)}


def test_secrets_are_never_logged(core: CoreProcess, token: dict[str, str]) -> None:
    with plain(core, headers={"Authorization": f"Bearer {token['secret']}"}) as http:
        http.get("/api/v1/whoami")
    with plain(core, auth=("tokuser", token["secret"])) as http:
        http.get("/api/v1/whoami")
    assert token["secret"] not in core.log()


def test_the_token_command_creates_lists_and_revokes(core: CoreProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPORT_")}
    env.update(SKYPORT_HOME=str(core.home), SKYPORT_URL=core.url, SKYPORT_USER="tokuser", NO_COLOR="1")

    def skyport(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SKYPORT), "token", *args], env=env, capture_output=True, text=True, timeout=60
        )

    created = skyport("create", "--name", "cli", "--days", "1")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("skp_") and "\n" not in secret  # stdout is the secret alone
    with plain(core, headers={"Authorization": f"Bearer {secret}"}) as http:
        assert http.get("/api/v1/whoami").json()["name"] == "tokuser"
    listed = skyport("list")
    assert listed.returncode == 0 and "cli" in listed.stdout and secret not in listed.stdout
    token_id = next(line.split()[0] for line in listed.stdout.splitlines() if " cli " in f" {line} ")
    revoked = skyport("revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    with plain(core, headers={"Authorization": f"Bearer {secret}"}) as http:
        assert http.get("/api/v1/whoami").status_code == 401
