"""Kaggle credentials never leak, and the server exposes nothing it does not document.

A recognisable fake key (made fresh per run, so it is in no file of the repository) is handed to
the real download job through the environment or a kaggle.json; a fake Kaggle on 127.0.0.1
(reached as the HTTP proxy of the real ``kaggle`` client) accepts or refuses it. Whatever the
outcome, the key, the username:key pair and its Base64 form must not appear in stdout, stderr,
exception chains, or any file the job leaves behind. The Docker build contexts are computed with
the ``.dockerignore`` rules to show no credential file can reach an image; the git history is
searched for key-shaped strings; the server's routes are compared with its OpenAPI document on a
real gunicorn.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from serving.app import create_app
from stockvol.acquire import AcquireError, acquire
from stockvol.config import load_config
from tests.real_files import quirk_sample

ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD = ROOT / "jobs" / "download.py"
FIXTURE = quirk_sample()
GUNICORN = Path(sys.executable).parent / "gunicorn"
USER = "reliability-user"
# Fresh per run and never written to the repository: a hit anywhere is a leak from this run.
KEY = uuid.uuid4().hex
WRONG_KEY = uuid.uuid4().hex
TOKEN = "KGAT_" + uuid.uuid4().hex
SECRETS = {
    "key": KEY,
    "wrong key": WRONG_KEY,
    "token": TOKEN,
    "basic auth": base64.b64encode(f"{USER}:{KEY}".encode()).decode(),
    "wrong basic auth": base64.b64encode(f"{USER}:{WRONG_KEY}".encode()).decode(),
}
CREDENTIAL_FILES = (".env", ".env.local", "kaggle.json", "access_token", "credentials.json")
# Any mention of these in a Dockerfile instruction would bake or pass credentials at build time.
CREDENTIAL_WORDS = re.compile(r"KAGGLE_(KEY|USERNAME|API_TOKEN)|kaggle\.json|\.kaggle\b")


def leaks(text: str | bytes) -> list[str]:
    """Which secrets appear in ``text``: whole, or (keys and tokens) a 12-character piece."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    found = []
    for name, secret in SECRETS.items():
        # The Base64 forms share the encoded username prefix: only whole ones count.
        pieces = {secret[i : i + 12] for i in range(0, len(secret) - 11, 4)}
        if "basic" in name:
            pieces = set()
        if secret in text or any(piece in text for piece in pieces):
            found.append(name)
    return found


def leaks_in_tree(root: Path, skip: set[Path] = frozenset()) -> dict[str, list[str]]:
    """Every file under ``root`` (but ``skip``) that holds a secret."""
    hits = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path not in skip:
            found = leaks(path.read_bytes())
            if found:
                hits[str(path)] = found
    return hits


def test_the_leak_detector_finds_whole_and_partial_secrets() -> None:
    assert leaks(f"token={TOKEN}") == ["token"]
    assert leaks(f"...{KEY[3:17]}...".encode()) == ["key"]  # a 14-character piece
    assert leaks(f"Authorization: Basic {SECRETS['basic auth']}") == ["basic auth"]
    assert leaks("nothing to see") == []


# --- a fake Kaggle -------------------------------------------------------------------------------


def layout_zip() -> bytes:
    """The real fixture files laid out as the Kaggle archive is."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(FIXTURE.rglob("*.csv")):
            archive.write(path, str(path.relative_to(FIXTURE)))
    return buffer.getvalue()


@dataclass
class FakeKaggle:
    """Accepts Basic USER:KEY and answers ``status`` to the download; logs what it was sent."""

    status: int = 200
    port: int = 0
    seen_auth: list[str] = field(default_factory=list)

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """The job's environment: no real credentials or proxies; all HTTP goes to the fake."""
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
            KAGGLE_API_ENVIRONMENT="LOCALHOST",  # the client's own switch to http://localhost
            HTTP_PROXY=proxy,
            http_proxy=proxy,
            HTTPS_PROXY=proxy,
            https_proxy=proxy,
            **extra,
        )
        return env


@contextlib.contextmanager
def fake_kaggle(status: int = 200) -> Iterator[FakeKaggle]:
    fake = FakeKaggle(status)
    archive = layout_zip()
    good = "Basic " + SECRETS["basic auth"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def _handle(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization", "")
            fake.seen_auth.append(auth)
            path = urlsplit(self.path).path
            if path.endswith("/archive.zip"):
                return self._reply(200, archive, "application/zip")
            if auth != good:
                return self._reply(401, b'{"code": 401, "message": "Unauthenticated"}')
            if fake.status != 200:
                return self._reply(fake.status, b'{"code": %d}' % fake.status)
            self.send_response(302)
            self.send_header("Location", "http://localhost/storage/archive.zip")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None

        def _reply(self, status: int, data: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _handle

        def do_CONNECT(self) -> None:  # HTTPS to anywhere: refused, never tunnelled
            self._reply(502, b"no tunnels")

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


def write_kaggle_json(home: Path, key: str) -> Path:
    folder = home / ".kaggle"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kaggle.json"
    path.write_text(json.dumps({"username": USER, "key": key}))
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Scenario:
    """How the credentials are given and what the fake Kaggle answers."""

    where: str  # env | file | token | none
    key: str
    status: int
    exit_code: int
    says: str  # a phrase the job's message must contain


SCENARIOS = {
    "env-success": Scenario("env", KEY, 200, 0, "[download]"),
    "file-success": Scenario("file", KEY, 200, 0, "[download]"),
    "env-401": Scenario("env", WRONG_KEY, 200, 1, "HTTP 401"),
    "file-401": Scenario("file", WRONG_KEY, 200, 1, "HTTP 401"),
    "token-401": Scenario("token", TOKEN, 200, 1, "HTTP 401"),
    "env-403": Scenario("env", KEY, 403, 1, "HTTP 403"),
    "env-500": Scenario("env", KEY, 500, 1, "HTTP 500"),
    "missing": Scenario("none", "", 200, 1, "no Kaggle credentials found"),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_download_job_never_prints_or_stores_the_credentials(tmp_path: Path, name: str) -> None:
    scenario = SCENARIOS[name]
    home = tmp_path / "home"
    home.mkdir()
    data = tmp_path / "data"
    with fake_kaggle(scenario.status) as fake:
        extra: dict[str, str] = {}
        planted: set[Path] = set()
        if scenario.where == "env":
            extra = {"KAGGLE_USERNAME": USER, "KAGGLE_KEY": scenario.key}
        elif scenario.where == "token":
            extra = {"KAGGLE_API_TOKEN": scenario.key}
        elif scenario.where == "file":
            planted.add(write_kaggle_json(home, scenario.key))
        result = subprocess.run(
            [sys.executable, str(DOWNLOAD), "--source", "kaggle", "--data-dir", str(data)],
            env=fake.env(home, **extra),
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
        )
    output = result.stdout + result.stderr
    assert result.returncode == scenario.exit_code, output
    assert scenario.says in output, output
    if scenario.where != "none":
        assert fake.seen_auth, "the client never reached the fake Kaggle"
    assert "Traceback" not in output, output
    assert leaks(output) == [], output
    # Nothing the job wrote (the data, its marker, caches in HOME) holds a secret either.
    assert leaks_in_tree(tmp_path, skip=planted) == {}


def test_acquire_errors_carry_no_secret_in_their_whole_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that prints the full traceback of an AcquireError still shows no key."""
    home = tmp_path / "home"
    home.mkdir()
    with fake_kaggle() as fake:
        env = fake.env(home, KAGGLE_USERNAME=USER, KAGGLE_KEY=WRONG_KEY)
        for name in [n for n in os.environ if n not in env]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = load_config(data_dir=tmp_path / "data")
        with pytest.raises(AcquireError) as caught:
            acquire(config, source="kaggle")
    text = "".join(traceback.format_exception(caught.value))
    assert "HTTP 401" in str(caught.value)
    assert leaks(text) == [], text
    assert leaks(repr(caught.value.args)) == []


# --- images --------------------------------------------------------------------------------------


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line of a .dockerignore, as Docker reads them (last match wins)."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exclude, re.compile(_pattern_regex(pattern))))
    return rules


def _pattern_regex(pattern: str) -> str:
    """Go's filepath.Match syntax plus ``**`` (any number of directories), anchored."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out) + "$"


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """True when Docker leaves ``relative`` out of the build context.

    A pattern matches a path or any of its parent directories; the last matching line decides.
    """
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for exclude, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            verdict = exclude
    return verdict


def test_the_dockerignore_reader_follows_docker_rules(tmp_path: Path) -> None:
    ignore = tmp_path / ".dockerignore"
    ignore.write_text("# c\n.env\n**/kaggle.json\ndata\n**\n!serving/*.py\n")
    rules = dockerignore_rules(ignore)
    assert ignored("data/raw/x.csv", rules) and ignored("conf/kaggle.json", rules)
    assert not ignored("serving/app.py", rules)
    assert ignored("serving/sub/app.py", rules)  # * does not cross a directory
    ignore.write_text(".env\n")
    rules = dockerignore_rules(ignore)
    assert ignored(".env", rules) and not ignored("conf/.env", rules)  # .env is root-only


@dataclass(frozen=True)
class Image:
    dockerfile: Path
    ignore_file: Path


IMAGES = [
    Image(ROOT / "docker" / "Dockerfile", ROOT / ".dockerignore"),
    Image(ROOT / "serving" / "Dockerfile", ROOT / "serving" / "Dockerfile.dockerignore"),
]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [
        (line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1])
        for line in (raw.strip() for raw in joined.splitlines())
        if line and not line.startswith("#")
    ]


def copy_sources(dockerfile: Path) -> list[str]:
    """The build-context sources of every COPY/ADD (not those copied from another stage)."""
    sources = []
    for op, args in instructions(dockerfile):
        if op in ("COPY", "ADD"):
            words = args.split()
            if any(word.startswith("--from") for word in words):
                continue
            sources += [word for word in words[:-1] if not word.startswith("--")]
    return sources


def copied(relative: str, sources: list[str]) -> bool:
    """True when some COPY source is this file or a directory holding it."""
    for source in sources:
        regex = re.compile(_pattern_regex(os.path.normpath(source)))
        parts = relative.split("/")
        if any(regex.match("/".join(parts[: n + 1])) for n in range(len(parts))):
            return True
    return False


# Where a credential file could plausibly be dropped in a checkout: the root and every folder
# that some Dockerfile copies.
PLANTED = [
    f"{folder}{name}"
    for folder in ("", "conf/", "lib/", "lib/stockvol/", "jobs/", "docker/", "serving/")
    for name in CREDENTIAL_FILES
] + [".kaggle/kaggle.json", "data/raw/kaggle.json"]


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(IMAGES[0], id="docker/Dockerfile"),
        pytest.param(IMAGES[1], id="serving/Dockerfile"),
    ],
)
def test_no_credential_file_in_the_checkout_can_reach_an_image(image: Image) -> None:
    assert image.dockerfile.exists() and image.ignore_file.exists()
    rules = dockerignore_rules(image.ignore_file)
    sources = copy_sources(image.dockerfile)
    assert sources
    baked = [path for path in PLANTED if not ignored(path, rules) and copied(path, sources)]
    assert baked == [], f"{image.dockerfile} would copy {baked}"


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(IMAGES[0], id="docker/Dockerfile"),
        pytest.param(IMAGES[1], id="serving/Dockerfile"),
    ],
)
def test_no_credential_file_is_even_sent_to_the_builder(image: Image) -> None:
    rules = dockerignore_rules(image.ignore_file)
    assert [path for path in PLANTED if not ignored(path, rules)] == []


@pytest.mark.parametrize("image", IMAGES, ids=lambda i: str(i.dockerfile.relative_to(ROOT)))
def test_no_instruction_names_a_credential_and_the_image_runs_as_non_root(image: Image) -> None:
    steps = instructions(image.dockerfile)
    for op, args in steps:
        assert not CREDENTIAL_WORDS.search(args), (op, args)
    assert not [s for s in copy_sources(image.dockerfile) if Path(s).name.startswith(".env")]
    users = [args.split(":")[0].strip() for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("0", "root"), users


def test_compose_hands_credentials_to_the_pipeline_only_at_run_time() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    text = json.dumps(compose)
    for name, service in compose["services"].items():
        build = service.get("build") or {}
        assert "KAGGLE" not in json.dumps(build.get("args", {})).upper(), name
        environment = service.get("environment") or {}
        values = environment.items() if isinstance(environment, dict) else []
        assert not [k for k, v in values if "KAGGLE" in k.upper() and v], name
        env_files = [entry["path"] for entry in service.get("env_file", [])]
        if name != "pipeline":
            assert ".env" not in env_files, f"{name} gets the .env file"
    assert leaks(text) == []


# --- the repository ------------------------------------------------------------------------------

# Shapes of real credentials: a kaggle.json key, KAGGLE_KEY=<32 hex>, a KGAT_ access token.
KEY_SHAPES = re.compile(
    r"""("key"\s*:\s*"[0-9a-f]{32}")"""
    r"""|(KAGGLE_KEY\s*[=:]\s*["']?[0-9a-f]{32})"""
    r"""|(KGAT_[0-9A-Za-z]{16,})"""
)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    ).stdout


def test_no_credential_file_is_tracked() -> None:
    tracked = git("ls-files").splitlines()
    assert tracked
    names = {Path(path).name for path in tracked}
    assert names & set(CREDENTIAL_FILES) == set(), names & set(CREDENTIAL_FILES)


def git_ignores(path: str) -> bool:
    """``git check-ignore`` for a path that need not exist."""
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, timeout=60)
    assert result.returncode in (0, 1)
    return result.returncode == 0


def test_git_ignores_env_files_anywhere() -> None:
    assert [p for p in PLANTED if Path(p).name == ".env" and not git_ignores(p)] == []
    assert not git_ignores("conf/pipeline.yaml")  # the check can say no


def test_git_ignores_kaggle_credential_files_anywhere() -> None:
    assert [p for p in PLANTED if not git_ignores(p)] == []
    assert not git_ignores(".env.example")  # the documented template stays tracked


def test_no_key_shaped_string_in_any_commit_or_the_working_tree() -> None:
    history = git("log", "--all", "-p", "--no-color", "--no-ext-diff")
    assert "diff --git" in history
    hits = [m.group(0) for m in KEY_SHAPES.finditer(history)]
    assert hits == [], hits[:5]
    for path in git("ls-files").splitlines():
        file = ROOT / path
        if file.is_file():
            text = file.read_bytes().decode("utf-8", "replace")
            assert not KEY_SHAPES.search(text), path
    sample = f'{{"username": "x", "key": "{KEY}"}} KAGGLE_KEY={WRONG_KEY} {TOKEN}'
    assert len(KEY_SHAPES.findall(sample)) == 3  # the pattern does find real-looking keys


# --- the server's surface ------------------------------------------------------------------------


def documented_routes() -> set[tuple[str, str]]:
    document = json.loads((ROOT / "serving" / "openapi.json").read_text())
    return {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}


def test_the_app_registers_exactly_the_documented_routes(tmp_path: Path) -> None:
    app = create_app({"MODEL_DIR": str(tmp_path / "no-model")})
    routes = {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert routes == documented_routes()
    assert not app.debug and not app.testing
    # Flask adds /static/<path:filename> by default; it must have nothing to serve.
    static = [rule for rule in app.url_map.iter_rules() if rule.endpoint == "static"]
    assert not static or not Path(app.static_folder or "").exists()


@contextlib.contextmanager
def gunicorn_without_model(tmp_path: Path) -> Iterator[int]:
    """gunicorn on 127.0.0.1 (a free port) serving no model: every route exists, /predict 503s."""
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "MODEL_DIR": str(tmp_path / "no-model"),
        "HOST": "127.0.0.1",
        "PORT": "0",
        "WEB_CONCURRENCY": "1",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(GUNICORN), "-c", "serving/gunicorn.conf.py", "serving.wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while not (found := re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = int(found.group(1))
        while "Booting worker" not in log.read_text() or not _answers(port):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def status(port: int, method: str, target: str) -> int:
    """The status of one request. A connection the server drops or refuses raises: it is not an
    answer, and must not pass for one (a dead route is not "not 404")."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, target)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _answers(port: int) -> bool:
    try:
        return status(port, "GET", "/openapi.json") == 200
    except OSError:
        return False  # not listening yet


UNDOCUMENTED = [
    "/",
    "/static/openapi.json",
    "/console",
    "/admin",
    "/debug",
    "/metrics",
    "/docs",
    "/.env",
    "/kaggle.json",
    "/serving/openapi.json",
    "/predict/..%2F..%2Fetc%2Fpasswd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/model/../.env",
]


def documented_statuses(path: str, method: str) -> set[int]:
    document = json.loads((ROOT / "serving" / "openapi.json").read_text())
    return {int(code) for code in document["paths"][path][method.lower()]["responses"]}


def test_the_real_server_answers_only_documented_routes(tmp_path: Path) -> None:
    with gunicorn_without_model(tmp_path) as port:
        for path, method in sorted(documented_routes()):
            assert status(port, method, path) in documented_statuses(path, method), (method, path)
        for path in UNDOCUMENTED:
            assert status(port, "GET", path) == 404, path
        for path in sorted({p for p, _ in documented_routes()}):
            allowed = {m for p, m in documented_routes() if p == path}
            for other in sorted({"PUT", "DELETE", "PATCH", "POST", "GET"} - allowed):
                assert status(port, other, path) == 405, (other, path)
