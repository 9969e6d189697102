"""cluster.yaml is validated the way `ray up` validates it before touching the cloud."""

from __future__ import annotations

import copy
import re

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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
    assert any("mlflow server" in c for c in cluster_cfg["head_setup_commands"])
    # storage every node reaches (no shared disk): KMAX_STORAGE, the instance profile, MLflow artifacts there
    bucket = re.search(r"KMAX_STORAGE=(s3://\S+?)'", setup).group(1)
    server = next(c for c in cluster_cfg["head_setup_commands"] if "mlflow server" in c)
    assert f"--artifacts-destination {bucket}/" in server
    for node in cluster_cfg["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    text = (REPO / "cluster.yaml").read_text().lower()
    assert "aws_secret" not in text and "aws_access_key" not in text
