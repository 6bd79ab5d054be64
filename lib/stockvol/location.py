"""Where the data lives: a local directory or an S3 URI, and the one way every stage lists,
reads, writes and publishes below it.

A ``Location`` is what Spark, Delta and MLlib take (``str(location)``: an absolute local path or
an ``s3a://bucket/key`` URI) and what the driver's and the tasks' own file work goes through
(``location.arrow``: a pyarrow ``FileSystem`` and path). Local paths and S3 share that code path;
only publishing differs (``publish_version``), because object storage has no symlinks.

S3 is configured the standard way: pyarrow reads ``AWS_ENDPOINT_URL``, ``AWS_REGION`` and the
credentials from the environment (and instance roles), Spark's S3A connector gets the endpoint
and region from ``stockvol.spark`` and the credentials from its own provider chain.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePosixPath

import pyarrow.fs as pafs

# URI schemes of object storage: S3A is Hadoop's S3 connector (Spark, Delta, MLlib); pyarrow and
# the AWS tools say s3. Both name the same objects.
OBJECT_STORE_SCHEMES = ("s3a", "s3")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class LocationError(ValueError):
    """A data directory or path that this project cannot use."""


@dataclass(frozen=True)
class Location:
    """A file or directory: an absolute local path, or ``s3a://bucket/key`` (no trailing /)."""

    uri: str

    @classmethod
    def parse(cls, value: str | os.PathLike[str] | Location) -> Location:
        """A local path (relative ones are made absolute: executors run elsewhere), a
        ``file:`` URI, or an ``s3a://``/``s3://`` URI; any other scheme is refused."""
        if isinstance(value, Location):
            return value
        text = os.fspath(value)
        match = _URI.match(text)
        scheme = match.group(1).lower() if match else ""
        if len(scheme) <= 1:  # no scheme (a Windows drive letter is no URI either)
            return cls(os.path.abspath(text))
        if scheme == "file":
            return cls(os.path.abspath(re.sub(r"^file:(//)?", "", text)))
        if scheme not in OBJECT_STORE_SCHEMES:
            raise LocationError(
                f"{text}: unsupported storage scheme {scheme!r}; use a local path, file:, "
                "or s3a://bucket/prefix (S3 or any S3-compatible store)"
            )
        rest = text[match.end() :].lstrip("/").rstrip("/")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise LocationError(f"{text}: no bucket; use s3a://bucket/prefix")
        if any(part in (".", "..") for part in rest.split("/")):
            raise LocationError(f"{text}: '.' and '..' are not allowed in an object-store path")
        return cls(f"s3a://{rest}")

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """The local path; refused for object storage, so local-only code fails loudly there
        instead of writing a local folder named ``s3a:``."""
        if not self.is_local:
            raise LocationError(f"{self.uri} is on object storage, where a local path is needed")
        return self.uri

    def __truediv__(self, name: str) -> Location:
        if self.is_local:
            return Location(os.path.join(self.uri, name))
        return Location(f"{self.uri}/{name.strip('/')}")

    @property
    def is_local(self) -> bool:
        return not self.uri.startswith("s3a://")

    @property
    def name(self) -> str:
        return PurePosixPath(self.uri.removeprefix("s3a://")).name

    @property
    def parent(self) -> Location:
        if self.is_local:
            return Location(os.path.dirname(self.uri))
        return Location(self.uri.rsplit("/", 1)[0]) if self.uri.count("/") > 2 else self

    @property
    def arrow(self) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path in it."""
        if self.is_local:
            return pafs.LocalFileSystem(), self.uri
        key = self.uri.removeprefix("s3a://")
        return _s3(key.split("/", 1)[0], os.environ.get("AWS_ENDPOINT_URL", "")), key

    def relative_to(self, other: Location) -> str:
        """This location's path below ``other``, with ``/`` separators."""
        prefix = other.uri.rstrip("/") + "/"
        if not self.uri.startswith(prefix):
            raise LocationError(f"{self.uri} is not below {other.uri}")
        return self.uri[len(prefix) :]

    # -- file operations, the same on local disk and object storage ----------------------------

    def info(self) -> pafs.FileInfo:
        filesystem, path = self.arrow
        return filesystem.get_file_info(path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def children(self) -> list[pafs.FileInfo]:
        """The entries directly below this directory (none if it does not exist), by name."""
        filesystem, path = self.arrow
        selector = pafs.FileSelector(path, allow_not_found=True)
        return sorted(filesystem.get_file_info(selector), key=lambda entry: entry.base_name)

    def child_names(self) -> list[str]:
        return [entry.base_name for entry in self.children()]

    def read_bytes(self) -> bytes:
        filesystem, path = self.arrow
        with filesystem.open_input_stream(path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file: one PUT on object storage (readers see the old object or the new
        one); on local disk a temporary file renamed over it, for the same guarantee."""
        filesystem, path = self.arrow
        if not self.is_local:
            with filesystem.open_output_stream(path) as stream:
                stream.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        """Create the directory and its parents (object storage has no directories: no-op)."""
        if self.is_local:
            os.makedirs(self.uri, exist_ok=True)

    def delete(self) -> None:
        """Delete this file or directory tree, if it exists (a symlink itself, not its target)."""
        filesystem, path = self.arrow
        if self.is_local and os.path.islink(path):
            os.unlink(path)
            return
        kind = self.info().type
        if kind == pafs.FileType.Directory:
            filesystem.delete_dir(path)
        elif kind == pafs.FileType.File:
            filesystem.delete_file(path)

    def move_to(self, destination: Location) -> None:
        """Rename a file (local disk), or copy it and delete the original (object storage)."""
        filesystem, path = self.arrow
        filesystem.move(path, destination.arrow[1])


@functools.lru_cache(maxsize=32)
def _s3(bucket: str, endpoint: str) -> pafs.FileSystem:
    """One pyarrow S3 filesystem per bucket and endpoint. ``from_uri`` (not the constructor)
    reads ``AWS_ENDPOINT_URL`` and uses path-style requests with it, as S3-compatible stores
    expect; credentials and region come from the usual AWS environment and files."""
    del endpoint  # part of the cache key only: a changed endpoint gets a new filesystem
    filesystem, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    return filesystem


# ---------------------------------------------------------------------------------------------
# Versions and pointers: how a Parquet table, the model and (on object storage) raw/ are replaced
# atomically. ``<parent>/.<name>.versions/<stamp>-<hex>/`` holds each version; ``<parent>/<name>``
# names the current one: a symlink on local disk, on object storage a small pointer object
# holding the version's path relative to ``<parent>``, written last with one PUT.
# ---------------------------------------------------------------------------------------------

_VERSION_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


def versions_dir(link: Location) -> Location:
    """Where the versions of ``link`` live."""
    return link.parent / f".{link.name}.versions"


def new_version(link: Location) -> Location:
    """A fresh version directory for ``link`` (not created): named by its UTC start time, so
    versions sort by age. The hex part starts with the microsecond (5 hex digits): versions
    started within one second sort in order too; 3 random digits keep two runs apart."""
    now = datetime.now(timezone.utc)
    return versions_dir(link) / f"{now:%Y%m%dT%H%M%SZ}-{now.microsecond:05x}{uuid.uuid4().hex[:3]}"


def version_time(version: Location) -> datetime | None:
    """When a version directory was started (from its name); None for a name not ours."""
    if not _VERSION_NAME.match(version.name):
        return None
    return datetime.strptime(version.name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


def current_version(link: Location) -> Location | None:
    """The version ``link`` points to: a symlink's target, or a pointer object's; None when
    ``link`` is neither (missing, or a plain directory)."""
    if link.is_local:
        if not os.path.islink(link.uri):
            return None
        return Location(os.path.realpath(link.uri))
    if not link.is_file():
        return None
    relative = link.read_text().strip()
    expected = f".{link.name}.versions/"
    if not relative.startswith(expected) or ".." in relative or "//" in relative:
        raise LocationError(f"{link}: not a version pointer (it holds {relative[:80]!r})")
    return link.parent / relative


def resolve(link: Location) -> Location:
    """What to read for ``link``: its current version, or ``link`` itself when it is a plain
    directory. Resolve once per read: every file must come from the same version."""
    return current_version(link) or link


def publish_version(link: Location, version: Location) -> None:
    """Make ``version`` the current version of ``link``, atomically for any reader.

    Local disk: a new symlink renamed over ``link``. Object storage: the pointer object written
    with one PUT. Whatever ``link`` was before (a plain directory, a Delta table of the other
    format) is deleted first: readers of that see it vanish, as with any format switch.
    """
    relative = version.relative_to(link.parent)
    if link.is_local:
        if os.path.lexists(link.uri) and not os.path.islink(link.uri):
            link.delete()
        temporary = link.parent / f".{link.name}.link-{uuid.uuid4().hex}"
        os.symlink(relative, temporary.uri)
        os.replace(temporary.uri, link.uri)
        return
    if link.is_dir():
        link.delete()
    link.write_text(relative + "\n")


def is_published(link: Location) -> bool:
    """True when ``link`` points to a version that exists."""
    version = current_version(link)
    return version is not None and version.is_dir()
