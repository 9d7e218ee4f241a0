"""``SkyPortSpawner``: JupyterHub starts each user's server as a Sky Port job, anywhere the core reaches.

How it fits together (README, "JupyterHub"):

* Identity: every hub user acts as their own Sky Port user, with a client certificate bundle
  (``cert.pem``, ``key.pem``, ``ca.pem``) in ``identity_dir`` (``{username}`` is the hub user's name).
  The admin makes one per user on the core's host with ``skyport user add <name>``, which writes exactly
  such a bundle under ``$SKYPORT_HOME/users/<name>/``. There is no shared identity: a user sees the
  remotes, flavors and images their own identity may use, and their jobs are theirs on the core.
* The form is built live from the core (remotes, flavors with prices and GPUs, cloud images) as that
  user, with a filter by name and GPUs; notebooks can be uploaded with it.
* ``start`` submits ``jupyterhub-singleuser`` as a job (form.py, job.py) whose server listens on the
  node's loopback (an ``in`` port) and reaches the hub's API at ``localhost:<hub port>`` on its node (an
  ``out`` port, carried back by the core). The hub's progress page shows the job's events as they happen.
  Once the job runs, the spawner listens on ``127.0.0.1:<free port>`` of the hub's host and carries
  every connection to the job's port over the core's authenticated port forwarding (mutual TLS,
  as the user; client/ports.py): the hub and its proxy talk to that local port. Nothing listens
  unencrypted anywhere but on loopback.
* ``stop`` cancels the job; the core copies the notebooks back (output files) and releases the
  machine (an elastic partition goes when idle); the spawner downloads them into ``notebooks_dir``.
* ``get_state``/``load_state`` keep the job id and the local port, so a restarted hub finds running
  servers again (``poll`` reopens the forward on the same port, which the hub's proxy still targets).

Everything is async: the core is reached with :class:`~skyport.client.AsyncClient`, files are read and
written in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
from jupyterhub.spawner import Spawner
from tornado import web
from traitlets import Float, Integer, List, Unicode, default

from skyport.client import ApiError, AsyncClient, ClientConfig, ClientError, ConnectionFailed
from skyport.client.api import ssl_context
from skyport.client.ports import forward
from skyport.jupyter import form as forms
from skyport.jupyter.job import job_spec, progress_event
from skyport.models import Job, JobState

#: Ports the single-user server may get on its node when ``port`` is 0 (each start draws one: two
#: servers on one shared node, e.g. the core's own machine, rarely meet).
SERVER_PORTS = (20000, 39999)
_SAFE_NAME = re.compile(r"^[^/\x00]+$")


class SkyPortSpawner(Spawner):  # type: ignore[misc]  # JupyterHub has no type hints
    """Spawn single-user servers as Sky Port jobs. Settings are JupyterHub traits (README)."""

    core_url = Unicode(
        "https://localhost:8443", config=True, help="The Sky Port core's URL, as the hub reaches it."
    )
    identity_dir = Unicode(
        "/etc/skyport/jupyterhub/{username}",
        config=True,
        help="""Each hub user's Sky Port identity: a directory with cert.pem, key.pem and ca.pem
        ({username} is the hub user's name). `skyport user add NAME` on the core's host writes one
        under $SKYPORT_HOME/users/NAME/.""",
    )
    ca_file = Unicode("", config=True, help="The core's CA bundle; empty: ca.pem in the user's identity.")
    notebooks_dir = Unicode(
        "skyport-notebooks/{username}",
        config=True,
        help="Where the notebooks of a stopped server are saved on the hub's host ({username}).",
    )
    upload_dir = Unicode(
        "", config=True, help="Where uploaded notebooks wait until the job is submitted; empty: a temp dir."
    )
    max_upload_mb = Integer(64, config=True, help="Largest total size of the notebooks of one start.")
    output_patterns = List(
        Unicode(),
        default_value=["*.ipynb"],
        config=True,
        help="Files (globs in the server's directory) brought back when the server stops.",
    )
    account = Unicode("", config=True, help="Sky Port account to charge; empty: the user's default.")
    submission_address = Unicode(
        "",
        config=True,
        help="""Where the job's out port (the hub API) leads, as the core reaches the hub; empty: the
        core's own host, right when the hub's API listens on the core's loopback.""",
    )
    walltime = Integer(0, config=True, help="Longest a server may run (seconds); 0: the remote's default.")
    singleuser_port = Integer(
        0, config=True, help="The server's port on its node; 0: one drawn per start (SERVER_PORTS)."
    )
    currency = Unicode("", config=True, help="Shown beside flavor prices in the form.")
    event_interval = Float(1.0, config=True, help="Seconds between looks at the job while it starts.")
    stop_wait = Float(
        300.0, config=True, help="Seconds stop waits for the job to end and its notebooks to come back."
    )

    @default("apply_user_options")
    def _apply_user_options_default(self) -> Any:
        return SkyPortSpawner._check_user_options

    def _check_user_options(self, options: dict[str, Any]) -> None:
        """Options may also come from the hub's REST API, unchecked: only the known keys with the right
        types, and only notebooks this spawner saved from the form (never other files of the hub's host)."""
        unknown = set(options) - {"machine", "remote", "flavor", "gpus", "image", "notebooks"}
        if unknown:
            raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
        for key in ("machine", "remote", "flavor", "image"):
            if not isinstance(options.get(key, ""), str):
                raise ValueError(f"option {key!r} must be a string")
        if not isinstance(options.get("gpus", 0), int) or options.get("gpus", 0) < 0:
            raise ValueError("option 'gpus' must be a whole number")
        foreign = [n for n in options.get("notebooks", []) if n not in self._uploaded]
        if foreign:
            raise ValueError("notebooks can only be uploaded with the form")

    @default("start_timeout")
    def _start_timeout_default(self) -> int:
        return 900  # a cloud machine boots first

    @default("http_timeout")
    def _http_timeout_default(self) -> int:
        return 180

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job_id = ""
        self.forward_port = 0
        self.server_port = 0
        self._forward: asyncio.Server | None = None
        self._starting = False
        self._progress: list[dict[str, Any]] = []
        self._progress_done = True
        self._progress_changed: asyncio.Event | None = None
        #: Notebooks saved from this spawner's form, the only files a start may send.
        self._uploaded: set[str] = set()

    # -- identity -------------------------------------------------------------------------------------

    def _username(self) -> str:
        name = str(self.user.name)
        if not _SAFE_NAME.match(name) or name in (".", ".."):
            raise web.HTTPError(403, f"hub user name {name!r} cannot name a Sky Port identity")
        return name

    def _identity(self) -> ClientConfig:
        """This hub user's own Sky Port identity (never another's); blocking (reads the disk)."""
        directory = Path(self.identity_dir.format(username=self._username())).expanduser()
        config = ClientConfig(
            url=self.core_url.rstrip("/"),
            cert=directory / "cert.pem",
            key=directory / "key.pem",
            ca=Path(self.ca_file).expanduser() if self.ca_file else directory / "ca.pem",
        )
        missing = [p for p in (config.cert, config.key, config.ca) if not p.exists()]
        if missing:
            self.log.warning("no Sky Port identity for %s: %s missing", self.user.name, missing)
            raise web.HTTPError(
                403,
                f"You have no Sky Port identity on this hub yet ({missing[0].name} is missing): "
                "ask your administrator to provision one.",
            )
        return config

    async def client_config(self) -> ClientConfig:
        return await asyncio.to_thread(self._identity)

    async def _client(self, config: ClientConfig | None = None) -> AsyncClient:
        config = config or await self.client_config()
        return await asyncio.to_thread(AsyncClient, config)  # reads the key and certificates

    # -- the form ----------------------------------------------------------------------------------------

    async def _catalog(self) -> tuple[list[forms.Machine], dict[str, list[str]]]:
        async with await self._client() as client:
            try:
                remotes, flavors, images, nodes = await asyncio.gather(
                    client.remotes(), client.flavors(), client.images(), client.nodes()
                )
            except ClientError as exc:
                raise web.HTTPError(502, f"Sky Port did not answer: {exc}") from exc
        return forms.machines(remotes, flavors, nodes), forms.images_by_remote(remotes, images)

    async def get_options_form(self) -> str:
        """The form, fetched fresh from the core each time (prices and catalogs change)."""
        choices, images = await self._catalog()
        return forms.render_form(choices, images, currency=self.currency)

    async def run_options_from_form(self, form_data: dict[str, list[Any]]) -> dict[str, Any]:
        """Check the choice against what the core offers now; keep uploads until the job takes them."""
        choices, images = await self._catalog()
        try:
            options, uploads = forms.parse_form(
                form_data, choices, images, max_bytes=self.max_upload_mb * 1024 * 1024
            )
        except forms.FormError as exc:
            raise web.HTTPError(400, str(exc)) from exc
        if uploads:
            options["notebooks"] = await asyncio.to_thread(self._save_uploads, uploads)
            self._uploaded.update(options["notebooks"])
        return options

    def _save_uploads(self, uploads: list[forms.Upload]) -> list[str]:
        parent = Path(self.upload_dir).expanduser() if self.upload_dir else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        spool = Path(tempfile.mkdtemp(prefix="skyport-jupyter-", dir=parent))
        paths = []
        for upload in uploads:
            path = spool / upload.name
            path.write_bytes(upload.body)
            paths.append(str(path))
        return paths

    # -- progress ----------------------------------------------------------------------------------------

    def _emit(self, message: dict[str, Any]) -> None:
        self._progress.append(message)
        if self._progress_changed is not None:
            self._progress_changed.set()

    async def progress(self) -> Any:
        """The job's events as they happen, for the hub's progress page (until the server is up)."""
        if self._progress_changed is None:
            self._progress_changed = asyncio.Event()
        index = 0
        while True:
            while index < len(self._progress):
                yield self._progress[index]
                index += 1
            if self._progress_done:
                return
            self._progress_changed.clear()
            if index == len(self._progress) and not self._progress_done:
                await self._progress_changed.wait()

    # -- start -------------------------------------------------------------------------------------------

    async def start(self) -> str:
        self._starting = True
        self._progress = []
        self._progress_done = False
        if self._progress_changed is None:
            self._progress_changed = asyncio.Event()
        try:
            return await self._start()
        finally:
            self._starting = False
            self._progress_done = True
            self._progress_changed.set()

    async def _start(self) -> str:
        config = await self.client_config()
        options = dict(self.user_options or {})
        notebooks = [Path(p) for p in options.get("notebooks", []) if p in self._uploaded]
        self.server_port = self.singleuser_port or random.randint(*SERVER_PORTS)
        self.port = self.server_port
        self.ip = "127.0.0.1"  # the server listens on its node's loopback only
        spec = job_spec(
            user=str(self.user.name),
            env=self.get_env(),
            cmd=list(self.cmd),
            args=list(self.get_args()),
            options=options,
            server_port=self.server_port,
            notebooks=[p.name for p in notebooks],
            output_patterns=list(self.output_patterns),
            account=self.account or None,
            submission_address=self.submission_address or None,
            walltime=self.walltime or None,
        )
        where = options.get("flavor") or options.get("remote") or "a node Sky Port chooses"
        self._emit({"progress": 2, "message": f"Submitting the server to Sky Port ({where})"})
        async with await self._client(config) as client:
            try:
                job = await client.submit(spec, inputs=notebooks)
            except ApiError as exc:
                raise web.HTTPError(400, f"Sky Port refused the server: {exc}") from exc
            finally:
                if notebooks:
                    await asyncio.to_thread(shutil.rmtree, notebooks[0].parent, True)
                    self._uploaded.difference_update(str(p) for p in notebooks)
            self.job_id = job.id
            self.log.info("%s: server submitted as Sky Port job %s", self.user.name, job.id)
            self._emit({"progress": 5, "message": f"Submitted as Sky Port job {job.id}"})
            await self._wait_running(client, job.id)
        self._emit({"progress": 90, "message": "Connecting through Sky Port's port forwarding"})
        await self._open_forward(config)
        return f"http://127.0.0.1:{self.forward_port}"

    async def _wait_running(self, client: AsyncClient, job_id: str) -> Job:
        seen = 0
        while True:
            events = await client.events(job_id)
            for event in events:
                if event.id > seen:
                    seen = event.id
                    self._emit(progress_event(event))
            job = await client.job(job_id)
            if job.state is JobState.RUNNING:
                return job
            if job.state.terminal:
                raise web.HTTPError(
                    500, f"The server's job ended before it started ({job.state.value}): {job.state_details}"
                )
            await asyncio.sleep(self.event_interval)

    async def _open_forward(self, config: ClientConfig, port: int = 0) -> None:
        def refused(reason: str) -> None:
            self.log.info("%s: a connection to the server was refused: %s", self.user.name, reason)

        self._forward = await forward(
            config, self.job_id, self.server_port, local_port=port, host="127.0.0.1", on_error=refused
        )
        self.forward_port = int(self._forward.sockets[0].getsockname()[1])

    async def _close_forward(self) -> None:
        server, self._forward = self._forward, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    # -- poll and stop -----------------------------------------------------------------------------------

    async def poll(self) -> int | None:
        if self._starting:
            return None
        if not self.job_id:
            return 0
        try:
            async with await self._client() as client:
                job = await client.job(self.job_id)
                if not job.state.terminal:
                    if job.state is JobState.RUNNING and self._forward is None and self.forward_port:
                        await self._open_forward(client.config, self.forward_port)  # after a hub restart
                    return None
                await self._bring_back(client.config, job)
        except ApiError as exc:
            if exc.status == 404:
                self.log.warning("%s: Sky Port no longer knows job %s", self.user.name, self.job_id)
                await self._close_forward()
                return 0
            raise
        except (ConnectionFailed, web.HTTPError, OSError) as exc:
            self.log.warning(
                "%s: cannot ask Sky Port about the server (assumed running): %s", self.user.name, exc
            )
            return None
        await self._close_forward()
        return job.exit_code if job.exit_code is not None else 0

    async def stop(self, now: bool = False) -> None:
        """Cancel the job, wait for its end (the core copies the notebooks back first), fetch them."""
        if not self.job_id:
            await self._close_forward()
            return
        async with await self._client() as client:
            try:
                job = await client.job(self.job_id)
                if not job.state.terminal:
                    job = await client.cancel(self.job_id)
                deadline = asyncio.get_running_loop().time() + self.stop_wait
                while not job.state.terminal and asyncio.get_running_loop().time() < deadline:
                    job = await client.wait(self.job_id, timeout=min(30.0, self.stop_wait))
                if job.state.terminal:
                    await self._bring_back(client.config, job)
                else:
                    self.log.warning("%s: job %s has not ended yet", self.user.name, self.job_id)
            except ApiError as exc:
                if exc.status != 404:
                    raise
        await self._close_forward()

    def notebooks_path(self) -> Path:
        """Where this user's notebooks come back to on the hub's host."""
        return Path(self.notebooks_dir.format(username=self._username())).expanduser().absolute()

    async def _bring_back(self, config: ClientConfig, job: Job) -> None:
        """Download the job's output files (the notebooks) into the user's ``notebooks_dir``."""
        target = await asyncio.to_thread(self.notebooks_path)
        async with await self._client(config) as client:
            files = await client.outputs(job.id)
        if not files:
            return
        http = await asyncio.to_thread(
            lambda: httpx.AsyncClient(base_url=config.url, verify=ssl_context(config), timeout=60.0)
        )
        async with http:
            for entry in files:
                name = str(entry["name"])
                if name.startswith("/") or ".." in name.split("/"):
                    continue
                path = target / name
                await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
                part = path.with_name(f".{path.name}.part")
                async with http.stream("GET", f"/api/v1/jobs/{job.id}/outputs/{name}") as response:
                    response.raise_for_status()
                    with await asyncio.to_thread(open, part, "wb") as out:
                        async for chunk in response.aiter_bytes():
                            await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(part.replace, path)
        self.log.info(
            "%s: %d notebook file(s) of job %s saved in %s", self.user.name, len(files), job.id, target
        )

    # -- state ------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.job_id:
            state.update(job_id=self.job_id, forward_port=self.forward_port, server_port=self.server_port)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.job_id = str(state.get("job_id", ""))
        self.forward_port = int(state.get("forward_port", 0))
        self.server_port = int(state.get("server_port", 0))

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = ""
        self.forward_port = 0
        self.server_port = 0
