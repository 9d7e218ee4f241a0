"""The ``ssh`` gate's ``agent`` mode: ``skyport agent`` kept running on each host, started over SSH.

For hosts where a daemon of ours may run: the core logs in (the remote's key, host keys checked
against its ``known_hosts`` exactly as in ``direct`` mode: :class:`~skyport.gates.ssh.SSHLink`), looks
whether the agent runs, and if not starts it, detached in a session of its own so that it outlives the
SSH session and the core. From then on the host is an ordinary agent node: the agent connects *out* to
the core over mutual TLS and its jobs run through :class:`~skyport.gates.agent.AgentGate`. SSH is only
the way the agent gets started; no job traffic goes over it.

On the host everything lives in the agent's state directory ``S`` (``agent_state_dir``):
``S/agent.pid`` (written and locked by the agent itself, so a pid file left by a dead agent is told
apart from a live one), ``S/agent.log``, ``S/core-ca.pem`` (the core's CA, copied on every start),
and the agent's own key, certificate and ``node.json``. A node that is not enrolled yet (or enrolled as
another node) gets a one-time bootstrap token, handed to the agent on a pipe to its standard input: it
is never in an argument list (``ps`` shows those to every user) nor in a file.

If the agent command is not found on the host, the error says so; with ``agent_install`` set, the
requirement is ``pip install``-ed into ``S/venv`` first and that agent is run.

This module only talks to hosts; the caller (:mod:`skyport.server.lifecycle.ssh_agents`) decides when
to look, makes the tokens and records what happened (a gate never touches the store).
"""

from __future__ import annotations

import json
import posixpath
import shlex
from dataclasses import dataclass

import structlog

from skyport.gates.base import GateError
from skyport.gates.ssh import SSHLink
from skyport.server.settings import SSHHost, SSHRemoteSettings

log = structlog.get_logger(__name__)

PID_FILE = "agent.pid"
LOG_FILE = "agent.log"
CA_FILE = "core-ca.pem"
#: Lines of the agent's log shown when it does not start or does not connect.
LOG_TAIL_LINES = 15
#: How long the start script waits (in 0.1 s steps) for a new agent to enrol, or to die trying.
START_WAIT_STEPS = 300

#: ``ours P``: pid P is alive, not a zombie, and is an agent of this state directory ($S).
_OURS = r"""
ours() {
  kill -0 "$1" 2>/dev/null || return 1
  if [ -r "/proc/$1/cmdline" ]; then tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF -- "$S"
  else ps -o args= -p "$1" 2>/dev/null | grep -qF -- "--state-dir $S"; fi
}
"""


def _q(text: str) -> str:
    return shlex.quote(text)


@dataclass(frozen=True)
class AgentState:
    """What one look at a host found."""

    #: The pid of the agent running with our state directory, or None.
    pid: int | None
    #: The node id the state directory is enrolled as (None: not enrolled).
    node_id: str | None
    #: The core URL the running agent was given (None: not running, or not known on this host).
    url: str | None
    #: The last lines of the agent's log (empty if it has none).
    log_tail: str


class SSHAgentStarter:
    """Looks at and starts the agents of one ``ssh`` remote in ``agent`` mode, one host at a time."""

    def __init__(self, settings: SSHRemoteSettings) -> None:
        if settings.mode != "agent":
            raise ValueError(f"remote {settings.name}: SSHAgentStarter is for mode 'agent'")
        self._settings = settings
        self._hosts: dict[str, SSHHost] = {h.name or h.host: h for h in settings.hosts}
        self._links: dict[str, SSHLink] = {}

    @property
    def node_names(self) -> list[str]:
        return list(self._hosts)

    def where(self, node: str) -> str:
        return self._link(node).where

    def _link(self, node: str) -> SSHLink:
        host = self._hosts.get(node)
        if host is None:
            raise GateError(f"remote {self._settings.name} has no host named {node!r}")
        link = self._links.get(node)
        if link is None:
            link = self._links[node] = SSHLink(self._settings, host, self._settings.user)
        return link

    async def _state_dir(self, link: SSHLink, node: str) -> str:
        await link.connection()  # learns the login's home
        relative = self._settings.agent_state_dir.replace("{node}", node)
        return posixpath.normpath(posixpath.join(link.home, relative))

    async def inspect(self, node: str) -> AgentState:
        """Is our agent running on the host, and as which node is it enrolled?"""
        link = self._link(node)
        state_dir = await self._state_dir(link, node)
        script = (
            f"S={_q(state_dir)}\n{_OURS}\n"
            'p=; [ -s "$S/agent.pid" ] && read -r p <"$S/agent.pid"\n'
            'if [ -n "$p" ] && ours "$p"; then\n'
            '  echo "running $p"\n'
            # the URL it was given (an agent of a core that now listens elsewhere is restarted)
            "  u=$(tr '\\0' '\\n' <\"/proc/$p/cmdline\" 2>/dev/null | sed -n '/^--url$/{n;p;q;}')\n"
            "  printf 'url %s\\n' \"$u\"\n"
            "fi\n"
            'if [ -s "$S/node.json" ]; then printf "node %s\\n" "$(tr -d \'\\n\' <"$S/node.json")"; fi\n'
            f'if [ -s "$S/{LOG_FILE}" ]; then echo log; tail -n {LOG_TAIL_LINES} "$S/{LOG_FILE}"; fi\n'
        )
        out = await link.check(script, "looking for the agent")
        pid: int | None = None
        node_id: str | None = None
        url: str | None = None
        lines = out.splitlines()
        tail: list[str] = []
        for index, line in enumerate(lines):
            if line.startswith("running ") and line[8:].strip().isdigit():
                pid = int(line[8:])
            elif line.startswith("url "):
                url = line[4:].strip() or None
            elif line.startswith("node "):
                try:
                    node_id = str(json.loads(line[5:])["node_id"])
                except (ValueError, KeyError, TypeError):
                    node_id = None  # unreadable: enrol again
            elif line == "log":
                tail = lines[index + 1 :]
                break
        return AgentState(pid, node_id, url, "\n".join(tail).strip())

    async def start(
        self, node: str, *, url: str, ca_pem: bytes, token: str | None, stop_pid: int | None = None
    ) -> int:
        """Start the agent on the host (detached); returns its pid once it runs (and has enrolled).

        ``token``: enrol first (the state directory's old identity, if any, is removed). ``stop_pid``:
        an agent of ours to stop first (one enrolled as another node). A failure is a
        :class:`GateError` with the host's own words (the end of the agent's log).
        """
        link = self._link(node)
        state_dir = await self._state_dir(link, node)
        script = self._start_script(link, state_dir, url, ca_pem, token, stop_pid)
        out = await link.check(script, "starting the agent")
        last = out.strip().splitlines()[-1] if out.strip() else ""
        if not last.startswith("started ") or not last[8:].strip().isdigit():
            raise GateError(f"starting the agent on {link.where} said nothing useful: {out.strip()!r}")
        return int(last[8:])

    def _command(self, state_dir: str) -> str:
        """Shell lines that ``set --`` the agent command, installing it if allowed and needed."""
        words = shlex.split(self._settings.agent_command)
        if not words:
            raise GateError(f"remote {self._settings.name}: agent_command is empty")
        venv = posixpath.join(state_dir, "venv")
        venv_agent = f"{_q(venv + '/bin/skyport')} agent"
        lines = [
            f"if command -v -- {_q(words[0])} >/dev/null 2>&1; then set -- {' '.join(_q(w) for w in words)}",
            f"elif [ -x {_q(venv + '/bin/skyport')} ]; then set -- {venv_agent}",
        ]
        install = self._settings.agent_install
        if install:
            failed = (
                f"the agent command {words[0]!r} is not on the host, and installing {install!r} "
                f"into {venv} failed:"
            )
            lines.append(
                "else\n"
                f'  printf "%s\\n" {_q("installing " + install)} >>"$S/install.log"\n'
                f"  {{ python3 -m venv {_q(venv)} && "
                f"{_q(venv + '/bin/pip')} install --quiet {_q(install)}; }} "
                '>>"$S/install.log" 2>&1 || {\n'
                f'    printf "%s\\n" {_q(failed)} >&2\n'
                f'    tail -n {LOG_TAIL_LINES} "$S/install.log" >&2; exit 22\n'
                "  }\n"
                f"  set -- {venv_agent}"
            )
        else:
            missing = (
                f"the agent command {words[0]!r} is not found on the host: install Sky Port there (pip "
                "install skyport-wm), give agent_command as an absolute path, or set agent_install to "
                "let the core install it"
            )
            lines.append(f'else\n  printf "%s (PATH=%s)\\n" {_q(missing)} "$PATH" >&2; exit 20')
        lines.append("fi")
        return "\n".join(lines) + "\n"

    def _options(self, link: SSHLink, state_dir: str, url: str) -> list[str]:
        host = link.host
        workroot = posixpath.normpath(posixpath.join(link.home, self._settings.workroot))
        options = ["--url", url, "--ca", posixpath.join(state_dir, CA_FILE), "--state-dir", state_dir]
        options += ["--workroot", workroot]
        if host.cpus is not None:
            options += ["--cpus", str(host.cpus)]
        if host.mem is not None:
            options += ["--mem", str(host.mem)]
        if host.gpus:
            options += ["--gpus", str(host.gpus)]
        for key, value in host.labels.items():
            options += ["--label", f"{key}={value}"]
        return options + list(self._settings.agent_options)

    def _start_script(
        self,
        link: SSHLink,
        state_dir: str,
        url: str,
        ca_pem: bytes,
        token: str | None,
        stop_pid: int | None,
    ) -> str:
        options = " ".join(_q(o) for o in self._options(link, state_dir, url))
        stop = ""
        if stop_pid is not None:
            stop = (
                f"p={stop_pid}\n"
                'if ours "$p"; then\n'
                '  kill -s TERM "$p"; n=0\n'
                '  while ours "$p" && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n+1)); done\n'
                '  ! ours "$p" || kill -s KILL "$p"\n'
                "fi\n"
            )
        if token is not None:
            # A fresh enrolment: the old identity goes (the agent enrols when node.json is missing).
            stop += 'rm -f -- "$S/node.json" "$S/node-cert.pem" "$S/node-key.pem"\n'
            # printf is a shell builtin: the token is in no process's argument list.
            feed = f"printf '%s\\n' {_q(token)} | "
            ready = '[ -s "$S/node.json" ] && [ -s "$S/agent.pid" ]'
        else:
            feed = ""
            ready = '[ -s "$S/agent.pid" ]'
        stdin = "" if token is not None else "</dev/null "
        return (
            "u=$(umask); umask 077\n"  # our files private; the agent (and its jobs) get the login's umask
            "cd || exit 1\n"
            f"S={_q(state_dir)}\n{_OURS}\n"
            'mkdir -p -- "$S" && chmod 700 "$S" || exit 1\n'
            f"{stop}"
            f'printf %s {_q(ca_pem.decode())} >"$S/{CA_FILE}" || exit 1\n'
            f"{self._command(state_dir)}"
            "command -v setsid >/dev/null 2>&1 || "
            "{ echo 'the host has no setsid command (util-linux)' >&2; exit 4; }\n"
            f'rm -f -- "$S/{PID_FILE}"\n'
            f'echo "--- started by the core at $(date)" >>"$S/{LOG_FILE}"\n'
            'umask "$u"\n'
            # Detached: a session of its own (no SIGHUP when SSH goes), no terminal, output to its log.
            f'{feed}setsid "$@" {options} {stdin}>>"$S/{LOG_FILE}" 2>&1 &\n'
            "p=$!\n"
            "n=0\n"
            f'while [ "$n" -lt {START_WAIT_STEPS} ]; do\n'
            f"  if {ready}; then break; fi\n"
            '  kill -0 "$p" 2>/dev/null || break\n'
            "  sleep 0.1; n=$((n+1))\n"
            "done\n"
            # The pid the agent wrote (and locked) itself: the one the next look will find.
            'q=; [ -s "$S/agent.pid" ] && read -r q <"$S/agent.pid"\n'
            'if [ -n "$q" ] && ours "$q"; then echo "started $q"; exit 0; fi\n'
            f'echo "the agent exited at once; the end of its log ($S/{LOG_FILE}):" >&2\n'
            f'tail -n {LOG_TAIL_LINES} "$S/{LOG_FILE}" >&2\n'
            "exit 21\n"
        )

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()

    def drop(self, node: str) -> None:
        """Forget the host's SSH connection (it is opened again when next needed)."""
        link = self._links.get(node)
        if link is not None:
            link.drop()
