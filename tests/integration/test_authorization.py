"""Who may do what, over real mTLS: users only see and act on their own jobs, through both APIs.

Also identity at the door: a revoked certificate, a certificate from another CA, no certificate at all,
and a certificate from our CA for a user this core does not know.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from swmclient.api import SwmApi

from skyport.client import ApiError, Client, ClientConfig, ConnectionFailed
from skyport.models import JobSpec, JobState
from skyport.pki import CertificateAuthority, cert_to_pem, generate_key, key_to_pem, write_private
from tests.support.core import CoreProcess

JOB_TIMEOUT_S = 30.0


@dataclass
class Person:
    name: str
    native: Client
    swm: SwmApi
    config: ClientConfig


def _person(core: CoreProcess, name: str, swm_dir: Path | None) -> Person:
    """``swm_dir`` None: use the user's own bundle for the original API too (the admin has no ~/.swm)."""
    user = core.users[name] if swm_dir is None else core.add_user(name, swm_dir=swm_dir)
    cert, key, ca = (
        (user.config.cert, user.config.key, user.config.ca)
        if swm_dir is None
        else (swm_dir / "cert.pem", swm_dir / "key.pem", swm_dir / "ca-chain-cert.pem")
    )
    swm = SwmApi(url=core.url, key_file=str(key), cert_file=str(cert), ca_file=str(ca))
    return Person(name, user.client(), swm, user.config)


@dataclass
class People:
    alice: Person
    bob: Person
    admin: Person


@pytest.fixture(scope="module")
def people(shared_core: CoreProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[People]:
    people = People(
        alice=_person(shared_core, "alice", tmp_path_factory.mktemp("alice") / ".swm"),
        bob=_person(shared_core, "bob", tmp_path_factory.mktemp("bob") / ".swm"),
        admin=_person(shared_core, "admin", None),
    )
    yield people
    for person in (people.alice, people.bob, people.admin):
        person.native.close()


def finished(person: Person, job_id: str) -> str:
    job = person.native.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert job.state is JobState.COMPLETED, f"{job.state}: {job.state_details}"
    return job_id


@pytest.fixture(scope="module")
def bob_job(people: People) -> str:
    """A finished job of bob's that wrote to stdout and stderr."""
    spec = JobSpec(name="bobs-job", command=["sh", "-c", "echo bob-secret; echo bob-error >&2"])
    return finished(people.bob, people.bob.native.submit(spec).id)


@pytest.fixture(scope="module")
def alice_job(people: People) -> str:
    return finished(people.alice, people.alice.native.submit(JobSpec(command=["true"])).id)


def context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


# ---------------------------------------------------------------------------------------------------
# Another user's jobs


def test_alice_cannot_see_or_read_bobs_job_through_the_native_api(people: People, bob_job: str) -> None:
    alice = people.alice.native
    calls: dict[str, Callable[[], object]] = {
        "get": lambda: alice.job(bob_job),
        "wait": lambda: alice.wait(bob_job, timeout=0),
        "stdout": lambda: alice.log(bob_job, "stdout"),
        "stderr": lambda: alice.log(bob_job, "stderr"),
        "events": lambda: alice.events(bob_job),
        "outputs": lambda: alice.outputs(bob_job),
    }
    for what, call in calls.items():
        with pytest.raises(ApiError) as refused:
            call()
        assert refused.value.status == 404, what
        assert "bob-secret" not in str(refused.value)


def test_alice_cannot_see_or_read_bobs_job_through_the_user_api(people: People, bob_job: str) -> None:
    alice = people.alice.swm
    assert alice.get_job(bob_job) is None
    assert alice.get_job_stdout(bob_job) is None
    assert alice.get_job_stderr(bob_job) is None


def test_alice_cannot_cancel_or_requeue_bobs_job_natively(people: People, bob_job: str) -> None:
    for action in (people.alice.native.cancel, people.alice.native.requeue):
        with pytest.raises(ApiError) as refused:
            action(bob_job)
        assert refused.value.status == 404


def test_alice_cannot_cancel_or_requeue_bobs_job_through_the_user_api(people: People, bob_job: str) -> None:
    assert people.alice.swm.cancel_job(bob_job) == f"Canceled: \nNot found: {bob_job}".encode()
    assert people.alice.swm.requeue_job(bob_job) == f"Requeued: \nNot found: {bob_job}".encode()


def test_bobs_running_job_is_unaffected_by_alices_attempts(people: People) -> None:
    spec = JobSpec(name="bob-survives", command=["sh", "-c", "sleep 1; echo bob-done"])
    job_id = people.bob.native.submit(spec).id
    for action in (people.alice.native.cancel, people.alice.native.requeue):
        with pytest.raises(ApiError):
            action(job_id)
    assert b"Not found: " + job_id.encode() in (people.alice.swm.cancel_job(job_id) or b"")
    assert b"Not found: " + job_id.encode() in (people.alice.swm.requeue_job(job_id) or b"")

    job = people.bob.native.wait(job_id, timeout=JOB_TIMEOUT_S)
    assert (job.state, job.exit_code, job.attempt) == (JobState.COMPLETED, 0, 1), job.state_details
    assert not job.cancel_requested
    assert people.bob.native.log(job_id) == b"bob-done\n"
    reasons = {event.reason for event in people.bob.native.events(job_id)}
    assert not reasons & {"cancel_requested", "canceled", "requeue_requested", "requeued"}, reasons


def test_alices_job_lists_hold_only_her_jobs(people: People, alice_job: str, bob_job: str) -> None:
    native_ids = {j.id for j in people.alice.native.jobs(limit=1000).items}
    assert alice_job in native_ids and bob_job not in native_ids
    assert bob_job not in {j.id for j in people.alice.native.jobs(user="bob", limit=1000).items}
    swm_jobs = people.alice.swm.get_jobs()
    assert swm_jobs is not None
    swm_ids = {j.id for j in swm_jobs}
    assert alice_job in swm_ids and bob_job not in swm_ids
    assert {j.owner for j in people.alice.native.jobs(limit=1000).items} == {"alice"}


def test_admin_sees_and_reads_everyones_jobs(people: People, alice_job: str, bob_job: str) -> None:
    admin = people.admin
    assert {alice_job, bob_job} <= {j.id for j in admin.native.jobs(limit=1000).items}
    assert [j.id for j in admin.native.jobs(user="bob", limit=1000).items if j.id == bob_job] == [bob_job]
    assert admin.native.job(bob_job).owner == "bob"
    assert admin.native.log(bob_job) == b"bob-secret\n"
    swm_jobs = admin.swm.get_jobs()
    assert swm_jobs is not None and {alice_job, bob_job} <= {j.id for j in swm_jobs}
    swm_job = admin.swm.get_job(bob_job)
    assert swm_job is not None and swm_job.id == bob_job
    stdout = admin.swm.get_job_stdout(bob_job)
    assert stdout is not None and stdout.payload.read() == b"bob-secret\n"


# ---------------------------------------------------------------------------------------------------
# Identity


def test_revoked_user_is_refused_on_the_next_request(
    shared_core: CoreProcess, people: People, tmp_path: Path
) -> None:
    carol = _person(shared_core, "carol", tmp_path / ".swm")
    with carol.native as before:
        assert before.whoami().name == "carol"
        assert people.admin.native.revoke_user("carol") >= 1
        with Client(carol.config) as fresh, pytest.raises(ApiError) as refused:
            fresh.whoami()
        assert refused.value.status == 401 and "revoked" in str(refused.value)
        with pytest.raises(ApiError) as on_open_connection:  # the connection opened before the revocation
            before.whoami()
        assert on_open_connection.value.status == 401
    assert carol.swm.get_jobs() is None
    reply = httpx.get(
        f"{shared_core.url}/user/job",
        verify=context(carol.config.ca, carol.config.cert, carol.config.key),
        timeout=10,
    )
    assert reply.status_code == 401 and "revoked" in reply.json()["detail"]
    assert people.alice.native.whoami().name == "alice", "revoking carol must not touch anyone else"


def test_certificate_from_another_ca_is_refused_during_tls(
    shared_core: CoreProcess, people: People, tmp_path: Path
) -> None:
    alice_id = people.alice.native.whoami().id
    other = CertificateAuthority.create(tmp_path / "other-ca")
    key = generate_key()
    (tmp_path / "cert.pem").write_bytes(cert_to_pem(other.issue_user(alice_id, "alice", key.public_key())))
    write_private(tmp_path / "key.pem", key_to_pem(key))
    ctx = context(people.alice.config.ca, tmp_path / "cert.pem", tmp_path / "key.pem")
    for path in ("/api/v1/whoami", "/user/job"):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{shared_core.url}{path}", verify=ctx, timeout=10)
    forged = ClientConfig(
        url=shared_core.url, cert=tmp_path / "cert.pem", key=tmp_path / "key.pem", ca=people.alice.config.ca
    )
    with Client(forged) as client, pytest.raises(ConnectionFailed):
        client.whoami()


@pytest.mark.parametrize("path", ["/api/v1/whoami", "/api/v1/jobs", "/user", "/user/job"])
def test_request_without_client_certificate_gets_a_clear_401(
    shared_core: CoreProcess, people: People, path: str
) -> None:
    reply = httpx.get(f"{shared_core.url}{path}", verify=context(people.alice.config.ca), timeout=10)
    assert reply.status_code == 401
    assert "client certificate" in reply.json()["detail"]


@pytest.mark.parametrize("who", ["unknown-user", "registered-user-unrecorded-certificate"])
def test_certificate_from_our_ca_for_an_unregistered_identity_gets_401(
    shared_core: CoreProcess, people: People, tmp_path: Path, who: str
) -> None:
    """Signed by our CA but never issued through ``skyport user add``: not a user of this core."""
    ca = CertificateAuthority.load(shared_core.home / "ca")
    key = generate_key()
    if who == "unknown-user":
        cert = ca.issue_user(str(uuid.uuid4()), "ghost", key.public_key())
    else:
        cert = ca.issue_user(people.alice.native.whoami().id, "alice", key.public_key())
    (tmp_path / "cert.pem").write_bytes(cert_to_pem(cert))
    write_private(tmp_path / "key.pem", key_to_pem(key))
    ctx = context(people.alice.config.ca, tmp_path / "cert.pem", tmp_path / "key.pem")
    for path in ("/api/v1/whoami", "/user/job"):
        reply = httpx.get(f"{shared_core.url}{path}", verify=ctx, timeout=10)
        assert reply.status_code == 401, path
        assert "not registered" in reply.json()["detail"]
