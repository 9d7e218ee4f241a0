"""Settings of the core: defaults, then ``$SKYPORT_HOME/skyport.toml``, then ``SKYPORT_*`` variables.

One object, built once at start-up and passed to whatever needs it (no module-level globals).
Nested values come from the environment with a double underscore, e.g. ``SKYPORT_LOCAL__CPUS=64``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SETTINGS_FILE = "skyport.toml"


def default_home() -> Path:
    return Path(os.environ.get("SKYPORT_HOME") or Path.home() / ".skyport").expanduser()


class LocalGateSettings(BaseModel):
    """The ``local`` remote: this machine."""

    enabled: bool = True
    #: Declared capacity; None means what the machine really has. Declaring more CPUs than exist lets
    #: many light jobs share a core (like Slurm's ``CPUs=`` on a node line).
    cpus: int | None = Field(default=None, ge=1)
    mem: int | None = Field(default=None, ge=1)
    gpus: int = Field(default=0, ge=0)
    #: Sky Port user name -> Unix account, when the core runs as root.
    user_map: dict[str, str] = Field(default_factory=dict)
    #: Unix account for users with no mapping and no account of their own name (root core only).
    default_user: str | None = None
    #: A root core never runs a job as root unless this is set.
    allow_root: bool = False
    #: Where per-job working directories are made; must be traversable by the accounts jobs run as.
    #: None: ``<home>/work``.
    workroot: Path | None = None
    #: Seconds between SIGTERM and SIGKILL when a job is canceled or overruns its walltime.
    cancel_grace_s: float = Field(default=10.0, ge=0)
    #: Walltime given to jobs that ask for none (seconds); None: unlimited.
    default_walltime: int | None = Field(default=None, ge=1)
    max_walltime: int | None = Field(default=None, ge=1)
    #: How this remote provides the container images jobs name (a TES executor's ``image``): ``none``,
    #: it cannot (such a task ends in SYSTEM_ERROR at once); ``host``, the commands run in this
    #: machine's own environment instead, and the task's system logs say so.
    images: Literal["none", "host"] = "none"
    #: ``host`` images: directories put in front of PATH for those commands (e.g. a virtualenv's bin).
    host_path: list[str] = Field(default_factory=list)


class StagingSettings(BaseModel):
    """Moving job data from URLs before the start and to URLs after the end (``[staging]``)."""

    #: Directories on the core host that ``file://`` inputs may be read from and outputs written to, by
    #: every user. Empty: ``file://`` is refused (a core, maybe root, never reads arbitrary host files).
    file_roots: list[Path] = Field(default_factory=list)
    #: Buckets ``s3://`` URLs may name (``"*"``: any the core's AWS credentials reach). Credentials come
    #: from the usual AWS chain of the core (environment, ``~/.aws``, instance role), never from users.
    s3_buckets: list[str] = Field(default_factory=list)
    #: Another S3 endpoint (MinIO, Ceph, a test server); None: AWS.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    #: CA certificates trusted for ``https://`` besides the usual public ones (an internal CA).
    https_ca_file: Path | None = None
    #: Attempts per transfer on transient errors (connection errors, HTTP 5xx), with doubling waits.
    attempts: int = Field(default=4, ge=1)
    backoff_s: float = Field(default=1.0, ge=0)
    #: Seconds without a byte before a transfer counts as failed (then retried).
    timeout_s: float = Field(default=60.0, gt=0)
    #: Transfers running at once (each in its own thread, off the event loop).
    parallel: int = Field(default=4, ge=1)
    #: Seconds between progress updates in a job's ``state_details`` (each is an event).
    progress_interval_s: float = Field(default=2.0, gt=0)


class SchedulerSettings(BaseModel):
    """How queued jobs are ordered and placed (DESIGN §6)."""

    algorithm: Literal["fcfs", "backfill", "fairshare"] = "backfill"
    #: Remotes (by name) whose jobs are planned with another algorithm, e.g. ``{ lab = "fcfs" }``.
    remote_algorithms: dict[str, Literal["fcfs", "backfill", "fairshare"]] = Field(default_factory=dict)
    weight_priority: float = 1.0
    weight_fairshare: float = 1000.0
    weight_age: float = Field(default=1.0, description="per hour waited")
    max_age_hours: float = Field(default=168.0, gt=0)
    #: Walltime assumed for jobs that give none, when planning reservations (seconds).
    default_walltime: int = Field(default=3600, ge=1)
    #: Fair-share usage halves every this many seconds.
    usage_half_life_s: float = Field(default=7 * 86400.0, gt=0)


class RemoteSettingsBase(BaseModel):
    """What every configured remote has: a unique name and its walltime limits."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    #: Walltime given to jobs that ask for none (seconds); None: unlimited.
    default_walltime: int | None = Field(default=None, ge=1)
    max_walltime: int | None = Field(default=None, ge=1)


class AgentRemoteSettings(RemoteSettingsBase):
    """A static partition of nodes that run ``skyport agent`` and enrol with bootstrap tokens."""

    kind: Literal["agent"] = "agent"
    #: A node that has not been heard from for this long is marked down and its jobs failed.
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)


class SSHHost(BaseModel):
    model_config = {"extra": "forbid"}

    host: str
    port: int = Field(default=22, ge=1, le=65535)
    #: The node's name in Sky Port (default: ``host``).
    name: str | None = None
    #: Declared capacity (direct mode); None: asked from the host (``nproc``, ``/proc/meminfo``).
    cpus: int | None = Field(default=None, ge=1)
    mem: int | None = Field(default=None, ge=1)
    gpus: int = Field(default=0, ge=0)
    labels: dict[str, str] = Field(default_factory=dict)


class SSHRemoteSettings(RemoteSettingsBase):
    """Hosts reached over SSH: ``direct`` runs jobs with nothing installed there; ``agent`` installs and
    starts ``skyport agent`` on each host and drives it like any agent node."""

    kind: Literal["ssh"] = "ssh"
    mode: Literal["direct", "agent"] = "direct"
    hosts: list[SSHHost] = Field(min_length=1)
    #: SSH login on the hosts; ``user_map`` maps a Sky Port user to their own login.
    user: str
    user_map: dict[str, str] = Field(default_factory=dict)
    #: Private key for the login (stays on the core host; only its signature travels).
    key_file: Path
    #: Host keys are verified against this file, never accepted blindly.
    known_hosts: Path
    #: Where per-job working directories are made on the hosts (relative: to the login's home).
    workroot: str = ".skyport/work"
    #: The agent command on the host (agent mode): shell words, the first one found on the login's PATH.
    agent_command: str = "skyport agent"
    #: Agent mode: extra options of the agent (e.g. ``["--default-user", "nobody"]`` for a root login).
    agent_options: list[str] = Field(default_factory=list)
    #: Agent mode: the agent's state directory on the host (its key, certificate, pid file, log;
    #: relative: to the login's home; ``{node}`` is the node's name, for hosts that share a home).
    agent_state_dir: str = ".skyport/agent/{node}"
    #: Agent mode: if ``agent_command`` is not found on a host, ``pip install`` this requirement (e.g.
    #: ``skyport-wm==0.4`` or a wheel's URL) into a virtualenv in the state directory and run its agent.
    #: None: a missing command is an error that says so.
    agent_install: str | None = None
    #: Agent mode: a node not heard from for this long is marked down and its jobs failed.
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=15.0, gt=0)
    #: Direct mode: seconds between status passes (one command per host per pass; logs fetched then).
    poll_interval_s: float = Field(default=1.0, gt=0)


class SlurmUser(BaseModel):
    """One Sky Port user's own identity on a Slurm cluster (never shared with another user)."""

    model_config = {"extra": "forbid"}

    #: The cluster account (Unix login) the user's jobs run as.
    login: str
    #: ``ssh`` submission: this user's private key for the login node (default: ``key_dir/<login>``).
    key_file: Path | None = None
    #: ``rest`` submission: a file holding this user's JWT (default: minted with ``jwt_key_file``).
    token_file: Path | None = None


class SlurmRemoteSettings(RemoteSettingsBase):
    """A Slurm cluster that schedules Sky Port's jobs itself (gates/slurm.py).

    ``submit``: how jobs reach it: ``commands`` runs ``sbatch``/``squeue``/``scancel`` here (as the
    user's login, when the core is root) or, with ``host`` set, on that login node over SSH (nothing of
    ours installed there); ``rest`` talks to ``slurmrestd`` at ``rest_url`` with the user's JWT. Files
    (inputs, outputs, logs) move over SFTP to ``host`` when it is set, else the cluster's file system is
    this machine's (``workroot`` must be visible to the compute nodes, as on a login node).
    """

    kind: Literal["slurm"] = "slurm"
    submit: Literal["commands", "rest"] = "commands"
    #: Sky Port user -> their cluster identity. Users not listed use the login of their own name when
    #: ``same_name_logins`` is set; otherwise their jobs are refused (there is no shared account).
    users: dict[str, SlurmUser] = Field(default_factory=dict)
    same_name_logins: bool = True
    #: Login node for ``commands`` over SSH and for file transfer (host keys checked in known_hosts).
    host: SSHHost | None = None
    known_hosts: Path | None = None
    #: ``ssh``: where per-user keys are, as ``<key_dir>/<login>`` (unless a user names its key_file).
    key_dir: Path | None = None
    connect_timeout_s: float = Field(default=15.0, gt=0)
    #: ``rest``: slurmrestd's address, the OpenAPI version (``auto``: the newest it serves), and the
    #: cluster's JWT key (HS256) to mint short-lived per-user tokens (users may give token files instead).
    rest_url: str | None = None
    rest_version: str = "auto"
    jwt_key_file: Path | None = None
    jwt_lifespan_s: int = Field(default=3600, ge=60)
    #: ``commands`` run here: extra environment (e.g. ``SLURM_CONF``) and the directory of the commands.
    env: dict[str, str] = Field(default_factory=dict)
    bin_dir: str = ""
    #: Defaults for jobs that do not say (``#SWM label slurm.partition=...`` etc. override them).
    partition: str | None = None
    qos: str | None = None
    #: The Slurm account charged: per Sky Port account, else ``account``.
    account: str | None = None
    account_map: dict[str, str] = Field(default_factory=dict)
    #: Working directories on the cluster (relative: to the login's home; ``{login}`` is replaced).
    workroot: str = ".skyport/slurm"
    #: Seconds between status passes (one query for all tracked jobs per pass).
    poll_interval_s: float = Field(default=2.0, gt=0)
    #: Up to this many independent jobs of one user and shape are submitted as one Slurm job array.
    pack_limit: int = Field(default=1000, ge=1)
    #: Status format: ``auto`` (``--json`` where it honours ``--jobs``: 23.02+), ``json`` or ``text``.
    status_format: Literal["auto", "json", "text"] = "auto"


class CloudRemoteSettings(RemoteSettingsBase):
    """What every remote that creates partitions on demand has (the provisioning loop reads these).

    Each provider kind subclasses it with its own ``kind`` literal and provider settings.
    """

    kind: str

    #: Partitions being created at once on this remote (the provider's own limits permitting).
    max_creating: int = Field(default=100, ge=1)
    #: Nodes this remote may have at once, all partitions together.
    max_nodes: int = Field(default=1000, ge=1)
    #: An idle partition (its job ended) is kept this long for another job of the same account, flavor
    #: and image, then deleted.
    idle_timeout_s: float = Field(default=300.0, ge=0)
    #: Deadlines of the steps: the provider creating the machines, the agents enrolling, deletion.
    create_timeout_s: float = Field(default=900.0, gt=0)
    boot_timeout_s: float = Field(default=900.0, gt=0)
    delete_timeout_s: float = Field(default=900.0, gt=0)
    #: Attempts per provider call on transient errors, with doubling waits from ``backoff_s``.
    attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=1.0, ge=0)
    heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    #: How often a partition in use is checked with its provider (spot capacity can be taken back).
    check_interval_s: float = Field(default=30.0, gt=0)
    default_image: str | None = None
    #: The currency of the catalog's prices (shown with costs).
    currency: str = "USD"


class SimRemoteSettings(CloudRemoteSettings):
    """The ``sim`` cloud: VMs are real ``skyport agent`` processes on this machine (tests, demos)."""

    kind: Literal["sim"] = "sim"
    #: Provider-specific settings (catalog, boot latency, failure rates, quotas): see gates/sim.py.
    sim: dict[str, Any] = Field(default_factory=dict)


class HTTPRemoteSettings(CloudRemoteSettings):
    """An out-of-process gate speaking the gate protocol (reference/gate-protocol.md)."""

    kind: Literal["http"] = "http"
    url: str
    #: The provider kind in the gate's paths (``/<provider>/flavors``), e.g. ``azure``, ``openstack``.
    provider: str
    location: str = ""
    #: TLS: the gate's CA; our client certificate for it (mTLS), from files on the core host.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    #: What a partition the gate reports without a status is. The original ``swmcloudgate`` in its
    #: mocked mode reports none for the partitions it creates: ``ready`` lets a core use it.
    missing_status: Literal["creating", "ready"] = "creating"


class ProviderRemoteSettings(CloudRemoteSettings):
    """What the public-cloud kinds share (gates/aws.py, openstack.py, azure.py): prices, exposure, bootstrap.

    Never a credential here: each kind reads its ecosystem's standard places (AWS profiles and
    environment, ``clouds.yaml``, Azure identity), on the core's host only.
    """

    #: Operator price table: flavor id -> price per node-hour; it overrides the provider's price API.
    prices: dict[str, float] = Field(default_factory=dict)
    #: Price of a flavor that neither the price API nor ``prices`` prices; None: such flavors are not
    #: offered (a price of 0 would make the scheduler prefer them).
    default_price: float | None = Field(default=None, ge=0)
    #: Only these flavors are offered (ids); empty: every flavor with a price.
    flavors: list[str] = Field(default_factory=list)
    #: Images offered (ids, names or, on Azure, URNs); ``default_image`` is offered too.
    images: list[str] = Field(default_factory=list)
    #: Cached prices and catalogs older than this are refreshed in the background (never on a request).
    price_cache_max_age_s: float = Field(default=86400.0, gt=0)
    catalog_max_age_s: float = Field(default=600.0, gt=0)
    #: Deadline of one provider call (below the provisioning loop's own).
    call_timeout_s: float = Field(default=50.0, gt=0)
    #: Provider calls running at once (each in a worker thread, off the event loop).
    threads: int = Field(default=16, ge=1)
    #: Open the job's declared ``in`` ports on its nodes to ``expose_cidrs``. Off: no inbound port at all
    #: (the agent connects out; port forwarding goes through it).
    expose_ports: bool = False
    expose_cidrs: list[str] = Field(default_factory=lambda: ["0.0.0.0/0"])
    #: Let a partition's nodes reach each other on every port (multi-node MPI jobs).
    internal_traffic: bool = False
    #: Boot: a pip requirement installed into /opt/skyport when the image has no ``skyport`` command
    #: (e.g. a wheel's URL); None: the image must have it.
    agent_install: str | None = None
    #: Boot: the Unix account (made by cloud-init) that jobs run as; the agent itself runs as root.
    job_user: str = "skyport"


class AWSRemoteSettings(ProviderRemoteSettings):
    """EC2 (gates/aws.py). Credentials: the AWS chain of the core (environment, ``~/.aws``, SSO, role)."""

    kind: Literal["aws"] = "aws"
    region: str
    #: A profile of ``~/.aws/config`` / ``~/.aws/credentials``; None: the default chain.
    profile: str | None = None
    #: Another EC2 endpoint (a VPC endpoint; moto in tests); None: AWS's.
    endpoint_url: str | None = None
    #: The subnet nodes go in; None: the default subnet of the region's default VPC.
    subnet_id: str | None = None
    public_ip: bool = True
    #: Prices from the AWS Price List API (cached in the home), besides ``prices``.
    pricing: bool = True
    #: Spot capacity: never; when the job allows it (label ``preemptible=true``); always.
    spot: Literal["never", "when_allowed", "always"] = "when_allowed"
    #: Root volume size (GiB); None: the image's.
    root_volume_gb: int | None = Field(default=None, ge=1)


class OpenStackRemoteSettings(ProviderRemoteSettings):
    """An OpenStack cloud (gates/openstack.py). Credentials: the ``clouds.yaml`` entry ``cloud``
    (``./``, ``~/.config/openstack/``, ``/etc/openstack/``) or ``OS_*`` variables. Prices: ``prices``."""

    kind: Literal["openstack"] = "openstack"
    cloud: str
    region: str | None = None
    #: The network (name or id) nodes are attached to; None: the project's only network.
    network: str | None = None


class AzureRemoteSettings(ProviderRemoteSettings):
    """Azure (gates/azure.py). Credentials: Azure identity (``credential``: environment, workload or
    managed identity, Azure CLI login), never a secret here."""

    kind: Literal["azure"] = "azure"
    subscription_id: str
    #: An existing resource group the remote works in (its role can be scoped to it).
    resource_group: str
    location: str
    #: The resource id of an existing subnet the nodes' interfaces go in.
    subnet_id: str
    credential: Literal["default", "environment", "workload_identity", "managed_identity", "cli"] = "default"
    managed_identity_client_id: str | None = None
    public_ip: bool = True
    #: Prices from the public Azure retail prices API (cached in the home), besides ``prices``.
    retail_prices: bool = True
    #: Spot capacity: never; when the job allows it (label ``preemptible=true``); always.
    spot: Literal["never", "when_allowed", "always"] = "when_allowed"
    #: Another Azure cloud's resource manager (sovereign clouds).
    resource_manager_url: str = "https://management.azure.com"


RemoteSettings = Annotated[
    AgentRemoteSettings
    | SSHRemoteSettings
    | SlurmRemoteSettings
    | SimRemoteSettings
    | HTTPRemoteSettings
    | AWSRemoteSettings
    | OpenStackRemoteSettings
    | AzureRemoteSettings,
    Field(discriminator="kind"),
]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SKYPORT_", env_nested_delimiter="__", extra="forbid")

    home: Path = Field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    #: SQLAlchemy URL; empty means SQLite in the home directory.
    database_url: str = ""
    #: Largest accepted upload (all files of one submission together), bytes.
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    #: Seconds between scheduler passes when nothing wakes it earlier.
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    #: Accept job scripts with directives the original Sky Port ignored (else they are a 400).
    jobscript_compat: bool = False
    log_level: str = "info"
    log_json: bool = False
    local: LocalGateSettings = Field(default_factory=LocalGateSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    staging: StagingSettings = Field(default_factory=StagingSettings)
    #: Remotes besides ``local`` (``[[remotes]]`` tables in skyport.toml).
    remotes: list[RemoteSettings] = Field(default_factory=list)
    #: The address agents and tunnels use to reach this core (default: https://<host>:<port>).
    public_url: str | None = None
    #: Lifetime of a node agent's certificate; agents renew when a third of it is left.
    node_cert_lifetime_s: float = Field(default=24 * 3600.0, ge=60)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_home = getattr(init_settings, "init_kwargs", {}).get("home")
        home = Path(init_home) if init_home else default_home()
        toml = TomlConfigSettingsSource(settings_cls, toml_file=home / SETTINGS_FILE)
        return (init_settings, env_settings, toml)

    # Paths derived from home: one layout, documented in one place.
    @property
    def ca_dir(self) -> Path:
        return self.home / "ca"

    @property
    def server_cert(self) -> Path:
        return self.home / "server" / "cert.pem"

    @property
    def server_key(self) -> Path:
        return self.home / "server" / "key.pem"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.home / 'skyport.db'}"


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
