"""The job script of a TES task: its executors in order, in one working directory, each one recorded.

A TES task is one Sky Port job whose script is generated here (POSIX sh: it must run wherever a gate runs
jobs, as whatever account the job runs as, with nothing of ours installed). For each executor the script
records its start and end time and exit code (one line in ``.tes/executors``) and keeps the last
:data:`TAIL_BYTES` of its stdout and stderr (``.tes/<n>.stdout``/``.stderr``); ``.tes/system.log`` gets
what the runner itself has to say. Those files are the job's ``output_files``, so the core's ordinary
output collection brings them back and the TES API reads them from there.

Paths. TES paths are absolute paths "inside the container". Without a container runtime (images
``host``) a task's ``/data/x`` is ``<workdir>/data/x``: inputs are staged there and outputs collected
from there. So that commands and scripts that use the absolute paths work unchanged, the runner enters
a private mount namespace (``unshare``; unprivileged user namespaces where the job is not root) and
bind-mounts ``<workdir>/<top>`` over ``/<top>`` for each top-level directory the task's paths use that
exists on the host (``/tmp`` for Snakemake's TES plugin). A top-level directory that does not exist
(``/data``), is a system directory (``/usr``, ``/etc``, ...), contains the working directory itself, or
any directory when no namespace can be made, is handled by rewriting instead: executor arguments,
working directory, redirections and environment values that start with it are pointed into the
working directory. ``system.log`` says which way each one went.

Exit status of the script: 0 when every executor succeeded or its error was ignored
(``ignore_error``), :data:`EXECUTOR_FAILED` when an executor failed and stopped the task, anything else
is a system error (:data:`SYSTEM_FAILED` for what the runner detects itself).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from skyport.server.tes.models import TesExecutor, TesTask

#: How much of each executor's stdout and stderr the task's logs keep (its tail).
TAIL_BYTES = 64 * 1024
#: The runner's exit code when an executor failed (TES EXECUTOR_ERROR); other failures are SYSTEM_ERROR.
EXECUTOR_FAILED = 1
SYSTEM_FAILED = 3
#: Where the runner keeps its records, relative to the working directory (and the job's output files).
LOG_DIR = ".tes"
OUTPUT_FILES = [f"{LOG_DIR}/*"]
EXECUTORS_FILE = f"{LOG_DIR}/executors"
SYSTEM_LOG = f"{LOG_DIR}/system.log"

#: Top-level directories never mounted over (the host's own system): paths there are rewritten.
SYSTEM_DIRS = frozenset(
    {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "sys", "usr"}
)


def roots_of(task: TesTask) -> list[str]:
    """The top-level directories of every absolute path the task names, in first-seen order."""
    paths: list[str] = []
    paths += [i.path for i in task.inputs or []]
    paths += [o.path for o in task.outputs or []]
    paths += [o.path_prefix for o in task.outputs or [] if o.path_prefix and o.path_prefix.startswith("/")]
    paths += task.volumes or []
    for executor in task.executors:
        paths += [p for p in (executor.workdir, executor.stdin, executor.stdout, executor.stderr) if p]
    roots: dict[str, None] = {}
    for path in paths:
        top = path.strip("/").split("/", 1)[0]
        if top and "*" not in top and "?" not in top and "[" not in top:
            roots[top] = None
    return list(roots)


class _Words:
    """Shell words for the executors' strings, with the task's absolute paths pointed where they live."""

    def __init__(self, roots: Iterable[str]) -> None:
        self.roots = list(roots)
        self._var = {root: f"R{i}" for i, root in enumerate(self.roots)}

    def word(self, text: str) -> str:
        for root, var in self._var.items():
            prefix = f"/{root}"
            if text == prefix or text.startswith(prefix + "/"):
                return f'"${{{var}}}"{shlex.quote(text)}'
        return shlex.quote(text)

    def env(self, name: str, value: str) -> str:
        return f"{shlex.quote(name + '=')}{self.word(value)}"

    def setup(self) -> list[str]:
        """Per root: bind it in the namespace, or point its variable at the working directory."""
        lines = []
        for root, var in self._var.items():
            q = shlex.quote(root)
            bindable = root not in SYSTEM_DIRS
            lines += [
                f'{var}="$W"',
                f'mkdir -p "$W"/{q} || fail "cannot create /{root} in the working directory"',
            ]
            if bindable:
                lines += [
                    f'if [ -n "${{SKYPORT_TES_NS:-}}" ] && [ -d /{q} ] && [ ! -L /{q} ] && '
                    f"! within /{q}; then",
                    f'  if mount --bind "$W"/{q} /{q}; then {var}=""; note "/{root}: the task\'s own '
                    f"(mounted over the host's)\"; fi",
                    "fi",
                ]
            lines.append(
                f'[ -n "${{{var}}}" ] && note "/{root}: paths rewritten to $W/{root} '
                '(no private mount of it here)"'
            )
        return lines


def _prelude(host_path: list[str], image_error: str | None) -> list[str]:
    lines = [
        "#!/bin/sh",
        "# Sky Port TES runner (generated): the task's executors in order, each one recorded.",
        "set -u",
        "W=$(pwd -P)",
        f'L="$W/{LOG_DIR}"',
        f'mkdir -p "$L/full" || exit {SYSTEM_FAILED}',
        'note() { printf \'%s\\n\' "$*" >> "$L/system.log"; }',
        f'fail() {{ note "$*"; exit {SYSTEM_FAILED}; }}',
        "now() { date -u +%Y-%m-%dT%H:%M:%S.%6NZ; }",
        'within() { case "$W/" in "$1"/*) return 0 ;; esac; return 1; }',
    ]
    if image_error is not None:
        lines.append(f"fail {shlex.quote(image_error)}")
        return lines
    if host_path:
        lines.append(f'PATH={shlex.quote(":".join(host_path))}:"$PATH"; export PATH')
    return lines


def _namespace() -> list[str]:
    """Re-run the script in a private mount namespace when the system lets us make one."""
    return [
        'if [ -z "${SKYPORT_TES_NS:-}" ]; then',
        '  if [ "$(id -u)" = 0 ]; then NS="unshare --mount --propagation private"',
        '  else NS="unshare --user --map-root-user --mount --propagation private"; fi',
        '  if $NS true 2>/dev/null; then SKYPORT_TES_NS=1; export SKYPORT_TES_NS; exec $NS /bin/sh "$0"; fi',
        '  note "no private mount namespace can be made here (unshare): task paths are rewritten"',
        "fi",
    ]


def build_script(task: TesTask, *, host_path: list[str], image_error: str | None = None) -> str:
    """The job script for ``task``. ``image_error``: the gate cannot run the images; fail saying so."""
    lines = _prelude(host_path, image_error)
    if image_error is not None:
        return "\n".join(lines) + "\n"
    roots = roots_of(task)
    words = _Words(roots)
    if roots:
        lines += _namespace()
    lines += words.setup()
    for volume in task.volumes or []:
        lines.append(f"mkdir -p {words.word(volume)}")
    lines.append("FAILED=0")
    for i, executor in enumerate(task.executors):
        lines += _executor(i, executor, words)
    for output in task.outputs or []:
        if output.type != "DIRECTORY" and not any(c in output.path for c in "*?["):
            where = words.word(output.path)
            size = f'"$(wc -c < {where} | tr -d " ")"'
            lines.append(
                f"[ -f {where} ] && printf '%s\\t%s\\n' {shlex.quote(output.path)} {size} >> \"$L/outputs\""
            )
    lines.append(f'[ "$FAILED" = 0 ] || exit {EXECUTOR_FAILED}')
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


def _executor(i: int, executor: TesExecutor, words: _Words) -> list[str]:
    # Whole outputs stay in the working directory (full/ is not collected); the logs keep their tails.
    out = words.word(executor.stdout) if executor.stdout else f'"$L/full/{i}.out"'
    err = words.word(executor.stderr) if executor.stderr else f'"$L/full/{i}.err"'
    stdin = words.word(executor.stdin) if executor.stdin else "/dev/null"
    cd = words.word(executor.workdir) if executor.workdir else '"$W"'
    env = " ".join(words.env(k, v) for k, v in sorted((executor.env or {}).items()))
    argv = " ".join(words.word(w) for w in executor.command)
    lines = [
        f"# executor {i}: {shlex.quote(executor.image)}",
        'if [ "$FAILED" = 0 ]; then',
    ]
    for path in (executor.stdout, executor.stderr):
        if path:
            lines.append(f'  mkdir -p "$(dirname {words.word(path)})"')
    lines += [
        "  s=$(now)",
        f"  ( cd {cd} && exec env -- {env} {argv} ) < {stdin} > {out} 2> {err}",
        "  rc=$?",
        "  e=$(now)",
        f'  tail -c {TAIL_BYTES} {out} > "$L/{i}.stdout" 2>/dev/null',
        f'  tail -c {TAIL_BYTES} {err} > "$L/{i}.stderr" 2>/dev/null',
        f'  printf \'%s\\t%s\\t%s\\t%s\\n\' {i} "$s" "$e" "$rc" >> "$L/executors"',
    ]
    if executor.ignore_error:
        lines.append(f'  [ "$rc" = 0 ] || note "executor {i} exited with $rc; ignored (ignore_error)"')
    else:
        lines.append('  [ "$rc" = 0 ] || FAILED=1')
    lines.append("fi")
    return lines
