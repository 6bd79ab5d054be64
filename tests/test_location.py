"""The data-directory abstraction: parsing, joining, and version publishing on local disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stockvol.location import (
    Location,
    LocationError,
    current_version,
    is_published,
    new_version,
    publish_version,
    resolve,
    version_time,
    versions_dir,
)


@pytest.mark.parametrize(
    ("given", "uri"),
    [
        ("s3a://bucket/run1/", "s3a://bucket/run1"),
        ("s3://bucket/run1", "s3a://bucket/run1"),
        ("S3A://bucket", "s3a://bucket"),
        ("file:/tmp/x", "/tmp/x"),
        ("file:///tmp/x", "/tmp/x"),
        ("/tmp/x/", "/tmp/x"),
    ],
)
def test_a_data_dir_is_parsed_to_one_spelling(given: str, uri: str) -> None:
    assert Location.parse(given).uri == uri


def test_a_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Location.parse("data").uri == str(tmp_path / "data")


@pytest.mark.parametrize("given", ["gs://bucket/x", "hdfs://nn/x", "s3a://", "s3a://b/../x"])
def test_an_unusable_uri_is_refused_with_its_reason(given: str) -> None:
    with pytest.raises(LocationError, match="scheme|bucket|not allowed"):
        Location.parse(given)


def test_object_storage_paths_join_and_split_like_paths() -> None:
    model = Location.parse("s3a://bucket/run1") / "model"
    assert str(model) == "s3a://bucket/run1/model"
    assert model.name == "model"
    assert model.parent == Location("s3a://bucket/run1")
    assert (model / "metrics.json").relative_to(model.parent) == "model/metrics.json"
    assert not model.is_local


def test_local_only_code_refuses_an_object_store_location() -> None:
    with pytest.raises(LocationError, match="object storage"):
        Path(Location.parse("s3a://bucket/run1"))
    assert Path(Location.parse("/tmp/x")) == Path("/tmp/x")


def test_files_are_written_read_listed_and_deleted(tmp_path: Path) -> None:
    top = Location.parse(tmp_path) / "top"
    (top / "b.txt").write_text("second")
    (top / "a.txt").write_bytes(b"first")
    assert top.child_names() == ["a.txt", "b.txt"]
    assert (top / "a.txt").read_text() == "first"
    assert top.is_dir() and (top / "a.txt").is_file() and not (top / "c").exists()
    assert not [name for name in os.listdir(tmp_path / "top") if ".tmp-" in name]
    top.delete()
    assert not top.exists() and top.child_names() == []


def test_publishing_a_version_moves_a_symlink_on_local_disk(tmp_path: Path) -> None:
    link = Location.parse(tmp_path) / "model"
    assert current_version(link) is None and not is_published(link)
    first, second = new_version(link), new_version(link)
    assert first != second and version_time(first) is not None
    for version in (first, second):
        (version / "metadata").write_text(version.name)
    publish_version(link, first)
    assert os.path.islink(link.uri) and resolve(link) == first and is_published(link)
    publish_version(link, second)
    assert (link / "metadata").read_text() == second.name
    assert os.readlink(link.uri) == f".model.versions/{second.name}"


def test_versions_started_within_one_second_sort_in_the_order_they_were_started(
    tmp_path: Path,
) -> None:
    """Retention and the tests take the last name as the newest: names with only a second's
    resolution and a random suffix put three quick writes in a random order."""
    link = Location.parse(tmp_path) / "t"
    names = [new_version(link).name for _ in range(200)]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len({name[:16] for name in names}) < len(names)  # some did share a second
    assert all(version_time(versions_dir(link) / name) is not None for name in names)


def test_publishing_over_a_plain_directory_replaces_it(tmp_path: Path) -> None:
    link = Location.parse(tmp_path) / "features"
    (link / "old.parquet").write_text("x")
    assert resolve(link) == link
    version = new_version(link)
    (version / "part.parquet").write_text("y")
    publish_version(link, version)
    assert link.child_names() == ["part.parquet"]
