"""GA4GH TES 1.1 on a real core, as a TES client sees it: executors in order in one working directory,
ignore_error, logs, views hiding what they must, states (CANCELING, EXECUTOR_ERROR vs SYSTEM_ERROR),
cancel while queued and while running, inputs and outputs through staging, output upload failure,
filters, pagination under concurrent inserts, backend parameters, images, ownership and signed callbacks.

The module's core runs TES images in the host environment (``local.images = host``), declares 2 CPUs
(so that a task can hold the whole node and the next one waits), lets ``file://`` staging use one
directory, and keeps job working directories outside /tmp (so that a task's own /tmp is mounted over the
host's: see :mod:`skyport.server.tes.runner`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.core import CoreProcess, wait_for

TES = "/ga4gh/tes/v1"
END_S = 60.0
ACTIVE = {"QUEUED", "INITIALIZING", "RUNNING", "CANCELING"}


def private_dir(parent: str, mode: int) -> Path:
    path = Path(tempfile.mkdtemp(prefix="skyport-tes-", dir=parent))
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def dirs() -> Iterator[tuple[Path, Path]]:
    """(workroot outside /tmp, a file:// staging root that jobs' accounts may write)."""
    workroot = private_dir("/var/tmp", 0o711)
    files = private_dir("/var/tmp", 0o777)
    yield workroot, files
    shutil.rmtree(workroot, ignore_errors=True)
    shutil.rmtree(files, ignore_errors=True)


def tes_core(home: Path, workroot: Path, files: Path, **extra: str) -> CoreProcess:
    env = {
        "SKYPORT_LOCAL__IMAGES": "host",
        "SKYPORT_LOCAL__CPUS": "2",
        "SKYPORT_LOCAL__WORKROOT": str(workroot),
        "SKYPORT_STAGING__FILE_ROOTS": json.dumps([str(files)]),
        "SKYPORT_STAGING__ATTEMPTS": "1",
        **extra,
    }
    process = CoreProcess(home, env=env)
    process.start()
    return process


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, dirs: tuple[Path, Path]) -> Iterator[CoreProcess]:
    process = tes_core(tmp_path_factory.mktemp("tes") / "home", *dirs)
    process.add_user("alice")
    process.add_user("bob")
    try:
        yield process
    finally:
        process.cleanup()


class Tes:
    """A TES client over plain HTTPS with a token, as py-tes and Snakemake talk."""

    def __init__(self, core: CoreProcess, user: str) -> None:
        with core.client(user) as c:
            self.token = c.create_token(f"tests {user}")
        context = ssl.create_default_context(cafile=str(core.users["admin"].config.ca))
        self.http = httpx.Client(
            base_url=core.url + TES,
            verify=context,
            headers={"Authorization": f"Bearer {self.token['secret']}"},
            timeout=30,
        )

    def create(self, task: dict[str, Any]) -> str:
        reply = self.http.post("/tasks", json=task)
        assert reply.status_code == 200, reply.text
        task_id: str = reply.json()["id"]
        return task_id

    def get(self, task_id: str, view: str = "MINIMAL") -> dict[str, Any]:
        reply = self.http.get(f"/tasks/{task_id}", params={"view": view})
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def list(self, **params: Any) -> dict[str, Any]:
        reply = self.http.get("/tasks", params=params)
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def cancel(self, task_id: str) -> None:
        assert self.http.post(f"/tasks/{task_id}:cancel").status_code == 200

    def wait(self, task_id: str, states: set[str] | None = None, timeout: float = END_S) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            task = self.get(task_id, "FULL")
            done = task["state"] in states if states else task["state"] not in ACTIVE
            return task if done else None

        found: dict[str, Any] = wait_for(reached, timeout, f"task {task_id} to reach {states or 'its end'}")  # type: ignore[assignment]
        return found


@pytest.fixture(scope="module")
def alice(core: CoreProcess) -> Iterator[Tes]:
    client = Tes(core, "alice")
    yield client
    client.http.close()


@pytest.fixture(scope="module")
def bob(core: CoreProcess) -> Iterator[Tes]:
    client = Tes(core, "bob")
    yield client
    client.http.close()


def sh(script: str, **fields: Any) -> dict[str, Any]:
    return {"image": "debian:12", "command": ["sh", "-c", script], **fields}


# ---------------------------------------------------------------------------------------------------


def test_service_info_names_tes_our_storage_and_backend_parameters(
    alice: Tes, dirs: tuple[Path, Path]
) -> None:
    info = alice.http.get("/service-info").json()
    assert info["type"] == {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"}
    assert f"file://{dirs[1]}" in info["storage"]
    assert {"gpus", "flavor", "remote", "walltime", "account", "callback_url"} <= set(
        info["tesResources_backend_parameters"]
    )


def test_executors_run_in_order_in_one_workdir_with_inputs_outputs_and_logs(
    alice: Tes, dirs: tuple[Path, Path]
) -> None:
    files = dirs[1]
    (files / "greeting.txt").write_text("hello from a URL\n")
    result = files / "results" / "out.txt"
    task_id = alice.create(
        {
            "name": "two-steps",
            "inputs": [
                {"path": "/data/greeting.txt", "url": f"file://{files}/greeting.txt"},
                {"path": "/tmp/config.ini", "content": "answer=42\n"},
            ],
            "outputs": [{"path": "/tmp/out.txt", "url": f"file://{result}"}],
            "executors": [
                sh("cat /tmp/config.ini > /tmp/out.txt; echo first; echo to-stderr >&2", workdir="/tmp"),
                # /data is no host directory: its paths in arguments are pointed at the task's own.
                {"image": "debian:12", "command": ["cp", "/data/greeting.txt", "/tmp/copy.txt"]},
                sh("cat /tmp/copy.txt >> /tmp/out.txt; echo second; pwd", workdir="/tmp", env={"X": "1"}),
            ],
            "tags": {"suite": "tes"},
        }
    )
    task = alice.wait(task_id)
    assert task["state"] == "COMPLETE", task["logs"][0].get("system_logs")
    assert result.read_text() == "answer=42\nhello from a URL\n"
    logs = task["logs"][0]["logs"]
    assert [entry["exit_code"] for entry in logs] == [0, 0, 0]
    assert logs[0]["stdout"] == "first\n" and logs[0]["stderr"] == "to-stderr\n"
    assert logs[2]["stdout"] == "second\n/tmp\n"  # the executor's workdir, as the task named it
    assert all(e["start_time"] <= e["end_time"] for e in logs)
    assert logs[0]["end_time"] <= logs[1]["start_time"] <= logs[2]["start_time"]
    log = task["logs"][0]
    assert log["outputs"] == [
        {"url": f"file://{result}", "path": "/tmp/out.txt", "size_bytes": str(len(result.read_bytes()))}
    ]
    system = "\n".join(log["system_logs"])
    assert "host environment" in system and "running -> staging_out" in system
    assert task["creation_time"] and log["start_time"] and log["end_time"]


def test_views_hide_what_they_must(alice: Tes) -> None:
    task_id = alice.create(
        {"inputs": [{"path": "/tmp/secret.txt", "content": "inline"}], "executors": [sh("echo out")]}
    )
    alice.wait(task_id)
    assert alice.get(task_id, "MINIMAL") == {"id": task_id, "state": "COMPLETE"}
    basic = alice.get(task_id, "BASIC")
    assert "content" not in basic["inputs"][0] and basic["inputs"][0]["path"] == "/tmp/secret.txt"
    assert "system_logs" not in basic["logs"][0]
    assert basic["logs"][0]["logs"][0]["exit_code"] == 0
    assert "stdout" not in basic["logs"][0]["logs"][0] and "stderr" not in basic["logs"][0]["logs"][0]
    full = alice.get(task_id, "FULL")
    assert full["inputs"][0]["content"] == "inline"
    assert full["logs"][0]["logs"][0]["stdout"] == "out\n" and full["logs"][0]["system_logs"]
    listed = alice.list(view="BASIC", name_prefix="")["tasks"]
    assert all("content" not in i for t in listed for i in t.get("inputs", []))
    minimal = alice.list()["tasks"]
    assert minimal and all(set(t) == {"id", "state"} for t in minimal)


def test_a_failing_executor_stops_the_rest_unless_its_error_is_ignored(alice: Tes) -> None:
    stopped = alice.create({"executors": [sh("exit 3"), sh("echo never")]})
    ignored = alice.create({"executors": [sh("exit 3", ignore_error=True), sh("echo still")]})
    task = alice.wait(stopped)
    assert task["state"] == "EXECUTOR_ERROR"
    assert [e["exit_code"] for e in task["logs"][0]["logs"]] == [3]  # the second never ran
    task = alice.wait(ignored)
    assert task["state"] == "COMPLETE"
    assert [e["exit_code"] for e in task["logs"][0]["logs"]] == [3, 0]
    assert task["logs"][0]["logs"][1]["stdout"] == "still\n"
    assert any("ignore_error" in line for line in task["logs"][0]["system_logs"])


def test_cancel_while_running_and_while_queued(alice: Tes) -> None:
    # The first task holds both declared CPUs, so the second waits in the queue.
    running = alice.create({"resources": {"cpu_cores": 2}, "executors": [sh("sleep 60")]})
    alice.wait(running, {"RUNNING"})
    queued = alice.create({"resources": {"cpu_cores": 2}, "executors": [sh("echo never")]})
    assert alice.get(queued)["state"] == "QUEUED"
    alice.cancel(queued)
    assert alice.get(queued)["state"] == "CANCELED"  # at once: it held nothing
    alice.cancel(running)
    assert alice.get(running)["state"] in {"CANCELING", "CANCELED"}
    task = alice.wait(running)
    assert task["state"] == "CANCELED"
    assert any("Canceled by alice" in line for line in task["logs"][0]["system_logs"])
    alice.cancel(running)  # canceling an ended task changes nothing
    assert alice.get(running)["state"] == "CANCELED"


def test_an_output_that_cannot_be_uploaded_is_a_system_error(alice: Tes, receiver: Receiver) -> None:
    task_id = alice.create(
        {
            "outputs": [{"path": "/tmp/result.txt", "url": f"{receiver.url}/refused/result.txt"}],
            "executors": [sh("echo data > /tmp/result.txt")],
        }
    )
    task = alice.wait(task_id)
    assert task["state"] == "SYSTEM_ERROR"
    assert task["logs"][0]["logs"][0]["exit_code"] == 0  # the executor did its part
    assert any("Outputs not delivered" in line for line in task["logs"][0]["system_logs"])


def test_a_walltime_overrun_is_a_system_error(alice: Tes) -> None:
    task_id = alice.create(
        {"resources": {"backend_parameters": {"WallTime": "1"}}, "executors": [sh("sleep 30")]}
    )
    task = alice.wait(task_id)
    assert task["state"] == "SYSTEM_ERROR"
    assert any("walltime" in line for line in task["logs"][0]["system_logs"])


def test_backend_parameters_strict_refuses_what_we_cannot_satisfy(alice: Tes) -> None:
    strict = {"backend_parameters": {"VmSize": "Standard_D64_v3"}, "backend_parameters_strict": True}
    reply = alice.http.post("/tasks", json={"resources": strict, "executors": [sh("true")]})
    assert reply.status_code == 400 and "VmSize" in reply.json()["detail"]
    reply = alice.http.post(
        "/tasks", json={"resources": {"backend_parameters": {"remote": "mars"}}, "executors": [sh("true")]}
    )
    assert reply.status_code == 400 and "mars" in reply.json()["detail"]
    lenient = {"backend_parameters": {"VmSize": "big", "gpus": "0"}}
    task_id = alice.create({"resources": lenient, "executors": [sh("true")]})
    task = alice.wait(task_id)
    assert task["state"] == "COMPLETE"
    assert task["resources"]["backend_parameters"] == {"gpus": "0"}  # unsupported keys are not kept
    assert any("VmSize" in line and "ignored" in line for line in task["logs"][0]["system_logs"])


def test_filters_by_name_prefix_state_and_tags(alice: Tes) -> None:
    run = str(time.monotonic_ns())
    ids = {
        "a": alice.create({"name": f"flt-{run}-a", "tags": {"foo": "bar"}, "executors": [sh("true")]}),
        "b": alice.create(
            {"name": f"flt-{run}-b", "tags": {"foo": "bat", "baz": "x"}, "executors": [sh("false")]}
        ),
        "c": alice.create({"name": f"flt-{run}-c", "tags": {"foo": ""}, "executors": [sh("true")]}),
        "d": alice.create({"name": f"other-{run}", "executors": [sh("true")]}),
    }
    for task_id in ids.values():
        alice.wait(task_id)

    def found(**params: Any) -> set[str]:
        names = {v: k for k, v in ids.items()}
        tasks = alice.list(page_size=2000, **params)["tasks"]
        return {names[t["id"]] for t in tasks if t["id"] in names}

    assert found(name_prefix=f"flt-{run}") == {"a", "b", "c"}
    assert found(name_prefix=f"flt-{run}", state="EXECUTOR_ERROR") == {"b"}
    assert found(name_prefix=f"flt-{run}", state="COMPLETE") == {"a", "c"}
    assert found(tag_key="foo", tag_value="bar") == {"a"}
    assert found(tag_key="foo") == {"a", "b", "c"}  # a key alone matches any value
    assert found(tag_key=["foo", "baz"], tag_value=["bat", "x"]) == {"b"}
    assert found(tag_key="foo", tag_value="") == {"a", "b", "c"}


def test_pages_stay_stable_while_tasks_are_added(alice: Tes) -> None:
    run = str(time.monotonic_ns())
    first = {alice.create({"name": f"page-{run}", "executors": [sh("true")]}) for _ in range(25)}
    seen: list[str] = []
    added: set[str] = set()
    token = None
    with ThreadPoolExecutor(4) as pool:
        while True:
            params: dict[str, Any] = {"name_prefix": f"page-{run}", "page_size": 7}
            if token:
                params["page_token"] = token
            page = alice.list(**params)
            seen += [t["id"] for t in page["tasks"]]
            # Others add tasks between our pages.
            new = [{"name": f"page-{run}", "executors": [sh("true")]} for _ in range(3)]
            added |= set(pool.map(alice.create, new))
            token = page.get("next_page_token")
            if not token:
                break
    assert len(seen) == len(set(seen)) == 25  # no task twice, none skipped, none of the new ones
    assert set(seen) == first
    newest = alice.list(name_prefix=f"page-{run}", page_size=len(added))["tasks"]
    assert {t["id"] for t in newest} == added  # newest first: the ones added meanwhile
    bad = alice.http.get("/tasks", params={"page_token": "not-ours"})
    assert bad.status_code == 400


def test_tasks_belong_to_their_user(alice: Tes, bob: Tes, core: CoreProcess) -> None:
    task_id = alice.create({"name": "alices", "executors": [sh("true")]})
    assert bob.http.get(f"/tasks/{task_id}").status_code == 404
    assert bob.http.post(f"/tasks/{task_id}:cancel").status_code == 404
    assert task_id not in {t["id"] for t in bob.list(page_size=2000)["tasks"]}
    assert alice.http.get("/tasks/not-a-task").status_code == 404
    # A task is a Sky Port job: the native API shows it to its owner.
    with core.client("alice") as c:
        assert c.job(task_id).owner == "alice"
    context = ssl.create_default_context(cafile=str(core.users["admin"].config.ca))
    with httpx.Client(base_url=core.url + TES, verify=context) as anonymous:
        assert anonymous.get("/tasks").status_code == 401


def test_a_bad_task_is_refused_with_the_reason(alice: Tes) -> None:
    for task, words in (
        ({"executors": []}, "executors"),
        ({"executors": [sh("true")], "inputs": [{"path": "relative.txt", "content": "x"}]}, "absolute"),
        ({"executors": [sh("true")], "inputs": [{"path": "/tmp/x", "url": "ftp://host/x"}]}, "not supported"),
        ({"executors": [sh("true")], "outputs": [{"path": "/../etc/x", "url": "file:///x"}]}, "'..'"),
    ):
        reply = alice.http.post("/tasks", json=task)
        assert reply.status_code == 400, reply.text
        assert words in reply.json()["detail"]


# -- callbacks ---------------------------------------------------------------------------------------


class Receiver:
    """A real small HTTP server: records POSTs, refuses PUTs under /refused (an upload target)."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(403)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def test_callbacks_are_signed_posts_on_each_state_change(alice: Tes, receiver: Receiver) -> None:
    task_id = alice.create(
        {
            "executors": [sh("true")],
            "resources": {"backend_parameters": {"callback_url": f"{receiver.url}/hook"}},
        }
    )
    alice.wait(task_id)

    def delivered() -> list[dict[str, Any]]:
        mine = [(h, b) for h, b in receiver.posts if json.loads(b)["id"] == task_id]
        states = [json.loads(b)["state"] for _, b in mine]
        return [json.loads(b) for _, b in mine] if states and states[-1] == "COMPLETE" else []

    posts = wait_for(delivered, 20, "the final callback")
    assert [p["state"] for p in posts] == ["QUEUED", "INITIALIZING", "RUNNING", "COMPLETE"]  # type: ignore[union-attr]
    key = hashlib.sha256(alice.token["secret"].encode()).hexdigest().encode()
    for headers, body in receiver.posts:
        if json.loads(body)["id"] != task_id:
            continue
        expected = hmac.new(key, headers["x-skyport-timestamp"].encode() + b"." + body, hashlib.sha256)
        assert headers["x-skyport-signature"] == "sha256=" + expected.hexdigest()
        assert abs(time.time() - int(headers["x-skyport-timestamp"])) < 120


def test_a_callback_in_tags_also_works(alice: Tes, receiver: Receiver) -> None:
    task_id = alice.create({"executors": [sh("exit 1")], "tags": {"callback_url": f"{receiver.url}/tagged"}})
    alice.wait(task_id)

    def final() -> bool:
        return any(
            json.loads(b)["id"] == task_id and json.loads(b)["state"] == "EXECUTOR_ERROR"
            for _, b in receiver.posts
        )

    wait_for(final, 20, "the EXECUTOR_ERROR callback")


# -- images ------------------------------------------------------------------------------------------


def test_an_image_a_remote_cannot_provide_is_a_clear_system_error(
    tmp_path: Path, dirs: tuple[Path, Path]
) -> None:
    process = tes_core(tmp_path / "home", *dirs, SKYPORT_LOCAL__IMAGES="none")
    try:
        client = Tes(process, "admin")
        task_id = client.create({"executors": [sh("echo must-not-run > /tmp/ran")]})
        task = client.wait(task_id)
        assert task["state"] == "SYSTEM_ERROR"
        system = "\n".join(task["logs"][0]["system_logs"])
        assert "cannot provide container images (debian:12)" in system
        assert task["logs"][0]["logs"] == []  # nothing ran
        client.http.close()
    finally:
        process.cleanup()
