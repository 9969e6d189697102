"""Subprocess of tests/test_cluster_fake.py: a driver of the fake multi-node cluster.

Joins the cluster, records the alive nodes, runs one task that needs a GPU (only the fake `gpu_worker`
type has one, so the autoscaler must launch such a node first) and prints one JSON line:
{"nodes_before": [node_id, ...], "task": {"node_id", "node_type", "gpu_ids"},
"nodes": [{"node_id", "is_head", "resources"}, ...]}.
It runs in its own process because the pytest process may already hold the session Ray (tests/conftest.py).
Usage: python tests/fake_cluster_client.py ADDRESS TASK_TIMEOUT_S
"""

from __future__ import annotations

import json
import logging
import os
import sys

HEAD_RESOURCE = "node:__internal_head__"
"""Resource Ray gives the head node only."""


def alive_nodes(ray) -> list[dict]:
    return [
        {"node_id": n["NodeID"], "is_head": HEAD_RESOURCE in n["Resources"], "resources": n["Resources"]}
        for n in ray.nodes()
        if n["Alive"]
    ]


def main(address: str, task_timeout_s: float) -> int:
    import ray

    from pipeline.ray_setup import choose_auth_mode

    choose_auth_mode(address)  # the cluster runs with token authentication, as cluster.yaml starts it
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1, num_gpus=1)
        def where() -> dict:
            ctx = ray.get_runtime_context()
            return {
                "node_id": ctx.get_node_id(),
                # set by the fake provider on the node it launches, from the autoscaler's node type
                "node_type": os.environ.get("RAY_NODE_TYPE_NAME"),
                "gpu_ids": ctx.get_accelerator_ids().get("GPU", []),
            }

        before = [n["node_id"] for n in alive_nodes(ray)]
        task = ray.get(where.remote(), timeout=task_timeout_s)
        print(json.dumps({"nodes_before": before, "task": task, "nodes": alive_nodes(ray)}), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
