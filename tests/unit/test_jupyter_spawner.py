"""The JupyterHub spawner's pure parts: the form offers what the core has and accepts only that; the job
it submits listens on loopback and reaches the hub through an out port."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from skyport.jupyter.form import FormError, Upload, images_by_remote, machines, parse_form, render_form
from skyport.jupyter.job import job_spec, on_node, progress_event
from skyport.models import Event, Flavor, Image, JobState, Node, Remote

GIB = 1024**3
REMOTES = [Remote(id="r1", name="local", kind="local"), Remote(id="r2", name="cloud", kind="sim")]
FLAVORS = [
    Flavor(id="f2", name="gpu", remote_id="r2", cpus=4, mem=16 * GIB, gpus=1, price=0.9),
    Flavor(id="f1", name="small", remote_id="r2", cpus=1, mem=GIB, price=0.0125),
]
IMAGES = [
    Image(id="i1", name="ubuntu-24.04", remote_id="r2", kind="cloud"),
    Image(id="i2", name="python:3.12", kind="container"),
]
NODES = [Node(id="n1", name="here", host="here", remote_id="r1", cpus=8, mem=32 * GIB)]


def test_the_form_offers_static_remotes_then_flavors_by_price_with_their_images() -> None:
    choices = machines(REMOTES, FLAVORS, NODES)
    assert [(m.key, m.cpus, m.gpus) for m in choices] == [
        ("remote:local", 8, 0),
        ("flavor:cloud:small", 1, 0),
        ("flavor:cloud:gpu", 4, 1),
    ]
    images = images_by_remote(REMOTES, IMAGES)
    assert images == {"cloud": ["ubuntu-24.04"]}, "container images are no machine images"
    html = render_form(choices, images, currency="EUR")
    assert 'value="flavor:cloud:gpu"' in html and "0.9 EUR" in html and 'data-gpus="1"' in html
    assert 'id="sp-filter"' in html and 'id="sp-gpus"' in html and 'name="notebooks"' in html


def test_the_form_accepts_only_what_it_offered() -> None:
    choices = machines(REMOTES, FLAVORS, NODES)
    images = images_by_remote(REMOTES, IMAGES)
    notebook = {"filename": "a.ipynb", "body": b"{}", "content_type": "application/json"}
    options, uploads = parse_form(
        {"machine": ["flavor:cloud:gpu"], "image": ["ubuntu-24.04"], "notebooks_file": [notebook]},
        choices,
        images,
        max_bytes=1024,
    )
    assert options == {
        "machine": "flavor:cloud:gpu",
        "remote": "cloud",
        "flavor": "gpu",
        "gpus": 1,
        "image": "ubuntu-24.04",
    }
    assert uploads == [Upload("a.ipynb", b"{}")]
    bad = [
        {"machine": ["flavor:elsewhere:big"]},
        {"machine": ["remote:local"], "image": ["ubuntu-24.04"]},
        {"machine": ["flavor:cloud:small"], "image": ["windows"]},
        {"machine": ["remote:local"], "notebooks_file": [{"filename": "../x.ipynb", "body": b"1"}]},
        {"machine": ["remote:local"], "notebooks_file": [{"filename": "big.ipynb", "body": b"x" * 2048}]},
    ]
    for form in bad:
        with pytest.raises(FormError):
            parse_form(form, choices, images, max_bytes=1024)


def test_the_server_job_listens_in_and_reaches_the_hub_api_through_an_out_port() -> None:
    assert on_node("http://hub.internal:8081/hub/api") == ("http://127.0.0.1:8081/hub/api", 8081)
    env = {
        "JUPYTERHUB_API_URL": "http://10.0.0.5:8081/hub/api",
        "JUPYTERHUB_ACTIVITY_URL": "http://10.0.0.5:8081/hub/api/users/alice/activity",
        "JUPYTERHUB_API_TOKEN": "secret",
    }
    spec = job_spec(
        user="alice",
        env=env,
        cmd=["/opt/jupyter/bin/jupyterhub-singleuser"],
        args=["--debug"],
        options={"remote": "cloud", "flavor": "small", "gpus": 0, "image": ""},
        server_port=23456,
        notebooks=["a.ipynb"],
        output_patterns=["*.ipynb"],
        account="team",
    )
    assert [(p.port, p.direction) for p in spec.ports] == [(23456, "in"), (8081, "out")]
    assert spec.env["JUPYTERHUB_API_URL"] == "http://127.0.0.1:8081/hub/api"
    assert spec.env["JUPYTERHUB_ACTIVITY_URL"].startswith("http://127.0.0.1:8081/")
    assert spec.flavor == "small" and spec.remote == "cloud" and spec.cloud_image is None
    assert spec.input_files == ["a.ipynb"] and spec.output_files == ["*.ipynb"] and spec.account == "team"
    assert spec.script is not None and "exec /opt/jupyter/bin/jupyterhub-singleuser --debug" in spec.script
    assert "secret" not in spec.script, "the hub's token travels in the job's env, not in its script"


def test_job_events_become_progress_messages() -> None:
    event = Event(
        id=3,
        job_id="j",
        time=datetime.now(UTC),
        attempt=1,
        from_state=JobState.QUEUED,
        to_state=JobState.SCHEDULED,
        reason="provisioning",
        message="Creating 1 node(s) of small on cloud",
    )
    assert progress_event(event) == {
        "message": "Getting a machine: Creating 1 node(s) of small on cloud",
        "progress": 30,
    }


def test_options_from_the_hub_api_cannot_send_other_files_of_the_hubs_host() -> None:
    from skyport.jupyter import SkyPortSpawner

    spawner = SkyPortSpawner()
    spawner._check_user_options({"machine": "remote:local", "remote": "local", "gpus": 0})
    for bad in ({"notebooks": ["/etc/shadow"]}, {"gpus": -1}, {"flavor": 3}, {"command": "rm"}):
        with pytest.raises(ValueError):
            spawner._check_user_options(bad)
