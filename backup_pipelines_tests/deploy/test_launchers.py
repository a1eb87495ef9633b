"""The deployments beyond one machine in deploy/: the Docker run launcher (deploy/docker) and the
Kubernetes run launcher through the official Helm chart (deploy/k8s), with the backup tools' image
(deploy/Dockerfile).

Each instance config is loaded by Dagster itself with its launcher package installed (the `docker`
and `k8s` extras) on a real PostgreSQL as Dagster's storage, and must yield the launcher, the queue,
the per-database limits, the per-server pools and the storage that production has. Then a run is
launched through it: no container engine or cluster runs here, so a small HTTP server stands in
for the Docker Engine API / the Kubernetes API and records what the launcher sends, which is what
a real engine would start (image, command, secrets, volumes, network). Nothing is executed in a
container here; the README says what was and was not tried.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import jsonschema
import pytest
import yaml
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.definitions.run_request import InstigatorType
from dagster._core.instance.config import (
    get_default_tick_retention_settings,
    get_tick_retention_settings,
)
from dagster._core.launcher import LaunchRunContext
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.test_utils import create_run_for_test

from backup_pipelines.devtools.local_postgres import LocalCluster
from backup_pipelines.lib.run_coordinator import TargetTaggingRunCoordinator
from backup_pipelines_tests.conftest import DB_PASSWORD, REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
FIXTURES = Path(__file__).parent / "fixtures"
IMAGE = "registry.example.com/backup-pipelines:0.1.0"
TARGET_TAG_LIMIT = {
    "key": "backup_pipelines/target",
    "value": {"applyLimitPerUniqueValue": True},
    "limit": 1,
}
POSTGRES_STORAGE = {
    "run_storage": "PostgresRunStorage",
    "event_log_storage": "PostgresEventLogStorage",
    "schedule_storage": "PostgresScheduleStorage",
}

Route = Callable[[str, str, Any], tuple[int, Any]]


class _RecordingApi(ThreadingHTTPServer):
    """An HTTP API stand-in: answers from `route` and keeps every request it got."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.requests: list[tuple[str, str, Any]] = []
        super().__init__(("127.0.0.1", 0), _RecordingHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RecordingHandler(BaseHTTPRequestHandler):
    server: _RecordingApi

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.server.requests.append((self.command, self.path, body))
        status, payload = self.server.route(self.command, self.path, body)
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recording_api() -> Iterator[Callable[[Route], _RecordingApi]]:
    servers: list[_RecordingApi] = []

    def start(route: Route) -> _RecordingApi:
        server = _RecordingApi(route)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def dagster_db(pg: LocalCluster) -> Iterator[str]:
    """A database of its own on the real cluster, as Dagster's storage."""
    name = f"dagster_launchers_{os.getpid()}_{secrets.token_hex(3)}"
    pg.psql(f'CREATE DATABASE "{name}"')
    yield name
    pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', check=False)


def _load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _home_with(tmp_path: Path, settings: dict[str, Any]) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings))
    return home


def _backup_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    """A queued backup run as the code server would create it: the code location's image is set."""
    origin = JobPythonOrigin(
        "logical_backups",
        RepositoryPythonOrigin(
            executable_path="/opt/backup_pipelines/.venv/bin/python",
            code_pointer=ModuleCodePointer("backup_pipelines.definitions", "defs"),
            container_image=IMAGE,
            # What `dagster code-server start` reports (its default entry point).
            entry_point=["dagster"],
        ),
    )
    return create_run_for_test(
        instance,
        job_name="logical_backups",
        job_code_origin=origin,
        tags={"backup_pipelines/target": "app", "backup_pipelines/db_host": "db1.internal:5432"},
    )


def _assert_production_limits(instance: dg.DagsterInstance, max_runs: int) -> None:
    """The queue, the per-database limit and the per-server pools of the production instance."""
    # Dagster's queue, tagging each submitted run with its target.
    assert isinstance(instance.run_coordinator, TargetTaggingRunCoordinator)
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    concurrency = instance.get_concurrency_config()
    runs = concurrency.run_queue_config
    assert runs is not None and runs.max_concurrent_runs == max_runs
    assert TARGET_TAG_LIMIT in [dict(limit) for limit in runs.tag_concurrency_limits]
    production = _load_yaml(DEPLOY / "dagster.production.yaml")["concurrency"]
    assert concurrency.pool_config.default_pool_limit == production["pools"]["default_limit"]
    assert concurrency.pool_config.pool_granularity.value == production["pools"]["granularity"]
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_max_runtime_seconds == 43200
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
    assert instance.run_retries_retry_on_asset_or_op_failure is False


def _assert_postgres_storage(
    instance: dg.DagsterInstance, dagster_db: str, pg: LocalCluster
) -> None:
    for attribute, cls in POSTGRES_STORAGE.items():
        assert type(getattr(instance, attribute)).__name__ == cls
    # Really there: the schema was created in the test database, and a run can be stored.
    run = create_run_for_test(instance, job_name="storage_probe")
    stored = pg.psql(
        f"SELECT pipeline_name FROM runs WHERE run_id = '{run.run_id}'", dbname=dagster_db
    )
    assert stored == "storage_probe"


# --- Docker ------------------------------------------------------------------------------------


def _docker_engine(command: str, path: str, body: Any) -> tuple[int, Any]:
    path = re.sub(r"^/v[0-9.]+", "", path.split("?", 1)[0])
    if command == "GET" and path == "/version":
        return 200, {"ApiVersion": "1.45", "Version": "26.1.0", "MinAPIVersion": "1.24"}
    if command == "POST" and path == "/containers/create":
        return 201, {"Id": "c0ffee", "Warnings": []}
    if command == "GET" and path == "/containers/c0ffee/json":
        return 200, {"Id": "c0ffee", "Name": "/run", "State": {"Status": "created"}}
    if command == "POST" and path == "/containers/c0ffee/start":
        return 204, None
    return 404, {"message": f"no route for {command} {path}"}


def test_docker_instance_launches_each_run_in_a_container_of_the_image(
    pg: LocalCluster,
    dagster_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recording_api: Callable[[Route], _RecordingApi],
) -> None:
    from dagster_docker import DockerRunLauncher

    engine = recording_api(_docker_engine)
    settings = _load_yaml(DEPLOY / "docker" / "dagster.yaml")
    env = {
        "DAGSTER_PG_HOST": "127.0.0.1",
        "DAGSTER_PG_PORT": str(pg.port),
        "DAGSTER_PG_DB": dagster_db,
        "DAGSTER_PG_USER": "postgres",
        "DAGSTER_PG_PASSWORD": DB_PASSWORD,
        "BACKUP_PIPELINES_IMAGE": IMAGE,
        "DATABASE_URL_PRODUCTION": "postgresql://backup@db1.internal:5432/shiftmanager",
        "DATABASE_URL_STAGING": "postgresql://backup@db2.internal:5432/shiftmanager_staging",
        "DOCKER_HOST": engine.url.replace("http://", "tcp://"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DOCKER_TLS_VERIFY", raising=False)
    monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
    # The compose file mounts the compute-log volume there; here a temporary folder stands in.
    assert settings["compute_logs"]["config"]["base_dir"] == "/opt/dagster/compute_logs"
    settings["compute_logs"]["config"]["base_dir"] = str(tmp_path / "compute_logs")

    with dg.DagsterInstance.from_config(str(_home_with(tmp_path, settings))) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        assert launcher.image == IMAGE
        assert launcher.networks == ["backup_pipelines"]
        assert {"DAGSTER_PG_HOST", "DAGSTER_PG_PASSWORD"} <= set(launcher.env_vars)
        _assert_production_limits(instance, max_runs=8)
        _assert_postgres_storage(instance, dagster_db, pg)

        run = _backup_run(instance)
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))

        creates = [
            body
            for cmd, path, body in engine.requests
            if path.split("?")[0].endswith("/containers/create")
        ]
        assert len(creates) == 1
        container = creates[0]
        assert container["Image"] == IMAGE
        assert container["Cmd"][:3] == ["dagster", "api", "execute_run"]
        # The instance travels in the command with its settings, the password only by name.
        assert "DAGSTER_PG_PASSWORD" in container["Cmd"][3]
        assert DB_PASSWORD not in json.dumps(container["Cmd"])
        assert container["Labels"]["dagster/run_id"] == run.run_id
        assert container["HostConfig"]["NetworkMode"] == "backup_pipelines"
        binds = set(container["HostConfig"]["Binds"])
        assert "backup_pipelines_backups:/backups:rw" in binds
        assert "backup_pipelines_compute_logs:/opt/dagster/compute_logs:rw" in binds
        assert (
            "/etc/backup-pipelines/backup_targets.yaml:/etc/backup-pipelines/backup_targets.yaml:ro"
            in binds
        )
        # The run container reaches Dagster's database and the backed-up databases with the
        # daemon's values, named in dagster.yaml (never written there).
        environment = dict(item.split("=", 1) for item in container["Env"])
        assert environment["DAGSTER_PG_PASSWORD"] == DB_PASSWORD
        assert environment["DATABASE_URL_PRODUCTION"] == env["DATABASE_URL_PRODUCTION"]
        assert ("POST", "/v1.45/containers/c0ffee/start", None) in engine.requests
        tags = instance.get_run_by_id(run.run_id).tags
        assert tags["docker/container_id"] == "c0ffee"
        assert tags["dagster/image"] == IMAGE
    assert DB_PASSWORD not in (DEPLOY / "docker" / "dagster.yaml").read_text()


def test_docker_compose_wires_the_same_names_as_the_instance() -> None:
    compose = _load_yaml(DEPLOY / "docker" / "docker-compose.yaml")
    settings = _load_yaml(DEPLOY / "docker" / "dagster.yaml")
    workspace = _load_yaml(DEPLOY / "docker" / "workspace.yaml")
    launcher = settings["run_launcher"]["config"]

    assert compose["networks"]["backup_pipelines"]["name"] == launcher["network"]
    volume_names = {volume["name"] for volume in compose["volumes"].values()}
    named = {source for source in launcher["container_kwargs"]["volumes"] if "/" not in source}
    assert named <= volume_names, "run containers must mount the volumes compose creates"

    services = compose["services"]
    code_server = workspace["load_from"][0]["grpc_server"]
    assert code_server["host"] in services
    code = services[code_server["host"]]
    assert code["healthcheck"]["test"][-1] == str(code_server["port"])
    assert "DAGSTER_CURRENT_IMAGE" in code["environment"]
    assert "backups:/backups" in code["volumes"]
    for name in ("webserver", "daemon"):
        mounts = services[name]["volumes"]
        assert "./dagster.yaml:/opt/dagster/dagster_home/dagster.yaml:ro" in mounts
        assert "./workspace.yaml:/etc/dagster/workspace.yaml:ro" in mounts
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["daemon"]["volumes"]
    assert "compute_logs:/opt/dagster/compute_logs" in services["webserver"]["volumes"]
    # No password in the compose file: Dagster's database reads it from a secret file.
    assert services["dagster-db"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith(
        "/run/secrets/"
    )
    assert "POSTGRES_PASSWORD" not in services["dagster-db"]["environment"]


# --- Kubernetes --------------------------------------------------------------------------------


def _kubernetes_api(command: str, path: str, body: Any) -> tuple[int, Any]:
    if command == "POST" and re.fullmatch(r"/apis/batch/v1/namespaces/[^/]+/jobs", path):
        return 201, body
    return 404, {"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound"}


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    """The chart runs the launcher in-cluster; outside a cluster it needs a kubeconfig instead."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": server}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    return path


def _point_storage_at(settings: dict[str, Any], pg: LocalCluster, database: str) -> None:
    """The rendered file names the production database host; the test uses its own cluster."""
    for key in POSTGRES_STORAGE:
        db = settings[key]["config"]["postgres_db"]
        assert db["password"] == {"env": "DAGSTER_PG_PASSWORD"}
        db.update(hostname="127.0.0.1", port=pg.port, db_name=database, username="postgres")


def test_k8s_instance_launches_each_run_as_a_job_of_the_image(
    pg: LocalCluster,
    dagster_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    recording_api: Callable[[Route], _RecordingApi],
) -> None:
    from dagster_k8s import K8sRunLauncher

    api = recording_api(_kubernetes_api)
    settings = _load_yaml(DEPLOY / "k8s" / "dagster.yaml")
    _point_storage_at(settings, pg, dagster_db)
    launcher_config = settings["run_launcher"]["config"]
    assert launcher_config["load_incluster_config"] is True
    launcher_config.update(
        load_incluster_config=False, kubeconfig_file=str(_kubeconfig(tmp_path, api.url))
    )
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", DB_PASSWORD)

    with dg.DagsterInstance.from_config(str(_home_with(tmp_path, settings))) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, K8sRunLauncher)
        assert launcher.job_image == IMAGE
        assert launcher.job_namespace == "dagster"
        assert launcher.env_secrets == ["backup-pipelines-env"]
        assert launcher.postgres_password_secret == "dagster-postgresql-secret"
        _assert_production_limits(instance, max_runs=20)
        _assert_postgres_storage(instance, dagster_db, pg)

        run = _backup_run(instance)
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))

        posts = [(path, body) for cmd, path, body in api.requests if cmd == "POST"]
        assert len(posts) == 1
        path, job = posts[0]
        assert path == "/apis/batch/v1/namespaces/dagster/jobs"
        assert job["metadata"]["labels"]["dagster/run-id"] == run.run_id
        assert job["spec"]["ttlSecondsAfterFinished"] == 86400
        pod = job["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "dagster"
        assert pod["securityContext"] == {
            "fsGroup": 10001,
            "runAsGroup": 10001,
            "runAsNonRoot": True,
            "runAsUser": 10001,
        }
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert (
            volumes["backups"]["persistentVolumeClaim"]["claimName"] == "backup-pipelines-backups"
        )
        assert volumes["targets"]["configMap"]["name"] == "backup-pipelines-targets"
        assert volumes["keys"]["secret"]["defaultMode"] == 0o440
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        assert container["args"][:3] == ["dagster", "api", "execute_run"]
        assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]} == {
            "/backups": "backups",
            "/etc/backup-pipelines": "targets",
            "/etc/backup-pipelines-keys": "keys",
        }
        # Secrets reach the pod by reference to Kubernetes Secrets, never as values.
        assert {"secretRef": {"name": "backup-pipelines-env"}} in container["envFrom"]
        env = {item["name"]: item for item in container["env"]}
        assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "dagster-postgresql-secret",
            "key": "postgresql-password",
        }
        assert DB_PASSWORD not in json.dumps(job)
        assert container["resources"]["requests"]["cpu"] == "1"
        assert "cpu" not in container["resources"]["limits"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def _k8s_values() -> dict[str, Any]:
    return _load_yaml(DEPLOY / "k8s" / "values.yaml")


def test_k8s_rendered_instance_matches_the_helm_values() -> None:
    """deploy/k8s/dagster.yaml is what the chart's templates make of values.yaml: the same image,
    secrets, volumes, storage, limits and pools (templates/helpers/instance/*.tpl)."""
    values = _k8s_values()
    rendered = _load_yaml(DEPLOY / "k8s" / "dagster.yaml")

    pg_values = values["postgresql"]
    expected_db = {
        "username": pg_values["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg_values["postgresqlHost"],
        "db_name": pg_values["postgresqlDatabase"],
        "port": pg_values["service"]["port"],
        "params": pg_values["postgresqlParams"],
        "scheme": pg_values["postgresqlScheme"],
    }
    for key in POSTGRES_STORAGE:
        assert rendered[key]["config"]["postgres_db"] == expected_db

    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher = rendered["run_launcher"]["config"]
    image = k8s["image"]
    assert launcher["job_image"] == f"{image['repository']}:{image['tag']}"
    assert launcher["job_namespace"] == k8s["jobNamespace"]
    assert launcher["load_incluster_config"] == k8s["loadInclusterConfig"]
    assert launcher["image_pull_policy"] == k8s["imagePullPolicy"]
    assert launcher["dagster_home"] == values["global"]["dagsterHome"]
    assert launcher["postgres_password_secret"] == values["global"]["postgresqlSecretName"]
    assert launcher["env_secrets"] == [secret["name"] for secret in k8s["envSecrets"]]
    assert launcher["volume_mounts"] == k8s["volumeMounts"]
    assert launcher["volumes"] == k8s["volumes"]
    assert launcher["resources"] == k8s["resources"]
    assert launcher["security_context"] == k8s["securityContext"]
    assert launcher["run_k8s_config"] == {
        "pod_spec_config": k8s["runK8sConfig"]["podSpecConfig"],
        "job_spec_config": k8s["runK8sConfig"]["jobSpecConfig"],
    }

    # The user code deployment runs the same image, with the same secrets and volumes.
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["image"] == image
    assert deployment["codeServerArgs"] == ["-m", "backup_pipelines.definitions"]
    assert deployment["envSecrets"] == k8s["envSecrets"]
    assert deployment["volumes"] == k8s["volumes"]
    assert deployment["volumeMounts"] == k8s["volumeMounts"]

    concurrency = values["concurrency"]
    assert concurrency["enabled"] is True
    assert rendered["concurrency"] == {
        "pools": {
            "default_limit": concurrency["pools"]["defaultLimit"],
            "granularity": concurrency["pools"]["granularity"],
        },
        "runs": {
            "max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
            "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"],
        },
    }
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "CustomRunCoordinator"
    custom = coordinator["config"]["customRunCoordinator"]
    assert rendered["run_coordinator"] == custom
    assert custom["module"] == TargetTaggingRunCoordinator.__module__
    assert custom["class"] == TargetTaggingRunCoordinator.__name__
    assert set(custom["config"]) == {"dequeue_use_threads", "dequeue_num_workers"}
    # The webserver and the daemon import that coordinator: they run the project's image.
    assert values["dagsterWebserver"]["image"] == image
    assert values["dagsterDaemon"]["image"] == image
    retention = values["retention"]
    assert rendered["retention"] == {
        "schedule": {"purge_after_days": retention["schedule"]["purgeAfterDays"]},
        "sensor": {"purge_after_days": retention["sensor"]["purgeAfterDays"]},
    }
    for key, value in values["additionalInstanceConfig"].items():
        assert rendered[key] == value
    # Same rules as production where the deployments share them.
    production = _load_yaml(DEPLOY / "dagster.production.yaml")
    assert rendered["run_monitoring"] == production["run_monitoring"]
    assert rendered["run_retries"] == production["run_retries"]
    for kind in (InstigatorType.SCHEDULE, InstigatorType.SENSOR):
        key = kind.value.lower()
        defaults = get_default_tick_retention_settings(kind)
        assert get_tick_retention_settings(
            rendered["retention"][key], defaults
        ) == get_tick_retention_settings(production["retention"][key], defaults)
    assert rendered["concurrency"]["pools"] == production["concurrency"]["pools"]
    assert (
        rendered["concurrency"]["runs"]["tag_concurrency_limits"]
        == production["concurrency"]["runs"]["tag_concurrency_limits"]
    )


def test_k8s_values_fit_the_chart_schema() -> None:
    """The keys used from the chart exist there with these types (fixture: the chart's schema
    models for those keys; see its $comment for the source)."""
    schema = json.loads((FIXTURES / "dagster_chart_values_subset.schema.json").read_text())
    jsonschema.validate(_k8s_values(), schema)
    # And the fixture does catch a wrong key.
    broken = _k8s_values()
    broken["runLauncher"]["config"]["k8sRunLauncher"]["envSecret"] = [{"name": "x"}]
    with pytest.raises(jsonschema.ValidationError, match="envSecret"):
        jsonschema.validate(broken, schema)


_SECRET_WORDS = re.compile(r"pass(word|phrase)?|secret|token|credential|private|api_?key", re.I)
# Keys whose value names a Kubernetes Secret (a reference, not a secret).
_SECRET_REFERENCES = {"postgresqlSecretName", "secretName", "name"}


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")
    else:
        yield path, node


def _inline_secrets(values: dict[str, Any]) -> list[str]:
    """Paths in Helm values that hold what looks like a secret value instead of a reference."""
    found = []
    for path, leaf in _walk(values):
        key = re.sub(r"\[\d+\]", "", path).rsplit(".", 1)[-1]
        holds_value = leaf not in ("", None) and not isinstance(leaf, bool)
        if _SECRET_WORDS.search(key) and key not in _SECRET_REFERENCES and holds_value:
            found.append(path)
        if not isinstance(leaf, str):
            continue
        if re.search(r"://[^/@\s]+:[^/@\s]+@", leaf):
            found.append(f"{path} (credentials in a URL)")
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.+)", leaf)
        if assignment and _SECRET_WORDS.search(assignment.group(1)):
            found.append(f"{path} (inline {assignment.group(1)})")
    return sorted(set(found))


def test_k8s_values_reference_secrets_and_hold_none() -> None:
    values = _k8s_values()
    assert _inline_secrets(values) == []
    assert values["generatePostgresqlPasswordSecret"] is False, "the chart would write a Secret"
    assert "postgresqlPassword" not in values["postgresql"]
    # Environment reaches the pods only from Secrets (envFrom), never as inline env values.
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert k8s["envVars"] == [] and k8s["envSecrets"] == [{"name": "backup-pipelines-env"}]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert "env" not in deployment
    # The check itself notices the ways a secret slips in.
    values["postgresql"]["postgresqlPassword"] = "hunter2"
    deployment["env"] = [{"name": "DATABASE_URL_APP", "value": "postgresql://u:hunter2@db/app"}]
    k8s["envVars"] = ["SMTP_PASSWORD=hunter2"]
    assert _inline_secrets(values) == [
        "dagster-user-deployments.deployments[0].env[0].value (credentials in a URL)",
        "postgresql.postgresqlPassword",
        "runLauncher.config.k8sRunLauncher.envVars[0] (inline SMTP_PASSWORD)",
    ]


# --- The image ---------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def test_dockerfile_has_every_postgres_client_gnupg_zstd_and_the_locked_project() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile")
    base = next(args for instruction, args in instructions if instruction == "FROM")
    assert re.fullmatch(r"python:3\.11-slim-bookworm", base), base
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    packages = " ".join(runs)
    for major in range(13, 18):
        # Clients for dumps and restores; the server package for PITR drills (pg_ctl) and
        # pg_verifybackup's WAL check (pg_waldump).
        assert f"postgresql-client-{major} postgresql-{major}" in packages
    # ... without a cluster of their own in the image.
    assert 'grep -qx "create_main_cluster = false"' in packages
    for package in ("gnupg", "zstd", "tini"):
        assert re.search(rf"apt-get install [^;&]*\b{package}\b", packages), package
    assert "apt.postgresql.org/pub/repos/apt bookworm-pgdg main" in packages
    # Every sync is frozen: the image gets exactly the versions in uv.lock, with both launchers.
    syncs = [cmd for cmd in re.findall(r"uv sync[^;&]*", packages)]
    assert syncs and all("--frozen" in cmd for cmd in syncs)
    assert all("--extra docker" in cmd and "--extra k8s" in cmd for cmd in syncs)
    # Not root, DAGSTER_HOME set, the code server by default, tini in front of any command.
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    envs = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in envs
    values = _k8s_values()
    assert values["global"]["dagsterHome"] == "/opt/dagster/dagster_home"
    entrypoint = json.loads(next(a for i, a in instructions if i == "ENTRYPOINT"))
    command = json.loads(next(a for i, a in instructions if i == "CMD"))
    assert entrypoint == ["/usr/bin/tini", "--"]
    assert command[:3] == ["dagster", "code-server", "start"]
    assert command[-2:] == ["-m", "backup_pipelines.definitions"]
    port = values["dagster-user-deployments"]["deployments"][0]["port"]
    assert command[command.index("-p") + 1] == str(port)
    # The shell of every RUN step parses (the build itself is not run here).
    for script in runs:
        check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, f"{script}\n{check.stderr}"


def test_the_image_users_uid_matches_the_pods() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile")
    user = next(args for i, args in reversed(instructions) if i == "USER")
    uid, gid = (int(part) for part in user.split(":"))
    security = _k8s_values()["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"][
        "podSpecConfig"
    ]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid)
    assert f"--uid {uid}" in " ".join(a for i, a in instructions if i == "RUN")


def test_the_launcher_extras_are_locked_and_installed_by_bootstrap() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'k8s = ["dagster-k8s==0.29.27"]' in pyproject
    assert 'docker = ["dagster-docker==0.29.27"]' in pyproject
    lock = (REPO_ROOT / "uv.lock").read_text()
    for package in ("dagster-k8s", "dagster-docker"):
        assert re.search(rf'name = "{package}"\nversion = "0\.29\.27"', lock), package
    assert "uv sync --frozen --all-extras" in (REPO_ROOT / "scripts" / "bootstrap.sh").read_text()
