"""Subprocess of tests/test_train_distributed.py::test_multinode_matches_single_node.

Starts its own 2-node `ray.cluster_utils.Cluster` (head + 1 worker node, NODE_CPUS logical CPUs each),
trains the tiny test config with 2 workers placed STRICT_SPREAD (one per node), writes
{"nodes", "loss": [[step, value], ...]}.
Usage: python tests/multinode_run.py DATA_DIR RUN_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NODE_CPUS = 1
"""Logical CPUs per node: 0.5 for the train worker and 0.5 left over (training workers read their records
themselves, pipeline.train.batches: no read task needs a CPU of its own)."""


def main(data_dir: str, run_dir: str, out: str) -> int:
    from ray.cluster_utils import Cluster

    from pipeline.ray_setup import RayConfig, init_ray, quiet_environment, use_token_auth
    from pipeline.train.driver import fit
    from tests.train_helpers import metric_steps, tiny_config

    quiet_environment()
    use_token_auth()  # both nodes with token authentication on, as cluster.yaml starts them
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS})
    try:
        cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray = init_ray(RayConfig(address=cluster.address))
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        cfg = tiny_config(
            data_dir,
            run_dir,
            "scaling.placement_strategy=STRICT_SPREAD",
            f"ray.address={cluster.address}",
            f"storage={Path(run_dir).parent / 'storage'}",  # a cluster of 2 nodes needs storage (shared here)
            workers=2,
        )
        summary = fit(cfg)
        loss = metric_steps(summary.tracking_uri, summary.mlflow_run_id, "train/loss")
        with open(out, "w") as f:
            json.dump({"nodes": nodes, "loss": loss}, f)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
