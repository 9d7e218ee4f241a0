"""The ``aws`` remote end to end, against moto in server mode: the real boto3 code path, nothing patched.

A real core (subprocess, real mTLS) has aws remotes whose ``AWS_*`` environment points at a moto server
in this process. A harness plays cloud-init: for every instance moto reports running with our tag, it
reads the instance's user data (as a VM would from its metadata service), parses it as YAML cloud-config,
and starts the ``skyport agent`` its systemd unit names, with the CA and the one-time token written
there; when moto reports the instance terminated, the "VM" and its agent die. So a job goes: scheduler
-> provisioning loop -> EC2 RunInstances -> agent enrolment with the token from the user data -> job
runs -> idle partition deleted -> instances terminated, security group deleted.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer

from skyport.gates.aws import parse_price_list, partition_status
from skyport.gates.cloud_common import PREEMPTED
from skyport.gates.cloud_init import CA_PATH, STATE_DIR, TOKEN_PATH, UNIT_PATH, WORKROOT
from skyport.gates.provisioner import TAG_CORE, TAG_PARTITION
from skyport.models import JobSpec, JobState, PortSpec
from tests.support.core import VENV_BIN, CoreProcess, make_workroot, wait_for

REGION = "eu-west-1"
SECRET = "moto-secret-never-on-a-vm"


@pytest.fixture
def moto_env() -> Iterator[dict[str, str]]:
    """A moto server on a free port, and the ``AWS_*`` environment that points boto3 at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "AKIAMOTOTESTING",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        # Nothing from this machine's own AWS configuration.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    try:
        yield env
    finally:
        server.stop()


def ec2_client(env: dict[str, str]) -> Any:
    return boto3.client(
        "ec2",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=REGION,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def an_ami(ec2: Any) -> str:
    images = ec2.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["amzn2-ami-hvm*"]}])
    return str(images["Images"][0]["ImageId"])


class CloudInit:
    """Plays cloud-init for every tagged instance moto runs: starts its agent; kills it when terminated."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.ec2 = ec2_client(env)
        self.root = root
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.user_data: dict[str, str] = {}
        #: Each instance's security groups' inbound rules, as they were when the instance booted.
        self.ingress: dict[str, list[dict[str, Any]]] = {}
        self.groups: dict[str, list[str]] = {}
        self.workroots: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> CloudInit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for proc in self.agents.values():
            self._kill(proc)

    def _run(self) -> None:
        while not self._stop.wait(0.2):  # the harness's own polling period, not a synchronisation
            try:
                self._pass()
            except Exception as exc:  # the next pass tries again; shown if the test times out
                self.errors.append(repr(exc))

    def _pass(self) -> None:
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag-key", "Values": [TAG_PARTITION]}]
        )
        for page in pages:
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    iid, state = instance["InstanceId"], instance["State"]["Name"]
                    if state == "running" and iid not in self.agents:
                        self._boot(instance)
                    elif state in ("shutting-down", "terminated") and iid in self.agents:
                        self._kill(self.agents[iid])

    def _boot(self, instance: dict[str, Any]) -> None:
        iid = instance["InstanceId"]
        partition = next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == TAG_PARTITION), "")
        found = self.ec2.describe_security_groups(
            Filters=[{"Name": f"tag:{TAG_PARTITION}", "Values": [partition]}]
        )
        attached = {g["GroupId"] for i in instance.get("NetworkInterfaces", []) for g in i.get("Groups", [])}
        attached |= {g["GroupId"] for g in instance.get("SecurityGroups", [])}
        self.ingress[iid] = [
            p for g in found["SecurityGroups"] if g["GroupId"] in attached for p in g["IpPermissions"]
        ]
        self.groups[iid] = sorted(attached)
        raw = self.ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]
        text = base64.b64decode(raw.get("Value", "")).decode()
        self.user_data[iid] = text
        if not text:
            return  # not one of the core's (e.g. an orphan made by the test)
        assert text.startswith("#cloud-config\n")
        config = yaml.safe_load(text)  # what cloud-init does with it
        files = {f["path"]: f["content"] for f in config["write_files"]}
        vm = self.root / iid
        vm.mkdir(parents=True, exist_ok=True)  # a pass cut short by a moto hiccup is simply repeated
        (vm / "ca.pem").write_text(files[CA_PATH])
        (vm / "token").write_text(files[TOKEN_PATH])
        workroot = make_workroot()
        self.workroots.append(workroot)
        unit = files[UNIT_PATH]
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        argv = shlex.split(exec_start.removeprefix("ExecStart="))[1:]  # the launcher runs `skyport` + these
        where = {CA_PATH: str(vm / "ca.pem"), TOKEN_PATH: str(vm / "token"), STATE_DIR: str(vm / "state")}
        where[WORKROOT] = str(workroot)
        argv = [where.get(a, a) for a in argv]
        argv[argv.index("--default-user") + 1] = "nobody"  # the VM's job account does not exist here
        log = open(vm / "agent.log", "ab")  # noqa: SIM115 - handed to the child
        self.agents[iid] = subprocess.Popen(
            [str(VENV_BIN / "skyport"), *argv, "--heartbeat", "0.5", "--cpus", "2"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        """The VM is gone: its agent and every job it started (its session) with it."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _remote(name: str, ami: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "aws",
        "name": name,
        "region": REGION,
        "pricing": False,  # moto has no Price List API: the operator's table prices the catalog
        "prices": {"t3.micro": 0.0104, "t3.small": 0.0208, "g5.xlarge": 1.006},
        "default_image": ami,
        "idle_timeout_s": 0,
        "heartbeat_timeout_s": 10,
        "backoff_s": 0.2,
        **extra,
    }


def _tagged(ec2: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every instance and security group that carries our partition tag, and is not terminated."""
    instances = [
        i
        for r in ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": [TAG_PARTITION]}])[
            "Reservations"
        ]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag-key", "Values": [TAG_PARTITION]}])
    return instances, groups["SecurityGroups"]


def test_a_job_runs_on_ec2_instances_and_everything_tagged_is_terminated_afterwards(
    tmp_path: Path, moto_env: dict[str, str]
) -> None:
    ec2 = ec2_client(moto_env)
    ami = an_ami(ec2)
    # Left over from a core that died: ours by the tag (no core tag), so the garbage collector removes
    # it; another core's instance is left alone.
    orphan = ec2.run_instances(
        ImageId=ami,
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": TAG_PARTITION, "Value": "orphan"}]}],
    )["Instances"][0]["InstanceId"]
    foreign = ec2.run_instances(
        ImageId=ami,
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": TAG_PARTITION, "Value": "theirs"},
                    {"Key": TAG_CORE, "Value": "another-core"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]
    remotes = [_remote("aws", ami), _remote("aws-open", ami, expose_ports=True)]
    env = {**moto_env, "SKYPORT_REMOTES": json.dumps(remotes), "SKYPORT_LOCAL__ENABLED": "false"}
    core = CoreProcess(tmp_path / "home", env=env)
    with CloudInit(moto_env, tmp_path / "vms") as vms:
        try:
            core.start()
            c = core.client()

            def state_of(iid: str) -> str:
                found = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
                return str(found["State"]["Name"])

            wait_for(lambda: state_of(orphan) == "terminated", 30, "the orphan to be collected")
            assert state_of(foreign) == "running", "another core's instance is not ours to delete"

            flavors = {(f.name, f.price) for f in c.flavors()}
            assert ("t3.micro", 0.0104) in flavors and ("g5.xlarge (1x NVIDIA A10G)", 1.006) in flavors

            port = PortSpec(port=8080, direction="in")
            spec = JobSpec(
                command=["sh", "-c", "echo hello from $SKYPORT_NODES"], flavor="t3.micro", ports=[port]
            )
            closed = c.submit(spec.model_copy(update={"remote": "aws"}))
            opened = c.submit(spec.model_copy(update={"remote": "aws-open"}))
            for job_id in (closed.id, opened.id):

                def ended(job_id: str = job_id) -> JobState | None:
                    job = c.job(job_id)
                    return job.state if job.state.terminal else None

                state = wait_for(ended, 90, f"job {job_id} to end:\n{core.log()[-3000:]}\n{vms.errors}")
                assert state is JobState.COMPLETED, [e.message for e in c.events(job_id)]

            by_node: dict[str, str] = {}
            for iid, text in vms.user_data.items():
                if text:
                    node = json.loads(text.removeprefix("#cloud-config\n"))["write_files"]
                    by_node[iid] = next(f for f in node if f["path"] == UNIT_PATH)["content"]
            assert len(by_node) == 2, "one instance per job, each booted from its own user data"
            for job_id in (closed.id, opened.id):
                job = c.job(job_id)
                assert c.log(job_id).decode().strip() == f"hello from {job.node_names[0]}"
            # What the VMs were handed: the core's URL, its CA and a token — no AWS credential.
            for text in vms.user_data.values():
                assert SECRET not in text and "AWS_" not in text and "aws_secret" not in text.lower()

            # The security groups open no port the job did not declare: none at all by default, and
            # exactly the declared one where the remote exposes ports.
            rules = {
                c.job(j).remote: vms.ingress[_instance_of(ec2, c.job(j).node_names[0])]
                for j in (closed.id, opened.id)
            }
            assert all(vms.groups[iid] for iid in by_node), "every instance is in its partition's group"
            assert rules["aws"] == []
            assert [(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in rules["aws-open"]] == [
                ("tcp", 8080, 8080)
            ]

            # Idle partitions (idle_timeout 0) are deleted: instances terminated, groups gone.
            def all_gone() -> bool:
                instances, groups = _tagged(ec2)
                return [i["InstanceId"] for i in instances] == [foreign] and not groups

            wait_for(all_gone, 60, f"every tagged resource to be deleted:\n{core.log()[-2000:]}")

            # The credentials check: admins only; it creates nothing.
            before = _tagged(ec2)
            report = c.check_remote("aws")
            assert report["ok"] and report["identity"].startswith("arn:aws"), report
            names = {i["name"] for i in report["items"] if i["ok"]}
            assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateSecurityGroup"} <= names
            assert _tagged(ec2) == before, "the check created nothing"
            user = core.add_user("alice")
            with pytest.raises(Exception, match="admin"):
                user.client().check_remote("aws")
            assert SECRET not in core.log()
        finally:
            core.cleanup()
            for workroot in vms.workroots:
                subprocess.run(["rm", "-rf", str(workroot)], check=False)


def _instance_of(ec2: Any, node_name: str) -> str:
    found = ec2.describe_instances(Filters=[{"Name": "tag:skyport-node", "Values": [node_name]}])
    return str(found["Reservations"][0]["Instances"][0]["InstanceId"])


def test_remotes_check_on_the_command_line_reports_missing_credentials(tmp_path: Path) -> None:
    """``skyport remotes check --local`` with no usable credentials: exit 1, and it says what to set."""
    home = tmp_path / "home"
    remote = _remote("aws", "ami-12345678", endpoint_url="http://127.0.0.1:9")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "SKYPORT_HOME": str(home),
        "SKYPORT_REMOTES": json.dumps([remote]),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    done = subprocess.run(
        [str(VENV_BIN / "skyport"), "remotes", "check", "aws", "--local", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert not report["ok"]
    assert report["items"][0]["name"] == "credentials" and "AWS_PROFILE" in report["items"][0]["detail"]


def test_preempted_spot_instances_make_a_failed_partition_with_its_own_reason() -> None:
    """AWS's state reason for a spot instance it took back is the ``preempted`` signal for the loop."""
    tags = [{"Key": TAG_PARTITION, "Value": "p1"}, {"Key": "skyport-node", "Value": "sp-1-0"}]
    reclaimed = {
        "InstanceId": "i-1",
        "State": {"Name": "terminated"},
        "StateReason": {
            "Code": "Server.SpotInstanceTermination",
            "Message": "Server.SpotInstanceTermination: Spot instance termination",
        },
        "Tags": tags,
    }
    status = partition_status("p1", [reclaimed], [{"GroupId": "sg-1", "Tags": tags}])
    assert status is not None and status.state == "failed" and status.reason == PREEMPTED
    assert "spot capacity of sp-1-0" in status.message
    ours = {**reclaimed, "StateReason": {"Code": "Client.UserInitiatedShutdown", "Message": "User initiated"}}
    deleting = partition_status("p1", [ours], [{"GroupId": "sg-1", "Tags": tags}])
    assert deleting is not None and deleting.state == "deleting" and deleting.reason == ""
    assert partition_status("p1", [ours], []) is None, "terminated instances and no group: nothing is left"


def test_price_list_documents_give_on_demand_prices() -> None:
    """The Price List API's product documents (as AWS sends them: JSON strings) -> USD per hour."""
    doc = (Path(__file__).parent.parent / "data" / "aws" / "price-list-t3-micro.json").read_text()
    assert parse_price_list([doc]) == {"t3.micro": pytest.approx(0.0114)}
