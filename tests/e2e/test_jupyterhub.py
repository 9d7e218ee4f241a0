"""JupyterHub through Sky Port, as a person uses it: a real hub and proxy, a real browser, real jobs.

A user logs in through headless Chromium, picks a machine in the spawner's form (this machine, through
the ``local`` gate; then a ``small`` flavor of the ``sim`` cloud, whose VM lives in a network namespace
of its own), uploads a notebook, waits on the progress page, and lands in JupyterLab, where a cell runs.
Stopping the server brings the notebook back with the cell's output, and the cloud machine goes away.

What it proves on the way: the hub reaches each server only through Sky Port's authenticated port
forwarding (the server listens on its node's loopback), the server reaches the hub's API through the
job's ``out`` port (on the VM, ``localhost:<hub port>`` is the agent's listener, not the hub), and each
hub user acts as their own Sky Port user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from skyport.gates.sim import SimGate, free_subnet, sim_inventory
from skyport.models import JobState
from tests.support.core import CoreProcess, wait_for
from tests.support.hub import CHROMIUM, ROOT, SINGLEUSER, HubProcess, missing_tools

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

if missing_tools():
    pytest.skip(f"run scripts/setup.sh first: missing {', '.join(missing_tools())}", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

REMOTE = "cloud"
USER = "alice"
PASSWORD = "a-test-password"
#: The README's screenshots are taken by this test; they replace the ones in docs/ with
#: SKYPORT_UPDATE_SCREENSHOTS=1 (otherwise they stay in the test's directory).
UPDATE_SCREENSHOTS = os.environ.get("SKYPORT_UPDATE_SCREENSHOTS") == "1"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _notebook() -> dict[str, Any]:
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "first",
                "metadata": {},
                "outputs": [],
                "source": [
                    "import os\n",
                    "print('sky', 6 * 7, os.environ['SKYPORT_JOB_ID'], 'on', os.environ['SKYPORT_NODES'])",
                ],
            }
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[CoreProcess, HubProcess, SimGate]]:
    """A core with the local gate and a sim cloud in network namespaces, and a hub that uses it."""
    sim_values = {
        "boot_latency_s": 0.5,
        "agent_heartbeat_s": 1,
        "netns": True,
        "netns_subnet": str(free_subnet()),
    }
    remote = {"kind": "sim", "name": REMOTE, "idle_timeout_s": 0, "backoff_s": 0.2, "sim": sim_values}
    home = tmp_path / "home"
    # The bridge first, so that the core can listen on its gateway (the VMs' way to the core).
    network = SimGate(REMOTE, {**remote, "sim": {**sim_values, "state_dir": str(home / "sim" / REMOTE)}})
    gateway = asyncio.run(network.ensure_network())
    core = CoreProcess(home, env={"SKYPORT_REMOTES": json.dumps([remote])}, host=gateway)
    hub: HubProcess | None = None
    try:
        core.start()
        core.add_user(USER)
        core.add_user("bob")  # another hub user, who has no identity on this hub
        hub = HubProcess(
            tmp_path / "hub",
            "c.JupyterHub.authenticator_class = 'dummy'\n"
            f"c.DummyAuthenticator.password = {PASSWORD!r}\n"
            "c.Authenticator.allow_all = True\n"
            "c.JupyterHub.spawner_class = 'skyport.jupyter.SkyPortSpawner'\n"
            f"c.SkyPortSpawner.core_url = {core.url!r}\n"
            f"c.SkyPortSpawner.identity_dir = {str(tmp_path / 'identities' / '{username}')!r}\n"
            f"c.SkyPortSpawner.notebooks_dir = {str(tmp_path / 'notebooks' / '{username}')!r}\n"
            f"c.SkyPortSpawner.cmd = [{str(SINGLEUSER)!r}]\n"
            "c.SkyPortSpawner.default_url = '/lab'\n"
            "c.SkyPortSpawner.currency = 'EUR'\n"
            "c.SkyPortSpawner.event_interval = 0.5\n",
        )
        # The admin provisions alice's own identity (the bundle `skyport user add` wrote), not bob's.
        shutil.copytree(home / "users" / USER, tmp_path / "identities" / USER)
        hub.start()
        yield core, hub, network
    finally:
        if hub is not None:
            hub.stop()
        _cancel_live_jobs(core)  # a failed run must not leave servers running (local jobs outlive a core)
        core.cleanup()
        asyncio.run(_remove_network(network))


def _cloud_empty(state_dir: Path) -> bool:
    """No partition, VM process or VM namespace left (the bridge goes with the test's network)."""
    left = sim_inventory(state_dir)
    return not (left.partitions or left.processes or left.namespaces)


def _cancel_live_jobs(core: CoreProcess) -> None:
    if core.proc is None or core.proc.poll() is not None:
        return
    with contextlib.suppress(Exception):
        client = core.client(USER)
        live = [j for j in client.jobs().items if not j.state.terminal]
        for job in live:
            client.cancel(job.id)
        wait_for(lambda: all(client.job(j.id).state.terminal for j in live), 60, "live jobs to end")


async def _remove_network(network: SimGate) -> None:
    for status in await network.list_partitions():
        await network.delete_partition(status.partition_id)
    await network.remove_network()
    await network.close()


def _login(page: Page, hub: HubProcess, user: str) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", PASSWORD)
    page.click("#login_submit")


def _spawn(page: Page, hub: HubProcess, machine: str, notebook: Path, *, screenshot: Path | None) -> None:
    """Pick ``machine`` in the form, upload the notebook, start, and wait on the progress page."""
    page.goto(f"{hub.url}/hub/spawn")
    expect(page.locator("#sp-machines")).to_be_visible()
    if machine.startswith("flavor:"):
        page.fill("#sp-filter", machine.rsplit(":", 1)[1])  # the filter narrows the list by name
    page.check(f"input[name=machine][value='{machine}']")
    page.set_input_files("#sp-notebooks", str(notebook))
    if screenshot is not None:
        page.fill("#sp-filter", "")
        page.check(f"input[name=machine][value='{machine}']")
        page.screenshot(path=str(screenshot), full_page=True)
    page.click("#spawn_form button[type=submit]")
    page.wait_for_url("**/spawn-pending/**", timeout=30_000)
    expect(page.locator("#progress-message")).not_to_be_empty(timeout=60_000)
    page.wait_for_url("**/user/alice/lab**", timeout=240_000)


def _run_cell(page: Page, hub: HubProcess, notebook: str) -> str:
    """Open the uploaded notebook in Lab, run its cell, save; returns the cell's output."""
    page.goto(f"{hub.url}/user/{USER}/lab/tree/{notebook}")
    cell = page.locator(".jp-Notebook .jp-Cell").first
    expect(cell).to_be_visible(timeout=60_000)
    expect(page.locator(".jp-StatusBar-TextItem", has_text="| Idle")).to_have_count(1, timeout=60_000)
    news = page.get_by_role("button", name="No", exact=True)  # Lab's "Jupyter news?" question
    if news.count():
        news.click()
    output = cell.locator(".jp-OutputArea-output")
    deadline = time.monotonic() + 90
    while not output.count():  # a cell run before Lab's kernel connection is ready is dropped: run again
        assert time.monotonic() < deadline, "the cell never ran"
        cell.locator(".cm-content").click()
        page.keyboard.press("Control+Enter")
        with contextlib.suppress(AssertionError):
            expect(output).to_have_count(1, timeout=10_000)
    expect(output).to_contain_text("sky 42", timeout=30_000)
    page.keyboard.press("Control+s")
    expect(page.locator(".jp-mod-dirty")).to_have_count(0, timeout=30_000)
    return str(output.inner_text())


def _stop(page: Page, hub: HubProcess) -> None:
    """The home page's "Stop My Server" (its script must be loaded before the click does anything)."""
    page.goto(f"{hub.url}/hub/home", wait_until="networkidle")
    page.click("#stop")
    expect(page.locator("#stop")).to_be_hidden(timeout=120_000)  # hidden once the hub has stopped it
    expect(page.locator("#start")).to_contain_text("Start My Server")


def _job_of(core: CoreProcess, name: str) -> Any:
    jobs = core.client(USER).jobs(name=name).items
    assert jobs, "the server ran as a job of alice's own"
    return jobs[0]


def test_a_user_runs_jupyterlab_here_and_on_a_cloud_machine_and_gets_the_notebook_back(
    world: tuple[CoreProcess, HubProcess, SimGate], tmp_path: Path
) -> None:
    core, hub, network = world
    notebook = tmp_path / "upload" / "analysis.ipynb"
    notebook.parent.mkdir()
    notebook.write_text(json.dumps(_notebook()))
    returned = tmp_path / "notebooks" / USER / "analysis.ipynb"
    shots = ROOT / "docs" if UPDATE_SCREENSHOTS else tmp_path / "screenshots"
    shots.mkdir(exist_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        try:
            # Bob has no Sky Port identity on this hub: he is told so, and nothing runs as anyone else.
            _login(page, hub, "bob")
            page.goto(f"{hub.url}/hub/spawn")
            expect(page.locator("body")).to_contain_text("no Sky Port identity", timeout=30_000)
            page.context.clear_cookies()

            _login(page, hub, USER)
            # 1. This machine (the local gate).
            _spawn(page, hub, "remote:local", notebook, screenshot=None)
            local_job = _job_of(core, f"jupyter-{USER}")
            assert local_job.remote == "local" and local_job.state is JobState.RUNNING
            output = _run_cell(page, hub, notebook.name)
            assert local_job.id in output, "the cell ran inside the Sky Port job"
            # A restarted hub finds the running server again (get_state/load_state; a new forward).
            hub.restart()
            page.goto(f"{hub.url}/user/{USER}/lab/tree/{notebook.name}")
            expect(page.locator(".jp-OutputArea-output").first).to_contain_text(local_job.id, timeout=60_000)
            _stop(page, hub)
            wait_for(returned.exists, 120, "the notebook to come back")
            done = core.client(USER).job(local_job.id)
            assert done.state is JobState.CANCELED, done.state_details
            saved = json.loads(returned.read_text())
            assert "sky 42" in json.dumps(saved["cells"][0]["outputs"]), "the notebook came back, run"

            # 2. A small machine of the sim cloud, booted for this server and deleted after it.
            returned.unlink()
            _spawn(
                page,
                hub,
                f"flavor:{REMOTE}:small",
                notebook,
                screenshot=shots / "jupyterhub-options.png",
            )
            cloud_job = next(j for j in core.client(USER).jobs().items if j.remote == REMOTE)
            assert cloud_job.state is JobState.RUNNING and cloud_job.node_names[0].startswith("sp-")
            output = _run_cell(page, hub, notebook.name)
            assert cloud_job.id in output
            page.screenshot(path=str(shots / "jupyterhub-lab.png"))
            _stop(page, hub)
            wait_for(returned.exists, 120, "the notebook to come back from the cloud")
            assert core.client(USER).job(cloud_job.id).state is JobState.CANCELED
            saved = json.loads(returned.read_text())
            assert cloud_job.id in json.dumps(saved["cells"][0]["outputs"]), "back from the cloud, run"
        finally:
            browser.close()

    wait_for(
        lambda: _cloud_empty(network.state_dir),
        120,
        "the cloud machine to be deleted",
    )
