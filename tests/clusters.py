"""A real multi-node Ray cluster for the tests (ray.cluster_utils.Cluster on this machine)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def three_node_cluster(env: dict[str, str] | None = None):
    """A real 3-node Ray cluster on this machine (ray.cluster_utils.Cluster), one CPU per node, connected.
    env: variables every node's raylet, hence every worker, starts with (set only while the nodes start)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ray.init(address=c.address, logging_level="ERROR")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
