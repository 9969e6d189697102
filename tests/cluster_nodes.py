"""A Ray cluster of separate nodes that do not share a disk, and the real services around it, for tests.

`TwoNodeCluster` starts a head and ONE worker node on this machine, each a `ray start --block` process tree
of its own in a mount namespace of its own (`unshare --mount`):

* the worker node mounts an empty tmpfs over the *private parent* (a directory the test names), so every
  process of that node (`ray start`, raylet, agents, log monitor, Ray workers, whatever those start) sees
  an empty directory there, while the head, the test process and the drivers see the real one. A path
  such as ``<private_parent>/run`` therefore behaves like a run directory on two machines: what one node
  writes there the other never sees, and on the worker node the directory does not even exist until
  something there creates it. Files outside the private parent are seen by everyone, like a shared
  filesystem (use that deliberately, for logs, not for what the product must move between nodes);
* the head's namespace mounts nothing (propagation ``slave``: it sees the host's mounts). It exists so that
  "the head's processes" is an exact set: the processes of one namespace;
* each node has a custom resource (`HEAD_RESOURCE`, `WORKER_RESOURCE`) to pin tasks;
* `kill_worker_node` SIGKILLs every process of the worker node's namespace at once, as when a machine
  dies; its tmpfs goes with the namespace, so `start_worker_node` brings up a node whose private parent is
  empty again. `stop` ends both namespaces; nothing of the cluster survives it and no global `ray stop`
  is ever used (other Ray instances may run on the machine).

Why the tmpfs goes over a *parent* directory and never over Ray's own paths: a mount hides what lies under
it from the worker node only. Ray's temp dir holds the node's unix sockets (raylet, plasma store), its
session dir and its logs; the worker's must stay outside the private parent so the test can read its log
tails and remove it afterwards, and the head's must stay outside so the worker node's processes keep
whatever they read of it. `/dev/shm` (the object store's mmap files) is not touched either. The cluster
refuses a private parent that contains one of its temp dirs, the venv or the repository.

Facts established with Ray 2.60.0 (read in `ray/_private/node.py` and `ray/scripts/scripts.py`, and run):

* ``--temp-dir`` CAN be given on a worker node (the CLI help says "Can be specified per node"); it is not a
  head-only flag (those are ``--port``, ``--redis-shard-ports``, ``--include-dashboard``). Without it a
  worker node uses the head's temp dir *path*, read from the head's GcsNodeInfo, as its own: on one
  machine both nodes would then share one session directory, socket directory and log directory (names
  made unique by suffixes), so the worker's processes could not be told apart by their files. Each node
  here gets its own short temp dir under /tmp (unix socket paths must stay under ~107 bytes), and a
  restarted worker node a fresh one.
* A node's IP cannot be 127.0.0.1 on Linux: ``--node-ip-address=127.0.0.1`` is rewritten to the
  machine's routable address (`services.resolve_ip_for_localhost`; 192.0.2.2 here, the address every Ray
  instance on this machine uses), and the only switch that keeps loopback,
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, makes `ray start --address` refuse to start a worker node. So
  the nodes are left on Ray's choice of this host's own address (traffic to it stays on the machine) and
  only the addresses handed to clients (`address`, the dashboard, S3, MLflow) are 127.0.0.1: the GCS
  listens on every interface.
* Several raylets on one IP work; a driver started with ``ray.init(address=...)`` on this host attaches to
  the head's raylet (`ray._private.services.get_node_to_connect_for_driver` prefers the head node).
* The dashboard agent listens on 52365 by default on every node: each node gets a free port instead.
* The dashboard (and with it the State API) is on by default here (``include_dashboard``): Ray Train V2's
  PlacementGroupCleaner asks the State API whether the train controller is alive
  (`ray.train.v2._internal.state.util.is_actor_alive`) and removes the run's placement group only once it
  is dead; a failed query (RayStateApiException) just `continue`s its loop (placement_group_cleaner.py),
  so without a dashboard the group of a controller that died is never removed, which is what a
  node-failure test must see happen. Run here from a task: without a dashboard `list_nodes()` raised
  ServerUnavailable (a RayStateApiException); with it, it answered.
* Every node and driver gets ``RAY_ADDRESS=<address>``. Inside a Ray worker the State API (and anything
  else calling `ray.util.state` without an address) finds its cluster through RAY_ADDRESS, else through
  ``/tmp/ray/ray_current_cluster`` (the *default* temp dir, not the node's), else by grepping for GCS
  processes (`services.get_ray_address_from_environment`). With private temp dirs and another Ray on the
  machine (the session Ray of tests/conftest.py, another job) a task's `list_nodes()` raised
  ConnectionError "Found multiple active Ray instances", and with a stale or foreign
  ``/tmp/ray/ray_current_cluster`` it would have asked that other cluster. On a real cluster every machine
  has its own /tmp/ray pointing at its cluster; RAY_ADDRESS restores that. A 2-worker STRICT_SPREAD
  TorchTrainer fit over both nodes ran in 15 s.

The S3 and MLflow services (`S3Server`, `MlflowServer`) are real servers in their own processes on
127.0.0.1, stoppable and restartable by the tests.

Facts about S3 from this venv (pyarrow 25.0.1, moto 5.2.5), run against the moto server:

* ``pyarrow.fs.FileSystem.from_uri("s3://bucket/key")`` honours ``AWS_ENDPOINT_URL_S3`` and
  ``AWS_ENDPOINT_URL`` by itself (either one alone reached the local server). Ray Train resolves an
  ``s3://`` storage_path with exactly that call (`ray.train.v2._internal.execution.storage`), so the
  environment is enough for it.
* ``pyarrow.fs.S3FileSystem()`` built directly does NOT: with either variable set it still looked up
  ``s3.us-east-1.amazonaws.com`` (and failed: no DNS here). It needs ``endpoint_override`` (and
  ``scheme="http"`` with a bare ``host:port``): see `S3Server.filesystem`.
* ``AWS_EC2_METADATA_DISABLED=true`` keeps the AWS SDKs from asking the instance-metadata address
  (169.254.169.254, off this machine) for a region or credentials.

Why moto's server mode for S3: it is on PyPI, pure Python, maintained (5.2.5 of 2026-10; about the 640th
most downloaded package there) and answers the S3 REST calls pyarrow's C++ client and boto3 make,
multipart upload included, in a threaded server. The other candidates on PyPI are no better: ``minio``
there is MinIO's client SDK (the MinIO server is a Go binary that no registry reachable here ships);
``localstack`` is a CLI that runs a Docker image, and ``localstack-core``, its runtime, is a whole AWS
emulator, far larger than the one service needed; the small S3 servers (``pys3server`` 0.1.0b9 of 2024-07,
``fake-s3`` 1.0.2 of 2024-02, ``alocals3``) are betas or barely used. Moto keeps its objects in memory: a
restarted `S3Server` has its bucket again but no objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray  # also puts Ray's vendored psutil on sys.path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY_CLI = BIN / "ray"
HOST = "127.0.0.1"
HEAD_RESOURCE = "head_node"
WORKER_RESOURCE = "worker_node"
RESOURCE_UNITS = 100
"""Units of the custom node resources: a task asks for 1 to be pinned, many can run side by side."""
OBJECT_STORE_BYTES = 256 * 1024**2
"""Per node: small, for a 2-core machine with 24 GiB shared with other jobs."""
READY_LINE = "Ray runtime started"
NODE_READY_S = 180.0
"""`ray start` until READY_LINE. Measured here: head + worker node up in 7.5-11 s on a lightly loaded
machine; tests/test_cluster_fake.py saw 21-23 s for a head alone under load."""
NODES_TIMEOUT_S = 120.0
"""For `wait_for_nodes`. The GCS health check declared a killed node dead 15 s after the kill here."""
STOP_GRACE_S = 10.0
SERVICE_READY_S = 90.0
DRIVER_TIMEOUT_S = 240.0
RESULT_MARK = "CLUSTER_NODES_RESULT "


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on every interface right now (Ray binds its GCS to all of them); another
    process may still take one before it is used."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def node_env(extra: dict[str, str] | None = None, *, node: bool = False) -> dict[str, str]:
    """The environment for drivers, or with `node` for `ray start`: this process's, without RAY_ADDRESS
    (which would point a driver elsewhere), plus `extra`.

    The token is where tests/conftest.py put it (RAY_AUTH_TOKEN_PATH, one of Ray's standard places). A
    node runs with token authentication on (RAY_AUTH_MODE=token, as cluster.yaml starts every node); a
    driver gets no RAY_AUTH_MODE, as a user's shell has none: `kmax` must find its way in with the token
    alone (pipeline.ray_setup.choose_auth_mode)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    if node:
        env["RAY_AUTH_MODE"] = "token"
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------------------------------
# processes by mount namespace


def mount_namespace(pid: int | str = "self") -> str | None:
    """The mount namespace of a process, e.g. ``mnt:[4026532174]``; None once it is gone (or a zombie)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def namespace_processes(namespace: str) -> list:
    """Every live process of a mount namespace, as psutil.Process objects (their create times guard the
    later signals against reused pids)."""
    import psutil

    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and mount_namespace(entry) == namespace:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(int(entry)))
    return procs


def kill_namespace(namespace: str, timeout: float = 10.0) -> None:
    """SIGKILL every process of the namespace, again until none is left (a process may fork meanwhile)."""
    import psutil

    deadline = time.monotonic() + timeout
    while procs := namespace_processes(namespace):
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=2)
        if time.monotonic() > deadline:
            left = [p.pid for p in namespace_processes(namespace)]
            raise RuntimeError(f"processes of {namespace} survive SIGKILL: {left}")


def namespaces_available() -> str | None:
    """None when this process may create mount namespaces and mount a tmpfs in them, else why not."""
    probe = ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "probe", "/mnt"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare` cannot run: {exc}"
    return None if done.returncode == 0 else f"`{' '.join(probe)}` failed: {done.stderr.strip()}"


# --------------------------------------------------------------------------------------------------
# one node


class NodeStartError(RuntimeError):
    """A node did not come up; the message holds the tail of its `ray start` log."""


@dataclass
class RayNode:
    """One `ray start --block` process tree in a mount namespace of its own.

    `namespace` is recorded as soon as `unshare` has made it and is never this process's own, so killing
    "the node's namespace" can never reach the test process or another node. It is forgotten once the node
    is killed: a namespace's id can be reused by a later one.
    """

    name: str
    proc: subprocess.Popen
    log: Path
    temp_dir: Path
    namespace: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole node at once, as a machine that loses power; reap the launcher."""
        if self.namespace:
            kill_namespace(self.namespace)
            self.namespace = None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it stops its node's processes), then SIGKILL what is left."""
        if self.alive():
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_GRACE_S)
        self.kill()


def launch_node(
    name: str,
    ray_args: list[str],
    *,
    temp_dir: Path,
    log: Path,
    env: dict[str, str],
    private_parent: Path | None = None,
) -> RayNode:
    """Run `ray start --block --temp-dir=<temp_dir> <ray_args>` in a new mount namespace, logging to `log`,
    and wait for READY_LINE.

    With `private_parent`, an empty tmpfs is mounted there inside the namespace before Ray starts, and the
    mount is private (never propagated back to the host). Without it the namespace is a `slave` copy of the
    host's. Raises NodeStartError, with the log tail, when `ray start` exits or is not up within
    NODE_READY_S; every process the half-started node had is killed first.
    """
    ray_cmd = [str(RAY_CLI), "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ray_args]
    if private_parent is None:
        cmd = ["unshare", "--mount", "--propagation", "slave", *ray_cmd]
    else:
        # sh runs in the new namespace: mount, then become `ray start` (the launcher's pid all along).
        script = 'mount -t tmpfs -o mode=0755 kmax-private "$0" && exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(private_parent)]
        cmd += ray_cmd
    with log.open("w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
    node = RayNode(name, proc, log, temp_dir)
    try:
        _wait_namespace(node)
        _wait_ready(node)
    except BaseException:
        node.kill()
        raise
    return node


def _wait_namespace(node: RayNode, timeout: float = 30.0) -> None:
    """Record the launcher's mount namespace as soon as `unshare` has made it (milliseconds), so that even a
    node that never comes up can be killed whole."""
    own = mount_namespace()
    deadline = time.monotonic() + timeout
    while (namespace := mount_namespace(node.proc.pid)) in (own, None) and node.alive():
        if time.monotonic() > deadline:
            raise NodeStartError(f"{node.name}: no mount namespace of its own after {timeout:.0f} s")
        time.sleep(0.01)
    if not node.alive():
        raise NodeStartError(f"{node.name}: exited with {node.proc.returncode}:\n{tail(node.log)}")
    node.namespace = namespace


def _wait_ready(node: RayNode) -> None:
    """Wait for READY_LINE in the node's log."""
    deadline = time.monotonic() + NODE_READY_S
    while READY_LINE not in node.log.read_text(errors="replace"):
        if not node.alive():
            raise NodeStartError(
                f"{node.name}: ray start exited with {node.proc.returncode}:\n{tail(node.log)}"
            )
        if time.monotonic() > deadline:
            raise NodeStartError(f"{node.name}: not up after {NODE_READY_S:.0f} s:\n{tail(node.log)}")
        time.sleep(0.5)


def _next_log(work_dir: Path, name: str) -> Path:
    """``<work_dir>/<name>-<n>.log`` with the first n not taken (a restarted node or server keeps its
    earlier log)."""
    n = 0
    while (work_dir / f"{name}-{n}.log").exists():
        n += 1
    return work_dir / f"{name}-{n}.log"


# --------------------------------------------------------------------------------------------------
# the cluster


@dataclass
class NodeInfo:
    """An alive node as the GCS reports it."""

    node_id: str
    is_head: bool
    resources: dict[str, float]
    temp_dir: str


class TwoNodeCluster:
    """A head and one worker node that share no private directory (see the module docstring).

    Use as a context manager (or call `start` and `stop`); `stop` always runs on the way out and leaves no
    process of the cluster behind. `address` is the GCS address for ``ray.init(address=...)`` or
    ``--set ray.address=...``. `env` is added to both nodes' environment, so every Ray worker sees it (as
    if it were set on each machine), next to RAY_ADDRESS=`address`. Drivers must run in other processes
    (`run_driver`): the pytest process may hold the session Ray.
    """

    def __init__(
        self,
        private_parent: Path,
        work_dir: Path,
        *,
        head_cpus: int = 1,
        worker_cpus: int = 2,
        env: dict[str, str] | None = None,
        include_dashboard: bool = True,
        object_store_bytes: int = OBJECT_STORE_BYTES,
    ):
        self.private_parent = Path(private_parent).resolve()
        self.work_dir = Path(work_dir)
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.port, self.dashboard_port = free_ports(2)
        # RAY_ADDRESS on the nodes: see the module docstring (the State API inside the cluster).
        self.env = node_env({"RAY_ADDRESS": self.address, **(env or {})}, node=True)
        self.include_dashboard = include_dashboard
        self.object_store_bytes = object_store_bytes
        self.head: RayNode | None = None
        self.worker: RayNode | None = None
        self.worker_node_id: str | None = None
        self._temp_dirs: list[Path] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str | None:
        return f"http://{HOST}:{self.dashboard_port}" if self.include_dashboard else None

    def __enter__(self) -> TwoNodeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> TwoNodeCluster:
        """Start the head, then the worker node, and wait until the GCS lists both alive. On failure the
        nodes' Ray logs are kept under `work_dir` and everything started is stopped."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.private_parent.mkdir(parents=True, exist_ok=True)
        try:
            self._start_head()
            self.start_worker_node()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, name: str, args: list[str], private_parent: Path | None = None) -> RayNode:
        """`launch_node` with a fresh short temp dir (removed by `stop`) and the next free log name; on
        failure the node's Ray session logs are copied to `work_dir` before the temp dir goes."""
        temp_dir = Path(tempfile.mkdtemp(prefix=f"kmax-{name}-", dir="/tmp"))
        self._temp_dirs.append(temp_dir)
        self._check_private_parent()
        log = _next_log(self.work_dir, name)
        try:
            return launch_node(
                name, args, temp_dir=temp_dir, log=log, env=self.env, private_parent=private_parent
            )
        except NodeStartError:
            _keep_session_logs(temp_dir, log.with_suffix(""))
            raise

    def _start_head(self) -> None:
        client_port, agent_port = free_ports(2)
        args = [
            "--head",
            f"--port={self.port}",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({HEAD_RESOURCE: RESOURCE_UNITS})}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--include-dashboard={str(self.include_dashboard).lower()}",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={self.dashboard_port}",  # checked even without a dashboard; 8265 may be taken
            f"--dashboard-agent-listen-port={agent_port}",  # the default 52365 may be another node's
            f"--ray-client-server-port={client_port}",  # the default 10001 likewise
        ]
        self.head = self._launch("head", args)

    def _check_private_parent(self) -> None:
        """Refuse a private parent that would hide from the worker node something it needs."""
        needed = [Path(tempfile.gettempdir()), Path(sys.prefix), REPO, Path("/dev/shm"), *self._temp_dirs]
        for path in needed:
            path = path.resolve()
            if path == self.private_parent or self.private_parent in path.parents:
                raise ValueError(
                    f"private parent {self.private_parent} would hide {path} from the worker node"
                )

    def start_worker_node(self) -> RayNode:
        """Start the worker node (again) in a fresh mount namespace whose private parent is an empty tmpfs,
        and wait until the GCS lists exactly it and the head alive. Sets `worker_node_id`."""
        if self.head is None or not self.head.alive():
            raise RuntimeError(f"the head is not running\n{self.logs()}")
        if self.worker is not None and self.worker.alive():
            raise RuntimeError("the worker node is still running: kill_worker_node() first")
        (agent_port,) = free_ports(1)
        args = [
            f"--address={self.address}",
            f"--num-cpus={self.worker_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({WORKER_RESOURCE: RESOURCE_UNITS})}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--dashboard-agent-listen-port={agent_port}",  # the head's and other Rays' are taken
        ]
        self.worker = self._launch("worker", args, private_parent=self.private_parent)
        try:
            nodes = self.wait_for_nodes(2)
        except TimeoutError:
            _keep_session_logs(self.worker.temp_dir, self.worker.log.with_suffix(""))
            raise
        self.worker_node_id = next(n.node_id for n in nodes if n.temp_dir == str(self.worker.temp_dir))
        return self.worker

    def kill_worker_node(self, wait_dead: bool = True) -> None:
        """SIGKILL every process of the worker node at once (raylet, agents, Ray workers, `ray start`).

        With `wait_dead`, return only once the GCS has declared that node dead (its health check, about
        15 s), so that a following `start_worker_node` + `wait_for_nodes(2)` cannot count the old node.
        """
        assert self.worker is not None, "no worker node was started"
        self.worker.kill()
        if wait_dead:
            self.wait_for_nodes(1)

    def alive_nodes(self) -> list[NodeInfo]:
        """The nodes the GCS reports alive (asked directly, not through a driver; with the session token)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        from pipeline.ray_setup import use_token_auth

        use_token_auth()

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10).values()
        return [
            NodeInfo(info.node_id.hex(), info.is_head_node, dict(info.resources_total), info.temp_dir)
            for info in infos
            if info.state == GcsNodeInfo.GcsNodeState.ALIVE
        ]

    def wait_for_nodes(self, n: int, timeout: float = NODES_TIMEOUT_S) -> list[NodeInfo]:
        """Wait until exactly `n` nodes are alive; returns them. Raises TimeoutError (with the last answer
        or error and the node logs), or RuntimeError at once if the head has exited."""
        deadline = time.monotonic() + timeout
        last: object = "no answer yet"
        while time.monotonic() < deadline:
            if self.head is None or not self.head.alive():
                raise RuntimeError(f"the head is not running\n{self.logs()}")
            try:
                nodes = self.alive_nodes()
            except Exception as exc:  # the GCS may be slow to answer on a loaded machine: ask again
                last = exc
            else:
                if len(nodes) == n:
                    return nodes
                last = nodes
            time.sleep(0.5)
        raise TimeoutError(f"not {n} alive nodes after {timeout:.0f} s; last: {last!r}\n{self.logs()}")

    def logs(self) -> str:
        """The tails of the nodes' `ray start` logs, for failure messages."""
        nodes = [node for node in (self.head, self.worker) if node is not None]
        return "\n".join(f"--- {node.log} ---\n{tail(node.log)}" for node in nodes)

    def stop(self, kill: bool = False) -> None:
        """Stop the worker node, then the head; kill what is left of either; remove the Ray temp dirs. With
        `kill`, SIGKILL both nodes at once instead, as machines that are lost (`start` works again after
        either)."""
        for node in (self.worker, self.head):
            if node is None:
                continue
            if kill:
                node.kill()
            else:
                node.stop()
        for temp_dir in self._temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _keep_session_logs(temp_dir: Path, dest: Path) -> None:
    """Copy a node's Ray session logs (raylet.err, gcs_server.err, ...) out of its temp dir, which `stop`
    removes, for a failure to be diagnosed afterwards (pytest keeps tmp_path)."""
    with contextlib.suppress(OSError):
        shutil.copytree(
            temp_dir / "session_latest" / "logs", dest, dirs_exist_ok=True, ignore_dangling_symlinks=True
        )


# --------------------------------------------------------------------------------------------------
# drivers


def run_driver(address: str, target: str, *args, env: dict[str, str] | None = None, timeout=DRIVER_TIMEOUT_S):
    """Call ``target(*args)`` (``"package.module:function"``) in a new driver process connected to the
    cluster at `address`, and return what it returned (JSON-serialisable values only).

    The driver runs in the repository (so ``tests.*`` imports there, and in the Ray workers too: Ray adds a
    driver's current directory to its workers' sys.path) with `node_env(env)` and RAY_ADDRESS=`address`
    (the State API in the driver finds the cluster by it). Raises RuntimeError with the driver's output
    when it fails or times out.
    """
    code = f"from tests.cluster_nodes import _driver_main; _driver_main({address!r}, {target!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=node_env({"RAY_ADDRESS": address, **(env or {})}),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"driver {target} still running after {timeout:.0f} s:\n{out[-4000:]}") from None
    results = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"driver {target} failed (rc={proc.returncode}):\n{out[-4000:]}")
    return json.loads(results[-1][len(RESULT_MARK) :])


def _driver_main(address: str, target: str) -> None:
    """Body of the `run_driver` process: connect, call the target with the JSON args of argv[1], print."""
    import importlib
    import logging

    from pipeline.ray_setup import choose_auth_mode

    module, _, name = target.partition(":")
    func = getattr(importlib.import_module(module), name)
    choose_auth_mode(address)  # as `kmax` does: a plain ray.init never turns token auth on for an address
    ray.init(address=address, logging_level=logging.ERROR)
    try:
        result = func(*json.loads(sys.argv[1]))
    finally:
        ray.shutdown()
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# services


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str) -> None:
    """Wait until GET `url` answers 200; raise RuntimeError with the log tail if `proc` exits first."""
    deadline = time.monotonic() + SERVICE_READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {SERVICE_READY_S:.0f} s:\n{tail(log)}")


@dataclass
class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, artifacts served by the server (clients on any node upload over
    HTTP, no shared disk needed) to `artifacts` (default ``<root>/artifacts``; an ``s3://`` URI with `env`
    holding the S3 server's settings).

    Without `auth`: no logins, the store in `backend` (default: SQLite ``<root>/mlflow.db``). With
    ``auth=(admin, password)`` it is the cluster's server, started the product's way (`kmax
    tracking-server`, pipeline.tracking_server): MLflow's basic-auth app, its metadata and users in
    `backend` (a database URI such as `PostgresServer.uri`; None: the ephemeral SQLite store, opted in
    explicitly), the admin created with that password on the first start; `client_env` logs in as it.

    The port is chosen once: `stop` then `start` brings the same store back at the same `uri`; a new
    server on the same `backend` (a replaced head) gets a port of its own.
    """

    root: Path
    port: int = field(default_factory=lambda: free_ports(1)[0])
    proc: subprocess.Popen | None = None
    backend: str | None = None
    auth: tuple[str, str] | None = None
    artifacts: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def backend_uri(self) -> str:
        return self.backend or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def client_env(self) -> dict[str, str]:
        """MLflow's standard client credentials of the admin (empty without `auth`)."""
        if self.auth is None:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": self.auth[0], "MLFLOW_TRACKING_PASSWORD": self.auth[1]}

    def _command(self) -> tuple[list[str], dict[str, str]]:
        from pipeline.tracking_server import server_command, server_env

        artifacts = self.artifacts or str(self.root / "artifacts")
        if self.auth is None:
            cmd = server_command(self.backend_uri, HOST, self.port)
            return [*cmd, "--artifacts-destination", artifacts], server_env(self.env)
        cmd = [sys.executable, "-m", "pipeline.cli", "tracking-server", "--host", HOST,
               "--port", str(self.port), "--workers", "1", "--state-dir", str(self.root / "state"),
               "--artifacts-destination", artifacts]  # fmt: skip
        admin = {"MLFLOW_AUTH_ADMIN_USERNAME": self.auth[0], "MLFLOW_AUTH_ADMIN_PASSWORD": self.auth[1]}
        if self.backend is None:
            cmd.append("--ephemeral")
        else:
            admin["KMAX_TRACKING_DB"] = self.backend
        return cmd, server_env({**self.env, **admin})

    def start(self) -> MlflowServer:
        """Start the server and wait for /health (raises RuntimeError with its log tail)."""
        assert self.proc is None or self.proc.poll() is not None, "the server is already running"
        self.root.mkdir(parents=True, exist_ok=True)
        cmd, env = self._command()
        log = _next_log(self.root, "mlflow-server")
        with log.open("w") as out:
            # its own session: stop_server signals the process group (uvicorn's children too)
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )
        try:
            _wait_http(self.uri + "/health", self.proc, log, "mlflow server")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM the server's process group (SIGKILL after 20 s); the store stays where it is."""
        from pipeline.tracking_server import stop_server

        if self.proc is not None:
            stop_server(self.proc)

    def kill(self) -> None:
        """SIGKILL the server's process group, as when its machine is lost; the store stays where it is."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


POSTGRES_USER = "kmax"
POSTGRES_DATABASE = "kmax"
UNPRIVILEGED_USER = "nobody"
"""The OS user PostgreSQL runs as when the tests run as root (as CI does): it refuses to run as root."""


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (initdb, postgres): Debian puts them under
    /usr/lib/postgresql/<major>/bin (the newest wins), not on PATH; else where PATH has them."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


def _as_unprivileged() -> list[str]:
    """The command prefix that runs a program as `UNPRIVILEGED_USER` when this process is root."""
    if os.geteuid() != 0:
        return []
    import pwd

    user = pwd.getpwnam(UNPRIVILEGED_USER)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


@dataclass
class PostgresServer:
    """A real PostgreSQL server (Debian's package) on 127.0.0.1: role `POSTGRES_USER` with a fresh random
    password (scram-sha-256, as a managed instance asks), database `POSTGRES_DATABASE`; `uri` is the
    SQLAlchemy URI MLflow takes. Run as `UNPRIVILEGED_USER` when the tests run as root.

    The cluster's database, off every Ray node: `stop` then `start` brings the same data back (the port
    is kept); `remove` deletes it. The data directory is a fresh one under /tmp owned by the server's
    user, not under `log_dir`: pytest's temporary directories are private to root, and PostgreSQL must
    own its data directory and reach it. The log goes to `log_dir`.
    """

    log_dir: Path
    port: int = field(default_factory=lambda: free_ports(1)[0])
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    data_root: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"postgresql://{POSTGRES_USER}:{self.password}@{HOST}:{self.port}/{POSTGRES_DATABASE}"

    def _bin(self, name: str) -> str:
        directory = postgres_bin()
        if directory is None:
            raise RuntimeError("PostgreSQL's server is not installed: `make postgres` (Debian's postgresql)")
        return str(directory / name)

    def _initdb(self, log: Path) -> None:
        """A new cluster with the password role, in a directory the server's user owns."""
        self.data_root = Path(tempfile.mkdtemp(prefix="kmax-pg-", dir="/tmp"))
        password_file = self.data_root / "pw"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam(UNPRIVILEGED_USER)
            for path in (self.data_root, password_file):
                os.chown(path, user.pw_uid, user.pw_gid)
        cmd = [*_as_unprivileged(), self._bin("initdb"), "-D", str(self.data_root / "data"),
               f"--username={POSTGRES_USER}", f"--pwfile={password_file}", "--auth=scram-sha-256",
               "--encoding=UTF8", "--locale=C", "--no-sync"]  # fmt: skip
        with log.open("a") as out:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120)
        password_file.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{tail(log)}")

    def start(self) -> PostgresServer:
        """Start the server (initialising the data directory and the database on the first start) and wait
        until it accepts the role's login (RuntimeError with the log tail)."""
        assert self.proc is None or self.proc.poll() is not None, "the server is already running"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = _next_log(self.log_dir, "postgres")
        first = self.data_root is None
        if first:
            self._initdb(log)
        # fsync off: a test database need not survive a power cut, and the 2-core CI disk is shared
        cmd = [*_as_unprivileged(), self._bin("postgres"), "-D", str(self.data_root / "data"),
               "-k", str(self.data_root), "-h", HOST, "-p", str(self.port), "-c", "fsync=off"]  # fmt: skip
        with log.open("a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_login(log)
            if first:
                self.sql(f"CREATE DATABASE {POSTGRES_DATABASE}", database="postgres")
        except BaseException:
            if first:
                self.remove()  # a half-made data directory is of no use
            else:
                self.stop()
            raise
        return self

    def sql(self, statement: str, database: str = POSTGRES_DATABASE) -> list[tuple]:
        """Run one statement as the role (autocommit: CREATE DATABASE cannot run in a transaction); its
        rows (empty when it returns none)."""
        import psycopg

        conninfo = self.uri.rsplit("/", 1)[0] + f"/{database}"
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def _wait_login(self, log: Path) -> None:
        import psycopg

        deadline = time.monotonic() + SERVICE_READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{tail(log)}")
            try:
                self.sql("SELECT 1", database="postgres")
                return
            except psycopg.OperationalError:
                time.sleep(0.3)
        raise RuntimeError(f"postgres did not accept a login within {SERVICE_READY_S:.0f} s:\n{tail(log)}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, the data is kept); SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def remove(self) -> None:
        """Stop, and delete the data directory."""
        self.stop()
        if self.data_root is not None:
            shutil.rmtree(self.data_root, ignore_errors=True)
            self.data_root = None


@dataclass
class S3Server:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with one bucket, in memory.

    `env` is what a client process needs (boto3, pyarrow's `FileSystem.from_uri`, Ray Train's s3://
    storage_path); `filesystem()` is a pyarrow S3FileSystem built the way that does not read the endpoint
    from the environment. A restarted server (`stop`, `start`) is empty apart from the bucket.
    """

    root: Path
    bucket: str = "kmax-test"
    port: int = field(default_factory=lambda: free_ports(1)[0])
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def filesystem(self):
        """A pyarrow S3FileSystem on this server (the constructor ignores AWS_ENDPOINT_URL*)."""
        import pyarrow.fs

        env = self.env
        return pyarrow.fs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env["AWS_DEFAULT_REGION"],
            endpoint_override=f"{HOST}:{self.port}",
            scheme="http",
        )

    def start(self) -> S3Server:
        """Start the server, wait until it answers, create the bucket."""
        import boto3

        assert self.proc is None or self.proc.poll() is not None, "the server is already running"
        self.root.mkdir(parents=True, exist_ok=True)
        log = _next_log(self.root, "s3-server")
        cmd = [str(BIN / "moto_server"), "--host", HOST, "--port", str(self.port)]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_http(self.endpoint + "/moto-api/", self.proc, log, "moto server")
            boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials(self.env)).create_bucket(
                Bucket=self.bucket
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _boto_credentials(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


# --------------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module: `from tests.cluster_nodes import two_node_cluster`)


def require_namespaces() -> None:
    """Skip when mount namespaces are not available (a user's non-root clone); fail in CI instead, where
    they must be (a skipped storage test would hide a regression)."""
    reason = namespaces_available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"mount namespaces are required in CI: {reason}")
    pytest.skip(f"needs root and mount namespaces: {reason}")


@pytest.fixture
def two_node_cluster(tmp_path) -> Iterator[TwoNodeCluster]:
    """A started `TwoNodeCluster` (default CPUs, private parent tmp_path/private, node logs under
    tmp_path/nodes); always stopped."""
    require_namespaces()
    with TwoNodeCluster(tmp_path / "private", tmp_path / "nodes") as cluster:
        yield cluster


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[MlflowServer]:
    """A started `MlflowServer` with its store under tmp_path/mlflow; always stopped."""
    server = MlflowServer(tmp_path / "mlflow").start()
    yield server
    server.stop()


def require_postgres() -> None:
    """Skip when PostgreSQL's server is not installed (a user's machine); fail in CI, where `make test`
    installs it (a skipped database test would hide a regression)."""
    if postgres_bin() is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("PostgreSQL's server is required in CI (`make postgres` installs Debian's postgresql)")
    pytest.skip("PostgreSQL's server is not installed (`make postgres`)")


@pytest.fixture
def postgres_server(tmp_path) -> Iterator[PostgresServer]:
    """A started `PostgresServer` logging under tmp_path/postgres; always removed."""
    require_postgres()
    server = PostgresServer(tmp_path / "postgres").start()
    yield server
    server.remove()


@pytest.fixture
def s3_server(tmp_path) -> Iterator[S3Server]:
    """A started `S3Server` (bucket created) logging under tmp_path/s3; always stopped."""
    server = S3Server(tmp_path / "s3").start()
    yield server
    server.stop()
