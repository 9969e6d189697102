"""`kmax tracking-server` (pipeline.tracking_server), the command cluster.yaml's head runs: its refusals, in
one line before anything starts, and the head's exact command line against real services: AWS Secrets
Manager (moto's server), PostgreSQL and the MLflow server it starts."""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.cluster_nodes import (
    PostgresServer,
    free_ports,
    require_postgres,
    s3_server,  # noqa: F401  (fixture)
)
from tests.conftest import REPO

ADMIN_PASSWORD = "admin-password-of-this-test"
SECRET_PREFIX = "kmax/"


def _tracking_server(args: list[str], env: dict[str, str], timeout: float = 180):
    """`kmax tracking-server ARGS` as cluster.yaml runs it, in a clean environment plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KMAX_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "tracking-server", *args], cwd=REPO, env={**base, **env},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_refusals_are_one_line_and_start_nothing(tmp_path):
    (port,) = free_ports(1)
    args = ["--artifacts-destination", str(tmp_path / "art"), "--state-dir", str(tmp_path / "state"),
            "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
    password = {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    cases = {
        "no database": (args, password, "KMAX_TRACKING_DB is not set: the tracking server would keep"),
        "a file, not a database server": (
            args, {**password, "KMAX_TRACKING_DB": f"sqlite:///{tmp_path}/m.db"}, "KMAX_TRACKING_DB must name"
        ),
        "no admin password": (
            args, {"KMAX_TRACKING_DB": "postgresql://kmax:db-secret@db.example:5432/kmax"},
            "MLFLOW_AUTH_ADMIN_PASSWORD is not set",
        ),
        "ephemeral, no admin password": ([*args, "--ephemeral"], {}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
    }  # fmt: skip
    for case, (argv, env, start) in cases.items():
        done = _tracking_server(argv, env, timeout=60)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, (case, done.stdout, done.stderr)
        assert err[0].startswith(f"kmax tracking-server: {start}"), (case, err)
        assert "db-secret" not in done.stdout + done.stderr  # no secret in a message
    assert not (tmp_path / "state").exists()  # nothing written, nothing started
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def _head_command(port: int, state_dir: Path, artifacts: str) -> list[str]:
    """cluster.yaml's head command that starts the server, with this test's port, state dir and artifact
    destination (the bucket and path of a real cluster exist only there)."""
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (line,) = [c for c in cfg["head_setup_commands"] if "kmax tracking-server" in c]
    argv = shlex.split(line)
    assert argv[:2] == ["kmax", "tracking-server"]
    replace = {"--port": str(port), "--state-dir": str(state_dir), "--artifacts-destination": artifacts}
    for flag, value in replace.items():
        argv[argv.index(flag) + 1] = value
    return argv[2:]


def _stop_detached(state_dir: Path, url: str) -> None:
    """SIGTERM the detached server's process group (its pid file) and wait until it no longer answers."""
    os.killpg(int((state_dir / "server.pid").read_text()), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
        except (urllib.error.URLError, OSError):
            return
        time.sleep(0.5)
    raise AssertionError(f"the server at {url} still answers")


@pytest.fixture
def secrets_and_database(tmp_path, s3_server):  # noqa: F811
    """PostgreSQL, and the head's two secrets in Secrets Manager (moto): (s3 server, postgres, client)."""
    import boto3

    require_postgres()
    postgres = PostgresServer(tmp_path / "postgres").start()
    env = s3_server.env
    secrets = boto3.client(
        "secretsmanager", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    try:
        secrets.create_secret(Name=SECRET_PREFIX + "tracking-db", SecretString=postgres.uri)
        secrets.create_secret(Name=SECRET_PREFIX + "mlflow-admin-password", SecretString=ADMIN_PASSWORD)
        yield s3_server, postgres, secrets
    finally:
        postgres.remove()


@pytest.mark.slow
def test_the_heads_command_serves_postgres_with_logins_from_aws_secrets(tmp_path, secrets_and_database):
    """The head's command line from cluster.yaml: secrets from Secrets Manager (moto), metadata and users
    in PostgreSQL, artifacts in the bucket; every request but /health needs a login; the head's clients
    are logged in by MLflow's credentials file; without the database secret it refuses in one line and
    leaves the running server alone."""
    from mlflow.tracking import MlflowClient

    s3, postgres, secrets = secrets_and_database
    (port,) = free_ports(1)
    state_dir, home, url = tmp_path / "state", tmp_path / "home", f"http://127.0.0.1:{port}"
    argv = [*_head_command(port, state_dir, s3.uri("mlartifacts")), "--workers", "1"]  # 2 cores here
    env = {**s3.env, "HOME": str(home)}
    done = _tracking_server(argv, env)
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        assert postgres.password not in done.stdout + done.stderr and ADMIN_PASSWORD not in done.stdout
        assert _status(url + "/health") == 200 and _status(url + "/api/2.0/mlflow/experiments/search") == 401
        for private in (home / ".mlflow" / "credentials", state_dir / "basic_auth.ini"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600
        with pytest.MonkeyPatch.context() as mp:  # a client on the head: no credentials in its environment
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
                mp.delenv(key, raising=False)
            mp.setenv("HOME", str(home))
            client = MlflowClient(url)
            run_id = client.create_run(client.create_experiment("head-client")).info.run_id
            client.log_metric(run_id, "m", 1.5, step=7)
            client.log_dict(run_id, {"a": 1}, "a.json")
            assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [(7, 1.5)]
            assert [a.path for a in client.list_artifacts(run_id)] == ["a.json"]  # in the bucket
        tables = {t for (t,) in postgres.sql("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"runs", "metrics", "users", "alembic_version", "alembic_version_auth"} <= tables
        assert postgres.sql("SELECT username, is_admin FROM users") == [("admin", True)]
        assert postgres.sql(f"SELECT step, value FROM metrics WHERE run_uuid = '{run_id}'") == [(7, 1.5)]
        secrets.delete_secret(SecretId=SECRET_PREFIX + "tracking-db", ForceDeleteWithoutRecovery=True)
        refused = _tracking_server(argv, env, timeout=60)
        err = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(err) == 1 and "KMAX_TRACKING_DB is not set" in err[0]
        assert _status(url + "/health") == 200  # refused before touching the running server
    finally:
        _stop_detached(state_dir, url)
