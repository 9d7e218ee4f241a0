"""Input files keep the name the job asks for: the path as given if the job names it, else its base name."""

from __future__ import annotations

from pathlib import Path

from skyport.client.api import upload_name


def test_a_file_the_job_names_by_its_base_name_is_sent_under_that_name() -> None:
    assert upload_name(Path("examples/greeting.txt"), ["greeting.txt"]) == "greeting.txt"


def test_a_file_the_job_names_by_a_relative_path_keeps_that_path() -> None:
    assert upload_name(Path("data/x.csv"), ["data/x.csv"]) == "data/x.csv"


def test_an_absolute_path_is_sent_under_its_base_name() -> None:
    assert upload_name(Path("/home/alice/data/x.csv"), []) == "x.csv"
