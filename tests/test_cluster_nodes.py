"""The multi-node test infrastructure of tests/cluster_nodes.py does what it claims.

* A directory under the worker node's private parent is private to each side: what a task on the worker
  node writes there the head, the test process and its drivers never see, and the other way round, while
  a directory outside the private parent is shared.
* Killing the worker node ends every process of it; a restarted worker node joins as a new node, runs
  tasks, and finds its private parent empty again.
* The State API called inside the cluster answers for this cluster (Ray Train V2 relies on it).
* pyarrow's S3 filesystem reaches the moto server on 127.0.0.1, from the test process and from a task on
  the worker node (whose environment came from the node).
* The MLflow server answers /health, stops, and comes back on the same port with its runs.
* Both nodes run with Ray's token authentication: `kmax` joins with the token from each of Ray's standard
  places and no other variable; a client without the token, or with another, is refused in one line.

One cluster serves the Ray tests of this module (a start costs 8-25 s on the 2-core machine); the test
that kills its worker node runs last. Drivers run in subprocesses (`run_driver`), never in the pytest
process, which may hold the session Ray; the driver functions below are what those subprocesses call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cluster_nodes import (
    HEAD_RESOURCE,
    REPO,
    WORKER_RESOURCE,
    S3Server,
    TwoNodeCluster,
    mlflow_server,  # noqa: F401  (fixture)
    namespace_processes,
    node_env,
    require_namespaces,
    run_driver,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

THIS = "tests.test_cluster_nodes"


# --------------------------------------------------------------------------------------------------
# what runs in the driver subprocesses and in their tasks


def _on_node(resource: str, func, *args):
    """Run `func(*args)` as a task pinned to the node that has `resource`; return its result and node id.
    No CPU asked: the pin is the custom resource, whatever CPUs the nodes have."""
    import ray

    def where(*a):
        return {"node_id": ray.get_runtime_context().get_node_id(), "result": func(*a)}

    task = ray.remote(num_cpus=0, resources={resource: 1})(where)
    return ray.get(task.remote(*args), timeout=120)


def _write_and_list(private_dir: str, shared_dir: str, name: str) -> dict:
    """Write `name` into the private and the shared directory; report what this node sees of both and
    how its private parent is mounted."""
    private, shared = Path(private_dir), Path(shared_dir)
    private.mkdir(parents=True, exist_ok=True)
    (private / name).write_text(name)
    (shared / name).write_text(name)
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    parent = str(private.parent)
    return {
        "private": sorted(os.listdir(private)),
        "shared": sorted(os.listdir(shared)),
        "parent_fs": [line.split()[2] for line in mounts if line.split()[1] == parent],
    }


def _list(path: str) -> list[str] | None:
    return sorted(os.listdir(path)) if os.path.isdir(path) else None


def private_dirs_driver(private_dir: str, shared_dir: str) -> dict:
    worker = _on_node(WORKER_RESOURCE, _write_and_list, private_dir, shared_dir, "worker.txt")
    head = _on_node(HEAD_RESOURCE, _write_and_list, private_dir, shared_dir, "head.txt")
    worker_after = _on_node(WORKER_RESOURCE, _list, private_dir)
    return {"worker": worker, "head": head, "worker_after": worker_after}


def write_private_driver(private_dir: str) -> dict:
    return _on_node(WORKER_RESOURCE, _write_and_list, private_dir, private_dir, "before-kill.txt")


def after_restart_driver(private_parent: str) -> dict:
    import ray

    listing = _on_node(WORKER_RESOURCE, _list, private_parent)
    return {**listing, "alive": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}


def _state_api_nodes() -> list[str]:
    from ray.util.state import list_nodes

    return sorted(n.node_id for n in list_nodes() if n.state == "ALIVE")


def state_api_driver() -> dict:
    return _on_node(WORKER_RESOURCE, _state_api_nodes)


def _s3_round_trip(uri: str, read_uri: str) -> str:
    """Write `uri` and read `read_uri` through `FileSystem.from_uri`, i.e. with the endpoint taken from
    this process's environment (AWS_ENDPOINT_URL*), as Ray Train resolves an s3:// storage_path."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:
        f.write(b"from the worker node")
    fs, path = pyarrow.fs.FileSystem.from_uri(read_uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def s3_driver(uri: str, read_uri: str) -> dict:
    return _on_node(WORKER_RESOURCE, _s3_round_trip, uri, read_uri)


# --------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    """One two-node cluster for the module, the S3 client environment set on both nodes. Its teardown
    checks that `stop` left no process of either node."""
    require_namespaces()
    root = tmp_path_factory.mktemp("cluster")
    cluster = TwoNodeCluster(root / "private", root / "nodes", env=s3.env)
    namespaces = []
    try:
        cluster.start()
        yield cluster
        namespaces = [cluster.head.namespace, cluster.worker.namespace]
    finally:
        cluster.stop()
    left = {ns: namespace_processes(ns) for ns in namespaces if ns}
    assert not any(left.values()), f"processes left after stop(): {left}"


def driver(cluster: TwoNodeCluster, name: str, *args):
    try:
        return run_driver(cluster.address, f"{THIS}:{name}", *args)
    except RuntimeError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None


# --------------------------------------------------------------------------------------------------
# tests


def test_private_dir_is_private_to_each_node_and_shared_dir_is_shared(cluster, tmp_path):
    private = cluster.private_parent / "run"
    shared = tmp_path / "shared"
    shared.mkdir()

    out = driver(cluster, "private_dirs_driver", str(private), str(shared))

    head_id = next(n.node_id for n in cluster.alive_nodes() if n.is_head)
    assert out["worker"]["node_id"] == cluster.worker_node_id and out["head"]["node_id"] == head_id, out
    worker, head = out["worker"]["result"], out["head"]["result"]
    assert worker["parent_fs"] == ["tmpfs"], f"the worker node's private parent is no tmpfs: {worker}"
    assert head["parent_fs"] == [], f"the head must see the host's directory: {head}"
    assert worker["private"] == ["worker.txt"], worker
    assert head["private"] == ["head.txt"], f"the head saw the worker node's file: {head}"
    assert out["worker_after"]["result"] == ["worker.txt"], f"the worker node saw the head's file: {out}"
    assert sorted(os.listdir(private)) == ["head.txt"], "the test process saw the worker node's file"
    assert head["shared"] == ["head.txt", "worker.txt"], f"the shared dir is not shared: {head}"
    assert (shared / "worker.txt").read_text() == "worker.txt"


def test_state_api_in_a_task_answers_for_this_cluster(cluster):
    """What Ray Train V2's PlacementGroupCleaner relies on: `ray.util.state` called without an address
    inside the cluster reaches this cluster's dashboard, even with other Rays on the machine."""
    out = driver(cluster, "state_api_driver")

    assert out["result"] == sorted(n.node_id for n in cluster.alive_nodes()), out


def test_s3_through_moto_from_test_process_and_worker_node(cluster, s3):
    fs = s3.filesystem()
    with fs.open_output_stream(f"{s3.bucket}/from-test.txt") as f:
        f.write(b"from the test process")

    out = driver(cluster, "s3_driver", s3.uri("from-worker.txt"), s3.uri("from-test.txt"))

    assert out["node_id"] == cluster.worker_node_id, out
    assert out["result"] == "from the test process", out
    with fs.open_input_stream(f"{s3.bucket}/from-worker.txt") as f:
        assert f.read() == b"from the worker node"


JOIN_CODE = (
    "import sys; from pipeline.ray_setup import RayConfig, init_ray; "
    "ray = init_ray(RayConfig(address=sys.argv[1])); "
    "print(sorted(n['NodeID'] for n in ray.nodes() if n['Alive']))"
)
"""A driver that joins through `kmax`'s own path and prints the alive node ids."""


def _without_token(home: Path, **extra: str) -> dict[str, str]:
    """A driver's environment with none of Ray's token places filled (HOME without ~/.ray), plus `extra`."""
    env = node_env({"HOME": str(home), **extra})
    env.pop("RAY_AUTH_TOKEN_PATH")
    return env


@pytest.mark.parametrize("place", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"])
def test_kmax_joins_with_the_token_from_each_standard_place(cluster, tmp_path, place):
    """No RAY_AUTH_MODE and no kmax variable: the token alone, where Ray looks for it, is enough."""
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text()
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    if place == "~/.ray/auth_token":
        (home / ".ray" / "auth_token").write_text(token)
    extra = {"RAY_AUTH_TOKEN": token} if place == "RAY_AUTH_TOKEN" else {}
    env = _without_token(home, **extra)
    if place == "RAY_AUTH_TOKEN_PATH":
        env["RAY_AUTH_TOKEN_PATH"] = os.environ["RAY_AUTH_TOKEN_PATH"]

    done = subprocess.run(
        [sys.executable, "-c", JOIN_CODE, cluster.address], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(sorted(n.node_id for n in cluster.alive_nodes())), done.stdout
    assert "Token authentication" not in done.stderr  # no banner: the mode was made explicit


@pytest.mark.parametrize("offered", ["none", "another"])
def test_a_client_without_the_cluster_token_is_refused_in_one_line(cluster, tmp_path, offered):
    """`kmax train` against the cluster with no token, or another cluster's: exit 2, one line saying where
    the token goes, within seconds (ray.init alone retried for 20 s and ended in a traceback)."""
    extra = {"RAY_AUTH_TOKEN": "0" * 64} if offered == "another" else {}
    argv = ["train", "--config", "tiny", "--run-dir", str(tmp_path / "run"),
            "--set", f"ray.address={cluster.address}"]  # fmt: skip
    t0 = time.monotonic()

    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *argv], env=_without_token(tmp_path, **extra), cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    seconds = time.monotonic() - t0
    err = done.stderr.strip().splitlines()
    held = "no token was found here" if offered == "none" else "the token found here is not the cluster's"
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert err == [
        f"kmax train: the Ray cluster at {cluster.address} refused this client ({held}): it runs with token "
        "authentication; put the cluster's token (`ray get-auth-token` on its head) in RAY_AUTH_TOKEN, a "
        "file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
    ], err
    assert seconds < 30, f"refused after {seconds:.1f} s"
    assert not (tmp_path / "run" / "data").exists()  # nothing was generated: refused before any work


def test_kill_and_restart_worker_node(cluster):
    private = cluster.private_parent / "run"
    before = driver(cluster, "write_private_driver", str(private))
    assert before["node_id"] == cluster.worker_node_id and "before-kill.txt" in before["result"]["private"]
    old_id, old_namespace, head_namespace = (
        cluster.worker_node_id,
        cluster.worker.namespace,
        cluster.head.namespace,
    )

    cluster.kill_worker_node()

    assert namespace_processes(old_namespace) == [], "a process of the killed worker node survived"
    nodes = cluster.alive_nodes()
    assert [n.is_head for n in nodes] == [True], nodes
    assert namespace_processes(head_namespace), "killing the worker node touched the head"

    cluster.start_worker_node()
    after = driver(cluster, "after_restart_driver", str(cluster.private_parent))

    assert cluster.worker_node_id != old_id
    assert after["node_id"] == cluster.worker_node_id, after
    assert len(after["alive"]) == 2 and cluster.worker_node_id in after["alive"], after
    assert after["result"] == [], f"the restarted node's private parent is not empty: {after}"


def _health(uri: str) -> int | None:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=5) as resp:
            return resp.status
    except (urllib.error.URLError, OSError):
        return None


def test_mlflow_server_restarts_on_same_port_with_its_runs(mlflow_server):  # noqa: F811
    from mlflow.tracking import MlflowClient

    server = mlflow_server
    uri, port = server.uri, server.port
    assert _health(uri) == 200
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("restart"))
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    client.log_text(run.info.run_id, "hello", "note.txt")
    assert list((server.root / "artifacts").rglob("note.txt")), "artifacts are not under the file root"

    server.stop()
    assert _health(uri) is None, "the server still answers after stop()"
    server.start()

    assert server.port == port and server.uri == uri
    assert _health(uri) == 200
    again = MlflowClient(tracking_uri=uri).get_run(run.info.run_id)
    assert again.data.metrics == {"loss": 0.5}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
