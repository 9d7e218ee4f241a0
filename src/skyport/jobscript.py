"""The ``#SWM`` job-script format, both ways: a script to a :class:`JobSpec`, a JobSpec to directive lines.

Why a module of its own: the job script is the one format every terminal shares. The original Sky Port
clients (the console, the JupyterHub spawner) submit nothing else, and our command line turns its options
into one. The original server was careless with it: an unknown directive crashed the submission with a 5xx
or was silently dropped. Here every problem of a script is collected in one pass and reported together,
each with its line number, as a :class:`JobScriptError` that an API can return as a 400 text. With
``compat=True`` the parser tolerates what the original clients are known to send and the original server
ignored: unknown directives, directives left without a value by a template, ports without a direction.

The format (``reference/jobscript.md``): a line whose first whitespace-separated token is exactly ``#SWM``
is a directive, the next token its name and the rest of the line, stripped, its value. The whole text,
directives included, is the shell script the job runs, with the interpreter of its shebang (``/bin/sh``
when there is none; it is not checked here).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from skyport.models.job import MAX_SCRIPT_BYTES, JobSpec, PortSpec

__all__ = [
    "DIRECTIVE_PREFIX",
    "MAX_PROBLEMS",
    "JobScriptError",
    "Problem",
    "directive_lines",
    "parse_jobscript",
]

#: First token of every directive line.
DIRECTIVE_PREFIX = "#SWM"

#: Largest size (``mem``, ``storage-size``) we accept: what a signed 64-bit column holds.
MAX_SIZE = 2**63 - 1

#: Reading stops after this many problems: a 1 MiB file of garbage must not cost seconds or a huge reply.
MAX_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job script. ``line`` counts from 1; 0 means the script as a whole."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class JobScriptError(ValueError):
    """A job script that cannot become a :class:`JobSpec`. ``str()`` gives one ``line N: ...`` per problem."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = sorted(dict.fromkeys(problems), key=lambda problem: problem.line)
        super().__init__("\n".join(str(problem) for problem in self.problems))


# --- converting one directive value ---------------------------------------------------------------------


class _BadValue(Exception):
    """A directive value that cannot be converted; the message says why, without the line number."""


#: ``convert(value, compat)`` turns a directive's value into the JobSpec field's value or raises _BadValue.
_Converter = Callable[[str, bool], object]

_INTEGER = re.compile(r"[+-]?[0-9]+")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgtp])(?:i?b)?|b)?", re.IGNORECASE)
_SIZE_UNITS = "KMGTP"
_WALLTIME = re.compile(r"(?:(?:([0-9]+)-)?([0-9]+):)?([0-9]+):([0-9]+)")
_PORT = re.compile(r"([0-9]{1,10})(?:/([A-Za-z]+)(?:/([A-Za-z]+))?)?")
_DIRECTIONS: dict[str, Literal["in", "out"]] = {"in": "in", "out": "out"}
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_BOOLEANS = {"true": True, "yes": True, "false": False, "no": False}


def _text(value: str, compat: bool) -> str:
    return value


def _integer(value: str) -> int:
    if not _INTEGER.fullmatch(value):
        raise _BadValue(f"{value!r} is not a whole number")
    try:
        return int(value)
    except ValueError:  # more digits than int() accepts
        raise _BadValue(f"{value[:20]}... is far too large") from None


def _count(minimum: int) -> _Converter:
    def convert(value: str, compat: bool) -> int:
        number = _integer(value)
        if number < 0:
            raise _BadValue(f"{number} is negative; give a count of {minimum} or more")
        if number < minimum:
            raise _BadValue(f"{number} is too few; give at least {minimum}")
        return number

    return convert


def _priority(value: str, compat: bool) -> int:
    return _integer(value)


def _size(value: str, compat: bool) -> int:
    match = _SIZE.fullmatch(value)
    if not match:
        raise _BadValue(f"{value!r} is not a size (e.g. 512M, 4G, 1.5T or a number of bytes)")
    number, unit = match.groups()
    if not unit and "." in number:
        raise _BadValue(f"{value!r} is not a whole number of bytes (add a unit: K, M, G, T)")
    power = _SIZE_UNITS.index(unit.upper()) + 1 if unit else 0
    exact: Fraction = Fraction(number) * 1024**power
    size = -(-exact.numerator // exact.denominator)  # a fraction of a byte rounds up
    if size > MAX_SIZE:
        raise _BadValue(f"{value!r} is too large")
    return size


def _walltime(value: str, compat: bool) -> int:
    match = _WALLTIME.fullmatch(value)
    if not match:
        bare = value.isascii() and value.isdigit()
        hint = " (a bare number is ambiguous: Slurm reads it as minutes)" if bare else ""
        raise _BadValue(f"{value!r} is not [[D-]HH:]MM:SS, e.g. 30:00, 2:00:00 or 1-12:00:00{hint}")
    days, hours, minutes, seconds = (int(group) if group else 0 for group in match.groups())
    if seconds >= 60:
        raise _BadValue(f"{value!r}: seconds must be below 60")
    if minutes >= 60:
        hint = f" (write {minutes // 60}:{minutes % 60:02}:{seconds:02})" if match.group(2) is None else ""
        raise _BadValue(f"{value!r}: minutes must be below 60{hint}")
    if match.group(1) is not None and hours >= 24:
        raise _BadValue(f"{value!r}: hours must be below 24 when days are given")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total < 1:
        raise _BadValue(f"{value!r}: a walltime must be at least one second")
    return total


def _port(item: str, compat: bool) -> PortSpec:
    match = _PORT.fullmatch(item)
    if not match:
        raise _BadValue(f"{item!r} is not PORT/tcp/in or PORT/tcp/out")
    number, protocol, direction = match.groups()
    port = int(number)
    if not 1 <= port <= 65535:
        raise _BadValue(f"port {number} is out of the range 1-65535")
    if protocol is not None and protocol.lower() != "tcp":
        raise _BadValue(f"{item!r}: only tcp ports can be forwarded")
    if direction is None and not compat:
        raise _BadValue(
            f"{item!r} needs a direction: {port}/tcp/in (reach the job's port) "
            f"or {port}/tcp/out (the job reaches the submitting side's port)"
        )
    way = _DIRECTIONS.get((direction or "in").lower())
    if way is None:
        raise _BadValue(f"{item!r}: the direction must be 'in' or 'out'")
    return PortSpec(port=port, direction=way)


def _ports(value: str, compat: bool) -> list[PortSpec]:
    ports: list[PortSpec] = []
    errors: list[str] = []
    for item in (item.strip() for item in value.split(",")):
        if not item:
            if not compat:
                errors.append("an empty entry (a stray comma?)")
            continue
        try:
            ports.append(_port(item, compat))
        except _BadValue as err:
            errors.append(str(err))
    errors.extend(_port_clashes(ports))
    if errors:
        raise _BadValue("; ".join(errors))
    return list(dict.fromkeys(ports))


def _port_clashes(ports: list[PortSpec]) -> list[str]:
    inbound = {port.port for port in ports if port.direction == "in"}
    outbound = {port.port for port in ports if port.direction == "out"}
    return [
        f"port {port} cannot be both in and out: both ends would listen on the node's port {port}"
        for port in sorted(inbound & outbound)
    ]


def _boolean(value: str, compat: bool) -> bool:
    if not value:
        return True
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise _BadValue(f"{value!r} is not one of true, false, yes, no (no value means true)") from None


def _words(value: str, compat: bool) -> list[str]:
    return value.split()


def _pair(what: str) -> _Converter:
    def convert(value: str, compat: bool) -> dict[str, str]:
        key, equals, rest = value.partition("=")
        if not equals or not key:
            raise _BadValue(f"{value!r} is not {what}")
        return {key: rest}

    return convert


def _job_ids(value: str, compat: bool) -> list[str]:
    ids: list[str] = []
    errors: list[str] = []
    for item in (item.strip() for item in value.split(",")):
        if _JOB_ID.fullmatch(item):
            ids.append(item.lower())
        else:
            errors.append(f"{item!r} is not a job id" if item else "an empty entry (a stray comma?)")
    if errors:
        raise _BadValue(
            "; ".join(errors) + " (a job id is a UUID such as 123e4567-e89b-42d3-a456-426614174000)"
        )
    return ids


# --- the directives -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Directive:
    field: str
    usage: str
    convert: _Converter
    repeatable: bool = False
    value_optional: bool = False


_DIRECTIVES: dict[str, _Directive] = {
    "name": _Directive("name", "<text>", _text),
    "comment": _Directive("comment", "<text>", _text),
    "account": _Directive("account", "<name>", _text),
    "flavor": _Directive("flavor", "<name>", _text),
    "cloud-image": _Directive("cloud_image", "<name>", _text),
    "container-image": _Directive("container_image", "<ref>", _text),
    "image": _Directive("container_image", "<ref>", _text),
    "ports": _Directive("ports", "<PORT/tcp/in|out>[,...]", _ports),
    "submission-address": _Directive("submission_address", "<host>", _text),
    "gpus": _Directive("gpus", "<n>", _count(0)),
    "workdir": _Directive("workdir", "<path>", _text),
    "relocatable": _Directive("relocatable", "[true|false]", _boolean, value_optional=True),
    "exclusive": _Directive("exclusive", "[true|false]", _boolean, value_optional=True),
    "input-files": _Directive("input_files", "<paths...>", _words, repeatable=True, value_optional=True),
    "output-files": _Directive("output_files", "<paths...>", _words, repeatable=True, value_optional=True),
    "storage": _Directive("storage", "<name>", _text),
    "stdin": _Directive("stdin", "<path>", _text),
    "stdout": _Directive("stdout", "<path>", _text),
    "stderr": _Directive("stderr", "<path>", _text),
    "nodes": _Directive("nodes", "<n>", _count(1)),
    "cpus": _Directive("cpus", "<n>", _count(1)),
    "mem": _Directive("mem", "<size, e.g. 4G>", _size),
    "storage-size": _Directive("storage_size", "<size, e.g. 100G>", _size),
    "walltime": _Directive("walltime", "<[[D-]HH:]MM:SS>", _walltime),
    "priority": _Directive("priority", "<int>", _priority),
    "env": _Directive("env", "<KEY=VALUE>", _pair("KEY=VALUE"), repeatable=True),
    "depends": _Directive("depends", "<job-id>[,...]", _job_ids, repeatable=True),
    "depends-any": _Directive("depends_any", "<job-id>[,...]", _job_ids, repeatable=True),
    "remote": _Directive("remote", "<name>", _text),
    "array": _Directive("array", "<range, e.g. 1-1000%50>", _text),
    "label": _Directive("labels", "<key=value>", _pair("key=value"), repeatable=True),
}


# --- parsing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where a field's value came from: the line, the directive as written and what that line gave."""

    line: int
    directive: str
    value: object


#: A model error on a field set by this many lines or fewer is traced to the guilty line(s) one by one.
_MAX_PINPOINT = 500


class _Parser:
    """Reads directive lines one by one, collecting field values and problems."""

    def __init__(self, compat: bool) -> None:
        self.compat = compat
        self.problems: list[Problem] = []
        self.scalars: dict[str, object] = {}
        self.lists: dict[str, list[Any]] = {}
        self.maps: dict[str, dict[str, str]] = {}
        self.sources: dict[str, list[_Source]] = {}
        self.first_seen: dict[str, tuple[int, str]] = {}
        self.key_lines: dict[tuple[str, str], int] = {}
        self.saw_nul = False

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(line, message))

    def scan(self, lines: list[str]) -> None:
        for number, line in enumerate(lines, start=1):
            if len(self.problems) >= MAX_PROBLEMS:
                self.problem(number, f"more than {MAX_PROBLEMS} problems; stopped reading here")
                return
            if "\x00" in line:
                if not self.saw_nul:
                    self.problem(number, "the script contains a NUL byte (is it a binary file?)")
                self.saw_nul = True
                continue
            tokens = line.split(maxsplit=2)
            if tokens and tokens[0] == DIRECTIVE_PREFIX:
                name = tokens[1] if len(tokens) > 1 else ""
                self.directive(number, name, tokens[2].strip() if len(tokens) > 2 else "")

    def directive(self, line: int, name: str, value: str) -> None:
        spec = _DIRECTIVES.get(name)
        if spec is None:
            if not self.compat:
                self.problem(line, _unknown(name))
            return
        if not value and not spec.value_optional:
            if not self.compat:
                self.problem(line, f"{name} needs a value: {DIRECTIVE_PREFIX} {name} {spec.usage}")
            return
        if not spec.repeatable and not self.first_time(line, name, spec.field):
            return
        try:
            converted = spec.convert(value, self.compat)
        except _BadValue as err:
            self.problem(line, f"{name}: {err}")
            return
        self.sources.setdefault(spec.field, []).append(_Source(line, name, converted))
        self.store(line, name, spec, converted)

    def first_time(self, line: int, name: str, field: str) -> bool:
        first = self.first_seen.setdefault(field, (line, name))
        if first[0] == line:
            return True
        alias = f" (as {first[1]})" if first[1] != name else ""
        self.problem(line, f"{name} given twice, first on line {first[0]}{alias}")
        return False

    def store(self, line: int, name: str, spec: _Directive, converted: object) -> None:
        if isinstance(converted, dict):
            self.store_pairs(line, name, spec.field, converted)
        elif isinstance(converted, list) and spec.repeatable:
            self.lists.setdefault(spec.field, []).extend(converted)
        else:
            self.scalars[spec.field] = converted

    def store_pairs(self, line: int, name: str, field: str, pairs: dict[str, str]) -> None:
        target = self.maps.setdefault(field, {})
        for key, value in pairs.items():
            first = self.key_lines.setdefault((field, key), line)
            if first != line:
                self.problem(line, f"{name} {key} given twice, first on line {first}")
            else:
                target[key] = value

    def fields(self) -> dict[str, object]:
        data: dict[str, object] = dict(self.scalars)
        data.update({field: list(dict.fromkeys(items)) for field, items in self.lists.items()})
        data.update(self.maps)
        return data

    def validate(self, text: str) -> JobSpec | None:
        if "\x00" in text:  # already reported on its line; the model would only repeat it
            return None
        try:
            return JobSpec.model_validate({**self.fields(), "script": text})
        except ValidationError as err:
            for error in err.errors():
                self.problems.extend(self.locate(error))
            return None

    def locate(self, error: ErrorDetails) -> list[Problem]:
        """Attribute a pydantic error to the directive line(s) that set the field, else to line 0."""
        field = str(error["loc"][0]) if error["loc"] else ""
        message = _pydantic_message(error)
        sources = self.sources.get(field, [])
        if not sources:
            return [Problem(0, f"{field}: {message}" if field else message)]
        if 1 < len(sources) <= _MAX_PINPOINT:
            pinpointed = [
                Problem(source.line, f"{source.directive}: {item_message}")
                for source in sources
                if (item_message := _field_error(field, source.value))
            ]
            if pinpointed:
                return pinpointed
        return [Problem(sources[0].line, f"{sources[0].directive}: {message}")]


def _unknown(name: str) -> str:
    if not name:
        return f"a {DIRECTIVE_PREFIX} line needs a directive name, e.g. {DIRECTIVE_PREFIX} name my-job"
    guess = difflib.get_close_matches(name.lower(), _DIRECTIVES, n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return f"unknown directive {name!r}{hint}"


def _pydantic_message(error: ErrorDetails) -> str:
    return error["msg"].removeprefix("Value error, ")


def _field_error(field: str, value: object) -> str | None:
    """The model's complaint about ``value`` alone in ``field``, or None if it has none."""
    try:
        JobSpec.model_validate({"script": "true", field: value})
    except ValidationError as err:
        return _pydantic_message(err.errors()[0])
    return None


def _runs_something(lines: list[str]) -> bool:
    return any((stripped := line.strip()) and not stripped.startswith("#") for line in lines)


def _check_size(text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SCRIPT_BYTES:
        raise JobScriptError(
            [
                Problem(
                    0,
                    f"the script is {size} bytes, over the limit of {MAX_SCRIPT_BYTES} bytes; "
                    "send data as input files, not inside the script",
                )
            ]
        )


def parse_jobscript(text: str, *, compat: bool = False) -> JobSpec:
    """Turn a ``#SWM`` job script into a :class:`JobSpec` whose ``script`` is the whole text.

    Raises :class:`JobScriptError` listing every problem found (never a pydantic ``ValidationError``).
    ``compat=True`` accepts what the original Sky Port ignored: unknown directives and directives without a
    value are skipped, and a port without a direction (``8888/tcp``) is an ``in`` port.
    """
    _check_size(text)
    lines = text.split("\n")
    parser = _Parser(compat)
    parser.scan(lines)
    if not text.strip():
        parser.problem(0, "the script is empty")
    elif not _runs_something(lines):
        parser.problem(0, "the script runs nothing: it has only directives, comments and blank lines")
    spec = parser.validate(text)
    if parser.problems or spec is None:
        raise JobScriptError(parser.problems)
    return spec


# --- rendering ------------------------------------------------------------------------------------------


def _format_size(size: int) -> str:
    for power in range(len(_SIZE_UNITS), 0, -1):
        unit = 1024**power
        if size >= unit and size % unit == 0:
            return f"{size // unit}{_SIZE_UNITS[power - 1]}"
    return str(size)


def _format_walltime(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02}:{minutes:02}:{seconds:02}"
    if hours:
        return f"{hours}:{minutes:02}:{seconds:02}"
    return f"{minutes:02}:{seconds:02}"


def _word_list(directive: str, words: list[str]) -> str:
    for word in words:
        if word.split() != [word]:
            raise ValueError(
                f"{directive}: {word!r} cannot be written as a directive (it contains whitespace)"
            )
    return " ".join(words)


def _directive_values(spec: JobSpec) -> Iterator[tuple[str, str]]:
    """(directive, value) for every field of ``spec`` that differs from its default, in the doc's order."""
    texts = {
        "name": spec.name,
        "comment": spec.comment,
        "account": spec.account,
        "remote": spec.remote,
        "flavor": spec.flavor,
        "cloud-image": spec.cloud_image,
        "container-image": spec.container_image,
        "submission-address": spec.submission_address,
        "workdir": spec.workdir,
        "storage": spec.storage,
        "stdin": spec.stdin,
        "stdout": spec.stdout,
        "stderr": spec.stderr,
        "array": spec.array,
    }
    yield from ((directive, value) for directive, value in texts.items() if value)
    if spec.ports:
        yield "ports", ",".join(str(port) for port in spec.ports)
    if not spec.relocatable:
        yield "relocatable", "false"
    counts = {"nodes": (spec.nodes, 1), "cpus": (spec.cpus, 1), "gpus": (spec.gpus, 0)}
    counts["priority"] = (spec.priority, 0)
    yield from ((directive, str(value)) for directive, (value, default) in counts.items() if value != default)
    if spec.mem:
        yield "mem", _format_size(spec.mem)
    if spec.storage_size:
        yield "storage-size", _format_size(spec.storage_size)
    if spec.walltime is not None:
        yield "walltime", _format_walltime(spec.walltime)
    yield from (("env", f"{key}={value}") for key, value in spec.env.items())
    yield from (("label", f"{key}={value}") for key, value in spec.labels.items())
    if spec.exclusive:
        yield "exclusive", "true"
    if spec.depends:
        yield "depends", ",".join(spec.depends)
    if spec.depends_any:
        yield "depends-any", ",".join(spec.depends_any)
    if spec.input_files:
        yield "input-files", _word_list("input-files", spec.input_files)
    if spec.output_files:
        yield "output-files", _word_list("output-files", spec.output_files)


def _directive_line(directive: str, value: str) -> str:
    if value != value.strip() or any(char in value for char in "\n\r\x00"):
        raise ValueError(
            f"{directive}: {value!r} cannot be written as a directive "
            "(line break, NUL, or leading/trailing whitespace)"
        )
    return f"{DIRECTIVE_PREFIX} {directive} {value}"


def directive_lines(spec: JobSpec) -> list[str]:
    """Render the fields of ``spec`` that differ from their defaults as ``#SWM`` lines.

    ``script`` and ``command`` are not directives and are left out. Empty strings count as unset. Raises
    ``ValueError`` for a value the format cannot carry (a line break, or whitespace a parser would strip).
    """
    return [_directive_line(directive, value) for directive, value in _directive_values(spec)]
