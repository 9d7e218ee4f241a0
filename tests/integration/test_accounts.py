"""Accounts: admins create them and add members; members charge jobs to them; usage is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyport.client import ApiError
from skyport.models import JobSpec, JobState
from tests.support.core import CoreProcess

SKYPORT = Path(sys.executable).parent / "skyport"


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    process = CoreProcess(tmp_path_factory.mktemp("accounts") / "home")
    process.add_user("alice")
    process.add_user("bob")
    process.start()
    try:
        yield process
    finally:
        process.cleanup()


def test_only_admins_create_accounts(core: CoreProcess) -> None:
    with core.client("alice") as alice, pytest.raises(ApiError) as refused:
        alice.set_account("mine")
    assert refused.value.status == 403


def test_a_member_charges_jobs_to_the_account_and_its_usage_grows(core: CoreProcess) -> None:
    with core.client("admin") as admin:
        created = admin.set_account("physics", share=3)
        member = admin.add_member("physics", "alice")
    assert created.share == 3 and created.usage == 0
    assert member.members == ["alice"]
    with core.client("alice") as alice:
        job = alice.submit(script="#!/bin/sh\n#SWM account physics\nsleep 1\n")
        assert job.account == "physics"
        assert alice.wait(job.id, 30).state is JobState.COMPLETED
        mine = {a.name: a for a in alice.accounts()}
    assert mine["physics"].usage >= 1.0  # at least the second of CPU time it ran
    assert "default" in mine
    with core.client("bob") as bob:
        with pytest.raises(ApiError) as refused:
            bob.submit(JobSpec(command=["true"], account="physics"))
        assert refused.value.status == 400 and "physics" in str(refused.value)
        assert "physics" not in {a.name for a in bob.accounts()}


def test_adding_an_unknown_user_says_which_is_missing(core: CoreProcess) -> None:
    with core.client("admin") as admin, pytest.raises(ApiError) as refused:
        admin.add_member("physics", "nobody-here")
    assert refused.value.status == 404 and "nobody-here" in str(refused.value)


def test_the_command_sets_a_budget_and_lists_it(core: CoreProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPORT_")}
    env.update(SKYPORT_HOME=str(core.home), SKYPORT_URL=core.url)
    subprocess.run(
        [SKYPORT, "account", "set", "chemistry", "--budget", "250"], env=env, check=True, timeout=60
    )
    listed = subprocess.run(
        [SKYPORT, "accounts", "--json"], env=env, check=True, capture_output=True, text=True, timeout=60
    )
    budgets = {a["name"]: a["budget"] for a in json.loads(listed.stdout)}
    assert budgets["chemistry"] == 250
