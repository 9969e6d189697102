"""cluster.yaml brought up on this machine with Ray's fake multi-node provider: the autoscaler launches a
worker of the file's GPU worker type on demand, when a task asks for a GPU.

What it proves: the file's autoscaling settings (cluster_name, max_workers, upscaling_speed,
idle_timeout_minutes) and its node types' names and resources drive a real Ray autoscaler. The cluster
starts with the head only (CPU: 0, as in the file; min_workers: 0), a `num_gpus=1` task makes the
autoscaler launch one `gpu_worker` node with the file's `GPU: 1`, and the task runs there, not on the head.

Why a variant of the file and not the file itself:
* the cloud-only keys (AWS provider, auth, docker, file_mounts, rsync, setup and start commands) cannot run
  here; they are replaced by the fake provider's empty defaults, and node_config by `{}`;
* the fake provider requires its head type to be named `ray.head.default`;
* the fake worker gets 1 CPU (its fake `GPU: 1` stays) and a small object store, for a 2-core machine;
* `ray up` cannot run the fake provider from the wheel (it misses fake_multi_node/example.yaml, the
  defaults file), so the head is started the documented way, `ray start --head --autoscaling-config=...`
  (shared/docs/reference_ray_mlflow.md §5).

Isolation: the pytest process may hold the session Ray (tests/conftest.py) and other Ray jobs may run on
the machine, so the driver is a subprocess (tests/fake_cluster_client.py), the cluster gets its own ports
and Ray temp dir, and teardown stops only this cluster's processes (never `ray stop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray  # noqa: F401  (also puts Ray's vendored psutil on sys.path, used by the teardown)
import yaml
from ray._private.services import get_node_ip_address
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
from ray.autoscaler._private.util import validate_config

from tests.cluster_nodes import free_ports, tail
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RAY_CLI = Path(sys.executable).with_name("ray")
CLIENT = REPO / "tests" / "fake_cluster_client.py"

KEPT_KEYS = ("cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes")
"""Top-level keys of cluster.yaml that the variant keeps as they are."""

FAKE_DEFAULTS = {
    "auth": {},
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}
"""What the fake provider's defaults file (example.yaml in Ray's repository, absent from the wheel) fills in
for the cloud-only keys. The autoscaler reads them: without `file_mounts` its monitor dies with KeyError."""

WORKER_CPUS = 1
OBJECT_STORE_BYTES = 128 * 1024**2
HEAD_READY_S = 60
"""Head start measured at 21-23 s on the loaded 2-core machine."""
TASK_TIMEOUT_S = 60
"""Launch of the gpu_worker node + the task, measured at about 18 s."""
CLIENT_TIMEOUT_S = TASK_TIMEOUT_S + 25
HEAD_STOP_S = 20
"""SIGTERM to `ray start --block` took 4-5 s."""
READY_LINE = "Ray runtime started"


def fake_variant(cfg: dict, gcs_address: str) -> dict:
    """The fake multi-node variant of a cluster.yaml config (see the module docstring)."""
    types = cfg["available_node_types"]
    head_type = cfg["head_node_type"]
    workers = {
        name: {
            "resources": {**spec["resources"], "CPU": WORKER_CPUS, "object_store_memory": OBJECT_STORE_BYTES},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 1,
        }
        for name, spec in types.items()
        if name != head_type
    }
    return {
        **{key: cfg[key] for key in KEPT_KEYS},
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # required whenever the GCS port is not 6379: else the fake worker raylets dial :6379
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {
                "resources": dict(types[head_type]["resources"]),
                "node_config": {},
                "max_workers": 0,  # the head type is never launched as a worker
            },
            **workers,
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        **FAKE_DEFAULTS,
    }


@dataclass
class FakeCluster:
    address: str
    head: subprocess.Popen
    head_log: Path
    cfg: dict
    variant: dict


def _cluster_processes(head_pid: int | None, address: str, temp_dir: Path) -> dict:
    """This cluster's processes, found by what only they have: the head's descendants; processes whose
    command line names its GCS address or Ray temp dir (raylets, log monitors, ...; reparented to PID 1
    once the head is gone); processes retitled `ray::...` (agents, workers: their command line is gone)
    with a file open under the temp dir (their redirected stdout/stderr); the descendants of all these."""
    import psutil

    marker = re.compile(rf"{re.escape(address)}(?!\d)|{re.escape(str(temp_dir) + os.sep)}")

    def ours(proc) -> bool:
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.pid == head_pid or marker.search(cmdline):
            return True
        if not cmdline.startswith("ray::"):
            return False
        try:
            return any(marker.search(f.path) for f in proc.open_files())
        except psutil.Error:
            return False

    found = {}
    roots = [proc for proc in psutil.process_iter(["cmdline"]) if ours(proc)]
    for proc in roots:
        found[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in proc.children(recursive=True)})
    found.pop(os.getpid(), None)
    return found


def _stop_cluster(head: subprocess.Popen, address: str, temp_dir: Path) -> None:
    """SIGTERM the `ray start --block` process and wait, then SIGTERM/SIGKILL what it left behind."""
    import psutil

    # Before the head's children are orphaned. The head's pid only while it is not reaped (not reused).
    procs = _cluster_processes(head.pid if head.poll() is None else None, address, temp_dir)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(HEAD_STOP_S)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(10)
    procs.update(_cluster_processes(None, address, temp_dir))
    left = [p for p in procs.values() if p.is_running()]  # psutil checks create times: no reused pids
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=5)  # a raylet whose GCS is gone ignores SIGTERM
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def fake_cluster(tmp_path):
    """A fake multi-node cluster from the cluster.yaml variant, head only at the start; always torn down."""
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    ip = get_node_ip_address()
    port, client_port, agent_port, dashboard_port = free_ports(4)
    address = f"{ip}:{port}"
    variant = fake_variant(cfg, address)
    config = tmp_path / "fake_cluster.yaml"
    config.write_text(yaml.safe_dump(variant, sort_keys=False))
    # Short and private: Ray's unix sockets live under it (path limit ~107 bytes), and so does
    # ray_current_cluster, which must not point a later bare ray.init() at this cluster.
    temp_dir = Path(tempfile.mkdtemp(prefix="kmax-fake-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="token")  # the session token: tests/conftest.py
    head_log = tmp_path / "head.log"
    cmd = [
        str(RAY_CLI),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--node-ip-address={ip}",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--autoscaling-config={config}",
        "--include-dashboard=false",
        f"--dashboard-port={dashboard_port}",  # checked even without a dashboard; 8265 may be taken
        f"--dashboard-agent-listen-port={agent_port}",  # default 52365 may be another Ray's
        f"--ray-client-server-port={client_port}",  # default 10001 likewise
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with head_log.open("w") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_READY_S
        while READY_LINE not in head_log.read_text(errors="replace"):
            assert head.poll() is None, f"ray start exited with {head.returncode}:\n{tail(head_log)}"
            assert time.monotonic() < deadline, f"head not up after {HEAD_READY_S} s:\n{tail(head_log)}"
            time.sleep(0.5)
        yield FakeCluster(address, head, head_log, cfg, variant)
    finally:
        _stop_cluster(head, address, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_client(cluster: FakeCluster, out_dir: Path) -> tuple[int | None, Path, Path]:
    """Run tests/fake_cluster_client.py; stop waiting early if the head dies. Returns (rc, stdout, stderr)."""
    out, err = out_dir / "client.out", out_dir / "client.err"
    dropped = ("RAY_ADDRESS", "RAY_FAKE_CLUSTER", "RAY_AUTH_MODE")  # the client finds the mode itself
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    with out.open("w") as fo, err.open("w") as fe:
        client = subprocess.Popen(
            [sys.executable, str(CLIENT), cluster.address, str(TASK_TIMEOUT_S)], stdout=fo, stderr=fe, env=env
        )
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while client.poll() is None and cluster.head.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if client.poll() is None:
        client.kill()
        client.wait(10)
        return None, out, err
    return client.returncode, out, err


def test_autoscaler_launches_gpu_worker_on_demand(fake_cluster, tmp_path):
    cfg, variant = fake_cluster.cfg, fake_cluster.variant
    types = cfg["available_node_types"]
    # the same check the autoscaler makes when it loads the config (it only logs a failure, at debug level)
    validate_config(variant)
    gpu_type = next(name for name, spec in types.items() if spec["resources"].get("GPU"))
    assert gpu_type == "gpu_worker" and gpu_type in variant["available_node_types"]

    rc, out, err = run_client(fake_cluster, tmp_path)
    logs = (
        f"\n--- client stdout ---\n{tail(out)}\n--- client stderr ---\n{tail(err)}"
        f"\n--- head ({fake_cluster.head_log}) ---\n{tail(fake_cluster.head_log)}"
    )
    assert fake_cluster.head.poll() is None, f"the head exited ({fake_cluster.head.returncode}){logs}"
    assert rc is not None, f"client still running after {CLIENT_TIMEOUT_S} s{logs}"
    assert rc == 0, f"client failed (rc={rc}){logs}"
    result = json.loads(out.read_text().strip().splitlines()[-1])

    assert len(result["nodes_before"]) == 1, f"expected the head alone before the task: {result}{logs}"
    nodes = {n["node_id"]: n for n in result["nodes"]}
    assert len(nodes) == 2, f"expected head + 1 launched worker alive: {result}{logs}"
    head = [n for n in nodes.values() if n["is_head"]]
    assert len(head) == 1 and head[0]["node_id"] == result["nodes_before"][0], result
    head_cpus = types[cfg["head_node_type"]]["resources"]["CPU"]
    assert head[0]["resources"].get("CPU", 0) == head_cpus and "GPU" not in head[0]["resources"], head[0]

    task = result["task"]
    assert task["node_id"] in nodes, f"task ran on a node that is gone: {result}"
    assert not nodes[task["node_id"]]["is_head"], f"task ran on the head: {result}"
    assert task["node_type"] == gpu_type, f"launched node type {task['node_type']!r}, expected {gpu_type!r}"
    launched = nodes[task["node_id"]]["resources"]
    assert launched["GPU"] == types[gpu_type]["resources"]["GPU"] == 1, launched
    assert launched["CPU"] == variant["available_node_types"][gpu_type]["resources"]["CPU"], launched
    assert len(task["gpu_ids"]) == 1, task
