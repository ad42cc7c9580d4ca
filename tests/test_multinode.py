"""Merges on a real 3-node Ray cluster (ray.cluster_utils.Cluster on this machine)."""

import os

import pytest
from clusters import three_node_cluster

from expo_dist.merge import run
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_exact

ALPHA = 0.4


@pytest.fixture(scope="module")
def cluster():
    with three_node_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def pair(pair_factory):
    return pair_factory("small", seed=5)


def merge(pair, out, **kw):
    return run(MergeSpec(sft=str(pair[0]), aligned=str(pair[1]), alpha=ALPHA, out=str(out), **kw), progress=False)


def files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".index.json")))


def test_three_nodes_byte_identical_to_one_worker(cluster, pair, tmp_path):
    one = tmp_path / "one"
    m1 = merge(pair, one, workers=1, max_shard_size="2MB")
    assert len({w["node_id"] for w in m1["workers"]}) == 1
    many = tmp_path / "many"
    m3 = merge(pair, many, max_shard_size="2MB", max_task_bytes="1MiB")
    nodes = {w["node_id"] for w in m3["workers"] if w["tasks"] > 0}
    assert len(nodes) == 3, m3["workers"]
    assert files(one) == files(many) and len(files(one)) >= 4
    for f in files(one):
        assert (one / f).read_bytes() == (many / f).read_bytes(), f
    assert_exact(str(many), str(pair[0]), str(pair[1]), ALPHA, tie=False)
