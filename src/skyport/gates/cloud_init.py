"""The user data a cloud VM boots with: cloud-init that starts ``skyport agent`` and nothing else of ours.

Every public-cloud provisioner (aws, openstack, azure) hands each node the same ``#cloud-config``:

- ``write_files``: the core's CA certificate, the node's one-time bootstrap token (mode 0600, removed
  once the agent has enrolled), a launcher script and a systemd unit;
- ``users``: the unprivileged account jobs run as (``job_user``);
- ``runcmd``: enable and start the unit.

The launcher runs ``skyport`` from the image, or installs ``agent_install`` (a pip requirement) into
``/opt/skyport`` first when the remote sets one. The unit's ``ExecStart`` is the launcher followed by the
agent's whole argv (``agent --url ... --ca ... --token-file ...``), which is also what a test harness
that plays cloud-init reads.

What is *not* there, on purpose: no provider credential, no key, no long-lived secret. The token enrols
one node once and expires with the partition's boot deadline; the node makes its own key and gets a
short-lived certificate for it (DESIGN §7).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from skyport.gates.provisioner import NodeBootstrap

ETC = "/etc/skyport"
CA_PATH = f"{ETC}/ca.pem"
TOKEN_PATH = f"{ETC}/bootstrap-token"
LAUNCHER_PATH = f"{ETC}/start-agent"
UNIT_NAME = "skyport-agent.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
STATE_DIR = "/var/lib/skyport/agent"
WORKROOT = "/var/lib/skyport/work"
VENV = "/opt/skyport"

#: The largest user data the providers take (AWS: 16 KiB before base64; the others allow more).
MAX_USER_DATA = 16 * 1024


def agent_argv(node: NodeBootstrap, job_user: str) -> list[str]:
    """The agent's arguments on the VM (after the ``skyport`` command)."""
    return [
        "agent",
        "--url",
        node.core_url,
        "--ca",
        CA_PATH,
        "--token-file",
        TOKEN_PATH,
        "--state-dir",
        STATE_DIR,
        "--workroot",
        WORKROOT,
        "--default-user",
        job_user,
    ]


def _launcher(agent_install: str | None) -> str:
    install = (
        f"  [ -x {VENV}/bin/skyport ] || {{ python3 -m venv {VENV} && {VENV}/bin/pip install --quiet "
        f"{shlex.quote(agent_install)}; }}\n"
        if agent_install
        else f'  [ -x {VENV}/bin/skyport ] || {{ echo "this image has no skyport" >&2; exit 1; }}\n'
    )
    return (
        "#!/bin/sh\n"
        "# Starts the Sky Port agent (written by the core's provisioner through cloud-init).\n"
        "set -e\n"
        "if command -v skyport >/dev/null 2>&1; then\n"
        "  SKYPORT=skyport\n"
        "else\n"
        f"{install}"
        f"  SKYPORT={VENV}/bin/skyport\n"
        "fi\n"
        # The token is one-time: once enrolled, the agent restarts from its own key and certificate.
        f"if [ -f {STATE_DIR}/node.json ]; then rm -f {TOKEN_PATH}; fi\n"
        'exec "$SKYPORT" "$@"\n'
    )


def _unit(node: NodeBootstrap, job_user: str) -> str:
    argv = " ".join(shlex.quote(a) for a in [LAUNCHER_PATH, *agent_argv(node, job_user)])
    return (
        "[Unit]\n"
        "Description=Sky Port node agent\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        f"ExecStart={argv}\n"
        "Restart=always\n"
        "RestartSec=5\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def render_user_data(node: NodeBootstrap, *, job_user: str, agent_install: str | None) -> str:
    """The ``#cloud-config`` document for one node (see the module's docstring)."""
    config: dict[str, Any] = {
        "users": ["default", {"name": job_user, "shell": "/bin/bash", "lock_passwd": True}],
        "write_files": [
            {"path": CA_PATH, "permissions": "0644", "content": node.ca_pem},
            {"path": TOKEN_PATH, "permissions": "0600", "content": node.token + "\n"},
            {"path": LAUNCHER_PATH, "permissions": "0755", "content": _launcher(agent_install)},
            {"path": UNIT_PATH, "permissions": "0644", "content": _unit(node, job_user)},
        ],
        "runcmd": [
            ["mkdir", "-p", WORKROOT],
            ["chmod", "0711", WORKROOT],
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", UNIT_NAME],
        ],
    }
    # JSON is YAML: cloud-init reads it as it is, and the core needs no YAML library.
    text = "#cloud-config\n" + json.dumps(config, indent=1) + "\n"
    if len(text.encode()) > MAX_USER_DATA:
        raise ValueError(f"the user data of {node.node_name} is larger than {MAX_USER_DATA} bytes")
    return text


def parse_user_data(text: str) -> dict[str, Any]:
    """The cloud-config as data: ``files`` (path -> content) and ``exec_start`` (the unit's argv).

    What a harness playing cloud-init needs; also how a test proves what a VM would be handed.
    """
    if not text.startswith("#cloud-config\n"):
        raise ValueError("not a #cloud-config document")
    config: dict[str, Any] = json.loads(text.removeprefix("#cloud-config\n"))
    files = {str(f["path"]): str(f["content"]) for f in config.get("write_files", [])}
    exec_start: list[str] = []
    for line in files.get(UNIT_PATH, "").splitlines():
        if line.startswith("ExecStart="):
            exec_start = shlex.split(line.removeprefix("ExecStart="))
    return {"files": files, "exec_start": exec_start, "config": config}
