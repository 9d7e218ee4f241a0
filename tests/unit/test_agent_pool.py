"""The agent pool's view of its directory: node files found, replaced and removed."""

from __future__ import annotations

import os
from pathlib import Path

from skyport.agent.pool import AgentPool, PoolMember


def _member(tmp_path: Path, cpus: int) -> PoolMember:
    return PoolMember(
        url="https://core.invalid:1",
        ca_file=str(tmp_path / "ca.pem"),
        token_file=str(tmp_path / "token"),
        state_dir=str(tmp_path / "state"),
        workroot=str(tmp_path / "work"),
        cpus=cpus,
        mem=1024,
    )


def _write(path: Path, text: str) -> None:
    """As the sim writes node files: a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_scan_sees_new_replaced_and_removed_node_files(tmp_path: Path) -> None:
    directory = tmp_path / "pool"
    directory.mkdir()
    pool = AgentPool(directory)
    assert pool._scan() == {}

    _write(directory / "vm1.json", _member(tmp_path, 1).to_json())
    (directory / "notes.txt").write_text("not a node")
    assert pool._scan() == {"vm1": _member(tmp_path, 1)}
    assert pool._scan() == {"vm1": _member(tmp_path, 1)}  # unchanged: the parsed node is reused

    _write(directory / "vm1.json", _member(tmp_path, 2).to_json())  # replaced: read again
    _write(directory / "vm2.json", "{half a fi")  # being written: skipped until it parses
    assert pool._scan() == {"vm1": _member(tmp_path, 2)}

    _write(directory / "vm2.json", _member(tmp_path, 3).to_json())
    (directory / "vm1.json").unlink()
    assert pool._scan() == {"vm2": _member(tmp_path, 3)}


def test_scan_of_a_removed_directory_finds_no_node(tmp_path: Path) -> None:
    directory = tmp_path / "pool"
    directory.mkdir()
    pool = AgentPool(directory)
    _write(directory / "vm1.json", _member(tmp_path, 1).to_json())
    assert set(pool._scan()) == {"vm1"}
    (directory / "vm1.json").unlink()
    directory.rmdir()
    assert pool._scan() == {}
