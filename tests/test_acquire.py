"""The acquire step: sources, skip/force, clear errors, nothing half-written.

The Kaggle download runs the real ``kaggle`` client in a subprocess (``jobs/download.py``) against
a fake Kaggle: a real ``http.server`` on 127.0.0.1. The client's API address is fixed per
environment (``KAGGLE_API_ENVIRONMENT=LOCALHOST`` -> http://localhost/api/v1/...), so the fake
is reached as an HTTP proxy (HTTP_PROXY), which the client's ``requests`` session honours; every
request the client makes arrives there and nothing else is faked.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import logging
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stockvol.acquire import (
    MARKER_FILE,
    AcquireError,
    acquire,
    find_kaggle_credentials,
)
from stockvol.config import Config, load_config
from stockvol.location import Location
from tests.real_files import REAL_DIR, quirk_sample

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "download.py"
REAL = quirk_sample()
USER, KEY = "alice", "k3y-that-must-never-be-printed"
DOWNLOAD_PATH = "/api/v1/datasets.DatasetApiService/DownloadDataset"


def layout_files(root: Path | Location) -> dict[str, bytes]:
    """The dataset's files under root (stocks/, etfs/, meta), relative path -> bytes."""
    root = Path(root)
    files = [*root.glob("stocks/*.csv"), *root.glob("etfs/*.csv"), root / "symbols_valid_meta.csv"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


def zip_layout(source: Path, prefix: str = "") -> bytes:
    """A zip of the real fixture files laid out as the Kaggle archive is (optionally wrapped)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel, data in layout_files(source).items():
            archive.writestr(prefix + rel, data)
    return buffer.getvalue()


def leftovers(data_dir: Path | Location) -> list[str]:
    """Staging or set-aside directories that a failed run must not leave behind."""
    data_dir = Path(data_dir)
    return sorted(p.name for p in data_dir.glob(".raw*")) if data_dir.exists() else []


@dataclass
class FakeKaggle:
    """What the fake serves, and the requests it saw."""

    archive: bytes
    status: int = 200
    requests: list[dict] = field(default_factory=list)
    port: int = 0

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """A subprocess environment: no real credentials or proxies, all HTTP to the fake."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith("KAGGLE")
            and not k.lower().endswith("_proxy")
            and k != "XDG_CONFIG_HOME"
        }
        proxy = f"http://127.0.0.1:{self.port}"
        env.update(
            HOME=str(home),
            KAGGLE_API_ENVIRONMENT="LOCALHOST",
            HTTP_PROXY=proxy,
            http_proxy=proxy,
            HTTPS_PROXY=proxy,  # anything aimed at the real Kaggle is caught here too
            https_proxy=proxy,
            **extra,
        )
        return env


@contextlib.contextmanager
def serve(fake: FakeKaggle) -> Iterator[FakeKaggle]:
    """A fake Kaggle on 127.0.0.1: POST DownloadDataset -> 302 -> the archive, as the real one."""
    expected_auth = "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def handle_one(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = urlsplit(self.path)
            fake.requests.append(
                {"method": self.command, "host": url.hostname, "path": url.path, "body": body}
            )
            if url.hostname != "localhost":
                return self.reply(502, b"fake Kaggle: unexpected host")
            if self.headers.get("Authorization") != expected_auth:
                return self.reply(
                    401,
                    json.dumps({"code": 401, "message": "Unauthenticated"}).encode(),
                    "application/json",
                )
            if url.path == DOWNLOAD_PATH and self.command == "POST":
                if fake.status != 200:
                    return self.reply(fake.status, b"{}", "application/json")
                self.send_response(302)
                self.send_header("Location", "http://localhost/storage/stock-market-dataset.zip")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if url.path == "/storage/stock-market-dataset.zip":
                return self.reply(200, fake.archive, "application/zip")
            return self.reply(404, b"{}", "application/json")

        def reply(self, status: int, data: bytes, kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = handle_one

        def do_CONNECT(self) -> None:  # an HTTPS request: never the fake's business
            fake.requests.append({"method": "CONNECT", "host": self.path, "path": "", "body": b""})
            self.reply(502, b"no tunnels here")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def kaggle() -> Iterator[FakeKaggle]:
    """The fake Kaggle serving a zip of the real fixture files."""
    with serve(FakeKaggle(archive=zip_layout(REAL))) as fake:
        yield fake


def clean_env(home: Path) -> dict[str, str]:
    """This environment minus anything that points the kaggle client at real credentials."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith("KAGGLE") and k != "XDG_CONFIG_HOME"
    }
    env["HOME"] = str(home)
    return env


def run_job(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(JOB), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty home directory: no ~/.kaggle of the machine's user can leak in."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, home: Path) -> dict[str, str]:
    """This process's environment without any Kaggle credentials, HOME pointing at ``home``."""
    for name in list(os.environ):
        if name.upper().startswith("KAGGLE") or name == "XDG_CONFIG_HOME":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    return dict(os.environ)


def sample_config(config: Config, symbols: int = 4) -> Config:
    return load_config(data_dir=Path(config.data_dir), sample_symbols=symbols, sample_seed=11)


# ---- Kaggle, through the official client -----------------------------------------------------


def test_kaggle_download_runs_the_official_client(
    kaggle: FakeKaggle, home: Path, tmp_path: Path
) -> None:
    env = kaggle.env(home, KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    result = run_job(env, "--source", "kaggle", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stdout + result.stderr
    raw = tmp_path / "data" / "raw"
    assert layout_files(raw) == layout_files(REAL)
    assert not (raw / ".unpack").exists() and not list(raw.glob("*.zip"))
    first = kaggle.requests[0]
    assert (first["method"], first["path"]) == ("POST", DOWNLOAD_PATH)
    assert json.loads(first["body"]) == {
        "ownerSlug": "jacksoncrow",
        "datasetSlug": "stock-market-dataset",
    }
    assert {r["host"] for r in kaggle.requests} == {"localhost"}
    assert "100%" in result.stderr  # the client's progress bar
    assert json.loads((raw / MARKER_FILE).read_text())["source"] == "kaggle"
    assert KEY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("credentials", "where"),
    [
        ({"KAGGLE_USERNAME": USER, "KAGGLE_KEY": "not-the-key"}, "KAGGLE_USERNAME/KAGGLE_KEY"),
        ({"KAGGLE_API_TOKEN": "not-the-key"}, "KAGGLE_API_TOKEN"),  # checked at authenticate()
    ],
    ids=["api-key", "access-token"],
)
def test_wrong_credentials_give_one_clear_error(
    kaggle: FakeKaggle, home: Path, tmp_path: Path, credentials: dict[str, str], where: str
) -> None:
    env = kaggle.env(home, **credentials)
    result = run_job(env, "--source", "kaggle", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    assert "rejected the credentials" in result.stdout and "HTTP 401" in result.stdout
    assert where in result.stdout and "kaggle.com/settings" in result.stdout
    assert kaggle.requests  # the client did ask the (fake) server
    assert "Traceback" not in result.stderr
    assert "not-the-key" not in result.stdout + result.stderr
    assert not (tmp_path / "data" / "raw").exists() and leftovers(tmp_path / "data") == []


def test_auto_uses_kaggle_when_kaggle_json_exists(
    kaggle: FakeKaggle, home: Path, tmp_path: Path
) -> None:
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    (home / ".kaggle" / "kaggle.json").chmod(0o600)
    result = run_job(kaggle.env(home), "--data-dir", str(tmp_path / "data"))  # source: auto
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"credentials found in {home}/.kaggle/kaggle.json -> Kaggle" in result.stdout
    assert layout_files(tmp_path / "data" / "raw") == layout_files(REAL)


def test_a_bad_archive_from_kaggle_changes_nothing(
    kaggle: FakeKaggle, home: Path, config: Config
) -> None:
    acquire(sample_config(config), source="sample")
    before = layout_files(config.raw_dir)
    kaggle.archive = b"<html>this is not a zip</html>"
    env = kaggle.env(home, KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    result = run_job(env, "--source", "kaggle", "--force", "--data-dir", str(config.data_dir))
    assert result.returncode == 1
    assert "not a valid zip" in result.stdout
    assert layout_files(config.raw_dir) == before
    assert leftovers(config.data_dir) == []


def test_kaggle_is_skipped_when_the_data_is_there_unless_forced(
    kaggle: FakeKaggle, home: Path, config: Config
) -> None:
    acquire(sample_config(config), source="sample")
    env = kaggle.env(home, KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    args = ("--source", "kaggle", "--data-dir", str(config.data_dir))
    skipped = run_job(env, *args)
    assert skipped.returncode == 0
    assert "skipping; --force replaces it" in skipped.stdout
    assert "generated sample: 4 symbols" in skipped.stdout  # says what is there
    assert kaggle.requests == []
    forced = run_job(env, *args, "--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert layout_files(config.raw_dir) == layout_files(REAL)
    assert leftovers(config.data_dir) == []


def test_missing_credentials_exit_non_zero_naming_where_to_put_them(
    home: Path, tmp_path: Path
) -> None:
    env = clean_env(home)
    result = run_job(env, "--source", "kaggle", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    message = result.stdout
    assert "no Kaggle credentials found" in message
    assert f"{home}/.config/kaggle/kaggle.json" in message  # the client's path when no ~/.kaggle
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in message and "--source sample" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "raw").exists()


# ---- credentials detection ---------------------------------------------------------------------


def test_credentials_are_found_where_the_client_looks(home: Path) -> None:
    assert find_kaggle_credentials({}, home) is None
    assert find_kaggle_credentials({"KAGGLE_USERNAME": USER}, home) is None  # no key
    found = find_kaggle_credentials({"KAGGLE_USERNAME": USER, "KAGGLE_KEY": KEY}, home)
    assert found is not None and "environment" in found.where
    assert find_kaggle_credentials({"KAGGLE_API_TOKEN": KEY}, home) is not None

    config_dir = home / "elsewhere"
    config_dir.mkdir()
    (config_dir / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    found = find_kaggle_credentials({"KAGGLE_CONFIG_DIR": str(config_dir)}, home)
    assert found is not None and found.where == str(config_dir / "kaggle.json")
    assert find_kaggle_credentials({}, home) is None  # only via KAGGLE_CONFIG_DIR

    xdg = home / ".config" / "kaggle"
    xdg.mkdir(parents=True)
    (xdg / "kaggle.json").write_text(json.dumps({"username": USER}))
    assert find_kaggle_credentials({}, home) is None  # a username alone is not enough
    found = find_kaggle_credentials({"KAGGLE_KEY": KEY}, home)  # the client merges both
    assert found is not None and str(xdg / "kaggle.json") in found.where

    (home / ".kaggle").mkdir()  # once ~/.kaggle exists the client ignores ~/.config/kaggle
    assert find_kaggle_credentials({"KAGGLE_KEY": KEY}, home) is None
    (home / ".kaggle" / "access_token").write_text(KEY)
    found = find_kaggle_credentials({}, home)
    assert found is not None and found.where.endswith("access_token")
    assert all(KEY not in str(c) for c in (found, found.where))


def test_kaggle_without_credentials_does_not_import_the_client(
    no_credentials: dict[str, str], config: Config
) -> None:
    code = (
        "import sys; from stockvol.acquire import acquire, AcquireError\n"
        "from stockvol.config import load_config\n"
        f"try: acquire(load_config(data_dir={str(config.data_dir)!r}), source='kaggle')\n"
        "except AcquireError: pass\n"
        "print('kaggle' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=no_credentials, capture_output=True, text=True
    )
    assert result.stdout.strip() == "False", result.stderr


# ---- the sample, archives and folders ----------------------------------------------------------


def test_auto_without_credentials_copies_the_real_files_and_says_so(
    no_credentials: dict[str, str], config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="stockvol"):
        summary = acquire(config, source="auto", env=no_credentials)
    assert "no Kaggle credentials found, so using the 52 real Kaggle files" in caplog.text
    assert "kaggle.json" in caplog.text  # and how to get the whole dataset
    assert summary.details["source"] == "real"
    # Byte for byte the files the package ships, and nothing else (SOURCES.md stays behind).
    assert layout_files(config.raw_dir) == layout_files(REAL_DIR)
    assert not (Path(config.raw_dir) / "SOURCES.md").exists()
    assert summary.details["files"] == 52  # CSV files
    assert summary.rows_out == 304_714  # data rows, as SOURCES.md counts them
    assert leftovers(config.data_dir) == []


def test_job_writes_the_sample_layout(tmp_path: Path, home: Path) -> None:
    env = clean_env(home)
    data = tmp_path / "x"
    args = ("--source", "sample", "--data-dir", str(data), "--symbols", "11", "--seed", "3")
    result = run_job(env, *args, "--rows-multiplier", "0.2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[download] rows_in=0 rows_out=" in result.stdout
    assert "quirk date_only_row: stocks/" in result.stdout
    assert (
        len(list((data / "raw").glob("stocks/*.csv")))
        + len(list((data / "raw").glob("etfs/*.csv")))
        == 12
    )  # 11 symbols, one of them in both folders
    bad = run_job(env, "--source", "sample", "--data-dir", str(data), "--symbols", "0")
    assert bad.returncode == 2 and "symbols must be at least 1" in bad.stdout


def test_archive_source(tmp_path: Path, config: Config) -> None:
    archive = tmp_path / "archive.zip"
    archive.write_bytes(zip_layout(REAL))
    summary = acquire(config, source=str(archive))
    assert layout_files(config.raw_dir) == layout_files(REAL)
    assert summary.details["files"] == len(layout_files(REAL)) - 1
    assert summary.rows_out == sum(
        len(data.splitlines()) - 1 for rel, data in layout_files(REAL).items() if "/" in rel
    )


def test_archive_wrapped_in_one_folder(tmp_path: Path, config: Config) -> None:
    archive = tmp_path / "download.zip"
    archive.write_bytes(zip_layout(REAL, prefix="stock-market-dataset/"))
    acquire(config, source=str(archive))
    assert layout_files(config.raw_dir) == layout_files(REAL)


def test_folder_source_copies_only_the_dataset(config: Config) -> None:
    acquire(config, source=str(REAL))
    assert layout_files(config.raw_dir) == layout_files(REAL)
    assert not (Path(config.raw_dir) / "SOURCES.md").exists()
    assert layout_files(REAL)  # the source is left as it was


def corrupt_zip(path: Path) -> None:
    """A zip whose first member's compressed bytes are damaged (its CRC check fails)."""
    data = bytearray(zip_layout(REAL))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        first = archive.infolist()[0]
    start = first.header_offset + 30 + len(first.filename) + len(first.extra)
    for i in range(start + 10, start + 60):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def no_meta_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("stocks/A.csv", ",".join(["Date", "Open"]) + "\n")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "neither a folder nor a zip"),
        (corrupt_zip, "corrupt"),
        (no_meta_zip, "does not contain symbols_valid_meta.csv"),
    ],
    ids=["not-a-zip", "bad-crc", "no-meta"],
)
def test_bad_archive_is_a_clear_error_and_loses_nothing(
    tmp_path: Path, config: Config, make, message: str
) -> None:
    acquire(sample_config(config), source="sample")
    before = layout_files(config.raw_dir)
    archive = tmp_path / "archive.zip"
    make(archive)
    with pytest.raises(AcquireError, match=message):
        acquire(config, source=str(archive), force=True)
    assert layout_files(config.raw_dir) == before
    assert leftovers(config.data_dir) == []


def test_missing_folder_is_a_clear_error(tmp_path: Path, config: Config) -> None:
    with pytest.raises(AcquireError, match="no such file or folder"):
        acquire(config, source=str(tmp_path / "nowhere"))
    assert not Path(config.raw_dir).exists()


def test_folder_without_the_layout_is_a_clear_error(tmp_path: Path, config: Config) -> None:
    (tmp_path / "wrong" / "stocks").mkdir(parents=True)
    with pytest.raises(AcquireError, match="does not contain symbols_valid_meta.csv"):
        acquire(config, source=str(tmp_path / "wrong"))
    assert not Path(config.raw_dir).exists() and leftovers(config.data_dir) == []


def test_force_replaces_and_skip_keeps(config: Config, caplog: pytest.LogCaptureFixture) -> None:
    acquire(sample_config(config, symbols=4), source="sample")
    first = layout_files(config.raw_dir)
    with caplog.at_level(logging.INFO, logger="stockvol"):
        skipped = acquire(sample_config(config, symbols=6), source="sample")
    assert skipped.details["skipped"] is True and "skipping" in caplog.text
    assert layout_files(config.raw_dir) == first
    acquire(sample_config(config, symbols=6), source="sample", force=True)
    assert len((Path(config.raw_dir) / "symbols_valid_meta.csv").read_text().splitlines()) == 7
    assert leftovers(config.data_dir) == []


def test_an_unrecognised_raw_dir_is_not_replaced_without_force(config: Config) -> None:
    Path(config.raw_dir).mkdir(parents=True)
    (Path(config.raw_dir) / "notes.txt").write_text("mine")
    with pytest.raises(AcquireError, match="--force"):
        acquire(sample_config(config), source="sample")
    assert (Path(config.raw_dir) / "notes.txt").read_text() == "mine"


def test_leftovers_of_a_killed_run_are_removed(config: Config) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    stale = Path(config.data_dir) / f".raw.partial-{int(dead.stdout)}-1"
    (stale / "stocks").mkdir(parents=True)
    acquire(sample_config(config), source="sample")
    assert not stale.exists()
    assert leftovers(config.data_dir) == []


def test_zip_members_cannot_escape_the_staging_dir(tmp_path: Path, config: Config) -> None:
    """A zip member named ../../evil.csv stays inside staging (and is then dropped)."""
    archive = tmp_path / "archive.zip"
    archive.write_bytes(zip_layout(REAL))
    with zipfile.ZipFile(archive, "a") as handle:
        handle.writestr("../../evil.csv", "x")
    acquire(config, source=str(archive))
    assert not (config.data_dir.parent / "evil.csv").exists()
    assert not (tmp_path / "evil.csv").exists()
    assert layout_files(config.raw_dir) == layout_files(REAL)
