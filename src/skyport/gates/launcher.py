"""The launcher: one long-lived process per work root that is the parent of the local gate's jobs.

Why a process of its own. A job's exit status must survive a crash of the core, so the core cannot be
the job's parent. The :class:`~skyport.gates.process.ProcessExecutor` solves this with a shell wrapper
per job (a shell, a fork and an exec for every job: about 1 ms of CPU, a quarter of what a trivial job
cost end to end) and a control directory of small files. The launcher solves it once: it starts each
job directly (one exec), reaps it, records its status and tells the core. It runs in a session of its
own, so a ``kill -9`` of the core leaves it and its jobs running; the restarted core connects to it
again and asks what became of each job.

The launch record. Each launch has one file, ``CONTROL_DIR.state`` (:func:`record_path`), created
exclusively before the fork (the claim: a second launch of the same attempt is refused), then holding
its pid and start time once the job runs, and its status (a shell's ``$?``) once it ended. One file per job
and no directory (unless the job needs one, for its script): on this kind of disk a new file or
directory costs from 20 us to over 0.5 ms of kernel CPU, the largest part of a trivial job's cost.

Protocol: JSON lines over a Unix socket in the work root (mode 0600: only the core's account). Requests
are served one at a time, in order; of several connected cores (two sharing a work root, or a restarted
core while its dead predecessor's connection is still being read) the oldest connection's requests are
served first, so a restarted core's questions are answered after the dead core's last launch, never
before. A job's end is told to the core that launched it (or last asked about it).

- ``{"op": "hello"}`` -> ``{"op": "hello"}``: the connection is being served.
- ``{"op": "launch", "request": {...}}`` -> ``{"op": "launched", "cdir", "pid", "start_ticks"}``, or
  ``{"op": "refused", "cdir", "error"}`` (nothing started), or ``{"op": "not_run", "cdir", "status",
  "error"}`` (the program could not be executed: 127 or 126 as a shell would say, nothing ran).
- ``{"op": "query", "cdir"}`` -> ``{"op": "running", "cdir", "pid", "start_ticks"}`` or
  ``{"op": "not_running", "cdir"}`` (then the launch record tells how it ended, if it did).
- ``{"op": "terminate", "cdir", "grace_s"}``: TERM the job's process group now and KILL it after the
  grace period unless it ended; no reply.
- pushed: ``{"op": "exit", "cdir", "status"}`` when a job ended, after its record was written.

Crash safety, "never run a job twice": a record with no pid (or a pid and no status) that no live
launcher runs belongs to a launcher that died: the job may have run, so the core reports it ``lost``
(and kills what is left of it), never launches it again. Signals go only to a process group whose
leader the launcher has not reaped yet, so a group id is never reused under them. The launcher leaves
when no core is connected and no job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyport.gates.process import (
    LaunchError,
    LaunchRequest,
    ProcessExecutor,
    ProcessHandle,
)

__all__ = ["LaunchRecord", "Launcher", "LauncherGone", "read_record", "record_path", "serve"]

log = logging.getLogger(__name__)

SOCKET_NAME = "launcher.sock"
#: A job's launch record is ``CONTROL_DIR.state``: one file, made by the claim and written in place.
RECORD_SUFFIX = ".state"
LOCK_NAME = "launcher.lock"
LOG_NAME = "launcher.log"
#: Exit code of a launcher that found another one already serving the work root.
EXIT_BUSY = 3
START_TIMEOUT_S = 30.0
#: A launcher with no job and no core leaves after this long (a core about to connect has time to).
IDLE_GRACE_S = 5.0


class LauncherGone(Exception):
    """The connection to the launcher broke: the launcher died (or was never there)."""


# ------------------------------------------------------------------------------------ wire format


def _request_to_wire(req: LaunchRequest) -> dict[str, Any]:
    return {
        "job_id": req.job_id,
        "attempt": req.attempt,
        "workdir": str(req.workdir),
        "control_dir": str(req.control_dir),
        "argv": req.argv,
        "script": req.script,
        "env": req.env,
        "stdout_path": str(req.stdout_path),
        "stderr_path": str(req.stderr_path),
        "stdin_path": str(req.stdin_path) if req.stdin_path is not None else None,
        "run_as": req.run_as,
    }


def _request_from_wire(data: dict[str, Any]) -> LaunchRequest:
    def path(name: str) -> Path | None:
        value = data.get(name)
        return Path(value) if value is not None else None

    return LaunchRequest(
        job_id=str(data["job_id"]),
        attempt=int(data["attempt"]),
        workdir=Path(data["workdir"]),
        control_dir=Path(data["control_dir"]),
        argv=data.get("argv"),
        script=data.get("script"),
        env=dict(data.get("env") or {}),
        stdout_path=Path(data["stdout_path"]),
        stderr_path=Path(data["stderr_path"]),
        stdin_path=path("stdin_path"),
        run_as=data.get("run_as"),
    )


def _shell_status(returncode: int) -> int:
    """A wait status as a shell's ``$?`` (128 + n for a signal), the form of the launch record."""
    return 128 - returncode if returncode < 0 else returncode


# ------------------------------------------------------------------------------------ the process


#: How long a reply may wait for a core to read (then that core is taken for gone).
SEND_TIMEOUT_S = 30.0


def _send_whole(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking socket, waiting while the peer's buffer is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], SEND_TIMEOUT_S)
            if not writable:
                raise TimeoutError("the core does not read its replies") from None


class _Connection:
    """A connected core: its socket and what it sent that is not a whole line yet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        sock.setblocking(False)


class _Server:
    """The launcher process's state: its jobs, their KILL deadlines, and the connected cores."""

    def __init__(self, listener: socket.socket, executor: ProcessExecutor) -> None:
        self._listener = listener
        self._executor = executor
        #: held while spawning, reaping or signalling: a group is signalled only while its leader is
        #: our unreaped child, and a new child is registered before the reaper can look at it
        self._lock = threading.Lock()
        self._children = threading.Condition(self._lock)
        self._running: dict[str, ProcessHandle] = {}  # control dir -> job
        self._by_pid: dict[int, str] = {}
        self._kill_at: dict[str, float] = {}
        #: connected cores, oldest first; and which one hears of each job's end (the one that launched
        #: or last asked about it)
        self._conns: list[_Connection] = []
        self._owner: dict[str, _Connection] = {}
        self._send_lock = threading.Lock()

    # -- serving

    def serve(self) -> None:
        """Serve cores until none is connected, no job runs and none came for :data:`IDLE_GRACE_S`.

        Several cores may be connected (two cores sharing a work root; a restarted core while the
        dead one's connection is still being read). Whatever is readable is served oldest connection
        first, each drained of what it sent: a dead core's last requests, already in its socket when
        its successor connects, are done before the successor's questions.
        """
        threading.Thread(target=self._reap_forever, name="launcher-reaper", daemon=True).start()
        self._listener.setblocking(False)
        idle_since: float | None = None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while True:
                with self._lock:
                    idle = not self._running and not self._conns
                if not idle:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= IDLE_GRACE_S:
                    return
                timeout = self._next_timeout(IDLE_GRACE_S if idle else 1.0)
                ready = {key.fileobj for key, _ in sel.select(timeout)}
                for conn in list(self._conns):
                    if conn.sock in ready:
                        self._read(conn, sel)
                if self._listener in ready:
                    self._accept(sel)
                self._escalate_due()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn = _Connection(sock)
            with self._send_lock:
                self._conns.append(conn)
            sel.register(sock, selectors.EVENT_READ)

    def _read(self, conn: _Connection, sel: selectors.BaseSelector) -> None:
        """Serve everything ``conn`` has sent; close it at its end."""
        while True:
            try:
                data = conn.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn, sel)
                return
            conn.buffer += data
            *lines, conn.buffer = conn.buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    self._handle_safely(conn, line)

    def _close(self, conn: _Connection, sel: selectors.BaseSelector) -> None:
        sel.unregister(conn.sock)
        with self._send_lock:
            self._conns.remove(conn)
            conn.sock.close()
        with self._lock:
            for cdir in [c for c, owner in self._owner.items() if owner is conn]:
                del self._owner[cdir]  # its end is in the launch record for whoever asks

    def _send(self, conn: _Connection | None, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        with self._send_lock:
            if conn is None or conn not in self._conns:
                return  # that core is gone: the launch record tells whoever asks
            with contextlib.suppress(OSError):  # gone: its connection's end is seen by the next read
                _send_whole(conn.sock, data)

    # -- requests

    def _handle_safely(self, conn: _Connection, line: bytes) -> None:
        """Serve one request; a request that fails is answered (a launch: refused) and logged, and the
        launcher goes on serving: it is the parent of every running job."""
        message: dict[str, Any] = {}
        try:
            message = json.loads(line)
            self._handle(conn, message)
        except Exception as exc:
            log.exception("request failed: %.200r", line)
            request = message.get("request") if message.get("op") == "launch" else None
            if isinstance(request, dict) and "control_dir" in request:
                cdir = os.path.abspath(str(request["control_dir"]))
                self._send(conn, {"op": "refused", "cdir": cdir, "error": f"the launcher failed: {exc}"})

    def _handle(self, conn: _Connection, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "hello":  # served: whatever older connections had sent is done
            self._send(conn, {"op": "hello", "cdir": ""})
        elif op == "launch":
            self._send(conn, self._launch(conn, message["request"]))
        elif op == "query":
            cdir = str(message["cdir"])
            with self._lock:
                handle = self._running.get(cdir)
                if handle is not None:
                    self._owner[cdir] = conn  # the asking core watches it from now on
            if handle is None:
                self._send(conn, {"op": "not_running", "cdir": cdir})
            else:
                self._send(
                    conn,
                    {"op": "running", "cdir": cdir, "pid": handle.pid, "start_ticks": handle.start_ticks},
                )
        elif op == "terminate":
            self._terminate(str(message["cdir"]), float(message["grace_s"]))

    def _launch(self, conn: _Connection, wire: dict[str, Any]) -> dict[str, Any]:
        req = _request_from_wire(wire)
        cdir = os.path.abspath(req.control_dir)
        try:
            record = _claim(cdir)
        except FileExistsError:
            return {
                "op": "refused",
                "cdir": cdir,
                "error": f"{record_path(cdir)} already holds a launch: query it, or launch a new attempt",
            }
        except OSError as exc:
            return {"op": "refused", "cdir": cdir, "error": f"cannot record the launch: {exc}"}
        try:
            with self._lock:
                try:
                    handle = self._executor.spawn(req)
                except LaunchError as exc:
                    os.unlink(record_path(cdir))  # nothing ran: the same attempt may be launched again
                    return self._not_started(req, cdir, exc)
                os.write(record, _started_line(handle))  # before the reaper can append the status
                self._running[cdir] = handle
                self._owner[cdir] = conn  # before the reaper can see it end
                self._by_pid[handle.pid] = cdir
                self._children.notify()
        finally:
            os.close(record)
        return {"op": "launched", "cdir": cdir, "pid": handle.pid, "start_ticks": handle.start_ticks}

    def _not_started(self, req: LaunchRequest, cdir: str, exc: LaunchError) -> dict[str, Any]:
        cause = exc.__cause__
        program = (req.argv or [""])[0]
        if isinstance(cause, OSError) and cause.filename == program and req.argv:
            # the exec itself failed: say it as a shell would, on the job's stderr
            status = 127 if isinstance(cause, FileNotFoundError) else 126
            self._tell_job(req, f"skyport: {program}: {cause.strerror}\n")
            return {"op": "not_run", "cdir": cdir, "status": status, "error": cause.strerror}
        return {"op": "refused", "cdir": cdir, "error": str(exc)}

    @staticmethod
    def _tell_job(req: LaunchRequest, text: str) -> None:
        with contextlib.suppress(OSError):
            path = os.path.join(os.path.abspath(req.workdir), req.stderr_path)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)

    def _terminate(self, cdir: str, grace_s: float) -> None:
        with self._lock:
            handle = self._running.get(cdir)
            if handle is None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle.pgid, signal.SIGTERM)
            when = time.monotonic() + max(0.0, grace_s)
            self._kill_at[cdir] = min(when, self._kill_at.get(cdir, when))

    def _next_timeout(self, default: float | None) -> float | None:
        with self._lock:
            if not self._kill_at:
                return default
            return max(0.0, min(self._kill_at.values()) - time.monotonic())

    def _escalate_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            for cdir, when in list(self._kill_at.items()):
                if when > now:
                    continue
                del self._kill_at[cdir]
                handle = self._running.get(cdir)
                if handle is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(handle.pgid, signal.SIGKILL)

    # -- reaping

    def _reap_forever(self) -> None:
        while True:
            try:
                self._reap_one()
            except Exception:  # the reaper must outlive any one job's trouble
                log.exception("reaping failed")

    def _reap_one(self) -> None:
        """Wait for a job to end, KILL what it left in its group, reap it, record and report its status."""
        with self._children:
            self._children.wait_for(lambda: bool(self._running))
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        with self._lock:
            cdir = self._by_pid.pop(info.si_pid, None)
            if cdir is None:
                return  # a child that failed its exec: subprocess reaped it already
            handle = self._running.pop(cdir)
            self._kill_at.pop(cdir, None)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.pgid, signal.SIGKILL)  # what the job left behind, as a batch system
            returncode = self._executor.forget_child(handle.pid, os.waitid(os.P_PID, handle.pid, os.WEXITED))
            assert returncode is not None  # a blocking wait always has a result
            status = _shell_status(returncode)
            try:  # the record first: a core that asks after this finds the status there
                _record_status(handle, status)
            except OSError as exc:  # the core still hears it below
                log.warning("cannot record the status of %s: %s", cdir, exc)
            owner = self._owner.pop(cdir, None)
        self._send(owner, {"op": "exit", "cdir": cdir, "status": status})


def record_path(control_dir: str) -> str:
    """The job's launch record, next to its control directory (which only some jobs need)."""
    return f"{control_dir}{RECORD_SUFFIX}"


def _claim(control_dir: str) -> int:
    """Create the job's launch record exclusively (the claim) and return it open for writing."""
    path = record_path(control_dir)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), 0o711, exist_ok=True)
        return os.open(path, flags, 0o644)


def _started_line(handle: ProcessHandle) -> bytes:
    return f"{handle.pid} {handle.start_ticks}\n".encode()


def _record_status(handle: ProcessHandle, status: int) -> None:
    """Append the status line after the started line, with one ``pwrite(2)``: a reader sees the line
    whole or not at all (it is accepted only with its newline)."""
    fd = os.open(record_path(handle.control_dir), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, f"{status}\n".encode(), len(_started_line(handle)))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LaunchRecord:
    """What a job's launch record says: claimed (no process yet), started, ended (and how)."""

    process: ProcessHandle | None
    status: int | None


def read_record(control_dir: str) -> LaunchRecord | None:
    """The launch record of ``control_dir``; None if the job was never claimed.

    The record is empty when claimed, ``"PID START_TICKS\\n"`` once started, and that plus
    ``"STATUS\\n"`` once ended; a line without its newline is being written and does not count yet.
    """
    try:
        with open(record_path(control_dir), "rb") as f:
            data = f.read(128)
    except FileNotFoundError:
        return None
    lines = data.split(b"\n")[:-1]  # whole lines only
    try:
        process = None
        if lines:
            pid, ticks = lines[0].split()
            process = ProcessHandle(
                pid=int(pid), pgid=int(pid), start_ticks=int(ticks), control_dir=control_dir
            )
        status = int(lines[1]) if len(lines) > 1 else None
    except ValueError:
        return LaunchRecord(process=None, status=None)
    return LaunchRecord(process=process, status=status)


#: Longest path a Unix socket address holds (``sun_path`` is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107


@contextlib.contextmanager
def _socket_address(workroot: Path) -> Iterator[str]:
    """Where the socket is bound and reached: its path, or, for a work root too deep for a socket
    address, the same file through a descriptor of the work root (``/proc/self/fd/N/launcher.sock``)."""
    path = str(workroot / SOCKET_NAME)
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield path
        return
    fd = os.open(workroot, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


def serve(workroot: Path, *, allow_root: bool) -> int:
    """Run the launcher of ``workroot`` in this process until it is idle. Returns the exit code."""
    lock_fd = os.open(workroot / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return EXIT_BUSY  # another launcher serves this work root
    path = workroot / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with _socket_address(workroot) as address:
            listener.bind(address)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the core stops reading our stdout once we are ready
    os.close(devnull)
    executor = ProcessExecutor(allow_root=allow_root, wrapper=False)
    _Server(listener, executor).serve()
    # unlink the socket while still holding the lock, so a new launcher never loses its own socket
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return 0


# ------------------------------------------------------------------------------------ the core's side


_Reply = dict[str, Any]


class Launcher:
    """The core's connection to the launcher of its work root; starts the launcher when none runs.

    All methods belong to one event loop. ``on_exit`` callbacks run on it.
    """

    def __init__(self, workroot: Path, *, allow_root: bool) -> None:
        self._workroot = workroot
        self._allow_root = allow_root
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._pending: dict[tuple[str, str], asyncio.Future[_Reply]] = {}
        self._watches: dict[str, Callable[[int | None], None]] = {}
        self._exited: dict[str, int] = {}  # exits that came before their watch
        self._closed = False

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._closed:
            raise LauncherGone("the launcher connection is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                self._reader, self._writer = await self._connect()
                self._pump = asyncio.get_running_loop().create_task(self._read_replies(self._reader))
        assert self._writer is not None
        return self._writer

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the launcher, starting one if none listens. A connection counts once the launcher
        has answered its hello: one that was leaving (idle) closes it unanswered, and we start another."""
        path = str(self._workroot / SOCKET_NAME)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with _socket_address(self._workroot) as address:
                    reader, writer = await asyncio.open_unix_connection(address, limit=1 << 20)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            else:
                writer.write(b'{"op": "hello"}\n')
                with contextlib.suppress(OSError, TimeoutError):
                    if await asyncio.wait_for(reader.readline(), START_TIMEOUT_S):
                        return reader, writer
                writer.close()
            if time.monotonic() > deadline:
                raise LauncherGone(f"no launcher answers on {path}: see {self._workroot / LOG_NAME}")
            await self._start_launcher()

    async def _start_launcher(self) -> None:
        """Start a launcher in a session of its own and wait until it listens (or finds another)."""
        log_fd = os.open(
            self._workroot / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "skyport.gates.launcher",
                str(self._workroot),
                *(["--allow-root"] if self._allow_root else []),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if line != b"ready\n":
            code = await proc.wait()
            if code != EXIT_BUSY:
                raise LauncherGone(
                    f"the launcher did not start (exit {code}): see {self._workroot / LOG_NAME}"
                )
        # the launcher outlives us; asyncio's child watcher reaps it if it ends while we run

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                op, cdir = message["op"], message["cdir"]
                if op == "exit":
                    self._exit(cdir, int(message["status"]))
                    continue
                kind = "launch" if op in ("launched", "refused", "not_run") else "query"
                future = self._pending.pop((kind, cdir), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("the launcher connection failed: %s", exc)
        finally:
            self._lost_connection()

    def _exit(self, cdir: str, status: int | None) -> None:
        callback = self._watches.pop(cdir, None)
        if callback is None:
            if status is not None:
                self._exited[cdir] = status
            return
        callback(status)

    def _lost_connection(self) -> None:
        """The launcher is gone: nobody will report these jobs' ends any more."""
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LauncherGone("the launcher went away"))
        self._pending.clear()
        for cdir in list(self._watches):
            self._exit(cdir, None)

    async def _ask(self, kind: str, cdir: str, message: dict[str, Any]) -> _Reply:
        writer = await self._connection()
        key = (kind, cdir)
        if key in self._pending:
            raise LaunchError(f"a {kind} for {cdir} is already in progress")
        future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        writer.write(json.dumps(message).encode() + b"\n")
        return await future

    # -- public

    async def launch(self, req: LaunchRequest) -> ProcessHandle | int:
        """Start the job; its handle, or the shell status (126, 127) of a program that could not run.

        Raises :class:`LaunchError` when nothing could be started, :class:`LauncherGone` when the
        launcher died before answering (the job may have started: :meth:`query` tells).
        """
        cdir = str(req.control_dir)  # absolute: the gate's work root is
        reply = await self._ask("launch", cdir, {"op": "launch", "request": _request_to_wire(req)})
        if reply["op"] == "refused":
            raise LaunchError(str(reply["error"]))
        if reply["op"] == "not_run":
            return int(reply["status"])
        pid = int(reply["pid"])
        return ProcessHandle(pid=pid, pgid=pid, start_ticks=int(reply["start_ticks"]), control_dir=cdir)

    async def query(self, control_dir: Path) -> ProcessHandle | None:
        """The job of ``control_dir`` if the launcher runs it (after a restart of the core)."""
        cdir = str(control_dir)
        reply = await self._ask("query", cdir, {"op": "query", "cdir": cdir})
        if reply["op"] != "running":
            return None
        pid = int(reply["pid"])
        return ProcessHandle(pid=pid, pgid=pid, start_ticks=int(reply["start_ticks"]), control_dir=cdir)

    def watch(self, handle: ProcessHandle, on_exit: Callable[[int | None], None]) -> None:
        """Call ``on_exit(status)`` once when the job ends: its shell status, or None if the launcher
        died first (then only the launch record can tell)."""
        cdir = handle.control_dir
        if cdir in self._exited:
            status = self._exited.pop(cdir)
            asyncio.get_running_loop().call_soon(on_exit, status)
            return
        if self._writer is None:
            asyncio.get_running_loop().call_soon(on_exit, None)
            return
        self._watches[cdir] = on_exit

    async def terminate(self, handle: ProcessHandle, grace_s: float) -> None:
        """TERM the job's group now and KILL it after ``grace_s`` unless it ended (done by the launcher,
        so the KILL comes even if the core crashes meanwhile)."""
        writer = await self._connection()
        message = {"op": "terminate", "cdir": handle.control_dir, "grace_s": grace_s}
        writer.write(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        """Disconnect; the launcher and the jobs keep running (a new core connects again)."""
        self._closed = True
        self._watches.clear()
        if self._pump is not None:
            self._pump.cancel()
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = None


def _main(argv: list[str]) -> int:
    """``python -m skyport.gates.launcher WORKROOT [--allow-root]``, started by the core."""
    os.umask(0o022)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s launcher %(levelname)s %(message)s")
    return serve(Path(argv[0]), allow_root="--allow-root" in argv[1:])


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
