"""The #SWM job-script format: every directive, every error with its line, compat mode, the round trip."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from skyport.jobscript import MAX_PROBLEMS, JobScriptError, Problem, directive_lines, parse_jobscript
from skyport.models.job import MAX_SCRIPT_BYTES, JobSpec, PortSpec

JOB_A = "123e4567-e89b-42d3-a456-426614174000"
JOB_B = "0f8fad5b-d9cb-469f-a165-70867728950e"

#: What the original JupyterHub spawner (swmjupyter) renders from its job.sh.jinja template.
SPAWNER_SCRIPT = """#!/bin/bash
#
# This is a job script that is executed by Sky Port on a compute node.
# The script is used to start JupyterHub user server.

#SWM relocatable
#SWM flavor Standard_NC4as_T4_v3
#SWM ports 8888/tcp/in,8081/tcp/out
#SWM submission-address jupyterhub
#SWM account azure
#SWM cloud-image ubuntu-22.04
#SWM container-image swmregistry.azurecr.io/jupyter/pytorch-notebook:cuda12-hub-5.2.1
#SWM input-files /tmp/.swmjupyter_k2j4/notebook.ipynb /tmp/.swmjupyter_k2j4/data.csv
#SWM output-files notebook.ipynb data.csv
#SWM storage swmblobcontainer
#SWM gpus 1

export HOME=$(pwd)
export XDG_CACHE_HOME=${HOME}/.cache/
export JUPYTERHUB_API_TOKEN=0123456789abcdef
export JUPYTERHUB_CLIENT_ID=jupyterhub-user-alice
export JUPYTERHUB_API_URL=http://localhost:8081/hub/api
export JUPYTER_RUNTIME_DIR=/tmp
export JUPYTERHUB_USER=$USER
export JUPYTERHUB_SERVICE_PREFIX=/user/$USER
export JUPYTERHUB_SERVICE_URL=http://0.0.0.0:8888
export NVIDIA_VISIBLE_DEVICES=all

echo Start single user jupyter server
jupyterhub-singleuser --debug
"""


def script(*directives: str, command: str = "true") -> str:
    return "#!/bin/sh\n" + "".join(f"{line}\n" for line in directives) + f"{command}\n"


def problems(text: str, *, compat: bool = False) -> list[Problem]:
    with pytest.raises(JobScriptError) as caught:
        parse_jobscript(text, compat=compat)
    return caught.value.problems


def only_problem(text: str, *, compat: bool = False) -> Problem:
    found = problems(text, compat=compat)
    assert len(found) == 1, found
    return found[0]


# --- every directive ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "field", "expected"),
    [
        ("name my first job", "name", "my first job"),
        ("comment runs  the  model, again", "comment", "runs  the  model, again"),
        ("account physics", "account", "physics"),
        ("flavor m1.medium", "flavor", "m1.medium"),
        ("cloud-image ubuntu-hpc/2404", "cloud_image", "ubuntu-hpc/2404"),
        ("container-image ghcr.io/org/app:1.2", "container_image", "ghcr.io/org/app:1.2"),
        ("image ubuntu:24.04", "container_image", "ubuntu:24.04"),
        ("ports 8888/tcp/in", "ports", [PortSpec(port=8888, direction="in")]),
        ("submission-address hub.example.org", "submission_address", "hub.example.org"),
        ("gpus 2", "gpus", 2),
        ("gpus 0", "gpus", 0),
        ("workdir /scratch/run1", "workdir", "/scratch/run1"),
        ("relocatable", "relocatable", True),
        ("relocatable no", "relocatable", False),
        ("input-files a.dat  b.dat", "input_files", ["a.dat", "b.dat"]),
        ("output-files out/result.txt", "output_files", ["out/result.txt"]),
        ("storage swmblobcontainer", "storage", "swmblobcontainer"),
        ("stdin in.txt", "stdin", "in.txt"),
        ("stdout out.log", "stdout", "out.log"),
        ("stderr err.log", "stderr", "err.log"),
        ("nodes 3", "nodes", 3),
        ("cpus 16", "cpus", 16),
        ("mem 4G", "mem", 4 * 1024**3),
        ("storage-size 100G", "storage_size", 100 * 1024**3),
        ("walltime 1-02:03:04", "walltime", 86400 + 2 * 3600 + 3 * 60 + 4),
        ("priority 10", "priority", 10),
        ("priority -3", "priority", -3),
        ("env OMP_NUM_THREADS=4", "env", {"OMP_NUM_THREADS": "4"}),
        (f"depends {JOB_A}", "depends", [JOB_A]),
        ("remote azure-west", "remote", "azure-west"),
        ("array 1-1000%50", "array", "1-1000%50"),
        ("label zone=eu-west-1", "labels", {"zone": "eu-west-1"}),
    ],
)
def test_each_directive_sets_its_field(directive: str, field: str, expected: Any) -> None:
    spec = parse_jobscript(script(f"#SWM {directive}"))
    assert getattr(spec, field) == expected


def test_a_script_without_directives_gets_the_defaults() -> None:
    spec = parse_jobscript("echo hello\n")
    assert spec.model_dump(exclude={"script"}) == JobSpec(script="x").model_dump(exclude={"script"})


def test_the_whole_text_becomes_the_script() -> None:
    text = script("#SWM name keep me", "# a comment", command="echo $SWM_JOB_ID")
    assert parse_jobscript(text).script == text


def test_a_shebang_is_optional_and_not_checked() -> None:
    assert parse_jobscript("#SWM cpus 2\necho hi").cpus == 2
    assert parse_jobscript("#!/no/such/interpreter\n#SWM cpus 3\nrun").cpus == 3


def test_windows_line_endings_are_read() -> None:
    spec = parse_jobscript("#!/bin/sh\r\n#SWM name win\r\n#SWM cpus 2\r\necho hi\r\n")
    assert (spec.name, spec.cpus) == ("win", 2)


def test_only_an_exact_first_token_makes_a_directive() -> None:
    text = script(
        "  \t#SWM cpus 4",  # leading whitespace is fine
        "#SWMcpus 8",  # not a directive: first token is '#SWMcpus'
        "##SWM cpus 8",
        "# SWM cpus 8",
        "#swm cpus 8",
        "echo '#SWM cpus 8'",
    )
    assert parse_jobscript(text).cpus == 4


def test_directives_after_the_first_command_still_count() -> None:
    assert parse_jobscript("#!/bin/sh\necho start\n#SWM nodes 2\n").nodes == 2


def test_tabs_and_runs_of_spaces_separate_the_name_from_the_value() -> None:
    spec = parse_jobscript(script("#SWM\tname \t two  words  "))
    assert spec.name == "two  words"


# --- the original JupyterHub spawner --------------------------------------------------------------------


def test_the_jupyterhub_spawner_script_is_accepted() -> None:
    spec = parse_jobscript(SPAWNER_SCRIPT)
    assert spec.script == SPAWNER_SCRIPT
    assert spec.relocatable is True
    assert spec.flavor == "Standard_NC4as_T4_v3"
    assert spec.ports == [PortSpec(port=8888, direction="in"), PortSpec(port=8081, direction="out")]
    assert spec.submission_address == "jupyterhub"
    assert spec.account == "azure"
    assert spec.cloud_image == "ubuntu-22.04"
    assert spec.container_image == "swmregistry.azurecr.io/jupyter/pytorch-notebook:cuda12-hub-5.2.1"
    assert spec.input_files == ["/tmp/.swmjupyter_k2j4/notebook.ipynb", "/tmp/.swmjupyter_k2j4/data.csv"]
    assert spec.output_files == ["notebook.ipynb", "data.csv"]
    assert spec.storage == "swmblobcontainer"
    assert spec.gpus == 1


@pytest.mark.parametrize("compat", [False, True])
def test_the_spawner_script_without_uploaded_files_is_accepted(compat: bool) -> None:
    # With no files uploaded the template renders "#SWM input-files " with nothing after it.
    text = SPAWNER_SCRIPT.replace(
        "#SWM input-files /tmp/.swmjupyter_k2j4/notebook.ipynb /tmp/.swmjupyter_k2j4/data.csv",
        "#SWM input-files ",
    ).replace("#SWM output-files notebook.ipynb data.csv", "#SWM output-files ")
    spec = parse_jobscript(text, compat=compat)
    assert spec.input_files == []
    assert spec.output_files == []


# --- values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4G", 4 * 1024**3),
        ("512M", 512 * 1024**2),
        ("1.5G", 1536 * 1024**2),
        ("100K", 100 * 1024),
        ("2T", 2 * 1024**4),
        ("1P", 1024**5),
        ("1048576", 1048576),
        ("0", 0),
        ("4GB", 4 * 1024**3),
        ("4GiB", 4 * 1024**3),
        ("512MB", 512 * 1024**2),
        ("512MiB", 512 * 1024**2),
        ("4g", 4 * 1024**3),
        ("4 G", 4 * 1024**3),
        ("100B", 100),
        ("0.5K", 512),
        ("0.3K", 308),  # 307.2 bytes round up
    ],
)
def test_sizes(value: str, expected: int) -> None:
    spec = parse_jobscript(script(f"#SWM mem {value}", f"#SWM storage-size {value}"))
    assert (spec.mem, spec.storage_size) == (expected, expected)


@pytest.mark.parametrize("value", ["4Q", "G", "-1G", "1.5", "1,5G", "4 GBs", "1e9", "½G", "99999999999P"])
def test_bad_sizes_name_the_line(value: str) -> None:
    problem = only_problem(script("#SWM name x", f"#SWM mem {value}"))
    assert problem.line == 3
    assert problem.message.startswith("mem: ")
    assert repr(value) in problem.message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("05:00", 300),
        ("0:01", 1),
        ("59:59", 3599),
        ("2:00:00", 7200),
        ("48:00:00", 48 * 3600),
        ("1-12:00:00", 36 * 3600),
        ("0-00:00:30", 30),
    ],
)
def test_walltimes(value: str, seconds: int) -> None:
    assert parse_jobscript(script(f"#SWM walltime {value}")).walltime == seconds


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("90:00", "minutes must be below 60 (write 1:30:00)"),
        ("1:60:00", "minutes must be below 60"),
        ("10:60", "seconds must be below 60"),
        ("1:00:75", "seconds must be below 60"),
        ("1-24:00:00", "hours must be below 24 when days are given"),
        ("00:00", "at least one second"),
        ("3600", "a bare number is ambiguous"),
        ("1h", "is not [[D-]HH:]MM:SS"),
        ("1-30:00", "is not [[D-]HH:]MM:SS"),
        ("1:2:3:4", "is not [[D-]HH:]MM:SS"),
        ("-5:00", "is not [[D-]HH:]MM:SS"),
    ],
)
def test_bad_walltimes_say_why(value: str, fragment: str) -> None:
    problem = only_problem(script(f"#SWM walltime {value}"))
    assert problem.line == 2
    assert problem.message.startswith("walltime: ")
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8888/tcp/in", [(8888, "in")]),
        ("8888/tcp/in,8081/tcp/out", [(8888, "in"), (8081, "out")]),
        (" 8888/tcp/in , 8081/TCP/OUT ", [(8888, "in"), (8081, "out")]),
        ("1/tcp/in,65535/tcp/out", [(1, "in"), (65535, "out")]),
        ("8888/tcp/in,8888/tcp/in", [(8888, "in")]),
    ],
)
def test_ports(value: str, expected: list[tuple[int, str]]) -> None:
    ports = parse_jobscript(script(f"#SWM ports {value}")).ports
    assert [(port.port, port.direction) for port in ports] == expected
    assert all(port.protocol == "tcp" for port in ports)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("8888", "needs a direction: 8888/tcp/in"),
        ("8888/tcp", "needs a direction"),
        ("8888/udp/in", "only tcp ports can be forwarded"),
        ("8888/tcp/both", "the direction must be 'in' or 'out'"),
        ("0/tcp/in", "port 0 is out of the range 1-65535"),
        ("65536/tcp/out", "port 65536 is out of the range 1-65535"),
        ("http/tcp/in", "'http/tcp/in' is not PORT/tcp/in or PORT/tcp/out"),
        ("8888/tcp/in,", "an empty entry"),
        ("8888/tcp/in,8888/tcp/out", "port 8888 cannot be both in and out"),
    ],
)
def test_bad_ports_say_why(value: str, fragment: str) -> None:
    problem = only_problem(script(f"#SWM ports {value}"))
    assert problem.line == 2
    assert problem.message.startswith("ports: ")
    assert fragment in problem.message


def test_every_bad_port_of_a_line_is_reported() -> None:
    problem = only_problem(script("#SWM ports 1/udp/in,2/tcp/sideways,3/tcp/in"))
    assert "'1/udp/in'" in problem.message
    assert "'2/tcp/sideways'" in problem.message


@pytest.mark.parametrize(
    ("value", "expected"), [("", True), ("true", True), ("YES", True), ("false", False), ("no", False)]
)
def test_relocatable(value: str, expected: bool) -> None:
    assert parse_jobscript(script(f"#SWM relocatable {value}")).relocatable is expected


def test_relocatable_rejects_other_words() -> None:
    problem = only_problem(script("#SWM relocatable maybe"))
    assert problem == Problem(
        2, "relocatable: 'maybe' is not one of true, false, yes, no (no value means true)"
    )


def test_env_values_keep_equals_signs_and_spaces_and_accumulate() -> None:
    spec = parse_jobscript(
        script("#SWM env OPTS=--a=1 --b 2", "#SWM env EMPTY=", "#SWM env PATH=/opt/bin:/bin")
    )
    assert spec.env == {"OPTS": "--a=1 --b 2", "EMPTY": "", "PATH": "/opt/bin:/bin"}


def test_depends_accumulate_deduplicate_and_normalise_case() -> None:
    spec = parse_jobscript(script(f"#SWM depends {JOB_A}, {JOB_B}", f"#SWM depends {JOB_A.upper()}"))
    assert spec.depends == [JOB_A, JOB_B]


def test_labels_and_files_accumulate() -> None:
    spec = parse_jobscript(
        script(
            "#SWM label zone=eu",
            "#SWM label disk=ssd",
            "#SWM input-files a b",
            "#SWM input-files c",
            "#SWM output-files x",
            "#SWM output-files y z",
        )
    )
    assert spec.labels == {"zone": "eu", "disk": "ssd"}
    assert spec.input_files == ["a", "b", "c"]
    assert spec.output_files == ["x", "y", "z"]


# --- errors ---------------------------------------------------------------------------------------------


def test_an_unknown_directive_is_an_error_with_a_suggestion() -> None:
    assert only_problem(script("#SWM cpu 4")) == Problem(2, "unknown directive 'cpu'; did you mean 'cpus'?")
    assert only_problem(script("#SWM NODES 4")) == Problem(
        2, "unknown directive 'NODES'; did you mean 'nodes'?"
    )
    assert only_problem(script("#SWM frobnicate on")) == Problem(2, "unknown directive 'frobnicate'")


def test_a_directive_line_without_a_name_is_an_error() -> None:
    problem = only_problem(script("#SWM"))
    assert problem.line == 2
    assert "needs a directive name" in problem.message


@pytest.mark.parametrize(
    ("directive", "usage"),
    [
        ("name", "#SWM name <text>"),
        ("cpus", "#SWM cpus <n>"),
        ("mem", "#SWM mem <size, e.g. 4G>"),
        ("walltime", "#SWM walltime <[[D-]HH:]MM:SS>"),
        ("ports", "#SWM ports <PORT/tcp/in|out>[,...]"),
        ("env", "#SWM env <KEY=VALUE>"),
        ("gpus", "#SWM gpus <n>"),
    ],
)
def test_a_missing_value_is_an_error_that_shows_the_usage(directive: str, usage: str) -> None:
    assert only_problem(script(f"#SWM {directive}  ")) == Problem(2, f"{directive} needs a value: {usage}")


@pytest.mark.parametrize("directive", ["nodes", "cpus", "gpus", "priority"])
@pytest.mark.parametrize("value", ["four", "4.0", "0x10", "1_000", "٣", "4 cores"])
def test_bad_integers(directive: str, value: str) -> None:
    assert only_problem(script(f"#SWM {directive} {value}")) == Problem(
        2, f"{directive}: {value!r} is not a whole number"
    )


@pytest.mark.parametrize(("directive", "minimum"), [("nodes", 1), ("cpus", 1), ("gpus", 0)])
def test_negative_counts(directive: str, minimum: int) -> None:
    assert only_problem(script(f"#SWM {directive} -2")) == Problem(
        2, f"{directive}: -2 is negative; give a count of {minimum} or more"
    )


@pytest.mark.parametrize("directive", ["nodes", "cpus"])
def test_zero_nodes_or_cpus(directive: str) -> None:
    assert only_problem(script(f"#SWM {directive} 0")) == Problem(
        2, f"{directive}: 0 is too few; give at least 1"
    )


@pytest.mark.parametrize(
    "directive",
    [
        "name a",
        "account a",
        "cpus 2",
        "mem 1G",
        "walltime 10:00",
        "ports 80/tcp/in",
        "array 1-3",
        "relocatable",
    ],
)
def test_a_single_directive_given_twice(directive: str) -> None:
    name = directive.split()[0]
    text = script(f"#SWM {directive}", "#SWM comment between", f"#SWM {directive}")
    assert only_problem(text) == Problem(4, f"{name} given twice, first on line 2")


def test_image_and_container_image_are_one_directive() -> None:
    text = script("#SWM image a:1", "#SWM container-image b:2")
    assert only_problem(text) == Problem(3, "container-image given twice, first on line 2 (as image)")


def test_a_repeated_env_or_label_key_is_an_error() -> None:
    text = script("#SWM env A=1", "#SWM label k=v", "#SWM env A=2", "#SWM label k=w")
    assert problems(text) == [
        Problem(4, "env A given twice, first on line 2"),
        Problem(5, "label k given twice, first on line 3"),
    ]


@pytest.mark.parametrize("value", ["A", "=1", ""])
def test_env_needs_key_equals_value(value: str) -> None:
    problem = only_problem(script(f"#SWM env {value}"))
    assert problem.line == 2
    assert "KEY=VALUE" in problem.message


def test_env_names_are_checked_on_their_own_line() -> None:
    text = script("#SWM env GOOD=1", "#SWM env 2BAD=x", "#SWM env ALSO_GOOD=3")
    problem = only_problem(text)
    assert problem.line == 3
    assert problem.message.startswith("env: ")
    assert "'2BAD' is not valid" in problem.message


def test_labels_are_checked_on_their_own_line() -> None:
    text = script("#SWM label zone=eu", "#SWM label bad key=v", "#SWM label nokey")
    assert [problem.line for problem in problems(text)] == [3, 4]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("42", "'42' is not a job id"),
        (f"{JOB_A},", "an empty entry"),
        (JOB_A.replace("-", ""), "is not a job id"),
        ("{" + JOB_A + "}", "is not a job id"),
    ],
)
def test_depends_must_be_job_ids(value: str, fragment: str) -> None:
    problem = only_problem(script(f"#SWM depends {value}"))
    assert problem.line == 2
    assert problem.message.startswith("depends: ")
    assert fragment in problem.message
    assert "UUID" in problem.message


def test_an_array_range_is_checked_by_the_model_and_placed_on_its_line() -> None:
    problem = only_problem(script("#SWM name x", "#SWM array 1-x"))
    assert problem.line == 3
    assert (
        problem.message == "array: array range '1-x' is not valid (e.g. 1-100, 1-1000%50, 1,3,5-9, 0-99:10)"
    )


@pytest.mark.parametrize(
    ("directive", "fragment"),
    [
        ("name " + "n" * 257, "at most 256 characters"),
        ("comment " + "c" * 4097, "at most 4096 characters"),
        ("nodes 100001", "less than or equal to 100000"),
        ("gpus 1025", "less than or equal to 1024"),
        ("priority 1000001", "less than or equal to 1000000"),
    ],
)
def test_model_limits_become_problems_on_the_right_line(directive: str, fragment: str) -> None:
    problem = only_problem(script("# first", f"#SWM {directive}"))
    assert problem.line == 3
    assert problem.message.startswith(directive.split()[0] + ": ")
    assert fragment in problem.message


def test_a_model_error_is_never_a_raw_validation_error() -> None:
    with pytest.raises(JobScriptError) as caught:
        parse_jobscript(script("#SWM nodes 100001"))
    assert not isinstance(caught.value, ValidationError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("text", ["#!/bin/sh\n#SWM cpus 2\n# just a comment\n\n", "#SWM name x"])
def test_a_script_that_runs_nothing(text: str) -> None:
    problem = only_problem(text)
    assert problem.line == 0
    assert problem.message.startswith("the script runs nothing")


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_script(text: str) -> None:
    assert only_problem(text) == Problem(0, "the script is empty")


def test_a_nul_byte_is_reported_once_at_its_first_line() -> None:
    text = script("#SWM name x", command="echo a\x00b\nprintf '\x00'")
    assert only_problem(text) == Problem(3, "the script contains a NUL byte (is it a binary file?)")


def test_a_script_over_the_size_limit_is_refused_alone() -> None:
    text = "#SWM bogus\n" + "echo é\n" * (MAX_SCRIPT_BYTES // 8 + 1)
    assert len(text) < MAX_SCRIPT_BYTES < len(text.encode())  # the limit counts bytes, not characters
    problem = only_problem(text)
    assert problem.line == 0
    assert f"over the limit of {MAX_SCRIPT_BYTES} bytes" in problem.message


def test_a_script_at_the_size_limit_is_accepted() -> None:
    head = "#!/bin/sh\ntrue\n"
    text = head + "#" * (MAX_SCRIPT_BYTES - len(head))
    assert parse_jobscript(text).script == text


def test_all_problems_are_reported_together_in_line_order() -> None:
    text = "\n".join(
        [
            "#!/bin/sh",  # 1
            "#SWM cpus four",  # 2
            "#SWM nmae x",  # 3
            "#SWM mem 4Q",  # 4
            "#SWM walltime 1:90:00",  # 5
            "#SWM cpus 2",  # 6
            "#SWM name " + "n" * 300,  # 7
            "#SWM env 1X=2",  # 8
            "#SWM ports 8888",  # 9
            "#SWM gpus",  # 10
            "# nothing runs",  # 11
        ]
    )
    with pytest.raises(JobScriptError) as caught:
        parse_jobscript(text)
    err = caught.value
    assert [problem.line for problem in err.problems] == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    lines = str(err).splitlines()
    assert len(lines) == 10
    assert lines[0] == "line 0: the script runs nothing: it has only directives, comments and blank lines"
    assert lines[1] == "line 2: cpus: 'four' is not a whole number"
    assert lines[2] == "line 3: unknown directive 'nmae'; did you mean 'name'?"
    assert lines[5] == "line 6: cpus given twice, first on line 2"
    assert lines[6] == "line 7: name: String should have at most 256 characters"
    assert lines[9] == "line 10: gpus needs a value: #SWM gpus <n>"


def test_reading_stops_after_too_many_problems() -> None:
    text = "#SWM bogus\n" * (MAX_SCRIPT_BYTES // 12) + "true\n"
    found = problems(text)
    assert len(found) == MAX_PROBLEMS + 1
    assert found[-1] == Problem(MAX_PROBLEMS + 1, f"more than {MAX_PROBLEMS} problems; stopped reading here")


def test_problem_and_error_rendering() -> None:
    assert str(Problem(7, "cpus: 'x' is not a whole number")) == "line 7: cpus: 'x' is not a whole number"
    err = JobScriptError([Problem(9, "b"), Problem(2, "a"), Problem(2, "a")])
    assert err.problems == [Problem(2, "a"), Problem(9, "b")]
    assert str(err) == "line 2: a\nline 9: b"
    with pytest.raises(AttributeError):
        Problem(1, "x").line = 2  # type: ignore[misc]


# --- compat mode ----------------------------------------------------------------------------------------


def test_compat_ignores_unknown_directives() -> None:
    text = script("#SWM checkpoint dmtcp", "#SWM --keep-resources", "#SWM", "#SWM cpus 2", command="run")
    assert parse_jobscript(text, compat=True).cpus == 2
    assert [problem.line for problem in problems(text)] == [2, 3, 4]


def test_compat_ignores_directives_a_template_left_empty() -> None:
    text = script("#SWM gpus ", "#SWM storage", "#SWM submission-address ", "#SWM flavor f1")
    spec = parse_jobscript(text, compat=True)
    assert (spec.gpus, spec.storage, spec.submission_address, spec.flavor) == (0, None, None, "f1")
    assert len(problems(text)) == 3


def test_compat_reads_a_port_without_direction_as_in() -> None:
    # Older spawners wrote "#SWM ports 8888/tcp".
    text = script("#SWM ports 8888/tcp,9000,", "#SWM image jupyter/datascience-notebook")
    ports = parse_jobscript(text, compat=True).ports
    assert ports == [PortSpec(port=8888, direction="in"), PortSpec(port=9000, direction="in")]
    assert only_problem(text).line == 2


def test_compat_still_reports_real_errors() -> None:
    text = script("#SWM unknown thing", "#SWM cpus lots", "#SWM ports 8888/udp")
    found = problems(text, compat=True)
    assert [problem.line for problem in found] == [3, 4]
    assert found[0] == Problem(3, "cpus: 'lots' is not a whole number")
    assert "only tcp ports can be forwarded" in found[1].message


# --- the reverse direction ------------------------------------------------------------------------------


def round_trip(spec: JobSpec) -> JobSpec:
    return parse_jobscript("#!/bin/sh\n" + "\n".join(directive_lines(spec)) + "\ntrue\n")


def fields(spec: JobSpec) -> dict[str, Any]:
    return spec.model_dump(exclude={"script", "command"})


def test_a_default_spec_needs_no_directives() -> None:
    assert directive_lines(JobSpec(script="true")) == []
    assert directive_lines(JobSpec(command=["true"])) == []


def test_round_trip_of_every_field() -> None:
    spec = JobSpec(
        command=["python", "train.py"],
        name="train model  v2",
        comment="second try: bigger batch",
        account="physics",
        remote="azure-west",
        flavor="Standard_D4s_v3",
        cloud_image="ubuntu-hpc/2404",
        container_image="ghcr.io/org/train:2.0",
        nodes=4,
        cpus=8,
        mem=1536 * 1024**2,
        gpus=2,
        storage_size=100 * 1024**3 + 1,
        walltime=86400 + 3661,
        priority=-5,
        env={"OPTS": "--lr=0.1 --epochs 3", "EMPTY": "", "PATH": "/opt/bin:/bin"},
        depends=[JOB_A, JOB_B],
        array="1-1000%50",
        labels={"zone": "eu-west-1", "disk": "ssd"},
        ports=[PortSpec(port=8888, direction="in"), PortSpec(port=8081, direction="out")],
        submission_address="hub.example.org",
        workdir="/scratch/run",
        relocatable=False,
        input_files=["data/a.csv", "/abs/b.bin"],
        output_files=["model.pt"],
        storage="swmblobcontainer",
        stdin="in.txt",
        stdout="out.log",
        stderr="err.log",
    )
    lines = directive_lines(spec)
    assert all(line.startswith("#SWM ") for line in lines)
    assert "#SWM mem 1536M" in lines
    assert "#SWM walltime 1-01:01:01" in lines
    assert "#SWM relocatable false" in lines
    assert fields(round_trip(spec)) == fields(spec)


@pytest.mark.parametrize("seconds", [1, 59, 60, 3599, 3600, 86399, 86400, 10 * 86400 + 1])
def test_round_trip_of_walltimes(seconds: int) -> None:
    assert round_trip(JobSpec(script="x", walltime=seconds)).walltime == seconds


@pytest.mark.parametrize("size", [1, 1023, 1024, 1025, 3 * 1024**2, 5 * 1024**4, 2 * 1024**5, 2**40 + 512])
def test_round_trip_of_sizes(size: int) -> None:
    spec = round_trip(JobSpec(script="x", mem=size, storage_size=size))
    assert (spec.mem, spec.storage_size) == (size, size)


def test_round_trip_of_the_spawner_script() -> None:
    spec = parse_jobscript(SPAWNER_SCRIPT)
    assert fields(round_trip(spec)) == fields(spec)


@pytest.mark.parametrize(
    "spec",
    [
        JobSpec(script="x", name="two\nlines"),
        JobSpec(script="x", comment="trailing "),
        JobSpec(script="x", env={"A": "b\r"}),
        JobSpec(script="x", input_files=["with space.txt"]),
    ],
)
def test_values_the_format_cannot_carry_are_refused(spec: JobSpec) -> None:
    with pytest.raises(ValueError, match="cannot be written as a directive"):
        directive_lines(spec)


def test_depends_any_is_read_and_rendered_back() -> None:
    first, second = "0b6e9f2c-3f1e-4a8e-9d27-5c1f6a7b8c90", "5c1f6a7b-0b6e-4a8e-9d27-3f1e9f2c8c90"
    spec = parse_jobscript(f"#!/bin/sh\n#SWM depends {first}\n#SWM depends-any {second}\ntrue\n")
    assert (spec.depends, spec.depends_any) == ([first], [second])
    again = parse_jobscript("#!/bin/sh\n" + "\n".join(directive_lines(spec)) + "\ntrue\n")
    assert (again.depends, again.depends_any) == ([first], [second])


def test_exclusive_is_read_and_rendered_back() -> None:
    spec = parse_jobscript("#!/bin/sh\n#SWM exclusive\ntrue\n")
    assert spec.exclusive
    assert parse_jobscript("#!/bin/sh\n" + "\n".join(directive_lines(spec)) + "\ntrue\n").exclusive
    assert not parse_jobscript("#!/bin/sh\ntrue\n").exclusive
