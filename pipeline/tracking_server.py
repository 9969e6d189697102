"""`kmax tracking-server`: the MLflow tracking server of a cluster (cluster.yaml starts it on the head).

What it serves and where it keeps it:

* run metadata (experiments, runs, params, every metric step) in the database named by ``KMAX_TRACKING_DB``
  (PostgreSQL, e.g. ``postgresql://kmax:PASSWORD@kmax-db.abc.us-west-2.rds.amazonaws.com:5432/kmax``: a
  managed instance that outlives any node); artifacts at ``--artifacts-destination`` (the storage prefix),
  served through the server, so clients on any node upload over HTTP;
* MLflow's basic-auth app: every request but ``/health`` needs a user. The admin user
  (``MLFLOW_AUTH_ADMIN_USERNAME``, default ``admin``) is created on the first start with the password
  ``MLFLOW_AUTH_ADMIN_PASSWORD`` (required here; once the user exists MLflow ignores it). The users live in
  the same database (MLflow's auth tables, versioned in their own ``alembic_version_auth``; no table name
  shared with the tracking store in MLflow 3.17), so they outlive the head too. Clients authenticate with
  MLflow's standard ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``;
* MLflow's default host check is kept (no ``--allowed-hosts``): it admits localhost and private addresses,
  which is how the trials on the other nodes reach the head.

Without ``KMAX_TRACKING_DB`` it refuses in one line (exit 2, so that `ray up` fails) unless the ephemeral
store is asked for (``--ephemeral`` or ``KMAX_TRACKING_EPHEMERAL=1``): SQLite in ``--state-dir`` on the
head's disk, lost with the head (see README, "On a GPU cluster").

Secrets come from the environment; with ``--aws-secrets PREFIX`` those not set there are read from AWS
Secrets Manager (``<PREFIX>tracking-db``, ``<PREFIX>mlflow-admin-password``; a missing secret counts as
unset). ``--client-credentials`` logs this node's MLflow clients in as the admin (MLflow's own
credentials file). ``--detach`` returns once the server answers (exit 1 with the log's tail when it
does not) and stops the server a previous call started from the same ``--state-dir``; without it, this
process becomes the server. No secret is printed: the database URI is shown without its password.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

TRACKING_DB_VARIABLE = "KMAX_TRACKING_DB"
EPHEMERAL_VARIABLE = "KMAX_TRACKING_EPHEMERAL"
ADMIN_USERNAME_VARIABLE = "MLFLOW_AUTH_ADMIN_USERNAME"
ADMIN_PASSWORD_VARIABLE = "MLFLOW_AUTH_ADMIN_PASSWORD"
AUTH_CONFIG_VARIABLE = "MLFLOW_AUTH_CONFIG_PATH"
CSRF_KEY_VARIABLE = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AWS_SECRETS = {TRACKING_DB_VARIABLE: "tracking-db", ADMIN_PASSWORD_VARIABLE: "mlflow-admin-password"}
"""Variable -> secret name under --aws-secrets PREFIX."""
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
"""Databases MLflow's SQLAlchemy store runs on (``+driver`` suffixes allowed): none lives on a node's disk."""
DEFAULT_ADMIN = "admin"
DEFAULT_STATE_DIR = "~/mlflow"
AUTH_FILE = "basic_auth.ini"
PID_FILE = "server.pid"
LOG_FILE = "server.log"
STARTUP_TIMEOUT_S = 90.0
STOP_GRACE_S = 20.0


# --------------------------------------------------------------------------------------------------
# starting and stopping an `mlflow server` (also the local dashboard's, pipeline.sweep.dashboard)


def server_command(
    backend_uri: str, host: str, port: int, workers: int = 1, extra: Sequence[str] = ()
) -> list[str]:
    """The `mlflow server` command line over ``backend_uri`` (the `mlflow` next to this Python)."""
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow_bin is None:
        raise RuntimeError("the `mlflow` executable is not installed next to this Python; run `make install`")
    return [
        mlflow_bin, "server",
        "--backend-store-uri", backend_uri,
        "--host", host, "--port", str(port),
        "--workers", str(workers),
        *extra,
    ]  # fmt: skip


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without MLflow's client variables (a server given the clients'
    MLFLOW_TRACKING_URI or credentials would act on them), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(extra or {})
    return env


def _log_tail(log_path: Path | None, chars: int = 2000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path and log_path.exists() else ""


def launch(
    command: list[str],
    url: str,
    env: Mapping[str, str],
    log_path: Path | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> subprocess.Popen:
    """Start ``command`` in its own session (`stop_server` ends its uvicorn children with it), output to
    ``log_path``, and wait until ``url``/health answers; returns the process. RuntimeError with the log's
    tail when it exits first or does not answer within ``timeout_s`` (it is stopped then)."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    try:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
        )
    finally:
        if log_path:
            log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {proc.returncode} before answering at {url}\n"
                + _log_tail(log_path)
            )
        if _healthy(url):
            return proc
        time.sleep(0.5)
    stop_server(proc)
    tail = _log_tail(log_path)
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout_s:.0f} s\n{tail}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its job runners exit with it); SIGKILL after
    STOP_GRACE_S."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------------------------------
# the cluster's server: where it keeps what, and who may use it


def redact(uri: str) -> str:
    """``uri`` with its password (if any) replaced by ``***``, for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def backend_store(environ: Mapping[str, str], state_dir: Path, ephemeral: bool) -> tuple[str, bool]:
    """(database URI, ephemeral?): ``KMAX_TRACKING_DB`` when set (a database MLflow runs on, not a file;
    a bare ``postgresql://`` gets the installed driver, ``postgresql+psycopg://``), else the ephemeral
    SQLite store in ``state_dir`` when asked for, else ValueError (one line)."""
    db = environ.get(TRACKING_DB_VARIABLE, "").strip()
    if db:
        full_scheme = urlsplit(db).scheme
        scheme = full_scheme.split("+")[0]
        if scheme not in DATABASE_SCHEMES:
            raise ValueError(
                f"{TRACKING_DB_VARIABLE} must name a database server ({', '.join(DATABASE_SCHEMES)}), "
                f"such as postgresql://user:password@host:5432/db; got {redact(db)}"
            )
        if full_scheme == "postgresql":
            # the driver named: SQLAlchemy's default for a bare postgresql:// changed between versions
            # (psycopg2 in 2.0, psycopg 3 in 2.1), and the project installs psycopg 3
            db = "postgresql+psycopg" + db[len("postgresql") :]
        return db, False
    if ephemeral or environ.get(EPHEMERAL_VARIABLE) == "1":
        return f"sqlite:///{state_dir / 'mlflow.db'}", True
    raise ValueError(
        f"{TRACKING_DB_VARIABLE} is not set: the tracking server would keep every run on this node's disk "
        f"and lose it with the node; set it to a PostgreSQL URI (a secret, never in the repo), or pass "
        f"--ephemeral (or {EPHEMERAL_VARIABLE}=1) to accept a store that dies with this node"
    )


def read_aws_secrets(prefix: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The `AWS_SECRETS` not set in ``environ``, read from AWS Secrets Manager as ``<prefix><name>``
    (credentials and region from the usual AWS settings or the instance profile); a secret that does not
    exist is left out. Returns {variable: value}."""
    missing = {v: prefix + name for v, name in AWS_SECRETS.items() if not environ.get(v)}
    if not missing:
        return {}
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    found = {}
    try:
        client = boto3.client("secretsmanager")
        for variable, secret_id in missing.items():
            try:
                found[variable] = client.get_secret_value(SecretId=secret_id)["SecretString"]
            except client.exceptions.ResourceNotFoundException:
                continue
    except (BotoCoreError, ClientError) as exc:
        raise ValueError(f"cannot read the secrets {prefix}* from AWS Secrets Manager: {exc}") from exc
    return found


def write_auth_config(path: Path, database_uri: str, admin: str) -> Path:
    """MLflow's basic-auth configuration (read through MLFLOW_AUTH_CONFIG_PATH): its users in
    ``database_uri``, MLflow's default permission (READ) for users on what they did not create. Written
    owner-only: the URI holds the database's password."""
    # configparser interpolates '%': a URL-encoded password must reach MLflow as written
    uri = database_uri.replace("%", "%%")
    text = (
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {uri}\nadmin_username = {admin}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return _write_private(path, text)


def write_client_credentials(username: str, password: str, home: Path | None = None) -> Path:
    """MLflow's standard credentials file (``~/.mlflow/credentials``, owner-only), which every MLflow client
    on this node reads when MLFLOW_TRACKING_USERNAME / PASSWORD are unset: the head's own clients (the
    sweep driver under `ray submit`, `kmax compare`) log in without a secret in their environment, and a
    sweep hands the driver's credentials to its trials (pipeline.tracking.credential_env)."""
    path = (home or Path.home()) / ".mlflow" / "credentials"
    text = f"[mlflow]\nmlflow_tracking_username = {username}\nmlflow_tracking_password = {password}\n"
    return _write_private(path, text)


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (its folder made), readable by its owner only from the first byte: it
    holds a password."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def plan(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str], str]:
    """(command, environment, one-line description) of the server ``args`` ask for; ValueError (one line)
    for a missing database without the ephemeral opt-in, or a missing admin password."""
    state_dir = Path(args.state_dir).expanduser().resolve()
    backend, ephemeral = backend_store(environ, state_dir, args.ephemeral)
    password = environ.get(ADMIN_PASSWORD_VARIABLE, "")
    if not password:
        raise ValueError(
            f"{ADMIN_PASSWORD_VARIABLE} is not set: the server's admin user needs a password (a secret, "
            "never in the repo)"
        )
    admin = environ.get(ADMIN_USERNAME_VARIABLE) or DEFAULT_ADMIN
    users = f"sqlite:///{state_dir / 'basic_auth.db'}" if ephemeral else backend
    config = write_auth_config(state_dir / AUTH_FILE, users, admin)
    extra = ["--app-name", "basic-auth", "--artifacts-destination", args.artifacts_destination]
    command = server_command(backend, args.host, args.port, args.workers, [*extra, "--serve-artifacts"])
    # the basic-auth app's CSRF key must be the same in every worker: one per start unless the user set one
    csrf = environ.get(CSRF_KEY_VARIABLE) or secrets.token_urlsafe(32)
    env = server_env({AUTH_CONFIG_VARIABLE: str(config), ADMIN_USERNAME_VARIABLE: admin,
                      ADMIN_PASSWORD_VARIABLE: password, CSRF_KEY_VARIABLE: csrf})  # fmt: skip
    store = f"EPHEMERAL SQLite on this node ({state_dir})" if ephemeral else redact(backend)
    return command, env, f"metadata and users in {store}, artifacts in {args.artifacts_destination}"


def _stop_previous(state_dir: Path, url: str) -> None:
    """Stop the server a previous ``--detach`` started from ``state_dir`` (a rerun of `ray up`): SIGTERM
    its process group, then wait until nothing answers at ``url`` (it is not our child: its exit cannot
    be waited for)."""
    pid_file = state_dir / PID_FILE
    if not pid_file.exists():
        return
    try:
        os.killpg(int(pid_file.read_text().strip()), signal.SIGTERM)
    except (ValueError, ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + STOP_GRACE_S
    while _healthy(url) and time.monotonic() < deadline:
        time.sleep(0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--artifacts-destination", required=True, help="the storage prefix, e.g. s3://bucket/kmax/mlartifacts"
    )
    add(
        "--host",
        default="0.0.0.0",
        help="bind address (default: all interfaces, for the other nodes' trials)",
    )
    add("--port", type=int, default=5000)
    add("--workers", type=int, default=2, help="server worker processes")
    add("--state-dir", default=DEFAULT_STATE_DIR, help="this node's files: auth config, log, pid")
    add("--ephemeral", action="store_true", help=f"without {TRACKING_DB_VARIABLE}: SQLite here, lost with it")
    add("--aws-secrets", metavar="PREFIX", help="read unset secrets from AWS Secrets Manager: "
        "PREFIXtracking-db, PREFIXmlflow-admin-password")  # fmt: skip
    add("--detach", action="store_true", help="run in the background; return once it answers")
    add("--client-credentials", action="store_true",
        help="log this node's MLflow clients in as the admin (~/.mlflow/credentials)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import fail

    environ = dict(os.environ)
    try:
        if args.aws_secrets:
            environ.update(read_aws_secrets(args.aws_secrets, environ))
        command, env, description = plan(args, environ)
    except ValueError as exc:
        return fail("tracking-server", exc)
    print(f"MLflow tracking server on {args.host}:{args.port}: {description}", flush=True)
    if args.client_credentials:
        admin = env[ADMIN_USERNAME_VARIABLE]
        path = write_client_credentials(admin, env[ADMIN_PASSWORD_VARIABLE])
        print(f"  MLflow clients on this node log in as {admin} ({path})", flush=True)
    if not args.detach:
        os.execve(command[0], command, env)
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url, state_dir = f"http://{local}:{args.port}", Path(args.state_dir).expanduser().resolve()
    _stop_previous(state_dir, url)
    try:
        proc = launch(command, url, env, state_dir / LOG_FILE)
    except RuntimeError as exc:
        print(f"kmax tracking-server: {exc}", file=sys.stderr)
        return 1
    (state_dir / PID_FILE).write_text(str(proc.pid))
    print(f"  answering at {url} (pid {proc.pid}, log {state_dir / LOG_FILE})", flush=True)
    return 0
