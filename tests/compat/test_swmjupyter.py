"""The original JupyterHub spawner, swmjupyter 0.1.7 with JupyterHub 5.2.1, unchanged, against our core.

Its own hub (in .venv-swmjupyter, made by scripts/setup.sh) renders its options form from our ``/user``
API, submits its job script (``#SWM flavor``, ``cloud-image``, ``ports 8888/tcp/in,8081/tcp/out``, ...)
with swmclient, follows the job's progress, and the hub connects to ``node_ips[0]:<port>``; the server
reaches the hub's API at ``localhost:<hub port>`` on its node. The job runs on a ``sim`` cloud machine in a
network namespace of its own, whose "image" provides ``jupyterhub-singleuser`` on the default PATH as the
original's container image did (the VM's agent sees it at /usr/local/bin through a private mount
namespace; nothing on this machine changes). Its script takes the hub user from ``$USER`` on the node,
so the hub user is the account the sim's jobs run as, ``nobody``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from skyport.gates.sim import SimGate, free_subnet, sim_inventory
from skyport.models import JobState
from tests.support.core import VENV_BIN, CoreProcess, wait_for
from tests.support.hub import ROOT, HubProcess, missing_tools

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

SWM_VENV = ROOT / ".venv-swmjupyter"
if missing_tools() or not (SWM_VENV / "bin" / "jupyterhub-singleuser").exists():
    pytest.skip("run scripts/setup.sh first (the hub tools and .venv-swmjupyter)", allow_module_level=True)

REMOTE = "cloud"
USER = "nobody"  # the original's job script sets JUPYTERHUB_USER=$USER, the node account's name
PASSWORD = "a-test-password"
API_TOKEN = "swmjupyter-compat-test-token"
POLL_S = 2
SERVER_PORT = 8888


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[CoreProcess, HubProcess, SimGate, int]]:
    image_bin = Path(tempfile.mkdtemp(prefix="skyport-image-bin-"))  # traversable by the job account
    image_bin.chmod(0o755)
    (image_bin / "jupyterhub-singleuser").symlink_to(SWM_VENV / "bin" / "jupyterhub-singleuser")
    agent = [
        "/usr/bin/unshare",
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        'mount --bind "$0" /usr/local/bin && exec "$@"',
        str(image_bin),
        str(VENV_BIN / "skyport"),
    ]
    sim_values = {
        "boot_latency_s": 0.5,
        "agent_heartbeat_s": 1,
        "netns": True,
        "netns_subnet": str(free_subnet()),
        "agent_command": agent,
        # The original names the image by the catalog's name in `#SWM cloud-image`, which the core hands
        # to the provider as it is: this provider's image names are its image ids.
        "images": [{"id": "ubuntu-24.04", "name": "ubuntu-24.04", "kind": "cloud"}],
    }
    remote = {"kind": "sim", "name": REMOTE, "idle_timeout_s": 0, "backoff_s": 0.2, "sim": sim_values}
    home = tmp_path / "home"
    network = SimGate(REMOTE, {**remote, "sim": {**sim_values, "state_dir": str(home / "sim" / REMOTE)}})
    gateway = asyncio.run(network.ensure_network())
    env = {"SKYPORT_REMOTES": json.dumps([remote]), "SKYPORT_LOCAL__ENABLED": "false"}
    core = CoreProcess(home, env=env, host=gateway)
    hub: HubProcess | None = None
    try:
        core.start()
        core.add_user(USER)
        # Its clear_state() resets the server port to 8888 before every start, whatever is configured:
        # 8888 on the VM, and on a loopback address of the job's own on this host (node_ips[0]).
        server_port = SERVER_PORT
        hub = HubProcess(tmp_path / "hub", "", python=SWM_VENV / "bin" / "python")
        conf = tmp_path / "jupyter-spawner.conf"
        conf.write_text(
            "# swmjupyter's own configuration file\n"
            "account = default\n"
            f"jupyterhub_port = {hub.hub_port}\n"
            "jupyterhub_host = localhost\n"
            f"jupyter_singleuser_port = {server_port}\n"
        )
        bundle = home / "users" / "{username}"
        with open(hub.config_path, "a") as config:
            config.write(
                "c.JupyterHub.authenticator_class = 'dummy'\n"
                f"c.DummyAuthenticator.password = {PASSWORD!r}\n"
                "c.Authenticator.allow_all = True\n"
                "c.JupyterHub.spawner_class = 'swmjupyter.spawner.SwmSpawner'\n"
                f"c.SwmSpawner._config_file = {str(conf)!r}\n"
                f"c.SwmSpawner._swm_host = {gateway!r}\n"
                f"c.SwmSpawner._swm_port = {core.port}\n"
                f"c.SwmSpawner._swm_ca_file = {str(bundle / 'ca.pem')!r}\n"
                f"c.SwmSpawner._swm_cert_file = {str(bundle / 'cert.pem')!r}\n"
                f"c.SwmSpawner._swm_key_file = {str(bundle / 'key.pem')!r}\n"
                f"c.Spawner.poll_interval = {POLL_S}\n"
                "c.Spawner.http_timeout = 120\n"
                f"c.JupyterHub.services = [{{'name': 'compat-test', 'api_token': {API_TOKEN!r}}}]\n"
                "c.JupyterHub.load_roles = [{'name': 'compat-test', 'services': ['compat-test'],"
                " 'scopes': ['admin:servers', 'admin:users', 'read:users']}]\n"
            )
        hub.start()
        yield core, hub, network, server_port
    finally:
        if hub is not None:
            hub.stop()
        core.cleanup()
        asyncio.run(_remove_network(network))
        shutil.rmtree(image_bin, ignore_errors=True)


def _cloud_empty(state_dir: Path) -> bool:
    """No partition, VM process or VM namespace left (the bridge goes with the test's network)."""
    left = sim_inventory(state_dir)
    return not (left.partitions or left.processes or left.namespaces)


async def _remove_network(network: SimGate) -> None:
    for status in await network.list_partitions():
        await network.delete_partition(status.partition_id)
    await network.remove_network()
    await network.close()


def _login(browser: httpx.Client) -> None:
    browser.get("/hub/login")
    xsrf = browser.cookies.get("_xsrf") or ""
    reply = browser.post("/hub/login", data={"username": USER, "password": PASSWORD, "_xsrf": xsrf})
    assert reply.status_code in (200, 302) and "jupyterhub-session-id" in browser.cookies, reply.text[:500]


def test_the_original_spawner_starts_a_server_on_a_cloud_machine_and_stops_it(
    world: tuple[CoreProcess, HubProcess, SimGate, int],
) -> None:
    core, hub, network, server_port = world
    api = {"Authorization": f"token {API_TOKEN}"}
    with httpx.Client(base_url=hub.url, follow_redirects=True, timeout=30) as browser:
        _login(browser)
        # Its form, rendered from our /user API: the sim cloud's flavors with prices, and its images.
        form = browser.get("/hub/spawn")
        assert form.status_code == 200, form.text[:500]
        for shown in (REMOTE.capitalize(), "small", "gpu", "0.0125", 'value="ubuntu-24.04"'):
            assert shown in form.text, f"{shown!r} is not in the original spawner's form"

        # Submit it as a user would (the hub passes the form to the spawner's options_from_form).
        fields = {
            "selected_flavor_name": "small",
            "selected_flavor_gpus": "0",
            "selected_cloud_image_name": "ubuntu-24.04",
            "_xsrf": browser.cookies.get("_xsrf") or "",
        }
        reply = browser.post("/hub/spawn", data=fields, follow_redirects=False)
        assert reply.status_code == 302 and "spawn-pending" in reply.headers["location"], reply.text[:500]

        # Its progress messages come from our state_details, until the server is up.
        messages: list[str] = []
        with browser.stream(
            "GET", f"/hub/api/users/{USER}/server/progress", headers=api, timeout=240
        ) as events:
            for line in events.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:])
                    messages.append(str(event.get("message", "")))
                    if event.get("ready") or event.get("failed"):
                        break
        assert event.get("ready"), f"the server did not start: {messages}\n{hub.log()[-3000:]}"
        assert any("Job submitted" in m for m in messages), messages
        # In state W our details start with the original's words, which it maps to its progress bar.
        assert any("Job is waiting to start: Initiate a new partition" in m for m in messages), messages

        jobs = core.client(USER).jobs().items
        assert len(jobs) == 1 and jobs[0].state is JobState.RUNNING and jobs[0].remote == REMOTE
        job = jobs[0]
        assert {(p.port, p.direction) for p in job.spec.ports} == {(server_port, "in"), (hub.hub_port, "out")}

        # The server answers through the proxy; logging in to it makes it call the hub's API back
        # (the OAuth token exchange) through the job's out port.
        lab = browser.get(f"/user/{USER}/lab")
        hops = [str(r.url) for r in lab.history]
        assert lab.status_code == 200 and "oauth_callback" in " ".join(hops), (
            lab.status_code,
            hops,
            lab.text[:300],
        )
        assert "JupyterLab" in lab.text

        # poll (every 2 s) keeps the server while its job runs: it stays ready over several polls.
        until = time.monotonic() + 3 * POLL_S
        while time.monotonic() < until:
            info = browser.get(f"/hub/api/users/{USER}", headers=api).json()
            assert info["servers"][""]["ready"], info
        assert core.client(USER).job(job.id).state is JobState.RUNNING

        # stop: the hub asks the spawner, which cancels the job.
        stopped = browser.delete(f"/hub/api/users/{USER}/server", headers=api)
        assert stopped.status_code in (202, 204), stopped.text
    wait_for(lambda: core.client(USER).job(job.id).state is JobState.CANCELED, 60, "the job to be canceled")
    wait_for(lambda: _cloud_empty(network.state_dir), 60, "the cloud machine to be deleted")
