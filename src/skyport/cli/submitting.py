"""What ``skyport submit`` sends: a job script or a command, with options that override its directives.

Options are read by the job-script parser itself (each becomes the ``#SWM`` directive of the same name), so
``--mem 4G`` and ``#SWM mem 4G`` accept the same values and report the same problems. Everything is checked
here, before the core is contacted: a missing file or a bad directive costs no round trip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.markup import escape
from typer import _click  # typer vendors click: its Context is what commands get
from typer.core import TyperCommand

from skyport.cli.output import fail
from skyport.client.api import upload_name
from skyport.jobscript import JobScriptError, Problem, parse_jobscript
from skyport.models import JobSpec

#: Where :class:`SubmitCommand` leaves the argv given after ``--``.
ARGV_KEY = "skyport.argv"
USAGE = 2


class SubmitCommand(TyperCommand):
    """``submit`` takes a script *or* the argv after ``--``; click alone cannot tell ``--`` was given."""

    def parse_args(self, ctx: _click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta[ARGV_KEY] = args[cut + 1 :]
            args = args[:cut]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "[-- COMMAND [ARGS]...]"]


@dataclass
class Overrides:
    """``submit`` options that set what a ``#SWM`` directive sets; unset ones leave the job as it is."""

    name: str | None = None
    cpus: int | None = None
    gpus: int | None = None
    mem: str | None = None
    walltime: str | None = None
    env: Sequence[str] = ()
    outputs: Sequence[str] = ()

    def lines(self) -> list[tuple[str, str]]:
        """(option, directive line) for every option given."""
        scalars = {"name": self.name, "cpus": self.cpus, "gpus": self.gpus, "mem": self.mem}
        scalars["walltime"] = self.walltime
        out = [(f"--{key}", f"{key} {value}") for key, value in scalars.items() if value is not None]
        out += [("--env", f"env {_env_pair(item)}") for item in self.env]
        out += [("--output", f"output-files {item}") for item in self.outputs]
        for option, line in out:
            if any(char in line for char in "\r\n\x00"):
                fail(f"{option}: the value must be one line of text", code=USAGE)
        return out


def _env_pair(item: str) -> str:
    """``K=V`` as given; a bare ``K`` takes its value from this shell, as ``docker run -e K`` does."""
    if "=" in item:
        return item
    if item not in os.environ:
        fail(
            f"--env {escape(item)}: no such variable here",
            hint="give it a value: --env NAME=VALUE",
            code=USAGE,
        )
    return f"{item}={os.environ[item]}"


def read_script(path: Path) -> str:
    if not path.is_file():
        what = "is a directory, not a job script" if path.is_dir() else "does not exist"
        fail(
            f"{escape(str(path))} {what}",
            hint="check the path; to run a command instead: skyport submit -- python train.py",
            code=USAGE,
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{escape(str(path))} is not UTF-8 text (is it a binary?)", code=USAGE)
    except OSError as exc:
        fail(f"cannot read {escape(str(path))}: {exc.strerror}", code=USAGE)


def _problems(where: str, problems: Sequence[Problem]) -> str:
    return "\n".join(
        f"{where}:{p.line}: {p.message}" if p.line else f"{where}: {p.message}" for p in problems
    )


def script_spec(path: Path) -> JobSpec:
    try:
        return parse_jobscript(read_script(path))
    except JobScriptError as exc:
        fail(
            escape(f"the job script has errors:\n{_problems(str(path), exc.problems)}"),
            hint="directives are `#SWM <name> <value>` lines; fix the lines above and submit again",
            code=USAGE,
        )


def _override_fields(overrides: Overrides) -> dict[str, Any]:
    lines = overrides.lines()
    if not lines:
        return {}
    text = "".join(f"#SWM {line}\n" for _, line in lines) + "true\n"
    try:
        spec = parse_jobscript(text)
    except JobScriptError as exc:
        messages = [_option_problem(lines, p) for p in exc.problems]
        fail(escape("\n".join(messages)), hint="see `skyport submit --help`", code=USAGE)
    return {name: getattr(spec, name) for name in spec.model_fields_set - {"script"}}


def _option_problem(lines: list[tuple[str, str]], problem: Problem) -> str:
    if not 1 <= problem.line <= len(lines):
        return problem.message
    option, line = lines[problem.line - 1]
    return f"{option}: {problem.message.removeprefix(line.split()[0] + ': ')}"


def build_spec(script: Path | None, argv: Sequence[str] | None, overrides: Overrides) -> JobSpec:
    """The job to submit: the script's or the command's, with the options applied on top."""
    if (script is None) == (argv is None):
        fail(
            "give a job script or a command after --, not both" if script else "nothing to run",
            hint="skyport submit job.sh   or   skyport submit -- python train.py --epochs 3",
            code=USAGE,
        )
    if argv is not None and not argv:
        fail("no command after --", hint="skyport submit -- python train.py --epochs 3", code=USAGE)
    base = script_spec(script) if script else None
    data: dict[str, Any] = base.model_dump() if base else {"command": list(argv or ())}
    for name, value in _override_fields(overrides).items():
        if isinstance(value, dict):
            data[name] = {**data.get(name, {}), **value}
        elif isinstance(value, list):
            data[name] = list(dict.fromkeys([*data.get(name, []), *value]))
        else:
            data[name] = value
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        fail(escape(f"the job is not valid: {reasons}"), code=USAGE)


def check_inputs(spec: JobSpec, inputs: Sequence[Path]) -> None:
    """Every file to send exists, and every input the job names is sent (the core would refuse it)."""
    for path in inputs:
        if not path.is_file():
            fail(f"input file {escape(str(path))} does not exist (or is not a file)", code=USAGE)
    sent = {upload_name(path, spec.input_files) for path in inputs}
    missing = [name for name in spec.input_files if name not in sent and "://" not in name]
    if missing:
        fail(
            escape(f"the job names input file(s) {', '.join(missing)} but they are not given"),
            hint="send each with --input FILE",
            code=USAGE,
        )
