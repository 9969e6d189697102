"""cluster.yaml is validated the way `ray up` validates it before touching the cloud."""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.cluster_nodes import s3_server  # noqa: F401  (fixture)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validator(cluster_cfg):
    validate_config(prepare_config(copy.deepcopy(cluster_cfg)))


def test_validator_is_not_vacuous(cluster_cfg):
    bad = copy.deepcopy(cluster_cfg)
    bad["max_worker"] = bad.pop("max_workers")
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(cluster_cfg)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


def test_cluster_matches_project_pins(cluster_cfg):
    image = cluster_cfg["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    setup = "\n".join(cluster_cfg["setup_commands"])
    assert f"torch=={makefile_torch}" in setup
    assert "/home/ray/kmax-ray" in setup and cluster_cfg["file_mounts"]["/home/ray/kmax-ray"] == "."
    gpu = cluster_cfg["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0
    assert cluster_cfg["available_node_types"][cluster_cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert any("kmax tracking-server" in c for c in cluster_cfg["head_setup_commands"])
    # storage every node reaches (no shared disk): KMAX_STORAGE, the instance profile, MLflow artifacts there
    bucket = re.search(r"KMAX_STORAGE=(s3://\S+?)'", setup).group(1)
    server = next(c for c in cluster_cfg["head_setup_commands"] if "kmax tracking-server" in c)
    assert f"--artifacts-destination {bucket}/" in server
    for node in cluster_cfg["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = (REPO / "cluster.yaml").read_text().lower()
    assert "aws_secret" not in text and "aws_access_key" not in text


def test_every_node_starts_ray_with_token_auth_from_a_secret(cluster_cfg):
    """Token authentication on every node, the token read from a secret onto each node (never written in
    the file), and the dashboard on the head's loopback (reached through `ray dashboard cluster.yaml`)."""
    starts = [c for c in cluster_cfg["head_start_ray_commands"] + cluster_cfg["worker_start_ray_commands"]
              if "ray start" in c]  # fmt: skip
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), starts
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, head
    fetch = [c for c in cluster_cfg["setup_commands"] if "~/.ray/auth_token" in c]
    assert len(fetch) == 1 and "secretsmanager" in fetch[0] and "umask 077" in fetch[0], fetch
    text = (REPO / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN=" not in text and not re.search(r"\b[0-9a-f]{32,}\b", text)  # no token in the repo


def test_the_head_tracks_in_a_database_behind_a_login(cluster_cfg):
    """The head's tracking server is `kmax tracking-server` with flags it takes: metadata and users in the
    database of a secret (no fallback to the head's disk unless opted in), logins, MLflow's default host
    check (no --allowed-hosts), the head's clients logged in; no database URI with credentials in the file
    but the placeholder in its comment (tests/test_tracking_server.py runs this very command line)."""
    import argparse
    import shlex

    from pipeline import tracking_server

    commands = cluster_cfg["head_setup_commands"]
    (line,) = [c for c in commands if "kmax tracking-server" in c]
    argv = shlex.split(line)
    assert argv[:2] == ["kmax", "tracking-server"]
    parser = argparse.ArgumentParser()
    tracking_server.add_arguments(parser)
    args = parser.parse_args(argv[2:])
    assert args.detach and args.client_credentials and args.aws_secrets == "kmax/" and not args.ephemeral
    assert args.port == 5000 and args.artifacts_destination.startswith("s3://")
    every = [*commands, *cluster_cfg["setup_commands"], *cluster_cfg["head_start_ray_commands"]]
    assert not any("mlflow server" in c or "--allowed-hosts" in c or "sqlite" in c for c in every)
    text = (REPO / "cluster.yaml").read_text()
    assert re.findall(r"postgresql\S*://\S+@\S+", text) == ["postgresql://USER:PASSWORD@HOST:5432/DB"]


def test_the_nodes_token_command_writes_the_secret_where_ray_finds_it(tmp_path, s3_server):  # noqa: F811
    """cluster.yaml's token line, run as each node runs it, against Secrets Manager (moto's server): the
    secret lands in ~/.ray/auth_token, readable by its owner only, without a trailing newline."""
    import boto3

    env = {
        **s3_server.env,
        "HOME": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    token = "0123456789abcdef" * 4
    boto3.client(
        "secretsmanager", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    ).create_secret(Name="kmax/ray-auth-token", SecretString=token)  # fmt: skip
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (line,) = [c for c in cfg["setup_commands"] if "~/.ray/auth_token" in c]

    done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-3000:]
    path = tmp_path / ".ray" / "auth_token"
    assert path.read_text() == token and stat.S_IMODE(path.stat().st_mode) == 0o600
