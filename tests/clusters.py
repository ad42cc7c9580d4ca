"""Ray for the tests, in one place: an embedded Ray (fixture local_ray and its variants) and a real multi-node
cluster on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def embedded_ray(**init_kwargs):
    """One embedded Ray in this process while the block runs (a Ray this process had started is shut down
    first); init_kwargs go to ray.init, e.g. num_cpus=4, or num_gpus=1 for a GPU that is not there."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", **init_kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_cluster(nodes: int = 3, *, env: dict[str, str] | None = None, node_env: list[dict[str, str]] | None = None,
                connect: bool = True):
    """A real Ray cluster of `nodes` one-CPU nodes on this machine (ray.cluster_utils.Cluster), all of them up.

    env: variables every node's raylet, hence every worker, starts with (set in os.environ only while the nodes
    start); node_env: one dict per node, that node's own variables (Ray's env_vars); connect: ray.init to the
    cluster while the block runs (a Ray this process had started is shut down first in any case)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    own = list(node_env or [{}] * nodes)
    if len(own) != nodes:
        raise ValueError(f"node_env has {len(own)} entries for {nodes} nodes")

    def args(k: int) -> dict:
        return {"num_cpus": 1, **({"env_vars": own[k]} if own[k] else {})}

    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={**args(0), "include_dashboard": False})
        for k in range(1, nodes):
            c.add_node(**args(k))
        c.wait_for_nodes()
    except BaseException:
        if c is not None:
            c.shutdown()
        raise
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        if connect:
            ray.init(address=c.address, logging_level="ERROR")
        yield c
    finally:
        if connect:
            ray.shutdown()
        c.shutdown()


def three_node_cluster(env: dict[str, str] | None = None):
    """A real 3-node Ray cluster on this machine, one CPU per node, connected (ray_cluster(3, env=env))."""
    return ray_cluster(3, env=env)
