"""docker-compose.yaml, the Dockerfiles and the files around them, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema (check-jsonschema's
bundled copy, so no network) and every Dockerfile is linted with hadolint; each tool is also shown a
broken file, so a tool that silently passes everything would fail here. The remaining tests pin
down what the schema cannot: the services, their wiring, and that the images and the native
cluster test run the same scripts.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockvol.config import PROJECT_ROOT

BIN = Path(sys.executable).parent
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yaml"
SPARK_DOCKERFILE = PROJECT_ROOT / "docker" / "Dockerfile"
SERVER_DOCKERFILE = PROJECT_ROOT / "serving" / "Dockerfile"
DOCKERFILES = [SPARK_DOCKERFILE, SERVER_DOCKERFILE]  # every one is linted; a missing one fails
IMAGE_ROOT = "/opt/stockvol"  # where docker/Dockerfile puts the project
SPARK_SERVICES = ("spark-master", "spark-worker", "pipeline")


def tool(name: str) -> str:
    """A command-line tool installed in this venv (setup.cfg's dev extra)."""
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} is not installed: run `make setup`"
        return found
    return str(path)


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120)  # noqa: S603


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def pinned_version(package: str) -> str:
    parser = configparser.ConfigParser()
    parser.read(PROJECT_ROOT / "setup.cfg")
    for requirement in parser["options"]["install_requires"].split():
        name, _, version = requirement.partition("==")
        if name == package:
            return version
    raise AssertionError(f"{package} is not pinned in setup.cfg")


# --- the two linters, and proof that they can fail -----------------------------------------------


def test_compose_file_matches_the_compose_specification_schema() -> None:
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = COMPOSE_FILE.read_text().replace("depends_on:", "depends_onn:", 1)
    (tmp_path / "docker-compose.yaml").write_text(broken)
    result = run(
        tool("check-jsonschema"),
        "--builtin-schema",
        "vendor.compose-spec",
        str(tmp_path / "docker-compose.yaml"),
    )
    assert result.returncode != 0
    assert "depends_onn" in result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = run(tool("hadolint"), "--no-color", str(dockerfile))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_sloppy_dockerfile(tmp_path: Path) -> None:
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\n")
    result = run(tool("hadolint"), "--no-color", str(sloppy))
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


def test_every_dockerfile_in_the_project_is_linted() -> None:
    """The list above is every Dockerfile git tracks: a new one is not silently left unlinted."""
    tracked = subprocess.run(
        ["git", "ls-files", "*Dockerfile*"],  # noqa: S607
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found = {PROJECT_ROOT / path for path in tracked if not path.endswith(".dockerignore")}
    assert found == set(DOCKERFILES)
    assert all(path.is_file() for path in DOCKERFILES)


# --- the images ----------------------------------------------------------------------------------


def test_spark_image_is_the_official_apache_spark_of_the_pinned_pyspark_version() -> None:
    bases = [
        args.split()[0] for op, args in dockerfile_instructions(SPARK_DOCKERFILE) if op == "FROM"
    ]
    final_base = bases[-1]
    repository, _, tag = final_base.partition(":")
    assert repository == "apache/spark"
    assert tag.startswith(f"{pinned_version('pyspark')}-scala2.13-java17-"), final_base


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_image_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = [args for op, args in dockerfile_instructions(dockerfile) if op == "USER"]
    assert users, f"{dockerfile} never sets USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root"), users[-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_no_credentials_are_built_into_an_image(dockerfile: Path) -> None:
    for op, args in dockerfile_instructions(dockerfile):
        if op in ("ENV", "ARG", "COPY", "ADD"):
            assert "KAGGLE" not in args.upper(), (op, args)
            assert ".env" not in args.split() and "kaggle.json" not in args, (op, args)


def test_every_file_the_spark_image_copies_exists_and_is_in_the_build_context() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    }
    copies = [
        args.split()[:-1]
        for op, args in dockerfile_instructions(SPARK_DOCKERFILE)
        if op == "COPY" and not args.startswith("--from")
    ]
    sources = [source for sources in copies for source in sources if not source.startswith("--")]
    assert sources
    for source in sources:
        matches = list(PROJECT_ROOT.glob(source.rstrip("/")))
        assert matches, f"COPY {source}: nothing in the project matches"
        assert Path(source).parts[0].rstrip("/") not in ignored, f"{source} is in .dockerignore"


def test_dockerignore_keeps_secrets_the_venv_data_and_git_out_of_the_build_context() -> None:
    ignored = {line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()}
    assert {"**/.env", "**/.env.*", "**/kaggle.json", ".venv", "data", ".git"} <= ignored


def test_env_example_has_empty_kaggle_placeholders_and_env_is_never_committed() -> None:
    settings = dict(
        line.split("=", 1)
        for line in (PROJECT_ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert settings["KAGGLE_USERNAME"] == "" and settings["KAGGLE_KEY"] == ""
    assert ".env" in (PROJECT_ROOT / ".gitignore").read_text().split()


# --- the compose wiring --------------------------------------------------------------------------


def test_compose_has_the_four_services(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == {"spark-master", "spark-worker", "pipeline", "server"}


def test_spark_services_share_one_image_built_from_docker_dockerfile(compose: dict) -> None:
    specs = [services(compose)[name] for name in SPARK_SERVICES]
    assert len({spec["image"] for spec in specs}) == 1
    for spec in specs:
        assert spec["build"] == {"context": ".", "dockerfile": "docker/Dockerfile"}
    assert services(compose)["server"]["build"]["dockerfile"] == "serving/Dockerfile"


def test_worker_is_scalable(compose: dict[str, Any]) -> None:
    worker = services(compose)["spark-worker"]
    assert "container_name" not in worker
    assert "ports" not in worker  # a fixed host port would clash at --scale spark-worker=2
    assert "hostname" not in worker


def test_the_cluster_uses_the_standard_master_port(compose: dict[str, Any]) -> None:
    master = services(compose)["spark-master"]["environment"]
    assert master["SPARK_MASTER_HOST"] == "spark-master"
    assert master["SPARK_MASTER_PORT"] == "7077"
    for name in ("spark-worker", "pipeline"):
        assert services(compose)[name]["environment"]["SPARK_MASTER_URL"] == (
            "spark://spark-master:7077"
        )


def test_executors_and_driver_share_the_data_volume(compose: dict[str, Any]) -> None:
    assert "data" in compose["volumes"]
    assert services(compose)["spark-worker"]["volumes"] == ["data:/data"]
    assert services(compose)["pipeline"]["volumes"] == ["data:/data"]
    # The volume by default; a bucket (s3a://...) when .env sets STOCKVOL_DATA_DIR.
    assert services(compose)["pipeline"]["environment"]["STOCKVOL_DATA_DIR"] == (
        "${STOCKVOL_DATA_DIR:-/data}"
    )
    server = services(compose)["server"]
    assert server["volumes"] == ["data:/data:ro"]
    assert server["environment"]["MODEL_DIR"] == "${STOCKVOL_DATA_DIR:-/data}/model"


def test_start_order_follows_health_and_the_finished_pipeline(compose: dict[str, Any]) -> None:
    spec = services(compose)
    assert spec["spark-worker"]["depends_on"] == {"spark-master": {"condition": "service_healthy"}}
    assert spec["pipeline"]["depends_on"]["spark-worker"] == {"condition": "service_healthy"}
    assert spec["server"]["depends_on"] == {
        "pipeline": {"condition": "service_completed_successfully"}
    }
    assert spec["pipeline"]["restart"] == "no"


def test_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name in ("spark-master", "spark-worker", "server"):
        test = services(compose)[name]["healthcheck"]["test"]
        assert test[0] == "CMD", (name, test)
    assert "/health" in " ".join(services(compose)["server"]["healthcheck"]["test"])


def test_kaggle_credentials_go_to_the_pipeline_and_s3_ones_to_what_touches_the_data(
    compose: dict[str, Any],
) -> None:
    s3 = {"path": "s3.env", "required": False}
    expected = {
        "pipeline": [{"path": ".env", "required": False}, s3],
        "spark-worker": [s3],  # executors read and write the bucket
        "server": [s3],  # reads the model from it
        "spark-master": [],  # never touches the data
    }
    for name, spec in services(compose).items():
        environment = spec.get("environment", {})
        assert not any(key.startswith(("KAGGLE", "AWS")) for key in environment), name
        assert spec.get("env_file", []) == expected[name], name


def test_containers_run_the_scripts_the_native_cluster_test_runs(compose: dict[str, Any]) -> None:
    """The same docker/*.sh that stockvol.cluster and tests/test_cluster.py start natively."""
    cluster_source = (PROJECT_ROOT / "lib" / "stockvol" / "cluster.py").read_text()
    test_source = (PROJECT_ROOT / "tests" / "test_cluster.py").read_text()
    for name in SPARK_SERVICES:
        [command] = services(compose)[name]["command"]
        assert command.startswith(f"{IMAGE_ROOT}/docker/"), command
        script = PROJECT_ROOT / command.removeprefix(f"{IMAGE_ROOT}/")
        assert script.is_file() and script.stat().st_mode & 0o111, f"{script} is not executable"
        assert f'"{script.name}"' in cluster_source + test_source, f"natively nobody runs {script}"
    health = [
        " ".join(services(compose)[name]["healthcheck"]["test"][1:5])
        for name in ("spark-master", "spark-worker")
    ]
    assert health == ["python -m stockvol.cluster health"] * 2


# --- exposure ------------------------------------------------------------------------------------


def networks(spec: dict[str, Any]) -> set[str]:
    """The networks a service joins (Compose puts one that names none on "default")."""
    joined = spec.get("networks", ["default"])
    return set(joined if isinstance(joined, list) else joined.keys())


def test_the_master_ui_is_published_on_the_hosts_loopback_only(compose: dict[str, Any]) -> None:
    for name in SPARK_SERVICES:
        for port in services(compose)[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert services(compose)["spark-master"]["ports"]  # still reachable from the host itself


def test_the_public_server_shares_no_network_with_the_cluster(compose: dict[str, Any]) -> None:
    server = networks(services(compose)["server"])
    for name in SPARK_SERVICES:
        assert not server & networks(services(compose)[name]), name
    assert networks(services(compose)["spark-worker"]) == networks(
        services(compose)["spark-master"]
    )


def test_the_spark_daemons_start_with_the_ui_kill_links_off() -> None:
    """docker/common.sh sets the master's and workers' JVM options, in the images and natively."""
    result = subprocess.run(
        ["bash", "-c", 'source docker/common.sh && printf %s "$SPARK_DAEMON_JAVA_OPTS"'],  # noqa: S607
        cwd=PROJECT_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYSPARK_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-Dspark.ui.killEnabled=false" in result.stdout.split()


@pytest.mark.parametrize("script", sorted((PROJECT_ROOT / "docker").glob("*.sh")), ids=str)
def test_shell_scripts_parse(script: Path) -> None:
    result = run("bash", "-n", str(script))
    assert result.returncode == 0, result.stderr
