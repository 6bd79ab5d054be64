"""Acquire the raw data: the Kaggle dataset, the real files shipped with the package, a local
archive or folder, or the generated sample.

Whatever the source, the result is ``DATA/raw/{stocks,etfs}/*.csv`` plus
``DATA/raw/symbols_valid_meta.csv``, exactly as the Kaggle archive holds them. Everything is
assembled in a staging directory next to ``DATA/raw`` and renamed into place at the end, so a
failure (or a kill) never leaves a half-written ``raw/``. No Spark here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from stockvol.config import Config
from stockvol.location import Location, new_version, publish_version, resolve
from stockvol.sample import ETFS, META_FILE, STOCKS, generate_sample
from stockvol.schema import CSV_COLUMNS, META_COLUMNS
from stockvol.summary import StageSummary

log = logging.getLogger("stockvol.acquire")

SOURCES = ("auto", "kaggle", "real", "sample")
# 52 real Kaggle files (35 stocks, 17 ETFs) and the full symbols_valid_meta.csv, byte for byte:
# the offline default. Their origin: SOURCES.md in that folder.
BUNDLED_DIR = Path(__file__).resolve().parent / "kaggle_sample"
MARKER_FILE = ".acquired.json"  # what was acquired, from where; dot-named so no glob sees it
STAGING_PREFIX = ".raw.partial-"  # the new raw/ being assembled
OLD_PREFIX = ".raw.old-"  # the previous raw/, set aside for the moment of the swap
KAGGLE_TOKEN_PAGE = "https://www.kaggle.com/settings (API -> Create New Token)"
_HEADER = ",".join(CSV_COLUMNS)


class AcquireError(RuntimeError):
    """A failure the user can fix; the message says how. Printed without a traceback."""


@dataclass(frozen=True)
class KaggleCredentials:
    """Where the official client will find credentials (a description, never the secret)."""

    where: str


def _kaggle_config_dir(env: Mapping[str, str], home: Path) -> Path:
    """The directory the kaggle client reads kaggle.json from (its own rule, restated)."""
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    legacy = home / ".kaggle"
    if legacy.exists():
        return legacy
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and bool(path.read_text().strip())
    except OSError:
        return False


def find_kaggle_credentials(
    env: Mapping[str, str] | None = None, home: Path | None = None
) -> KaggleCredentials | None:
    """Where Kaggle credentials are, as the official client looks for them; None if nowhere.

    Checked without importing ``kaggle`` (importing it authenticates, and older versions exit
    the process when that fails): an access token (KAGGLE_API_TOKEN, ~/.kaggle/access_token),
    an API key (KAGGLE_USERNAME + KAGGLE_KEY, or kaggle.json in KAGGLE_CONFIG_DIR or ~/.kaggle or
    ~/.config/kaggle, the two may be mixed), or OAuth credentials (~/.kaggle/credentials.json).
    """
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home()) if home is None else home
    if env.get("KAGGLE_API_TOKEN"):
        return KaggleCredentials("the KAGGLE_API_TOKEN environment variable")
    for name in ("access_token", "access_token.txt"):
        if _nonempty_file(home / ".kaggle" / name):
            return KaggleCredentials(str(home / ".kaggle" / name))
    config_file = _kaggle_config_dir(env, home) / "kaggle.json"
    from_file: dict[str, Any] = {}
    if config_file.is_file():
        try:
            loaded = json.loads(config_file.read_text() or "{}")
            from_file = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            log.warning("%s is not valid JSON; ignoring it", config_file)
    has_user = bool(env.get("KAGGLE_USERNAME") or from_file.get("username"))
    has_key = bool(env.get("KAGGLE_KEY") or from_file.get("key"))
    if has_user and has_key:
        parts = []
        if env.get("KAGGLE_USERNAME") or env.get("KAGGLE_KEY"):
            parts.append("the KAGGLE_USERNAME/KAGGLE_KEY environment variables")
        if from_file.get("username") or from_file.get("key"):
            parts.append(str(config_file))
        return KaggleCredentials(" and ".join(parts))
    if _nonempty_file(home / ".kaggle" / "credentials.json"):
        return KaggleCredentials(f"{home / '.kaggle' / 'credentials.json'} (kaggle auth login)")
    return None


def kaggle_howto(env: Mapping[str, str] | None = None, home: Path | None = None) -> str:
    """How to get the real data, naming the exact kaggle.json path this machine would read."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home()) if home is None else home
    config_file = _kaggle_config_dir(env, home) / "kaggle.json"
    return (
        f"create an API token at {KAGGLE_TOKEN_PAGE} and either save the downloaded kaggle.json "
        f"as {config_file} (chmod 600), or export KAGGLE_USERNAME and KAGGLE_KEY (or "
        "KAGGLE_API_TOKEN); or download the archive yourself and pass --source PATH/archive.zip"
    )


def missing_credentials_help(env: Mapping[str, str] | None = None, home: Path | None = None) -> str:
    """The error for --source kaggle without credentials: where to put them, and the fallbacks."""
    return (
        f"no Kaggle credentials found. To download the dataset, {kaggle_howto(env, home)}. "
        "Without Kaggle: --source real copies the 52 real Kaggle files shipped with the project; "
        "--source sample writes synthetic data in the same layout, at any size."
    )


# --------------------------------------------------------------------------------------------
# Staging: build the new raw/ beside the old one, check it, then swap it in.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_staging(data_dir: Path) -> None:
    """Remove staging or set-aside directories of a run that was killed (its process is gone)."""
    if not data_dir.is_dir():
        return
    for prefix in (STAGING_PREFIX, OLD_PREFIX):
        for path in data_dir.glob(f"{prefix}*"):
            pid = path.name[len(prefix) :].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                log.info("removing %s, left by an interrupted run", path)
                shutil.rmtree(path, ignore_errors=True)


def _find_layout_root(top: Path) -> Path | None:
    """The folder holding symbols_valid_meta.csv: ``top`` or one level below (a wrapped archive)."""
    if (top / META_FILE).is_file():
        return top
    candidates = [
        p.parent for p in top.glob(f"*/{META_FILE}") if not p.parent.name.startswith("__")
    ]
    return candidates[0] if len(candidates) == 1 else None


def check_layout(root: Path, source: str) -> dict[str, int]:
    """Raise AcquireError unless ``root`` holds the Kaggle layout; return file counts."""
    meta = root / META_FILE
    if not meta.is_file():
        raise AcquireError(
            f"{source} does not contain {META_FILE} (at its top level or in one folder): "
            "it is not the Kaggle stock-market-dataset layout (stocks/, etfs/, "
            f"{META_FILE})"
        )
    with meta.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline().strip().lstrip("\ufeff").split(",")
    missing = [c for c in META_COLUMNS if c not in header]
    if missing:
        raise AcquireError(f"{source}: {META_FILE} lacks the columns {', '.join(missing)}")
    counts = {}
    for folder in (STOCKS, ETFS):
        counts[folder] = len(list((root / folder).glob("*.csv"))) if (root / folder).is_dir() else 0
    if not counts[STOCKS] and not counts[ETFS]:
        raise AcquireError(f"{source} has {META_FILE} but no CSV files in stocks/ or etfs/")
    odd = []
    for folder in (STOCKS, ETFS):
        for csv in (root / folder).glob("*.csv") if (root / folder).is_dir() else ():
            with csv.open("rb") as handle:
                first = handle.readline().decode("utf-8", "replace").strip()
            if first != _HEADER:
                odd.append(f"{folder}/{csv.name}")
    if odd:
        # Not fatal: ingest reports such files; acquire only moves the dataset into place.
        log.warning(
            "%d file(s) do not start with the header %s, e.g. %s",
            len(odd),
            _HEADER,
            ", ".join(odd[:5]),
        )
    return counts


def _collect_layout(unpacked: Path, staging: Path, source: str) -> dict[str, int]:
    """Move the layout parts found under ``unpacked`` to the top of ``staging``; drop the rest."""
    root = _find_layout_root(unpacked)
    if root is None:
        check_layout(unpacked, source)  # raises, naming what is missing
        raise AcquireError(f"{source}: more than one folder holds {META_FILE}")
    counts = check_layout(root, source)
    for part in (STOCKS, ETFS, META_FILE):
        if (root / part).exists():
            os.replace(root / part, staging / part)
    shutil.rmtree(unpacked)
    return counts


def _tree_stats(root: Path, count_rows: bool = True) -> tuple[int, int, int]:
    """(CSV files, bytes, data rows) of the layout; rows are counted only if asked (reads all)."""
    files = total = rows = 0
    for folder in (STOCKS, ETFS):
        if not (root / folder).is_dir():
            continue
        for entry in os.scandir(root / folder):
            if entry.name.endswith(".csv"):
                files += 1
                total += entry.stat().st_size
                if count_rows:
                    with open(entry.path, "rb") as handle:
                        data = handle.read()
                    lines = data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))
                    rows += max(lines - 1, 0)
    return files, total + (root / META_FILE).stat().st_size, rows


# --------------------------------------------------------------------------------------------
# The sources.


def extract_archive(archive: Path, staging: Path) -> dict[str, int]:
    """Unpack a Kaggle-layout zip into ``staging``, verifying every member's CRC first."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            size = sum(m.file_size for m in members)
            log.info("unpacking %s: %d members, %.1f MB", archive, len(members), size / 1e6)
            unpacked = staging / ".unpack"
            # extractall drops absolute prefixes and '..' from member names, so nothing lands
            # outside staging; it checks each member's CRC as it reads.
            zf.extractall(unpacked)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise AcquireError(f"{archive} is not a valid zip archive or is corrupt ({err})") from err
    except (zipfile.LargeZipFile, NotImplementedError, OSError) as err:
        raise AcquireError(f"{archive} could not be unpacked: {err}") from err
    return _collect_layout(unpacked, staging, str(archive))


def copy_folder(folder: Path, staging: Path) -> dict[str, int]:
    """Copy an extracted dataset folder (stocks/, etfs/, symbols_valid_meta.csv) into staging."""
    root = _find_layout_root(folder)
    if root is None:
        check_layout(folder, str(folder))
        raise AcquireError(f"{folder}: more than one sub-folder holds {META_FILE}")
    counts = check_layout(root, str(folder))
    log.info("copying %s (%d stocks, %d etfs files)", root, counts[STOCKS], counts[ETFS])
    for part in (STOCKS, ETFS):
        if (root / part).is_dir():
            shutil.copytree(root / part, staging / part)
    shutil.copy2(root / META_FILE, staging / META_FILE)
    return counts


def download_kaggle(dataset: str, staging: Path, credentials: KaggleCredentials) -> dict[str, int]:
    """Download and unzip the dataset with the official client; its progress bar shows on stderr."""
    try:
        # Imported here, not at module level: importing kaggle authenticates, which can exit.
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as err:
        raise AcquireError(
            f"the kaggle client is not installed ({err}): pip install kaggle"
        ) from err
    except SystemExit as err:
        raise AcquireError(
            f"the kaggle client refused the credentials in {credentials.where}"
        ) from err
    unpacked = staging / ".unpack"
    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit as err:  # the client prints its own help and calls exit(1)
        raise AcquireError(
            f"Kaggle did not accept the credentials in {credentials.where}. "
            f"Create a new API token at {KAGGLE_TOKEN_PAGE} and replace them."
        ) from err
    except Exception as err:  # an access token is checked online: HTTP and network errors
        raise _kaggle_error(err, dataset, credentials) from err
    log.info("downloading %s from Kaggle (credentials from %s)", dataset, credentials.where)
    try:
        api.dataset_download_files(dataset, path=str(unpacked), force=True, quiet=False, unzip=True)
    except SystemExit as err:
        raise AcquireError(f"the kaggle client gave up downloading {dataset}") from err
    except Exception as err:  # the client raises requests, urllib3 and plain errors alike
        raise _kaggle_error(err, dataset, credentials) from err
    return _collect_layout(unpacked, staging, f"the Kaggle archive of {dataset}")


def _kaggle_error(err: Exception, dataset: str, credentials: KaggleCredentials) -> AcquireError:
    """Turn the client's exception into one message with the fix (never echoing a secret)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return AcquireError(
            f"Kaggle rejected the credentials in {credentials.where} (HTTP 401). They are wrong or "
            f"expired: create a new API token at {KAGGLE_TOKEN_PAGE} and replace them."
        )
    if status == 403:
        return AcquireError(
            f"Kaggle refused access to {dataset} (HTTP 403) with the credentials in "
            f"{credentials.where}: check them, and accept the dataset's terms at "
            f"https://www.kaggle.com/datasets/{dataset}"
        )
    if status == 404:
        return AcquireError(
            f"Kaggle has no dataset {dataset!r} (HTTP 404): check dataset.kaggle_id"
        )
    if status is not None:
        return AcquireError(f"Kaggle answered HTTP {status} for {dataset}; try again later")
    name = type(err).__name__
    if "Connection" in name or "Timeout" in name or "Resolution" in name:
        return AcquireError(
            f"could not reach Kaggle ({name}). Check the network, or use --source sample or "
            "--source PATH/archive.zip"
        )
    if isinstance(err, ValueError) and "zip" in str(err).lower():
        return AcquireError(
            f"the archive Kaggle sent for {dataset} is not a valid zip (a broken or interrupted "
            "download); nothing was changed, try again"
        )
    return AcquireError(f"downloading {dataset} from Kaggle failed: {name}: {err}")


# --------------------------------------------------------------------------------------------
# The step.


def resolve_source(source: str, credentials: KaggleCredentials | None) -> str:
    """``auto`` -> ``kaggle`` when credentials exist, else ``real``; others unchanged."""
    if source != "auto":
        return source
    return "kaggle" if credentials else "real"


def raw_present(raw_dir: Location | Path) -> bool:
    """True when raw/ (resolved) already holds the layout (so the step can skip)."""
    raw_dir = Location.parse(raw_dir)
    return (raw_dir / META_FILE).is_file() and any((raw_dir / f).is_dir() for f in (STOCKS, ETFS))


def read_marker(raw_dir: Location | Path) -> dict[str, Any]:
    """What the last acquire recorded in raw/, or {} (e.g. for a hand-copied raw/)."""
    try:
        return json.loads((Location.parse(raw_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def acquire(
    config: Config,
    source: str | None = None,
    force: bool = False,
    rows_multiplier: float = 1.0,
    workers: int | None = None,
    env: Mapping[str, str] | None = None,
) -> StageSummary:
    """Put the raw dataset in ``config.raw_dir`` from ``source`` (default: config.source)."""
    started = time.perf_counter()
    source = source or config.source
    raw_dir, data_dir = config.raw_dir, config.data_dir
    credentials = find_kaggle_credentials(env)
    chosen = resolve_source(source, credentials)
    if source == "auto":
        if credentials:
            log.info("source auto: Kaggle credentials found in %s -> Kaggle", credentials.where)
        else:
            log.info(
                "source auto: no Kaggle credentials found, so using the 52 real Kaggle files "
                "shipped with the project (%s), not the whole dataset. For all 8,049 files: %s",
                BUNDLED_DIR,
                kaggle_howto(env),
            )

    if chosen != "sample" and rows_multiplier != 1.0:
        log.warning("--rows-multiplier only shapes the generated sample; ignored for %s", chosen)

    if chosen not in SOURCES:
        path = Path(chosen).expanduser()
        if not path.exists():
            raise AcquireError(
                f"--source {chosen}: no such file or folder. Give a downloaded archive.zip, its "
                f"extracted folder, or one of {', '.join(SOURCES)}"
            )
        if not path.is_dir() and not zipfile.is_zipfile(path):
            raise AcquireError(f"{path} is neither a folder nor a zip archive")

    current = resolve(raw_dir) if raw_dir.exists() else None
    if current is not None and not force:
        if raw_present(current):
            marker = read_marker(current)
            if raw_dir.is_local:
                files, size, _ = _tree_stats(Path(current), count_rows=False)
            else:  # what acquire recorded: listing a bucket only to count is slow
                files, size = marker.get("files", 0), marker.get("bytes", 0)
            log.info(
                "%s already holds the dataset (%s, %d files, %.1f MB): skipping; "
                "--force replaces it",
                raw_dir,
                marker.get("description", "origin unrecorded"),
                files,
                size / 1e6,
            )
            return StageSummary(
                "download",
                0,
                0,
                seconds=time.perf_counter() - started,
                details={"skipped": True, "raw_dir": str(raw_dir), **marker},
            )
        raise AcquireError(
            f"{raw_dir} exists but does not hold the dataset (no {META_FILE} with stocks/ or "
            "etfs/). Move it away, or pass --force to replace it."
        )

    if chosen == "kaggle" and credentials is None:
        raise AcquireError(missing_credentials_help(env))

    if raw_dir.is_local:  # beside raw/, on the same file system, for the final rename
        data_dir.mkdir()
        _clean_stale_staging(Path(data_dir))
        staging = Path(data_dir, f"{STAGING_PREFIX}{os.getpid()}-{int(time.time())}")
        staging.mkdir()
    else:  # assembled on local disk (TMPDIR), then uploaded as a new version of raw/
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX))
    details: dict[str, Any] = {"source": chosen}
    try:
        if chosen == "sample":
            report = generate_sample(
                staging, config.sample_symbols, config.sample_seed, rows_multiplier, workers
            )
            report.dest = raw_dir  # where the files end up once staging is renamed
            for line in report.lines():
                log.info("%s", line)
            details.update(
                description=f"generated sample: {config.sample_symbols} symbols, "
                f"seed {config.sample_seed}, rows x{rows_multiplier:g}",
                symbols=config.sample_symbols,
                seed=config.sample_seed,
                rows_multiplier=rows_multiplier,
                rows=report.rows,
                quirks=sorted(report.quirks),
            )
        elif chosen == "kaggle":
            download_kaggle(config.kaggle_id, staging, credentials)  # type: ignore[arg-type]
            details.update(description=f"Kaggle {config.kaggle_id}", dataset=config.kaggle_id)
        elif chosen == "real":
            copy_folder(BUNDLED_DIR, staging)
            details.update(
                description=f"the real Kaggle files shipped with the project ({BUNDLED_DIR.name})",
                dataset=config.kaggle_id,
            )
        elif Path(chosen).expanduser().is_dir():
            copy_folder(Path(chosen).expanduser(), staging)
            details.update(description=f"copied from {Path(chosen).resolve()}")
        else:
            extract_archive(Path(chosen).expanduser(), staging)
            details.update(description=f"unpacked from {Path(chosen).resolve()}")
        files, size, rows = _tree_stats(staging, count_rows="rows" not in details)
        details.setdefault("rows", rows)
        details.update(files=files, bytes=size, acquired_at=datetime.now(timezone.utc).isoformat())
        (staging / MARKER_FILE).write_text(json.dumps(details, indent=2, sort_keys=True) + "\n")
        if raw_dir.is_local:
            _swap_into_place(staging, Path(raw_dir))
        else:
            _upload(staging, raw_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "%s: %s, %d files, %d rows, %.1f MB",
        raw_dir,
        details["description"],
        files,
        details["rows"],
        size / 1e6,
    )
    return StageSummary(
        "download", 0, details["rows"], seconds=time.perf_counter() - started, details=details
    )


def _upload(staging: Path, raw_dir: Location) -> None:
    """Copy the assembled folder to a new version of raw/ on object storage, then point raw/ at
    it: there is no rename there, so an interrupted upload leaves the previous raw/ current."""
    version = new_version(raw_dir)
    filesystem, inner = version.arrow
    log.info("uploading %s to %s", staging, version)
    pafs.copy_files(str(staging), inner, destination_filesystem=filesystem, use_threads=True)
    publish_version(raw_dir, version)


def _swap_into_place(staging: Path, raw_dir: Path) -> None:
    """Rename staging to raw/; an existing raw/ is moved aside first and deleted only after."""
    old = None
    if raw_dir.exists():
        old = raw_dir.with_name(f"{OLD_PREFIX}{os.getpid()}-{int(time.time())}")
        os.replace(raw_dir, old)
    try:
        os.replace(staging, raw_dir)
    except OSError:
        if old is not None:
            os.replace(old, raw_dir)  # put the previous data back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
